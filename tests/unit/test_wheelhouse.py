"""The wheelhouse's pure parts: what a wheel asks of a host, the manifest the role checks hosts against, the
hash-pinned requirements, the platforms pip is asked for, and the controller's own versions as the pins."""

from __future__ import annotations

from importlib import metadata

import pytest

from tuner.errors import UserError
from tuner.wheelhouse import (
    WheelNeeds,
    host_requirements,
    installed_constraints,
    manifest_of,
    platform_tags,
    requirement_lines,
    wheel_needs,
)

NUMPY = "numpy-2.4.6-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl"
YAML = "pyyaml-6.0.4-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl"
PURE = "optuna-5.0.0-py3-none-any.whl"
ABI3 = "cryptography-46.0.0-cp311-abi3-manylinux_2_34_x86_64.whl"
OURS = "llamahost-0.1.0-py3-none-any.whl"


@pytest.mark.parametrize(("name", "needs"), [
    (PURE, WheelNeeds(None, None, None)),
    (NUMPY, WheelNeeds("3.11", "x86_64", (2, 27))),  # either tag installs: the older glibc is what it needs
    (YAML, WheelNeeds("3.11", "x86_64", (2, 17))),
    (ABI3, WheelNeeds(None, "x86_64", (2, 34))),  # the stable ABI runs on every CPython from 3.11 on
    ("charset_normalizer-3.5.3-cp312-cp312-manylinux1_x86_64.whl", WheelNeeds("3.12", "x86_64", (2, 5))),
])
def test_a_wheel_says_what_it_needs_of_a_host(name: str, needs: WheelNeeds) -> None:
    assert wheel_needs(name) == needs


def test_a_wheel_built_on_one_machine_only_is_refused() -> None:
    with pytest.raises(UserError, match="linux_x86_64, which a manylinux host cannot install"):
        wheel_needs("numpy-2.4.6-cp311-cp311-linux_x86_64.whl")


def test_the_manifest_names_one_python_one_architecture_and_the_newest_glibc_any_wheel_needs() -> None:
    manifest = manifest_of({OURS: "a" * 64, PURE: "b" * 64, NUMPY: "c" * 64, YAML: "d" * 64, ABI3: "e" * 64})
    assert (manifest.llamahost, manifest.python, manifest.arch, manifest.glibc) == ("0.1.0", "3.11", "x86_64", "2.34")
    assert manifest.to_dict()["wheels"] == dict(sorted(manifest.wheels.items()))
    assert manifest_of({OURS: "a" * 64}).glibc is None  # pure Python: any Linux host


@pytest.mark.parametrize(("wheels", "problem"), [
    ({OURS: "a", NUMPY: "b", "numpy-2.4.6-cp312-cp312-manylinux_2_27_x86_64.whl": "c"}, "mixes Pythons"),
    ({OURS: "a", NUMPY: "b", "numpy-2.4.6-cp311-cp311-manylinux_2_27_aarch64.whl": "c"}, "architectures"),
    ({PURE: "a"}, "has no llamahost wheel"),
])
def test_a_wheelhouse_for_no_single_host_is_refused(wheels: dict[str, str], problem: str) -> None:
    with pytest.raises(UserError, match=problem):
        manifest_of(wheels)


def test_requirements_pin_every_wheel_by_version_and_hash() -> None:
    assert requirement_lines({NUMPY: "c" * 64, PURE: "b" * 64}).splitlines() == [
        f"numpy==2.4.6 --hash=sha256:{'c' * 64}", f"optuna==5.0.0 --hash=sha256:{'b' * 64}"]


def test_pip_is_asked_for_every_manylinux_the_hosts_glibc_installs() -> None:
    tags = platform_tags("aarch64", "2.36")
    assert tags[0] == "manylinux_2_36_aarch64" and "manylinux_2_17_aarch64" in tags
    assert tags[-1] == "manylinux2014_aarch64" and "manylinux_2_37_aarch64" not in tags
    with pytest.raises(UserError, match="older than manylinux2014"):
        platform_tags("x86_64", "2.12")


def test_the_hosts_get_the_versions_this_controller_runs_and_none_of_the_optional_extras() -> None:
    requirements = host_requirements(("fleet",))
    names = {req.split("[")[0].split("=")[0].split(">")[0].split("<")[0].lower() for req in requirements}
    assert {"optuna", "numpy", "psycopg2-binary"} <= names
    assert not names & {"llama-cpp-python", "pytest", "ansible", "pulumi"}
    pins = installed_constraints(requirements)
    assert f"optuna=={metadata.version('optuna')}" in pins
    assert f"numpy=={metadata.version('numpy')}" in pins
    assert any(pin.startswith("sqlalchemy==") for pin in pins), "the closure: optuna's own requirements are pinned"

"""The repository is the Ansible collection llamahost.host: it builds with exactly its parts, and the roles and
playbooks call every role, module and filter of it by its fully qualified name.

A bare name works only while ansible.cfg's roles_path or a role's own library/ happens to supply it; from an
installed collection it fails on the user's controller. The lab tests run the built collection (tests/lab/conftest.py),
so these checks are what catches a mistake in seconds instead of half an hour.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import gguf
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
GALAXY = yaml.safe_load((REPO / "galaxy.yml").read_text())
OWN = f"{GALAXY['namespace']}.{GALAXY['name']}"
ROLES = sorted(path.name for path in (REPO / "roles").iterdir() if (path / "tasks").is_dir())
MODULES = sorted(path.stem for path in (REPO / "plugins" / "modules").glob("*.py"))
FILTERS = sorted(set(re.findall(r'"(\w+)": \w+', "".join(
    path.read_text().split("def filters(self):")[1] for path in (REPO / "plugins" / "filter").glob("*.py")))))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    output = tmp_path_factory.mktemp("collection")
    subprocess.run([str(BIN / "ansible-galaxy"), "collection", "build", "--output-path", str(output), str(REPO)],
                   check=True, capture_output=True, text=True, timeout=120)
    (tarball,) = output.glob(f"{GALAXY['namespace']}-{GALAXY['name']}-{GALAXY['version']}.tar.gz")
    with tarfile.open(tarball) as archive:
        return set(archive.getnames())


def test_the_collection_holds_the_roles_plugins_and_playbooks_and_nothing_of_the_tuner(built: set[str]) -> None:
    wanted = {"meta/runtime.yml", "playbooks/site.yml", "playbooks/verify.yml", "requirements.yml", "LICENSE",
              "plugins/module_utils/cpu_lists.py", "plugins/module_utils/host_sysfs.py",
              "plugins/module_utils/gguf_reader.py",
              *(f"roles/{role}/meta/main.yml" for role in ROLES),
              *(f"plugins/modules/{module}.py" for module in MODULES)}
    assert wanted <= built, sorted(wanted - built)
    leaked = sorted(name for name in built if name.split("/")[0] in
                    {"tuner", "tests", "infra", "benchmarks", "build", ".collections", ".venv", ".ci"}
                    or name.endswith(".pyc"))
    assert not leaked, leaked


def test_the_collection_and_the_package_share_one_version() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert GALAXY["version"] == project["version"]


def test_the_scan_knows_the_collection() -> None:
    assert {"cpu", "numa", "hugepages", "llama_server", "llamahost_common"} <= set(ROLES)
    assert {"host_topology", "sysfs_settings", "model_fetch", "llama_server_health"} <= set(MODULES)
    assert {"cpu_list", "cpu_list_format", "cpu_mask", "systemd_exec_args", "model_shards"} <= set(FILTERS)


def bare_uses(text: str) -> list[str]:
    """The collection's roles, modules and filters that ``text`` names without ``llamahost.host.``."""
    roles, modules, filters = "|".join(ROLES), "|".join(MODULES), "|".join(FILTERS)
    patterns = (rf"^\s*(?:-\s+)?({modules}):",                       # a task's module
                rf"\|\s*({filters})\b",                              # a filter
                rf"^\s*(?:-\s+)?(?:role|name):\s*[\"']?({roles})[\"']?\s*$",  # a role, a dependency, include_role
                rf"loop:\s*\[\s*({roles})\s*,")                        # a loop over roles
    return [match.group(1) for pattern in patterns for match in re.finditer(pattern, text, re.MULTILINE)]


def test_every_role_module_and_filter_of_the_collection_is_called_by_its_full_name() -> None:
    files = [path for root in ("roles", "playbooks", "tests/lab/playbooks") for path in (REPO / root).rglob("*")
             if path.suffix in (".yml", ".yaml", ".j2")]
    bare = {str(path.relative_to(REPO)): uses for path in files if (uses := bare_uses(path.read_text()))}
    assert not bare, f"call these as {OWN}.NAME: {bare}"


@pytest.mark.parametrize(("text", "expected"), [
    ("- name: Read\n  host_topology:\n", ["host_topology"]),
    ("x: \"{{ cpus | cpu_list_format }}\"\n", ["cpu_list_format"]),
    ("dependencies:\n  - role: llamahost_common\n", ["llamahost_common"]),
    ("  include_role:\n    name: llama_server\n", ["llama_server"]),
    ("loop: [cpu, numa]\n", ["cpu"]),
    ("- llamahost.host.host_topology:\nx: \"{{ c | llamahost.host.cpu_list }}\"\n- role: llamahost.host.cpu\n", []),
])
def test_the_scan_finds_a_bare_name_wherever_one_is_used(text: str, expected: list[str]) -> None:
    assert bare_uses(text) == expected


@pytest.mark.parametrize(("link", "shared", "users"), [
    ("tuner/cpu_lists.py", "cpu_lists.py", {"cpu_lists.py"}),  # and host_sysfs.py, relatively
    ("tuner/host_sysfs.py", "host_sysfs.py", {"host_topology.py"}),
    ("tuner/model/gguf_reader.py", "gguf_reader.py", {"model_fetch.py"}),
])
def test_the_tuner_and_the_collection_share_one_module(link: str, shared: str, users: set[str]) -> None:
    """A tuner module that is a link to the collection's module_utils: one implementation, two import names."""
    assert (REPO / link).is_symlink()
    assert (REPO / link).resolve() == (REPO / "plugins" / "module_utils" / shared)
    importers = [path for path in (REPO / "plugins").rglob("*.py")
                 if f"ansible_collections.{OWN}.plugins.module_utils.{shared[:-3]}" in path.read_text()]
    assert {path.name for path in importers} == users


def test_the_shared_gguf_reader_knows_every_tensor_type_of_the_gguf_package() -> None:
    """The reader runs on hosts without the gguf package, so it carries the table; it must not drift from it."""
    from tuner.model.gguf_reader import TENSOR_TYPES

    package = {int(kind): (kind.name, *gguf.GGML_QUANT_SIZES[kind]) for kind in gguf.GGMLQuantizationType
               if kind in gguf.GGML_QUANT_SIZES}
    assert package == TENSOR_TYPES, sorted(package.items() ^ TENSOR_TYPES.items())

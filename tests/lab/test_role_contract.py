"""The contract between the tuner and the roles, and the roles' own Python, without the lab. Fast.

* The llama_server role accepts exactly the variables ``RunConfig.role_vars()`` writes, with the same
  choices, and renders them to exactly the flags ``RunConfig.server_args()`` gives (rendered by real
  Ansible, on localhost).
* Its source-build defaults are the tuner's own build flags and pinned sdist.
* Its python mode only uses options that llama-cpp-python's server (the pinned version) has.
* The CPU-list filters read CPU lists exactly like ``tuner.config``; the /sys module applies, persists,
  honours check mode; the topology module reads this machine consistently.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from ansible.errors import AnsibleFilterError  # type: ignore[import-untyped]
from role_support import PLUGINS, REPO, ROLE, load_plugin, run_playbook, run_plays
from role_support import run_module as run_role_module

from tuner.config import (
    CACHE_TYPES,
    FLASH_ATTN,
    LOAD_MODES,
    MEMORY_POLICIES,
    NUMA_MODES,
    OMP_WAIT_POLICIES,
    RunConfig,
    parse_cpu_list,
)
from tuner.cpu_lists import cpu_mask, format_cpu_list
from tuner.errors import UserError
from tuner.probe import read_host
from tuner.safe_change import TUNED_BINARY_VAR
from tuner.server.build import cmake_flags
from tuner.server.identity import identify, probe_commands
from tuner.server.source import SDIST_SHA256, download_sdist, pinned_version

BIN = Path(sys.executable).parent
BUILD_SHA = "5e" * 32  # the sha256 of the llama-server build the role installs (validate_binary.yml reads it)
DEFAULTS: dict[str, Any] = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
SPECS: dict[str, Any] = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())["argument_specs"]
OPTIONS: dict[str, Any] = SPECS["main"]["options"]

CONFIGS = [
    RunConfig(threads=8, threads_batch=16),
    RunConfig(threads=4, threads_batch=4, batch_size=512, ubatch_size=256, cpus=(0, 1, 2, 3), placement="compact",
              memory_policy="bind", load_mode="mlock", flash_attn="on", cache_type_k="q8_0", cache_type_v="q8_0",
              ctx_size=8192, cpu_strict=True),
    RunConfig(threads=30, threads_batch=60, numa="distribute", load_mode="mmap+mlock", flash_attn="off",
              parallel=-1, cont_batching=False, repack=False, omp_wait_policy="active"),
    RunConfig(threads=2, threads_batch=2, numa="numactl", memory_policy="interleave", memory_nodes=(0, 1),
              load_mode="none", parallel=4, ctx_size=2048, omp_wait_policy="passive"),
]


def render(config: RunConfig, expressions: list[str], **extra: Any) -> list[Any]:
    """Render the role's internal expressions for one configuration with real Ansible, on localhost."""
    play = {
        "name": "render", "hosts": "localhost", "gather_facts": False, "connection": "local",
        "vars_files": [str(ROLE / "vars" / "main.yml")],
        "vars": {**DEFAULTS, **config.role_vars(), "__llama_server_auto_threads": 1,
                 "__llama_server_binary_sha256": BUILD_SHA, "llama_server_model_src": "/models/m.gguf", **extra},
        "tasks": [{"ansible.builtin.debug": {"msg": "{{ " + expression + " }}"}} for expression in expressions],
    }
    return run_plays([play])[0]


def key_play(tmp_path: Path, role_vars: dict[str, Any], tasks: list[dict[str, Any]]) -> dict[str, Any]:
    """A play with the role's defaults and internal vars, its key files moved into ``tmp_path``."""
    paths = tmp_path / "key-paths.yml"
    paths.write_text(yaml.safe_dump({"__llama_server_api_key_file": str(tmp_path / "api-key"),
                                     "__llama_server_api_key_env_file": str(tmp_path / "api-key.env")}))
    return {"name": "key", "hosts": "localhost", "gather_facts": False, "connection": "local",
            "vars_files": [str(ROLE / "vars" / "main.yml"), str(paths)],
            "vars": {**DEFAULTS, "llama_server_model_src": "/models/m.gguf",
                     "ansible_python_interpreter": sys.executable, **role_vars},
            "tasks": tasks}


@pytest.mark.parametrize(
    ("role_vars", "kept", "expected", "generated"),
    [
        ({}, None, "", False),  # loopback, no key: none in use
        ({"llama_server_api_key": "chosen"}, "old", "chosen", False),  # a set key wins over a kept one
        ({"llama_server_host": "10.42.0.10"}, "kept-key\n", "kept-key", False),  # reused, not replaced
        ({"llama_server_host": "10.42.0.10", "llama_server_install_mode": "python"}, "API_KEY=env-key\n",
         "env-key", False),
        ({"llama_server_host": "0.0.0.0"}, None, None, True),  # open, no key anywhere: a new one
    ],
    ids=["loopback", "set", "kept", "kept-python", "generated"],
)
def test_an_open_bind_always_has_a_key_and_a_generated_key_is_kept(
        tmp_path: Path, role_vars: dict[str, Any], kept: str | None, expected: str | None, generated: bool) -> None:
    python = role_vars.get("llama_server_install_mode") == "python"
    if kept is not None:
        (tmp_path / ("api-key.env" if python else "api-key")).write_text(kept)
    tasks: list[dict[str, Any]] = [{"ansible.builtin.include_tasks": str(ROLE / "tasks" / "api_key.yml")},
             {"ansible.builtin.debug": {"msg": "{{ [__llama_server_key, __llama_server_key_generated | bool,"
                                               " __llama_server_uses_key | bool] }}"}}]
    key, was_generated, uses_key = run_plays([key_play(tmp_path, role_vars, tasks)])[0][-1]
    assert was_generated is generated and uses_key is (expected != "")
    if expected is None:
        assert re.fullmatch(r"[A-Za-z0-9]{48}", key), key
    else:
        assert key == expected


def test_an_open_bind_without_a_key_is_refused_when_generation_is_off(tmp_path: Path) -> None:
    """The validation task itself (read from validate.yml) refuses the bind, naming both variables."""
    validate = yaml.safe_load((ROLE / "tasks" / "validate.yml").read_text())
    (check,) = [task for task in validate if task["name"].startswith("Check that a server reachable")]
    plays = [key_play(tmp_path, {"llama_server_host": "0.0.0.0", "llama_server_api_key_generate": value},
                      [check]) for value in (True, False)]
    rc, report, _ = run_playbook(plays)
    allowed, refused = (play["tasks"][0]["hosts"]["localhost"] for play in report["plays"])
    assert rc != 0 and not allowed.get("failed") and refused.get("failed")
    assert "llama_server_host 0.0.0.0 is not loopback" in refused["msg"]
    assert "llama_server_api_key_generate is off" in refused["msg"]


@pytest.mark.parametrize(("role_vars", "refused"), [
    ({}, False),
    ({"llama_server_service_name": "llama-server-70b.node0", "llama_server_user": "llm_svc"}, False),
    ({"llama_server_user": "root"}, True),
    ({"llama_server_user": "Bad User"}, True),
    ({"llama_server_service_name": "llama server"}, True),
    ({"llama_server_service_name": "x\nExecStartPre=/bin/sh"}, True),
    ({"llama_server_service_name": "../etc/evil"}, True),
    ({"llama_server_service_name": "-dash"}, True),
], ids=["defaults", "custom", "root", "space-in-user", "space-in-unit", "newline-in-unit", "path-in-unit", "dash"])
def test_the_unit_name_and_user_are_checked_in_validation(
        tmp_path: Path, role_vars: dict[str, Any], refused: bool) -> None:
    """The validation task itself (read from validate.yml): a root server or a unit name systemd would not take
    (or that reaches outside /etc/systemd/system) fails before any change."""
    validate = yaml.safe_load((ROLE / "tasks" / "validate.yml").read_text())
    (check,) = [task for task in validate if task["name"].startswith("Check the unit's name and the unprivileged")]
    rc, report, _ = run_playbook([key_play(tmp_path, role_vars, [check])])
    result = report["plays"][0]["tasks"][0]["hosts"]["localhost"]
    assert bool(result.get("failed")) is refused and (rc != 0) is refused, result
    if refused:
        assert "must be a systemd unit name" in result["msg"] and "not root" in result["msg"]


# A stand-in for the pinned sdist: cmake runs the download's own code, which here records who ran it, at
# configure time and at build time, and makes a bin/llama-server. No compiler: the test takes seconds.
FAKE_SOURCE_CMAKE = """cmake_minimum_required(VERSION 3.14)
project(fake_llama_cpp LANGUAGES NONE)
execute_process(COMMAND id -un OUTPUT_FILE ${CMAKE_BINARY_DIR}/configured-by)
add_custom_target(llama-server ALL
  COMMAND sh -c "id -un > built-by"
  COMMAND ${CMAKE_COMMAND} -E make_directory bin
  COMMAND ${CMAKE_COMMAND} -E touch bin/llama-server
  WORKING_DIRECTORY ${CMAKE_BINARY_DIR} VERBATIM)
"""
BUILD_USER = "llamahost-test-build"


@pytest.mark.skipif(os.geteuid() != 0, reason="the role creates a system user and hands the tree to it")
def test_source_mode_unpacks_and_builds_the_download_as_an_unprivileged_user() -> None:
    """The tasks themselves (build_source.yml), with a stand-in sdist: cmake's configure and build steps run
    as llama_server_build_user, never root; the tree belongs to it; a second run changes nothing."""
    import tarfile
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="llamahost-source-", dir="/var/tmp"))
    work.chmod(0o755)  # the build user must reach <prefix>/src
    try:
        top = work / "sdist" / "llama_cpp_python-0.0.1" / "vendor" / "llama.cpp"
        top.mkdir(parents=True)
        (top / "CMakeLists.txt").write_text(FAKE_SOURCE_CMAKE)
        sdist = work / "llama_cpp_python-0.0.1.tar.gz"
        with tarfile.open(sdist, "w:gz") as archive:
            archive.add(work / "sdist" / "llama_cpp_python-0.0.1", arcname="llama_cpp_python-0.0.1")
        prefix = work / "prefix"
        role_vars = {"llama_server_install_mode": "source", "llama_server_prefix": str(prefix),
                     "llama_server_build_user": BUILD_USER, "llama_server_source_version": "0.0.1",
                     "llama_server_source_url": sdist.as_uri(),
                     "llama_server_source_sha256": hashlib.sha256(sdist.read_bytes()).hexdigest()}
        tasks = [{"ansible.builtin.import_tasks": str(ROLE / "tasks" / "build_source.yml")}]
        first = run_plays([key_play(work, role_vars, tasks)])
        again_rc, again, output = run_playbook([key_play(work, role_vars, tasks)])
        build = next((prefix / "src" / "llama_cpp_python-0.0.1" / "vendor" / "llama.cpp").glob("build-*"))
        assert (build / "configured-by").read_text().strip() == BUILD_USER, first
        assert (build / "built-by").read_text().strip() == BUILD_USER
        assert (build / "bin" / "llama-server").is_file()
        owners = {path.owner() for path in (prefix / "src").rglob("*")}
        assert owners == {BUILD_USER}, owners
        changed = [task["task"]["name"] for task in again["plays"][0]["tasks"]
                   if task["hosts"]["localhost"].get("changed")]
        assert again_rc == 0 and changed == [], (changed, output)
    finally:
        subprocess.run(["userdel", BUILD_USER], capture_output=True, check=False)
        subprocess.run(["rm", "-rf", str(work)], check=False)


PYTHON_LOCKS = ROLE / "files"


def lock_lines(name: str) -> list[str]:
    return [line for line in (PYTHON_LOCKS / name).read_text().splitlines() if line and not line.startswith("#")]


def test_python_mode_pins_the_tuners_release_and_every_package_by_version_and_hash() -> None:
    """The role's python mode installs the llama.cpp the tuner measures, from the sdist whose sha256 the tuner
    checks, and nothing that is not pinned (`make python-server-lock` writes the files)."""
    for name in ("python-server-build.txt", "python-server.txt"):
        for line in lock_lines(name):
            assert re.fullmatch(r"[A-Za-z0-9_.-]+(\[server\])?==\S+( --hash=sha256:[0-9a-f]{64})+", line), line
    (server,) = [line for line in lock_lines("python-server.txt") if line.startswith("llama_cpp_python[server]==")]
    version = pinned_version()
    assert server.startswith(f"llama_cpp_python[server]=={version} ")
    assert f"--hash=sha256:{SDIST_SHA256[version]}" in server
    assert any(line.startswith("scikit_build_core==") for line in lock_lines("python-server-build.txt"))


@pytest.mark.fetches
def test_python_modes_requirements_are_complete_for_pips_hash_checking(tmp_path: Path) -> None:
    """pip in hash-checking mode accepts the role's files as they are: the build backend installs, and with it
    the server's resolution needs no package the file leaves out (a missing one is refused by pip)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "pip"), "install", "--require-hashes", "--no-build-isolation", "--no-input"]
    backend = subprocess.run([*pip, "-r", str(PYTHON_LOCKS / "python-server-build.txt")], capture_output=True,
                             text=True, timeout=600, check=False)
    assert backend.returncode == 0, backend.stderr[-2000:]
    server = subprocess.run([*pip, "--dry-run", "-r", str(PYTHON_LOCKS / "python-server.txt")], capture_output=True,
                            text=True, timeout=600, check=False)
    assert server.returncode == 0, server.stderr[-2000:]
    assert f"llama_cpp_python-{pinned_version()}" in server.stdout
    missing = tmp_path / "missing.txt"  # the check can fail: without h11, pip refuses
    missing.write_text("\n".join(line for line in lock_lines("python-server.txt") if not line.startswith("h11==")))
    refused = subprocess.run([*pip, "--dry-run", "-r", str(missing)], capture_output=True, text=True, timeout=600,
                             check=False)
    assert refused.returncode != 0 and "h11" in refused.stderr


@pytest.mark.fetches
@pytest.mark.skipif(os.geteuid() != 0, reason="the role creates a system user and hands the venv to it")
def test_python_mode_installs_as_the_build_user_and_refuses_a_file_whose_hash_differs() -> None:
    """The role's python-mode tasks (after the apt step) with a stand-in requirements file, a tiny wheel: pip
    runs as llama_server_build_user, who owns the venv, and a file whose sha256 is not the pinned one is
    refused before anything of it is installed."""
    import tempfile
    import zipfile

    work = Path(tempfile.mkdtemp(prefix="llamahost-python-", dir="/var/tmp"))
    work.chmod(0o755)
    try:
        wheel = work / "llamahost_standin-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr("llamahost_standin.py", "WHO = 'stand-in'\n")
            info = "llamahost_standin-1.0.dist-info"
            archive.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: llamahost-standin\nVersion: 1.0\n")
            archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                              "Tag: py3-none-any\n")
            archive.writestr(f"{info}/RECORD", "")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        wheel.chmod(0o644)
        prefix = work / "prefix"
        prefix.mkdir()
        tasks = [task for task in yaml.safe_load((ROLE / "tasks" / "install_python.yml").read_text())
                 if "ansible.builtin.apt" not in task]
        for task in tasks:  # the role's own paths, as Ansible resolves them inside the role
            if "ansible.builtin.import_tasks" in task:
                task["ansible.builtin.import_tasks"] = str(ROLE / "tasks" / task["ansible.builtin.import_tasks"])
            if task.get("loop") and isinstance(task["loop"][0], dict):
                task["loop"][0]["src"] = str(PYTHON_LOCKS / task["loop"][0]["src"])
        venv = prefix / "venv"
        results = {}
        for pinned in (digest, digest[::-1]):
            lock = work / "standin.txt"
            lock.write_text(f"{wheel} --hash=sha256:{pinned}\n")
            role_vars = {"llama_server_install_mode": "python", "llama_server_prefix": str(prefix),
                         "llama_server_build_user": BUILD_USER, "llama_server_python_requirements": str(lock)}
            rc, _, output = run_playbook([key_play(work, role_vars, tasks)])
            owners = {pwd.getpwuid(path.lstat().st_uid).pw_name for path in venv.rglob("*")}  # links: their own
            installed = subprocess.run([str(venv / "bin" / "python"), "-B", "-c", "import llamahost_standin"],
                                       capture_output=True, check=False).returncode == 0
            results[pinned == digest] = (rc, installed, output)
            if pinned == digest:
                assert rc == 0 and installed, output
                assert owners == {BUILD_USER}, owners
                subprocess.run([str(venv / "bin" / "pip"), "uninstall", "-y", "-q", "llamahost-standin"], check=True)
        rc, installed, output = results[False]
        assert rc != 0 and not installed and "DO NOT MATCH THE HASHES" in output, output[-3000:]
    finally:
        subprocess.run(["userdel", BUILD_USER], capture_output=True, check=False)
        subprocess.run(["rm", "-rf", str(work)], check=False)


@pytest.mark.parametrize(("build_user", "refused"), [("llama-build", False), ("root", True),
                                                      ("llama-server", True), ("Bad User", True)])
def test_the_build_user_is_checked_in_validation(tmp_path: Path, build_user: str, refused: bool) -> None:
    validate = yaml.safe_load((ROLE / "tasks" / "validate.yml").read_text())
    (check,) = [task for task in validate if task["name"].startswith("Check the unprivileged user that builds")]
    rc, report, _ = run_playbook([key_play(tmp_path, {"llama_server_install_mode": "source",
                                                      "llama_server_build_user": build_user}, [check])])
    result = report["plays"][0]["tasks"][0]["hosts"]["localhost"]
    assert bool(result.get("failed")) is refused and (rc != 0) is refused, result
    if refused:
        assert "the build runs code from the download" in result["msg"]


@pytest.mark.parametrize("tuned_on", ["unset", "the copied build", "another build"])
def test_binary_mode_refuses_to_copy_another_build_than_the_tuned_settings_were_measured_on(
        tmp_path: Path, tuned_on: str) -> None:
    """The validation tasks themselves (read from validate_binary.yml), on a real binary: the sha256 that
    write-back writes next to the tuned settings must be the build the role is about to copy."""
    binary = tmp_path / "llama-server"
    binary.write_bytes(b"#!/bin/sh\n# a llama-server build\n")
    binary.chmod(0o755)
    copied = hashlib.sha256(binary.read_bytes()).hexdigest()
    tuned = {"unset": "", "the copied build": copied.upper(), "another build": "cd" * 32}[tuned_on]
    validate = yaml.safe_load((ROLE / "tasks" / "validate_binary.yml").read_text())
    tasks = [task for task in validate if task["name"].startswith(("Check the binary on the controller",
                                                                     "Refuse to serve the tuned settings"))]
    assert len(tasks) == 2
    play = key_play(tmp_path, {TUNED_BINARY_VAR: tuned, "__llama_server_binary_src": str(binary)}, tasks)
    rc, report, _ = run_playbook([play])
    result = report["plays"][0]["tasks"][-1]["hosts"]["localhost"]
    refused = tuned_on == "another build"
    assert bool(result.get("failed")) is refused and (rc != 0) is refused, result
    if refused:
        assert "cd" * 32 in result["msg"] and copied in result["msg"] and str(binary) in result["msg"], result["msg"]
        assert "tune again" in result["msg"] and f'{TUNED_BINARY_VAR} to ""' in result["msg"]


def test_a_build_that_serves_becomes_current_and_only_the_newest_earlier_builds_are_kept(tmp_path: Path) -> None:
    """The tasks that run once a new build is healthy (read from service.yml): bin/llama-server points at it,
    and of the earlier builds the llama_server_keep_builds newest stay, for a rollback; a plain
    bin/llama-server from an install before builds were kept becomes the link."""
    builds = tmp_path / "builds"
    builds.mkdir()
    earlier = [builds / f"llama-server-{n:064x}" for n in range(4)]  # oldest first
    for age, path in enumerate(reversed(earlier), start=1):
        path.write_bytes(b"an earlier build")
        os.utime(path, (time.time() - 3600 * age, time.time() - 3600 * age))
    serving = builds / f"llama-server-{BUILD_SHA}"
    serving.write_bytes(b"the build that now serves")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "llama-server").write_bytes(b"a plain file from an older install")
    block = next(task for task in yaml.safe_load((ROLE / "tasks" / "service.yml").read_text()) if "block" in task)
    wanted = ("Point bin/llama-server", "Find the builds that no longer serve", "Remove the builds beyond")
    tasks = [task for task in block["block"] if task["name"].startswith(wanted)]
    assert len(tasks) == 3
    play = key_play(tmp_path, {"llama_server_prefix": str(tmp_path), "llama_server_keep_builds": 2,
                               "__llama_server_binary_sha256": BUILD_SHA}, tasks)
    run_plays([play])
    assert (tmp_path / "bin" / "llama-server").readlink() == serving
    assert sorted(builds.iterdir()) == sorted([serving, *earlier[-2:]])


def test_role_accepts_exactly_the_variables_the_tuner_writes_with_the_same_choices() -> None:
    written = set(RunConfig(threads=1, threads_batch=1, ctx_size=1).role_vars()) | {TUNED_BINARY_VAR}
    assert written <= set(DEFAULTS) and written <= set(OPTIONS)
    choices = {"llama_server_numa": NUMA_MODES, "llama_server_numa_policy": MEMORY_POLICIES,
               "llama_server_load_mode": LOAD_MODES, "llama_server_flash_attn": FLASH_ATTN,
               "llama_server_cache_type_k": CACHE_TYPES, "llama_server_cache_type_v": CACHE_TYPES,
               "llama_server_omp_wait_policy": OMP_WAIT_POLICIES}
    for name, allowed in choices.items():
        assert set(OPTIONS[name]["choices"]) == set(allowed), name
    for entry_point in ("validate", "verify"):
        assert SPECS[entry_point]["options"] == OPTIONS


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"t{c.threads}-{c.numa}-{c.load_mode}-p{c.parallel}")
def test_role_renders_the_tuned_settings_to_the_tuners_own_flags(config: RunConfig) -> None:
    tuned_args, command, environment = render(config, ["__llama_server_tuned_args", "__llama_server_command",
                                                       "__llama_server_tuned_environment"])
    # ctx_size 0 leaves the context to the role's own default (RunConfig's documented contract).
    expected = config if config.ctx_size else config.with_changes(ctx_size=DEFAULTS["llama_server_ctx_size"])
    assert tuned_args == expected.server_args()
    # the unit runs the build by its sha256, so a rollback to the previous unit runs the previous build
    assert command[:2] == [f"/opt/llama-server/builds/llama-server-{BUILD_SHA}", "--model"]
    assert command[-len(tuned_args):] == tuned_args
    assert environment == config.server_environment()
    assert RunConfig.from_role_vars(config.role_vars()) == config.with_changes(
        placement="compact" if config.cpus else "os")


def pinned_server_settings(into: Path) -> str:
    """llama_cpp/server/settings.py of the pinned release, read from its sdist (checked against the recorded
    sha256): the options the host's ``python -m llama_cpp.server`` accepts, without compiling the binding here."""
    version = pinned_version()
    with tarfile.open(download_sdist(version, into), "r:gz") as archive:
        member = archive.extractfile(f"llama_cpp_python-{version}/llama_cpp/server/settings.py")
        assert member is not None
        return member.read().decode()


def test_python_mode_uses_only_options_llama_cpp_python_server_has(tmp_path: Path) -> None:
    fields = set(re.findall(r"^    (\w+):", pinned_server_settings(tmp_path), re.M))
    config = RunConfig(threads=4, threads_batch=8, numa="distribute", load_mode="mmap+mlock", flash_attn="on",
                       cache_type_k="q8_0", cache_type_v="q4_0", ctx_size=1024)
    (command,) = render(config, ["__llama_server_python_command"], llama_server_install_mode="python")
    flags = [arg[2:] for arg in command if arg.startswith("--")]
    assert command[1:3] == ["-m", "llama_cpp.server"]
    assert set(flags) <= fields, set(flags) - fields
    assert {"n_threads", "n_threads_batch", "numa", "use_mlock", "flash_attn", "type_k", "n_ctx"} <= set(flags)


def test_source_mode_builds_from_the_tuners_pinned_source_with_its_native_flags(llama_server_build: Any) -> None:
    commit = llama_server_build.manifest["llama_cpp_commit"]
    assert DEFAULTS["llama_server_cmake_flags"] == cmake_flags("native", commit)
    assert DEFAULTS["llama_server_source_version"] == pinned_version()
    assert DEFAULTS["llama_server_source_sha256"] == SDIST_SHA256[pinned_version()]
    assert DEFAULTS["llama_server_source_url"].endswith(f"llama_cpp_python-{pinned_version()}.tar.gz")


CPU_LIST_FILTERS = load_plugin(PLUGINS / "filter" / "cpu_lists.py").FilterModule().filters()


@pytest.mark.parametrize("text", ["", "0", "0-3", "0-3,8,10-11", "7,1,3-4", "0-3,x", "4-2", "1,,2", "-1", "a", "9000"])
def test_cpu_list_filters_read_cpu_lists_exactly_like_the_tuner(text: str) -> None:
    try:
        expected: tuple[int, ...] | None = parse_cpu_list(text)
    except UserError:
        expected = None
    assert CPU_LIST_FILTERS["cpu_list_ok"](text) == (expected is not None)
    if expected is not None:
        assert tuple(CPU_LIST_FILTERS["cpu_list"](text)) == expected
        assert CPU_LIST_FILTERS["cpu_list_format"](expected) == format_cpu_list(expected)
        assert CPU_LIST_FILTERS["cpu_mask"](expected) == cpu_mask(expected)
    else:
        with pytest.raises(AnsibleFilterError, match="malformed CPU list"):
            CPU_LIST_FILTERS["cpu_list"](text)
    assert CPU_LIST_FILTERS["cpu_list"]("4 6") == [4, 6]  # systemctl show's spelling


def test_exec_start_quoting_survives_spaces_percent_and_dollar() -> None:
    exec_args = load_plugin(PLUGINS / "filter" / "systemd_exec.py").systemd_exec_args
    assert exec_args(["/bin/x", "--model", "/m/a b%.gguf", "$HOME", 'q"'] ) == \
        '/bin/x --model "/m/a b%%.gguf" "$$HOME" "q\\""'


def run_module(name: str, args: dict[str, Any], tmp_path: Path, *, check_mode: bool = False) -> dict[str, Any]:
    return run_role_module(PLUGINS / "modules" / f"{name}.py", args, tmp_path, check_mode=check_mode)


def test_sysfs_settings_applies_persists_and_honours_check_mode(tmp_path: Path) -> None:
    thp, pages, persist = tmp_path / "enabled", tmp_path / "nr_hugepages", tmp_path / "tmpfiles.d" / "x.conf"
    thp.write_text("always [madvise] never\n")
    pages.write_text("0\n")
    args = {"settings": [{"path": str(thp), "value": "madvise"}, {"path": str(pages), "value": "16"},
                         {"path": str(tmp_path / "absent"), "value": "1", "optional": True}],
            "persist_file": str(persist)}
    dry = run_module("sysfs_settings", args, tmp_path, check_mode=True)
    assert dry["changed"] and pages.read_text() == "0\n" and not persist.exists()
    assert any("nr_hugepages = 16" in diff["after"] for diff in dry["diff"])
    applied = run_module("sysfs_settings", args, tmp_path)
    assert applied["changed"] and pages.read_text() == "16" and applied["missing"] == [str(tmp_path / "absent")]
    assert [e["changed"] for e in applied["settings"]] == [False, True, False]  # [madvise] already selected
    assert persist.read_text().splitlines()[1:] == [f"w {thp} - - - - madvise", f"w {pages} - - - - 16"]
    assert run_module("sysfs_settings", args, tmp_path)["changed"] is False
    required = run_module("sysfs_settings", {"settings": [{"path": str(tmp_path / "absent"), "value": "1"}]}, tmp_path)
    assert required.get("failed") and "does not exist" in required["msg"]


def test_host_topology_reads_this_machine_consistently(tmp_path: Path) -> None:
    topology = run_module("host_topology", {}, tmp_path)["topology"]
    online = topology["online_cpus"]
    assert online and sorted(cpu for node in topology["nodes"] for cpu in node["cpus"]) == online
    assert sorted(cpu for core in topology["cores"] for cpu in core) == online
    assert topology["physical_cores"] * topology["threads_per_core"] >= len(online)
    assert topology["thp"]["enabled"] in ("always", "madvise", "never")


FIXTURE_HOSTS = REPO / "tests" / "fixtures" / "hosts"


def hide_core_lists(source: Path, target: Path) -> Path:
    """A copy of a fixture host whose kernel hides the SMT sibling lists (as some VMs and containers do)."""
    shutil.copytree(source, target, symlinks=True)
    for name in ("core_cpus_list", "thread_siblings_list"):
        for hidden in target.glob(f"sys/devices/system/cpu/cpu*/topology/{name}"):
            hidden.unlink()
    return target


@pytest.mark.parametrize("host", sorted(p.name for p in FIXTURE_HOSTS.iterdir() if (p / "FIXTURE.json").exists()))
@pytest.mark.parametrize("hidden", [False, True], ids=["sysfs", "sibling-lists-hidden"])
def test_host_topology_and_the_tuner_see_the_same_cpus_cores_and_nodes(host: str, hidden: bool,
                                                                       tmp_path: Path) -> None:
    """The role validates and pins with host_topology, the tuner measures with its probe: one reader
    (module_utils/host_sysfs), so on every fixture host, and on one that hides the sibling lists, they agree."""
    root = hide_core_lists(FIXTURE_HOSTS / host, tmp_path / host) if hidden else FIXTURE_HOSTS / host
    module = load_plugin(PLUGINS / "modules" / "host_topology.py")
    setattr(module, "FILES", module.HostFiles(root))  # noqa: B010 - a module attribute mypy cannot see
    seen = module.topology()
    tuner = read_host(root).topology
    cores = tuner.cores()
    assert seen["cpus"] == [{"id": cpu.id, "node": cpu.node, "socket": cpu.socket, "siblings": list(cores[cpu.core])}
                            for cpu in tuner.cpus]
    assert seen["cores"] == [list(ids) for ids in cores.values()]
    assert (seen["physical_cores"], seen["threads_per_core"], seen["sockets"]) == (
        tuner.physical_core_count, tuner.threads_per_core, len(tuner.sockets))
    assert [(n["id"], n["cpus"], n["memory_total_kib"], n["distances"]) for n in seen["nodes"]] == [
        (n.id, list(n.cpus), n.memory_total_bytes // 1024, list(n.distances)) for n in tuner.nodes]
    if hidden and tuner.threads_per_core > 1:  # core ids or /proc/cpuinfo still pair the siblings
        assert seen["threads_per_core"] == tuner.threads_per_core > 1


def test_host_topology_names_this_machines_distribution_and_accepts_it(tmp_path: Path) -> None:
    """This machine is Debian (README's prerequisite): the roles' validation lets it through."""
    checked = run_module("host_topology", {"require_supported_os": True}, tmp_path)
    assert not checked.get("failed"), checked
    assert checked["topology"]["os"]["family"] == "debian" and checked["topology"]["os"]["id"], checked["topology"]


ROCKY = ('NAME="Rocky Linux"\nVERSION_ID="9.4"\nID="rocky"\nID_LIKE="rhel centos fedora"\n'
         'PRETTY_NAME="Rocky Linux 9.4"\n')


@pytest.mark.parametrize(("text", "family", "refused"), [
    ('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n', "debian", None),
    ('ID=ubuntu\nID_LIKE=debian\nVERSION_ID="24.04"\nPRETTY_NAME="Ubuntu 24.04.1 LTS"\n', "debian", None),
    ('ID=linuxmint\nID_LIKE="ubuntu debian"\n', "debian", None),
    (ROCKY, "redhat", "this host runs Rocky Linux 9.4 (ID rocky, family redhat)"),
    ("ID='almalinux'\nID_LIKE='rhel centos fedora'\n", "redhat", "(ID almalinux, family redhat)"),
    ("ID=alpine\n", "alpine", "family alpine"),
    ("", "unknown", "an unnamed distribution (ID missing, family unknown)"),
])
def test_an_unsupported_distribution_is_refused_by_name(text: str, family: str, refused: str | None) -> None:
    topology_module = load_plugin(PLUGINS / "modules" / "host_topology.py")
    found = topology_module.parse_os_release(text)
    assert found["family"] == family
    problem = topology_module.os_problem(found)
    if refused is None:
        assert problem is None
    else:
        assert refused in problem and "Nothing was changed" in problem and "Debian 12" in problem, problem


def test_every_roles_validation_refuses_an_unsupported_distribution_first() -> None:
    """The first module call of each role's validation asks for the check, so site.yml stops before any change."""
    for role in ("cpu", "numa", "hugepages", "llama_server"):
        tasks = yaml.safe_load((REPO / "roles" / role / "tasks" / "validate.yml").read_text())
        first_read = next(task for task in tasks if "llamahost.host.host_topology" in task)
        assert first_read["llamahost.host.host_topology"] == {"require_supported_os": True}, role
        assert tasks.index(first_read) == next(i for i, task in enumerate(tasks)
                                               if any(key.startswith("llamahost.host.") for key in task)), role


@pytest.mark.parametrize("role", ["cpu", "numa", "hugepages", "llama_server", "llamahost_tuner"])
def test_every_role_variable_is_documented_and_has_a_default(role: str) -> None:
    specs = yaml.safe_load((REPO / "roles" / role / "meta" / "argument_specs.yml").read_text())["argument_specs"]
    defaults = yaml.safe_load((REPO / "roles" / role / "defaults" / "main.yml").read_text())
    documented = (REPO / "docs" / "roles.md").read_text()
    assert set(specs["main"]["options"]) == set(defaults)
    assert all(name.startswith(f"{role}_") for name in defaults)
    missing = [name for name in defaults if f"`{name}`" not in documented]
    assert not missing, f"docs/roles.md does not describe {missing}"


def test_example_inventory_targets_llama_hosts_with_a_valid_tuned_configuration() -> None:
    example = REPO / "playbooks" / "inventory" / "example"
    done = subprocess.run([str(BIN / "ansible-inventory"), "-i", str(example), "--list"], capture_output=True,
                          text=True, timeout=120, check=False, cwd=REPO)
    assert done.returncode == 0, done.stderr
    inventory = json.loads(done.stdout)
    assert set(inventory["llama_hosts"]["hosts"]) == {"epyc-01", "epyc-02"}
    host_vars = inventory["_meta"]["hostvars"]["epyc-01"]
    tuned = RunConfig.from_role_vars(host_vars)  # what the tuner would read back as this host's baseline
    assert tuned.role_vars().items() <= host_vars.items()


CPU_FEATURES = load_plugin(PLUGINS / "filter" / "cpu_features.py").FilterModule().filters()["llama_cpu_features"]


def test_verify_names_the_fast_cpu_features_the_served_build_leaves_unused(llama_server_binary: Path) -> None:
    """verify.yml reads what the serving build prints at debug verbosity (the tuner's identity probe) and the
    host's CPU flags as host_topology reads them from /proc/cpuinfo (x86 flags, arm64 Features). The portable
    x86-64-v3 build leaves a Sapphire Rapids host's AVX-512, VNNI and AMX kernels unused, and a Genoa host's
    AVX-512 ones; a build that runs them leaves nothing unused."""
    debug = subprocess.run(probe_commands(str(llama_server_binary), "/nonexistent/model.gguf")[1],
                           capture_output=True, text=True, check=False, timeout=60)
    portable = CPU_FEATURES(debug.stdout + debug.stderr, [])
    assert portable["system_info"] == identify(llama_server_binary).system_info
    assert {"AVX2", "FMA", "F16C"} <= set(portable["features"]) and "AVX512" not in portable["features"]

    topology_module = load_plugin(PLUGINS / "modules" / "host_topology.py")

    def unused(host: str, output: str) -> list[str]:
        """The host's flags as host_topology reads them (verify passes its cpu_flags on)."""
        cpuinfo = (FIXTURE_HOSTS / host / "proc" / "cpuinfo").read_text()
        flags = topology_module.cpu_flags(topology_module.parse_cpuinfo_blocks(cpuinfo))
        return list(CPU_FEATURES(output, flags)["unused_host_features"])

    assert unused("xeon-8480-1s", debug.stderr) == ["AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16",
                                                    "AMX_INT8", "AVX_VNNI"]
    assert unused("epyc-9654-2s-nps4", debug.stderr) == ["AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16"]
    native = ("system_info: n_threads = 8 | CPU : SSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | AVX512 = 1 | "
              "AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | OPENMP = 1 |")
    assert unused("xeon-8480-1s", native) == []
    graviton = "system_info: n_threads = 64 | CPU : NEON = 1 | ARM_FMA = 1 | DOTPROD = 1 | OPENMP = 1 |"
    assert unused("graviton3-64c", graviton) == ["MATMUL_INT8", "SVE"]

"""Run the roles' own Python (filter plugins, modules) on this machine, without Ansible's executor."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
ROLE = REPO / "roles" / "llama_server"
# The collection's plugins, and the directory that makes the repository the llamahost.host collection (a link to
# its root): modules and filters import the shared module_utils as ansible_collections.llamahost.host.
PLUGINS = REPO / "plugins"
COLLECTIONS = REPO / ".collections"
BIN = Path(sys.executable).parent


def load_plugin(path: Path) -> ModuleType:
    """A filter plugin's module, its ``ansible_collections.llamahost.host`` imports resolved from this checkout."""
    if str(COLLECTIONS) not in sys.path:
        sys.path.insert(0, str(COLLECTIONS))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_module(path: Path, args: dict[str, Any], tmp_path: Path, *, check_mode: bool = False,
               timeout: float = 60, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run an Ansible module file as Ansible would (arguments in a JSON file); its JSON result. ``env`` replaces
    the environment the module runs in."""
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": {**args, "_ansible_check_mode": check_mode}}))
    # The module's module_utils imports resolve as on a host, where Ansible ships them with the module.
    env = {**(os.environ if env is None else env), "PYTHONPATH": str(COLLECTIONS)}
    done = subprocess.run([sys.executable, str(path), str(args_file)], capture_output=True, text=True,
                          timeout=timeout, check=False, env=env)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def run_plays(plays: list[dict[str, Any]]) -> list[list[Any]]:
    """Every task's ``msg`` per play (None for a task without one); the run must succeed."""
    rc, report, output = run_playbook(plays)
    assert rc == 0, output
    return [[task["hosts"]["localhost"].get("msg") for task in play["tasks"]] for play in report["plays"]]


def run_playbook(plays: list[dict[str, Any]]) -> tuple[int, dict[str, Any], str]:
    """Run ``plays`` on localhost with real Ansible: exit status, the JSON report, the output's tail."""
    with tempfile.TemporaryDirectory(prefix="llamahost-render-") as tmp:
        # Not the repository's ansible.cfg: its timing callback would print into the JSON report.
        config = Path(tmp) / "ansible.cfg"
        # The collection's filters and modules by their full names, as the roles call them.
        config.write_text("[defaults]\nstdout_callback = ansible.builtin.json\nlocalhost_warning = false\n"
                          f"collections_path = {COLLECTIONS}\n")
        playbook = Path(tmp) / "render.yml"
        playbook.write_text(yaml.safe_dump(plays))
        env = {**os.environ, "ANSIBLE_CONFIG": str(config)}
        done = subprocess.run([str(BIN / "ansible-playbook"), "-i", "localhost,", str(playbook)], env=env,
                              capture_output=True, text=True, timeout=300, check=False, cwd=tmp)
    return done.returncode, json.loads(done.stdout), done.stdout[-3000:] + done.stderr[-3000:]


def build_collection(output: Path) -> Path:
    """``ansible-galaxy collection build`` of this checkout into ``output``: the collection's tarball."""
    output.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(BIN / "ansible-galaxy"), "collection", "build", "--force", "--output-path", str(output),
                    str(REPO)], check=True, capture_output=True, text=True, timeout=300)
    (tarball,) = output.glob("llamahost-host-*.tar.gz")
    return tarball

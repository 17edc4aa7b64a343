"""Measure a host for the canary over Ansible's own connection: pack the workload, run it there, read JSON.

The measurement runs on the host (:mod:`tuner.rollout.on_host`) so it reaches a server bound to loopback
without a port forward, through whatever connection the inventory uses (SSH, ``amazon.aws.aws_ssm``,
local). It is one ``ansible HOST -m ansible.builtin.script`` with the host's own python3 and ``become``,
which also reads the server's API key file where it lies.
"""

from __future__ import annotations

import io
import json
import subprocess
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.errors import UserError
from tuner.inventory import ansible_tool
from tuner.live.workload import RequestMix
from tuner.rollout.converge import REPO, ansible_env
from tuner.rollout.judge import Windows
from tuner.rollout.on_host import SPEC_NAME

# What the on-host measurement imports, and nothing else: all standard library beneath.
BUNDLED_MODULES = ("tuner/__init__.py", "tuner/errors.py", "tuner/server/__init__.py", "tuner/server/client.py",
                   "tuner/live/__init__.py", "tuner/live/workload.py", "tuner/rollout/__init__.py",
                   "tuner/rollout/on_host.py")
MAIN = "from tuner.rollout.on_host import main\nraise SystemExit(main())\n"
DEFAULT_PORT = 8080
ANY_ADDRESS = ("", "0.0.0.0", "::")


@dataclass(frozen=True)
class CanaryWorkload:
    """What the canary sends: the live tuner's request mix, ``windows`` measured after ``warmup`` discarded."""

    mix: RequestMix
    windows: int = 3
    warmup: int = 1

    def __post_init__(self) -> None:
        if self.windows < 2 or self.warmup < 0:
            raise UserError("a canary needs 2 or more measured windows and no negative warm-up",
                            "set tune_canary_windows to 3 or more")

    def spec(self) -> dict[str, Any]:
        return {"name": self.mix.name, "concurrency": self.mix.concurrency, "windows": self.windows,
                "warmup": self.warmup,
                "requests": [{"prompt": r.prompt, "max_tokens": r.max_tokens} for r in self.mix.requests]}


def pack(workload: CanaryWorkload, path: Path) -> Path:
    """The measurement as one zip file python3 runs (``python3 canary.pyz --url ...``); same bytes for the
    same workload (fixed timestamps), so nothing about it changes between hosts."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        def add(name: str, data: str) -> None:
            bundle.writestr(zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0)), data)

        add("__main__.py", MAIN)
        for module in BUNDLED_MODULES:
            add(module, (REPO / module).read_text())
        add(f"tuner/rollout/{SPEC_NAME}", json.dumps(workload.spec()))
    path.write_bytes(buffer.getvalue())
    return path


def endpoint(hostvars: dict[str, Any]) -> tuple[str, str]:
    """The server's URL as seen on the host itself, and its API key file (the role's layout)."""
    bind = str(hostvars.get("llama_server_host", "127.0.0.1") or "")
    address = "127.0.0.1" if bind in ANY_ADDRESS else bind
    if ":" in address:
        address = f"[{address}]"
    port = int(hostvars.get("llama_server_port", DEFAULT_PORT))
    service = str(hostvars.get("llama_server_service_name", "llama-server"))
    return f"http://{address}:{port}", f"/etc/{service}/api-key"


def script_output(stdout: str, host: str) -> dict[str, Any]:
    """The script's JSON from the ansible.posix.json callback's report (pure). Other callbacks (the repository's
    ansible.cfg enables a task timer) may print lines before and after it."""
    try:
        start = 0 if stdout.startswith("{") else stdout.index("\n{") + 1
        report, _ = json.JSONDecoder().raw_decode(stdout, start)
        outcome = report["plays"][0]["tasks"][0]["hosts"][host]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError):
        raise UserError(f"no measurement came back from {host}", "run the canary again with the output shown") from None
    if outcome.get("unreachable"):
        raise UserError(f"{host} did not answer while being measured ({outcome.get('msg', '')})",
                        "check the connection to the host")
    try:
        data = json.loads(str(outcome.get("stdout", "")).strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        data = None
    if not isinstance(data, dict):
        detail = (outcome.get("stderr") or outcome.get("msg") or "").strip().splitlines()[-3:]
        raise UserError(f"the measurement on {host} failed: {' / '.join(detail)}",
                        "the host needs python3 (3.9 or newer)")
    if "error" in data:
        raise UserError(f"the measurement on {host} failed: {data['error']}", "check the server on the host")
    return data


def measure_host(inventory: Path, host: str, hostvars: dict[str, Any], bundle: Path, *,
                 extra_args: Sequence[str] = (), timeout_s: float = 3600) -> tuple[Windows, dict[str, Any]]:
    url, key_file = endpoint(hostvars)
    python = "{{ ansible_python_interpreter | default('/usr/bin/python3') }}"
    command = [ansible_tool("ansible"), host, "-i", str(inventory), "--become", "-m", "ansible.builtin.script",
               "-a", f"{bundle} --url {url} --key-file {key_file} executable={python}", *extra_args]
    env = {**ansible_env(), "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1", "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False, timeout=timeout_s)
    data = script_output(done.stdout, host)
    return Windows.from_report(data, origin=host), data

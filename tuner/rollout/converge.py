"""Apply the inventory's settings to hosts with the llama_server role: ``playbooks/llama_server.yml --limit``.

The role alone is all a tuned configuration changes: it validates, rewrites the unit, restarts it, waits for
``/health`` and rolls the unit back when the new one does not come up (``serial: 1`` in the playbook, the
first failure stopping it). Every apply of a winner (a live run's ``--apply``, the canary, the rollout to the
rest) goes through :func:`converge`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from tuner.errors import UserError
from tuner.inventory import ansible_tool

REPO = Path(__file__).resolve().parents[2]
PLAYBOOK = REPO / "playbooks" / "llama_server.yml"


def ansible_env() -> dict[str, str]:
    """The repository's ansible.cfg, no colour, and this venv's Ansible first on PATH."""
    return {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def converge(inventory: Path, hosts: Sequence[str], *, extra_args: Sequence[str] = (),
             timeout_s: float = 7200) -> None:
    """Run the server role on ``hosts`` (one at a time); a failure is a :class:`UserError` with the output's tail."""
    limit = ",".join(hosts)
    command = f"ansible-playbook -i {inventory} playbooks/llama_server.yml --limit {limit}"
    if not PLAYBOOK.exists():
        raise UserError(f"{PLAYBOOK} is not here (llamahost is installed without its playbooks)",
                        f"run `{command}` from a checkout")
    done = subprocess.run([ansible_tool("ansible-playbook"), "-i", str(inventory), str(PLAYBOOK), "--limit", limit,
                           *extra_args], cwd=REPO, env=ansible_env(), capture_output=True, text=True, check=False,
                          timeout=timeout_s)
    if done.returncode != 0:
        raise UserError(f"applying the settings to {limit} with the llama_server role failed:\n"
                        + why_it_failed(done.stdout + done.stderr),
                        f"the role rolled the unit back; fix the cause above and run `{command}` again")


_FAILED_TASK = re.compile(r"^(?:fatal|failed): \[(?P<host>[^\]]+)\]: (?:FAILED|UNREACHABLE)! => (?P<result>.*)$")
_RECAP = re.compile(r"^(?:PLAY|TASKS) RECAP ")
MESSAGE_CHARS = 1500


def why_it_failed(output: str, *, tail_lines: int = 25) -> str:
    """What each failed task said (``host: msg``), in the order Ansible printed them; without one (Ansible
    itself failed), the last lines before the recaps, which say nothing but the tasks' times."""
    failures = []
    for line in output.splitlines():
        if (match := _FAILED_TASK.match(line)) is None:
            continue
        try:
            said = json.loads(match["result"]).get("msg", match["result"])
        except (json.JSONDecodeError, AttributeError):
            said = match["result"]
        text = f"{match['host']}: {' '.join(str(said).split())}"
        failures.append(text if len(text) <= MESSAGE_CHARS else text[:MESSAGE_CHARS] + " [...]")
    if failures:
        return "\n".join(failures)
    lines = output.splitlines()
    end = next((index for index, line in enumerate(lines) if _RECAP.match(line)), len(lines))
    return "\n".join(lines[max(0, end - tail_lines):end])


def converge_host(inventory: Path, host: str, *, timeout_s: float = 7200) -> None:
    converge(inventory, [host], timeout_s=timeout_s)

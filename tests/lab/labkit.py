"""What the lab tests share: the wanted host (variables), a playbook runner and SSH on the lab.

Kept out of conftest.py so test modules can import it (``tests`` is not a package; pytest puts this
directory on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.config import RunConfig
from tuner.lab.access import ssh_command
from tuner.lab.instance import LabInstance, LabState
from tuner.model.default_model import SHA256 as MODEL_SHA256

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PLAYBOOK_TIMEOUT_S = 1500
RECAP = re.compile(r"^(?P<host>\S+)\s*:\s*ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+unreachable=(?P<unreachable>\d+)"
                   r"\s+failed=(?P<failed>\d+)\s+skipped=(?P<skipped>\d+)\s+rescued=(?P<rescued>\d+)", re.M)
# The secret the tests give the role; no playbook output may ever contain it.
API_KEY = "lab-api-key-5f2c9e1b7a"

# What the lab test host is asked to become. SMT off leaves CPUs 0,2,4,6 online (two physical cores
# per node); CPU 0 keeps the housekeeping, the server is pinned to node 1.
GROUP_VARS: dict[str, Any] = {
    "cpu_smt": "off",
    "cpu_inference_cpus": "2,4,6",
    "numa_balancing": False,
    "numa_zone_reclaim_mode": 1,
    "hugepages_thp_enabled": "madvise",
    "hugepages_thp_defrag": "defer+madvise",
    "hugepages_2m_per_node": {0: 16, 1: 16},
    "hugepages_1g_per_node": {0: 1, 1: 1},
    "hugepages_mount_path": "/mnt/huge-2m",
    "hugepages_mount_group": "llama-server",
    "llama_server_model_sha256": MODEL_SHA256,
    "llama_server_llamahost_command": str(BIN / "llamahost"),
    "llama_server_api_key": API_KEY,
}
# What `llamahost tune` would write into host_vars: the role must run exactly this.
TUNED = RunConfig(threads=2, threads_batch=2, batch_size=256, ubatch_size=128, cpus=(4, 6), placement="compact",
                  memory_policy="bind", load_mode="mmap+mlock", flash_attn="on", ctx_size=512)


@dataclass
class PlaybookRun:
    rc: int
    output: str
    seconds: float
    recap: dict[str, int] = field(default_factory=dict)

    @property
    def changed(self) -> int:
        return self.recap.get("changed", -1)

    @property
    def failed(self) -> int:
        return self.recap.get("failed", -1)


@dataclass
class Lab:
    instance: LabInstance
    state: LabState
    inventory: Path
    timings: dict[str, float]

    def ssh(self, command: str, *, stdin: str | None = None, check: bool = True, timeout: float = 300) -> str:
        cmd = ssh_command(self.instance.access(self.state), [command], connect_timeout=30)
        done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"on the lab, {command!r} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def playbook(self, playbook: str, *args: str, stage: str | None = None,
                 extra_vars: dict[str, Any] | None = None) -> PlaybookRun:
        cmd = [str(BIN / "ansible-playbook"), "-i", str(self.inventory), str(REPO / playbook), *args]
        if extra_vars is not None:
            cmd += ["-e", json.dumps(extra_vars)]
        env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
               "ANSIBLE_FORCE_COLOR": "0", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        started = time.monotonic()
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=PLAYBOOK_TIMEOUT_S,
                              check=False)
        seconds = round(time.monotonic() - started, 1)
        output = done.stdout + done.stderr
        match = RECAP.search(output)
        recap = {key: int(value) for key, value in match.groupdict().items() if key != "host"} if match else {}
        if stage is not None:
            self.timings[stage] = seconds
        assert API_KEY not in output, f"the API key leaked into the output of {playbook}"
        return PlaybookRun(done.returncode, output, seconds, recap)

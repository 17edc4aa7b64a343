"""What the lab tests share: the wanted host (variables), a playbook runner and SSH on the lab.

Kept out of conftest.py so test modules can import it (``tests`` is not a package; pytest puts this
directory on ``sys.path``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

from tuner.atomic import write_atomic
from tuner.config import RunConfig
from tuner.lab.access import INVENTORY_GROUP, ssh_command
from tuner.lab.image import lab_cache_dir
from tuner.lab.instance import LabInstance, LabState
from tuner.lab.machine import DATA_DISK_MODEL, GUEST_ADDRESS, saved_data_disk
from tuner.lab.recipe import image_key
from tuner.lab.spec import ImageRecipe, MachineSpec, content_key
from tuner.model.checksum import cached_sha256
from tuner.model.gguf_file import inspect_model

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PLAYBOOK_TIMEOUT_S = 1500
RECAP = re.compile(r"^(?P<host>\S+)\s*:\s*ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+unreachable=(?P<unreachable>\d+)"
                   r"\s+failed=(?P<failed>\d+)\s+skipped=(?P<skipped>\d+)\s+rescued=(?P<rescued>\d+)", re.M)
# The secret the tests give the role; no playbook output may ever contain it.
API_KEY = "lab-api-key-5f2c9e1b7a"

# What the lab test host is asked to become (conftest.py adds the model, its sha256 and the binary).
# SMT off leaves CPUs 0,2,4,6 online (two physical cores per node); CPU 0 keeps the housekeeping, the server
# is pinned to node 1.
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
    "llama_server_llamahost_command": str(BIN / "llamahost"),
    "llama_server_api_key": API_KEY,
}
# What `llamahost tune` would write into host_vars: the role must run exactly this.
TUNED = RunConfig(threads=2, threads_batch=2, batch_size=256, ubatch_size=128, cpus=(4, 6), placement="compact",
                  memory_policy="bind", load_mode="mmap+mlock", flash_attn="on", ctx_size=512,
                  omp_wait_policy="active")


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


# Converged lab disks kept between test sessions, newest first; each is ~150-300 MB.
CONVERGED_DISKS_KEPT = 2
# What a site.yml converge of the lab depends on, besides the variables and the image.
CONVERGE_INPUTS = ("roles", "plugins", "meta", "galaxy.yml", "playbooks", "ansible.cfg", "requirements.yml")


def converged_disks_dir() -> Path:
    return lab_cache_dir() / "converged"


def converged_disk_key(group_vars: dict[str, Any], host_vars: dict[str, Any], *, binary_sha256: str) -> str:
    """The key of a converged lab disk: everything that decides what site.yml leaves on the lab.

    The roles' and playbooks' bytes, ansible.cfg, ansible-core's version, the image recipe and machine, the
    variables (the model's sha256 among them) and the server binary's sha256. A change to any of them makes
    a new key, so a cached disk is only ever the result of converging exactly these inputs."""
    files = sorted(path for name in CONVERGE_INPUTS for path in ([REPO / name] if (REPO / name).is_file()
                                                                 else (REPO / name).rglob("*"))
                   if path.is_file() and "__pycache__" not in path.parts)
    digests = {str(path.relative_to(REPO)): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}
    # Paths into this checkout (the controller's llamahost) leave nothing on the guest: a clean clone elsewhere
    # converges to the same disk.
    variables = json.loads(json.dumps([group_vars, host_vars], sort_keys=True, default=str)
                           .replace(str(REPO), "<checkout>"))
    return content_key(digests, variables, binary_sha256, version("ansible-core"), image_key(ImageRecipe()),
                       asdict(MachineSpec()))


# The stack the lab stands for (issue 12's path from `pulumi up` to a serving host): one x86 host sized for the
# lab's own model, reached over SSH, with the server port opened to clients on a port that is not the role's
# default, so a test can tell the stack's port from the role's.
STACK_PORT = 8081
_STACK_OUTPUTS = """
import base64, json, sys
sys.path[:0] = sys.argv[3:]
from infra_mocks import X86_AMI, deploy
config = {"amiId": X86_AMI, "instanceType": "r7i.2xlarge", "model": sys.argv[1], "access": "ssh",
          "keyName": "lab", "serverPort": int(sys.argv[2])}
stack = deploy(config)
(instance,) = stack.resources("aws:ec2/instance:Instance")
print(json.dumps({"outputs": stack.outputs,
                  "user_data": base64.b64decode(instance.inputs["userDataBase64"]).decode()}))
"""
# How Ansible reaches the stack's host: replaced by how it reaches the lab.
STACK_CONNECTION_VARS = ("ansible_host", "ansible_user", "ansible_port")


@dataclass(frozen=True)
class LabVars:
    """The lab's inventory as a user of the stack has it: the host's variables in the inventory written from the
    stack (``stack``), group_vars the user writes, host_vars as the tuner writes them (from a RunConfig), and the
    key of the disk that converging them leaves."""

    stack: dict[str, Any]
    first_boot: str  # the stack's user data (cloud-config): what its hosts run before Ansible ever connects
    group_vars: dict[str, Any]
    host_vars: dict[str, Any]
    key: str

    def hosts_yaml(self, lab_inventory: str) -> str:
        """hosts.yml: the stack's inventory (its layout and host variables) with each host of ``lab_inventory``
        (the lab's own, connection only) for the stack's host."""
        hosts = yaml.safe_load(lab_inventory)[INVENTORY_GROUP]["hosts"]
        return yaml.safe_dump({"all": {"children": {INVENTORY_GROUP: {"hosts": {
            alias: {**self.stack, **connection} for alias, connection in hosts.items()}}}}})

    def first_boot_script(self) -> str:
        """A shell script that does on the lab what cloud-init does with the stack's user data at first boot: its
        files written, its commands run, the data-volume script told the lab's disk model (QEMU's NVMe, not EBS).
        Its packages are not installed (the lab has no network): the image has python3, and botocore serves only
        S3 model sources, which the lab does not use."""
        document = yaml.safe_load(self.first_boot)
        scripts = {item["path"] for item in document["write_files"]}
        lines = ["set -eu"]
        for item in document["write_files"]:
            lines.append(f"install -D -m {item['permissions']} /dev/stdin {shlex.quote(item['path'])} <<'END_OF_FILE'\n"
                         f"{item['content']}END_OF_FILE")
        for command in document["runcmd"]:
            assert command[0] in scripts, f"a first-boot command the lab cannot stand for: {command}"
            lines.append(shlex.join([*command, DATA_DISK_MODEL]))
        return "\n".join(lines) + "\n"


def stack_host_vars(split_model: Path, workdir: Path) -> tuple[dict[str, Any], str]:
    """The one host's variables in the inventory that infra/write_inventory.py writes from the outputs of the real
    Pulumi program under the infra tests' mocks (sized for ``split_model``), as a user runs it after `pulumi up`,
    with the lab for the instance: no connection variables (the lab's are added), and the guest's address for the
    host's private IP, which the server binds; and the host's user data."""
    outputs = workdir / "stack-outputs.json"
    inventory = workdir / "stack-inventory.yml"
    paths = [str(REPO / "tests" / "infra"), str(REPO / "infra"), str(REPO / "infra" / "policy")]
    done = subprocess.run([sys.executable, "-c", _STACK_OUTPUTS, str(split_model), str(STACK_PORT), *paths],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    stack = json.loads(done.stdout)
    outputs.write_text(json.dumps(stack["outputs"]))
    done = subprocess.run([sys.executable, str(REPO / "infra" / "write_inventory.py"), "--stack-output", str(outputs),
                           "--output", str(inventory)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    (host,) = yaml.safe_load(inventory.read_text())["all"]["children"][INVENTORY_GROUP]["hosts"].values()
    private_ip = host["llamahost_private_ip"]
    host_vars = {name: (GUEST_ADDRESS if value == private_ip else value) for name, value in host.items()
                 if name not in STACK_CONNECTION_VARS}
    assert host_vars["llama_server_host"] == GUEST_ADDRESS and host_vars["llama_server_port"] == STACK_PORT, host_vars
    return host_vars, str(stack["user_data"])


def wanted_lab_vars(split_model: Path, binary: Path, workdir: Path) -> LabVars:
    """The lab's variables: the stack's host vars, group_vars like a user's and the tuned host_vars, and the key of
    the disk that converging them leaves. The lab serves ``split_model`` (the tiny model split in two, as big
    models are published: one sha256 per shard) with ``binary``; the stack does not name the model source (its
    host would fetch it from S3 or a mirror, which the lab cannot reach), so group_vars give the controller's
    copy, as an on-prem inventory does."""
    stack, first_boot = stack_host_vars(split_model, workdir)
    group_vars = {**GROUP_VARS, "llama_server_model_src": str(split_model),
                  "llama_server_model_sha256": [cached_sha256(shard) for shard in inspect_model(split_model).files],
                  "llama_server_binary_src": str(binary)}
    host_vars = TUNED.role_vars()
    key = converged_disk_key({**stack, **group_vars, "first_boot": first_boot}, host_vars,
                             binary_sha256=cached_sha256(binary))
    return LabVars(stack, first_boot, group_vars, host_vars, key)


def converged_record(key: str) -> tuple[PlaybookRun, PlaybookRun] | None:
    """The two site.yml runs saved with the converged disk ``key``; ``None`` when either is missing."""
    disk = converged_disks_dir() / f"{key}.qcow2"
    try:
        runs = json.loads(disk.with_suffix(".json").read_text())
        return (PlaybookRun(**runs["converge"]), PlaybookRun(**runs["again"])) if disk.is_file() else None
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return None


# A live tune on a lab host (tests/lab/test_live_systemd.py, benchmarks/tune_hosts_at_once.py): one request in
# flight, two short requests per window from a file on the host, so that under emulation the baseline, some trials
# and the smallest proof fit a budget of minutes (with the chat mix, the budget planner refused a landing CI's
# 6-minute run after its baseline: no time for a candidate). One slow request under emulation is a p95 several
# times the baseline's, so the latency guard is wide.
SHORT_WORKLOAD = "/var/lib/llamahost/lab-workload.jsonl"
SHORT_REQUESTS = "".join(json.dumps({"prompt": f"Summarise note {n}: memory bandwidth bounds token generation on CPU "
                                               "hosts.", "max_tokens": 8}) + "\n" for n in (1, 2))


def short_tune_vars(budget: str, *, deadman_s: int) -> dict[str, Any]:
    """tune.yml's extra vars for such a run (no rollout: the host stays as converged)."""
    return {"tune_budget": budget, "tune_concurrency": 1, "tune_workload": SHORT_WORKLOAD, "tune_wait_poll_s": 5,
            "tune_rollout": False, "tune_extra_args": ["--deadman", f"{deadman_s}s", "--candidates", "1",
                                                       "--verify-windows", "3", "--latency-guard", "50"]}


@dataclass
class Lab:
    instance: LabInstance
    state: LabState
    inventory: Path
    timings: dict[str, float]
    disk_key: str = ""
    started_here: bool = False  # booted by this test session (not a lab someone left running)
    from_converged_disk: bool = False
    lab_vars: LabVars | None = None

    def write_hosts(self) -> None:
        """hosts.yml for this lab: the stack's inventory with the lab's connection (LabVars.hosts_yaml), or the
        lab's own inventory when the lab stands for no stack."""
        connection = self.instance.inventory.read_text()
        (self.inventory / "hosts.yml").write_text(self.lab_vars.hosts_yaml(connection) if self.lab_vars
                                                  else connection)

    def host_entry(self) -> dict[str, Any]:
        """This lab's host variables in hosts.yml: the stack's and the connection."""
        hosts = yaml.safe_load((self.inventory / "hosts.yml").read_text())
        group = hosts["all"]["children"] if "all" in hosts else hosts
        return dict(group[INVENTORY_GROUP]["hosts"][self.state.alias])

    @property
    def converged_disk(self) -> Path:
        return converged_disks_dir() / f"{self.disk_key}.qcow2"

    def saved_converge(self) -> tuple[PlaybookRun, PlaybookRun] | None:
        """The two site.yml runs (converge, converge again) that made the converged disk this lab booted from."""
        return converged_record(self.disk_key) if self.from_converged_disk and self.disk_key else None

    def keep_converged_disk(self, converge: PlaybookRun, again: PlaybookRun) -> None:
        """Save this lab's disk, converged by ``converge`` (``again`` changed nothing), for later sessions, and
        boot again from it (the boot also proves that the converged host comes up). Only a lab this session
        started is powered off."""
        if not (self.started_here and self.disk_key):
            return
        started = time.monotonic()
        self.instance.save_disk(self.state, self.converged_disk)
        write_atomic(self.converged_disk.with_suffix(".json"),
                     json.dumps({"converge": asdict(converge), "again": asdict(again)}), keep_previous=False)
        saved = [disk for disk in converged_disks_dir().glob("*.qcow2") if not disk.name.endswith(".data.qcow2")]
        for stale in sorted(saved, key=lambda p: p.stat().st_mtime, reverse=True)[CONVERGED_DISKS_KEPT:]:
            stale.unlink(missing_ok=True)
            saved_data_disk(stale).unlink(missing_ok=True)
            stale.with_suffix(".json").unlink(missing_ok=True)
        self.state = self.instance.up(ImageRecipe(), MachineSpec(), disk=self.converged_disk)
        self.write_hosts()
        self.from_converged_disk = True
        self.timings["save the converged disk and boot from it"] = round(time.monotonic() - started, 1)
        self.wait_until_serving()

    def wait_until_serving(self, timeout: float = 240) -> None:
        """After a boot of a converged disk: wait until the server answers its health check. The lab image masks
        systemd-networkd-wait-online (tuner.lab.recipe), so network-online.target does not wait for the DHCP
        lease, and a server bound to the private address can start before the address exists, fail to bind,
        and come back on its unit's 5 s restart (a cloud host's image waits for the network)."""
        started = time.monotonic()
        while probe(self)["health"]["status"] != 200:
            assert time.monotonic() - started < timeout, f"the lab's server did not serve within {timeout:.0f} s"
            time.sleep(5)
        self.timings["server serving after the boot"] = round(time.monotonic() - started, 1)

    def put_short_workload(self) -> None:
        """Write SHORT_REQUESTS to the host, where short_tune_vars' tune_workload names it."""
        self.ssh(f"sudo mkdir -p {Path(SHORT_WORKLOAD).parent} && sudo tee {SHORT_WORKLOAD} >/dev/null",
                 stdin=SHORT_REQUESTS)

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


GUEST_PROBE = (Path(__file__).parent / "guest_probe.py").read_text()


def probe(lab: Lab) -> dict[str, Any]:
    """What the lab host runs, read from its live kernel and systemd (guest_probe.py, run there as root)."""
    data: dict[str, Any] = json.loads(lab.ssh("sudo python3 -", stdin=GUEST_PROBE))
    return data

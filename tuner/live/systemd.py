"""Live tuning of a host's ``llama_server`` systemd unit, over SSH (``--inventory FILE --host NAME``).

The host was prepared by the ``llama_server`` role: a hardened unit (default ``llama-server.service``)
that listens on loopback. The tuner reaches it like Ansible does, from the inventory's connection facts,
over one SSH ControlMaster connection that every command reuses; the server's HTTP port comes to the
controller through an SSH local port forward. Every change runs as root (``sudo -n`` when the SSH user is
not root) and lives under ``/run`` only, so a reboot forgets it; the role's unit file and ``/etc`` are
never touched:

``/run/systemd/system/<unit>.service.d/50-llamahost-trial.conf``
    the trial: an ``ExecStart=`` reset and a new ``ExecStart=`` that keeps the role's binary, model,
    address and key file and carries the trial's flags, plus its CPU placement and memory policy;
``/run/llamahost/heartbeat``
    written by the tuner: the host's seconds since boot (:mod:`tuner.live.heartbeat`). A transient unit
    ``llamahost-deadman`` (``systemd-run``) removes the trial, reloads and restarts the unit on its
    baseline when the heartbeat is older than the dead-man limit;
``/run/lock/llamahost-measure.lock``
    the host's measuring lock (:mod:`tuner.host_lock`), the one a benchmark ``tune`` or a fleet worker on the
    host takes too: ``flock``-ed by an SSH session the tuner keeps open for the whole run. When the tuner dies,
    its end of that session's stdin closes, the remote ``cat`` exits and the kernel drops the lock.

Making a proven winner permanent is the role's job: :meth:`SystemdServer.adopt` checks that the winner is
in the inventory (the write-back to host_vars happened) and converges the host with ``playbooks/llama_server.yml
--limit HOST``, which validates, rewrites the unit, restarts it and rolls back if it does not come up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import os
import re
import select
import shlex
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.config import RunConfig, format_cpu_list, parse_cpu_list
from tuner.durations import parse_duration
from tuner.errors import UserError
from tuner.host_lock import LOCK_NAME, SYSTEM_LOCK_DIRS
from tuner.inventory import read_host_variables
from tuner.live.control import Target, TargetOptions, TrialStartFailed
from tuner.live.heartbeat import SHELL_WRITE
from tuner.model.checksum import combined_sha256, model_sha256
from tuner.model.gguf_file import check_fits_in_memory, inspect_model
from tuner.model_pages import (
    MappedPages,
    PlacementKey,
    cpus_allowed,
    evict_shell,
    mapped_pages,
    needs_page_reset,
    page_placement,
    placement_problem,
    policy_nodes,
)
from tuner.probe.collect import read_host
from tuner.probe.host import HostProbe, Topology
from tuner.rollout.converge import converge_host
from tuner.server.client import health
from tuner.server.identity import ServerBinary, identity_of, probe_commands
from tuner.server.process import OOM_VICTIM_SCORE_ADJ, api_key_from_text, child_setup, free_port

_IDENTIFY_MARK = "--llamahost-identify--"
_STATE_MARK = "--llamahost-state--"
_PAGES_DROPPED = "llamahost-model-pages-dropped"

DROPIN_NAME = "50-llamahost-trial.conf"
STATE_DIR = "/run/llamahost"
HEARTBEAT_FILE = f"{STATE_DIR}/heartbeat"
LOCK_FILE = str(SYSTEM_LOCK_DIRS[0] / LOCK_NAME)  # the host's measuring lock: one measuring run per host
DEADMAN_UNIT = "llamahost-deadman"
DEADMAN_SCRIPT = f"{STATE_DIR}/deadman.sh"
DEADMAN_LOG = f"{STATE_DIR}/deadman.log"
DEFAULT_SERVICE = "llama-server"
DEFAULT_HEALTH_TIMEOUT_S = 600.0
LOCK_REFUSED_RC = 75

JOURNAL_LINES = 30

_PLAIN_WORD = re.compile(r"^[A-Za-z0-9_./:=+,@-]+$")  # needs no quotes in ExecStart= (as the role's filter)

# The flags RunConfig.server_args() renders, with the number of values each takes. A trial's command is
# the unit's command without these, followed by the trial's own.
TUNED_FLAGS: dict[str, int] = {
    "--threads": 1, "--threads-batch": 1, "--batch-size": 1, "--ubatch-size": 1, "--flash-attn": 1,
    "--cache-type-k": 1, "--cache-type-v": 1, "--parallel": 1, "--cont-batching": 0, "--no-cont-batching": 0,
    "--ctx-size": 1, "--numa": 1, "--load-mode": 1,
}


def remote_lock_script(owner: str, lock_file: str = LOCK_FILE) -> str:
    """Shell that takes the host's measuring lock without waiting and holds it until its stdin closes.

    The lock is :mod:`tuner.host_lock`'s file, so a live run over SSH, a benchmark tune and a fleet worker on the
    host refuse each other; like that module it leaves the file open to every user and names its holder in it.
    Prints ``locked``, or ``busy`` and the holder, then exits with :data:`LOCK_REFUSED_RC`."""
    lock = shlex.quote(lock_file)
    return (f"mkdir -p {shlex.quote(str(Path(lock_file).parent))}; exec 9>>{lock}; chmod 0666 {lock} 2>/dev/null\n"
            f"if flock -n 9; then printf '%s\\n' {shlex.quote(owner)} > {lock}; echo locked; exec cat >/dev/null\n"
            f"else echo busy; cat {lock} 2>/dev/null; exit {LOCK_REFUSED_RC}; fi\n")


# ---- inventory facts (pure) -----------------------------------------------------------------------

@dataclass(frozen=True)
class HostFacts:
    """How to reach one inventory host, as Ansible would (its ``ansible_*`` connection variables)."""

    name: str
    address: str
    port: int | None
    user: str | None
    private_key: str | None
    ssh_args: tuple[str, ...]
    variables: Mapping[str, Any]

    @property
    def needs_sudo(self) -> bool:
        return self.user != "root"

    @property
    def service(self) -> str:
        return str(self.variables.get("llama_server_service_name") or DEFAULT_SERVICE)

    @property
    def health_timeout_s(self) -> float:
        value = self.variables.get("llama_server_health_timeout")
        return float(value) if value is not None else DEFAULT_HEALTH_TIMEOUT_S


def host_facts(name: str, variables: Mapping[str, Any]) -> HostFacts:
    """The connection facts of ``name`` from its inventory variables (``ansible-inventory --host``)."""
    connection = str(variables.get("ansible_connection", "ssh"))
    if connection not in ("ssh", "smart"):
        raise UserError(f"host {name} is reached with ansible_connection {connection}; live tuning uses SSH",
                        "tune it from a machine that can reach it over SSH (ansible_connection: ssh)")
    for key in ("ansible_host", "ansible_user", "ansible_ssh_common_args", "ansible_ssh_extra_args",
                "ansible_ssh_private_key_file"):
        if "{{" in str(variables.get(key, "")):
            raise UserError(f"{key} of host {name} is a Jinja template ({variables[key]!r}), which only "
                            "ansible-playbook resolves", f"write {key} as a plain value for live tuning")
    port = variables.get("ansible_port", variables.get("ansible_ssh_port"))
    user = variables.get("ansible_user", variables.get("ansible_ssh_user"))
    args = [*shlex.split(str(variables.get("ansible_ssh_common_args", "") or "")),
            *shlex.split(str(variables.get("ansible_ssh_extra_args", "") or ""))]
    key = variables.get("ansible_ssh_private_key_file", variables.get("ansible_private_key_file"))
    return HostFacts(name=name, address=str(variables.get("ansible_host") or name),
                     port=int(port) if port is not None else None, user=str(user) if user else None,
                     private_key=str(Path(str(key)).expanduser()) if key else None, ssh_args=tuple(args),
                     variables=dict(variables))


# ---- the unit's command line (pure) ---------------------------------------------------------------

def split_exec_words(line: str) -> list[str]:
    """An ``ExecStart=`` value -> arguments, as systemd splits it (quotes, backslash escapes, ``%%``/``$$``)."""
    words = shlex.split(line, posix=True)
    return [word.replace("%%", "%").replace("$$", "$") for word in words]


def exec_words(args: Sequence[str]) -> str:
    """Arguments -> an ``ExecStart=`` value: systemd expands ``%`` and ``$`` and splits on blanks, so
    both are doubled and any argument that is not plainly safe is double-quoted."""
    out = []
    for arg in args:
        escaped = arg.replace("%", "%%").replace("$", "$$")
        if not _PLAIN_WORD.match(escaped):
            escaped = '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'
        out.append(escaped)
    return " ".join(out)


def unit_exec_start(unit_text: str) -> list[str]:
    """The (last) ``ExecStart=`` of a unit file, as arguments."""
    found: list[str] | None = None
    for raw in unit_text.splitlines():
        line = raw.strip()
        if line.startswith("ExecStart="):
            value = line.removeprefix("ExecStart=").strip()
            found = split_exec_words(value.lstrip("-@:+!")) if value else None
    if not found:
        raise UserError("the unit file has no ExecStart= line", "converge the host with playbooks/site.yml first")
    return found


@dataclass(frozen=True)
class ServerCommand:
    """The role's llama-server command line, split into what a trial keeps and what it replaces."""

    argv: tuple[str, ...]

    def _value(self, flag: str) -> str | None:
        for index, word in enumerate(self.argv[:-1]):
            if word == flag:
                return self.argv[index + 1]
        return None

    @property
    def kept(self) -> tuple[str, ...]:
        """Everything but the tuned flags: binary, model, address, key file, the role's extra args."""
        out: list[str] = []
        skip = 0
        for word in self.argv:
            if skip:
                skip -= 1
            elif word in TUNED_FLAGS:
                skip = TUNED_FLAGS[word]
            else:
                out.append(word)
        return tuple(out)

    def with_config(self, config: RunConfig) -> list[str]:
        """The trial's command: its flags come last, so they win over any alias in the extra args."""
        return [*self.kept, *config.server_args()]

    @property
    def model(self) -> str:
        model = self._value("--model") or self._value("-m")
        if model is None:
            raise UserError("the unit's command has no --model", "converge the host with playbooks/site.yml")
        return model

    @property
    def listen(self) -> tuple[str, int]:
        host = self._value("--host") or "127.0.0.1"
        return ("127.0.0.1" if host in ("0.0.0.0", "::", "localhost") else host), int(self._value("--port") or 8080)

    @property
    def api_key_file(self) -> str | None:
        return self._value("--api-key-file")


def server_command(unit_text: str) -> ServerCommand:
    argv = unit_exec_start(unit_text)
    if not Path(argv[0]).name.startswith("llama-server"):
        raise UserError(f"the unit runs {argv[0]}, not llama-server",
                        "live tuning needs llama_server_install_mode binary or source (llama.cpp's server)")
    return ServerCommand(tuple(argv))


def render_trial_dropin(command: ServerCommand, config: RunConfig, mask: tuple[int, ...],
                        memory_max_bytes: int | None = None) -> str:
    """The transient drop-in that makes the unit run ``config`` (placement included) until removed.

    A trial is contained: the out-of-memory killer takes it first (``OOMScoreAdjust=1000``), and with
    ``memory_max_bytes`` (the memory guard's limit) its cgroup is capped, so a trial that grows past the
    limit is reclaimed or killed inside its own unit instead of pushing sshd or a neighbour out."""
    cpus = format_cpu_list(config.cpus)
    lines = [
        "# llamahost live tuning: a trial configuration. Transient (under /run); the tuner or its dead-man",
        "# switch removes it, and a reboot forgets it.",
        "[Service]",
        "ExecStart=",
        f"ExecStart={exec_words(command.with_config(config))}",
        f"OOMScoreAdjust={OOM_VICTIM_SCORE_ADJ}",
        f"MemoryMax={memory_max_bytes if memory_max_bytes else 'infinity'}",
        # An empty assignment resets what the role's unit set; then the trial's value, if any.
        "CPUAffinity=",
        "AllowedCPUs=",
    ]
    if cpus:
        lines += [f"CPUAffinity={cpus}", f"AllowedCPUs={cpus}"]
    # NUMAMask= is a list that adds up like CPUAffinity=: without the empty assignment, a trial's mask would
    # join the role's (node 1 and a trial's node 0 became "bind on 0-1", read back on the lab).
    lines += [f"NUMAPolicy={config.memory_policy}", "NUMAMask="]
    if config.memory_policy != "default":
        lines.append(f"NUMAMask={format_cpu_list(mask)}")
    if config.load_mode in ("mlock", "mmap+mlock"):
        lines.append("LimitMEMLOCK=infinity")
    return "\n".join(lines) + "\n"


def dropin_path(service: str) -> str:
    return f"/run/systemd/system/{service}.service.d/{DROPIN_NAME}"


def render_deadman_script(service: str, deadman_s: float) -> str:
    """The host side of the dead-man switch, run by ``systemd-run`` as a transient unit.

    It checks the heartbeat's age every few seconds; once the controller has been silent longer than
    the limit it removes the trial drop-in (if any), reloads, restarts the unit on its baseline, notes it
    in the log, and exits: with no controller there is nothing more to guard."""
    limit = max(1, round(deadman_s))
    poll = max(1, min(5, limit // 10))
    return f"""#!/bin/sh
# llamahost dead-man switch for {service}.service (started by llamahost tune --live; transient)
heartbeat={HEARTBEAT_FILE}
dropin={dropin_path(service)}
limit={limit}
while :; do
    # seconds since boot on both sides (tuner.live.heartbeat): a wall-clock step moves neither
    now=$(cut -d. -f1 /proc/uptime)
    beat=$(cut -d. -f1 "$heartbeat" 2>/dev/null)
    case "$beat" in ''|*[!0-9]*) beat=0 ;; esac
    silent=$((now - beat))
    if [ "$silent" -gt "$limit" ]; then
        if [ -e "$dropin" ]; then
            rm -f "$dropin"
            systemctl daemon-reload
            systemctl restart {service}.service
            echo "$(date -u +%FT%TZ) controller silent for $silent s (limit $limit s): trial removed, \
{service} restarted on its baseline" | tee -a {DEADMAN_LOG}
        else
            echo "controller silent for $silent s, no trial active: nothing to restore"
        fi
        exit 0
    fi
    sleep {poll}
done
"""


def write_heartbeat_command() -> str:
    """The heartbeat write, creating the state directory first: the measuring lock lives in /run/lock, so
    nothing before the first heartbeat is sure to have made /run/llamahost (it is gone after every boot)."""
    return f"mkdir -p {STATE_DIR} && " + SHELL_WRITE.format(path=HEARTBEAT_FILE)


def deadman_start_script() -> str:
    """Shell lines that (re)start the dead-man unit unless it runs; the heartbeat is touched first so a
    new switch never fires at once."""
    return (f"{write_heartbeat_command()}\n"
            f"if ! systemctl is-active -q {DEADMAN_UNIT}; then\n"
            f"    systemctl reset-failed {DEADMAN_UNIT} 2>/dev/null || true\n"
            f"    systemd-run --quiet --collect --unit={DEADMAN_UNIT} "
            f"--description='llamahost dead-man switch' /bin/sh {DEADMAN_SCRIPT}\n"
            "fi\n")


# ---- the remote probe -----------------------------------------------------------------------------

# The files tuner.probe's parsers read, as globs. /proc/self is left out on purpose: it would describe
# the SSH session's process, not the service (systemd gives the service its own limits and CPUs).
PROBE_GLOBS: tuple[str, ...] = (
    "/proc/meminfo", "/proc/cpuinfo", "/proc/sys/kernel/hostname", "/proc/sys/kernel/osrelease",
    "/proc/sys/kernel/numa_balancing", "/proc/sys/vm/zone_reclaim_mode",
    "/sys/kernel/mm/transparent_hugepage/enabled", "/sys/kernel/mm/transparent_hugepage/defrag",
    "/sys/kernel/mm/hugepages/*/nr_hugepages", "/sys/kernel/mm/hugepages/*/free_hugepages",
    "/sys/devices/system/cpu/online", "/sys/devices/system/cpu/possible", "/sys/devices/system/cpu/present",
    "/sys/devices/system/cpu/smt/control", "/sys/devices/system/cpu/smt/active",
    "/sys/devices/system/cpu/cpu[0-9]*/online", "/sys/devices/system/cpu/cpu[0-9]*/topology/*",
    "/sys/devices/system/cpu/cpu[0-9]*/cache/index[0-9]*/*",
    "/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_governor",
    "/sys/devices/system/cpu/cpu[0-9]*/cpufreq/energy_performance_preference",
    "/sys/devices/system/node/online", "/sys/devices/system/node/possible",
    "/sys/devices/system/node/node[0-9]*/cpulist", "/sys/devices/system/node/node[0-9]*/meminfo",
    "/sys/devices/system/node/node[0-9]*/distance",
    "/sys/devices/system/node/node[0-9]*/hugepages/*/nr_hugepages",
    "/sys/devices/system/node/node[0-9]*/hugepages/*/free_hugepages",
)

# Runs on the host's own python3 (the role needs one anyway), standard library only: every readable file
# matching the globs, as JSON.
PROBE_COLLECTOR = """
import glob, json, sys
out = {}
for pattern in json.loads(sys.argv[1]):
    for path in glob.glob(pattern):
        try:
            with open(path, encoding="utf-8") as handle:
                out[path] = handle.read()
        except (OSError, UnicodeDecodeError):
            pass
print(json.dumps(out))
"""


def probe_from_files(files: Mapping[str, str]) -> HostProbe:
    """A :class:`HostProbe` from the host's files (path -> text), through the same parsers as a local probe.

    The service gets its CPUs and memory-lock limit from systemd (the trial drop-in sets CPUAffinity=
    and LimitMEMLOCK=), so what a probing process may do there says nothing about it: any CPU may be
    used and memory may be locked."""
    with tempfile.TemporaryDirectory(prefix="llamahost-remote-probe-") as root:
        for path, text in files.items():
            if not any(fnmatch.fnmatchcase(path, pattern) for pattern in PROBE_GLOBS) or ".." in path:
                continue
            target = Path(root) / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        probe = read_host(root)
    kernel = dataclasses.replace(probe.kernel, memlock_limit_bytes=None, can_lock_memory=True,
                                 memlock_limit_known=True)
    warnings = tuple(w for w in probe.warnings if "RLIMIT_MEMLOCK" not in w and "this process" not in w)
    return dataclasses.replace(probe, kernel=kernel, allowed_cpus=None, warnings=warnings)


# ---- SSH ------------------------------------------------------------------------------------------

class SshLink:
    """One ControlMaster connection to a host; every command and the port forward ride on it.

    The master and the lock's session die with this process (``PR_SET_PDEATHSIG``), so a killed tuner
    leaves no connection behind to keep its lock alive. (Short commands end on their own, under a timeout.)"""

    def __init__(self, facts: HostFacts, control_dir: Path) -> None:
        self.facts = facts
        self.control_path = control_dir / "master.sock"
        self.log_path = control_dir / "master.log"
        self._master: subprocess.Popen[bytes] | None = None

    def _base(self, *options: str) -> list[str]:
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ControlPath={self.control_path}", *options]
        if self.facts.port is not None:
            cmd += ["-p", str(self.facts.port)]
        if self.facts.private_key:
            cmd += ["-i", self.facts.private_key]
        cmd += list(self.facts.ssh_args)
        target = f"{self.facts.user}@{self.facts.address}" if self.facts.user else self.facts.address
        return [*cmd, target]

    def open(self, timeout_s: float = 60.0) -> None:
        cmd = self._base("-M", "-N", "-o", "ControlPersist=no", "-o", "ServerAliveInterval=15",
                         "-o", "ServerAliveCountMax=4", "-o", "ConnectTimeout=30")
        with self.log_path.open("wb") as log:  # a file, not a pipe nobody reads during an 8-hour run
            self._master = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                            preexec_fn=child_setup())  # noqa: PLW1509 (only system calls)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._master.poll() is not None:
                err = self.log_path.read_text(errors="replace").strip()[-800:]
                self._master = None
                raise UserError(f"cannot connect to {self.facts.name} ({self.facts.address}) over SSH: {err}",
                                "check the inventory's connection variables: `ansible -i INVENTORY "
                                f"{self.facts.name} -m ping` must work")
            check = subprocess.run(self._base("-O", "check"), capture_output=True, check=False)
            if check.returncode == 0:
                return
            time.sleep(0.2)
        self.close()
        raise UserError(f"SSH to {self.facts.name} did not connect within {timeout_s:.0f} s",
                        "check that the host is up and reachable")

    def forward(self, remote_host: str, remote_port: int) -> int:
        """Forward a free local port to ``remote_host:remote_port`` as seen from the host."""
        local = free_port()
        done = subprocess.run(self._base("-O", "forward", "-L", f"127.0.0.1:{local}:{remote_host}:{remote_port}"),
                              capture_output=True, text=True, check=False, timeout=30)
        if done.returncode != 0:
            raise UserError(f"cannot forward a port to {remote_host}:{remote_port} on {self.facts.name}: "
                            f"{done.stderr.strip()}", "check that sshd allows TCP forwarding (AllowTcpForwarding)")
        return local

    def remote(self, script: str, *, root: bool = True) -> str:
        """The command line that runs ``script`` with ``sh`` on the host, as root unless told otherwise."""
        prefix = "sudo -n " if root and self.facts.needs_sudo else ""
        return f"{prefix}sh -c {shlex.quote(script)}"

    def run(self, script: str, *, stdin: str | None = None, root: bool = True, check: bool = True,
            timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*self._base("-o", "ControlMaster=no"), self.remote(script, root=root)],
                              input=stdin if stdin is not None else "", capture_output=True, text=True,
                              check=False, timeout=timeout)
        if check and done.returncode != 0:
            raise UserError(f"on {self.facts.name}, a command failed ({done.returncode}): "
                            f"{done.stderr.strip()[-800:]}\ncommand: {script.strip()[:300]}",
                            "the SSH user needs passwordless sudo (become); check the host's systemd")
        return done

    def popen(self, script: str) -> subprocess.Popen[str]:
        return subprocess.Popen([*self._base("-o", "ControlMaster=no"), self.remote(script)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=child_setup())  # noqa: PLW1509 (only system calls)

    def close(self) -> None:
        if self._master is None:
            return
        subprocess.run(self._base("-O", "exit"), capture_output=True, check=False, timeout=15)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._master.wait(timeout=10)
        if self._master.poll() is None:
            self._master.kill()
            self._master.wait()
        self._master = None


def read_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    """The first line ``proc`` prints, or '' when it prints nothing in time."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    return proc.stdout.readline().strip() if ready else ""


# ---- the ServerControl ----------------------------------------------------------------------------

class SystemdServer:
    """ServerControl for a host's llama_server unit (see the module docstring)."""

    def __init__(self, facts: HostFacts, *, inventory: Path, deadman_s: float,
                 max_memory_fraction: float | None = None) -> None:
        self.facts = facts
        self.inventory = inventory
        self.service = facts.service
        self._deadman_s = deadman_s
        self._max_memory_fraction = max_memory_fraction
        self.memory_max_bytes: int | None = None  # a trial's MemoryMax=, from the probe
        self._control_dir: tempfile.TemporaryDirectory[str] | None = None
        self.link: SshLink | None = None
        self.command: ServerCommand | None = None
        self.topology: Topology | None = None
        self._local_port: int | None = None
        self._api_key: str | None = None
        self._baseline: RunConfig | None = None
        self._lock: subprocess.Popen[str] | None = None
        self.model_files: list[str] = []  # the model's shards on the host (describe() sets them; else --model's)
        self._pages_placed_for: PlacementKey | None = None  # the placement the model's pages were dropped for
        self.last_applied: dict[str, Any] = {}  # what the last start did and read back (a trial's record)

    # -- connection --------------------------------------------------------------------------------

    def connect(self) -> None:
        """Open the SSH connection, check sudo, read the unit's command and forward its port."""
        if self.link is not None:
            return
        self._control_dir = tempfile.TemporaryDirectory(prefix="llamahost-ssh-")
        self.link = SshLink(self.facts, Path(self._control_dir.name))
        try:
            self.link.open()
            self._inspect_unit()
        except BaseException:
            self.disconnect()
            raise

    def _inspect_unit(self) -> None:
        link = self._ssh()
        if self.facts.needs_sudo and link.run("true", check=False).returncode != 0:
            raise UserError(f"user {self.facts.user} on {self.facts.name} cannot use sudo without a password",
                            "give the SSH user passwordless sudo (as Ansible's become needs), or connect as root")
        self.command = self._read_command()
        host, port = self.command.listen
        self._local_port = link.forward(host, port)
        key_file = self.command.api_key_file
        if key_file:
            text = link.run(f"cat {shlex.quote(key_file)}").stdout
            self._api_key = api_key_from_text(text)

    def _read_command(self) -> ServerCommand:
        link = self._ssh()
        unit = shlex.quote(f"{self.service}.service")
        fragment = link.run(f"systemctl show -p FragmentPath --value {unit}").stdout.strip()
        if not fragment:
            raise UserError(f"{self.service}.service does not exist on {self.facts.name}",
                            "prepare the host with playbooks/site.yml (the llama_server role) first")
        if fragment.startswith("/run/"):
            raise UserError(f"{self.service}.service on {self.facts.name} is defined under /run ({fragment})",
                            "live tuning works on the unit the llama_server role installs under /etc")
        return server_command(link.run(f"cat {shlex.quote(fragment)}").stdout)

    def disconnect(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None
        if self._control_dir is not None:
            self._control_dir.cleanup()
            self._control_dir = None

    def _ssh(self) -> SshLink:
        if self.link is None:
            raise RuntimeError("connect() to the host first")
        return self.link

    def server_command(self) -> ServerCommand:
        if self.command is None:
            raise RuntimeError("connect() to the host first")
        return self.command

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One tuner per host: ``flock`` on the host, held by an SSH session open for the whole run.

        A second tuner is refused as soon as its ``flock -n`` answers; a dead tuner's lock goes with its
        session. On a clean exit the dead-man switch is stopped (the unit runs its baseline or the
        adopted winner); after a failure it is left to do its job."""
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        owner = f"live tune over SSH (pid {os.getpid()} on {socket.gethostname()}, since {since})"
        holder = self._ssh().popen(remote_lock_script(owner))
        first = read_line(holder, 30.0)
        if first != "locked":
            try:
                rest, err = holder.communicate(timeout=10)  # closes its stdin: a late lock is let go at once
            except subprocess.TimeoutExpired:
                holder.kill()
                rest, err = holder.communicate()
            if first == "busy":
                raise UserError(f"another llamahost tune is already tuning {self.describe()} "
                                f"({rest.strip() or 'holder unknown'})",
                                "wait for it to finish, or stop it (Ctrl-C / kill), then run again")
            raise UserError(f"cannot take the tuning lock on {self.facts.name}: {err.strip()[-500:]}",
                            "the SSH user needs passwordless sudo and flock (util-linux) on the host")
        self._lock = holder
        clean = False
        try:
            yield
            clean = True
        finally:
            if clean:
                self.stop_deadman()
            self._lock = None
            if holder.stdin is not None:
                holder.stdin.close()
            try:
                holder.wait(timeout=10)
            except subprocess.TimeoutExpired:
                holder.kill()
                holder.wait()

    # -- ServerControl -----------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        if self._local_port is None:
            raise RuntimeError("connect() to the host first")
        return f"http://127.0.0.1:{self._local_port}"

    @property
    def api_key(self) -> str | None:
        return self._api_key

    @property
    def baseline(self) -> RunConfig:
        if self._baseline is None:
            raise RuntimeError("start() the server with its baseline first")
        return self._baseline

    @property
    def deadman_seconds(self) -> float:
        return self._deadman_s

    def describe(self) -> str:
        return f"{self.service}.service on {self.facts.name}"

    def server_log(self) -> str:
        return f"`journalctl -u {self.service}` on {self.facts.name}"

    def start(self, baseline: RunConfig) -> None:
        """Before tuning: a fresh dead-man switch, no leftover trial, the unit healthy on its own config."""
        self._baseline = baseline
        self._ssh().run(f"mkdir -p {STATE_DIR}; systemctl stop {DEADMAN_UNIT} 2>/dev/null || true\n"
                        f"cat > {DEADMAN_SCRIPT}\n", stdin=render_deadman_script(self.service, self._deadman_s))
        self.restore_baseline()
        self._ssh().run(deadman_start_script())

    def apply(self, config: RunConfig) -> None:
        if self.topology is None:
            raise RuntimeError("probe() the host before applying trials")
        text = render_trial_dropin(self.server_command(), config, policy_nodes(config, self.topology),
                                   self.memory_max_bytes)
        path = dropin_path(self.service)
        unit = f"{self.service}.service"
        reset = self._needs_page_reset(config)
        unchanged = "false" if reset else f"[ -f {path} ] && cmp -s {path}.new {path} && systemctl is-active -q {unit}"
        script = (f"set -e\nmkdir -p {STATE_DIR} {shlex.quote(str(Path(path).parent))}\n"
                  + deadman_start_script()
                  + f"cat > {path}.new\n"
                  f"if {unchanged}; then\n"
                  f"    rm -f {path}.new; echo unchanged\n"
                  f"else\n    mv {path}.new {path}; systemctl daemon-reload\n"
                  f"{self._restart_lines(reset)}    echo restarted\nfi\n")
        out = self._ssh().run(script, stdin=text).stdout
        self._pages_reset(config, out)
        self._wait_healthy("the trial configuration", config)

    def restore_baseline(self) -> None:
        path = dropin_path(self.service)
        unit = f"{self.service}.service"
        reset = self._baseline is not None and self._needs_page_reset(self._baseline)
        if reset:  # whether or not a trial ran: the pages were placed for another placement
            out = self._ssh().run(f"rm -f {path}; systemctl daemon-reload\n{self._restart_lines(True)}").stdout
        else:
            out = self._ssh().run(f"if [ -e {path} ]; then rm -f {path}; systemctl daemon-reload; "
                                  f"systemctl restart {unit} || true; "
                                  f"elif ! systemctl is-active -q {unit}; then systemctl restart {unit} || true; fi"
                                  ).stdout
        if self._baseline is not None:
            self._pages_reset(self._baseline, out)
        self._wait_healthy("the baseline", None)

    # -- the model's pages (tuner.model_pages) ----------------------------------------------------------

    def _needs_page_reset(self, config: RunConfig) -> bool:
        multi_node = self.topology is not None and len(self.topology.nodes) > 1
        return needs_page_reset(self._pages_placed_for, config, multi_node=multi_node)

    def _restart_lines(self, reset: bool) -> str:
        """Restart the unit; to reset the model's pages, stop it, drop them while nothing maps them, start."""
        unit = f"{self.service}.service"
        if not reset:
            return f"    systemctl restart {unit} || true\n"
        evict = " && ".join(evict_shell(self._model_files()).splitlines())
        return (f"    systemctl stop {unit} || true\n"
                f"    if {evict}; then echo {_PAGES_DROPPED}; fi\n"  # never leaves the unit stopped
                f"    systemctl start {unit} || true\n")

    def _pages_reset(self, config: RunConfig, output: str) -> None:
        """Remember for which placement the pages were dropped (when the script says they were)."""
        reset = _PAGES_DROPPED in output.split()
        if reset:
            self._pages_placed_for = page_placement(config)
        self.last_applied = {"page_cache_reset": reset}

    def _model_files(self) -> list[str]:
        return self.model_files or [self.server_command().model]

    def heartbeat(self) -> None:
        self._ssh().run(write_heartbeat_command(), timeout=30)

    def stop_deadman(self) -> None:
        self._ssh().run(f"systemctl stop {DEADMAN_UNIT} 2>/dev/null || true", check=False)

    def unit_state(self) -> dict[str, str]:
        out = self._ssh().run(f"systemctl show -p ActiveState -p SubState -p MainPID -p NRestarts "
                              f"{self.service}.service", timeout=30).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal_tail(self, lines: int = JOURNAL_LINES) -> str:
        return self._ssh().run(f"journalctl -u {self.service}.service -n {lines} --no-pager -o short-iso",
                               check=False).stdout.strip()

    def _wait_healthy(self, what: str, config: RunConfig | None) -> None:
        """Wait for /health 200 through the forward; fail fast when systemd sees the process die."""
        started = time.monotonic()
        deadline = started + self.facts.health_timeout_s
        next_state = started
        while True:
            if health(self.base_url, timeout_s=2.0) == 200:
                self._check_running(what, config)
                return
            now = time.monotonic()
            if now >= next_state:
                state = self.unit_state()
                if state.get("SubState") in ("auto-restart", "failed", "dead") or \
                        state.get("ActiveState") in ("failed", "inactive"):
                    self._fail(what, config, f"systemd reports it {state.get('ActiveState')}/"
                                             f"{state.get('SubState')}")
                next_state = now + 1.0
            if now >= deadline:
                self._fail(what, config, f"/health did not answer 200 within {self.facts.health_timeout_s:.0f} s")
            time.sleep(0.3)

    def running_state(self) -> tuple[list[str], tuple[int, ...] | None, MappedPages | None]:
        """The unit's main process as /proc on the host sees it: its command line, the CPUs it may run on,
        and how it maps the model (memory policy, pages per node). Read as root: numa_maps of another user's
        process is not readable otherwise."""
        files = " ".join(shlex.quote(path) for path in self._model_files())
        out = self._ssh().run(
            f"pid=$(systemctl show -p MainPID --value {self.service}.service); [ \"${{pid:-0}}\" -gt 0 ] || exit 0\n"
            f"cat /proc/$pid/cmdline; echo; echo {_STATE_MARK}\n"
            f"cat /proc/$pid/status; echo {_STATE_MARK}\n"
            f"for f in {files}; do readlink -f \"$f\"; done; echo {_STATE_MARK}\n"
            f"grep -F file= /proc/$pid/numa_maps || true\n", check=False, timeout=30).stdout
        parts = out.split(_STATE_MARK + "\n")
        if len(parts) < 4:
            return [word for word in out.split("\0") if word.strip()], None, None
        argv = [word for word in parts[0].rstrip("\n").split("\0") if word]
        cpus = cpus_allowed(parts[1])
        real_files = [line for line in parts[2].splitlines() if line]
        return argv, cpus, mapped_pages(parts[3], [*real_files, *self._model_files()])

    def running_argv(self) -> list[str]:
        """The command line of the unit's main process, from /proc on the host."""
        return self.running_state()[0]

    def _check_running(self, what: str, config: RunConfig | None) -> None:
        """A healthy server must be the one asked for: the dead-man switch may have restored the baseline
        while a slow trial was loading (a controller that stopped its heartbeats). And it must be placed as
        asked: its CPU mask and memory policy, and with pages reset a bind policy's pages, read back from /proc."""
        command = self.server_command()
        expected = command.with_config(config) if config is not None else list(command.argv)
        running, cpus, mapped = self.running_state()
        if running != expected:
            self._fail(what, config, f"the unit answers but runs {' '.join(running) or 'nothing'}, not the "
                                     "expected command (was the baseline restored by the dead-man switch?)")
        self.last_applied.update({"cpus_allowed": format_cpu_list(cpus or ()),
                                  **({"model_pages": mapped.to_dict()} if mapped is not None else {})})
        placed = config if config is not None else self._baseline
        if placed is None or self.topology is None:
            return
        problem = placement_problem(placed, policy_nodes(placed, self.topology), mapped, cpus_allowed=cpus,
                                    pages_placed=self._pages_placed_for == page_placement(placed))
        if problem:
            self._fail(what, config, problem)

    def _fail(self, what: str, config: RunConfig | None, reason: str) -> None:
        flags = f" ({' '.join(config.server_args())})" if config is not None else ""
        raise TrialStartFailed(f"{what}{flags} did not come up on {self.describe()}: {reason}\n"
                               f"--- journalctl -u {self.service} -n {JOURNAL_LINES} ---\n{self.journal_tail()}")

    def server_memory_bytes(self) -> int | None:
        out = self._ssh().run(f"pid=$(systemctl show -p MainPID --value {self.service}.service); "
                              "[ \"${pid:-0}\" -gt 0 ] && awk '/^VmRSS:/ {print $2}' /proc/$pid/status",
                              check=False, timeout=30).stdout.strip()
        return int(out) * 1024 if out.isdigit() else None

    def adopt(self, config: RunConfig) -> None:
        """Make ``config`` permanent the Ansible way: it must be in the inventory already (the write-back
        to host_vars), then the role converges the host and restarts the unit with it."""
        variables = read_host_variables(self.inventory, self.facts.name)
        cpus = parse_cpu_list(str(variables.get("llama_server_cpus", "") or ""))
        cores = serving_cores(self.topology, cpus) if self.topology else None
        inventory = RunConfig.from_role_vars(variables, physical_cores=cores).role_vars()
        wanted = config.role_vars()
        differing = {k: (inventory.get(k), v) for k, v in wanted.items() if inventory.get(k) != v}
        if differing:
            detail = "; ".join(f"{k} is {a!r}, the winner has {b!r}" for k, (a, b) in sorted(differing.items()))
            raise UserError(f"the inventory does not hold the winner for {self.facts.name}: {detail}",
                            f"pass --host-vars with the host_vars file of {self.facts.name} in the inventory "
                            f"(e.g. {self.inventory.parent}/host_vars/{self.facts.name}.yml)")
        self._ssh().run(f"rm -f {dropin_path(self.service)}; systemctl daemon-reload")
        converge_host(self.inventory, self.facts.name)
        self.command = self._read_command()
        flags, argv = config.server_args(), list(self.command.argv)
        if not any(argv[i:i + len(flags)] == flags for i in range(len(argv))):
            raise UserError(f"after the converge, {self.describe()} does not run the winner's flags "
                            f"({' '.join(flags)})",
                            "run `ansible-playbook playbooks/verify.yml` against the host to see why")
        self._baseline = config
        self._wait_healthy("the adopted configuration (the role's new unit)", None)

    # -- what the host is ---------------------------------------------------------------------------

    def probe(self) -> HostProbe:
        done = self._ssh().run(f"python3 -c {shlex.quote(PROBE_COLLECTOR)} {shlex.quote(json.dumps(PROBE_GLOBS))}",
                               root=False, timeout=120)
        files = json.loads(done.stdout)
        probe = probe_from_files(files)
        self.topology = probe.topology
        if self._max_memory_fraction is not None:
            self.memory_max_bytes = int(self._max_memory_fraction * probe.memory_total_bytes)
        return probe

    def slice_cpus(self) -> tuple[int, ...] | None:
        """The CPUs the unit's slice may use (its cgroup's effective cpuset; None when the cpuset controller is
        not enabled there, so nothing narrows it)."""
        out = self._ssh().run(
            f"group=$(systemctl show -p ControlGroup --value {self.service}.service); "
            "cat \"/sys/fs/cgroup${group%/*}/cpuset.cpus.effective\" 2>/dev/null || true",
            root=False, check=False, timeout=30).stdout.strip()
        return parse_cpu_list(out) if out else None

    def other_mappers(self) -> list[str]:
        """Processes other than the unit's server that map the model (``pid comm``), from /proc/*/maps as root:
        while one does, dropping the model's pages leaves the pages it maps where they are."""
        files = " ".join(shlex.quote(path) for path in self._model_files())
        out = self._ssh().run(
            f"main=$(systemctl show -p MainPID --value {self.service}.service)\n"
            f"for f in {files}; do grep -lF \"$(readlink -f \"$f\")\" /proc/[0-9]*/maps 2>/dev/null; done | sort -u |\n"
            "while read -r maps; do pid=${maps#/proc/}; pid=${pid%/maps}\n"
            "    [ \"$pid\" = \"$main\" ] || echo \"$pid $(cat /proc/$pid/comm 2>/dev/null)\"\ndone\n",
            check=False, timeout=120).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def numa_blocked(self) -> str | None:
        """Why NUMA settings cannot be searched on this host (None: they can, or there is one node)."""
        if self.topology is None or len(self.topology.nodes) < 2:
            return None
        others = self.other_mappers()
        if not others:
            return None
        return (f"another process maps the model on {self.facts.name} ({', '.join(others[:5])}), so the model's "
                "pages keep the placement it gave them and NUMA trials would measure that instead of their own")

    def model_digest(self, shards: Sequence[str]) -> str:
        """sha256 of the model on the host, combined like :func:`tuner.model.checksum.model_sha256`."""
        out = self._ssh().run("sha256sum " + " ".join(shlex.quote(s) for s in shards), timeout=3600).stdout
        digests = [line.split()[0] for line in out.splitlines() if line.strip()]
        if len(digests) != len(shards):
            raise UserError(f"cannot read the model on {self.facts.name}", "converge the host with site.yml")
        return combined_sha256(digests)

    def binary_identity(self) -> ServerBinary:
        """The llama-server build the unit runs, named on the host as a benchmark result names its build (run as
        the SSH user, not root: the binary is world-executable, and naming it needs no privilege)."""
        binary = self.server_command().argv[0]
        version_command, debug_command = probe_commands(binary, "/nonexistent/llamahost-identify.gguf")
        out = self._ssh().run(f"sha256sum {shlex.quote(binary)}; echo {_IDENTIFY_MARK}; "
                              f"{shlex.join(version_command)} 2>&1; echo {_IDENTIFY_MARK}; "
                              f"{shlex.join(debug_command)} 2>&1; true", root=False, timeout=300).stdout
        digest, version_output, debug_output = (*out.split(_IDENTIFY_MARK + "\n"), "", "")[:3]
        sha = (digest.split() or [""])[0]
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise UserError(f"cannot read the llama-server binary {binary} on {self.facts.name}",
                            "converge the host with site.yml")
        return identity_of(binary, sha, version_output, debug_output)


# ---- the Connection for `tune --live --inventory FILE --host NAME` --------------------------------

def serving_cores(topology: Topology, cpus: Sequence[int]) -> int:
    """Physical cores among ``cpus`` (all cores when not pinned): what the role's ``threads: 0`` means."""
    if not cpus:
        return topology.physical_core_count
    online = set(topology.logical_cpus)
    return max(1, len({topology.cpu(c).core for c in cpus if c in online}))


class RemoteConnection:
    """A host's llama_server unit named by an Ansible inventory (``--inventory FILE --host NAME``)."""

    def __init__(self, options: TargetOptions) -> None:
        if options.inventory is None or not options.host:
            raise UserError("--inventory and --host go together", "pass both, e.g. --inventory inv.yml --host h1")
        if options.baseline_vars:
            raise UserError("--baseline-vars is for --local runs",
                            "with --inventory the host's inventory variables are the baseline: drop it")
        if options.apply and options.host_vars is None:
            raise UserError("--apply on an inventory host needs --host-vars",
                            f"pass the host's host_vars file, e.g. --host-vars "
                            f"{options.inventory.parent}/host_vars/{options.host}.yml, so the role applies the "
                            "winner and keeps it")
        self.options = options
        self.host = options.host
        self.variables = read_host_variables(options.inventory, options.host)
        self.control = SystemdServer(host_facts(options.host, self.variables), inventory=options.inventory,
                                     deadman_s=parse_duration(options.deadman, what="--deadman"),
                                     max_memory_fraction=options.max_server_memory)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        self.control.connect()
        try:
            with self.control.lock():
                yield
        finally:
            self.control.disconnect()

    def _local_model(self) -> Path:
        if self.options.model:
            return self.options.model
        source = str(self.variables.get("llama_server_model_src") or "")
        if not source or "{{" in source:
            raise UserError(f"the controller has no copy of {self.host}'s model to read its metadata from "
                            "(llama_server_model_src is empty or a template)",
                            "pass --model with a local copy of the GGUF file the host serves")
        return Path(source).expanduser()

    def describe(self) -> Target:
        probe = self.control.probe()
        model = inspect_model(self._local_model())
        remote = self.control.server_command().model
        shards = [remote, *(str(Path(remote).parent / f.name) for f in model.files[1:])]
        self.control.model_files = shards
        local_digest = model_sha256(model.files)
        remote_digest = self.control.model_digest(shards)
        if remote_digest != local_digest:
            raise UserError(f"the model {self.host} serves ({remote}, sha256 {remote_digest[:12]}...) is not "
                            f"{model.path} (sha256 {local_digest[:12]}...)",
                            "converge the host with playbooks/site.yml, or pass --model with the file it serves")
        check_fits_in_memory(model, probe.memory_available_bytes + (self.control.server_memory_bytes() or 0))
        cpus = parse_cpu_list(str(self.variables.get("llama_server_cpus", "") or ""))
        deployed = RunConfig.from_role_vars(self.variables, physical_cores=serving_cores(probe.topology, cpus))
        return Target(model, local_digest, probe, deployed, server=self.control.binary_identity(),
                      numa_blocked=self.control.numa_blocked(), usable_cpus=self._usable_cpus(probe))

    def _usable_cpus(self, probe: HostProbe) -> tuple[int, ...] | None:
        """The CPUs a trial may pin: the inventory's ``cpu_inference_cpus`` (the cpu role keeps the others for
        housekeeping and the server role refuses them), within what the unit's slice may use."""
        declared = parse_cpu_list(str(self.variables.get("cpu_inference_cpus") or ""))
        usable = set(probe.topology.logical_cpus)
        for narrower in (declared or None, self.control.slice_cpus()):
            if narrower:
                usable &= set(narrower)
        if not usable:
            raise UserError(f"no online CPU of {self.host} is both an inference CPU ({format_cpu_list(declared)}) "
                            "and usable by the server's slice",
                            "fix cpu_inference_cpus in the inventory and converge the host with site.yml")
        return None if usable == set(probe.topology.logical_cpus) else tuple(sorted(usable))

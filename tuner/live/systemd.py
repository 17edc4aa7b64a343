"""Live tuning of a host's ``llama_server`` systemd unit: :class:`SystemdServer`, the ServerControl for it.

The host was prepared by the ``llama_server`` role: a hardened unit (default ``llama-server.service``). Every step
is a ``sh`` script run as root through a :class:`tuner.live.host_shell.HostShell`: over SSH from a controller
(``--inventory FILE --host NAME``), or on the host itself (``--unit NAME``, what ``playbooks/tune.yml`` runs there).
What the scripts write (a transient drop-in per trial, the heartbeat, the dead-man switch, the lock) is all under
``/run`` and is described in :mod:`tuner.live.unit`; the role's unit file and ``/etc`` are never touched.

Making a proven winner permanent is the role's job: :meth:`SystemdServer.adopt` checks that the winner is
in the inventory (the write-back to host_vars happened) and converges the host with ``playbooks/llama_server.yml
--limit HOST``, which validates, rewrites the unit, restarts it and rolls back if it does not come up. On the host
itself there is no inventory: the controller writes back and rolls out (``playbooks/tune.yml``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tuner.build_knobs import BuildKnobs, knobs_of
from tuner.config import RunConfig, parse_cpu_list
from tuner.cpu_lists import format_cpu_list
from tuner.errors import UserError
from tuner.host_sysfs import Topology
from tuner.inventory import read_host_variables
from tuner.live.control import TrialStartFailed
from tuner.live.host_shell import HostShell, read_line
from tuner.live.remote_probe import PROBE_COLLECTOR, PROBE_GLOBS, probe_from_files
from tuner.live.unit import (
    DEADMAN_SCRIPT,
    DEADMAN_UNIT,
    JOURNAL_LINES,
    STATE_DIR,
    ServerCommand,
    UnitSettings,
    deadman_start_script,
    dropin_path,
    remote_lock_script,
    render_deadman_script,
    render_trial_dropin,
    server_command,
    write_heartbeat_command,
)
from tuner.model.checksum import combined_sha256
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
from tuner.probe.host import HostProbe
from tuner.rollout.converge import converge_host
from tuner.server.client import health
from tuner.server.flags import parse_help
from tuner.server.identity import ServerBinary, identity_of, probe_commands
from tuner.server.process import api_key_from_text

_IDENTIFY_MARK = "--llamahost-identify--"
_STATE_MARK = "--llamahost-state--"
_PAGES_DROPPED = "llamahost-model-pages-dropped"


def serving_cores(topology: Topology, cpus: Sequence[int]) -> int:
    """Physical cores among ``cpus`` (all cores when not pinned): what the role's ``threads: 0`` means."""
    if not cpus:
        return topology.physical_core_count
    online = set(topology.logical_cpus)
    return max(1, len({topology.cpu(c).core for c in cpus if c in online}))


class SystemdServer:
    """ServerControl for a host's llama_server unit (see the module docstring)."""

    def __init__(self, shell: HostShell, settings: UnitSettings, *, inventory: Path | None, deadman_s: float,
                 max_memory_fraction: float | None = None) -> None:
        self.shell = shell
        self.settings = settings
        self.inventory = inventory  # where adopt() converges from; None on the host itself (the controller adopts)
        self.service = settings.service
        self._deadman_s = deadman_s
        self._max_memory_fraction = max_memory_fraction
        self.memory_max_bytes: int | None = None  # a trial's MemoryMax=, from the probe
        self._connected = False
        self.command: ServerCommand | None = None
        self.topology: Topology | None = None
        self._address: tuple[str, int] | None = None  # where this process reaches the server's port
        self._api_key: str | None = None
        self._baseline: RunConfig | None = None
        self._lock: subprocess.Popen[str] | None = None
        self.model_files: list[str] = []  # the model's shards on the host (describe() sets them; else --model's)
        self._pages_placed_for: PlacementKey | None = None  # the placement the model's pages were dropped for
        self.last_applied: dict[str, Any] = {}  # what the last start did and read back (a trial's record)

    # -- connection --------------------------------------------------------------------------------

    def connect(self) -> None:
        """Open the shell (it checks that root may run commands), read the unit's command and reach its port."""
        if self._connected:
            return
        self._connected = True
        try:
            self.shell.open()
            self._inspect_unit()
        except BaseException:
            self.disconnect()
            raise

    def _inspect_unit(self) -> None:
        link = self._shell()
        self.command = self._read_command()
        host, port = self.command.listen
        self._address = link.reach(host, port)
        key_file = self.command.api_key_file
        if key_file:
            text = link.run(f"cat {shlex.quote(key_file)}").stdout
            self._api_key = api_key_from_text(text)

    def _read_command(self) -> ServerCommand:
        link = self._shell()
        unit = shlex.quote(f"{self.service}.service")
        fragment = link.run(f"systemctl show -p FragmentPath --value {unit}").stdout.strip()
        if not fragment:
            raise UserError(f"{self.service}.service does not exist on {self.shell.name}",
                            "prepare the host with playbooks/site.yml (the llama_server role) first")
        if fragment.startswith("/run/"):
            raise UserError(f"{self.service}.service on {self.shell.name} is defined under /run ({fragment})",
                            "live tuning works on the unit the llama_server role installs under /etc")
        return server_command(link.run(f"cat {shlex.quote(fragment)}").stdout)

    def disconnect(self) -> None:
        if self._connected:
            self.shell.close()
            self._connected = False

    def _shell(self) -> HostShell:
        if not self._connected:
            raise RuntimeError("connect() to the host first")
        return self.shell

    def server_command(self) -> ServerCommand:
        if self.command is None:
            raise RuntimeError("connect() to the host first")
        return self.command

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One tuner per host: ``flock`` on the host, held by a shell there open for the whole run.

        A second tuner is refused as soon as its ``flock -n`` answers; a dead tuner's lock goes with its
        shell. On a clean exit the dead-man switch is stopped (the unit runs its baseline or the
        adopted winner); after a failure it is left to do its job."""
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        owner = f"live tune (pid {os.getpid()} on {socket.gethostname()}, since {since})"
        holder = self._shell().popen(remote_lock_script(owner))
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
            raise UserError(f"cannot take the tuning lock on {self.shell.name}: {err.strip()[-500:]}",
                            "the tuner needs root (passwordless sudo) and flock (util-linux) on the host")
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
        if self._address is None:
            raise RuntimeError("connect() to the host first")
        host, port = self._address
        return f"http://{host}:{port}"

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
        return f"{self.service}.service on {self.shell.name}"

    def server_log(self) -> str:
        return f"`journalctl -u {self.service}` on {self.shell.name}"

    def start(self, baseline: RunConfig) -> None:
        """Before tuning: a fresh dead-man switch, no leftover trial, the unit healthy on its own config."""
        self._baseline = baseline
        self._shell().run(f"mkdir -p {STATE_DIR}; systemctl stop {DEADMAN_UNIT} 2>/dev/null || true\n"
                        f"cat > {DEADMAN_SCRIPT}\n", stdin=render_deadman_script(self.service, self._deadman_s))
        self.restore_baseline()
        self._shell().run(deadman_start_script())

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
        out = self._shell().run(script, stdin=text).stdout
        self._pages_reset(config, out)
        self._wait_healthy("the trial configuration", config)

    def restore_baseline(self) -> None:
        path = dropin_path(self.service)
        unit = f"{self.service}.service"
        reset = self._baseline is not None and self._needs_page_reset(self._baseline)
        if reset:  # whether or not a trial ran: the pages were placed for another placement
            out = self._shell().run(f"rm -f {path}; systemctl daemon-reload\n{self._restart_lines(True)}").stdout
        else:
            out = self._shell().run(f"if [ -e {path} ]; then rm -f {path}; systemctl daemon-reload; "
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
        self._shell().run(write_heartbeat_command(), timeout=30)

    def stop_deadman(self) -> None:
        self._shell().run(f"systemctl stop {DEADMAN_UNIT} 2>/dev/null || true", check=False)

    def unit_state(self) -> dict[str, str]:
        out = self._shell().run(f"systemctl show -p ActiveState -p SubState -p MainPID -p NRestarts "
                              f"{self.service}.service", timeout=30).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal_tail(self, lines: int = JOURNAL_LINES) -> str:
        return self._shell().run(f"journalctl -u {self.service}.service -n {lines} --no-pager -o short-iso",
                               check=False).stdout.strip()

    def _wait_healthy(self, what: str, config: RunConfig | None) -> None:
        """Wait for /health 200 through the forward; fail fast when systemd sees the process die."""
        started = time.monotonic()
        deadline = started + self.settings.health_timeout_s
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
                self._fail(what, config, f"/health did not answer 200 within {self.settings.health_timeout_s:.0f} s")
            time.sleep(0.3)

    def running_state(self) -> tuple[list[str], tuple[int, ...] | None, MappedPages | None]:
        """The unit's main process as /proc on the host sees it: its command line, the CPUs it may run on,
        and how it maps the model (memory policy, pages per node). Read as root: numa_maps of another user's
        process is not readable otherwise."""
        files = " ".join(shlex.quote(path) for path in self._model_files())
        out = self._shell().run(
            f"pid=$(systemctl show -p MainPID --value {self.service}.service); [ \"${{pid:-0}}\" -gt 0 ] || exit 0\n"
            f"cat /proc/$pid/cmdline; echo; echo {_STATE_MARK}\n"
            f"cat /proc/$pid/task/*/status 2>/dev/null; echo {_STATE_MARK}\n"
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
        out = self._shell().run(f"pid=$(systemctl show -p MainPID --value {self.service}.service); "
                              "[ \"${pid:-0}\" -gt 0 ] && awk '/^VmRSS:/ {print $2}' /proc/$pid/status",
                              check=False, timeout=30).stdout.strip()
        return int(out) * 1024 if out.isdigit() else None

    def adopt(self, config: RunConfig) -> None:
        """Make ``config`` permanent the Ansible way: it must be in the inventory already (the write-back
        to host_vars), then the role converges the host and restarts the unit with it."""
        if self.inventory is None:
            raise UserError(f"{self.describe()} is tuned on the host itself, which has no inventory to converge from",
                            "let the controller apply the winner: playbooks/tune.yml writes it back and rolls it out")
        variables = read_host_variables(self.inventory, self.shell.name)
        cpus = parse_cpu_list(str(variables.get("llama_server_cpus", "") or ""))
        cores = serving_cores(self.topology, cpus) if self.topology else None
        inventory = RunConfig.from_role_vars(variables, physical_cores=cores).role_vars()
        wanted = config.role_vars()
        differing = {k: (inventory.get(k), v) for k, v in wanted.items() if inventory.get(k) != v}
        if differing:
            detail = "; ".join(f"{k} is {a!r}, the winner has {b!r}" for k, (a, b) in sorted(differing.items()))
            raise UserError(f"the inventory does not hold the winner for {self.shell.name}: {detail}",
                            f"pass --host-vars with the host_vars file of {self.shell.name} in the inventory "
                            f"(e.g. {self.inventory.parent}/host_vars/{self.shell.name}.yml)")
        self._shell().run(f"rm -f {dropin_path(self.service)}; systemctl daemon-reload")
        converge_host(self.inventory, self.shell.name)
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
        done = self._shell().run(f"python3 -c {shlex.quote(PROBE_COLLECTOR)} {shlex.quote(json.dumps(PROBE_GLOBS))}",
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
        out = self._shell().run(
            f"group=$(systemctl show -p ControlGroup --value {self.service}.service); "
            "cat \"/sys/fs/cgroup${group%/*}/cpuset.cpus.effective\" 2>/dev/null || true",
            root=False, check=False, timeout=30).stdout.strip()
        return parse_cpu_list(out) if out else None

    def other_mappers(self) -> list[str]:
        """Processes other than the unit's server that map the model (``pid comm``), from /proc/*/maps as root:
        while one does, dropping the model's pages leaves the pages it maps where they are."""
        files = " ".join(shlex.quote(path) for path in self._model_files())
        out = self._shell().run(
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
        return (f"another process maps the model on {self.shell.name} ({', '.join(others[:5])}), so the model's "
                "pages keep the placement it gave them and NUMA trials would measure that instead of their own")

    def model_digest(self, shards: Sequence[str]) -> str:
        """sha256 of the model on the host, combined like :func:`tuner.model.checksum.model_sha256`."""
        out = self._shell().run("sha256sum " + " ".join(shlex.quote(s) for s in shards), timeout=3600).stdout
        digests = [line.split()[0] for line in out.splitlines() if line.strip()]
        if len(digests) != len(shards):
            raise UserError(f"cannot read the model on {self.shell.name}", "converge the host with site.yml")
        return combined_sha256(digests)

    def binary_knobs(self, identity: ServerBinary) -> BuildKnobs:
        """The build-dependent settings the unit's build offers, from its ``--help`` read on the host."""
        out = self._shell().run(f"{shlex.quote(identity.path)} --help 2>&1; true", root=False, timeout=60).stdout
        return knobs_of(identity.system_info, parse_help(out))

    def binary_identity(self) -> ServerBinary:
        """The llama-server build the unit runs, named on the host as a benchmark result names its build (run as
        the SSH user, not root: the binary is world-executable, and naming it needs no privilege)."""
        binary = self.server_command().argv[0]
        version_command, debug_command = probe_commands(binary, "/nonexistent/llamahost-identify.gguf")
        out = self._shell().run(f"sha256sum {shlex.quote(binary)}; echo {_IDENTIFY_MARK}; "
                              f"{shlex.join(version_command)} 2>&1; echo {_IDENTIFY_MARK}; "
                              f"{shlex.join(debug_command)} 2>&1; true", root=False, timeout=300).stdout
        digest, version_output, debug_output = (*out.split(_IDENTIFY_MARK + "\n"), "", "")[:3]
        sha = (digest.split() or [""])[0]
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise UserError(f"cannot read the llama-server binary {binary} on {self.shell.name}",
                            "converge the host with site.yml")
        return identity_of(binary, sha, version_output, debug_output)

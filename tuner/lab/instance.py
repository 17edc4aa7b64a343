"""One running lab host: start it, find it again, reach it, stop it.

State lives in ``<lab cache>/instances/<name>/``: the qcow2 overlay, QEMU's pid file and logs (the guest
serial console is the boot log), ``state.json``, and what clients need to connect: ``ssh_config``,
``known_hosts`` and ``inventory.yml``. A lab is "running" only when the recorded pid is alive *and* is
the QEMU that owns this lab's overlay, so a stale pid file (or a recycled pid) is never mistaken for it,
and ``down`` never signals a process it did not start.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tuner.atomic import write_atomic
from tuner.errors import UserError
from tuner.lab.access import SshAccess, inventory_text, known_hosts_line, ssh_command, ssh_config_text
from tuner.lab.image import LabImage, ensure_image, images_dir
from tuner.lab.machine import MachineFiles, data_disk_command, overlay_command, qemu_command, saved_data_disk
from tuner.lab.spec import ImageRecipe, MachineSpec

Progress = Callable[[str], None]
DEFAULT_NAME = "default"
# Boot to SSH takes about 1-2 minutes under TCG on an idle 2-core machine; allow for a busy CI machine.
DEFAULT_BOOT_TIMEOUT_S = 900.0
SSH_PROBE_TIMEOUT_S = 10
STOP_TIMEOUT_S = 15.0
# A clean guest shutdown under TCG: seconds to a minute.
DEFAULT_SAVE_TIMEOUT_S = 300.0
PORT_ATTEMPTS = 3
# A boot has hung, with SSH still silent, when its console has printed nothing for this long, or when the
# kernel reports a CPU stuck for this long. Under TCG with more vCPUs than host cores the guest kernel
# can livelock early: once the console went quiet at ~4 s kernel time; once (a landing CI, booting the
# converged disk) CPU#6 stayed stuck in cryptomgr_test while the soft-lockup watchdog printed a line
# every 28 s, so the console never went quiet and the boot used its whole 900 s. Neither reproduced: a
# fresh QEMU boots normally, so ``up`` restarts it, at most BOOT_ATTEMPTS times.
BOOT_STALL_S = 150.0
BOOT_ATTEMPTS = 3
_SOFT_LOCKUP = re.compile(r"soft lockup - CPU#(\d+) stuck for (\d+)s!")


class _BootStalled(Exception):
    """The boot hung before SSH answered: (why, last log lines). Internal: ``up`` retries."""


def longest_lockup(console: str) -> tuple[int, int] | None:
    """(CPU, seconds) of the longest soft lockup the guest kernel reported on its console, if any.

    The watchdog's own measure of a CPU that has not scheduled: the console keeps printing its reports,
    so only this tells a livelocked boot from a slow one."""
    reports = [(int(cpu), int(seconds)) for cpu, seconds in _SOFT_LOCKUP.findall(console)]
    return max(reports, key=lambda report: report[1]) if reports else None


QEMU_TOOLS = ("qemu-system-x86_64", "qemu-img")


@dataclass(frozen=True)
class LabState:
    """What ``up`` recorded about a running lab."""

    name: str
    pid: int
    ssh_port: int
    alias: str
    user: str
    image_key: str
    image_dir: str
    started_at: str
    machine: dict[str, Any]
    image_build_s: float
    boot_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LabInstance:
    def __init__(self, cache: Path, name: str = DEFAULT_NAME) -> None:
        if not name.replace("-", "").replace("_", "").isalnum():
            raise UserError(f"lab name {name!r} may only contain letters, digits, '-' and '_'",
                            "pick a name like 'default' or 'ci-2'")
        self.cache = cache
        self.name = name
        self.directory = cache / "instances" / name

    # ---- files ------------------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.directory / "state.json"

    @property
    def ssh_config(self) -> Path:
        return self.directory / "ssh_config"

    @property
    def inventory(self) -> Path:
        return self.directory / "inventory.yml"

    @property
    def known_hosts(self) -> Path:
        return self.directory / "known_hosts"

    @property
    def data_disk(self) -> Path:
        """The running lab's data disk (a throw-away qcow2, like the root overlay)."""
        return self.directory / "data.qcow2"

    def machine_files(self, image: LabImage) -> MachineFiles:
        return MachineFiles(overlay=self.directory / "overlay.qcow2", data_disk=self.data_disk,
                            bootloader=image.bootloader,
                            serial_log=self.directory / "serial.log", qemu_log=self.directory / "qemu.log",
                            pid_file=self.directory / "qemu.pid")

    # ---- state ------------------------------------------------------------------------------------

    def state(self) -> LabState | None:
        try:
            return LabState(**json.loads(self.state_file.read_text()))
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return None

    def running(self) -> LabState | None:
        """The recorded state when this lab's QEMU is alive, else ``None``."""
        state = self.state()
        if state is None or not _is_our_qemu(state.pid, self.directory / "overlay.qcow2"):
            return None
        return state

    def access(self, state: LabState) -> SshAccess:
        image = LabImage(state.image_key, Path(state.image_dir))
        return SshAccess(alias=state.alias, port=state.ssh_port, user=state.user, identity=image.identity,
                         known_hosts=self.known_hosts)

    def reachable(self, state: LabState) -> bool:
        cmd = ssh_command(self.access(state), ["true"], connect_timeout=SSH_PROBE_TIMEOUT_S)
        try:
            return subprocess.run(cmd, capture_output=True, timeout=SSH_PROBE_TIMEOUT_S + 20,
                                  check=False).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    # ---- lifecycle --------------------------------------------------------------------------------

    def up(self, recipe: ImageRecipe, machine: MachineSpec, *, progress: Progress | None = None,
           boot_timeout: float = DEFAULT_BOOT_TIMEOUT_S, rebuild: bool = False, disk: Path | None = None
           ) -> LabState:
        """Start the lab (building the image first if needed) and wait until SSH answers.

        ``disk``: a disk saved by :meth:`save_disk` to start from instead of the clean image (it stays as it
        is: the lab writes to an overlay on top of it). A lab that is already running is reused as it is:
        ``up`` twice is safe.
        """
        say = progress or (lambda _message: None)
        problems = machine.problems()
        if problems:
            raise UserError("invalid lab machine: " + "; ".join(problems), "fix the options named above")
        if (state := self.running()) is not None:
            say(f"lab {self.name!r} is already running (pid {state.pid}, ssh port {state.ssh_port})")
            return state
        _require_tools(QEMU_TOOLS, "qemu-system-x86 and qemu-utils")
        started = time.monotonic()
        image = ensure_image(recipe, self.cache, progress=say, rebuild=rebuild)
        build_s = round(time.monotonic() - started, 1)
        self.directory.mkdir(parents=True, exist_ok=True)
        files = self.machine_files(image)
        self._clear_runtime_files(files)
        if disk is not None and not disk.is_file():
            raise UserError(f"no saved lab disk at {disk}", "start from the clean image: leave the disk out")
        new_disks = self._disk_commands(machine, files, image, disk)
        for command in new_disks:
            _run_checked(command, "create the lab's disks")
        boot_started = time.monotonic()
        deadline = boot_started + boot_timeout
        for attempt in range(1, BOOT_ATTEMPTS + 1):
            say(f"booting lab {self.name!r} under QEMU/TCG ({machine.cpus} CPUs, {machine.sockets} NUMA nodes, "
                f"{machine.memory_mib} MiB)" + (f", attempt {attempt} of {BOOT_ATTEMPTS}" if attempt > 1 else ""))
            booted = self._boot(machine, files, image, recipe, build_s)
            try:
                self.wait_for_ssh(booted, deadline=deadline)
                break
            except _BootStalled as stalled:
                self.down()
                if attempt == BOOT_ATTEMPTS or time.monotonic() + BOOT_STALL_S > deadline:
                    raise UserError(f"the lab's boot hung {attempt} time(s), the last time {stalled.args[0]}; "
                                    "last console lines:\n    " + "\n    ".join(stalled.args[1]),
                                    f"see {self.directory / 'serial.log'}; on a busy machine raise --boot-timeout"
                                    ) from None
                why, tail = stalled.args
                say(f"the boot hung ({why}, last console line {tail[-1] if tail else 'none'!r}); restarting QEMU")
                self._clear_runtime_files(files)
                for command in new_disks:
                    _run_checked(command, "create the lab's disks")
            except BaseException:
                self.down()
                raise
        state = LabState(**{**booted.to_dict(), "boot_s": round(time.monotonic() - boot_started, 1)})
        write_atomic(self.state_file, json.dumps(state.to_dict(), indent=2) + "\n", keep_previous=False)
        say(f"lab {self.name!r} is up: ssh port {state.ssh_port} on 127.0.0.1, boot took {state.boot_s:.0f} s")
        return state

    def _boot(self, machine: MachineSpec, files: MachineFiles, image: LabImage, recipe: ImageRecipe,
              build_s: float) -> LabState:
        """Start QEMU on the prepared overlay and record the lab's state and client files."""
        pid, port = self._start_qemu(machine, files)
        state = LabState(name=self.name, pid=pid, ssh_port=port, alias=f"llamahost-lab-{self.name}",
                         user=recipe.user, image_key=image.key, image_dir=str(image.directory),
                         started_at=datetime.now(UTC).isoformat(timespec="seconds"),
                         machine=asdict(machine), image_build_s=build_s)
        self._write_client_files(state, image)
        write_atomic(self.state_file, json.dumps(state.to_dict(), indent=2) + "\n", keep_previous=False)
        return state

    def wait_for_ssh(self, state: LabState, *, deadline: float) -> None:
        """Wait until SSH answers; raise ``_BootStalled`` when the console has gone quiet for too long, or the
        kernel reports a CPU stuck for as long."""
        overlay = self.directory / "overlay.qcow2"
        serial = self.directory / "serial.log"
        started = time.monotonic()
        console_size, console_moved = -1, started
        while time.monotonic() < deadline:
            if not _is_our_qemu(state.pid, overlay):
                raise UserError(f"the lab's QEMU (pid {state.pid}) exited during boot:\n    "
                                + "\n    ".join(self.log_tail()),
                                f"see {self.directory / 'qemu.log'} and {self.directory / 'serial.log'}")
            if self.reachable(state):
                return
            size = serial.stat().st_size if serial.exists() else 0
            now = time.monotonic()
            if size != console_size:
                console_size, console_moved = size, now
                lockup = longest_lockup(serial.read_text(errors="replace")) if size else None
                if lockup is not None and lockup[1] >= BOOT_STALL_S:
                    raise _BootStalled(f"CPU#{lockup[0]} stuck for {lockup[1]} s", self.log_tail())
            elif now - console_moved > BOOT_STALL_S:
                raise _BootStalled(f"console quiet for {BOOT_STALL_S:.0f} s", self.log_tail())
            time.sleep(2)
        raise UserError(f"the lab did not answer on SSH within {deadline - started:.0f} s; last boot messages:\n    "
                        + "\n    ".join(self.log_tail()),
                        f"see {self.directory / 'serial.log'}; on a busy machine raise --boot-timeout")

    def save_disk(self, state: LabState, target: Path, *, timeout: float = DEFAULT_SAVE_TIMEOUT_S) -> Path:
        """Power the guest off and keep its disk as ``target`` (a qcow2 on top of the image), so later labs
        can start from this state; the lab is down afterwards.

        The guest shuts down cleanly first: with ``cache=unsafe`` QEMU keeps disk metadata in memory until it
        exits, so a copy of a running lab's overlay could be torn.
        """
        overlay = self.directory / "overlay.qcow2"
        if not _is_our_qemu(state.pid, overlay):
            raise UserError(f"lab {self.name!r} is not running: there is no disk to save", "start it first")
        with contextlib.suppress(subprocess.TimeoutExpired):  # the connection drops as the guest goes down
            subprocess.run(ssh_command(self.access(state), ["sudo systemctl poweroff"], connect_timeout=30),
                           capture_output=True, timeout=60, check=False)
        deadline = time.monotonic() + timeout
        while _is_our_qemu(state.pid, overlay):
            if time.monotonic() > deadline:
                self.down()
                raise UserError(f"the lab did not power off within {timeout:.0f} s; its disk was not saved",
                                f"see {self.directory / 'serial.log'}")
            time.sleep(1)
        target.parent.mkdir(parents=True, exist_ok=True)
        # The data disk first: the root disk's presence is what says a saved lab is complete.
        for source, saved in ((self.data_disk, saved_data_disk(target)), (overlay, target)):
            if not source.is_file():
                saved.unlink(missing_ok=True)
                continue
            staged = saved.with_name(f".{saved.name}.partial")
            shutil.copyfile(source, staged)
            with staged.open("rb+") as handle:
                os.fsync(handle.fileno())
            staged.replace(saved)
        self.down()
        return target

    def down(self) -> bool:
        """Stop the lab and remove its disk overlay. Returns whether a QEMU was running."""
        overlay = self.directory / "overlay.qcow2"
        state = self.state()
        was_running = state is not None and _is_our_qemu(state.pid, overlay)
        if state is not None and was_running:
            _stop(state.pid, overlay)
        for leftover in (overlay, self.data_disk, self.state_file, self.directory / "qemu.pid"):
            leftover.unlink(missing_ok=True)
        return was_running

    def log_tail(self, lines: int = 8) -> list[str]:
        """The last meaningful lines of QEMU's own log and of the guest console."""
        out: list[str] = []
        for name in ("qemu.log", "serial.log"):
            with contextlib.suppress(FileNotFoundError):
                text = (self.directory / name).read_text(errors="replace")
                wanted = [line.strip() for line in text.splitlines()
                          if line.strip() and "TCG doesn't support requested feature" not in line]
                out += [f"{name}: {line}" for line in wanted[-lines:]]
        return out or ["(no log output)"]

    # ---- internals --------------------------------------------------------------------------------

    @staticmethod
    def _disk_commands(machine: MachineSpec, files: MachineFiles, image: LabImage, disk: Path | None
                       ) -> list[list[str]]:
        """The commands that create a boot's disks: the root overlay on the image or on the saved ``disk``, and
        the data disk (blank, or on the saved disk's data disk when it has one)."""
        backing, backing_format = (disk, "qcow2") if disk is not None else (image.disk, "raw")
        commands = [overlay_command(backing, files.overlay, base_format=backing_format)]
        if machine.data_disk_gib:
            saved = saved_data_disk(disk) if disk is not None else None
            commands.append(data_disk_command(files.data_disk, machine.data_disk_gib,
                                              saved=saved if saved is not None and saved.is_file() else None))
        return commands

    def _clear_runtime_files(self, files: MachineFiles) -> None:
        for stale in (files.overlay, files.data_disk, files.pid_file, files.serial_log, files.qemu_log,
                      self.state_file):
            stale.unlink(missing_ok=True)

    def _start_qemu(self, machine: MachineSpec, files: MachineFiles) -> tuple[int, int]:
        last_error = ""
        for _attempt in range(PORT_ATTEMPTS):
            port = _free_loopback_port()
            with files.qemu_log.open("w") as log:
                # -daemonize: the parent returns once the machine is set up, with QEMU's exit status.
                done = subprocess.run(qemu_command(machine, files, ssh_port=port), stdin=subprocess.DEVNULL,
                                      stdout=log, stderr=subprocess.STDOUT, check=False, timeout=120)
            if done.returncode == 0:
                return int(files.pid_file.read_text().strip()), port
            last_error = "\n    ".join(self.log_tail())
            if "hostfwd" not in last_error and "forwarding" not in last_error:
                break  # not a port race: retrying will not help
        raise UserError(f"QEMU could not start the lab:\n    {last_error}",
                        f"see {files.qemu_log}; check that qemu-system-x86 is installed and memory is free")

    def _write_client_files(self, state: LabState, image: LabImage) -> None:
        access = self.access(state)
        write_atomic(self.known_hosts, known_hosts_line(state.alias, image.host_public_key.read_text()),
                     keep_previous=False)
        write_atomic(self.ssh_config, ssh_config_text(access), keep_previous=False)
        write_atomic(self.inventory, inventory_text(access), keep_previous=False)


def list_images(cache: Path) -> list[Path]:
    directory = images_dir(cache)
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if directory.is_dir() else []


def _require_tools(tools: tuple[str, ...], packages: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise UserError(f"the lab needs {', '.join(missing)}",
                        f"install the Debian packages {packages} (.ci/system-deps.sh does)")


def _run_checked(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise UserError(f"could not {what}: {done.stderr.strip() or done.stdout.strip()}",
                        "check free disk space in the lab cache directory")


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _is_our_qemu(pid: int, overlay: Path) -> bool:
    """Whether ``pid`` is alive and is the QEMU that runs ``overlay`` (guards against recycled pids)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(str(overlay).encode() in part for part in cmdline)


def _stop(pid: int, overlay: Path) -> None:
    """SIGTERM (QEMU exits at once; the overlay is thrown away anyway), SIGKILL if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        if not _is_our_qemu(pid, overlay):
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)

"""How a live run reaches the host whose unit it tunes: a shell there, and a port that reaches its server.

Two shells serve :class:`tuner.live.systemd.SystemdServer` alike:

* :class:`tuner.live.ssh.SshLink`, from a controller over one SSH ControlMaster (``--inventory FILE --host NAME``);
* :class:`LocalShell`, on the host itself (``--unit NAME``): what ``playbooks/tune.yml`` starts there as a transient
  systemd unit, so the run needs no connection from the controller once it has started.

Everything the server control does on the host is a ``sh`` script run through one of them, so the unit's drop-ins,
the dead-man switch, the lock and the reads from ``/proc`` are one implementation whichever way the host is reached.
"""

from __future__ import annotations

import os
import select
import subprocess
from typing import Protocol

from tuner.errors import UserError
from tuner.server.process import child_setup


class HostShell(Protocol):
    """A ``sh`` on the host, as root (or as the connecting user with ``root=False``)."""

    @property
    def name(self) -> str:
        """The host as messages name it."""

    def open(self) -> None:
        """Connect, and check that commands may run as root; a clear error when they cannot."""

    def close(self) -> None: ...

    def run(self, script: str, *, stdin: str | None = None, root: bool = True, check: bool = True,
            timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run ``script`` to its end; with ``check`` a non-zero exit is a :class:`UserError`."""

    def popen(self, script: str) -> subprocess.Popen[str]:
        """Start ``script`` as root with pipes; it ends with this process (its stdin closes)."""

    def reach(self, host: str, port: int) -> tuple[str, int]:
        """An address on this machine that reaches ``host:port`` as the host sees it."""


def read_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    """The first line ``proc`` prints, or '' when it prints nothing in time."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    return proc.stdout.readline().strip() if ready else ""


def command_failed(host: str, done: subprocess.CompletedProcess[str], script: str, fix: str) -> UserError:
    return UserError(f"on {host}, a command failed ({done.returncode}): {done.stderr.strip()[-800:]}\n"
                     f"command: {script.strip()[:300]}", fix)


class LocalShell:
    """The machine the tuner runs on, as the host (``tune --live --unit NAME``).

    Root runs the scripts directly; another user through ``sudo -n``, as over SSH."""

    def __init__(self, name: str) -> None:
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    def _argv(self, script: str, root: bool) -> list[str]:
        prefix = ["sudo", "-n"] if root and os.geteuid() != 0 else []
        return [*prefix, "sh", "-c", script]

    def open(self) -> None:
        if os.geteuid() != 0 and self.run("true", check=False).returncode != 0:
            raise UserError(f"this user (uid {os.geteuid()}) cannot use sudo without a password, and a live run on "
                            "the host changes its systemd unit as root",
                            "run it as root (playbooks/tune.yml does, in a transient unit), or give the user "
                            "passwordless sudo")

    def close(self) -> None:
        return None

    def run(self, script: str, *, stdin: str | None = None, root: bool = True, check: bool = True,
            timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(self._argv(script, root), input=stdin if stdin is not None else "",
                              capture_output=True, text=True, check=False, timeout=timeout)
        if check and done.returncode != 0:
            raise command_failed(self._name, done, script, "check the host's systemd and that the tuner runs as root")
        return done

    def popen(self, script: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self._argv(script, True), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=child_setup())  # noqa: PLW1509 (only system calls)

    def reach(self, host: str, port: int) -> tuple[str, int]:
        return host, port

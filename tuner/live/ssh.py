"""The SSH side of live tuning from a controller (``--inventory FILE --host NAME``): the host's connection facts
from the inventory, as Ansible reads them, and one ControlMaster connection that every command and the port
forward to the server ride on (:class:`SshLink`, a :class:`tuner.live.host_shell.HostShell`).

``playbooks/tune.yml`` does not use this path: it runs the tuner on the host (``--unit``, :class:`LocalShell`) over
Ansible's own connection. It stays for a one-off run from a laptop against a host that has no llamahost installed
(docs/live.md says when to use which).
"""

from __future__ import annotations

import contextlib
import shlex
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.errors import UserError
from tuner.live.host_shell import command_failed
from tuner.server.process import child_setup, free_port


@dataclass(frozen=True)
class HostFacts:
    """How to reach one inventory host, as Ansible would (its ``ansible_*`` connection variables)."""

    name: str
    address: str
    port: int | None
    user: str | None
    private_key: str | None
    ssh_args: tuple[str, ...]

    @property
    def needs_sudo(self) -> bool:
        return self.user != "root"


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
                     private_key=str(Path(str(key)).expanduser()) if key else None, ssh_args=tuple(args))


class SshLink:
    """One ControlMaster connection to a host; every command and the port forward ride on it.

    The master and the lock's session die with this process (``PR_SET_PDEATHSIG``), so a killed tuner
    leaves no connection behind to keep its lock alive. (Short commands end on their own, under a timeout.)"""

    def __init__(self, facts: HostFacts) -> None:
        self.facts = facts
        self._control_dir: tempfile.TemporaryDirectory[str] | None = None  # the master's socket and log, per open()
        self._master: subprocess.Popen[bytes] | None = None

    def _control_file(self, name: str) -> Path:
        if self._control_dir is None:
            self._control_dir = tempfile.TemporaryDirectory(prefix="llamahost-ssh-")
        return Path(self._control_dir.name) / name

    @property
    def control_path(self) -> Path:
        return self._control_file("master.sock")

    @property
    def log_path(self) -> Path:
        return self._control_file("master.log")

    @property
    def name(self) -> str:
        return self.facts.name

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
        """Start the master, then check that sudo needs no password (as Ansible's become)."""
        self._connect(timeout_s)
        if self.facts.needs_sudo and self.run("true", check=False).returncode != 0:
            self.close()
            raise UserError(f"user {self.facts.user} on {self.facts.name} cannot use sudo without a password",
                            "give the SSH user passwordless sudo (as Ansible's become needs), or connect as root")

    def _connect(self, timeout_s: float) -> None:
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

    def reach(self, remote_host: str, remote_port: int) -> tuple[str, int]:
        """Forward a free local port to ``remote_host:remote_port`` as seen from the host."""
        local = free_port()
        done = subprocess.run(self._base("-O", "forward", "-L", f"127.0.0.1:{local}:{remote_host}:{remote_port}"),
                              capture_output=True, text=True, check=False, timeout=30)
        if done.returncode != 0:
            raise UserError(f"cannot forward a port to {remote_host}:{remote_port} on {self.facts.name}: "
                            f"{done.stderr.strip()}", "check that sshd allows TCP forwarding (AllowTcpForwarding)")
        return "127.0.0.1", local

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
            raise command_failed(self.facts.name, done, script,
                                 "the SSH user needs passwordless sudo (become); check the host's systemd")
        return done

    def popen(self, script: str) -> subprocess.Popen[str]:
        return subprocess.Popen([*self._base("-o", "ControlMaster=no"), self.remote(script)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=child_setup())  # noqa: PLW1509 (only system calls)

    def close(self) -> None:
        if self._master is not None:
            self._stop_master(self._master)
            self._master = None
        if self._control_dir is not None:
            self._control_dir.cleanup()
            self._control_dir = None

    def _stop_master(self, master: subprocess.Popen[bytes]) -> None:
        subprocess.run(self._base("-O", "exit"), capture_output=True, check=False, timeout=15)
        with contextlib.suppress(subprocess.TimeoutExpired):
            master.wait(timeout=10)
        if master.poll() is None:
            master.kill()
            master.wait()

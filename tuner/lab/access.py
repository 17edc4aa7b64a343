"""How people and Ansible reach a lab host: SSH config, known_hosts and inventory texts (pure).

The host key is recorded when the image is built, so SSH checks it (``StrictHostKeyChecking yes``)
instead of trusting whatever answers on the port. ``HostKeyAlias`` ties the key to the lab's name, not
to ``127.0.0.1:<port>``, which changes from boot to boot.
"""

from __future__ import annotations

import io
import shlex
from dataclasses import dataclass
from pathlib import Path

from ruamel.yaml import YAML

INVENTORY_GROUP = "llama_hosts"  # the group the roles' playbooks target (the Pulumi stack writes it too)


@dataclass(frozen=True)
class SshAccess:
    alias: str
    port: int
    user: str
    identity: Path
    known_hosts: Path


def known_hosts_line(alias: str, host_public_key: str) -> str:
    """``<alias> <type> <key>``: drops the key file's trailing comment (``root@build-host``)."""
    key_type, key_data = host_public_key.split()[:2]
    return f"{alias} {key_type} {key_data}\n"


def ssh_options(access: SshAccess) -> list[str]:
    """Options for ``ssh -o``: used by the ssh config, by Ansible and by the readiness probe alike."""
    return [
        "IdentitiesOnly=yes",
        f"IdentityFile={access.identity}",
        f"UserKnownHostsFile={access.known_hosts}",
        f"HostKeyAlias={access.alias}",
        "StrictHostKeyChecking=yes",
        "BatchMode=yes",
        "LogLevel=ERROR",
        # A guest that reboots under QEMU's user networking never closes its TCP connections: without
        # keepalives an SSH session (Ansible's reboot command among them) waits on it for as long as TCP does.
        "ServerAliveInterval=15",
        "ServerAliveCountMax=8",
    ]


def ssh_command(access: SshAccess, remote: list[str], *, connect_timeout: int | None = None) -> list[str]:
    cmd = ["ssh", "-p", str(access.port)]
    for option in ssh_options(access):
        cmd += ["-o", option]
    if connect_timeout is not None:
        cmd += ["-o", f"ConnectTimeout={connect_timeout}"]
    return [*cmd, f"{access.user}@127.0.0.1", *remote]


def ssh_config_text(access: SshAccess) -> str:
    """A config for ``ssh -F <file> <alias>`` (and for scp/rsync)."""
    lines = [f"Host {access.alias}", "  HostName 127.0.0.1", f"  Port {access.port}", f"  User {access.user}"]
    lines += [f"  {option.replace('=', ' ', 1)}" for option in ssh_options(access)]
    return "\n".join(lines) + "\n"


def inventory_text(access: SshAccess) -> str:
    """An Ansible inventory (YAML) with the lab in the ``llama_hosts`` group."""
    common_args = " ".join(f"-o {shlex.quote(option)}" for option in ssh_options(access)
                           if not option.startswith(("IdentityFile", "BatchMode")))
    host = {
        "ansible_host": "127.0.0.1",
        "ansible_port": access.port,
        "ansible_user": access.user,
        "ansible_ssh_private_key_file": str(access.identity),
        "ansible_ssh_common_args": common_args,
        "ansible_python_interpreter": "/usr/bin/python3",
    }
    inventory = {INVENTORY_GROUP: {"hosts": {access.alias: host}}}
    header = "# Written by `llamahost lab up`; rewritten on every boot (the SSH port changes).\n"
    out = io.StringIO()
    yaml = YAML()
    yaml.width = 4096  # keep the SSH argument string on one line
    yaml.dump(inventory, out)
    return header + out.getvalue()

"""The Ansible inventory as Ansible itself resolves it: hosts, groups and each host's final variables.

llamahost never re-implements Ansible's variable precedence (inventory file < group_vars/all < parent groups
< child groups < host_vars, with plugins and vars files in between): it asks ``ansible-inventory``. That is
what tells whether a value written into ``group_vars/<group>.yml`` is the value a host will really run, and
which model a host serves (``llama_server_model_sha256``).

The layout conventions llamahost relies on are Ansible's: a vars file at ``<inventory>/host_vars/<host>.yml``
belongs to one host, one at ``<inventory>/group_vars/<group>.yml`` to every host of the group.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.errors import UserError

HOST_VARS = "host_vars"
GROUP_VARS = "group_vars"
_VARS_SUFFIXES = (".yml", ".yaml", ".json", "")


def ansible_tool(name: str) -> str:
    """An Ansible command next to this Python (the project's venv) or on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise UserError(f"{name} is not installed", "install the project with its ansible extra: "
                                                     "pip install -e '.[ansible]'")
    return found


def _run_inventory(inventory: Path, args: list[str], *, refused: str, fix: str) -> dict[str, Any]:
    """``ansible-inventory -i INVENTORY ARGS`` as JSON; ``refused``/``fix`` word the error (its detail appended)."""
    if not inventory.exists():
        raise UserError(f"inventory {inventory} does not exist", "pass the inventory file or directory the host is in")
    done = subprocess.run([ansible_tool("ansible-inventory"), "-i", str(inventory), *args],
                          capture_output=True, text=True, check=False, timeout=120)
    if done.returncode != 0 or not done.stdout.strip():
        detail = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no output"
        raise UserError(f"{refused} ({detail})", fix)
    try:
        data = json.loads(done.stdout)
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise UserError(f"ansible-inventory printed no variables for {inventory}", "check the inventory file")
    return data


def read_host_variables(inventory: Path, host: str) -> dict[str, Any]:
    """The host's inventory variables (host_vars, group_vars, connection facts) as Ansible reads them."""
    return _run_inventory(inventory, ["--host", host], refused=f"host {host} is not in the inventory {inventory}",
                          fix=f"list the inventory's hosts with `ansible-inventory -i {inventory} --graph` and "
                              "pass one of them to --host")


@dataclass(frozen=True)
class ResolvedInventory:
    """Every host's final variables and every group's hosts (children included), from one ``--list``."""

    hostvars: dict[str, dict[str, Any]]
    groups: dict[str, tuple[str, ...]]

    @classmethod
    def from_listing(cls, listing: dict[str, Any]) -> ResolvedInventory:
        """Parse ``ansible-inventory --list`` output (pure: the tests feed it by hand)."""
        meta = listing.get("_meta", {}) if isinstance(listing, dict) else {}
        hostvars = {str(h): dict(v) for h, v in (meta.get("hostvars") or {}).items()}

        def members(group: str, seen: frozenset[str]) -> set[str]:
            entry = listing.get(group) or {}
            found = {str(h) for h in entry.get("hosts", [])}
            for child in entry.get("children", []):
                if child not in seen:
                    found |= members(child, seen | {child})
            return found

        names = [k for k in listing if k != "_meta"]
        groups = {name: tuple(sorted(members(name, frozenset({name})))) for name in names}
        every = sorted(set(hostvars) | {h for hosts in groups.values() for h in hosts})
        groups["all"] = tuple(every)
        for host in every:
            hostvars.setdefault(host, {})
        return cls(hostvars=hostvars, groups=groups)

    def targets_of(self, vars_file: Path) -> tuple[str, ...]:
        """The hosts a ``host_vars``/``group_vars`` file applies to (sorted); refuses a file Ansible would not
        read for any host of this inventory."""
        kind, name = vars_file_owner(vars_file)
        if kind == HOST_VARS:
            if name not in self.hostvars:
                raise UserError(f"{vars_file} is the host_vars of {name}, which is not in the inventory",
                                "name the file after a host of the inventory (`ansible-inventory --graph`)")
            return (name,)
        if name not in self.groups or not self.groups[name]:
            raise UserError(f"{vars_file} is the group_vars of {name}, a group with no hosts in the inventory",
                            "name the file after a group of the inventory (`ansible-inventory --graph`)")
        return self.groups[name]


def vars_file_owner(vars_file: Path) -> tuple[str, str]:
    """``(host_vars|group_vars, name)`` for a file in Ansible's layout; refuses any other path."""
    parent = vars_file.parent
    if parent.name in (HOST_VARS, GROUP_VARS):
        directory, name = parent.name, vars_file.name
    elif parent.parent.name in (HOST_VARS, GROUP_VARS):  # host_vars/<host>/<file>.yml
        directory, name = parent.parent.name, parent.name + "/"
    else:
        raise UserError(f"{vars_file} is not in a host_vars/ or group_vars/ directory",
                        "pass inventory/host_vars/<host>.yml or inventory/group_vars/<group>.yml")
    if name.endswith("/"):
        return directory, name[:-1]
    for suffix in _VARS_SUFFIXES:
        if suffix and name.endswith(suffix):
            return directory, name[: -len(suffix)]
    return directory, name


def inventory_of(vars_file: Path) -> Path | None:
    """The inventory directory a vars file sits in (``<inv>/host_vars/h.yml`` -> ``<inv>``), else None."""
    try:
        vars_file_owner(vars_file)
    except UserError:
        return None
    parent = vars_file.parent
    return parent.parent if parent.name in (HOST_VARS, GROUP_VARS) else parent.parent.parent


def resolve_inventory(inventory: Path) -> ResolvedInventory:
    """The inventory as Ansible resolves it (one ``ansible-inventory --list``)."""
    listing = _run_inventory(inventory, ["--list"], refused=f"ansible-inventory could not read {inventory}",
                             fix=f"check it with `ansible-inventory -i {inventory} --graph`")
    return ResolvedInventory.from_listing(listing)


def files_setting(root: Path, key: str, *, besides: Iterable[Path]) -> list[Path]:
    """Files under an inventory directory that set ``key`` (a YAML/INI key at any depth), except ``besides``:
    where to look when another source outranks a written value. A text search on purpose: it names every
    candidate, including files Ansible reads through plugins this module does not model."""
    skip = {p.resolve() for p in besides}
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*[:=]", re.MULTILINE)
    found: list[Path] = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.resolve() in skip or path.name.endswith((".prev", ".tmp")):
            continue
        if path.suffix not in (".yml", ".yaml", ".ini", ".json", "") or path.stat().st_size > 4 << 20:
            continue
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if pattern.search(text) or f'"{key}"' in text:
            found.append(path)
    return found

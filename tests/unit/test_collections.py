"""requirements.yml names exactly the Ansible collections the code uses, and the installed ones satisfy it.

The roles, playbooks, ansible.cfg and the inventories the stack writes name collection content by its fully
qualified name (``ansible.posix.sysctl``, ``amazon.aws.aws_ssm``); a user who installs ansible-core and then
``ansible-galaxy collection install -r requirements.yml`` must get every one of them, and a collection that nothing
uses any more must not stay on that list. The `ansible` extra ships them from PyPI: its versions must lie in the
ranges requirements.yml states, or the ranges are a claim nobody tested.
"""

from __future__ import annotations

import configparser
import json
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
BUILTIN = {"ansible.builtin", "ansible.legacy"}
# This repository is itself a collection (galaxy.yml): its own roles, modules and filters need no requirement.
OWN = "{namespace}.{name}".format(**yaml.safe_load((REPO / "galaxy.yml").read_text()))
FQCN = r"[a-z0-9_]+\.[a-z0-9_]+\.[a-z0-9_]+"
# Where YAML names collection content: a task's module key, an inventory's connection, a filter, a lookup.
YAML_USES = (re.compile(rf"^\s*(?:-\s+)?({FQCN}):", re.MULTILINE),
             re.compile(rf"^\s*ansible_connection:\s*[\"']?({FQCN})", re.MULTILINE),
             re.compile(rf"\|\s*({FQCN})\b"),
             re.compile(rf"\b(?:lookup|query)\(\s*[\"']({FQCN})[\"']"))
# The connection plugin the stack's inventory names for hosts reached over SSM (infra/llamahost_infra/inventory.py).
SSM_CONNECTION = re.compile(rf"^SSM_CONNECTION = \"({FQCN})\"", re.MULTILINE)


def collection_of(name: str) -> str:
    return ".".join(name.split(".")[:2])


def yaml_uses(text: str) -> set[str]:
    """The fully qualified plugin names a YAML file (tasks, playbook, inventory) uses."""
    return {match.group(1) for pattern in YAML_USES for match in pattern.finditer(text)}


def ansible_cfg_uses(text: str) -> set[str]:
    """The callback plugins an ansible.cfg enables by fully qualified name."""
    config = configparser.ConfigParser()
    config.read_string(text)
    defaults = config["defaults"] if config.has_section("defaults") else {}
    names = [n.strip() for key in ("callbacks_enabled", "stdout_callback")
             for n in str(defaults.get(key, "")).split(",")]
    return {n for n in names if re.fullmatch(FQCN, n)}


def collections_used(files: Iterable[Path], ansible_cfg: str, inventory_code: str) -> dict[str, set[str]]:
    """Every non-builtin collection the code uses -> the files (relative to the repository) that use it."""
    used: dict[str, set[str]] = {}
    found = [(path, yaml_uses(path.read_text())) for path in files]
    found.append((REPO / "ansible.cfg", ansible_cfg_uses(ansible_cfg)))
    found.append((REPO / "infra/llamahost_infra/inventory.py", set(SSM_CONNECTION.findall(inventory_code))))
    for path, names in found:
        for name in names:
            if collection_of(name) not in BUILTIN | {OWN}:
                used.setdefault(collection_of(name), set()).add(str(path.relative_to(REPO)))
    return used


def ansible_files() -> list[Path]:
    roots = [REPO / "roles", REPO / "playbooks", REPO / "tests" / "lab" / "playbooks"]
    return sorted(p for root in roots for p in root.rglob("*") if p.suffix in (".yml", ".yaml"))


def requirements() -> dict[str, SpecifierSet]:
    """requirements.yml's collections and their version ranges."""
    listed = yaml.safe_load((REPO / "requirements.yml").read_text())["collections"]
    return {entry["name"]: SpecifierSet(entry["version"]) for entry in listed}


def installed_collections() -> dict[str, Version]:
    """The collections ansible-galaxy finds for this venv's ansible-core; the newest where one is found twice."""
    done = subprocess.run([str(BIN / "ansible-galaxy"), "collection", "list", "--format", "json"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=True)
    found: dict[str, Version] = {}
    for collections in json.loads(done.stdout).values():
        for name, info in collections.items():
            version = Version(info["version"])
            found[name] = max(version, found.get(name, version))
    return found


def test_requirements_name_exactly_the_collections_the_code_uses() -> None:
    used = collections_used(ansible_files(), (REPO / "ansible.cfg").read_text(),
                            (REPO / "infra" / "llamahost_infra" / "inventory.py").read_text())
    assert {"ansible.posix", "amazon.aws"} <= set(used), used  # the scan finds what is known to be there
    listed = requirements()
    missing = {name: sorted(files) for name, files in used.items() if name not in listed}
    assert not missing, f"used but not in requirements.yml: {missing}"
    assert set(listed) <= set(used), f"in requirements.yml but used nowhere: {sorted(set(listed) - set(used))}"


def test_the_installed_collections_lie_in_the_ranges_requirements_yml_states() -> None:
    installed = installed_collections()
    for name, wanted in requirements().items():
        assert name in installed, f"{name} is not installed (pip install '.[ansible]')"
        assert installed[name] in wanted, f"{name} {installed[name]} is outside requirements.yml's {wanted}"


@pytest.mark.parametrize(("text", "expected"), [
    ("- name: x\n  community.general.timezone:\n    name: UTC\n", {"community.general.timezone"}),
    ("all:\n  vars:\n    ansible_connection: community.docker.docker\n", {"community.docker.docker"}),
    ("x: \"{{ addr | ansible.utils.ipaddr('net') }}\"\n", {"ansible.utils.ipaddr"}),
    ("x: \"{{ lookup('community.hashi_vault.hashi_vault', 'k') }}\"\n", {"community.hashi_vault.hashi_vault"}),
    ("- ansible.builtin.copy:\n    src: a.b.c\n", {"ansible.builtin.copy"}),
])
def test_the_scan_finds_a_collection_wherever_yaml_names_one(text: str, expected: set[str]) -> None:
    assert yaml_uses(text) == expected


def test_a_collection_the_code_uses_but_requirements_yml_lacks_is_found() -> None:
    """What the first test would catch: a callback from a collection that requirements.yml does not name."""
    cfg = "[defaults]\ncallbacks_enabled = ansible.posix.profile_tasks, community.general.timer\n"
    used = collections_used([], cfg, 'SSM_CONNECTION = "amazon.aws.aws_ssm"\n')
    assert used == {"ansible.posix": {"ansible.cfg"}, "community.general": {"ansible.cfg"},
                    "amazon.aws": {"infra/llamahost_infra/inventory.py"}}
    assert set(used) - set(requirements()) == {"community.general"}

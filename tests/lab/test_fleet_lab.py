"""The fleet path's edges with a real remote host: the QEMU lab over SSH next to this machine.

tests/fleet/test_fleet_playbook.py runs playbooks/tune_fleet.yml end to end on this machine (two inventory
names, one hardware group). A real search on the emulated host does not fit in CI (one request of the small
model takes minutes under TCG), so this module covers what needs a second, real host:

* "one host and the local machine" in one Ansible group: the lab has no llamahost, so the run stops at
  the check before any worker starts, naming the host and the fix; the group's vars stay untouched;
* the rollout (playbooks/llama_server.yml, what tune_fleet.yml runs after a write-back) stops at the first
  host that fails - here one that does not answer, listed before the lab - and never touches the next.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import yaml
from labkit import BIN, Lab

pytestmark = pytest.mark.lab

GROUP = "cpu_fleet"


def lab_host_vars(lab: Lab) -> dict[str, object]:
    return lab.host_entry()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def inventory_with(lab: Lab, root: Path, groups: dict[str, dict[str, dict[str, object]]]) -> Lab:
    """The lab fixture's inventory (its group_vars and host_vars) with these groups instead of its hosts.yml."""
    root.mkdir()
    for directory in ("group_vars", "host_vars"):
        (root / directory).symlink_to(lab.inventory / directory)
    (root / "hosts.yml").write_text(yaml.safe_dump({"all": {"children": {
        name: {"hosts": hosts} for name, hosts in groups.items()}}}, sort_keys=False))
    return Lab(lab.instance, lab.state, root, lab.timings)


def test_a_group_of_the_lab_and_this_machine_stops_before_any_worker_starts(lab: Lab, tmp_path: Path) -> None:
    this_machine: dict[str, object] = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                                       "tune_llamahost_command": str(BIN / "llamahost")}
    mixed = inventory_with(lab, tmp_path / "inventory", {GROUP: {"controller": this_machine,
                                                                  lab.state.alias: lab_host_vars(lab)}})
    group_vars = lab.inventory / "group_vars" / f"{GROUP}.yml"
    assert not group_vars.exists()
    run = mixed.playbook("playbooks/tune_fleet.yml", "-e", f"tune_group={GROUP}", "-e", "tune_budget=5m",
                         "-e", "tune_storage=postgresql://nobody@127.0.0.1:1/none", "-e", "tune_rollout=false")
    assert run.rc != 0, run.output[-3000:]
    assert f"{lab.state.alias} could not compute its hardware group" in run.output
    assert "Install llamahost on every host of the group" in run.output
    assert "controller could not compute" not in run.output, "this machine has llamahost and computed its group"
    assert "Start the search worker" not in run.output, "no worker may start in a group that was refused"
    assert not group_vars.exists()


def test_the_rollout_stops_at_the_first_host_that_fails(lab: Lab, tmp_path: Path) -> None:
    unit = "/etc/systemd/system/llama-server.service"
    before = lab.ssh(f"stat -c '%Y %s' {unit} 2>/dev/null || echo missing")
    down = {"ansible_host": "127.0.0.1", "ansible_port": closed_port(), "ansible_user": "root",
            "ansible_ssh_common_args": "-o ConnectTimeout=3 -o StrictHostKeyChecking=no"}
    rack = inventory_with(lab, tmp_path / "inventory", {"llama_hosts": {"rack7-down": down,
                                                                         lab.state.alias: lab_host_vars(lab)}})
    run = rack.playbook("playbooks/llama_server.yml", "-e", "llama_server_reach_timeout_s=5")
    assert run.rc != 0
    assert "rack7-down" in run.output and "timed out waiting for ping module test" in run.output
    recap = run.output[run.output.rindex("PLAY RECAP"):]
    assert lab.state.alias not in recap, "the host after the failed one must not be touched"
    assert lab.ssh(f"stat -c '%Y %s' {unit} 2>/dev/null || echo missing") == before

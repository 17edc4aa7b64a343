"""The canary rollout on a real host over SSH: a winner that makes the host slower is caught on the canary,
reverted there, and never reaches the next host.

The lab serves the tiny generated model with the configuration the tuner would have deployed (``TUNED``). Here
that configuration moves into the group's vars (no host_vars: a group winner must be the one Ansible resolves),
and the "winner" written over it is deliberately slower: a micro-batch of one token, so every prompt is
processed token by token, a slowdown no emulation noise can hide on a workload of long prompts (the batch is 2,
the least llama-server starts with: RunConfig.least_batch_size). The group has two inventory names for the lab,
so the rollout has a next host to stop before.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from labkit import API_KEY, BIN, REPO, TUNED, Lab, probe

from tuner.writeback import write_vars

pytestmark = [pytest.mark.lab, pytest.mark.timeout(2400)]

SLOWER = {"llama_server_batch_size": 2, "llama_server_ubatch_size": 1}


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def serves_tuned(host: dict[str, Any]) -> bool:
    """The lab's server (read by guest_probe) runs TUNED's batch sizes."""
    args = host["server_cmdline"]
    return "--batch-size" in args and (flag(args, "--batch-size"), flag(args, "--ubatch-size")) == (
        str(TUNED.batch_size), str(TUNED.ubatch_size))


def rack_of_two(lab: Lab, root: Path) -> tuple[Path, str]:
    """An inventory at ``root`` naming the lab twice (the lab first: it is the canary), the lab's group vars
    with TUNED in them, and no host_vars; (the group's vars file, the twin's name)."""
    alias = lab.state.alias
    twin = f"{alias}-twin"  # sorts after the lab
    connection = lab.host_entry()  # the stack's host variables and the connection
    (root / "group_vars").mkdir(parents=True)
    (root / "hosts.yml").write_text(yaml.safe_dump({"all": {"children": {"llama_hosts": {"hosts": {
        alias: connection, twin: connection}}}}}))
    group_vars = root / "group_vars" / "llama_hosts.yml"
    deployed = {**yaml.safe_load((lab.inventory / "group_vars" / "llama_hosts.yml").read_text()),
                **TUNED.role_vars()}
    group_vars.write_text("---\n# the lab rack, as deployed\n" + yaml.safe_dump(deployed))
    return group_vars, twin


def test_a_slower_canary_is_reverted_and_the_rollout_stops_before_the_next_host(lab: Lab, tmp_path: Path) -> None:
    alias = lab.state.alias
    root = tmp_path / "inventory"
    group_vars, twin = rack_of_two(lab, root)
    assert serves_tuned(probe(lab)), "the lab serves TUNED"

    write_vars(group_vars, SLOWER, note="a deliberately slower 'winner'")  # what write-back does: .prev kept
    before_write = (root / "group_vars" / "llama_hosts.yml.prev").read_bytes()
    try:
        done = subprocess.run(
            [str(BIN / "llamahost"), "rollout", "-i", str(root / "hosts.yml"), "--vars", str(group_vars), "--json",
             "--workload", "batch", "--prompt-scale", "0.1", "--requests", "4", "--concurrency", "2",
             "--windows", "3", "--warmup", "1"], cwd=REPO, capture_output=True, text=True, timeout=2400, check=False)
        print(done.stderr)  # the rollout's own account, in the test's output when it fails
        assert API_KEY not in done.stdout + done.stderr
        assert done.returncode == 1, f"exit {done.returncode}, not 1: the rollout did not end in a revert"

        report = json.loads(done.stdout)
        print(f"canary: {json.dumps(report['verdict'])}")
        assert report["canary"] == alias and report["hosts"] == [alias, twin]
        assert report["reverted"] and report["applied"] == [], "the next host was never touched"
        assert report["verdict"]["ratio"] < 0.95 and not report["verdict"]["passed"]
        assert report["verdict"]["before"]["errors"] == 0, "the canary authenticated with the key read on the host"
        assert f"canary {alias} failed" in done.stderr and "no other host was touched" in done.stderr

        assert group_vars.read_bytes() == before_write, "the group's vars were put back byte for byte"
        host = probe(lab)
        assert serves_tuned(host), f"the canary runs the previous settings again: {host['server_cmdline']}"
        assert host["health"]["status"] == 200, "the reverted canary serves again"
    finally:  # the lab as the other lab tests know it, when the rollout left it otherwise
        if not serves_tuned(probe(lab)):
            back = lab.playbook("playbooks/llama_server.yml", "--limit", alias, stage="canary: back to TUNED")
            assert back.rc == 0, back.output[-3000:]


"""The roles on a real kernel: converge, read the live host back, converge again, check mode, bad input,
rollback, drift, reboot. The tests run in this order and share one lab (see conftest.py).

Everything is read back from the live kernel and systemd on the lab (guest_probe.py), never from the
roles' own files. Nothing here asserts speed: the lab is emulated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from labkit import API_KEY, GROUP_VARS, TUNED, Lab, PlaybookRun

from tuner.config import parse_cpu_list

# A fresh machine builds the image and boots the lab inside the first test's fixtures; under emulation
# a converge takes minutes, so each test gets more than the suite's default 15 minutes.
pytestmark = [pytest.mark.lab, pytest.mark.timeout(2400)]

PROBE = (Path(__file__).parent / "guest_probe.py").read_text()
SITE = "playbooks/site.yml"
VERIFY = "playbooks/verify.yml"


def probe(lab: Lab) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(lab.ssh("sudo python3 -", stdin=PROBE))
    return data


def cpus(text: str) -> tuple[int, ...]:
    """CPU sets as systemd (``4 6``) or the kernel (``4,6``) print them."""
    return parse_cpu_list(",".join(text.split()))


def tail(run: PlaybookRun, lines: int = 60) -> str:
    return "\n".join(run.output.splitlines()[-lines:])


def assert_host_matches_variables(state: dict[str, Any]) -> None:
    """The live host is what GROUP_VARS and the tuned host_vars (TUNED) ask for."""
    assert state["thp_enabled"] == GROUP_VARS["hugepages_thp_enabled"]
    assert state["thp_defrag"] == GROUP_VARS["hugepages_thp_defrag"]
    assert {node: pages["2m"] for node, pages in state["nodes"].items()} == {"0": 16, "1": 16}
    assert state["numa_balancing"] == "0"
    assert state["zone_reclaim_mode"] == "1"
    # SMT off: one thread per core online, housekeeping on CPU 0 (PID 1 included).
    assert (state["smt_control"], state["smt_active"]) == ("off", "0")
    assert cpus(state["online_cpus"]) == (0, 2, 4, 6)
    assert cpus(state["pid1_cpus"]) == (0,)
    mounts = {path: (fstype, options) for path, fstype, options in state["hugetlbfs"]}
    assert "/mnt/huge-2m" in mounts and "pagesize=2M" in mounts["/mnt/huge-2m"][1]
    assert "mode=1770" in mounts["/mnt/huge-2m"][1]
    # The server: pinned, bound to node 1's memory, locked in memory, unprivileged, in its own slice.
    unit = state["unit"]
    assert unit["ActiveState"] == "active"
    assert (unit["User"], unit["Slice"]) == ("llama-server", "llama-server.slice")
    assert cpus(unit["CPUAffinity"]) == TUNED.cpus == cpus(unit["AllowedCPUs"])
    assert cpus(state["server_cpus"]) == TUNED.cpus
    assert (unit["NUMAPolicy"], unit["NUMAMask"]) == ("bind", "1")
    assert unit["LimitMEMLOCK"] == "infinity"
    assert int(state["server_vmlck_kb"].split()[0]) > 50_000  # the ~98 MB model is really locked
    assert state["server_uid"] != ["0"]
    assert (unit["NoNewPrivileges"], unit["ProtectSystem"]) == ("yes", "strict")
    assert state["health"]["status"] == 200 and "ok" in state["health"]["body"]
    # The exact tuned command line, as RunConfig renders it, plus the key *file* (never the key).
    argv = state["server_cmdline"]
    expected = TUNED.server_args()
    assert any(argv[i:i + len(expected)] == expected for i in range(len(argv))), argv
    assert "--api-key-file" in argv and API_KEY not in state["ps"]
    assert state["api_key_file"] == {"mode": "0o640", "uid": 0, "gid": state["api_key_file"]["gid"]}
    facts = state["facts"]
    assert [node["cpus"] for node in facts["nodes"]] == [[0, 2], [4, 6]]
    assert facts["physical_cores"] == 4 and facts["smt_control"] == "off" and facts["sockets"] == 2


@pytest.fixture(scope="module")
def converged(lab: Lab) -> PlaybookRun:
    run = lab.playbook(SITE, "--diff", stage="converge site.yml")
    assert run.rc == 0 and run.failed == 0, tail(run)
    return run


def test_site_converges_the_host(converged: PlaybookRun) -> None:
    assert converged.recap["unreachable"] == 0


def test_live_host_matches_the_variables(lab: Lab, converged: PlaybookRun) -> None:
    state = probe(lab)
    assert_host_matches_variables(state)
    booted_with_pages = "hugepagesz=1G hugepages=0:1,1:1" in state["cmdline"]
    verify = lab.playbook(VERIFY, stage="verify.yml before the reboot")
    if booted_with_pages:  # a reused lab that has been rebooted before
        assert verify.rc == 0, tail(verify)
    else:  # 1 GiB pages wait for the reboot the roles were not allowed to do
        assert verify.rc != 0 and "1 GiB pages" in verify.output and "hugepages_reboot_ok" in verify.output


def test_second_converge_changes_nothing(lab: Lab, converged: PlaybookRun) -> None:
    run = lab.playbook(SITE, stage="converge again (idempotence)")
    assert run.rc == 0 and run.changed == 0, tail(run)


def test_check_mode_on_the_converged_host_reports_no_changes(lab: Lab, converged: PlaybookRun) -> None:
    run = lab.playbook(SITE, "--check", "--diff", stage="--check --diff")
    assert run.rc == 0 and run.changed == 0, tail(run)
    assert "+++ after" not in run.output


BAD_INPUTS = [
    pytest.param({"hugepages_2m_per_node": {"0": 100000, "1": 16}}, ["hugepages_2m_per_node", "node 0"],
                 id="more-hugepages-than-memory"),
    pytest.param({"llama_server_cpus": "4,x"}, ["llama_server_cpus", "malformed"], id="malformed-cpu-list"),
    pytest.param({"llama_server_cpus": "", "llama_server_threads": 5}, ["llama_server_threads", "cpu_smt: off"],
                 id="smt-off-more-threads-than-cores"),
    pytest.param({"llama_server_model_sha256": "0" * 64}, ["llama_server_model_sha256", "does not match"],
                 id="model-checksum-mismatch"),
]


@pytest.mark.parametrize(("bad_vars", "named"), BAD_INPUTS)
def test_bad_variables_fail_in_validation_before_any_change(lab: Lab, converged: PlaybookRun,
                                                            bad_vars: dict[str, Any], named: list[str],
                                                            request: pytest.FixtureRequest) -> None:
    before = probe(lab)
    run = lab.playbook(SITE, extra_vars=bad_vars, stage=f"bad input: {request.node.callspec.id}")
    after = probe(lab)
    assert run.rc != 0 and run.failed == 1 and run.changed == 0, tail(run)
    failure = next(line for line in run.output.splitlines() if line.startswith(("fatal:", "failed:")))
    assert all(name in failure for name in named), failure
    assert "PLAY [Prepare llama.cpp inference hosts]" not in run.output  # stopped in the validation play
    assert after["files"] == before["files"]
    for key in ("thp_enabled", "nodes", "smt_control", "online_cpus", "numa_balancing", "boot_id"):
        assert after[key] == before[key], key
    assert after["unit"]["ActiveEnterTimestampMonotonic"] == before["unit"]["ActiveEnterTimestampMonotonic"]


def test_a_server_that_does_not_come_up_is_rolled_back(lab: Lab, converged: PlaybookRun) -> None:
    before = probe(lab)
    run = lab.playbook("tests/lab/playbooks/llama_server_only.yml", stage="rollback of an unhealthy unit",
                       extra_vars={"llama_server_extra_args": ["--no-such-flag"]})
    after = probe(lab)
    assert run.rc != 0 and run.recap["rescued"] == 1, tail(run)
    assert "did not come up healthy" in run.output and "previous unit was restored" in run.output
    assert after["files"]["/etc/systemd/system/llama-server.service"] == \
        before["files"]["/etc/systemd/system/llama-server.service"]
    assert after["health"]["status"] == 200 and "--no-such-flag" not in after["server_cmdline"]
    assert after["unit"]["ActiveEnterTimestampMonotonic"] != before["unit"]["ActiveEnterTimestampMonotonic"]


def test_verify_playbook_reports_drift_by_variable(lab: Lab, converged: PlaybookRun) -> None:
    lab.ssh("echo always | sudo tee /sys/kernel/mm/transparent_hugepage/enabled")
    run = lab.playbook(VERIFY, stage="verify.yml with drift")
    assert run.rc != 0 and run.changed == 0
    assert "THP enabled is always, hugepages_thp_enabled wants madvise" in run.output
    assert probe(lab)["thp_enabled"] == "always"  # verify.yml reports, it does not fix


def test_everything_persists_across_a_reboot(lab: Lab, converged: PlaybookRun) -> None:
    boot_before = probe(lab)["boot_id"]
    run = lab.playbook("tests/lab/playbooks/reboot_via_hugepages.yml",
                       stage="hugepages role with hugepages_reboot_ok (fixes drift, reboots)")
    assert run.rc == 0, tail(run)
    if probe(lab)["boot_id"] == boot_before:  # a reused lab already had its 1 GiB pages: reboot anyway
        assert lab.playbook("tests/lab/playbooks/reboot.yml", stage="plain reboot").rc == 0
    state = probe(lab)
    assert state["boot_id"] != boot_before
    assert_host_matches_variables(state)
    assert "nosmt" in state["cmdline"] and "hugepagesz=1G hugepages=0:1,1:1" in state["cmdline"]
    assert state["pdpe1gb"], "the emulated CPU must offer 1 GiB pages (pdpe1gb)"
    assert {node: pages["1g"] for node, pages in state["nodes"].items()} == {"0": 1, "1": 1}
    verify = lab.playbook(VERIFY, stage="verify.yml after the reboot")
    assert verify.rc == 0, tail(verify)

"""The roles on a real kernel: converge, converge again, read the live host back, drift, check mode and bad
input, rollback, reboot. The tests run in this order and share one lab (see conftest.py).

Everything is read back from the live kernel and systemd on the lab (guest_probe.py), never from the
roles' own files. Nothing here asserts speed: the lab is emulated.

Under TCG every module an Ansible task runs on the guest costs seconds, so a playbook run costs minutes. Each
run proves as much as it can: the two converges of the clean image are kept with the converged disk they leave
(conftest.py), so a session with unchanged inputs starts from that disk; one verify.yml run reports both a drift
made by hand and the 1 GiB pages still waiting for a reboot; one --check run covers the converged host and
seven bad inputs (eight inventory names for the one lab); verify.yml after the reboot proves it kept everything.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from labkit import API_KEY, GROUP_VARS, RECAP, STACK_PORT, TUNED, Lab, PlaybookRun, probe

from tuner.config import parse_cpu_list
from tuner.lab.machine import GUEST_ADDRESS
from tuner.lab.spec import LAB_KERNEL_ARGS
from tuner.model.checksum import cached_sha256, sha256_of
from tuner.model.gguf_file import inspect_model
from tuner.server.identity import identify

# A fresh machine builds the image and boots the lab inside the first test's fixtures; under emulation
# a converge takes minutes, so each test gets more than the suite's default 15 minutes.
pytestmark = [pytest.mark.lab, pytest.mark.timeout(2400)]

SITE = "playbooks/site.yml"
VERIFY = "playbooks/verify.yml"


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
    assert int(state["server_vmlck_kb"].split()[0]) > 6_000  # the 8 MB model is really locked
    assert state["server_uid"] != ["0"]
    assert (unit["NoNewPrivileges"], unit["ProtectSystem"]) == ("yes", "strict")
    assert state["health"]["status"] == 200 and "ok" in state["health"]["body"]
    # The exact tuned command line, as RunConfig renders it, plus the key *file* (never the key).
    argv = state["server_cmdline"]
    expected = TUNED.server_args()
    assert any(argv[i:i + len(expected)] == expected for i in range(len(argv))), argv
    assert "--api-key-file" in argv and API_KEY not in state["ps"]
    # The tuned environment (Environment= in the unit), read back from the process.
    assert state["server_environ"] == [f"{k}={v}" for k, v in TUNED.server_environment().items()] != []
    assert state["api_key_file"] == {"mode": "0o640", "uid": 0, "gid": state["api_key_file"]["gid"]}
    facts = state["facts"]
    assert [node["cpus"] for node in facts["nodes"]] == [[0, 2], [4, 6]]
    assert facts["physical_cores"] == 4 and facts["smt_control"] == "off" and facts["sockets"] == 2


@pytest.fixture(scope="module")
def converge_twice(lab: Lab) -> tuple[PlaybookRun, PlaybookRun]:
    """site.yml on the clean image, then again; or, when the lab booted from the disk those two runs left with
    these very inputs (conftest.py), the two recorded runs."""
    saved = lab.saved_converge()
    if saved is not None:
        lab.timings["converge site.yml twice (recorded with the converged disk)"] = saved[0].seconds + saved[1].seconds
        return saved
    converge = lab.playbook(SITE, "--diff", stage="converge site.yml")
    assert converge.rc == 0 and converge.failed == 0, tail(converge)
    again = lab.playbook(SITE, stage="converge again (idempotence)")
    lab.keep_converged_disk(converge, again)
    return converge, again


@pytest.fixture(scope="module")
def converged(converge_twice: tuple[PlaybookRun, PlaybookRun]) -> PlaybookRun:
    return converge_twice[0]


def test_site_converges_the_host(converged: PlaybookRun) -> None:
    assert converged.recap["unreachable"] == 0 and converged.changed > 0


def test_a_second_converge_changes_nothing(converge_twice: tuple[PlaybookRun, PlaybookRun]) -> None:
    again = converge_twice[1]
    assert again.rc == 0 and again.changed == 0, tail(again)


def test_live_host_matches_the_variables(lab: Lab, converged: PlaybookRun) -> None:
    assert_host_matches_variables(probe(lab))


# Run on the lab as its login user: a completion with the key, one without it, and one on loopback. The key comes
# on standard input (never on a command line).
REQUESTS = """
import json, sys, urllib.error, urllib.request
key, address, port = sys.stdin.readline().strip(), sys.argv[1], sys.argv[2]
def post(host, headers):
    body = json.dumps({"prompt": "Memory bandwidth", "n_predict": 4}).encode()
    request = urllib.request.Request(f"http://{host}:{port}/completion", body, headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return [response.status, json.load(response).get("content", None) is not None]
    except urllib.error.HTTPError as exc:
        return [exc.code, False]
    except OSError as exc:  # urllib's URLError carries the socket's error as its reason
        return [type(getattr(exc, "reason", exc)).__name__, False]
print(json.dumps({"with_key": post(address, {"Authorization": "Bearer " + key, "Content-Type": "application/json"}),
                  "without_key": post(address, {"Content-Type": "application/json"}),
                  "loopback": post("127.0.0.1", {"Authorization": "Bearer " + key})}))
"""


def test_the_stack_s_host_serves_its_split_model_from_the_data_volume_on_the_stack_s_port_with_a_key(
        lab: Lab, converged: PlaybookRun) -> None:
    """From `pulumi up` to a serving host (issue 12), end to end: the lab's hosts.yml is the inventory that
    infra/write_inventory.py writes from the real Pulumi program's outputs (under the infra tests' mocks, the lab's
    address for the instance's private IP), the stack's user data ran at first boot (its data-volume script
    formatted and mounted the lab's blank NVMe disk), and site.yml converged it with nothing else about the stack
    typed by hand. The server serves the split model from the data volume, on the stack's port, on the private
    address the stack opens to clients (not loopback), and a request without the key is refused."""
    stack = lab.host_entry()
    state = probe(lab)
    assert state["served_at"] == [stack["llama_server_host"], stack["llama_server_port"]] == [GUEST_ADDRESS,
                                                                                              STACK_PORT]
    volume = state["model_filesystem"]
    assert (volume["target"], volume["fstype"], volume["label"]) == (stack["llama_server_model_dir"], "ext4",
                                                                     "llamahost-models"), volume
    assert volume["source"].startswith("/dev/nvme"), volume  # the data disk, not the root disk
    served = state["server_cmdline"][state["server_cmdline"].index("--model") + 1]
    assert served.endswith("-00001-of-00002.gguf"), served  # the unit names the first shard
    on_host = {path: digest for digest, path in (line.split() for line in lab.ssh(
        f"sudo sh -c 'sha256sum {Path(served).parent}/*.gguf'").splitlines())}
    wanted = yaml.safe_load((lab.inventory / "group_vars" / "llama_hosts.yml").read_text())
    assert sorted(on_host.values()) == sorted(wanted["llama_server_model_sha256"]), on_host  # every shard, pinned
    answers = json.loads(lab.ssh(f"python3 -c {shlex.quote(REQUESTS)} {GUEST_ADDRESS} {STACK_PORT}",
                                 stdin=f"{API_KEY}\n", timeout=600))
    assert answers == {"with_key": [200, True], "without_key": [401, False],
                       "loopback": ["ConnectionRefusedError", False]}, answers


def test_verify_reports_drift_by_variable_and_the_pages_that_wait_for_a_reboot(lab: Lab,
                                                                               converged: PlaybookRun) -> None:
    booted_with_pages = "hugepagesz=1G hugepages=0:1,1:1" in probe(lab)["cmdline"]
    lab.ssh("echo always | sudo tee /sys/kernel/mm/transparent_hugepage/enabled")
    run = lab.playbook(VERIFY, stage="verify.yml with drift, before the reboot")
    assert run.rc != 0 and run.changed == 0, tail(run)
    assert "THP enabled is always, hugepages_thp_enabled wants madvise" in run.output
    if not booted_with_pages:  # 1 GiB pages wait for the reboot the roles were not allowed to do
        assert "1 GiB pages" in run.output and "hugepages_reboot_ok" in run.output
    assert probe(lab)["thp_enabled"] == "always"  # verify.yml reports, it does not fix


BAD_INPUTS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "more-hugepages-than-memory": ({"hugepages_2m_per_node": {"0": 100000, "1": 16}},
                                   ["hugepages_2m_per_node", "node 0"]),
    "malformed-cpu-list": ({"llama_server_cpus": "4,x"}, ["llama_server_cpus", "malformed"]),
    "smt-off-more-threads-than-cores": ({"llama_server_cpus": "", "llama_server_threads": 5},
                                        ["llama_server_threads", "cpu_smt: off"]),
    "model-checksum-mismatch": ({"llama_server_model_sha256": ["0" * 64] * 2}, ["llama_server_model_sha256",
                                                                                  "does not match"]),
    "open-bind-without-key": ({"llama_server_host": "0.0.0.0", "llama_server_api_key": "",
                               "llama_server_api_key_generate": False},
                              ["llama_server_host 0.0.0.0 is not loopback", "llama_server_api_key_generate"]),
    "batch-below-the-slots": ({"llama_server_batch_size": 2, "llama_server_ubatch_size": 2,
                               "llama_server_parallel": 4},
                              ["llama_server_batch_size (2)", "at least the slots (llama_server_parallel 4"]),
}


def failure_of(output: str, host: str) -> str:
    """The first failure Ansible printed for ``host`` (``fatal: [host]``, or ``[host -> localhost]`` for a check
    run on the controller): that line and the indented lines under it."""
    lines = output.splitlines()
    failed = re.compile(rf"^(fatal|failed): \[{re.escape(host)}( -> [^\]]+)?\]")
    start = next((i for i, line in enumerate(lines) if failed.match(line)), None)
    assert start is not None, f"no failure printed for {host}:\n" + "\n".join(lines[-80:])
    end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace()), len(lines))
    return "\n".join(lines[start:end])


def test_check_mode_changes_nothing_and_bad_variables_fail_in_validation(lab: Lab, converged: PlaybookRun,
                                                                         tmp_path: Path) -> None:
    """One ``site.yml --check --diff`` run over eight inventory names for the one lab: the good one reports no
    change on the converged host; each bad one fails in the validation play, naming its variables."""
    good = "good-vars"
    connection = lab.host_entry()  # the stack's host variables and the connection
    # A split model whose second shard is missing: its first shard alone in a directory of its own.
    group_vars = yaml.safe_load((lab.inventory / "group_vars" / "llama_hosts.yml").read_text())
    served = Path(group_vars["llama_server_model_src"])
    lonely = tmp_path / "lonely" / served.name
    lonely.parent.mkdir()
    shutil.copyfile(served, lonely)
    missing = served.name.replace("-00001-of-", "-00002-of-")
    bad_inputs = {**BAD_INPUTS, "missing-shard": ({"llama_server_model_src": str(lonely)},
                                                  ["shard 2 of 2 is missing", missing])}
    inventory = tmp_path / "inventory"
    (inventory / "host_vars").mkdir(parents=True)
    (inventory / "group_vars").symlink_to(lab.inventory / "group_vars")
    (inventory / "hosts.yml").write_text(yaml.safe_dump({"llama_hosts": {"hosts": {
        name: connection for name in (good, *bad_inputs)}}}))
    (inventory / "host_vars" / f"{good}.yml").write_text(yaml.safe_dump(TUNED.role_vars()))
    for name, (bad_vars, _) in bad_inputs.items():
        (inventory / "host_vars" / f"{name}.yml").write_text(yaml.safe_dump({**TUNED.role_vars(), **bad_vars}))
    lab.ssh("echo madvise | sudo tee /sys/kernel/mm/transparent_hugepage/enabled")  # the drift made above
    before = probe(lab)
    run = Lab(lab.instance, lab.state, inventory, lab.timings).playbook(
        SITE, "--check", "--diff", stage="--check --diff, with seven bad inputs beside the good host")
    after = probe(lab)
    recaps = {match["host"]: match for match in RECAP.finditer(run.output)}
    assert run.rc != 0 and sorted(recaps) == sorted([good, *bad_inputs]), tail(run)
    assert (recaps[good]["failed"], recaps[good]["changed"]) == ("0", "0"), tail(run)
    assert "+++ after" not in run.output  # no diff: the bad names stop before any task that could change
    for name, (_, named) in bad_inputs.items():
        assert (recaps[name]["failed"], recaps[name]["changed"]) == ("1", "0"), (name, tail(run))
        failure = failure_of(run.output, name)
        assert all(word in failure for word in named), (name, failure)
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


def test_a_build_that_crashes_at_start_is_rolled_back_to_the_previous_build(lab: Lab, converged: PlaybookRun,
                                                                            tmp_path: Path) -> None:
    """Only the binary changes, the settings stay: the unit names the new build by its sha256, that build does
    not come up, and the restored unit runs the previous build again, still on disk. bin/llama-server still
    points at the build that serves; the crashing one is kept (pruning waits for a build that serves)."""
    crashing = tmp_path / "llama-server"
    crashing.write_text("#!/bin/sh\necho 'a build that crashes at start' >&2\nexit 1\n")
    crashing.chmod(0o755)
    crashing_path = f"/opt/llama-server/builds/llama-server-{hashlib.sha256(crashing.read_bytes()).hexdigest()}"
    before = probe(lab)
    serving = before["server_cmdline"][0]
    assert serving.startswith("/opt/llama-server/builds/llama-server-"), before["server_cmdline"]
    run = lab.playbook("tests/lab/playbooks/llama_server_only.yml", stage="rollback of a build that crashes",
                       extra_vars={"llama_server_binary_src": str(crashing)})
    after = probe(lab)
    assert run.rc != 0 and run.recap["rescued"] == 1, tail(run)
    assert "did not come up healthy" in run.output and "previous unit was restored" in run.output
    assert after["health"]["status"] == 200 and after["server_cmdline"][0] == serving
    assert lab.ssh("readlink /opt/llama-server/bin/llama-server").strip() == serving
    assert lab.ssh(f"test -x {crashing_path} && echo kept").strip() == "kept"


def test_a_model_that_does_not_load_is_rolled_back_to_the_previous_model(lab: Lab, converged: PlaybookRun,
                                                                       tmp_path: Path, tiny_model_path: Path,
                                                                       tiny_split_model_path: Path) -> None:
    """Only the model changes. The new one passes every check before it is placed (its pinned sha256, a whole
    GGUF with its architecture and layers) but llama.cpp cannot load it (a tensor it needs is renamed). It lands
    in its own version directory beside the serving one, so the restored unit serves the previous model again,
    its files untouched; the new version stays until a model serves (pruning waits for a healthy unit)."""
    broken = tmp_path / "renamed-tensor.gguf"
    broken.write_bytes(tiny_model_path.read_bytes().replace(b"output_norm.weight", b"output_norX.weight"))
    digest = sha256_of(broken)
    before = probe(lab)
    served = before["server_cmdline"][before["server_cmdline"].index("--model") + 1]
    model_dir = lab.host_entry()["llama_server_model_dir"]  # the stack's data volume
    assert re.fullmatch(rf"{model_dir}/[0-9a-f]{{16}}/[^/]+-00001-of-00002\.gguf", served), served
    run = lab.playbook("tests/lab/playbooks/llama_server_only.yml", stage="rollback of a model that does not load",
                       extra_vars={"llama_server_model_src": str(broken), "llama_server_model_sha256": digest})
    after = probe(lab)
    assert run.rc != 0 and run.recap["rescued"] == 1, tail(run)
    assert "did not come up healthy" in run.output and "previous unit was restored" in run.output
    assert after["health"]["status"] == 200 and after["server_cmdline"] == before["server_cmdline"]
    first_shard = inspect_model(tiny_split_model_path).files[0]
    assert lab.ssh(f"sudo sha256sum {served}").split()[0] == cached_sha256(first_shard)
    new_version = f"{model_dir}/{digest[:16]}/{broken.name}"
    assert lab.ssh(f"sudo test -f {new_version} && echo kept").strip() == "kept"


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
    assert set(LAB_KERNEL_ARGS) <= set(state["cmdline"].split()), \
        "the roles' GRUB drop-ins keep the image's own arguments (nokaslr: the kernel in the low gigabyte)"
    assert {node: pages["1g"] for node, pages in state["nodes"].items()} == {"0": 1, "1": 1}


def test_verify_passes_on_the_converged_rebooted_host(lab: Lab, converged: PlaybookRun,
                                                     llama_server_binary: Path) -> None:
    """It also names the CPU features the serving build runs with, as the tuner names that build."""
    verify = lab.playbook(VERIFY, stage="verify.yml after the reboot")
    assert verify.rc == 0, tail(verify)
    served = identify(llama_server_binary).system_info
    assert "AVX2 = 1" in served and " ".join(served.split()) in " ".join(verify.output.split()), tail(verify)

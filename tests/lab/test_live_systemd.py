"""Live tuning over systemd on the QEMU lab host: the llama_server role's real unit, changed over SSH through
a transient drop-in, a host-side dead-man unit, a lock held by an SSH session, and adoption through the role.

What the host runs is read back from systemd and /proc on the lab (the server's command line, its CPU
affinity and memory policy), never from the tuner's own bookkeeping. Nothing here asserts speed: the lab
is emulated.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml
from control_contract import (
    ControlUnderTest,
    check_a_configuration_that_cannot_start_is_reported_and_the_baseline_comes_back,
    check_a_second_tuner_is_refused_at_once,
    check_a_trial_runs_and_the_baseline_comes_back,
    check_the_dead_man_switch_restores_the_baseline,
)
from labkit import API_KEY, BIN, REPO, TUNED, Lab, short_tune_vars
from result_support import proven_result

from tuner.cli import build_parser
from tuner.config import RunConfig, parse_cpu_list
from tuner.cpu_lists import format_cpu_list
from tuner.errors import UserError
from tuner.live.control import ServerControl, Target, TargetOptions
from tuner.live.measure import Heartbeat
from tuner.live.session import LiveRequest, save_write_and_apply
from tuner.live.unit import DEADMAN_LOG, DEADMAN_UNIT, dropin_path
from tuner.live.unit_connection import InventoryConnection
from tuner.progress import TuneProgress
from tuner.result import TuneResult
from tuner.safe_change import STATE_APPLY_FAILED
from tuner.server.identity import identify
from tuner.writeback import write_vars

pytestmark = [pytest.mark.lab, pytest.mark.timeout(2400)]

UNIT = "llama-server"
DEADMAN_S = 45  # generous: under emulation a loaded guest answers SSH slowly
# Reverting takes the deadman's poll (2 s), a daemon-reload and a restart; under emulation the
# restart (model load, mlock) takes seconds to tens of seconds.
REVERT_SLACK_S = 90


def live_args(lab: Lab, *extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["tune", "--live", "--inventory", str(lab.inventory / "hosts.yml"),
                                      "--host", lab.state.alias, "--deadman", f"{DEADMAN_S}s", *extra])


def server_state(lab: Lab) -> dict[str, str]:
    """What systemd and the kernel say the unit runs right now."""
    script = f"""
pid=$(systemctl show -p MainPID --value {UNIT})
HEALTH='import sys, urllib.request as u
argv = open(sys.argv[1]).read().split("\\0")
flag = lambda name, default: argv[argv.index(name) + 1] if name in argv[:-1] else default
url = "http://%s:%s/health" % (flag("--host", "127.0.0.1"), flag("--port", "8080"))
print(u.urlopen(url, timeout=5).status)'

systemctl show -p ActiveState -p SubState -p CPUAffinity -p NUMAPolicy -p NUMAMask {UNIT}
echo "cmdline=$(tr '\\0' ' ' < /proc/$pid/cmdline 2>/dev/null)"
echo "omp=$(tr '\\0' '\\n' < /proc/$pid/environ 2>/dev/null | sed -n 's/^OMP_WAIT_POLICY=//p')"
echo "dropin=$(test -e {dropin_path(UNIT)} && echo present || echo absent)"
echo "health=$(python3 -c "$HEALTH" /proc/$pid/cmdline 2>/dev/null || echo down)"
"""
    out = lab.ssh("sudo sh -s", stdin=script)
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def runs(state: dict[str, str], config: RunConfig) -> bool:
    """The unit's process runs ``config``: its flags, and its OpenMP wait policy (a trial's drop-in sets or unsets
    it over the unit's Environment=, and removing the drop-in must bring the unit's back)."""
    return f" {' '.join(config.server_args())} " in f" {state['cmdline']} " and \
        state.get("omp", "") == config.server_environment().get("OMP_WAIT_POLICY", "")


def contract(lab: Lab, control: ServerControl, baseline: RunConfig, trial: RunConfig | None = None) -> ControlUnderTest:
    """The systemd unit under tests/control_contract.py: a trial runs from its drop-in, the baseline without one.
    The trial defaults to the one CONTROLLER applies."""

    def host_runs(config: RunConfig) -> bool:
        state = server_state(lab)
        return state["health"] == "200" and runs(state, config) and \
            state["dropin"] == ("absent" if config == baseline else "present")

    @contextlib.contextmanager
    def second_tuner() -> Iterator[None]:
        second = InventoryConnection(TargetOptions.from_args(live_args(lab)))
        second.control.connect()
        try:
            with second.control.lock():
                yield
        finally:
            second.control.disconnect()

    # a 16 GiB f32 KV cache: beyond the guest's RAM, even for the tiny model
    unstartable = dataclasses.replace(baseline, parallel=64, ctx_size=16_777_216, cache_type_k="f32",
                                      cache_type_v="f32")
    # Refused at once rather than queued behind the first tuner's lock; under TCG one SSH round trip on the
    # emulated guest alone can take about a second, so the bound only tells "refused" from "waited".
    return ControlUnderTest(
        name=f"{UNIT}.service on the lab", control=control, baseline=baseline, unstartable=unstartable,
        trial=trial or dataclasses.replace(baseline, threads=1, threads_batch=1, parallel=2, ctx_size=1024),
        runs=host_runs, second_tuner=second_tuner, refusal="another llamahost tune is already tuning",
        refused_within_s=10.0, dead_man_within_s=DEADMAN_S + REVERT_SLACK_S)


@pytest.fixture(scope="module")
def served(lab: Lab) -> Lab:
    """The lab with the llama_server role converged. In the lab tier this module runs after
    test_roles_on_lab (tests/conftest.py), which leaves the lab serving; then nothing is converged here."""
    state = server_state(lab) if "active" in lab.ssh(f"systemctl is-active {UNIT} || true") else {}
    if not (state.get("health") == "200" and runs(state, TUNED)):
        run = lab.playbook("playbooks/site.yml", stage="converge site.yml (live systemd tests)")
        assert run.rc == 0 and run.failed == 0, run.output[-4000:]
    lab.ssh(f"sudo rm -f {DEADMAN_LOG}")
    return lab


CONTROLLER = """
import sys, time, dataclasses
from tuner.cli import build_parser
from tuner.live.measure import Heartbeat
from tuner.live.control import TargetOptions
from tuner.live.unit_connection import InventoryConnection
args = build_parser().parse_args(sys.argv[1:])
connection = InventoryConnection(TargetOptions.from_args(args))
with connection.lock():
    target = connection.describe()
    with Heartbeat(connection.control, 5):  # as a tuning run does while it works
        connection.control.start(target.deployed)
        connection.control.apply(dataclasses.replace(target.deployed, threads=1, threads_batch=1, parallel=2,
                                                     ctx_size=1024))
    connection.control.heartbeat()  # the last one: the dead-man limit counts from here
    print("applied", flush=True)
    time.sleep(3600)
"""


def test_a_killed_controller_is_reverted_by_the_dead_man_unit_and_its_lock_released(served: Lab) -> None:
    args = ["tune", "--live", "--inventory", str(served.inventory / "hosts.yml"), "--host", served.state.alias,
            "--deadman", f"{DEADMAN_S}s"]
    connection = InventoryConnection(TargetOptions.from_args(live_args(served)))

    def trial_then_killed_controller() -> None:
        controller = subprocess.Popen([sys.executable, "-c", CONTROLLER, *args], stdout=subprocess.PIPE, text=True,
                                      env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}, cwd=REPO)
        assert controller.stdout is not None
        line = controller.stdout.readline()
        try:
            assert line.strip() == "applied", f"the controller did not apply its trial: {line!r}"
            trial = server_state(served)
            assert trial["dropin"] == "present" and "--parallel 2" in trial["cmdline"]
            assert served.ssh(f"systemctl is-active {DEADMAN_UNIT} || true").strip() == "active"
        finally:
            controller.send_signal(signal.SIGKILL)
            controller.wait()

    subject = contract(served, connection.control, TUNED)
    check_the_dead_man_switch_restores_the_baseline(subject, trial_then_killed_controller,
                                                    silent_for_at_least_s=DEADMAN_S - 5)
    assert "controller silent" in served.ssh(f"sudo cat {DEADMAN_LOG}")
    assert served.ssh(f"systemctl is-active {DEADMAN_UNIT} || true").strip() != "active"
    # The dead controller's lock went with its SSH session: a new tuner gets it at once.
    with connection.lock():
        pass


SLICE_DRIVER = """
import os, sys
sys.path.insert(0, "/tmp/llamahost-slice")
from tuner.slice import enter_slice
enter_slice("llama-server.slice", [sys.executable, sys.argv[0]])
print("cgroup", open("/proc/self/cgroup").read().strip().split(":", 2)[2])
print("cpus", ",".join(map(str, sorted(os.sched_getaffinity(0)))))
print("uid", os.getuid())
"""


def test_an_on_host_run_moves_from_user_slice_into_the_servers_slice_onto_the_inference_cpus(served: Lab) -> None:
    """`--slice`, for real on the partitioned lab: a process started over SSH sits in user.slice on the
    housekeeping CPU 0; tuner.slice starts it again in llama-server.slice, as the same user, on CPUs 2,4,6.
    (The module and its stdlib-only imports are copied to the guest; the full tuner is not installed there.)"""
    served.ssh("rm -rf /tmp/llamahost-slice && mkdir -p /tmp/llamahost-slice/tuner")
    for name in ("__init__.py", "errors.py", "cpu_lists.py", "config.py", "slice.py"):  # cpu_lists: a link, read
        served.ssh(f"cat > /tmp/llamahost-slice/tuner/{name}", stdin=(REPO / "tuner" / name).read_text())
    served.ssh("cat > /tmp/llamahost-slice/driver.py", stdin=SLICE_DRIVER)
    assert served.ssh("python3 -c 'import os; print(sorted(os.sched_getaffinity(0)))'").strip() == "[0]"
    uid = served.ssh("id -u").strip()
    out = dict(line.split(" ", 1) for line in served.ssh("python3 /tmp/llamahost-slice/driver.py").splitlines())
    # systemd nests a dashed slice name: llama-server.slice lives in llama.slice
    assert out["cgroup"].startswith("/llama.slice/llama-server.slice/run-") and out["cgroup"].endswith(".scope"), out
    assert (out["cpus"], out["uid"]) == ("2,4,6", uid), out


TUNE_RUN_STATE = "systemctl show -p ActiveState --value llamahost-tune"
HOOKS_LOG = "/run/llamahost-tune-hooks.log"
# Both of the shell's forms: systemd, which starts the tuner, would expand "${...}" itself if tune.yml let it.
HOOK = f'echo "$LLAMAHOST_HOOK ${{LLAMAHOST_RESTART_REASON}}" >> {HOOKS_LOG}'


def tune_playbook(lab: Lab, inventory: Path, wheelhouse: Path) -> list[str]:
    """playbooks/tune.yml for the lab: a short run, no rollout (the later tests need the host as converged).
    Two trials after the baseline are enough to see placements change (--trials ends the search there; the
    seed makes them the same two every time), and --max-rounds 3 keeps the proof from filling what the budget
    leaves (it took 7 rounds, to the budget's end, without it). Under emulation a trial takes about a minute
    and a proof round (two restarts and two runs) about 70 s; the planner, at about 1:45 into the run, wants two
    trials and its reserve for the proof, so 11 minutes leaves room for a slower day, and the run ends after
    about 7:30 (three trials, a 12-minute budget and an uncapped proof took 12:00)."""
    extra = {**short_tune_vars("11m", deadman_s=DEADMAN_S), "llamahost_tuner_wheelhouse": str(wheelhouse),
             "tune_drain": HOOK, "tune_undrain": HOOK, "tune_max_restarts_per_hour": 30}
    extra["tune_extra_args"] = [*extra["tune_extra_args"], "--trials", "2", "--seed", "1", "--max-rounds", "3"]
    return [str(BIN / "ansible-playbook"), "-i", str(inventory / "hosts.yml"), str(REPO / "playbooks" / "tune.yml"),
            "-e", json.dumps(extra)]


def test_tune_yml_tunes_on_the_host_survives_a_killed_controller_and_reads_every_trials_placement_back(
        served: Lab, tmp_path: Path) -> None:
    """playbooks/tune.yml for real on a 2-node kernel, over Ansible's own connection only: the llamahost_tuner role
    installs llamahost from a wheelhouse built here, the tuner runs on the host as the transient unit llamahost-tune,
    and the controller's ansible-playbook is killed while it waits. The run goes on on the host; a second
    ansible-playbook re-attaches (the install changes nothing the second time), collects the result and shows the
    verdict. Then every measured trial's placement, read back from the host's /proc by the tuner there, is checked
    from the study the host kept: CPU mask, memory policy, the nodes of the model's pages. Timings under emulation
    mean nothing; placement does. (Runs before the module's `remote` fixture takes the host's lock.)"""
    wheelhouse = tmp_path / "wheelhouse"
    built = subprocess.run([str(BIN / "llamahost"), "wheelhouse", str(wheelhouse)], capture_output=True, text=True,
                           timeout=900, check=False)
    assert built.returncode == 0, built.stderr[-2000:]
    inventory = tmp_path / "inventory"
    shutil.copytree(served.inventory, inventory, symlinks=True)  # a write-back must not reach the lab's inventory
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    served.ssh(f"sudo rm -f {HOOKS_LOG}")
    served.put_short_workload()
    first = subprocess.Popen(tune_playbook(served, inventory, wheelhouse), cwd=REPO, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while served.ssh(f"{TUNE_RUN_STATE} || true").strip() != "active":
            assert first.poll() is None, (first.stdout.read() if first.stdout else "")[-4000:]
            assert time.monotonic() < deadline, "the tuner never started on the host"
            time.sleep(5)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the controller goes away mid-run
        first.wait()
    time.sleep(10)
    assert served.ssh(f"{TUNE_RUN_STATE} || true").strip() == "active", "the run on the host outlived the controller"
    again = subprocess.run(tune_playbook(served, inventory, wheelhouse), cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=1800, check=False)
    output = again.stdout + again.stderr
    host_log = served.ssh(f"sudo sh -c 'tail -n 40 /var/lib/llamahost/tune/*/log; cat {HOOKS_LOG}; journalctl "
                          "-u llamahost-tune -u llama-server -n 60 --no-pager -o short-precise'", check=False)
    assert again.returncode == 0, output[-5000:] + "\n--- on the host ---\n" + host_log
    blocks = output.split("TASK [")
    changed_install = [block.split("]", 1)[0] for block in blocks
                       if block.startswith("llamahost_tuner : ") and "\nchanged:" in block]
    assert changed_install == [], f"the second install changed {changed_install}"
    start = next(block for block in blocks if block.startswith("Start the tuner on the host"))
    assert "\nskipping:" in start and "\nchanged:" not in start, \
        f"the second run re-attached, it started no other\n{output[-3000:]}\n--- on the host ---\n{host_log}"
    assert re.search(rf'"msg": "{re.escape(served.state.alias)}: [\w-]+ - ', output), output[-3000:]
    assert API_KEY not in output
    study = tmp_path / "studies.db"
    study.write_bytes(base64.b64decode(served.ssh("sudo base64 -w0 /var/lib/llamahost/tune/studies.db")))
    names = optuna.get_all_study_names(f"sqlite:///{study}")
    assert len(names) == 1 and names[0].startswith("live-"), names
    every = optuna.load_study(study_name=names[0], storage=f"sqlite:///{study}").get_trials(deepcopy=False)
    trials = [t for t in every if "outcome" in t.user_attrs]
    assert len(trials) >= 2, f"{[(t.state, t.user_attrs.get('failure')) for t in every]}\n{host_log}"
    assert len(every) == 3, f"the baseline and the two trials --trials asked for: {len(every)}\n{host_log}"
    assert any("numa" in t.params for t in every), "NUMA mode is searched on two nodes"
    resets = mapped = 0
    for trial in trials:
        config = RunConfig.from_dict(trial.user_attrs["config"])
        applied = trial.user_attrs["outcome"]["applied"]
        assert not set(config.cpus) - {2, 4, 6}, f"trial {trial.number} pinned a housekeeping CPU: {config.cpus}"
        if config.cpus:
            assert applied["cpus_allowed"] == format_cpu_list(config.cpus), (trial.number, applied)
        pages = applied.get("model_pages")  # only where llama.cpp mmaps the model (its load mode decides)
        if pages is not None:
            assert pages["policy"] == config.memory_policy, (trial.number, config.memory_policy, pages)
            if config.memory_policy == "bind":
                assert set(pages["pages_per_node"]) <= set(map(str, parse_cpu_list(pages["policy_nodes"]))), pages
        mapped += pages is not None
        resets += bool(applied["page_cache_reset"])
    assert mapped >= 1, "the baseline (mmap+mlock) maps the model, and its pages were read back"
    assert resets >= 1, "some trial changed the placement, and the model's pages were put back for it"
    state = server_state(served)
    assert state["dropin"] == "absent" and runs(state, TUNED), "the run ends on the baseline (no rollout asked)"
    assert served.ssh(f"{TUNE_RUN_STATE} || true").strip() != "active"
    assert_hooks_ran_around_every_restart(served, tmp_path / "result.yaml")


def assert_hooks_ran_around_every_restart(lab: Lab, result_path: Path) -> None:
    """tune_drain/tune_undrain ran on the host, as written in the inventory, around each of the run's restarts:
    drain, undrain, drain, ... each with what it ran for; the result counts as many outages as drains."""
    result_path.write_text(lab.ssh("sudo sh -c 'cat /var/lib/llamahost/tune/*/result.yaml'"))
    downtime = yaml.safe_load(result_path.read_text())["downtime"]
    calls = [line.split() for line in lab.ssh(f"sudo cat {HOOKS_LOG}").splitlines()]
    assert all(len(call) == 2 for call in calls), f"each hook saw its name and its reason: {calls}"
    names = [name for name, _ in calls]
    assert names == ["drain", "undrain"] * (len(names) // 2), names
    assert ["drain", "trial"] in calls, calls
    assert {reason for _, reason in calls} <= {"start", "trial", "baseline"}, calls
    assert downtime["hooks"] == ["drain", "undrain"] and downtime["max_restarts_per_hour"] == 30, downtime
    assert downtime["outages"] == names.count("drain"), (downtime, calls)


@pytest.fixture(scope="module")
def remote(served: Lab) -> Iterator[tuple[InventoryConnection, Target]]:
    connection = InventoryConnection(TargetOptions.from_args(live_args(served)))
    with connection.lock(), Heartbeat(connection.control, DEADMAN_S / 4):  # as run_live does
        target = connection.describe()
        assert target.deployed is not None
        connection.control.start(target.deployed)
        yield connection, target


def test_the_target_is_read_from_the_host(remote: tuple[InventoryConnection, Target],
                                          llama_server_binary: Path) -> None:
    connection, target = remote
    assert target.deployed is not None
    here = identify(llama_server_binary)
    assert target.server is not None, "the unit's llama-server is named on the host"
    assert (target.server.sha256, target.server.version) == (here.sha256, here.version), "the role copied this build"
    assert target.server.system_info and target.server.path != here.path
    assert target.deployed.role_vars() == TUNED.role_vars()
    assert [node.cpus for node in target.probe.topology.nodes] == [(0, 2), (4, 6)]  # SMT off, 2 nodes
    assert target.usable_cpus == (2, 4, 6), "trials pin only the inference CPUs (CPU 0 keeps the housekeeping)"
    assert target.numa_blocked is None
    # what the unit's build offers, read from its system_info and its --help on the host
    assert target.knobs is not None
    assert (target.knobs.omp_wait_policy, target.knobs.repack, target.knobs.cpu_strict) == (True, True, True)
    assert target.probe.hostname != os.uname().nodename
    assert connection.control.describe() == f"{UNIT}.service on {connection.control.shell.name}"
    assert connection.control.api_key  # read from the unit's key file, as root


def test_a_trial_drop_in_is_applied_and_removed(served: Lab, remote: tuple[InventoryConnection, Target]) -> None:
    connection, target = remote
    assert target.deployed is not None
    # The unit sets OMP_WAIT_POLICY=ACTIVE; a trial that leaves it unset must run without it (UnsetEnvironment=).
    trial = dataclasses.replace(target.deployed, threads=1, threads_batch=1, cpus=(2,), memory_policy="default",
                                load_mode="mmap", parallel=2, ctx_size=1024, omp_wait_policy="default")

    def on_trial() -> None:
        state = server_state(served)
        assert (state["CPUAffinity"], state["NUMAPolicy"]) == ("2", "default")
        assert "--api-key-file" in state["cmdline"] and "--model" in state["cmdline"]
        memory = connection.control.server_memory_bytes()
        assert memory is not None and memory > 10 * 2**20

    def on_baseline() -> None:
        state = server_state(served)
        assert (state["CPUAffinity"], state["NUMAPolicy"], state["NUMAMask"]) == ("4 6", "bind", "1")
        unit_file = served.ssh(f"cat /etc/systemd/system/{UNIT}.service")
        assert "llamahost-trial" not in unit_file and "--parallel 2" not in unit_file

    check_a_trial_runs_and_the_baseline_comes_back(contract(served, connection.control, target.deployed, trial),
                                                   on_trial=on_trial, on_baseline=on_baseline)


def model_pages_on_host(lab: Lab, shards: list[str]) -> tuple[str, dict[int, int]]:
    """The memory policy the unit's server runs under and its model pages per node (every shard), read on the
    lab from /proc/<pid>/numa_maps (parsed here, not by the tuner's own reader)."""
    script = f"""pid=$(systemctl show -p MainPID --value {UNIT})
for shard in {' '.join(shards)}; do grep -F "file=$(readlink -f $shard)" /proc/$pid/numa_maps; done
"""
    lines = lab.ssh("sudo sh -s", stdin=script).splitlines()
    assert lines, "the server maps its model"
    pages: dict[int, int] = {}
    for line in lines:
        for node, count in re.findall(r"\bN(\d+)=(\d+)", line):
            pages[int(node)] = pages.get(int(node), 0) + int(count)
    return lines[0].split()[1], pages


def test_the_model_pages_move_to_the_node_each_placement_binds(served: Lab,
                                                                remote: tuple[InventoryConnection, Target]) -> None:
    """Issue 13's page placement on a real 2-node kernel: a model page stays on the node that first faulted it,
    across restarts, so without a reset the baseline after this trial would run on node-0 pages. The tuner
    drops the model's pages whenever the placement changes, and each server faults them in on its own node."""
    connection, target = remote
    assert target.deployed is not None and target.deployed.memory_policy == "bind"
    shards = connection.control.model_files
    assert len(shards) == 2, "the lab serves a split model: both shards are placed"
    policy, pages = model_pages_on_host(served, shards)
    assert (policy, set(pages)) == ("bind:1", {1}), "the baseline's model pages are on its node 1"
    on_node0 = dataclasses.replace(target.deployed, threads=1, threads_batch=1, cpus=(2,), memory_policy="bind",
                                   memory_nodes=(0,))
    connection.control.apply(on_node0)
    policy, pages = model_pages_on_host(served, shards)
    assert (policy, set(pages)) == ("bind:0", {0}), f"the trial's pages moved to node 0: {pages}"
    applied = connection.control.last_applied
    assert applied["page_cache_reset"] is True and applied["cpus_allowed"] == "2"
    assert applied["model_pages"]["policy"] == "bind" and set(applied["model_pages"]["pages_per_node"]) == {"0"}
    assert sum(applied["model_pages"]["pages_per_node"].values()) == pages[0]
    same_placement = dataclasses.replace(on_node0, ctx_size=1024)
    connection.control.apply(same_placement)
    assert connection.control.last_applied["page_cache_reset"] is False, "same placement: the pages stay"
    connection.control.restore_baseline()
    policy, pages = model_pages_on_host(served, shards)
    assert (policy, set(pages)) == ("bind:1", {1}), f"the baseline's pages are back on node 1: {pages}"
    assert connection.control.last_applied["page_cache_reset"] is True


def test_numa_settings_are_left_out_while_another_process_maps_the_model(
        served: Lab, remote: tuple[InventoryConnection, Target]) -> None:
    connection, _ = remote
    assert connection.control.numa_blocked() is None, "only the unit's own server maps the model"
    model = connection.control.server_command().model
    holder = f"""cat > /tmp/llamahost-holder.py <<'EOF'
import mmap, sys, time
f = open(sys.argv[1], "rb")
m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
time.sleep(600)
EOF
setsid python3 /tmp/llamahost-holder.py {model} </dev/null >/dev/null 2>&1 &
"""
    served.ssh("sudo sh -s", stdin=holder)  # a second reader that maps the model, as a stray server would
    try:
        deadline = time.monotonic() + 60
        while (reason := connection.control.numa_blocked()) is None and time.monotonic() < deadline:
            time.sleep(1)
        assert reason is not None and "another process maps the model" in reason and "python3" in reason
    finally:
        served.ssh("sudo pkill -f llamahost-holder.py || true", check=False)
    assert connection.control.numa_blocked() is None


def test_a_trial_that_cannot_start_fails_with_the_journal_and_the_baseline_comes_back(
        served: Lab, remote: tuple[InventoryConnection, Target]) -> None:
    connection, target = remote
    assert target.deployed is not None
    subject = contract(served, connection.control, target.deployed)
    started = time.monotonic()
    failure = check_a_configuration_that_cannot_start_is_reported_and_the_baseline_comes_back(subject)
    assert time.monotonic() - started < 400
    assert f"journalctl -u {UNIT}" in str(failure) and "llama-server" in str(failure)


def test_a_second_tuner_is_refused_at_once(served: Lab, remote: tuple[InventoryConnection, Target]) -> None:
    connection, target = remote
    assert target.deployed is not None
    check_a_second_tuner_is_refused_at_once(contract(served, connection.control, target.deployed))


def test_a_failed_apply_leaves_the_vars_file_as_it_was_before_the_run(
        served: Lab, remote: tuple[InventoryConnection, Target], tmp_path: Path) -> None:
    """The end of a live run with --host-vars --apply, on the real host: the proof is saved first, the winner is
    written through the safety chain, and when the role refuses it (here: CPU 0, the housekeeping CPU the cpu
    role keeps for the system) the host_vars file is put back byte for byte and the result says so. (Before the
    adopt test, which leaves the host running a winner the restored host_vars do not name.)"""
    connection, target = remote
    assert target.deployed is not None
    refused_by_the_role = dataclasses.replace(target.deployed, cpus=(0, 2))
    host_vars = served.inventory / "host_vars" / f"{served.state.alias}.yml"
    original = host_vars.read_bytes()
    proven = proven_result(refused_by_the_role, kind="live", model_sha=target.model_sha256)
    proven["host"]["fingerprint"] = target.probe.fingerprint()
    result = TuneResult.from_dict(proven, origin="the lab test's proof")
    result_path = tmp_path / "result.yaml"
    context = SimpleNamespace(
        request=LiveRequest(budget_seconds=3600, host_vars=host_vars, inventory=served.inventory / "hosts.yml",
                            apply=True),
        result_path=result_path, control=connection.control, probe=target.probe,
        study=SimpleNamespace(study_name="lab-live"))
    try:
        with (pytest.raises(UserError, match="could not be applied") as failure,
              TuneProgress(3600, title="lab: the end of a live run") as progress):
            save_write_and_apply(context, result, progress)  # type: ignore[arg-type]
        assert "was put back as it was" in failure.value.fix
        assert f"{served.state.alias}: llama_server_cpus (0,2) must be CPUs that are online" in failure.value.problem, \
            "the role's own reason, not the tasks' timings"
        assert host_vars.read_bytes() == original
        saved = yaml.safe_load(result_path.read_text())
        assert saved["write_back"]["state"] == STATE_APPLY_FAILED
        assert saved["write_back"]["changed"]["llama_server_cpus"] == [format_cpu_list(TUNED.cpus), "0,2"]
        state = server_state(served)
        assert runs(state, TUNED) and state["health"] == "200", "the host still runs what the inventory says"
    finally:
        host_vars.write_bytes(original)


def test_adopt_refuses_a_winner_missing_from_the_inventory_then_applies_it_with_the_role(
        served: Lab, remote: tuple[InventoryConnection, Target]) -> None:
    """The permanent path: the winner must be in host_vars (the write-back), then
    playbooks/llama_server.yml --limit HOST rewrites the unit. The host_vars file is put back afterwards."""
    connection, target = remote
    assert target.deployed is not None
    winner = dataclasses.replace(target.deployed, parallel=2, ctx_size=1024)
    with pytest.raises(UserError, match="llama_server_parallel is 1, the winner has 2"):
        connection.control.adopt(winner)
    host_vars = served.inventory / "host_vars" / f"{served.state.alias}.yml"
    original = host_vars.read_text()
    try:
        write_vars(host_vars, winner.role_vars(), note="lab test: adopted by the live tuner")
        connection.control.adopt(winner)
        state = server_state(served)
        assert state["dropin"] == "absent" and runs(state, winner) and state["health"] == "200"
        assert "--parallel 2" in served.ssh(f"cat /etc/systemd/system/{UNIT}.service")
        assert connection.control.baseline == winner
    finally:
        host_vars.write_text(original)

"""playbooks/tune_fleet.yml end to end: the real playbook run by ansible-playbook, real `llamahost fleet`
workers with the real small model, a real PostgreSQL.

The group's two hosts are two inventory names for this machine (local connections), so both workers are
the same hardware and compute the same group - the "one host and the local machine" of the issue, with the
machine playing both. What is left out here, and why: the rollout step runs playbooks/llama_server.yml,
which needs root and systemd on the host (this test machine has neither), so here it only lists the hosts
it would touch (`--list-hosts`); that playbook's own behaviour - one host at a time, rolled back on a
failed health check, stopped at the first host that fails - is tested on the QEMU host (tests/lab).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from fleet_helpers import FLEET_PASSWORD, TINY, Store
from optuna import trial as optuna_trial

from tuner.atomic import previous_path
from tuner.model.checksum import sha256_of
from tuner.safe_change import TUNED_BINARY_VAR

pytestmark = [pytest.mark.postgres, pytest.mark.model]

REPO = Path(__file__).resolve().parents[2]
PLAYBOOK = REPO / "playbooks" / "tune_fleet.yml"
GROUP = "cpu_fleet"
HOSTS = ("node-a", "node-b")
TRIALS_EACH = 3
GROUP_VARS = """\
---
# The rack-7 inference hosts (all the same: 2x EPYC 9654, 24 DIMMs).
llama_server_port: 8080   # the load balancer's target port
"""


def llamahost_bin() -> str:
    beside = Path(sys.executable).parent / "llamahost"
    found = str(beside) if beside.exists() else shutil.which("llamahost")
    assert found, "the llamahost console script is installed with the project"
    return found


def host_command(root: Path, host: str) -> str:
    """llamahost as ``host`` runs it: with a measuring lock of its own, as on a machine of its own (one machine
    plays every host here, and one lock per machine would refuse the second worker)."""
    wrapper = root / "bin" / f"llamahost-{host}"
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(f'#!/bin/sh\nLLAMAHOST_LOCK_DIR={root / "locks" / host} exec {llamahost_bin()} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def write_inventory(root: Path, host_models: dict[str, Path]) -> Path:
    """An inventory of this machine under two names, in a group of the hosts the roles prepare (llama_hosts);
    each host's study selection names its model, the model it serves (its sha256)."""
    hosts = {name: {"tune_selection_args": ["--model", str(model), *TINY],
                    "llama_server_model_sha256": sha256_of(model),
                    "tune_llamahost_command": host_command(root, name)} for name, model in host_models.items()}
    inventory = {"all": {"children": {"llama_hosts": {"children": {GROUP: {
        "hosts": hosts,
        "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                 "llama_server_llamahost_command": llamahost_bin()},
    }}}}}}
    (root / "group_vars").mkdir(parents=True)
    (root / "group_vars" / f"{GROUP}.yml").write_text(GROUP_VARS)
    path = root / "hosts.yml"
    path.write_text(yaml.safe_dump(inventory))
    return path


def playbook_invocation(inventory: Path, store: Store, home: Path, *extra: str) -> tuple[list[str], dict[str, str]]:
    """The ansible-playbook command line (JSON callback, a short run, no rollout unless ``extra`` asks) and
    its environment."""
    config = home / "ansible.cfg"  # the repository's adds a profiling callback that writes to stdout too
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("[defaults]\nstdout_callback = ansible.posix.json\nretry_files_enabled = false\n"
                      f"collections_path = {REPO / '.collections'}\n")  # the llamahost.host collection
    env = {**os.environ, "LLAMAHOST_HOME": str(home), "ANSIBLE_CONFIG": str(config),
           "ANSIBLE_LOCAL_TEMP": str(home / "ansible-tmp"), "ANSIBLE_ASYNC_DIR": str(home / "ansible-async")}
    env.pop("LLAMAHOST_STORAGE", None)
    command = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory), str(PLAYBOOK),
               "-e", f"tune_group={GROUP}", "-e", "tune_budget=10m", "-e", f"tune_storage={store.url}",
               "-e", f"tune_trials={TRIALS_EACH}", "-e", "tune_finish_budget=30s", "-e", "tune_wait_poll_s=2",
               "-e", "tune_rollout=false", *extra]
    return command, env


def parsed_report(stdout: str) -> dict[str, Any] | None:
    """The JSON callback's report, or None if the output is not JSON (e.g. a refusal before the first play)."""
    try:
        return dict(json.loads(stdout))
    except json.JSONDecodeError:
        return None


def run_playbook(inventory: Path, store: Store, home: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str],
                                                                               dict[str, Any] | None]:
    """ansible-playbook run to its end; returns the process and the parsed report."""
    command, env = playbook_invocation(inventory, store, home, *extra)
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=900, check=False)
    return done, parsed_report(done.stdout)


def task_results(report: dict[str, Any], name_start: str) -> dict[str, dict[str, Any]]:
    """Per host, what the task whose name starts with ``name_start`` returned (hosts it skipped included)."""
    for play in report["plays"]:
        for task in play["tasks"]:
            if task["task"]["name"].startswith(name_start):
                return dict(task["hosts"])
    raise AssertionError(f"no task named {name_start!r} ran")


def test_the_playbook_searches_on_every_host_and_writes_the_group_vars_once(
        store: Store, model_path: Path, tmp_path: Path) -> None:
    inventory = write_inventory(tmp_path / "inventory", dict.fromkeys(HOSTS, model_path))
    group_vars = inventory.parent / "group_vars" / f"{GROUP}.yml"
    done, report = run_playbook(inventory, store, tmp_path / "home")
    assert done.returncode == 0, (done.stdout[-4000:], done.stderr[-2000:])
    assert report is not None
    assert FLEET_PASSWORD not in done.stdout + done.stderr

    # every host searched the one group study: N workers x M trials, one baseline
    studies = store.studies()
    assert len(studies) == 1, list(studies)
    trials = next(iter(studies.values()))
    assert len(trials) == len(HOSTS) * TRIALS_EACH
    assert sum(1 for t in trials if t.user_attrs.get("role") == "baseline") == 1
    by_worker = {name: [t for t in trials if t.user_attrs["worker"]["name"] == name] for name in HOSTS}
    assert all(len(mine) == TRIALS_EACH for mine in by_worker.values()), {k: len(v) for k, v in by_worker.items()}
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == len(HOSTS), "one worker process per host"

    # no cpu partition in this inventory: nothing runs in another slice
    fingerprints = task_results(report, "Compute each host's hardware group")
    assert all("--slice" not in outcome["cmd"] for outcome in fingerprints.values())

    # the proof ran on one host, the write-back once, on the controller
    finish = task_results(report, "Prove the group's winner")
    assert [host for host, outcome in finish.items() if not outcome.get("skipped")] == [HOSTS[0]]
    result = json.loads(finish[HOSTS[0]]["stdout"])
    assert result["fleet"]["hosts"] == list(HOSTS)
    writes = task_results(report, "Write a proven winner once")
    assert len(writes) == 1
    written = json.loads(next(iter(writes.values()))["stdout"])
    assert written["verdict"] == result["verdict"] and written["vars_file"] == str(group_vars)

    text = group_vars.read_text()
    if result["verdict"] == "improved":
        assert written["wrote"]
        tuned = yaml.safe_load(text)
        assert {k: tuned[k] for k in result["settings"]["role_vars"]} == result["settings"]["role_vars"]
        assert "# The rack-7 inference hosts" in text and "# the load balancer's target port" in text
        assert f"study {result['study']}" in text
        assert tuned[TUNED_BINARY_VAR] == result["llama_cpp"]["llama_server"]["sha256"]
        assert previous_path(group_vars).read_text() == GROUP_VARS
    else:
        assert not written["wrote"] and written["changed"] == {}
        assert text == GROUP_VARS and not previous_path(group_vars).exists()
    rollout = task_results(report, "Roll the winner out")
    assert all(outcome.get("skipped") for outcome in rollout.values()), "tune_rollout=false rolls nothing out"


def test_hosts_of_different_hardware_groups_are_refused_before_anything_starts(
        store: Store, model_path: Path, tmp_path: Path) -> None:
    """A host whose group differs (here: another model file, so another model sha256) stops the run before
    any worker starts: no study is created and the group's vars stay as they were."""
    other = tmp_path / "other-model.gguf"
    other.write_bytes(model_path.read_bytes() + bytes(64))
    inventory = write_inventory(tmp_path / "inventory", {HOSTS[0]: model_path, HOSTS[1]: other})
    done, report = run_playbook(inventory, store, tmp_path / "home")
    assert done.returncode != 0
    assert report is not None
    refusal = task_results(report, "Refuse a group whose hosts are not the same hardware")
    message = next(iter(refusal.values()))["msg"]
    assert "not one hardware group" in message and HOSTS[0] in message and HOSTS[1] in message
    assert "llamahost fleet fingerprint" in message
    assert store.studies() == {}
    group_vars = inventory.parent / "group_vars" / f"{GROUP}.yml"
    assert group_vars.read_text() == GROUP_VARS and not previous_path(group_vars).exists()


def test_on_a_partitioned_host_every_step_runs_in_the_servers_slice(
        store: Store, model_path: Path, tmp_path: Path) -> None:
    """Where the cpu role reserves housekeeping CPUs (cpu_inference_cpus), the SSH session's user.slice holds
    only those, so fingerprint, search and proof run with ``--slice <the server's unit>.slice``. This machine
    runs no systemd, so the first of them stops on the slice's own refusal, before any study exists."""
    inventory = write_inventory(tmp_path / "inventory", dict.fromkeys(HOSTS, model_path))
    tree = yaml.safe_load(inventory.read_text())
    tree["all"]["children"]["llama_hosts"]["children"][GROUP]["vars"].update(
        {"cpu_inference_cpus": "1", "llama_server_service_name": "llama-server-70b"})
    inventory.write_text(yaml.safe_dump(tree))
    done, report = run_playbook(inventory, store, tmp_path / "home")
    assert done.returncode != 0 and report is not None
    fingerprints = task_results(report, "Compute each host's hardware group")
    for outcome in fingerprints.values():
        assert outcome["cmd"][-2:] == ["--slice", "llama-server-70b.slice"], outcome["cmd"]
    if not Path("/run/systemd/system").exists():
        refusals = task_results(report, "Refuse a host that cannot run llamahost")
        assert all("--slice llama-server-70b.slice needs systemd" in outcome["msg"] for outcome in refusals.values())
    assert store.studies() == {}


@pytest.mark.skipif(os.geteuid() != 0, reason="the llamahost_tuner role installs as root (owner: root)")
def test_with_a_wheelhouse_every_step_on_the_host_runs_the_llamahost_the_role_installed(
        store: Store, model_path: Path, tmp_path: Path) -> None:
    """Given the controller's wheelhouse, tune_fleet.yml installs llamahost with the llamahost_tuner role before
    anything else (as tune.yml does), and the fingerprint, the worker and the proof all run that install: the
    default command follows the role's prefix, and no tune_llamahost_command is set. One host: two inventory
    names for this machine would install into one prefix at once."""
    wheels = tmp_path / "wheelhouse"
    built = subprocess.run([llamahost_bin(), "wheelhouse", str(wheels)], capture_output=True, text=True,
                           timeout=900, check=False)
    assert built.returncode == 0, built.stderr[-2000:]
    root = tmp_path / "host"
    (root / "bin").mkdir(parents=True)
    inventory = write_inventory(tmp_path / "inventory", {HOSTS[0]: model_path})
    hosts = yaml.safe_load(inventory.read_text())
    host = hosts["all"]["children"]["llama_hosts"]["children"][GROUP]["hosts"][HOSTS[0]]
    del host["tune_llamahost_command"]
    host.update({"llamahost_tuner_wheelhouse": str(wheels), "llamahost_tuner_prefix": str(root / "opt"),
                 "llamahost_tuner_stage_dir": str(root / "stage"),
                 "llamahost_tuner_command_link": str(root / "bin" / "llamahost"),
                 "ansible_become_method": "ansible.builtin.su"})  # root already; this machine has no sudo
    inventory.write_text(yaml.safe_dump(hosts))

    done, report = run_playbook(inventory, store, tmp_path / "home")
    assert done.returncode == 0, (done.stdout[-4000:], done.stderr[-2000:])
    assert report is not None
    installed = str(root / "opt" / "current" / "bin" / "llamahost")
    for step in ("Compute each host's hardware group", "Wait for every worker", "Prove the group's winner"):
        assert task_results(report, step)[HOSTS[0]]["cmd"][0] == installed, step
    assert Path(installed).resolve().is_relative_to(root / "opt" / "releases")
    trials = next(iter(store.studies().values()))
    assert len(trials) == TRIALS_EACH, "the installed worker searched"


def test_missing_settings_are_refused_with_what_to_pass(store: Store, model_path: Path, tmp_path: Path) -> None:
    inventory = write_inventory(tmp_path / "inventory", dict.fromkeys(HOSTS, model_path))
    done, report = run_playbook(inventory, store, tmp_path / "home", "-e", "tune_storage=sqlite:///x.db")
    assert done.returncode != 0 and report is not None
    check = task_results(report, "Check the run's settings")
    assert "postgresql://USER@HOST/DB" in next(iter(check.values()))["msg"]
    assert store.studies() == {}


def running_trial_of(store: Store, worker: str, *, after_trials: int, timeout: float) -> optuna_trial.FrozenTrial:
    """The first trial ``worker`` runs once it has finished ``after_trials`` trials, seen while it is RUNNING."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for trials in store.studies().values():
            for trial in trials:
                record = trial.user_attrs.get("worker") or {}
                if (trial.state == optuna_trial.TrialState.RUNNING and record.get("name") == worker
                        and record.get("trial_index", 0) > after_trials):
                    return trial
        time.sleep(0.3)
    raise AssertionError(f"{worker} ran no trial number {after_trials + 1} within {timeout:.0f} s")


def test_a_host_lost_mid_search_is_reported_and_the_others_finish_the_night(
        store: Store, model_path: Path, tmp_path: Path) -> None:
    """One host's worker is killed (SIGKILL: what the OOM killer or a power cut leaves) during its second trial.
    The playbook does not give up the group's night: it reports the host as lost, the other host finishes
    its search and proves the winner, the group's vars are written at most once, and the rollout (planned
    only: --dry-run) leaves the lost host out."""
    inventory = write_inventory(tmp_path / "inventory", dict.fromkeys(HOSTS, model_path))
    survivor, lost = HOSTS
    command, env = playbook_invocation(inventory, store, tmp_path / "home", "-e", "tune_rollout=true",
                                       "-e", json.dumps({"tune_rollout_args": ["--dry-run"]}))
    playbook = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                cwd=REPO)
    try:
        victim = running_trial_of(store, lost, after_trials=1, timeout=300)
        os.kill(int(victim.user_attrs["worker"]["pid"]), signal.SIGKILL)
        stdout, stderr = playbook.communicate(timeout=900)
    finally:
        if playbook.poll() is None:
            playbook.kill()
            playbook.communicate()
    assert playbook.returncode == 0, (stdout[-4000:], stderr[-2000:])
    report = parsed_report(stdout)
    assert report is not None

    shown = task_results(report, "Show what each worker did")
    assert "LOST" in shown[lost]["msg"] and "exit code -9" in shown[lost]["msg"], shown[lost]["msg"]
    assert "LOST" not in shown[survivor]["msg"] and f"{TRIALS_EACH} trials" in shown[survivor]["msg"]
    check = task_results(report, "Check that at least one host finished")
    assert f"1 of 2 hosts finished their search; lost: {lost}" in next(iter(check.values()))["msg"]

    finish = task_results(report, "Prove the group's winner")
    assert finish[lost].get("skipped") and not finish[survivor].get("skipped")
    result = json.loads(finish[survivor]["stdout"])
    writes = task_results(report, "Write a proven winner once")
    assert len(writes) == 1
    written = json.loads(next(iter(writes.values()))["stdout"])
    assert written["verdict"] == result["verdict"]

    trials = next(iter(store.studies().values()))
    killed = next(t for t in trials if t.number == victim.number)
    assert killed.state != optuna_trial.TrialState.COMPLETE, "the killed trial never completed"
    assert sum(1 for t in trials if t.user_attrs["worker"]["name"] == survivor) >= TRIALS_EACH

    rollout = next(iter(task_results(report, "Roll the winner out").values()))
    if written["wrote"]:
        plan = json.loads(rollout["stdout"])
        assert plan["hosts"] == [survivor] and plan["canary"] == survivor and plan["dry_run"], plan
    else:
        assert rollout.get("skipped"), "nothing written, nothing rolled out"


def test_a_group_outside_the_served_hosts_is_refused_when_the_winner_would_be_rolled_out(
        store: Store, model_path: Path, tmp_path: Path) -> None:
    """playbooks/llama_server.yml serves llama_hosts: a group outside it would be written and never applied.

    The refusal names the hosts sorted (the playbook sorts them: Ansible's ``difference`` returns its items in
    arbitrary order), so the inventory lists them in reverse to tell a sorted list from inventory order."""
    inventory = write_inventory(tmp_path / "inventory", dict.fromkeys(HOSTS, model_path))
    tree = yaml.safe_load(inventory.read_text())
    fleet = tree["all"]["children"]["llama_hosts"]["children"]  # cpu_fleet alone
    fleet[GROUP]["hosts"] = dict(reversed(fleet[GROUP]["hosts"].items()))
    tree["all"]["children"] = fleet
    inventory.write_text(yaml.safe_dump(tree, sort_keys=False))
    assert list(yaml.safe_load(inventory.read_text())["all"]["children"][GROUP]["hosts"]) == sorted(HOSTS)[::-1]
    done, report = run_playbook(inventory, store, tmp_path / "home", "-e", "tune_rollout=true")
    assert done.returncode != 0 and report is not None
    check = next(iter(task_results(report, "Check that the rollout reaches").values()))
    assert "node-a, node-b of cpu_fleet are" in check["msg"] and "child group of llama_hosts" in check["msg"]
    assert "-e tune_rollout=false" in check["msg"]
    assert store.studies() == {}

"""Fleet workers end to end: real `llamahost fleet` processes, real trials with the real small model, a real
PostgreSQL. Several worker processes on this machine stand in for several hosts (``--worker-name``)."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
from fleet_helpers import FLEET_PASSWORD, TINY, Store, llamahost, new_store, start_llamahost
from optuna.trial import FrozenTrial, TrialState
from pg_cluster import PgCluster
from process_support import session_processes

from tuner.fleet.group import group_binding, group_fingerprint, group_study_name
from tuner.model.checksum import model_sha256
from tuner.probe import read_host
from tuner.server.identity import identify
from tuner.study import GRACE_PERIOD_S, HEARTBEAT_INTERVAL_S, open_storage, open_study
from tuner.trial.protocol import Workload

pytestmark = [pytest.mark.postgres, pytest.mark.model]

WORKERS = 2
TRIALS_EACH = 3
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def work(store: Store, model: Path, name: str, *extra: str) -> list[str]:
    return ["fleet", "work", "--storage", store.url, "--model", str(model), "--worker-name", name, *TINY, *extra]


def wait_for(condition: Callable[[], Any], timeout: float, what: str, poll: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def trial_workers() -> list[int]:
    """PIDs of this session's llama.cpp trial processes."""
    return session_processes("tuner.trial.worker")


def only_study(store: Store) -> tuple[str, list[FrozenTrial]]:
    studies = store.studies()
    assert len(studies) == 1, list(studies)
    return next(iter(studies.items()))


# ---- N workers x M trials, status, finish -------------------------------------------------------------------

@pytest.fixture(scope="module")
def fleet_run(tmp_path_factory: pytest.TempPathFactory, pg: PgCluster, model_path: Path) -> dict[str, Any]:
    """Two workers ("hosts") start at the same moment on a new store and run three trials each."""
    store = new_store(pg)
    home = tmp_path_factory.mktemp("fleet-home")
    procs = [start_llamahost(*work(store, model_path, f"host-{i}", "--trials", str(TRIALS_EACH), "--budget", "10m",
                                   "--json"), home=home, host=f"host-{i}") for i in range(WORKERS)]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
        assert FLEET_PASSWORD not in out + err
    return {"store": store, "home": home, "reports": [json.loads(out) for out, _ in outputs],
            "pids": [proc.pid for proc in procs]}


def test_n_workers_times_m_trials_and_one_baseline(fleet_run: dict[str, Any]) -> None:
    name, trials = only_study(fleet_run["store"])
    assert name.startswith("fleet-") and "-tg-p32t8-" in name
    assert len(trials) == WORKERS * TRIALS_EACH
    assert all(t.state in FINISHED for t in trials), [t.state for t in trials]
    baselines = [t for t in trials if t.user_attrs.get("role") == "baseline"]
    assert len(baselines) == 1
    for report, pid in zip(fleet_run["reports"], fleet_run["pids"], strict=True):
        assert report["study"] == name and report["stopped_by"] == "trials"
        assert report["trials_run"] == TRIALS_EACH == report["complete"] + report["pruned"] + report["failed"]
        mine = [t for t in trials if t.user_attrs["worker"]["pid"] == pid]
        assert sorted(t.user_attrs["worker"]["trial_index"] for t in mine) == list(range(1, TRIALS_EACH + 1))
        record = mine[0].user_attrs["worker"]
        assert record["name"] == report["worker"]["name"] and record["trials_limit"] == TRIALS_EACH
        assert record["deadline"] == pytest.approx(record["started_at"] + 600)


def test_status_shows_the_group_with_its_hosts_and_counts(fleet_run: dict[str, Any], llama_server_binary: Path) -> None:
    store, home = fleet_run["store"], fleet_run["home"]
    done = llamahost("fleet", "status", "--storage", store.url, "--json", home=home)
    assert done.returncode == 0, done.stderr
    assert FLEET_PASSWORD not in done.stdout + done.stderr
    groups = json.loads(done.stdout)["groups"]
    assert len(groups) == 1
    group = groups[0]
    assert group["study"] == fleet_run["reports"][0]["study"] and group["group"] == fleet_run["reports"][0]["group"]
    assert [h["name"] for h in group["hosts"]] == ["host-0", "host-1"]
    assert all(h["trials"] == TRIALS_EACH for h in group["hosts"])
    counts = group["counts"]
    assert counts["finished"] == WORKERS * TRIALS_EACH and counts["running"] == counts["waiting"] == 0
    assert group["hardware"]["llama_server_sha256"] == identify(llama_server_binary).sha256
    assert group["baseline"]["state"] in ("complete", "fail")
    if group["best"] is not None:
        assert group["best"]["config"]["threads"] >= 1 and group["best"]["ci_low"] <= group["best"]["value"]
    assert {w["state"] for w in group["workers"]} == {"finished"} and group["eta_seconds"] == 0.0
    table = llamahost("fleet", "status", "--storage", store.url, home=home)
    assert table.returncode == 0 and "host-0" in table.stdout and "baseline" in table.stdout


def test_finish_proves_the_winner_and_writes_the_result(fleet_run: dict[str, Any], model_path: Path) -> None:
    store, home = fleet_run["store"], fleet_run["home"]
    output = home / "group-result.yaml"
    done = llamahost("fleet", "finish", "--storage", store.url, "--model", str(model_path), *TINY,
                     "--budget", "30s", "--candidates", "1", "--output", str(output), "--json", home=home)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["verdict"] in ("improved", "inconclusive", "baseline-stands")
    assert result["verification"]["rounds"] >= 3
    fleet = result["fleet"]
    assert fleet["group"] == fleet_run["reports"][0]["group"] and fleet["hosts"] == ["host-0", "host-1"]
    assert fleet["trials"]["finished"] == WORKERS * TRIALS_EACH
    assert "memory_speed" in fleet["not_in_group_key"]
    assert "llama_server_threads" in result["settings"]["role_vars"]
    assert output.exists() and "fleet:" in output.read_text()
    _, trials = only_study(store)
    assert len(trials) == WORKERS * TRIALS_EACH, "proving the winner adds no trials to the study"


# ---- a worker killed with SIGKILL ---------------------------------------------------------------------------

def test_a_killed_worker_s_trial_fails_within_the_grace_period_and_is_retried_once(
        store: Store, model_path: Path, tmp_path: Path) -> None:
    killed = start_llamahost(*work(store, model_path, "host-a", "--budget", "10m"), home=tmp_path, host="host-a")
    survivor = start_llamahost(*work(store, model_path, "host-b", "--budget", "10m", "--json"), home=tmp_path,
                               host="host-b")
    try:
        def running_trial_of_killed() -> FrozenTrial | None:
            studies = store.studies()
            trials = next(iter(studies.values()), [])
            return next((t for t in trials if t.state == TrialState.RUNNING
                         and t.user_attrs.get("worker", {}).get("pid") == killed.pid), None)

        victim = wait_for(running_trial_of_killed, 180, "a running trial of the worker to kill")
        time.sleep(1.0)
        killed.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        killed.communicate(timeout=10)

        def victim_state() -> FrozenTrial | None:
            _, trials = only_study(store)
            trial = trials[victim.number]
            return trial if trial.state != TrialState.RUNNING else None

        failed = wait_for(victim_state, GRACE_PERIOD_S + 4 * HEARTBEAT_INTERVAL_S, "the killed trial to fail")
        elapsed = time.monotonic() - killed_at
        assert failed.state == TrialState.FAIL and "failure" not in failed.user_attrs
        # Stale once its last heartbeat (<= one interval before the kill) is older than the grace period.
        # Optuna fails stale trials when a worker asks for its next trial, so the survivor notices it at its
        # first ask after that: at most one of its trials later (trials run longer on a loaded machine).
        _, trials = only_study(store)
        survivor_trial_s = max((t.duration.total_seconds() for t in trials if t.duration is not None
                                and t.user_attrs.get("worker", {}).get("pid") == survivor.pid), default=0.0)
        assert elapsed >= GRACE_PERIOD_S - HEARTBEAT_INTERVAL_S - 1, "failed before its grace period ran out"
        assert elapsed <= GRACE_PERIOD_S + HEARTBEAT_INTERVAL_S + survivor_trial_s + 5, \
            f"failed {elapsed:.0f} s after the kill; the survivor's longest trial took {survivor_trial_s:.0f} s"

        def finished_retries() -> list[FrozenTrial] | None:
            _, trials = only_study(store)
            retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
            return retries if retries and all(t.state.is_finished() for t in retries) else None

        retries = wait_for(finished_retries, 120, "the retry of the killed trial to run")
        assert len(retries) == 1
        assert retries[0].params == failed.params
        assert retries[0].user_attrs["worker"]["pid"] == survivor.pid, "the surviving worker ran the retry"
    finally:
        for proc in (killed, survivor):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        out, err = survivor.communicate(timeout=120)
        killed.communicate(timeout=10)
    assert survivor.returncode == 130, err[-3000:]
    report = json.loads(out)
    assert report["stopped_by"] == "interrupted" and report["trials_run"] >= 2
    wait_for(lambda: not trial_workers(), 30, "the killed worker's llama.cpp process to end (its pipe is gone)")
    _, trials = only_study(store)
    assert not any(t.state == TrialState.RUNNING for t in trials)
    retried_numbers = [t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs]
    assert retried_numbers == [victim.number], "one retry, for the killed trial only"


# ---- a database restart mid-night -----------------------------------------------------------------------------

def test_a_database_restart_mid_trial_loses_nothing_and_the_night_goes_on(
        pg: PgCluster, model_path: Path, tmp_path: Path) -> None:
    """PostgreSQL stopped at once while a worker measures (every connection drops) and started 8 s later, inside
    the grace period: the trial that was measuring is recorded COMPLETE (its heartbeats and writes waited), and
    the worker runs its remaining trials and ends normally."""
    store = new_store(pg)
    worker = start_llamahost(*work(store, model_path, "host-a", "--trials", "4", "--budget", "10m", "--json"),
                             home=tmp_path, host="host-a")
    try:
        def measuring() -> FrozenTrial | None:
            trials = next(iter(store.studies().values()), [])
            return next((t for t in trials if t.state == TrialState.RUNNING and t.number >= 1), None)

        during = wait_for(measuring, 300, "a search trial to be measuring")
        pg.pause()
        time.sleep(8)
    finally:
        pg.resume()
    out, err = worker.communicate(timeout=600)
    assert worker.returncode == 0, err[-3000:]
    assert "study store unreachable" in err and "Traceback" not in err
    report = json.loads(out)
    assert report["trials_run"] == 4 and report["lost"] == 0 and report["failed"] == 0, report
    _, trials = only_study(store)
    assert trials[during.number].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == len(trials) >= 4


# ---- groups --------------------------------------------------------------------------------------------------

def test_two_groups_never_share_a_study_and_a_changed_host_is_refused(
        store: Store, model_path: Path, tmp_path: Path, llama_server_binary: Path) -> None:
    """Another group is recorded as if a host with more memory and another llama-server build had created it."""
    probe = read_host()
    here = group_fingerprint(probe, identify(llama_server_binary), model_sha256((model_path,)))
    fields = {**here.fields, "memory_gib": here.fields["memory_gib"] + 1000, "llama_server_sha256": "0" * 64}
    other = type(here)(fields)
    workload = Workload(pp_tokens=32, tg_tokens=8)
    other_name = group_study_name(model_path.stem, "tg", workload, other)
    storage = open_storage(store.url)
    open_study(other_name, storage, group_binding(other, "tg", {"pp_tokens": 32, "tg_tokens": 8, "seed": 1234},
                                                  "other"), baseline_params={"threads": 64})

    joined = llamahost(*work(store, model_path, "host-a", "--trials", "1", "--json"), home=tmp_path)
    assert joined.returncode == 0, joined.stderr[-3000:]
    mine = json.loads(joined.stdout)["study"]
    assert mine != other_name and mine == group_study_name(model_path.stem, "tg", workload, here)
    studies = store.studies()
    assert set(studies) == {mine, other_name}
    assert len(studies[other_name]) == 1 and studies[other_name][0].state == TrialState.WAITING
    assert len(studies[mine]) == 1 and studies[mine][0].state in FINISHED

    for command in ("work", "finish"):
        args = ["fleet", command, "--storage", store.url, "--model", str(model_path), "--study", other_name, *TINY]
        refused = llamahost(*args, home=tmp_path)
        assert refused.returncode == 2, refused.stderr
        assert "does not belong to the hardware group" in refused.stderr and "Traceback" not in refused.stderr
        assert f"memory_gib {fields['memory_gib']!r} there, {here.fields['memory_gib']!r} here" in refused.stderr
        assert f"llama_server_sha256 {'0' * 64!r} there" in refused.stderr
    single = llamahost("tune", "--storage", store.url, "--model", str(model_path), "--study", mine, "--budget", "1m",
                       home=tmp_path)
    assert single.returncode == 2 and "is a fleet study" in single.stderr
    after = store.studies()
    assert len(after[other_name]) == 1 and len(after[mine]) == 1, "refused hosts add nothing to any study"

    status = json.loads(llamahost("fleet", "status", "--storage", store.url, "--json", home=tmp_path).stdout)
    assert sorted(g["group"] for g in status["groups"]) == sorted([here.digest, other.digest])
    optuna_groups = {s.study_name: s.user_attrs["host_fingerprint"]
                     for s in optuna.get_all_study_summaries(storage)}
    assert optuna_groups == {mine: here.digest, other_name: other.digest}

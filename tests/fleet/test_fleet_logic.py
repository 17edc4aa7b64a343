"""Fleet logic without a database or a model: group fingerprints on recorded hosts, what `fleet status`
derives from trials (worker states, hosts, ETA), and how store errors are worded (no password, ever)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import IntDistribution
from optuna.trial import FrozenTrial, TrialState

from tuner.commands.fleet import print_status
from tuner.fleet.group import NOT_READ, group_binding, group_fingerprint, group_study_name
from tuner.fleet.status import BETWEEN, FINISHED, LOST, RUNNING, STOPPED, group_status
from tuner.probe import read_host
from tuner.server.identity import ServerBinary
from tuner.store import explain_open_error, hide_secret, redact
from tuner.study import FLEET_STUDY, HOST_STUDY
from tuner.trial.protocol import Workload

HOSTS = Path(__file__).parents[1] / "fixtures" / "hosts"
BUILD = ServerBinary(path="/usr/local/bin/llama-server", sha256="5e48" + "0" * 60, version="version: 0.5.0-dev",
                     system_info="CPU : AVX2 = 1 | OPENMP = 1 |")
SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


# ---- groups -------------------------------------------------------------------------------------------

def test_hosts_of_different_hardware_are_in_different_groups() -> None:
    epyc = group_fingerprint(read_host(HOSTS / "epyc-9654-2s-nps4"), BUILD, SHA)
    xeon = group_fingerprint(read_host(HOSTS / "xeon-8480-1s"), BUILD, SHA)
    again = group_fingerprint(read_host(HOSTS / "epyc-9654-2s-nps4"), BUILD, SHA)
    assert epyc.digest == again.digest and epyc.digest != xeon.digest
    assert epyc.fields["sockets"] == 2 and len(epyc.fields["numa_distances"]) == len(epyc.fields["numa_nodes"]) > 1
    assert epyc.fields["smt_threads_per_core"] == 2
    name = group_study_name("SmolLM2-135M", "tg", Workload(32, 8), epyc)
    assert name != group_study_name("SmolLM2-135M", "tg", Workload(32, 8), xeon)
    assert name == group_study_name("SmolLM2-135M", "tg", Workload(32, 8), again)
    assert name != group_study_name("SmolLM2-135M", "pp", Workload(32, 8), epyc)
    assert name != group_study_name("SmolLM2-135M", "tg", Workload(64, 8), epyc)


def test_the_llama_cpp_build_and_the_model_are_part_of_the_group() -> None:
    probe = read_host(HOSTS / "epyc-9654-2s-nps4")
    base = group_fingerprint(probe, BUILD, SHA).digest
    assert group_fingerprint(probe, dataclasses.replace(BUILD, sha256="7" * 64), SHA).digest != base
    assert group_fingerprint(probe, dataclasses.replace(BUILD, system_info="CPU : AVX512 = 1 |"), SHA).digest != base
    moved = dataclasses.replace(BUILD, path="/opt/llama-server/bin/llama-server")
    assert group_fingerprint(probe, moved, SHA).digest == base, "the same build elsewhere is the same build"
    assert group_fingerprint(probe, BUILD, "0" * 64).digest != base


def test_what_is_not_read_is_said_and_not_keyed() -> None:
    fields = group_fingerprint(read_host(HOSTS / "xeon-8480-1s"), BUILD, SHA).fields
    assert "memory_speed" in NOT_READ and "root" in NOT_READ["memory_speed"]
    assert not any("speed" in key for key in fields)
    assert fields["memory_gib"] > 0


def test_a_group_binding_is_a_fleet_binding_with_its_fields() -> None:
    group = group_fingerprint(read_host(HOSTS / "xeon-8480-1s"), BUILD, SHA)
    binding = group_binding(group, "tg", {"pp_tokens": 32, "tg_tokens": 8, "seed": 1}, "SmolLM2")
    attrs = binding.attrs()
    assert attrs["kind"] == FLEET_STUDY != HOST_STUDY
    assert attrs["host_fingerprint"] == group.digest and attrs["host"] == group.fields
    assert attrs["model_sha256"] == SHA


# ---- status -------------------------------------------------------------------------------------------

T0 = dt.datetime(2026, 1, 1, 12, 0, 0)
NOW = T0.timestamp() + 600


def trial(number: int, state: TrialState, *, worker: tuple[str, int] | None, seconds: float = 10.0,
          value: float | None = None, deadline: float | None = NOW + 1000, limit: int | None = None,
          **attrs: Any) -> FrozenTrial:
    user_attrs: dict[str, Any] = dict(attrs)
    if worker is not None:
        user_attrs["worker"] = {"name": worker[0], "hostname": worker[0], "pid": worker[1], "deadline": deadline,
                                "trials_limit": limit, "trial_index": 1}
    if value is not None:
        user_attrs["summary"] = {"median": value, "ci_low": value - 1, "ci_high": value + 1, "n": 5}
        user_attrs["config"] = {"threads": number}
        user_attrs["config_key"] = f"k{number}"
    start = T0 + dt.timedelta(seconds=20 * number)
    finished = state.is_finished()
    return FrozenTrial(number=number, state=state, value=value if state == TrialState.COMPLETE else None,
                       datetime_start=None if state == TrialState.WAITING else start,
                       datetime_complete=start + dt.timedelta(seconds=seconds) if finished else None,
                       params={"x": 1}, distributions={"x": IntDistribution(0, 2)}, user_attrs=user_attrs,
                       system_attrs={}, intermediate_values={}, trial_id=number, values=None)


def by_name(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {w["name"]: w for w in status["workers"]}


def test_worker_states_hosts_and_counts() -> None:
    trials = [
        trial(0, TrialState.COMPLETE, worker=("a", 1), value=10.0, role="baseline"),
        trial(1, TrialState.COMPLETE, worker=("a", 1), value=14.0),
        trial(2, TrialState.RUNNING, worker=("a", 1)),
        trial(3, TrialState.FAIL, worker=("b", 2)),  # heartbeat-failed: no reason recorded
        trial(4, TrialState.WAITING, worker=("b", 2)),  # its retry, carrying b's record until picked up
        trial(5, TrialState.FAIL, worker=("c", 3), failure="interrupted"),
        trial(6, TrialState.PRUNED, worker=("d", 4), limit=1),
        trial(7, TrialState.COMPLETE, worker=("e", 5), value=12.0),
    ]
    status = group_status("s", {"host_fingerprint": "g", "host": {"cpu_model": "X"}}, trials, NOW)
    workers = by_name(status)
    assert {n: w["state"] for n, w in workers.items()} == {"a": RUNNING, "b": LOST, "c": STOPPED, "d": FINISHED,
                                                            "e": BETWEEN}
    hosts = {h["name"]: h for h in status["hosts"]}
    assert hosts["b"]["trials"] == 1, "a waiting retry is nobody's trial yet"
    assert hosts["a"] == {"name": "a", "trials": 3, "complete": 2, "pruned": 0, "failed": 0, "running": 1}
    counts = status["counts"]
    assert (counts["running"], counts["waiting"], counts["complete"], counts["pruned"], counts["failed"]) == \
        (1, 1, 3, 1, 2)
    assert counts["finished"] == 6
    assert status["baseline"]["trial"] == 0 and status["baseline"]["value"] == 10.0
    assert status["best"]["trial"] == 1 and status["best"]["host"] == "a"
    assert status["best"]["vs_baseline"] == pytest.approx(1.4)
    assert status["best"]["ci_low"] == 13.0 and status["best"]["config"] == {"threads": 1}


def test_eta_is_the_longest_remaining_worker_by_deadline_or_trials() -> None:
    # mean trial duration 10 s; worker a: 8 of 10 trials left by count (80 s) but its deadline is in 30 s;
    # worker b: no deadline reached for 1000 s, 5 trials left -> 50 s; the group ends when b does.
    trials = [trial(i, TrialState.COMPLETE, worker=("a", 1), value=1.0 + i, deadline=NOW + 30, limit=10)
              for i in range(2)]
    trials += [trial(2 + i, TrialState.COMPLETE, worker=("b", 2), value=1.0, limit=6) for i in range(1)]
    status = group_status("s", {}, trials, NOW)
    workers = by_name(status)
    assert workers["a"]["remaining_seconds"] == pytest.approx(30)
    assert workers["b"]["remaining_seconds"] == pytest.approx(50)
    assert status["eta_seconds"] == pytest.approx(50)
    done = group_status("s", {}, [trial(0, TrialState.COMPLETE, worker=("a", 1), value=1.0, limit=1)], NOW)
    assert done["eta_seconds"] == 0.0 and by_name(done)["a"]["state"] == FINISHED


def test_a_failed_baseline_is_shown_with_its_reason() -> None:
    status = group_status("s", {}, [trial(0, TrialState.FAIL, worker=("a", 1), role="baseline",
                                          failure="llama.cpp crashed")], NOW)
    assert status["baseline"]["state"] == "fail" and status["baseline"]["failure"] == "llama.cpp crashed"
    assert status["best"] is None


def test_the_status_text_says_when_the_baseline_still_leads(capsys: pytest.CaptureFixture[str]) -> None:
    """The best candidate is shown with its ratio to the baseline; below 1 the text says the baseline leads
    (a "best so far" slower than the deployed configuration must not read as an improvement)."""
    def shown(candidate: float) -> str:
        trials = [trial(0, TrialState.COMPLETE, worker=("a", 1), value=10.0, role="baseline"),
                  trial(1, TrialState.COMPLETE, worker=("a", 1), value=candidate)]
        print_status([group_status("s", {"host_fingerprint": "g", "host": {"cpu_model": "X"}}, trials, NOW)])
        return capsys.readouterr().out

    behind = shown(8.0)
    assert "best candidate so far: 8.0 [7.0, 9.0] (trial 1, a) x0.800 vs baseline (the baseline leads)" in behind
    assert "its settings: threads=1" in behind
    ahead = shown(12.5)
    assert "x1.250 vs baseline" in ahead and "the baseline leads" not in ahead


# ---- store errors ---------------------------------------------------------------------------------------

URL = "postgresql://fleet:p%40ss:w0rd@db.example:6543/tuning"


def test_passwords_are_hidden_raw_and_url_encoded() -> None:
    assert "p%40ss" not in redact(URL) and "***" in redact(URL)
    text = hide_secret("server said p@ss:w0rd and p%40ss:w0rd", URL)
    assert "p@ss" not in text and "p%40ss" not in text and "w0rd" not in text


@pytest.mark.parametrize(("driver_message", "fragment", "fix"), [
    ('connection to server at "db.example", port 6543 failed: Connection refused', "cannot reach PostgreSQL at "
     "db.example:6543", "listens"),
    ('FATAL:  password authentication failed for user "fleet"', "refused the credentials of user 'fleet'",
     "pgpass"),
    ('FATAL:  database "tuning" does not exist', "database 'tuning' does not exist", "createdb"),
    ('FATAL:  no pg_hba.conf entry for host "10.0.0.5", user "fleet"', "does not accept connections", "pg_hba"),
    ("something else entirely p@ss:w0rd", "something else entirely ***", "check the URL"),
])
def test_open_errors_name_the_cause_and_the_fix(driver_message: str, fragment: str, fix: str) -> None:
    error = explain_open_error(URL, RuntimeError(driver_message))
    assert fragment in error.problem and fix in error.fix
    assert "w0rd" not in str(error) and "p%40ss" not in str(error)


def test_an_older_optuna_schema_is_known_to_this_optuna() -> None:
    # the revision the incompatible-schema test builds with Optuna's own migrations must be one Optuna knows
    from tuner.store import optuna_schema

    head, known = optuna_schema()
    assert head in known and "v3.0.0.d" in known and head != "v3.0.0.d"
    assert optuna.__version__ == "5.0.0"

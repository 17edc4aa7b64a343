"""The study store through an outage, without a database server: what is retried and for how long, a heartbeat
that cannot be written, and a trial the store failed as stale while it measured (recorded as lost, the search
goes on). The real PostgreSQL restart is tests/fleet/test_fleet_workers.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
from model_support import a_model
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import event
from sqlalchemy import exc as sqlalchemy_exc

from tuner import resilient_storage
from tuner.config import RunConfig
from tuner.errors import UserError
from tuner.probe import read_host
from tuner.progress import TuneProgress
from tuner.resilient_storage import ResilientRDBStorage, is_connection_error, retry_through_outages
from tuner.search import Search
from tuner.space import SearchSpace
from tuner.trial.runner import TrialOutcome

HOST = Path(__file__).resolve().parents[1] / "fixtures" / "hosts" / "epyc-kvm-2vcpu"


def dropped() -> sqlalchemy_exc.OperationalError:
    return sqlalchemy_exc.OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))


def test_connection_errors_are_told_from_refusals() -> None:
    assert is_connection_error(dropped())
    wrapped = optuna.exceptions.StorageInternalError("commit failed")
    wrapped.__cause__ = dropped()
    assert is_connection_error(wrapped)
    assert not is_connection_error(sqlalchemy_exc.IntegrityError("INSERT", {}, Exception("duplicate key")))
    assert not is_connection_error(ValueError("Cannot tell a FAIL trial."))


class Flaky:
    def __init__(self, failures: int, error: Exception) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "written"


def test_a_call_is_retried_with_backoff_until_the_database_is_back() -> None:
    slept: list[float] = []
    now = [0.0]

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    flaky = Flaky(6, dropped())
    assert retry_through_outages(flaky, what="tell", sleep=sleep, clock=lambda: now[0])() == "written"
    assert slept == [1, 2, 4, 8, 16, 30] and flaky.calls == 7


def test_an_outage_past_the_limit_is_the_users_and_other_errors_are_not_retried() -> None:
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with pytest.raises(UserError, match=r"unreachable for 15 min \(tell\)"):
        retry_through_outages(Flaky(10**6, dropped()), what="tell", sleep=sleep, clock=lambda: now[0])()
    assert now[0] == 900
    refused = Flaky(1, ValueError("bad value"))
    with pytest.raises(ValueError, match="bad value"):
        retry_through_outages(refused, what="tell", sleep=sleep, clock=lambda: now[0])()
    assert refused.calls == 1


def storage_at(tmp_path: Path) -> ResilientRDBStorage:
    return ResilientRDBStorage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=1, grace_period=5)


def test_every_call_a_trial_makes_through_optunas_cache_rides_out_a_dropped_connection(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first run of each distinct statement fails as a dropped connection would; the trial's whole life (ask,
    suggest, report, attributes, tell, reads) goes through the study as the search uses it, behind Optuna's cache,
    which calls private storage methods."""
    monkeypatch.setattr(resilient_storage, "FIRST_BACKOFF_S", 0.001)
    storage = storage_at(tmp_path)
    optuna.create_study(storage=storage, direction="maximize", study_name="night")
    seen: set[str] = set()
    dropped_statements: list[str] = []

    def drop_first_run(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement not in seen:
            seen.add(statement)
            dropped_statements.append(statement)
            raise dropped()

    event.listen(storage.engine, "before_cursor_execute", drop_first_run)
    study = optuna.load_study(study_name="night", storage=storage)
    for value in (1.0, 3.0):
        trial = study.ask()
        threads = trial.suggest_int("threads", 1, 8)
        trial.report(value / 2, 0)
        trial.set_user_attr("config", {"threads": threads})
        study.tell(trial, value)
    assert [t.values for t in study.trials] == [[1.0], [3.0]] and study.best_trial.number == 1
    assert study.trials[1].intermediate_values == {0: 1.5} and "config" in study.trials[1].user_attrs
    assert len(dropped_statements) >= 8, dropped_statements


def test_a_heartbeat_that_cannot_be_written_does_not_end_the_heartbeat(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = storage_at(tmp_path)

    def unreachable(self: RDBStorage, trial_id: int) -> None:
        raise dropped()

    monkeypatch.setattr(RDBStorage, "record_heartbeat", unreachable)
    storage.record_heartbeat(0)  # logged, not raised: the thread's loop writes again at the next interval

    def broken(self: RDBStorage, trial_id: int) -> None:
        raise ValueError("a bug, not an outage")

    monkeypatch.setattr(RDBStorage, "record_heartbeat", broken)
    with pytest.raises(ValueError):
        storage.record_heartbeat(0)

    def trial_gone(self: RDBStorage, trial_id: int) -> None:
        raise sqlalchemy_exc.IntegrityError("INSERT INTO trial_heartbeats", {}, Exception("violates foreign key"))

    monkeypatch.setattr(RDBStorage, "record_heartbeat", trial_gone)
    storage.record_heartbeat(0)  # a trial the database lost: logged, and the search records the trial as lost


class StaleFailingMeasurer:
    """Measures instantly; for the first trial it first does what another worker's stale check does while this
    one cannot reach the store: it fails the running trial in the store."""

    measuring_seconds = 0.0

    def __init__(self, storage: RDBStorage) -> None:
        self.storage = storage
        self.current: optuna.Trial | None = None

    def run(self, config: RunConfig, label: str, **_: Any) -> TrialOutcome:
        assert self.current is not None
        if self.current.number == 0:
            self.storage.set_trial_state_values(self.current._trial_id, TrialState.FAIL)
        return TrialOutcome(values=[10.0, 11.0, 12.0])


def two_trials(tmp_path: Path, measurer_class: type[StaleFailingMeasurer]
               ) -> tuple[Search, list[FrozenTrial | None]]:
    """Two trials of a fresh study, measured by ``measurer_class``; the search and what each run_one returned."""
    storage = storage_at(tmp_path)
    study = optuna.create_study(storage=storage, direction="maximize", study_name="night")
    measurer = measurer_class(storage)
    with TuneProgress(60, title="night") as progress:
        search = Search(study, SearchSpace(read_host(HOST), a_model(), "tg"), measurer, progress, unit="tok/s",
                        on_trial_start=lambda trial: setattr(measurer, "current", trial))
        return search, [search.run_one(), search.run_one()]


def test_a_trial_failed_as_stale_while_it_measured_is_lost_and_the_search_goes_on(tmp_path: Path) -> None:
    search, (lost, after) = two_trials(tmp_path, StaleFailingMeasurer)
    study = search.study
    assert lost is not None and after is not None
    assert lost.state == TrialState.FAIL and after.state == TrialState.COMPLETE
    assert (search.report.trials_run, search.report.lost, search.report.failed, search.report.complete) == (2, 1, 1, 1)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]


class ForgettingMeasurer(StaleFailingMeasurer):
    """Measures instantly; during the first trial the database forgets that trial, as one does that acknowledged
    its creation and then crashed before the write was durable (``synchronous_commit`` off)."""

    def __init__(self, storage: RDBStorage) -> None:
        super().__init__(storage)
        self.forgotten = 0

    def run(self, config: RunConfig, label: str, **_: Any) -> TrialOutcome:
        assert self.current is not None
        if not self.forgotten:
            self.forgotten += 1
            with self.storage.engine.begin() as connection:
                for table in ("trial_params", "trial_user_attributes", "trial_system_attributes", "trials"):
                    connection.exec_driver_sql(f"DELETE FROM {table} WHERE trial_id = ?", (self.current._trial_id,))
        return TrialOutcome(values=[10.0, 11.0, 12.0])


def test_a_trial_the_database_lost_is_logged_as_lost_and_the_search_goes_on(tmp_path: Path) -> None:
    search, (lost, after) = two_trials(tmp_path, ForgettingMeasurer)
    study = search.study
    assert lost is None and after is not None and after.state == TrialState.COMPLETE
    assert (search.report.trials_run, search.report.lost, search.report.failed, search.report.complete) == (2, 1, 1, 1)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]


def test_any_other_key_error_in_a_trial_is_not_taken_for_a_lost_trial(tmp_path: Path) -> None:
    class BuggyMeasurer(ForgettingMeasurer):
        def run(self, config: RunConfig, label: str, **_: Any) -> TrialOutcome:
            raise KeyError("threads")

    with pytest.raises(KeyError, match="threads"):
        two_trials(tmp_path, BuggyMeasurer)
    study = optuna.load_study(study_name="night", storage=storage_at(tmp_path))
    assert [t.state for t in study.trials] == [TrialState.FAIL]

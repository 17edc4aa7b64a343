"""The shared store on a real PostgreSQL, without trials: creation races, the stale-trial retry policy, and
every way opening the store can fail (clear message, exit 2, no password, nothing lost)."""

from __future__ import annotations

import multiprocessing
import subprocess
from pathlib import Path
from typing import Any

import alembic.command
import alembic.config
import optuna
import pytest
from fleet_helpers import FLEET_PASSWORD, FLEET_USER, Store, llamahost
from optuna.trial import TrialState
from pg_cluster import PgCluster, free_port

from tuner.errors import UserError
from tuner.study import BASELINE, FLEET_STUDY, ROLE_ATTR, StudyBinding, open_storage, open_study

pytestmark = [
    pytest.mark.postgres,
    # the test drives Optuna's heartbeat check by hand, outside Study.optimize, as a worker's watch does
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize"),
]

BINDING = StudyBinding(host_fingerprint="g" * 16, model_sha256="m" * 64, objective="tg",
                       workload={"pp_tokens": 32, "tg_tokens": 8, "seed": 1}, extra={}, kind=FLEET_STUDY)


def _open_concurrently(url: str, barrier: Any, results: Any) -> None:
    storage = open_storage(url)
    barrier.wait()
    _study, created = open_study("race", storage, BINDING, baseline_params={"threads": 2})
    results.put(created)


def test_workers_starting_together_create_one_study_with_one_baseline(store: Store) -> None:
    """Eight processes open the same new study at the same moment, on a store whose tables do not exist yet."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(8)
    results = ctx.Queue()
    procs = [ctx.Process(target=_open_concurrently, args=(store.url, barrier, results)) for _ in range(8)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0] * 8
    created = [results.get(timeout=5) for _ in procs]
    assert created.count(True) == 1
    trials = store.studies()["race"]
    assert len(trials) == 1 and trials[0].user_attrs[ROLE_ATTR] == BASELINE
    assert trials[0].state == TrialState.WAITING


def _backdate_heartbeats(pg: PgCluster, database: str, seconds: int) -> None:
    pg.admin(f"UPDATE trial_heartbeats SET heartbeat = heartbeat - interval '{seconds} seconds'", database=database)


def test_a_stale_trial_is_failed_and_retried_at_most_once(pg: PgCluster, store: Store) -> None:
    """A worker that stops sending heartbeats (killed) for longer than the grace period: its trial becomes
    FAIL and is re-queued once, as the same configuration and role; when the retry goes stale as well, it
    is failed and not re-queued again. The heartbeat is made old in the database, where Optuna reads it."""
    storage = open_storage(store.url)
    study, _ = open_study("stale", storage, BINDING, baseline_params={"threads": 2})
    first = study.ask()  # the enqueued baseline, now RUNNING
    storage.record_heartbeat(first._trial_id)
    _backdate_heartbeats(pg, store.database, 25)  # younger than the 30 s grace period: left alone
    optuna.storages.fail_stale_trials(study)
    assert study.trials[0].state == TrialState.RUNNING
    _backdate_heartbeats(pg, store.database, 10)  # now 35 s old
    optuna.storages.fail_stale_trials(study)
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    retry = trials[1]
    assert retry.params == trials[0].params and retry.user_attrs[ROLE_ATTR] == BASELINE
    assert retry.system_attrs["failed_trial"] == 0

    again = study.ask()
    assert again.number == 1, "the retry is the next trial any worker picks up"
    storage.record_heartbeat(again._trial_id)
    _backdate_heartbeats(pg, store.database, 60)
    optuna.storages.fail_stale_trials(study)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL], "retried at most once"


# ---- the store cannot be opened ---------------------------------------------------------------------------

def assert_refused(done: subprocess.CompletedProcess[str], fragment: str, home: Path) -> None:
    err = done.stderr
    assert done.returncode == 2, err
    assert "llamahost: error:" in err and fragment in err and "fix:" in err, err
    assert "Traceback" not in err
    assert FLEET_PASSWORD not in err + done.stdout, "a password must never be printed"
    assert not (home / "data" / "results").exists() and not (home / "data" / "studies.db").exists()


def test_unreachable_database(tmp_path: Path) -> None:
    url = f"postgresql://{FLEET_USER}:{FLEET_PASSWORD}@127.0.0.1:{free_port()}/nothing"
    assert_refused(llamahost("fleet", "status", "--storage", url, home=tmp_path), "cannot reach PostgreSQL at "
                   "127.0.0.1", tmp_path)


def test_wrong_credentials_leave_the_studies_alone(store: Store, tmp_path: Path, model_path: Path) -> None:
    storage = open_storage(store.url)
    open_study("kept", storage, BINDING, baseline_params={"threads": 2})
    wrong = store.url.replace(FLEET_PASSWORD, "not-the-password")
    done = llamahost("fleet", "work", "--storage", wrong, "--model", str(model_path), "--trials", "1", home=tmp_path)
    assert_refused(done, "refused the credentials of user 'fleet'", tmp_path)
    assert "not-the-password" not in done.stderr
    trials = store.studies()["kept"]
    assert len(trials) == 1 and trials[0].state == TrialState.WAITING


def test_missing_database_and_a_store_that_is_not_postgresql(pg: PgCluster, tmp_path: Path) -> None:
    url = pg.url(FLEET_USER, FLEET_PASSWORD, "no_such_db")
    assert_refused(llamahost("fleet", "status", "--storage", url, home=tmp_path), "database 'no_such_db' does not "
                   "exist", tmp_path)
    assert_refused(llamahost("fleet", "status", "--storage", f"sqlite:///{tmp_path}/x.db", home=tmp_path),
                   "is not a PostgreSQL URL", tmp_path)
    assert_refused(llamahost("fleet", "status", home=tmp_path), "need the shared study store", tmp_path)
    assert not (tmp_path / "x.db").exists()


def optuna_migrations(url: str) -> alembic.config.Config:
    """Optuna's own schema migrations (the scripts `optuna storage upgrade` runs), pointed at ``url``."""
    package = Path(optuna.__file__).parent / "storages" / "_rdb"
    config = alembic.config.Config(str(package / "alembic.ini"))
    config.set_main_option("script_location", str(package / "alembic"))
    config.set_main_option("sqlalchemy.url", url.replace("postgresql://", "postgresql+psycopg2://"))
    return config


def test_a_store_with_an_older_optuna_schema_is_refused_untouched_and_the_fix_works(
        pg: PgCluster, store: Store, tmp_path: Path) -> None:
    """The schema Optuna 3.0/3.1 wrote (revision v3.0.0.d), built by Optuna's own migrations, with a study
    in it. llamahost refuses it without changing anything; the upgrade its message names keeps the study."""
    alembic.command.upgrade(optuna_migrations(store.url), "v3.0.0.d")
    db = store.database
    pg.admin("INSERT INTO version_info (version_info_id, schema_version, library_version) VALUES (1, 12, '3.1.1')",
             database=db)
    pg.admin("INSERT INTO studies (study_id, study_name) VALUES (1, 'night-1')", database=db)
    pg.admin("INSERT INTO study_directions (study_direction_id, direction, study_id, objective) "
             "VALUES (1, 'MAXIMIZE', 1, 0)", database=db)
    tables = pg.admin("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'", database=db)

    for args in (["fleet", "status"], ["tune", "--budget", "1m"]):
        done = llamahost(*args, "--storage", store.url, home=tmp_path)
        assert_refused(done, "older Optuna schema (revision v3.0.0.d", tmp_path)
        assert "Optuna 3.1.1" in done.stderr and "optuna storage upgrade" in done.stderr
    assert pg.admin("SELECT version_num FROM alembic_version", database=db) == [("v3.0.0.d",)]
    assert pg.admin("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
                    database=db) == tables, "refusing must not create tables"

    alembic.command.upgrade(optuna_migrations(store.url), "head")  # what `optuna storage upgrade` does
    done = llamahost("fleet", "status", "--storage", store.url, "--json", home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "night-1" in store.studies()


def test_a_store_from_a_newer_optuna_is_refused(pg: PgCluster, store: Store, tmp_path: Path) -> None:
    """No newer Optuna exists to make one, so the revision a newer one would stamp is written by hand."""
    open_storage(store.url).engine.dispose()
    pg.admin("UPDATE alembic_version SET version_num = 'v6.0.0.a'", database=store.database)
    done = llamahost("fleet", "status", "--storage", store.url, home=tmp_path)
    assert_refused(done, "newer Optuna schema (revision v6.0.0.a", tmp_path)
    assert "upgrade llamahost on this host" in done.stderr
    assert pg.admin("SELECT version_num FROM alembic_version", database=store.database) == [("v6.0.0.a",)]


def test_open_storage_raises_user_errors_in_process(pg: PgCluster) -> None:
    with pytest.raises(UserError, match="refused the credentials") as raised:
        open_storage(pg.url(FLEET_USER, "wrong-pw", "postgres"))
    assert "wrong-pw" not in str(raised.value)

"""A study store that rides out a database outage: a PostgreSQL restart at 3 a.m. must not end the night.

With Optuna's own ``RDBStorage`` one failed heartbeat write ends the heartbeat thread (its loop has no
``except``). Thirty seconds later the healthy trial is failed as stale while it is still measuring, its own
``tell`` then raises "Cannot tell a FAIL trial", and the worker dies with it; any other call a trial makes
during the outage (ask, a reported sample, an attribute, the tell) ends the worker too.

:class:`ResilientRDBStorage` changes three things, and the search a fourth:

- a call that fails because the database cannot be reached is tried again with backoff (1, 2, 4 ... 30 s)
  for up to :data:`OUTAGE_LIMIT_S`; SQLAlchemy's pre-ping then reopens the pool's dead connections. Only
  after that long is the outage the user's to fix (:class:`UserError`, the study kept);
- a heartbeat that cannot be written is logged and written at the next interval: the thread never dies;
- a SQLite store whose disk is full (or that turned read-only) ends the run at once with one message: no
  outage, nothing to wait for;
- the tell after an outage longer than the grace period finds its trial failed as stale; the search
  (:meth:`tuner.search.Search.run_one`) then records the trial as lost and goes on. So it does for a trial the
  database lost outright (it acknowledged the trial, then crashed before the write was durable); its heartbeat,
  refused by the foreign key, is logged and skipped.

A retried write that had committed before the connection dropped is recognised for the tell (the stored
state is the one asked for). A retried ``create_new_trial`` could in that rare case leave one extra trial
that never ran; it is failed as stale like any trial without a live heartbeat.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from sqlalchemy import exc as sqlalchemy_exc

from tuner.errors import UserError

OUTAGE_LIMIT_S = 900.0  # a database restart or failover takes seconds to minutes; a quarter hour is not one
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
_log = logging.getLogger("llamahost.store")

T = TypeVar("T")


def causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and what caused it, in turn: Optuna wraps SQLAlchemy's errors in ``StorageInternalError``."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_connection_error(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) says the database could not be reached, rather than refused."""
    for cause in causes(error):
        if isinstance(cause, sqlalchemy_exc.DBAPIError) and cause.connection_invalidated:
            return True
        if isinstance(cause, sqlalchemy_exc.OperationalError | sqlalchemy_exc.InterfaceError
                      | sqlalchemy_exc.DisconnectionError | sqlalchemy_exc.PendingRollbackError):
            return True
    return False


# SQLite's words for a store it cannot write: no outage to wait out, a fault on the machine to fix.
SQLITE_WRITE_FAULTS = ("database or disk is full", "disk i/o error", "attempt to write a readonly database")


def sqlite_write_fault(error: BaseException) -> str | None:
    """SQLite's message when ``error`` says the store's file cannot be written (a full disk, an I/O error, a
    file turned read-only), else None. Told apart from an outage: waiting does not fix it."""
    for cause in causes(error):
        if isinstance(cause, sqlalchemy_exc.OperationalError):
            message = str(cause.orig or cause).splitlines()[0]
            if any(fault in message.lower() for fault in SQLITE_WRITE_FAULTS):
                return message
    return None


def retry_through_outages(call: Callable[..., T], *, what: str, sleep: Callable[[float], None] = time.sleep,
                          clock: Callable[[], float] = time.monotonic,
                          limit_s: float = OUTAGE_LIMIT_S) -> Callable[..., T]:
    """``call``, tried again with backoff while the database cannot be reached, for up to ``limit_s``."""

    @functools.wraps(call)
    def retried(*args: Any, **kwargs: Any) -> T:
        started = clock()
        backoff = FIRST_BACKOFF_S
        while True:
            try:
                return call(*args, **kwargs)
            except Exception as error:
                fault = sqlite_write_fault(error)
                if fault is not None:
                    raise UserError(f"the study store cannot be written ({what}): {fault}",
                                    "free space on the disk that holds the study store, or make it writable "
                                    "(every trial recorded before is kept), then run the same command again to "
                                    "resume") from None
                if not is_connection_error(error):
                    raise
                waited = clock() - started
                if waited >= limit_s:
                    raise UserError(f"the study store has been unreachable for {waited / 60:.0f} min ({what}): "
                                    f"{str(error).splitlines()[0][:200]}",
                                    "bring the database back (every finished trial is kept) and run the same "
                                    "command again to resume") from None
                _log.warning("study store unreachable (%s); trying again in %.0f s", what, backoff)
                sleep(min(backoff, max(0.0, limit_s - waited)))
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    return retried


# What a night's trials call on the store (ask, report, attributes, tell, stale checks, reads), with the private
# methods Optuna's cache in front of every study's storage calls instead of the public ones. Studies are created
# and bound before the night starts, where a failure is better reported at once.
RETRIED_CALLS = (
    "_create_new_trial", "_set_trial_param", "_get_trials", "_get_best_trial_id", "create_new_trial",
    "set_trial_param", "set_trial_intermediate_value", "set_trial_user_attr",
    "set_trial_system_attr", "get_trial", "get_all_trials", "get_n_trials", "get_best_trial",
    "get_trial_id_from_study_id_trial_number", "get_trial_number_from_id", "get_trial_param",
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions", "get_study_user_attrs",
    "get_study_system_attrs", "set_study_user_attr", "set_study_system_attr", "check_trial_is_updatable",
    "_get_stale_trial_ids",
)


class ResilientRDBStorage(RDBStorage):
    """``RDBStorage`` that waits out a database outage instead of ending the run (see the module docstring)."""

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except Exception as error:
            if any(isinstance(cause, sqlalchemy_exc.IntegrityError) for cause in causes(error)):
                # the trial is gone (a database that lost acknowledged writes); the search logs it as lost
                _log.warning("heartbeat of trial %d not written: the study store no longer holds the trial", trial_id)
                return
            if not is_connection_error(error):
                raise
            _log.warning("heartbeat of trial %d not written: the study store is unreachable; next interval", trial_id)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Any = None) -> bool:
        attempts = 0

        def tell() -> bool:
            nonlocal attempts
            attempts += 1
            try:
                return bool(super(ResilientRDBStorage, self).set_trial_state_values(trial_id, state, values))
            except optuna.exceptions.UpdateFinishedTrialError:
                if attempts > 1 and self.get_trial(trial_id).state == state:
                    return True  # the first attempt had committed before its connection dropped
                raise

        return retry_through_outages(tell, what=f"recording trial {trial_id}")()


for _name in RETRIED_CALLS:
    setattr(ResilientRDBStorage, _name,
            retry_through_outages(getattr(RDBStorage, _name), what=_name.strip("_").replace("_", " ")))

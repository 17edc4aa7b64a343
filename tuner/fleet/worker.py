"""One host's search worker for its group's study: search only, until a trial count or the budget is spent.

A worker is ``llamahost tune`` without the verification and the result file: the same intake, the same
trials (fresh llama.cpp process each, hard timeout, pruning), the same study machinery; many of them run
at once, on many hosts, against one study (Optuna's distributed mode; TPE's constant_liar keeps workers
that sample at the same moment apart). What a worker adds:

* **who ran each trial**: ``user_attrs["worker"]`` = name (default: the hostname; the playbook passes the
  inventory name), hostname, pid, the worker's deadline (epoch seconds) and trial limit, and the trial's
  index in that worker - ``llamahost fleet status`` derives hosts, worker states and the ETA from these;
* **a stale-trial watch**: Optuna marks a dead worker's RUNNING trial FAIL (and re-queues it once, see
  :mod:`tuner.study`) only when some worker *starts* a trial. With trials of minutes that can be long
  after the grace period, so every worker also checks every heartbeat interval.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.storages import RDBStorage

from tuner.fleet.session import GroupSession
from tuner.output import console
from tuner.paths import trial_log_dir
from tuner.progress import TuneProgress
from tuner.search import Interrupted, Measurer, Search, SearchReport, sigterm_as_interrupt
from tuner.study import HEARTBEAT_INTERVAL_S, quiet_optuna
from tuner.tune import UNITS

WORKER_ATTR = "worker"
STOPPED_BY_TRIALS = "trials"
STOPPED_BY_BUDGET = "budget"
STOPPED_BY_INTERRUPT = "interrupted"


@dataclass
class WorkerIdentity:
    """Stamped on every trial this worker runs; also tracks how long its trials take."""

    name: str
    budget_seconds: float
    trials_limit: int | None
    hostname: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    started_at: float = field(default_factory=time.time)
    trials_started: int = 0
    _last_start: float | None = None
    _durations: list[float] = field(default_factory=list)

    @property
    def deadline(self) -> float:
        """Epoch seconds (other hosts read it; monotonic clocks do not travel)."""
        return self.started_at + self.budget_seconds

    def stamp(self, trial: optuna.Trial) -> None:
        now = time.monotonic()
        if self._last_start is not None:
            self._durations.append(now - self._last_start)
        self._last_start = now
        self.trials_started += 1
        trial.set_user_attr(WORKER_ATTR, self.record(trial_index=self.trials_started))

    def record(self, *, trial_index: int) -> dict[str, Any]:
        return {"name": self.name, "hostname": self.hostname, "pid": self.pid, "started_at": self.started_at,
                "deadline": self.deadline, "trials_limit": self.trials_limit, "trial_index": trial_index}

    def expected_trial_seconds(self) -> float:
        """Half the mean trial time so far: start another trial only when that much budget is left."""
        return 0.5 * sum(self._durations) / len(self._durations) if self._durations else 0.0


class StaleTrialWatch:
    """Every heartbeat interval, fail trials whose worker stopped sending heartbeats (and re-queue them
    once, through the storage's callback). Runs on its own Study object in a daemon thread."""

    def __init__(self, study_name: str, storage: RDBStorage, interval_s: float = HEARTBEAT_INTERVAL_S) -> None:
        with quiet_optuna():
            self._study = optuna.load_study(study_name=study_name, storage=storage)
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stale-trial-watch", daemon=True)

    def __enter__(self) -> StaleTrialWatch:
        # process-wide, set before the thread starts: warnings.catch_warnings (quiet_optuna) is not thread-safe
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                optuna.storages.fail_stale_trials(self._study)
            except Exception as exc:  # a database hiccup must not end the worker; the next check retries
                # Optuna wraps the database's error in a generic one: the cause is what names the problem.
                cause = f" ({exc.__cause__})" if exc.__cause__ is not None else ""
                print(f"llamahost: warning: stale-trial check failed: {exc}{cause}", file=sys.stderr)


@dataclass
class WorkerReport:
    study: str
    group: str
    worker: dict[str, Any]
    search: SearchReport
    stopped_by: str
    wall_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"study": self.study, "group": self.group, "worker": self.worker, **self.search.__dict__,
                "stopped_by": self.stopped_by, "wall_seconds": self.wall_seconds}


def run_worker(session: GroupSession, *, worker_name: str | None, trials: int | None) -> WorkerReport:
    """Search trials against the group's study until ``trials`` are done or the budget is spent."""
    ctx = session.ctx
    req = ctx.request
    identity = WorkerIdentity(name=worker_name or socket.gethostname(), budget_seconds=req.budget_seconds,
                              trials_limit=trials)
    started = time.monotonic()
    deadline = started + req.budget_seconds
    log_dir = trial_log_dir(ctx.study.study_name)
    measurer = Measurer(ctx.model, ctx.settings, log_dir, multi_node=ctx.space.multi_node,
                        model_sha256=ctx.model_sha256)
    title = f"fleet worker {identity.name} (pid {identity.pid}) on {ctx.study.study_name}"
    stopped_by = STOPPED_BY_BUDGET
    with sigterm_as_interrupt(), TuneProgress(req.budget_seconds, title=title) as progress, \
            StaleTrialWatch(ctx.study.study_name, session.storage):
        progress.event(f"group {session.group.digest}: study {ctx.study.study_name} "
                       f"({'new' if ctx.study_created else 'joined'}, {len(ctx.study.trials)} trials so far)")
        search = Search(ctx.study, ctx.space, measurer, progress, unit=UNITS[req.objective],
                        on_trial_start=identity.stamp)
        try:
            search.run_until(lambda: deadline, identity.expected_trial_seconds, max_trials=trials)
            if search.report.trial_limit_reached:
                stopped_by = STOPPED_BY_TRIALS
        except (Interrupted, KeyboardInterrupt):
            search.report.interrupted = True
            stopped_by = STOPPED_BY_INTERRUPT
    report = WorkerReport(study=ctx.study.study_name, group=session.group.digest,
                          worker=identity.record(trial_index=identity.trials_started), search=search.report,
                          stopped_by=stopped_by, wall_seconds=time.monotonic() - started)
    if stopped_by == STOPPED_BY_INTERRUPT:
        console(stderr=True).print(f"[bold]interrupted[/bold]: study {ctx.study.study_name} is intact; the "
                                   "interrupted trial is recorded as failed", style="yellow")
    return report

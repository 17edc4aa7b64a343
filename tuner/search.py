"""The search: Optuna trials within a time budget, each one a fresh worker under a hard deadline.

The budget covers the whole run. Once the baseline has been measured, the time the final interleaved
verification will need is estimated from it and held back, so a ``--budget 30m`` run ends after about
30 minutes with a proven answer, not a search that ate all the time.

Interrupts: SIGTERM is turned into ``KeyboardInterrupt`` (Optuna only handles the latter), the running
trial is recorded as failed with the reason "interrupted", and the study stays intact for the next run.
"""

from __future__ import annotations

import contextlib
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import optuna
from optuna.storages._heartbeat import get_heartbeat_thread  # what optimize runs per trial
from optuna.trial import FrozenTrial, TrialState

from tuner.config import RunConfig
from tuner.errors import TrialFailed, UserError
from tuner.model.checksum import file_identity, model_sha256
from tuner.model.gguf_file import ModelInfo
from tuner.model_pages import PlacementKey, evict_page_cache, needs_page_reset, page_placement
from tuner.progress import TuneProgress
from tuner.space import SearchSpace
from tuner.stats import StopRule
from tuner.study import FIXED_CONFIG_ATTR, REPEAT_ATTR, RepeatPolicy, is_baseline, quiet_optuna
from tuner.trial.protocol import TrialSpec, Warmup, Workload
from tuner.trial.runner import TrialOutcome, TrialStopped, run_trial

SPAWN_OVERHEAD_S = 1.5  # worker interpreter start + llama-server start, measured on a 2-core guest


@dataclass(frozen=True)
class MeasureSettings:
    """How every run measures: the same for search trials and verification runs, bar the sample counts."""

    objective: str
    server_binary: Path  # the llama-server build the role deploys
    workload: Workload = field(default_factory=Workload)
    warmup: Warmup = field(default_factory=Warmup)
    stop: StopRule = field(default_factory=StopRule)
    max_measure_seconds: float = 60.0

    def spec(self, model: ModelInfo, config: RunConfig, *, stop: StopRule | None = None,
             pages_placed: bool = False) -> TrialSpec:
        return TrialSpec(model_path=str(model.path), config=config.to_dict(), objective=self.objective,  # type: ignore[arg-type]
                         server_binary=str(self.server_binary), workload=self.workload, warmup=self.warmup,
                         stop=stop or self.stop, max_measure_seconds=self.max_measure_seconds,
                         pages_placed=pages_placed)

    def timeout_for(self, model: ModelInfo) -> float:
        """A hard deadline no healthy run reaches: a slow disk load, a capped warm-up, capped sampling."""
        load = 60.0 + model.size_bytes / 100e6
        return load + 3.0 * self.max_measure_seconds + 60.0


class Interrupted(Exception):
    """The user (or a service manager) stopped the run; the study is intact."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    def _handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class MeasurerLike(Protocol):
    """What runs one configuration and measures it: a benchmark worker (:class:`Measurer`) or a live
    server under load (:class:`tuner.live.measure.LiveMeasurer`)."""

    measuring_seconds: float

    def run(self, config: RunConfig, label: str, *, stop: StopRule | None = None,
            on_sample: Callable[[int, float], bool] | None = None) -> TrialOutcome: ...


class Measurer:
    """Runs configurations in workers: the one place that knows logs, timeouts and page-cache resets."""

    def __init__(self, model: ModelInfo, settings: MeasureSettings, log_dir: Path, *, multi_node: bool,
                 model_sha256: str) -> None:
        self.model = model
        self.model_sha256 = model_sha256
        self.settings = settings
        self.log_dir = log_dir
        self.multi_node = multi_node
        self._last_placement: PlacementKey | None = None
        self.measuring_seconds = 0.0
        self.runs = 0
        self._identities = {path: file_identity(path) for path in model.files}

    def check_model_unchanged(self) -> None:
        """Refuse to measure once a model file was replaced or rewritten since the run began: trials on two
        different files would be compared as if they were one model. A file whose identity changed is hashed
        again; the same bytes (a copy put back) let the run go on."""
        try:
            now = {path: file_identity(path) for path in self._identities}
        except OSError:
            now = None
        if now == self._identities:
            return
        if now is not None and model_sha256(self.model.files) == self.model_sha256:
            self._identities = now
            return
        how = "it is gone" if now is None else "its sha256 is not the one measured so far"
        raise UserError(f"{self.model.path} changed during the run ({how}): the trials so far measured the "
                        "model as it was", "put the original file back and run the same command to resume, or "
                        "start a new study (--study NAME) for the new file")

    def _reset_page_cache_if_needed(self, config: RunConfig) -> bool:
        """Pages of an mmap'd model keep the NUMA placement of the process that first touched them.
        When a run's placement differs from the previous run's, drop them so this run places its own."""
        changed = needs_page_reset(self._last_placement, config, multi_node=self.multi_node)
        self._last_placement = page_placement(config)
        if changed:
            evict_page_cache(self.model.files)
        return changed

    def run(self, config: RunConfig, label: str, *, stop: StopRule | None = None,
            on_sample: Callable[[int, float], bool] | None = None) -> TrialOutcome:
        self.check_model_unchanged()
        evicted = self._reset_page_cache_if_needed(config)
        spec = self.settings.spec(self.model, config, stop=stop, pages_placed=evicted)
        try:
            outcome = run_trial(spec, timeout_s=self.settings.timeout_for(self.model),
                                log_path=self.log_dir / f"{label}.log", on_sample=on_sample)
        finally:
            self.runs += 1
        outcome.applied["page_cache_reset"] = evicted
        self.measuring_seconds += outcome.measuring_seconds
        return outcome


@dataclass
class SearchReport:
    trials_run: int = 0
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    lost: int = 0  # measured, but failed as stale or lost by the store during an outage (counted in failed too)
    repeats: int = 0  # proposed again and answered with the earlier measurement (in trials_run and complete)
    interrupted: bool = False
    trial_limit_reached: bool = False  # ended by --trials, not by the budget


def record_outcome(trial: optuna.Trial, outcome: TrialOutcome) -> None:
    summary = outcome.summary()
    trial.set_user_attr("summary", summary.to_dict())
    trial.set_user_attr("outcome", outcome.to_dict())
    for name in outcome.metric_names:
        metric_summary = outcome.metric_summary(name)
        if metric_summary is not None:
            trial.set_user_attr(name, metric_summary.to_dict())


def measurement_attrs(trial: FrozenTrial) -> dict[str, Any]:
    """What :func:`record_outcome` wrote on ``trial``: its summary, outcome and metric summaries."""
    outcome = trial.user_attrs.get("outcome", {})
    names = {"summary", "outcome", *outcome.get("series", {}), *outcome.get("info", {})}
    return {name: value for name, value in trial.user_attrs.items() if name in names}


# Called with each trial before it is measured (fleet workers record who runs it and until when).
TrialStartHook = Callable[[optuna.Trial], None]


class Search:
    """Runs search trials until the search part of the budget (or a trial count) is spent."""

    def __init__(self, study: optuna.Study, space: SearchSpace, measurer: MeasurerLike,
                 progress: TuneProgress, *, unit: str, on_trial_start: TrialStartHook | None = None) -> None:
        self.study = study
        self.space = space
        self.measurer = measurer
        self.progress = progress
        self.unit = unit
        self.on_trial_start = on_trial_start
        self.report = SearchReport()
        self.repeats = RepeatPolicy()
        # Whether this call of run_until runs a trial after the current one: a repeat's neighbour is enqueued only
        # then, so ``--trials N`` leaves N trials in the study and no queued one behind. A search that ends on
        # its deadline may leave one queued; the next run on the study (a resumed night, another worker) takes it
        # first.
        self._more_trials_follow = True

    def _objective(self, trial: optuna.Trial) -> float:
        if self.on_trial_start is not None:
            self.on_trial_start(trial)
        fixed = trial.user_attrs.get(FIXED_CONFIG_ATTR)
        config = RunConfig.from_dict(fixed, origin=f"the fixed configuration of trial {trial.number}") if fixed \
            else self.space.draw(trial)
        trial.set_user_attr("config", config.to_dict())
        trial.set_user_attr("config_key", config.key())
        baseline = is_baseline(trial)  # type: ignore[arg-type]
        earlier = None if baseline or fixed else self.repeats.earlier_measurement(self.study, config.key())
        if earlier is not None and earlier.value is not None:
            for name, value in measurement_attrs(earlier).items():  # not its role: a baseline stays one trial
                trial.set_user_attr(name, value)
            trial.set_user_attr(REPEAT_ATTR, earlier.number)
            if self._more_trials_follow:
                self.repeats.redirect(self.study, trial, self.space.neighbours(trial.params))
            return float(earlier.value)
        label = f"trial-{trial.number:04d}"
        self.progress.update(f"trial {trial.number}{' (baseline)' if baseline else ''}: {_short(config)}")

        def on_sample(step: int, running_median: float) -> bool:
            trial.report(running_median, step)
            return not baseline and trial.should_prune()

        try:
            outcome = self.measurer.run(config, label, on_sample=on_sample)
        except TrialStopped as stopped:
            trial.set_user_attr("pruned_at", stopped.step)
            raise optuna.TrialPruned(str(stopped)) from None
        except TrialFailed as failed:
            trial.set_user_attr("failure", failed.reason)
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("failure", "interrupted")
            raise
        record_outcome(trial, outcome)
        return outcome.value

    def run_one(self) -> FrozenTrial | None:
        """One trial through ask and tell, returned as it was recorded; None when the store lost the trial.

        Not ``study.optimize(n_trials=1)``: when a database outage outlasts the grace period, the store fails
        the trial as stale while it is still measuring, and optimize's own tell then ends the worker. Here the
        tell skips a trial that is already finished, the trial is logged as lost, and the search goes on.
        Stale trials are failed first and the heartbeat runs while the trial measures, as optimize does.

        A database that acknowledged the trial's creation and then lost it in a crash (``synchronous_commit``
        off, or a failover to a replica that had not yet received it) no longer holds the trial at all, and
        Optuna raises ``KeyError`` on its next write. That trial is logged as lost too, and the search goes on."""
        storage = self.study._storage
        lost = False
        trial: optuna.Trial | None = None
        with quiet_optuna(), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # fail_stale_trials
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.opt")
            try:
                optuna.storages.fail_stale_trials(self.study)
                trial = self.study.ask()
                value: float | None = None
                with get_heartbeat_thread(trial._trial_id, storage):
                    try:
                        value = self._objective(trial)
                        state = TrialState.COMPLETE
                    except optuna.TrialPruned:
                        state = TrialState.PRUNED
                    except TrialFailed:
                        state = TrialState.FAIL
                    except optuna.exceptions.UpdateFinishedTrialError:  # failed as stale while it measured
                        state, lost = TrialState.FAIL, True
                    except BaseException as error:
                        if not trial_vanished(error):
                            self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                        raise
                recorded = self.study.tell(trial, value, state=state, skip_if_finished=True)
            except KeyError as error:
                if not trial_vanished(error):
                    raise
                self._log_vanished(None if trial is None else trial.number)
                return None
        self._log(recorded, lost=lost or recorded.state != state)
        return recorded

    def _log_vanished(self, number: int | None) -> None:
        self.report.trials_run += 1
        self.report.failed += 1
        self.report.lost += 1
        self.progress.event(f"trial {'?' if number is None else number}: LOST - the study store no longer holds it "
                            "(the database lost writes it had acknowledged, in a crash or a failover); its "
                            "measurement is not recorded")

    def _log(self, trial: FrozenTrial, *, lost: bool = False) -> None:
        config = trial.user_attrs.get("config", {})
        self.report.trials_run += 1
        if trial.state == TrialState.COMPLETE and REPEAT_ATTR in trial.user_attrs:
            # A trial of the study like any other (a --trials limit counts it), which cost no measuring time.
            self.report.complete += 1
            self.report.repeats += 1
            self.progress.event(f"trial {trial.number}: proposed again, {trial.value:.1f} {self.unit} as measured in "
                                f"trial {trial.user_attrs[REPEAT_ATTR]} (not measured again) {_short_dict(config)}")
            return
        tag = " (baseline)" if is_baseline(trial) else ""
        if lost:
            self.report.failed += 1
            self.report.lost += 1
            self.progress.event(f"trial {trial.number}{tag}: LOST - the study store failed it as stale while it "
                                "could not be reached; its measurement is not recorded")
        elif trial.state == TrialState.COMPLETE:
            self.report.complete += 1
            summary = trial.user_attrs["summary"]
            self.progress.event(
                f"trial {trial.number}{tag}: {summary['median']:.1f} {self.unit} "
                f"[{summary['ci_low']:.1f}, {summary['ci_high']:.1f}] n={summary['n']} {_short_dict(config)}")
        elif trial.state == TrialState.PRUNED:
            self.report.pruned += 1
            self.progress.event(f"trial {trial.number}{tag}: pruned (clearly slower) {_short_dict(config)}")
        else:
            self.report.failed += 1
            self.progress.event(f"trial {trial.number}{tag}: FAILED - {trial.user_attrs.get('failure', '?')}")

    def run_until(self, deadline: Callable[[], float], min_trial_seconds: Callable[[], float],
                  *, max_trials: int | None = None) -> SearchReport:
        """Trials until the time left before ``deadline()`` is shorter than a trial is expected to take,
        or until this call has run ``max_trials`` trials (a baseline measured before the call is not one)."""
        started_with = self.report.trials_run
        try:
            while deadline() - time.monotonic() > min_trial_seconds():
                if max_trials is not None and self.report.trials_run - started_with >= max_trials:
                    self.report.trial_limit_reached = True
                    self.progress.event("the search ends: it ran the trials --trials asked for")
                    break
                self._more_trials_follow = max_trials is None or self.report.trials_run - started_with + 1 < max_trials
                self.run_one()
        except KeyboardInterrupt:
            self.report.interrupted = True
            raise Interrupted from None
        return self.report


def trial_vanished(error: BaseException) -> bool:
    """Whether ``error`` is Optuna's word for a trial the store does not hold (``KeyError``, "Record does not
    exist"): told apart from any other ``KeyError``, which is a bug to show."""
    return isinstance(error, KeyError) and "Record does not exist" in str(error)


def _short(config: RunConfig) -> str:
    return _short_dict(config.to_dict())


def _short_dict(config: dict[str, Any]) -> str:
    if not config:
        return ""
    parts = [f"t={config['threads']}/{config['threads_batch']}", f"b={config['batch_size']}/{config['ubatch_size']}",
             f"place={config['placement']}" + (f"[{config['cpus']}]" if config.get("cpus") else ""),
             f"fa={config['flash_attn']}", f"load={config['load_mode']}",
             f"kv={config['cache_type_k']}/{config['cache_type_v']}"]
    if config.get("numa", "none") != "none" or config.get("memory_policy", "default") != "default":
        parts.append(f"numa={config['numa']}/{config['memory_policy']}")
    return " ".join(parts)


def fixed_samples(rule: StopRule, samples: int) -> StopRule:
    """A stop rule that takes exactly ``samples`` samples (verification rounds must be alike)."""
    return replace(rule, min_samples=samples, max_samples=samples)

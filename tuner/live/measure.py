"""Live trials: run a configuration on the real server and measure it under the real workload.

A live trial is: apply the configuration (restart, /health), warm up with the workload until a capped
stability test passes, then measure windows (one pass over the request mix each) until the confidence
interval of the objective is narrow or a cap is hit. It returns the same :class:`TrialOutcome` as a
benchmark trial, so the search, the pruner, the verification and the result file serve both.

Guards stop a trial early and mark it failed (never scored): requests that fail, a p95 latency beyond a
multiple of the baseline's, a server using more memory than allowed, a configuration that does not come
up healthy. After a failure the baseline is restored before anything else happens.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from tuner.config import RunConfig
from tuner.errors import TrialFailed, UserError
from tuner.live.control import ServerControl, TrialStartFailed
from tuner.live.workload import RequestMix, Window, run_window
from tuner.stats import StopRule, sampling_should_stop, summarize, warmup_is_stable
from tuner.trial.runner import TrialOutcome, TrialStopped

OBJECTIVES = ("throughput", "latency")
MIN_REQUEST_DEADLINE_S = 10.0  # never cut a request off sooner: restarts and first requests are slow


@dataclass(frozen=True)
class LiveObjective:
    """What "better" means for a deployment: more tokens/s, or a lower p95 latency, optionally subject
    to a p95 time-to-first-token limit. Values are always "higher is better" and positive, so the same
    statistics apply: for latency the value is 1 / p95 latency."""

    name: str = "throughput"
    max_ttft_p95_s: float | None = None

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise UserError(f"unknown live objective {self.name!r}", f"use one of {', '.join(OBJECTIVES)}")
        if self.max_ttft_p95_s is not None and self.max_ttft_p95_s <= 0:
            raise UserError("--max-ttft-p95 must be positive", "pass e.g. --max-ttft-p95 2s")

    @property
    def unit(self) -> str:
        return "aggregate tok/s" if self.name == "throughput" else "1/p95 latency (1/s)"

    def value(self, metrics: dict[str, float]) -> float:
        if self.name == "throughput":
            return metrics["throughput_tps"]
        return 1.0 / metrics["latency_p95_s"]

    def violation(self, ttft_p95_s: float) -> float:
        """How far over the TTFT limit (<= 0 when within it): Optuna's constraint convention."""
        return 0.0 if self.max_ttft_p95_s is None else ttft_p95_s - self.max_ttft_p95_s


@dataclass(frozen=True)
class Guards:
    latency_multiple: float = 3.0  # p95 latency above this multiple of the baseline's stops a trial
    max_memory_bytes: int | None = None  # server RSS above this stops a trial


@dataclass(frozen=True)
class LiveSettings:
    stop: StopRule = field(default_factory=lambda: StopRule(min_samples=3, max_samples=12, target_rel_ci=0.03))
    max_measure_seconds: float = 300.0
    warmup_windows: int = 3
    warmup_tolerance: float = 0.10
    request_timeout_s: float = 300.0


class Heartbeat:
    """Confirms to the server side, every ``interval_s``, that the controller is alive (dead-man switch).

    A missed beat is not fatal - the switch is there for a controller that is gone - but it is not silent
    either: each miss is reported through ``on_miss`` and counted (the result records them), and a silence
    longer than the switch's limit is remembered as a *lapse*, because the host may then have put the baseline
    back while the controller went on measuring a trial (:meth:`lapsed_since`)."""

    def __init__(self, control: ServerControl, interval_s: float,
                 on_miss: Callable[[str], None] | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.control = control
        self.interval_s = interval_s
        self.on_miss = on_miss
        self.clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llamahost-heartbeat", daemon=True)
        self.failures = 0
        self.last_error: str | None = None
        self.last_success = clock()
        self._lapses: list[float] = []  # when a silence first exceeded the limit: the switch could fire from then

    @property
    def limit_s(self) -> float:
        return self.control.deadman_seconds

    def beat(self) -> None:
        """One beat (the thread's loop; a test calls it directly)."""
        try:
            self.control.heartbeat()
        except Exception as exc:  # a missed beat is what the dead-man switch is for; keep trying
            self.failures += 1
            self.last_error = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            silent = self.clock() - self.last_success
            if silent > self.limit_s and (not self._lapses or self._lapses[-1] < self.last_success):
                self._lapses.append(self.last_success + self.limit_s)
            if self.on_miss is not None:
                self.on_miss(f"heartbeat missed ({self.last_error}); silent for {silent:.0f} s of the dead-man "
                             f"limit's {self.limit_s:.0f} s")
        else:
            self.last_success = self.clock()

    def lapsed_since(self, since: float) -> bool:
        """Whether the server side may have restored its baseline at or after ``since`` (a ``clock()`` time):
        some silence since then, or the one going on now, outlasted the dead-man limit."""
        now_lapse = self.last_success + self.limit_s
        return any(moment >= since for moment in self._lapses) or (self.clock() > now_lapse >= since)

    def report(self) -> dict[str, object]:
        return {"interval_s": self.interval_s, "missed": self.failures, "lapses": len(self._lapses),
                **({"last_error": self.last_error} if self.last_error else {})}

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat()

    def __enter__(self) -> Heartbeat:
        self.control.heartbeat()
        self.last_success = self.clock()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class LiveMeasurer:
    """The live counterpart of :class:`tuner.search.Measurer` (same ``run`` signature)."""

    def __init__(self, control: ServerControl, mix: RequestMix, objective: LiveObjective,
                 settings: LiveSettings, guards: Guards) -> None:
        self.control = control
        self.mix = mix
        self.objective = objective
        self.settings = settings
        self.guards = guards
        self.baseline_latency_p95: float | None = None
        self.baseline: RunConfig | None = None  # the reference: never held to the guards measured against it
        self.measuring_seconds = 0.0
        self.runs = 0
        self.heartbeat: Heartbeat | None = None  # set while a run beats: a lapse voids the trial it crossed

    def _latency_limit(self, config: RunConfig) -> float | None:
        """The p95 latency a trial must stay under: a multiple of the baseline's (none for the baseline)."""
        if self.baseline_latency_p95 is None or config == self.baseline:
            return None
        return self.guards.latency_multiple * self.baseline_latency_p95

    def request_deadline(self, config: RunConfig) -> float | None:
        """Any single request slower than twice the latency guard ends the window: without it, one
        hopeless configuration could spend many minutes of an overnight budget on a single window."""
        limit = self._latency_limit(config)
        return None if limit is None else max(MIN_REQUEST_DEADLINE_S, 2.0 * limit)

    def _window(self, config: RunConfig) -> Window:
        return run_window(self.control.base_url, self.mix, api_key=self.control.api_key,
                          timeout_s=self.settings.request_timeout_s, deadline_s=self.request_deadline(config))

    def _check(self, window: Window, config: RunConfig, *, warming_up: bool = False) -> dict[str, float]:
        """Failed requests and memory always fail a trial; the p95-latency guard only judges warm windows
        (the first windows after a restart page the weights in and fill the caches: slow for everyone)."""
        if window.errors:
            raise TrialFailed(f"{len(window.errors)} of {len(window.records)} requests failed "
                              f"(first: {window.errors[0]})")
        metrics = window.metrics()
        limit = None if warming_up else self._latency_limit(config)
        if limit is not None and metrics["latency_p95_s"] > limit:
            raise TrialFailed(f"p95 latency {metrics['latency_p95_s']:.2f} s is over "
                              f"{self.guards.latency_multiple:g}x the baseline's {self.baseline_latency_p95:.2f} s")
        memory = self.control.server_memory_bytes()
        if self.guards.max_memory_bytes is not None and memory is not None and memory > self.guards.max_memory_bytes:
            raise TrialFailed(f"the server uses {memory / 2**30:.1f} GiB, over the limit of "
                              f"{self.guards.max_memory_bytes / 2**30:.1f} GiB")
        return metrics

    def _check_heartbeat(self, config: RunConfig, *, since: float) -> None:
        """A trial that a heartbeat lapse crossed may have been measured on the baseline the dead-man switch put
        back: it fails (and the baseline is restored on purpose) instead of being scored. The baseline's own
        numbers stand, since a revert runs the baseline anyway."""
        if self.heartbeat is None or self.baseline is None or config == self.baseline:
            return
        if self.heartbeat.lapsed_since(since):
            raise TrialFailed(f"no heartbeat reached the host for longer than its dead-man limit "
                              f"({self.heartbeat.limit_s:.0f} s) during this trial, so the host may have put the "
                              f"baseline back mid-trial (last error: {self.heartbeat.last_error})")

    @contextlib.contextmanager
    def _restoring_on_failure(self) -> Iterator[None]:
        try:
            yield
        except (TrialFailed, TrialStopped, KeyboardInterrupt):
            with contextlib.suppress(TrialStartFailed):
                self.control.restore_baseline()
            raise

    def run(self, config: RunConfig, label: str, *, stop: StopRule | None = None,
            on_sample: Callable[[int, float], bool] | None = None) -> TrialOutcome:
        rule = stop or self.settings.stop
        started = time.monotonic()
        outcome = TrialOutcome()
        self.runs += 1
        with self._restoring_on_failure():
            try:
                self.control.apply(config)
            except TrialStartFailed as exc:
                raise TrialFailed(f"the server did not come up healthy with this configuration: {exc}") from None
            outcome.load_seconds = time.monotonic() - started
            outcome.applied = {"server": self.control.describe(), **self.control.last_applied}
            warm_start = time.monotonic()
            for _ in range(self.settings.warmup_windows):
                window = self._window(config)
                metrics = self._check(window, config, warming_up=True)
                outcome.warmup_values.append(self.objective.value(metrics))
                if warmup_is_stable(outcome.warmup_values, window=2, tolerance=self.settings.warmup_tolerance):
                    outcome.warmup_stable = True
                    break
            outcome.warmup_seconds = time.monotonic() - warm_start
            measure_start = time.monotonic()
            deadline = measure_start + self.settings.max_measure_seconds
            reason: str | None = None
            while reason is None:
                metrics = self._check(self._window(config), config)
                outcome.values.append(self.objective.value(metrics))
                for name, value in metrics.items():
                    if name != "errors":
                        outcome.series.setdefault(name, []).append(value)
                if on_sample is not None and on_sample(len(outcome.values) - 1, summarize(outcome.values).median):
                    raise TrialStopped(len(outcome.values) - 1, summarize(outcome.values).median)
                reason = sampling_should_stop(outcome.values, rule)
                if reason is None and time.monotonic() > deadline:
                    reason = "max-time"
            outcome.stop_reason = reason
            outcome.measure_seconds = time.monotonic() - measure_start
            self._check_heartbeat(config, since=started)
        outcome.wall_seconds = time.monotonic() - started
        self.measuring_seconds += outcome.measuring_seconds
        return outcome

"""``llamahost tune --live``: tune a running deployment under its real workload, prove, write back.

The same search, proof and result as a benchmark run (:mod:`tuner.tune`), with three differences:

* trials run on the server itself through a :class:`~tuner.live.control.ServerControl` (a local supervised
  process, or the host's systemd unit), under a lock, with a heartbeat feeding the server-side dead-man
  switch for as long as the controller lives;
* the baseline is the configuration deployed now (from its role variables), else llama-server's defaults;
* a proven winner can be written back into the inventory (``host_vars``), kept in the file's own layout,
  and made the running configuration.

Between trials and at the end the server runs its baseline unless a winner was proven and applied.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import optuna
from optuna.trial import FrozenTrial
from rich.markup import escape

from tuner.config import RunConfig
from tuner.errors import UserError
from tuner.live.control import ServerControl, Target
from tuner.live.drain import RestartGuard, RestartPolicy, UndrainFailed, downtime_line
from tuner.live.measure import Guards, Heartbeat, LiveMeasurer, LiveObjective, LiveSettings
from tuner.live.space import LiveSearchSpace
from tuner.live.workload import RequestMix
from tuner.model.gguf_file import ModelInfo
from tuner.paths import results_dir
from tuner.pipeline import ProofSettings, RunSteps, search_and_prove
from tuner.probe.host import HostProbe
from tuner.progress import TuneProgress
from tuner.proof_defaults import ALPHA, CANDIDATES, LIVE_VERIFY_WINDOWS, MAX_LOAD_FACTOR, MAX_ROUNDS, MIN_EFFECT
from tuner.report import write_report
from tuner.result import TuneResult, assemble_result, host_block, model_block
from tuner.safe_change import STATE_APPLIED, STATE_APPLY_FAILED, record_write_back, save_and_write, written_message
from tuner.search import Interrupted, Search, sigterm_as_interrupt
from tuner.server.identity import ServerBinary
from tuner.study import (
    StudyBinding,
    baseline_trial,
    best_trials,
    check_binding,
    fail_stale_trials,
    load_existing_study,
    open_existing_storage,
    open_storage,
    open_study,
)
from tuner.tune import MIN_BUDGET_S, announce_numa_blocked
from tuner.verify import Verification
from tuner.writeback import WriteBack, plan_vars

BASELINE_NAME = "the deployed configuration"  # what a live run measures every candidate against
TOKENS_PER_WORD = 1.6  # generous: the built-in mixes' plain English words, and most user prompts


@dataclass(frozen=True)
class LiveRequest:
    budget_seconds: float
    objective: LiveObjective = field(default_factory=LiveObjective)
    study_name: str | None = None
    storage_url: str | None = None
    output: Path | None = None
    candidates: int = CANDIDATES
    verify_windows: int = LIVE_VERIFY_WINDOWS
    alpha: float = ALPHA
    min_effect: float = MIN_EFFECT
    max_load_factor: float = MAX_LOAD_FACTOR
    max_rounds: int = MAX_ROUNDS
    seed: int | None = None
    trials: int | None = None  # search trials after the baseline at most; None: only the budget limits
    guards: Guards = field(default_factory=Guards)
    settings: LiveSettings = field(default_factory=LiveSettings)
    search_kv_cache: bool = True
    host_vars: Path | None = None  # write a proven winner here
    inventory: Path | None = None  # the inventory host_vars belongs to (default: the directory holding it)
    apply: bool = False  # make a proven winner the running configuration
    verify_only: bool = False  # `llamahost apply`: prove the study's best against the baseline, no search
    restarts: RestartPolicy = field(default_factory=RestartPolicy)  # drain, undrain, cap (tuner.live.drain)


def validate_live_request(request: LiveRequest) -> None:
    if request.budget_seconds <= 0:
        raise UserError("the budget must be positive", "pass e.g. --budget 8h")
    if request.budget_seconds < MIN_BUDGET_S:
        raise UserError(f"a budget of {request.budget_seconds:.0f} s cannot measure a baseline and verify it",
                        "live trials take minutes each: pass --budget 20m or more")
    if request.candidates < 1:
        raise UserError("--candidates must be at least 1", "pass --candidates 3")


def ctx_per_slot(mix: RequestMix) -> int:
    """Context one request needs (prompt + generated tokens), rounded up to 256, with room to spare."""
    need = max(math.ceil(len(r.prompt.split()) * TOKENS_PER_WORD) + r.max_tokens for r in mix.requests) + 64
    return max(512, ((need + 255) // 256) * 256)


@dataclass
class LiveContext:
    request: LiveRequest
    control: RestartGuard  # the server's control, each restart drained, capped and counted
    mix: RequestMix
    model: ModelInfo
    model_sha256: str
    probe: HostProbe
    space: LiveSearchSpace
    study: optuna.Study
    study_created: bool
    result_path: Path
    server: ServerBinary | None = None  # the build the deployment runs (recorded in the result)


def objective_key(objective: LiveObjective) -> str:
    key = f"live-{objective.name}"
    return key + (f"-ttft{objective.max_ttft_p95_s:g}s" if objective.max_ttft_p95_s is not None else "")


def ttft_constraint(objective: LiveObjective) -> Any:
    """Optuna constraint values for the TTFT limit (<= 0 when met), from the trial's recorded p95 TTFT."""
    if objective.max_ttft_p95_s is None:
        return None

    def constraint(trial: FrozenTrial) -> Sequence[float]:
        ttft = trial.user_attrs.get("ttft_p95_s")
        return [objective.violation(ttft["median"])] if ttft else [0.0]

    return constraint


def eligible(objective: LiveObjective) -> Any:
    if objective.max_ttft_p95_s is None:
        return None

    def within_limit(trial: FrozenTrial) -> bool:
        ttft = trial.user_attrs.get("ttft_p95_s")
        return ttft is not None and objective.violation(ttft["median"]) <= 0

    return within_limit


def _study_identity(request: LiveRequest, *, control: ServerControl, mix: RequestMix,
                    target: Target) -> tuple[LiveSearchSpace, str, StudyBinding]:
    """The search space, the study's name and what binds the study to this server, model and workload."""
    model, model_sha256, probe = target.model, target.model_sha256, target.probe
    space = LiveSearchSpace(probe, model, concurrency=mix.concurrency, ctx_per_slot=ctx_per_slot(mix),
                            baseline=target.deployed, search_kv_cache=request.search_kv_cache,
                            usable_cpus=target.usable_cpus, numa_blocked=target.numa_blocked, knobs=target.knobs)
    key = objective_key(request.objective)
    name = request.study_name or f"live-{model.path.stem.lower()[:32]}-{model_sha256[:8]}-{key}-" \
                                 f"{mix.name}-c{mix.concurrency}-{probe.fingerprint()[:8]}"
    binding = StudyBinding(
        host_fingerprint=probe.fingerprint(), model_sha256=model_sha256, objective=key,
        workload={**mix.describe(), "ctx_per_slot": space.ctx_per_slot},
        extra={"host": probe.fingerprint_fields(), "hostname": probe.hostname, "server": control.describe(),
               "baseline": space.baseline().to_dict()},
    )
    return space, name, binding


@dataclass(frozen=True)
class ApplyPlan:
    """What ``llamahost apply`` would do, read without measuring or changing anything (``--dry-run``)."""

    study: str
    baseline: RunConfig
    baseline_median: float | None
    candidates: list[tuple[str, RunConfig, float | None]]  # label, configuration, its search median
    unit: str
    host_vars_diff: str  # the vars file's diff if the first candidate is proven (empty: no file, or no change)


def plan_apply(request: LiveRequest, *, control: ServerControl, mix: RequestMix, target: Target) -> ApplyPlan:
    """The candidates ``apply`` would prove against the deployed configuration, from the existing study (never
    created here, and checked against this server, model and workload as a real run checks it), and the
    change ``--host-vars`` would get if the first of them is proven."""
    validate_live_request(request)
    space, name, binding = _study_identity(request, control=control, mix=mix, target=target)
    study = load_existing_study(name, open_existing_storage(request.storage_url))
    check_binding(study, binding)
    top = best_trials(study, request.candidates, eligible=eligible(request.objective))
    candidates = [(f"trial-{t.number}", RunConfig.from_dict(t.user_attrs["config"], origin=f"trial {t.number}"),
                   t.value) for t in top]
    base = baseline_trial(study)
    diff = ""
    if request.host_vars is not None and candidates:
        diff = plan_vars(request.host_vars, candidates[0][1].role_vars("live"),
                         note=f"tuned by llamahost apply: study {name}, {candidates[0][0]}").diff
    return ApplyPlan(study=name, baseline=space.baseline(), baseline_median=base.value if base else None,
                     candidates=candidates, unit=request.objective.unit, host_vars_diff=diff)


def prepare_live(request: LiveRequest, *, control: ServerControl, mix: RequestMix, target: Target) -> LiveContext:
    """Everything is checked before the study is opened; opening it is the first write."""
    validate_live_request(request)
    space, name, binding = _study_identity(request, control=control, mix=mix, target=target)
    storage = open_storage(request.storage_url)
    study, created = open_study(name, storage, binding, baseline_params=space.baseline_params(),
                                baseline_config=space.baseline(), seed=request.seed,
                                constraints=ttft_constraint(request.objective))
    result_path = request.output or results_dir() / f"{name}.yaml"
    guarded = RestartGuard(control, request.restarts)
    return LiveContext(request, guarded, mix, target.model, target.model_sha256, target.probe, space, study, created,
                       result_path, target.server)


@dataclass
class LiveOutcome:
    result: TuneResult
    result_path: Path
    verification: Verification
    write_back: WriteBack | None
    applied: bool


def _disqualify_slow_starters(verification: Verification, objective: LiveObjective) -> None:
    """A winner must keep the TTFT promise in the verification rounds too, not only during the search."""
    if objective.max_ttft_p95_s is None:
        return
    for arm in verification.candidates:
        ttft = arm.metric("ttft_p95_s")
        if arm.comparison is not None and ttft is not None and objective.violation(ttft.median) > 0:
            arm.failure = f"p95 TTFT {ttft.median:.2f} s is over the {objective.max_ttft_p95_s:g} s limit"
            arm.comparison = None


def run_live(ctx: LiveContext) -> LiveOutcome:
    req = ctx.request
    started = time.monotonic()
    deadline = started + req.budget_seconds
    measurer = LiveMeasurer(ctx.control, ctx.mix, req.objective, req.settings, req.guards)
    title = f"live tuning {ctx.control.describe()} ({req.objective.name}, {ctx.mix.name} x{ctx.mix.concurrency})"
    heartbeat_every = max(1.0, ctx.control.deadman_seconds / 4)
    restarts = ctx.control
    with sigterm_as_interrupt(), TuneProgress(req.budget_seconds, title=title) as progress, \
            Heartbeat(ctx.control, heartbeat_every, on_miss=lambda miss: progress.event(escape(miss))) as heartbeat, \
            _events_to(restarts, progress):
        measurer.heartbeat = heartbeat
        restarts.deadline = deadline
        baseline_args = " ".join(ctx.space.baseline().server_args())
        progress.event(f"study {ctx.study.study_name} ({'new' if ctx.study_created else 'resumed'}, "
                       f"{len(ctx.study.trials)} trials so far); baseline: {baseline_args}")
        announce_numa_blocked(ctx.space, progress)
        search = Search(ctx.study, ctx.space, measurer, progress, unit=req.objective.unit)

        def bound_latency_by(base: FrozenTrial) -> None:
            latency = base.user_attrs.get("latency_p95_s")
            measurer.baseline_latency_p95 = latency["median"] if latency else None
            measurer.baseline = ctx.space.baseline()

        steps = RunSteps(baseline_name=BASELINE_NAME,
                         baseline_fix=f"check that the baseline serves this workload; the server's log: "
                                      f"{ctx.control.server_log()}",
                         candidates=req.candidates, trials=req.trials, searching=not req.verify_only,
                         eligible=eligible(req.objective))
        try:
            proven = search_and_prove(search, ProofSettings.of(req, req.settings.stop, samples=req.verify_windows),
                                      steps, started=started, budget_s=req.budget_seconds, pacing=restarts,
                                      on_baseline=bound_latency_by)
            verification = proven.verification
            _disqualify_slow_starters(verification, req.objective)
            ctx.control.restore_baseline()
            fail_stale_trials(ctx.study)  # a trial cut off just before this run may only now be past its grace
        except KeyboardInterrupt:
            raise Interrupted from None
        result = assemble_result(
            kind="live", study=ctx.study.study_name, study_trials=len(ctx.study.trials),
            objective=objective_key(req.objective), unit=req.objective.unit,
            verification=verification, host=host_block(ctx.probe), model=model_block(ctx.model, ctx.model_sha256),
            workload={**ctx.mix.describe(), "ctx_per_slot": ctx.space.ctx_per_slot}, server=ctx.server,
            search={**search.report.__dict__, "plan": proven.plan.to_dict()}, wall_seconds=time.monotonic() - started,
            measuring_seconds=measurer.measuring_seconds, roofline=None,
            baseline_name=BASELINE_NAME)
        result.server = ctx.control.describe()
        result.heartbeat = heartbeat.report()
        result.downtime = restarts.report()
        progress.event(f"downtime: {downtime_line(result.downtime)}")
        written, applied = save_write_and_apply(ctx, result, progress, downtime=restarts.report)
        report = ctx.result_path.with_suffix(".html")
        write_report(report, result, ctx.study)
        progress.event(f"result written to {ctx.result_path}, report to {report}")
    return LiveOutcome(result, ctx.result_path, verification, written, applied)


class Events(Protocol):
    """Where a step reports what it did (the run's progress display)."""

    def event(self, message: str) -> None: ...


@contextlib.contextmanager
def _events_to(restarts: RestartGuard, progress: Events) -> Iterator[None]:
    """The restart guard's waits and failures in the run's display while it shows (stderr before and after)."""
    before = restarts.events
    restarts.events = lambda message: progress.event(escape(message))
    try:
        yield
    finally:
        restarts.events = before


def save_write_and_apply(ctx: LiveContext, result: TuneResult, progress: Events, *,
                         downtime: Callable[[], dict[str, Any]] | None = None) -> tuple[WriteBack | None, bool]:
    """Result first, then the vars file (:mod:`tuner.safe_change`), then the apply; a failed apply puts the vars
    file back, so the inventory never names a winner the host does not run. ``downtime`` gives the result's
    restart record again after the apply (its restart counts too)."""
    req = ctx.request
    written = save_and_write(ctx.result_path, result, req.host_vars, inventory=req.inventory,
                             hardware=ctx.probe.fingerprint())
    if req.host_vars is not None:
        progress.event(written_message(req.host_vars, written, result.summary))
    if not result.improved:
        return None, False
    if not req.apply:
        return written, False
    winner = result.chosen_config(origin="the proven winner")
    try:
        ctx.control.adopt(winner)
    except (UserError, OSError, RuntimeError) as exc:
        if downtime is not None:
            result.downtime = downtime()
        if isinstance(exc, UndrainFailed):  # the winner runs (the host is left drained): the inventory keeps it
            record_write_back(ctx.result_path, result, req.host_vars, STATE_APPLIED, written, applied=True)
            raise
        restored = written is not None and written.wrote
        if restored and written is not None:
            written.restore()
        why = exc.problem if isinstance(exc, UserError) else str(exc)
        record_write_back(ctx.result_path, result, req.host_vars, STATE_APPLY_FAILED, written, reason=why)
        raise UserError(f"the proven winner could not be applied ({why})",
                        (f"{req.host_vars} was put back as it was; " if restored else "")
                        + f"the proof is kept in {ctx.result_path}: fix the cause, then "
                          f"`llamahost apply --study {ctx.study.study_name}`") from None
    progress.event(f"the server now runs the proven configuration: {' '.join(winner.server_args())}")
    if downtime is not None:
        result.downtime = downtime()
    record_write_back(ctx.result_path, result, req.host_vars, STATE_APPLIED, written, applied=True)
    return written, True

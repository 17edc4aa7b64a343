"""``llamahost tune``: check everything, search, prove, write - in that order.

Every check that can fail on bad input (model file, memory, storage, study binding) runs before the first
trial and before anything is written, so a bad invocation costs nothing and loses nothing. Then the
search runs within the budget, the best candidates are verified against the baseline, and the result
file is written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.build_knobs import knobs_of
from tuner.errors import UserError
from tuner.model.checksum import model_sha256
from tuner.model.default_model import default_model_path
from tuner.model.gguf_file import ModelInfo, check_fits_in_memory, inspect_model
from tuner.model_pages import page_reset_blocked
from tuner.output import console
from tuner.paths import results_dir, trial_log_dir
from tuner.pipeline import ProofSettings, RunSteps, search_and_prove
from tuner.probe import BandwidthError, probe_host
from tuner.probe.bandwidth import DEFAULT_SECONDS as DEFAULT_BANDWIDTH_SECONDS
from tuner.probe.bandwidth_cache import measure_and_record
from tuner.probe.host import BandwidthResult, HostProbe
from tuner.progress import TuneProgress
from tuner.proof_defaults import (
    ALPHA,
    BENCHMARK_VERIFY_SAMPLES,
    CANDIDATES,
    MAX_LOAD_FACTOR,
    MAX_ROUNDS,
    MIN_EFFECT,
)
from tuner.report import write_report
from tuner.result import TuneResult, assemble_result, host_block, model_block, write_result
from tuner.roofline import Roofline, mean_context_depth, roofline
from tuner.search import (
    Interrupted,
    Measurer,
    MeasurerLike,
    MeasureSettings,
    Search,
    sigterm_as_interrupt,
)
from tuner.server.build import deployed_server_binary
from tuner.server.flags import server_flags
from tuner.server.identity import ServerBinary, identify
from tuner.space import SearchSpace
from tuner.stats import StopRule
from tuner.study import (
    StudyBinding,
    open_storage,
    open_study,
)
from tuner.trial.protocol import Warmup, Workload
from tuner.verify import Arm, Verification

MIN_BUDGET_S = 30.0
BASELINE_NAME = "llama.cpp's defaults"  # what a benchmark run measures every candidate against
UNITS = {"tg": "tg tok/s", "pp": "pp tok/s", "both": "sqrt(pp*tg) tok/s"}


@dataclass(frozen=True)
class TuneRequest:
    budget_seconds: float
    objective: str = "tg"
    model_path: Path | None = None
    study_name: str | None = None
    storage_url: str | None = None
    output: Path | None = None
    workload: Workload = field(default_factory=Workload)
    candidates: int = CANDIDATES
    verify_samples: int = BENCHMARK_VERIFY_SAMPLES
    alpha: float = ALPHA
    min_effect: float = MIN_EFFECT
    max_load_factor: float = MAX_LOAD_FACTOR
    max_rounds: int = MAX_ROUNDS
    search_kv_cache: bool = True
    max_measure_seconds: float | None = None  # None: derived from the budget, see measure_cap()
    seed: int | None = None
    trials: int | None = None  # search trials after the baseline at most; None: only the budget limits
    stop: StopRule = field(default_factory=StopRule)
    server_binary: Path | None = None  # None: the portable build the role deploys, built on first use


@dataclass
class TuneContext:
    request: TuneRequest
    model: ModelInfo
    model_sha256: str
    probe: HostProbe
    space: SearchSpace
    study: optuna.Study
    study_created: bool
    settings: MeasureSettings
    result_path: Path
    server: ServerBinary


def default_study_name(model: ModelInfo, sha: str, objective: str, probe: HostProbe) -> str:
    stem = model.path.stem.lower().replace(" ", "-")[:40]
    return f"{stem}-{sha[:8]}-{objective}-{probe.fingerprint()[:8]}"


def validate_request(request: TuneRequest) -> None:
    if request.budget_seconds <= 0:
        raise UserError("the budget must be positive", "pass e.g. --budget 30m or --budget 8h")
    if request.budget_seconds < MIN_BUDGET_S:
        raise UserError(f"a budget of {request.budget_seconds:.0f} s cannot measure a baseline and verify it",
                        f"pass at least --budget {int(MIN_BUDGET_S)}s (minutes are better: --budget 10m)")
    if request.objective not in UNITS:
        raise UserError(f"unknown objective {request.objective!r}", "use tg, pp or both")
    if request.candidates < 1:
        raise UserError("--candidates must be at least 1", "pass --candidates 3")


@dataclass(frozen=True)
class Intake:
    """Everything checked about the inputs before any store is opened: the model, this host, the space."""

    model: ModelInfo
    model_sha256: str
    probe: HostProbe
    space: SearchSpace
    server: ServerBinary


def intake(request: TuneRequest) -> Intake:
    """Model and host checks, in the order a user would want to hear about problems; writes nothing."""
    try:
        request.workload.validate()
    except ValueError as exc:
        raise UserError(f"invalid workload: {exc}", "pass --pp-tokens and --tg-tokens of at least 1") from None
    model_path = request.model_path if request.model_path is not None else default_model_path()
    model = inspect_model(model_path)
    probe = probe_host(bandwidth=False)  # the bandwidth is measured once the run is known to go ahead
    check_fits_in_memory(model, probe.memory_available_bytes)
    sha = model_sha256(model.files)
    blocked = page_reset_blocked(model.files) if len(probe.topology.nodes) > 1 else None
    server = identify(request.server_binary or deployed_server_binary())
    knobs = knobs_of(server.system_info, server_flags(Path(server.path)))
    space = SearchSpace(probe, model, request.objective, search_kv_cache=request.search_kv_cache,
                        usable_cpus=probe.allowed_cpus, numa_blocked=blocked, knobs=knobs)
    return Intake(model, sha, probe, space, server)


def workload_attrs(workload: Workload) -> dict[str, Any]:
    """The workload as a study records it (part of the study binding)."""
    return {"pp_tokens": workload.pp_tokens, "tg_tokens": workload.tg_tokens, "seed": workload.seed}


def measure_settings(request: TuneRequest, server: ServerBinary) -> MeasureSettings:
    cap = measure_cap(request)
    return MeasureSettings(objective=request.objective, server_binary=Path(server.path), workload=request.workload,
                           warmup=Warmup(max_seconds=cap / 2), stop=request.stop, max_measure_seconds=cap)


def prepare(request: TuneRequest) -> TuneContext:
    """All checks, in the order a user would want to hear about problems; the study is touched last."""
    validate_request(request)
    taken = intake(request)
    storage = open_storage(request.storage_url)
    name = request.study_name or default_study_name(taken.model, taken.model_sha256, request.objective, taken.probe)
    binding = StudyBinding(
        host_fingerprint=taken.probe.fingerprint(),
        model_sha256=taken.model_sha256,
        objective=request.objective,
        workload=workload_attrs(request.workload),
        extra={"host": taken.probe.fingerprint_fields(), "model_path": str(taken.model.path),
               "model_synthetic": taken.model.synthetic,
               "hostname": taken.probe.hostname, "llama_server": taken.server.to_dict()},
        llama_server_sha256=taken.server.sha256,
    )
    study, created = open_study(name, storage, binding, baseline_params=taken.space.baseline_params(),
                                seed=request.seed)
    probe = with_bandwidth(taken.probe)
    result_path = request.output or results_dir() / f"{name}.yaml"
    return TuneContext(request, taken.model, taken.model_sha256, probe, taken.space, study, created,
                       measure_settings(request, taken.server), result_path, taken.server)


def measure_cap(request: TuneRequest) -> float:
    """Seconds of sampling one trial may take at most. A noisy host never narrows its interval, and then
    every trial runs to this cap: a short budget gets short trials so the search still sees many points
    (about 1/30 of the budget, between 5 and 60 seconds)."""
    if request.max_measure_seconds is not None:
        return request.max_measure_seconds
    return min(60.0, max(5.0, request.budget_seconds / 30.0))


def with_bandwidth(probe: HostProbe) -> HostProbe:
    """The roofline's denominator, measured on first use and cached. A host where it cannot be measured
    is still tuned; the result then has no roofline section, and the warning says why."""
    try:
        return probe_host(bandwidth=True)
    except BandwidthError as exc:
        console(stderr=True).print(f"warning: memory bandwidth not measured ({exc}); the result will have no "
                                   "roofline", style="yellow")
        return probe


@dataclass
class TuneOutcome:
    result: TuneResult
    result_path: Path
    verification: Verification


def run(ctx: TuneContext, measurer: MeasurerLike | None = None) -> TuneOutcome:
    """Baseline, search, stale check, proof, result: the benchmark run end to end. ``measurer`` runs each
    configuration; None is the real one (a pinned llama-server worker per run). Tests hand in a fake that
    answers at once, so the whole pipeline runs in the fast tier."""
    req = ctx.request
    started = time.monotonic()
    log_dir = trial_log_dir(ctx.study.study_name)
    if measurer is None:
        measurer = Measurer(ctx.model, ctx.settings, log_dir, multi_node=ctx.space.multi_node,
                            model_sha256=ctx.model_sha256)
    unit = UNITS[req.objective]
    title = f"tuning {ctx.model.path.name} for {req.objective} on {ctx.probe.hostname}"
    with sigterm_as_interrupt(), TuneProgress(req.budget_seconds, title=title) as progress:
        progress.event(f"study {ctx.study.study_name} ({'new' if ctx.study_created else 'resumed'}, "
                       f"{len(ctx.study.trials)} trials so far)")
        announce_numa_blocked(ctx.space, progress)
        search = Search(ctx.study, ctx.space, measurer, progress, unit=unit)
        steps = RunSteps(baseline_name=BASELINE_NAME,
                         baseline_fix=f"read the trial logs in {log_dir}; on a busy host give a longer --budget "
                                      "or shorter --pp-tokens/--tg-tokens",
                         candidates=req.candidates, trials=req.trials)
        try:
            proven = search_and_prove(search, ProofSettings.of(req, ctx.settings.stop, samples=req.verify_samples),
                                      steps, started=started, budget_s=req.budget_seconds)
        except KeyboardInterrupt:
            raise Interrupted from None
        verification = proven.verification
        result = build_result(ctx, verification, {**search.report.__dict__, "plan": proven.plan.to_dict()},
                              time.monotonic() - started, measurer.measuring_seconds)
        write_outcome(ctx, result, progress)
    return TuneOutcome(result, ctx.result_path, verification)


NEXT_TO_TRIALS_SECONDS = 1.5  # streaming time of the bandwidth measurement taken right after the trials


def measure_roofline(ctx: TuneContext, chosen: Arm) -> dict[str, Any] | None:
    """The chosen configuration's tg against the bandwidth limit (:mod:`tuner.roofline`), or None without a
    tg or a bandwidth figure. Bandwidth is measured again right after the trials, so the limit is judged in the
    minute they ran, and that measurement joins the host's history; when llama.cpp read faster than the host's
    best figure allows, it is measured once more, for longer, before llama.cpp's own rate is taken instead."""
    tg = chosen.metric("tg_tps")
    best = ctx.probe.bandwidth
    if best is None or tg is None:
        return None
    config = chosen.config
    depth = mean_context_depth(ctx.request.workload.pp_tokens, ctx.request.workload.tg_tokens)
    tg_by_threads = best_tg_by_threads(ctx.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    def against(best: BandwidthResult, now_gbps: float | None) -> Roofline:
        return roofline(best.all_nodes_gbps, ctx.model, tg.median, depth=depth, cache_type_k=config.cache_type_k,
                        cache_type_v=config.cache_type_v, probe_runs_gbps=best.runs_gbps,
                        bandwidth_now_gbps=now_gbps, tg_by_threads=tg_by_threads)

    now: list[float] = []
    try:
        for seconds in (NEXT_TO_TRIALS_SECONDS, DEFAULT_BANDWIDTH_SECONDS):
            fresh, best = measure_and_record(ctx.probe, seconds=seconds)
            if not fresh.contended:
                now.append(fresh.all_nodes_gbps)
            if against(best, None).read_gbps <= best.all_nodes_gbps:
                break
    except BandwidthError as exc:
        console(stderr=True).print(f"warning: memory bandwidth not measured next to the trials ({exc}); the "
                                   "roofline uses the host's figure on record", style="yellow")
    return against(best, max(now, default=None)).to_dict()


def best_tg_by_threads(trials: list[FrozenTrial]) -> dict[int, float]:
    """The best tg median the trials measured with each thread count (the evidence for a compute limit)."""
    best: dict[int, float] = {}
    for trial in trials:
        tg, threads = trial.user_attrs.get("tg_tps"), trial.user_attrs.get("config", {}).get("threads")
        if isinstance(tg, dict) and isinstance(threads, int) and tg.get("median"):
            best[threads] = max(best.get(threads, 0.0), float(tg["median"]))
    return best


def announce_numa_blocked(space: SearchSpace, progress: TuneProgress) -> None:
    """Tell the user when NUMA settings are left out of the search, and why (tuner.model_pages)."""
    if space.numa_blocked:
        progress.event(f"NUMA mode and memory policy are not searched: {space.numa_blocked}")


def write_outcome(ctx: TuneContext, result: TuneResult, progress: TuneProgress) -> None:
    """The result file (atomic, previous kept) and the HTML report next to it."""
    write_result(ctx.result_path, result)
    report_path = ctx.result_path.with_suffix(".html")
    write_report(report_path, result, ctx.study)
    progress.event(f"result written to {ctx.result_path}, report to {report_path}")


def build_result(ctx: TuneContext, verification: Verification, search: dict[str, Any], wall_seconds: float,
                 measuring_seconds: float) -> TuneResult:
    """The result of a benchmark tuning run: the shared result layout plus the bandwidth roofline."""
    probe = ctx.probe
    chosen = verification.winner or verification.baseline
    roof = measure_roofline(ctx, chosen)
    return assemble_result(
        kind="benchmark", study=ctx.study.study_name, study_trials=len(ctx.study.trials),
        objective=ctx.request.objective,
        unit=UNITS[ctx.request.objective],
        verification=verification, host=host_block(probe), model=model_block(ctx.model, ctx.model_sha256),
        workload={"pp_tokens": ctx.request.workload.pp_tokens, "tg_tokens": ctx.request.workload.tg_tokens},
        server=ctx.server, search=search, wall_seconds=wall_seconds, measuring_seconds=measuring_seconds,
        roofline=roof, baseline_name=BASELINE_NAME)

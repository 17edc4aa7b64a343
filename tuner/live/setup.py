"""Command-line assembly of a live tuning run: arguments, the server to tune, the workload, the baseline.

Shared by ``llamahost tune --live`` and ``llamahost apply`` (the same run without a search: prove the
study's best against the baseline, then write back and apply). ``--local`` tunes a supervised server
on this machine; ``--inventory/--host`` tunes a host's systemd unit over SSH, and ``--unit`` the unit of the
machine the tuner runs on (:mod:`tuner.live.unit_connection`).
Everything is checked before anything is started or written.
"""

from __future__ import annotations

import argparse
import dataclasses
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuner.build_knobs import knobs_of
from tuner.commands.options import trials_limit
from tuner.config import RunConfig
from tuner.durations import parse_duration
from tuner.errors import UserError
from tuner.live.control import Connection, ServerControl, Target, TargetOptions, TrialStartFailed
from tuner.live.drain import DEFAULT_HOOK_TIMEOUT_S, RestartPolicy
from tuner.live.hooks import parse_hook
from tuner.live.local import DEFAULT_LOCAL_PORT, LocalServer, ServerSpec
from tuner.live.measure import OBJECTIVES, Guards, LiveObjective, LiveSettings
from tuner.live.workload import RequestMix, make_request_mix
from tuner.model.checksum import model_sha256
from tuner.model.default_model import default_model_path
from tuner.model.gguf_file import check_fits_in_memory, inspect_model
from tuner.paths import data_dir
from tuner.probe import probe_host
from tuner.proof_defaults import LIVE_VERIFY_WINDOWS
from tuner.server.build import server_binary
from tuner.server.flags import server_flags
from tuner.server.identity import identify
from tuner.stats import MIN_SAMPLES, StopRule
from tuner.yamlfile import read_yaml_mapping

if TYPE_CHECKING:  # the session (Optuna, the search) is imported when a live run starts, not with the parser
    from tuner.live.session import ApplyPlan, LiveOutcome, LiveRequest


def add_live_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("live tuning of a running server (--live)")
    group.add_argument("--local", action="store_true", help="tune a llama-server process on this machine")
    group.add_argument("--inventory", type=Path, help="Ansible inventory of the host to tune")
    group.add_argument("--host", help="inventory host name to tune (its llama_server systemd unit)")
    group.add_argument("--unit", help="on a llama host itself: the llama_server systemd service to tune "
                                      "(with --baseline-vars; what playbooks/tune.yml runs on each host)")
    group.add_argument("--workload", default="chat", help="chat, batch, or a JSONL file of requests (default chat)")
    group.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    group.add_argument("--requests", type=int, default=24, help="requests per measurement window (default 24)")
    group.add_argument("--prompt-scale", type=float, default=1.0,
                       help="scale the built-in mixes' prompt and output lengths (e.g. 0.1 for a tiny test model)")
    group.add_argument("--max-ttft-p95", help="constraint: p95 time to first token at most this (e.g. 2s)")
    group.add_argument("--latency-guard", type=float, default=3.0,
                       help="stop a trial whose p95 latency exceeds this multiple of the baseline's (3)")
    group.add_argument("--max-server-memory", type=float, default=0.9,
                       help="stop a trial whose server uses more than this fraction of RAM (0.9)")
    group.add_argument("--verify-windows", type=int, default=LIVE_VERIFY_WINDOWS,
                       help=f"windows per verification run ({LIVE_VERIFY_WINDOWS})")
    group.add_argument("--deadman", default="60s", help="restore the baseline when the controller is silent "
                                                         "this long (default 60s)")
    group.add_argument("--port", type=int, default=DEFAULT_LOCAL_PORT,
                       help=f"--local: port of the local server (default {DEFAULT_LOCAL_PORT})")
    group.add_argument("--baseline-vars", type=Path,
                       help="--local, --unit: YAML with the deployed llama_server_* settings "
                            "(--local default: llama-server's)")
    group.add_argument("--host-vars", type=Path, help="write a proven winner into this host_vars file")
    group.add_argument("--apply", action="store_true", help="make a proven winner the running configuration")
    restarts = parser.add_argument_group("restarts of the served unit (--live; docs/live.md)")
    restarts.add_argument("--drain", metavar="CMD|URL",
                          help="before every restart: a shell command (sh -c, on this machine) or an http(s) URL "
                               "to POST to, that takes the host out of its load balancer (needs --undrain)")
    restarts.add_argument("--undrain", metavar="CMD|URL",
                          help="after every restart, once the server is healthy: puts the host back in service")
    restarts.add_argument("--hook-timeout", metavar="DURATION",
                          help=f"stop a drain or undrain hook after this long (default "
                               f"{DEFAULT_HOOK_TIMEOUT_S:g}s); a failed hook stops the run")
    restarts.add_argument("--max-restarts-per-hour", type=int, metavar="N",
                          help="a trial waits until it is at most the N-th restart within the last hour "
                               "(the wait counts against the budget; default: no cap)")


def live_request(args: argparse.Namespace, *, verify_only: bool) -> LiveRequest:
    from tuner.live.session import LiveRequest

    objective = args.objective or "throughput"
    if objective not in OBJECTIVES:
        raise UserError(f"--objective {objective} is a benchmark objective",
                        f"live runs use one of {', '.join(OBJECTIVES)}")
    budget = parse_duration(args.budget, what="budget")
    ttft = parse_duration(args.max_ttft_p95, what="--max-ttft-p95") if args.max_ttft_p95 else None
    if args.max_server_memory <= 0 or args.max_server_memory > 1:
        raise UserError("--max-server-memory is a fraction of RAM between 0 and 1", "pass e.g. 0.9")
    if args.verify_windows < MIN_SAMPLES:  # the proof's samples per arm obey a StopRule, as a trial's do
        raise UserError(f"--verify-windows must be at least {MIN_SAMPLES}",
                        f"pass --verify-windows {max(MIN_SAMPLES, LIVE_VERIFY_WINDOWS)}")
    return LiveRequest(
        budget_seconds=budget,
        objective=LiveObjective(objective, ttft),
        study_name=args.study, storage_url=args.storage, output=args.output, candidates=args.candidates,
        verify_windows=args.verify_windows, alpha=args.alpha, min_effect=args.min_effect, seed=args.seed,
        max_load_factor=args.max_load_factor, max_rounds=args.max_rounds,
        trials=trials_limit(args), guards=Guards(latency_multiple=args.latency_guard),
        settings=live_settings(budget),
        search_kv_cache=not args.no_kv_quant, host_vars=args.host_vars, inventory=args.inventory, apply=args.apply,
        verify_only=verify_only, restarts=restart_policy(args),
    )


def restart_policy(args: argparse.Namespace) -> RestartPolicy:
    timeout = parse_duration(args.hook_timeout, what="--hook-timeout") if args.hook_timeout else \
        DEFAULT_HOOK_TIMEOUT_S
    return RestartPolicy(drain=parse_hook("drain", args.drain) if args.drain is not None else None,
                         undrain=parse_hook("undrain", args.undrain) if args.undrain is not None else None,
                         hook_timeout_s=timeout, max_per_hour=args.max_restarts_per_hour)


def live_settings(budget_seconds: float) -> LiveSettings:
    """Measurement caps that fit the budget: a trial samples for at most 1/20 of it (between 30 s and
    10 minutes), so an overnight run sees dozens of configurations and a short one still sees a few."""
    cap = min(600.0, max(30.0, budget_seconds / 20.0))
    return LiveSettings(stop=StopRule(min_samples=3, max_samples=12, target_rel_ci=0.03), max_measure_seconds=cap)


def read_role_vars(path: Path) -> dict[str, Any]:
    return read_yaml_mapping(path, what="role variables file", fix_missing="pass a YAML file with llama_server_* "
                             "settings", fix_shape="pass a host_vars-style YAML file")


class LocalConnection:
    """A supervised llama-server on this machine (``--local``)."""

    def __init__(self, options: TargetOptions) -> None:
        self.options = options
        # The user's file first: a bad one is reported before anything on this machine is looked up.
        self.role_vars = read_role_vars(options.baseline_vars) if options.baseline_vars else None
        spec = ServerSpec(binary=str(server_binary("portable")), model="", host="127.0.0.1", port=options.port,
                          deadman_s=parse_duration(options.deadman, what="--deadman"))
        self.control = LocalServer(data_dir() / "live" / f"local-{options.port}", spec)

    def lock(self) -> AbstractContextManager[None]:
        return self.control.lock()

    def describe(self) -> Target:
        model = inspect_model(self.options.model or default_model_path())
        probe = probe_host(bandwidth=False)
        check_fits_in_memory(model, probe.memory_available_bytes)
        deployed = RunConfig.from_role_vars(self.role_vars, physical_cores=probe.topology.physical_core_count,
                                            source=str(self.options.baseline_vars)) \
            if self.role_vars is not None else None
        self.control.spec = dataclasses.replace(self.control.spec, model=str(model.path))
        binary = Path(self.control.spec.binary)
        server = identify(binary)
        return Target(model, model_sha256(model.files), probe, deployed, server=server,
                      knobs=knobs_of(server.system_info, server_flags(binary)))


def connection_from_args(args: argparse.Namespace) -> Connection:
    options = TargetOptions.from_args(args)
    if [options.local, bool(options.inventory or options.host), bool(options.unit)].count(True) != 1:
        raise UserError("a live run needs one of --local, --inventory FILE --host NAME, or --unit NAME",
                        "pass --local to tune a supervised server on this machine, --unit to tune this machine's "
                        "llama_server systemd unit, or name the inventory host to tune over SSH")
    if options.local:
        return LocalConnection(options)
    # the systemd control is imported only for a unit: the --local path never needs it
    from tuner.live.unit_connection import InventoryConnection, OnHostConnection

    return OnHostConnection(options) if options.unit else InventoryConnection(options)


def _live_inputs(args: argparse.Namespace, *, verify_only: bool) -> tuple[LiveRequest, RequestMix, Connection]:
    request = live_request(args, verify_only=verify_only)
    mix = make_request_mix(args.workload, concurrency=args.concurrency, count=args.requests,
                           scale=args.prompt_scale)
    return request, mix, connection_from_args(args)


def plan_apply_command(args: argparse.Namespace) -> ApplyPlan:
    """``apply --dry-run``: the same checks and the same lock as ``apply`` (so what it reads is not changing
    under it), then the plan; the server is neither restarted nor measured, and no file is written."""
    from tuner.live.session import plan_apply

    request, mix, connection = _live_inputs(args, verify_only=True)
    with connection.lock():
        target = connection.describe()
        return plan_apply(request, control=connection.control, mix=mix, target=target)


def run_live_command(args: argparse.Namespace, *, verify_only: bool) -> LiveOutcome:
    """Lock first (a second tuner is refused at once), then check, then start the baseline, then tune."""
    from tuner.live.session import prepare_live, run_live

    request, mix, connection = _live_inputs(args, verify_only=verify_only)
    with connection.lock():
        target = connection.describe()
        guards = dataclasses.replace(request.guards,
                                     max_memory_bytes=int(args.max_server_memory * target.probe.memory_total_bytes))
        request = dataclasses.replace(request, guards=guards)
        ctx = prepare_live(request, control=connection.control, mix=mix, target=target)
        with ctx.control:  # every restart from here on is drained, capped and counted (tuner.live.drain)
            start_deployed(ctx.control, ctx.space.baseline(), args.baseline_vars)
            return run_live(ctx)


def start_deployed(control: ServerControl, baseline: RunConfig, baseline_vars: Path | None) -> None:
    """Run the deployed configuration, the one every trial is judged against. When it cannot start there is
    nothing to compare with: a usage error naming where the configuration came from, not a traceback."""
    try:
        control.start(baseline)
    except TrialStartFailed as exc:
        source = str(baseline_vars) if baseline_vars else "the host's deployed settings (its host_vars)"
        raise UserError(f"the deployed configuration ({' '.join(baseline.server_args())}) does not start, so there "
                        f"is nothing to tune against: {exc}",
                        f"correct the llama_server_* settings in {source} until llama-server starts with them (its "
                        "log is quoted above), then run again") from None

"""``llamahost tune``: search llama.cpp CPU settings for a model on this host, prove the winner, write it.

With ``--live`` the search runs on a running server under a real request workload instead (``--local``
for a server on this machine, ``--inventory/--host`` for a host's systemd unit), and a proven winner can be
written back into the inventory and applied. A benchmark tune writes a proven winner with ``--host-vars`` too
(through the same safety chain as ``llamahost write-back``); ``--apply`` and the other flags that act on a
deployed server are refused without ``--live``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuner import proof_defaults
from tuner.commands.options import add_trials_argument, trials_limit
from tuner.durations import parse_duration
from tuner.errors import UserError
from tuner.host_lock import measuring_lock
from tuner.live.measure import OBJECTIVES as LIVE_OBJECTIVES
from tuner.live.setup import add_live_arguments, run_live_command
from tuner.output import console, print_json
from tuner.slice import add_slice_argument, enter_slice
from tuner.trial.protocol import OBJECTIVES, Workload

if TYPE_CHECKING:
    from tuner.result import TuneResult
    from tuner.tune import TuneRequest

# Optuna, the search and the report are imported by the handlers, not here: building the parser (``--help``
# included) loads none of them.

EXIT_INTERRUPTED = 130


def non_negative_factor(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a factor of 0 or more (e.g. 3; 0 = no bound)")
    return value


def proof_rounds(text: str) -> int:
    """--max-rounds: a whole number of rounds, no fewer than a verdict needs."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < proof_defaults.MIN_ROUNDS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of rounds of {proof_defaults.MIN_ROUNDS} or "
                                         f"more (a proof of fewer rounds decides nothing)")
    return value


def add_proof_arguments(parser: argparse.ArgumentParser) -> None:
    """The proof's knobs, shared by ``tune``/``apply`` and ``fleet finish`` (defaults: tuner.proof_defaults)."""
    parser.add_argument("--candidates", type=int, default=proof_defaults.CANDIDATES,
                        help=f"best trials re-measured against the baseline ({proof_defaults.CANDIDATES})")
    parser.add_argument("--alpha", type=float, default=proof_defaults.ALPHA,
                        help=f"significance level of the final test ({proof_defaults.ALPHA})")
    parser.add_argument("--min-effect", type=float, default=proof_defaults.MIN_EFFECT,
                        help="smallest speed-up worth a configuration change "
                             f"({proof_defaults.MIN_EFFECT} = {proof_defaults.MIN_EFFECT * 100:g}%%)")
    parser.add_argument("--max-load-factor", type=non_negative_factor, default=proof_defaults.MAX_LOAD_FACTOR,
                        help="leave out of the proof a candidate whose server takes longer than this many times the "
                             f"baseline's to come up, and {proof_defaults.LOAD_SLACK_S:g} s more "
                             f"({proof_defaults.MAX_LOAD_FACTOR:g}; 0 = no bound)")
    parser.add_argument("--max-rounds", type=proof_rounds, default=proof_defaults.MAX_ROUNDS,
                        help="interleaved proof rounds at most: the proof takes what the budget leaves, up to this "
                             f"many ({proof_defaults.MAX_ROUNDS}; at least {proof_defaults.MIN_ROUNDS}); fewer "
                             "rounds end a run sooner with fewer restarts, and prove only larger speed-ups")


def register(sub: Any) -> None:
    parser = sub.add_parser("tune", help="search llama.cpp settings on this host, prove and write the winner",
                            description=__doc__)
    register_common(parser, live_only=False)
    parser.set_defaults(handler=run_tune)


def register_common(parser: argparse.ArgumentParser, *, live_only: bool) -> None:
    """The options of `tune` (and, for live runs, of `apply`)."""
    parser.add_argument("--model", type=Path, help="GGUF model (default: the embedded SmolLM2-135M Q4_1)")
    parser.add_argument("--budget", default="30m", help="total time for search and verification (default 30m)")
    parser.add_argument("--objective", choices=LIVE_OBJECTIVES if live_only else (*OBJECTIVES, *LIVE_OBJECTIVES),
                        help="benchmark: tg (default), pp or both (geometric mean); live: throughput (default, "
                             "aggregate tok/s) or latency (p95)")
    parser.add_argument("--study", help="study name (default: derived from model, objective and host)")
    parser.add_argument("--storage", help="Optuna storage URL (default: a SQLite file in the data directory)")
    parser.add_argument("--output", type=Path, help="result file (default: <data dir>/results/<study>.yaml)")
    add_proof_arguments(parser)
    parser.add_argument("--no-kv-quant", action="store_true", help="keep the KV cache in f16 (do not search q8_0)")
    parser.add_argument("--seed", type=int, help="sampler seed, for reproducible searches")
    if not live_only:  # `apply` proves what a study holds: it searches nothing
        add_trials_argument(parser, counted="the baseline not counted")
    parser.add_argument("--json", action="store_true", help="print the result as JSON at the end")
    if not live_only:
        parser.add_argument("--pp-tokens", type=int, default=512, help="prompt length of the workload (512)")
        parser.add_argument("--tg-tokens", type=int, default=128, help="tokens generated per sample (128)")
        parser.add_argument("--max-measure", type=float,
                            help="seconds of sampling per trial at most (default: budget/30, between 5 and 60)")
        parser.add_argument("--server-binary", type=Path,
                            help="llama-server to measure: the build the hosts serve (default: the portable "
                                 "build that the llama_server role deploys, built on first use)")
        parser.add_argument("--live", action="store_true", help="tune a running server under a request workload")
        add_slice_argument(parser)
    add_live_arguments(parser)


def request_from_args(args: argparse.Namespace) -> TuneRequest:
    from tuner.stats import StopRule
    from tuner.tune import TuneRequest

    if args.objective in LIVE_OBJECTIVES:
        raise UserError(f"--objective {args.objective} needs --live", "benchmark runs use tg, pp or both")
    return TuneRequest(
        budget_seconds=parse_duration(args.budget, what="budget"),
        objective=args.objective or "tg",
        model_path=args.model,
        study_name=args.study,
        storage_url=args.storage,
        output=args.output,
        workload=Workload(pp_tokens=args.pp_tokens, tg_tokens=args.tg_tokens),
        candidates=args.candidates,
        alpha=args.alpha,
        min_effect=args.min_effect,
        max_load_factor=args.max_load_factor,
        max_rounds=args.max_rounds,
        search_kv_cache=not args.no_kv_quant,
        max_measure_seconds=args.max_measure,
        seed=args.seed,
        trials=trials_limit(args),
        stop=StopRule(),
        server_binary=args.server_binary,
    )


# Flags that act on a deployed server: a benchmark tune starts llama-server processes of its own.
LIVE_ONLY_FLAGS = (("--apply", "apply"), ("--baseline-vars", "baseline_vars"), ("--max-ttft-p95", "max_ttft_p95"),
                   ("--drain", "drain"), ("--undrain", "undrain"), ("--hook-timeout", "hook_timeout"),
                   ("--max-restarts-per-hour", "max_restarts_per_hour"))


def refuse_live_only_flags(args: argparse.Namespace) -> None:
    """A benchmark tune given a flag that only a live run honours stops before it measures anything (exit 2)."""
    given = [flag for flag, dest in LIVE_ONLY_FLAGS if getattr(args, dest, None) not in (None, False)]
    if given:
        raise UserError(f"{', '.join(given)} only work with --live: a benchmark tune measures llama-server "
                        "processes of its own, not the deployed server",
                        "add --live --local (this machine's server) or --live --inventory INV --host HOST; to "
                        "deploy a benchmark winner, pass --host-vars FILE, then run playbooks/llama_server.yml")


def run_tune(args: argparse.Namespace) -> int:
    from tuner.safe_change import save_and_write, written_message
    from tuner.search import Interrupted
    from tuner.tune import prepare, run

    if args.live or args.local or args.inventory or args.host:
        if args.slice:
            raise UserError("--slice is for a run that measures on this host; a live run measures the deployed "
                            "server, which runs in its own slice already", "drop --slice")
        return run_live_and_report(args, verify_only=False)
    refuse_live_only_flags(args)
    request = request_from_args(args)
    if args.slice:
        enter_slice(args.slice)
    with measuring_lock("llamahost tune"):
        ctx = prepare(request)  # measures the bandwidth on a host seen for the first time
        try:
            outcome = run(ctx)
        except Interrupted:
            trials = len(ctx.study.trials)
            console(stderr=True).print(f"[bold]interrupted[/bold]: study {ctx.study.study_name} is intact "
                                       f"({trials} trials); run the same command again to resume", style="yellow")
            return EXIT_INTERRUPTED
    if args.host_vars is not None:  # the same chain as `llamahost write-back`, checked against this host
        written = save_and_write(outcome.result_path, outcome.result, args.host_vars, inventory=None,
                                 hardware=ctx.probe.fingerprint())
        console(stderr=True).print(written_message(args.host_vars, written, outcome.result.summary))
    print_outcome(outcome.result, as_json=args.json)
    return 0


def run_live_and_report(args: argparse.Namespace, *, verify_only: bool) -> int:
    from tuner.search import Interrupted

    try:
        outcome = run_live_command(args, verify_only=verify_only)
    except Interrupted:
        console(stderr=True).print("[bold]interrupted[/bold]: the study is intact and the server is back on its "
                                   "baseline; run the same command again to resume", style="yellow")
        return EXIT_INTERRUPTED
    print_outcome(outcome.result, as_json=args.json)
    return 0


def print_outcome(result: TuneResult, *, as_json: bool) -> None:
    """A result as JSON on stdout (for programs: a playbook, a benchmark) or as tables (for people)."""
    from tuner.summary import print_result

    if as_json:
        print_json(result.to_dict())
    else:
        print_result(console(), result)

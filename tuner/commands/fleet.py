"""``llamahost fleet``: tune many hosts of one hardware group together, on a shared PostgreSQL study.

  fleet fingerprint   this host's hardware group (what decides which study it joins)
  fleet work          run search trials for this host's group (one per host, in parallel)
  fleet finish        prove the group's winner on this host and write the result file
  fleet status        per group: hosts, trials, best so far, baseline, ETA

Every subcommand is non-interactive, prints JSON with ``--json``, and exits 0 (done), 2 (bad input,
store or host refused: nothing written, nothing lost) or 130 (interrupted; the study is intact), so a
playbook can run one command per host and act on the result.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuner import proof_defaults
from tuner.commands.options import add_trials_argument, trials_limit
from tuner.commands.tune import add_proof_arguments, print_outcome
from tuner.durations import format_duration, parse_duration
from tuner.errors import UserError
from tuner.fleet import DEFAULT_MEASURE_CAP_S, STORAGE_ENV
from tuner.host_lock import measuring_lock
from tuner.output import console, print_json, table
from tuner.slice import add_slice_argument, enter_slice
from tuner.trial.protocol import OBJECTIVES, Workload

if TYPE_CHECKING:
    from tuner.tune import TuneRequest

# Optuna, the store and the search are imported by the subcommand that runs, not here: building the parser
# (``--help`` included) loads none of them.

EXIT_INTERRUPTED = 130


def register(sub: Any) -> None:
    parser = sub.add_parser("fleet", help="tune a group of identical hosts together on a shared PostgreSQL study",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fleet = parser.add_subparsers(dest="fleet_command", metavar="SUBCOMMAND", required=True)

    fingerprint = fleet.add_parser("fingerprint", help="this host's hardware group and its study name")
    _add_selection(fingerprint, storage=False)
    fingerprint.add_argument("--json", action="store_true", help="print machine-readable JSON")
    fingerprint.set_defaults(handler=run_fingerprint)

    work = fleet.add_parser("work", help="run search trials for this host's group (search only, no result file)")
    _add_selection(work)
    work.add_argument("--budget", default="30m", help="time this worker searches at most (default 30m)")
    add_trials_argument(work, counted="this worker's (the group's baseline too, if this worker measures it)")
    work.add_argument("--worker-name", help="name recorded on this worker's trials (default: the hostname)")
    work.add_argument("--json", action="store_true", help="print this worker's summary as JSON at the end")
    work.set_defaults(handler=run_work)

    finish = fleet.add_parser("finish", help="prove the group's winner on this host and write the result file")
    _add_selection(finish)
    finish.add_argument("--budget", default="15m", help="time for the interleaved verification (default 15m)")
    add_proof_arguments(finish)
    finish.add_argument("--output", type=Path, help="result file (default: <data dir>/results/<study>.yaml)")
    finish.add_argument("--json", action="store_true", help="print the result as JSON at the end")
    finish.set_defaults(handler=run_finish)

    status = fleet.add_parser("status", help="per group: hosts, trials, best so far, baseline, ETA")
    status.add_argument("--storage", help=f"PostgreSQL URL of the shared store (default: ${STORAGE_ENV})")
    status.add_argument("--study", help="only this group study")
    status.add_argument("--json", action="store_true", help="print machine-readable JSON")
    status.set_defaults(handler=run_status)


def _add_selection(parser: argparse.ArgumentParser, *, storage: bool = True) -> None:
    """What selects a group's study; `work` and `finish` must be given the same values."""
    if storage:
        parser.add_argument("--storage", help=f"PostgreSQL URL of the shared store (default: ${STORAGE_ENV}); "
                                              "keep the password in ~/.pgpass or PGPASSWORD")
        parser.add_argument("--study", help="study name (default: derived from the group fingerprint, model, "
                                            "objective and workload; a name of your own binds to the first "
                                            "host's group)")
    parser.add_argument("--model", type=Path, help="GGUF model (default: the embedded SmolLM2-135M Q4_1)")
    parser.add_argument("--objective", choices=OBJECTIVES, default="tg", help="tg, pp or both (default tg)")
    add_slice_argument(parser)
    parser.add_argument("--pp-tokens", type=int, default=512, help="prompt length of the workload (512)")
    parser.add_argument("--tg-tokens", type=int, default=128, help="tokens generated per sample (128)")
    parser.add_argument("--max-measure", type=float, default=DEFAULT_MEASURE_CAP_S,
                        help=f"seconds of sampling per trial at most ({DEFAULT_MEASURE_CAP_S:.0f})")
    parser.add_argument("--no-kv-quant", action="store_true", help="keep the KV cache in f16 (do not search q8_0)")
    parser.add_argument("--server-binary", type=Path,
                        help="llama-server to measure: the build the hosts serve (default: the portable "
                             "build that the llama_server role deploys, built on first use)")


def _request(args: argparse.Namespace, *, budget: str | None = None) -> TuneRequest:
    from tuner.fleet.session import fleet_storage_url
    from tuner.tune import TuneRequest

    budget_seconds = parse_duration(budget, what="budget") if budget is not None else 0.0
    if budget is not None and budget_seconds <= 0:
        raise UserError("the budget must be positive", "pass e.g. --budget 30m or --budget 8h")
    if args.max_measure <= 0:
        raise UserError("--max-measure must be positive", f"pass e.g. --max-measure {DEFAULT_MEASURE_CAP_S:.0f}")
    return TuneRequest(
        budget_seconds=budget_seconds,
        objective=args.objective,
        model_path=args.model,
        study_name=getattr(args, "study", None),
        storage_url=fleet_storage_url(args.storage) if hasattr(args, "storage") else None,
        output=getattr(args, "output", None),
        workload=Workload(pp_tokens=args.pp_tokens, tg_tokens=args.tg_tokens),
        candidates=getattr(args, "candidates", proof_defaults.CANDIDATES),
        alpha=getattr(args, "alpha", proof_defaults.ALPHA),
        min_effect=getattr(args, "min_effect", proof_defaults.MIN_EFFECT),
        max_load_factor=getattr(args, "max_load_factor", proof_defaults.MAX_LOAD_FACTOR),
        max_rounds=getattr(args, "max_rounds", proof_defaults.MAX_ROUNDS),
        search_kv_cache=not args.no_kv_quant,
        max_measure_seconds=args.max_measure,
        server_binary=args.server_binary,
    )


def run_fingerprint(args: argparse.Namespace) -> int:
    from tuner.fleet.group import NOT_READ
    from tuner.fleet.session import host_in_group

    if args.slice:
        enter_slice(args.slice)
    request = _request(args)
    host = host_in_group(request)
    data = {"group": host.group.digest, "study": host.study_name(request), "fields": host.group.fields,
            "not_read": NOT_READ}
    if args.json:
        print_json(data)
        return 0
    out = console()
    out.print(f"group [bold]{data['group']}[/bold], study {data['study']}")
    out.print(table("group fingerprint fields", ("field", "value"),
                    [(k, v) for k, v in sorted(host.group.fields.items())]))
    for what, why in NOT_READ.items():
        out.print(f"not read: {what}: {why}")
    return 0


def run_work(args: argparse.Namespace) -> int:
    from tuner.fleet.session import open_group
    from tuner.fleet.worker import STOPPED_BY_INTERRUPT, run_worker

    if args.slice:
        enter_slice(args.slice)
    trials = trials_limit(args)
    with measuring_lock("llamahost fleet work"):
        session = open_group(_request(args, budget=args.budget), create=True)
        report = run_worker(session, worker_name=args.worker_name, trials=trials)
    if args.json:
        print_json(report.to_dict())
    else:
        console().print(f"worker {report.worker['name']} (pid {report.worker['pid']}): {report.search.trials_run} "
                        f"trials ({report.search.complete} complete, {report.search.pruned} pruned, "
                        f"{report.search.failed} failed), stopped by {report.stopped_by}")
    return EXIT_INTERRUPTED if report.stopped_by == STOPPED_BY_INTERRUPT else 0


def run_finish(args: argparse.Namespace) -> int:
    from tuner.fleet.finish import finish_group
    from tuner.fleet.session import open_group
    from tuner.search import Interrupted

    if args.slice:
        enter_slice(args.slice)
    if args.candidates < 1:
        raise UserError("--candidates must be at least 1", "pass --candidates 3")
    with measuring_lock("llamahost fleet finish"):  # it measures the candidates against the baseline
        session = open_group(_request(args, budget=args.budget), create=False)
        try:
            outcome = finish_group(session)
        except Interrupted:
            console(stderr=True).print("[bold]interrupted[/bold]: nothing written; the study is intact",
                                       style="yellow")
            return EXIT_INTERRUPTED
    print_outcome(outcome.result, as_json=args.json)
    return 0


def run_status(args: argparse.Namespace) -> int:
    import optuna

    from tuner.fleet.session import fleet_storage_url
    from tuner.fleet.status import group_status
    from tuner.study import FLEET_STUDY, load_existing_study, open_storage, quiet_optuna

    storage = open_storage(fleet_storage_url(args.storage))
    with quiet_optuna():
        summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
    fleet_studies = [s for s in summaries if s.user_attrs.get("kind") == FLEET_STUDY]
    if args.study is not None:
        fleet_studies = [s for s in fleet_studies if s.study_name == args.study]
        if not fleet_studies:
            raise UserError(f"no fleet study named {args.study!r} in this store",
                            "run `llamahost fleet status` without --study to list the groups")
    now = time.time()
    groups = [group_status(s.study_name, s.user_attrs,
                           load_existing_study(s.study_name, storage).get_trials(deepcopy=False), now)
              for s in sorted(fleet_studies, key=lambda s: s.study_name)]
    if args.json:
        print_json({"groups": groups})
        return 0
    print_status(groups)
    return 0


def print_status(groups: list[dict[str, Any]]) -> None:
    """What `fleet status` shows a person: per group, the counts and ETA, baseline and best candidate, tables."""
    out = console()
    if not groups:
        out.print("no fleet studies in this store yet: start workers with `llamahost fleet work`")
        return
    for group in groups:
        hw = group["hardware"]
        c = group["counts"]
        out.print(f"[bold]{group['study']}[/bold] group {group['group']}: {hw['cpu_model']}, "
                  f"{hw['sockets']} socket(s), {hw['physical_cores']} cores / {hw['logical_cpus']} CPUs, "
                  f"{hw['memory_gib']} GiB, "
                  f"llama-server {str(hw.get('llama_server_sha256', 'unrecorded'))[:12]}; "
                  f"objective {group['objective']}")
        out.print(f"  trials: {c['running']} running, {c['waiting']} waiting, {c['complete']} complete, "
                  f"{c['pruned']} pruned, {c['failed']} failed; ETA "
                  f"{_eta(group['eta_seconds'])}" + (f" ({group['eta_at']})" if group["eta_at"] else ""))
        out.print(f"  baseline: {_value(group['baseline'])}   best candidate so far: {_value(group['best'])}"
                  + _versus_baseline(group["best"]))
        if group["best"] and group["best"]["config"]:
            config = group["best"]["config"]
            out.print("  its settings: " + " ".join(f"{k}={config[k]}" for k in sorted(config)
                                                   if config[k] not in ("", None)))
        out.print(table("hosts", ("host", "trials", "complete", "pruned", "failed", "running"),
                        [(h["name"], h["trials"], h["complete"], h["pruned"], h["failed"], h["running"])
                         for h in group["hosts"]]))
        out.print(table("workers", ("worker", "pid", "state", "trials", "limit", "remaining"),
                        [(w["name"], w["pid"], w["state"], w["finished_trials"], w["trials_limit"] or "-",
                          _eta(w["remaining_seconds"])) for w in group["workers"]]))


def _value(block: dict[str, Any] | None) -> str:
    if not block:
        return "-"
    if block.get("value") is None:
        return f"trial {block['trial']} {block.get('state', '')}".strip()
    return (f"{block['value']:.1f} [{block['ci_low']:.1f}, {block['ci_high']:.1f}] (trial {block['trial']}"
            + (f", {block['host']})" if block.get("host") else ")"))


def _versus_baseline(best: dict[str, Any] | None) -> str:
    """The best candidate's ratio to the baseline, and who leads: "best so far" must not read as "better"."""
    ratio = best.get("vs_baseline") if best else None
    if not ratio:
        return ""
    return f" x{ratio:.3f} vs baseline" + ("" if ratio > 1 else " (the baseline leads)")


def _eta(seconds: float | None) -> str:
    return "unknown" if seconds is None else format_duration(seconds)

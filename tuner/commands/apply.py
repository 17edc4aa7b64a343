"""``llamahost apply``: prove a live study's best configuration against the baseline, then write it back
and make it the running configuration - only if it is significantly better.

The same options as ``llamahost tune --live`` choose the server and workload; no search runs. The best
candidates and the baseline are re-measured in interleaved rounds now, on the server as it is today.
``--dry-run`` reads the study and the server and says what would be proven and written, measuring nothing
and changing nothing.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from tuner.commands.tune import register_common, run_live_and_report
from tuner.output import console, print_json, table

if TYPE_CHECKING:
    from tuner.live.session import ApplyPlan


def register(sub: Any) -> None:
    parser = sub.add_parser("apply", help="prove a live study's winner again, write it back and apply it",
                            description=__doc__)
    register_common(parser, live_only=True)
    parser.add_argument("--dry-run", action="store_true",
                        help="show the candidates that would be proven and the --host-vars diff if the first is; "
                             "measure nothing, change nothing")
    parser.set_defaults(handler=run_apply, apply=True)


def run_apply(args: argparse.Namespace) -> int:
    if args.dry_run:
        from tuner.live.setup import plan_apply_command

        show_plan(plan_apply_command(args), as_json=args.json)
        return 0
    args.apply = True
    return run_live_and_report(args, verify_only=True)


def show_plan(plan: ApplyPlan, *, as_json: bool) -> None:
    candidates = [{"label": label, "search_median": value, "server_args": config.server_args(),
                   "config": config.to_dict()} for label, config, value in plan.candidates]
    if as_json:
        print_json({"dry_run": True, "study": plan.study, "unit": plan.unit, "baseline_median": plan.baseline_median,
                    "baseline_server_args": plan.baseline.server_args(), "candidates": candidates,
                    "host_vars_diff": plan.host_vars_diff})
        return
    out = console()
    out.print(f"dry run: nothing measured, nothing written. Study {plan.study}: apply would prove "
              f"{len(plan.candidates)} candidate(s) against the deployed configuration "
              f"({' '.join(plan.baseline.server_args())}), search median "
              f"{plan.baseline_median if plan.baseline_median is not None else '-'} {plan.unit}.")
    out.print(table("candidates", ("candidate", f"search median ({plan.unit})", "server arguments"),
                    [(label, f"{value:.2f}" if value is not None else "-", " ".join(config.server_args()))
                     for label, config, value in plan.candidates]))
    if plan.host_vars_diff:
        out.print(f"if {plan.candidates[0][0]} is proven, --host-vars changes like this (through the write-back "
                  "checks):")
        sys.stdout.write(plan.host_vars_diff)

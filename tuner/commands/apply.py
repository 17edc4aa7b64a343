"""``llamahost apply``: prove a live study's best configuration against the baseline, then write it back
and make it the running configuration - only if it is significantly better.

The same options as ``llamahost tune --live`` choose the server and workload; no search runs. The best
candidates and the baseline are re-measured in interleaved rounds now, on the server as it is today.
"""

from __future__ import annotations

import argparse
from typing import Any

from tuner.commands.tune import register_common, run_live_and_report


def register(sub: Any) -> None:
    parser = sub.add_parser("apply", help="prove a live study's winner again, write it back and apply it",
                            description=__doc__)
    register_common(parser, live_only=True)
    parser.set_defaults(handler=run_apply, apply=True)


def run_apply(args: argparse.Namespace) -> int:
    args.apply = True
    return run_live_and_report(args, verify_only=True)

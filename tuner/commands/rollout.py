"""``llamahost rollout``: apply a written winner with a canary first, and revert the canary if it got worse.

After ``llamahost write-back`` put a proven winner into a vars file (keeping the previous file as ``.prev``),
this applies it to the hosts the file is for: the first host (sorted) is the canary, measured under the
workload before and after the change against its own numbers; only when it is not significantly slower, and
no more of its requests fail, do the other hosts follow, one at a time. When the canary got worse, the vars
file is put back as it was, the canary runs the previous settings again, no other host is touched, and the
command exits 1. Everything goes over Ansible's own connection (``ansible-playbook playbooks/llama_server.yml``
and one ``ansible -m script`` per measurement).

Exit codes: 0 rolled out, 1 the canary failed and was reverted, 2 bad input or a failed apply (the message
says what was put back).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tuner.output import console, print_json

EXIT_REVERTED = 1


def comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def register(sub: Any) -> None:
    parser = sub.add_parser("rollout", help="apply a written winner: canary first, reverted if it got worse",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--inventory", type=Path, required=True, help="the Ansible inventory")
    parser.add_argument("--vars", type=Path, required=True, metavar="FILE",
                        help="the vars file the winner was written into (its .prev is the way back)")
    parser.add_argument("--limit", type=comma_list, default=(), metavar="H1,H2",
                        help="only these hosts (default: every host the vars file applies to)")
    parser.add_argument("--no-canary", action="store_true", help="apply to every host without measuring first")
    parser.add_argument("--dry-run", action="store_true",
                        help="say which host would be the canary and which would follow; change nothing")
    group = parser.add_argument_group("canary")
    group.add_argument("--workload", default="chat", help="chat, batch or a JSONL file of requests (default chat)")
    group.add_argument("--requests", type=int, default=16, help="requests per window (default 16)")
    group.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    group.add_argument("--prompt-scale", type=float, default=1.0, help="scale the built-in mixes (0.1: tiny models)")
    group.add_argument("--windows", type=int, default=3, help="measured windows before and after (default 3)")
    group.add_argument("--warmup", type=int, default=1, help="windows sent first and not measured (default 1)")
    group.add_argument("--max-slowdown", type=float, default=0.05,
                       help="revert when the median throughput falls by more than this fraction (default 0.05)")
    group.add_argument("--alpha", type=float, default=0.05, help="level of the 'slower' test (default 0.05)")
    group.add_argument("--max-error-rate", type=float, default=0.0,
                       help="failed requests allowed after the change, beyond the share before (default 0)")
    parser.add_argument("--ansible-arg", action="append", default=[], metavar="ARG",
                        help="pass an option to ansible and ansible-playbook (repeat), e.g. --vault-password-file=vp")
    parser.add_argument("--json", action="store_true", help="print the rollout's report as JSON")
    parser.set_defaults(handler=run_rollout)


def run_rollout(args: argparse.Namespace) -> int:
    from tuner.live.workload import make_request_mix
    from tuner.rollout.judge import CanaryPolicy
    from tuner.rollout.measure import CanaryWorkload
    from tuner.rollout.run import RolloutRequest, rollout

    workload = None if args.no_canary else CanaryWorkload(
        make_request_mix(args.workload, concurrency=args.concurrency, count=args.requests, scale=args.prompt_scale),
        windows=args.windows, warmup=args.warmup)
    request = RolloutRequest(
        inventory=args.inventory, vars_file=args.vars, limit=tuple(args.limit), workload=workload,
        policy=CanaryPolicy(max_slowdown=args.max_slowdown, alpha=args.alpha, max_error_rate=args.max_error_rate),
        extra_args=tuple(args.ansible_arg), dry_run=args.dry_run)
    out = console(stderr=args.json)
    report = rollout(request, out.print)
    if args.json:
        print_json(report.to_dict())
    if report.reverted:
        console(stderr=True).print(
            f"canary {report.canary} failed ({report.reason}): it runs the previous settings again, {args.vars} "
            "was put back as it was, and no other host was touched")
        return EXIT_REVERTED
    if args.dry_run and not args.json:
        out.print(f"would roll out to {', '.join(report.hosts)}"
                  + (f", canary {report.canary} first" if report.canary else ""))
    elif not args.json:
        out.print(f"rolled out to {', '.join(report.applied)}")
    return 0

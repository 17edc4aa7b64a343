"""``llamahost write-back``: put a proven result's settings into an Ansible vars file, through the safety chain.

What ``tune --live --host-vars`` does at the end of a live run, for every other result: a single-host
``llamahost tune`` result (into ``host_vars/<host>.yml``) or a group's ``llamahost fleet finish`` result
(into ``group_vars/<group>.yml``, which is how ``playbooks/tune_fleet.yml`` writes it once for the group).

The result is not trusted as written (:mod:`tuner.safe_change`): only a significant improvement passes, its
settings are rebuilt and validated, a benchmark result writes only what a benchmark measures, every target
host must serve the model it was measured on (and be of its hardware group, with ``--hardware``), and after
the write Ansible must resolve every written variable to the written value on every target host, or the
file is put back as it was. A refusal exits 2 with the file byte-identical. A result that proved no
improvement leaves the file untouched and exits 0: the current configuration standing is a finding, not an
error. The inventory is the one the vars file sits in, or ``--inventory``. ``--dry-run`` runs every check
(Ansible's resolution on a throw-away copy of the inventory) and prints the diff instead of writing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tuner.output import console, print_json
from tuner.result import load_result_data, parse_result_data
from tuner.safe_change import write_back


def register(sub: Any) -> None:
    parser = sub.add_parser("write-back", help="write a proven result's settings into host_vars or group_vars",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", help="result file (YAML or JSON), or - to read the --json output on stdin")
    parser.add_argument("--vars", type=Path, required=True, metavar="FILE",
                        help="the vars file to update, e.g. inventory/group_vars/llama_hosts.yml (created if missing)")
    parser.add_argument("--inventory", type=Path, metavar="PATH",
                        help="the inventory the vars file belongs to (default: the directory holding its "
                             "host_vars/ or group_vars/)")
    parser.add_argument("--hardware", metavar="ID",
                        help="refuse a result not measured on this hardware: a fleet group digest or a host "
                             "fingerprint (`llamahost fleet fingerprint` on a target host)")
    parser.add_argument("--dry-run", action="store_true",
                        help="run every check (Ansible's resolution on a copy of the inventory), print the diff "
                             "the write would make, and change nothing")
    parser.add_argument("--json", action="store_true", help="print what was written as JSON")
    parser.set_defaults(handler=run_write_back)


def run_write_back(args: argparse.Namespace) -> int:
    if args.result == "-":
        result = parse_result_data(sys.stdin.read(), origin="the result on stdin")
    else:
        result = load_result_data(Path(args.result))
    outcome = write_back(result, args.vars, inventory=args.inventory, hardware=args.hardware, dry_run=args.dry_run)
    written = outcome.written
    report = {
        "vars_file": str(args.vars),
        "study": result.get("study"),
        "verdict": result.get("verdict"),
        "summary": result.get("summary"),
        "dry_run": outcome.dry_run,
        "wrote": bool(written and written.wrote and not outcome.dry_run),
        "changed": {key: list(change) for key, change in written.changed.items()} if written else {},
        "checked_hosts": list(outcome.targets),
        "resolved_checked": outcome.resolved_checked,
        **({"diff": outcome.diff} if outcome.dry_run else {}),
    }
    if args.json:
        print_json(report)
        return 0
    out = console()
    if written is None:
        out.print(f"{args.vars} left unchanged: {report['summary']}")
    elif not written.wrote:
        out.print(f"{args.vars} already holds the proven settings; nothing to write")
    elif outcome.dry_run:
        out.print(f"dry run: {args.vars} would get {len(written.changed)} setting(s); nothing was written")
        sys.stdout.write(outcome.diff)  # as diff(1) prints it: no markup, no wrapping
    else:
        out.print(f"{args.vars}: {len(written.changed)} setting(s) written (previous file kept as "
                  f"{args.vars.name}.prev)")
        for key, (old, new) in written.changed.items():
            out.print(f"  {key}: {old!r} -> {new!r}")
    if outcome.targets:
        resolves = "would resolve" if outcome.dry_run else "resolves"
        checked = f"and Ansible {resolves} every written value" if outcome.resolved_checked else (
            f"(Ansible's resolution not checked: {args.vars} lies outside the inventory directory)")
        out.print(f"checked on {', '.join(outcome.targets)}: same model, {checked}")
    return 0

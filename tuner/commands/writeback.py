"""``llamahost write-back``: put a proven result's settings into an Ansible vars file.

What ``tune --live --host-vars`` does at the end of a live run, for every other result: a single-host
``llamahost tune`` result (into ``host_vars/<host>.yml``) or a group's ``llamahost fleet finish`` result
(into ``group_vars/<group>.yml``, which is how ``playbooks/tune_fleet.yml`` writes it once for the group).
The significance rule is the same everywhere: only a result whose verdict is ``improved`` changes the file
(comments and key order kept, atomic, the previous file kept as ``.prev``); any other verdict leaves it
untouched and exits 0 - the current configuration standing is a finding, not an error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tuner.output import console, print_json
from tuner.result import load_result, parse_result
from tuner.writeback import write_result_vars


def register(sub: Any) -> None:
    parser = sub.add_parser("write-back", help="write a proven result's settings into host_vars or group_vars",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", help="result file (YAML or JSON), or - to read the --json output on stdin")
    parser.add_argument("--vars", type=Path, required=True, metavar="FILE",
                        help="the vars file to update, e.g. inventory/group_vars/llama_hosts.yml (created if missing)")
    parser.add_argument("--json", action="store_true", help="print what was written as JSON")
    parser.set_defaults(handler=run_write_back)


def run_write_back(args: argparse.Namespace) -> int:
    if args.result == "-":
        result = parse_result(sys.stdin.read(), origin="the result on stdin")
    else:
        result = load_result(Path(args.result))
    written = write_result_vars(args.vars, result)
    report = {
        "vars_file": str(args.vars),
        "study": result.get("study"),
        "verdict": result.get("verdict"),
        "summary": result.get("summary"),
        "wrote": bool(written and written.wrote),
        "changed": {key: list(change) for key, change in written.changed.items()} if written else {},
    }
    if args.json:
        print_json(report)
        return 0
    out = console()
    if written is None:
        out.print(f"{args.vars} left unchanged: {report['summary']}")
    elif not written.wrote:
        out.print(f"{args.vars} already holds the proven settings; nothing to write")
    else:
        out.print(f"{args.vars}: {len(written.changed)} setting(s) written (previous file kept as "
                  f"{args.vars.name}.prev)")
        for key, (old, new) in written.changed.items():
            out.print(f"  {key}: {old!r} -> {new!r}")
    return 0

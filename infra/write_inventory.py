#!/usr/bin/env python3
"""Write the Ansible inventory of a llamahost stack to a file, atomically (the previous one kept as .prev).

    pulumi stack output --json | python write_inventory.py --output inventory.yml
    python write_inventory.py --stack-output outputs.json --output inventory.yml

Reads the JSON of ``pulumi stack output --json`` (from a file or standard input), builds the inventory
(group ``llama_hosts``, connection variables and ``llamahost_*`` facts per host) and writes it as YAML.
Exit status 2 with the problem and the fix on bad input; nothing is written then.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from llamahost_infra.inventory import inventory_from_stack_output, render_yaml

from tuner.atomic import write_atomic
from tuner.errors import EXIT_USAGE, UserError


def read_stack_output(source: Path | None) -> dict[str, object]:
    try:
        text = sys.stdin.read() if source is None else source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(
            f"{source}: file not found", "save it with `pulumi stack output --json > FILE`"
        ) from None
    if not text.strip():
        raise UserError("the stack output is empty", "pipe `pulumi stack output --json` into this script")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"the stack output is not JSON ({exc})", "use `pulumi stack output --json`") from None
    if not isinstance(data, dict):
        raise UserError("the stack output is not a JSON object", "use `pulumi stack output --json`")
    return data


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--stack-output", type=Path, help="JSON of `pulumi stack output --json` (default: stdin)"
    )
    parser.add_argument("--output", "-o", type=Path, required=True, help="inventory file to write (YAML)")
    args = parser.parse_args(argv)
    try:
        inventory = inventory_from_stack_output(read_stack_output(args.stack_output))
        write_atomic(args.output, render_yaml(inventory))
    except UserError as exc:
        print(f"write_inventory: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    hosts = inventory["all"]["children"]["llama_hosts"]["hosts"]
    print(f"wrote {args.output}: {len(hosts)} host(s) in group llama_hosts")
    return 0


if __name__ == "__main__":
    sys.exit(main())

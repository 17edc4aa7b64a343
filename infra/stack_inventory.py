#!/usr/bin/env python3
"""Dynamic Ansible inventory for a llamahost stack: ``ansible-playbook -i infra/stack_inventory.py ...``.

Ansible runs this script with ``--list``; it asks Pulumi for the stack outputs (``pulumi stack output
--json --show-secrets`` in this directory, stack from ``LLAMAHOST_STACK`` or the selected one) and prints
the same inventory ``write_inventory.py`` writes. With ``LLAMAHOST_STACK_OUTPUT=FILE`` it reads saved
outputs instead, for controllers without the Pulumi CLI. ``--host NAME`` prints ``{}``: all variables
come with ``--list`` (``_meta.hostvars``), so Ansible never calls it per host.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llamahost_infra.inventory import GROUP, inventory_from_stack_output

from tuner.errors import EXIT_USAGE, UserError

HERE = Path(__file__).resolve().parent
PULUMI_TIMEOUT_S = 120


def stack_outputs() -> dict[str, Any]:
    saved = os.environ.get("LLAMAHOST_STACK_OUTPUT")
    if saved:
        try:
            data = json.loads(Path(saved).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(
                f"LLAMAHOST_STACK_OUTPUT={saved}: cannot read JSON ({exc})",
                "save it with `pulumi stack output --json > FILE`",
            ) from None
        if not isinstance(data, dict):
            raise UserError(
                f"LLAMAHOST_STACK_OUTPUT={saved} is not a JSON object", "use `pulumi stack output --json`"
            )
        return data
    pulumi = shutil.which("pulumi")
    if pulumi is None:
        raise UserError(
            "the pulumi CLI is not on PATH", "install it, or set LLAMAHOST_STACK_OUTPUT to saved outputs"
        )
    command = [pulumi, "stack", "output", "--json", "--show-secrets", "--non-interactive"]
    if os.environ.get("LLAMAHOST_STACK"):
        command += ["--stack", os.environ["LLAMAHOST_STACK"]]
    done = subprocess.run(
        command, cwd=HERE, capture_output=True, text=True, timeout=PULUMI_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        raise UserError(
            f"`pulumi stack output` failed: {done.stderr.strip()[-500:]}",
            "select the stack (`pulumi stack select`) or set LLAMAHOST_STACK",
        )
    data = json.loads(done.stdout)
    if not isinstance(data, dict):
        raise UserError("`pulumi stack output --json` did not print an object", "check the stack")
    return data


def ansible_json(inventory: dict[str, Any]) -> dict[str, Any]:
    """The script form of the inventory: groups with host lists, variables under _meta.hostvars."""
    hosts = inventory["all"]["children"][GROUP]["hosts"]
    return {
        "all": {"children": [GROUP]},
        GROUP: {"hosts": sorted(hosts)},
        "_meta": {"hostvars": hosts},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--list", action="store_true")
    mode.add_argument("--host")
    args = parser.parse_args(argv)
    if args.host:
        print("{}")
        return 0
    try:
        print(json.dumps(ansible_json(inventory_from_stack_output(stack_outputs())), indent=2))
    except UserError as exc:
        print(f"stack_inventory: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())

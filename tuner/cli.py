"""The ``llamahost`` command line.

Each subcommand lives in its own module under :mod:`tuner.commands` and registers itself through a
``register(subparsers)`` function; this module only dispatches and turns a :class:`UserError` into a
one-paragraph message and exit code 2 (the same code argparse uses for bad arguments).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from tuner import __version__
from tuner.errors import EXIT_USAGE, TrialFailed, UserError

EXIT_INTERRUPTED = 130
EXIT_FAILED = 1

# Order is the order of `llamahost --help`.
COMMAND_MODULES = (
    "tuner.commands.probe",
    "tuner.commands.tune",
    "tuner.commands.fleet",
    "tuner.commands.show",
    "tuner.commands.apply",
    "tuner.commands.writeback",
    "tuner.commands.rollout",
    "tuner.commands.wheelhouse",
    "tuner.commands.model",
    "tuner.commands.size",
    "tuner.commands.server",
    "tuner.commands.lab",
    "tuner.commands.completion",
)


def build_parser() -> argparse.ArgumentParser:
    # "@FILE" stands for the arguments in FILE, one per line: playbooks/tune.yml starts the tuner on a host that
    # way, so a hook's URL token is in no process list and systemd never expands a hook's "$" in a unit's command.
    parser = argparse.ArgumentParser(
        prog="llamahost",
        description="Provision, prepare and tune CPU hosts for llama.cpp. `llamahost @FILE` reads the arguments "
                    "from FILE, one per line.",
        fromfile_prefix_chars="@",
    )
    parser.add_argument("--version", action="version", version=f"llamahost {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except UserError as exc:
        print(f"llamahost: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("llamahost: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TrialFailed as exc:  # e.g. the baseline failing during verification: a finding, not a bug
        print(f"llamahost: failed: {exc.reason}", file=sys.stderr)
        return EXIT_FAILED
    return code


if __name__ == "__main__":
    sys.exit(main())

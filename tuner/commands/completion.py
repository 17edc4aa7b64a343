"""``llamahost completion bash|zsh``: a tab-completion script for the shell, generated from this command line.

The script is made by shtab from the same parser ``llamahost`` runs, so it completes every command, option
and choice there is, and a new option needs nothing here. Install it once:

  llamahost completion bash > ~/.local/share/bash-completion/completions/llamahost
  llamahost completion zsh > "${fpath[1]}/_llamahost"     # then start a new shell
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

SHELLS = ("bash", "zsh")


def register(sub: Any) -> None:
    parser = sub.add_parser("completion", help="print a bash or zsh tab-completion script",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shell", choices=SHELLS, help="the shell the script is for")
    parser.set_defaults(handler=run_completion)


def run_completion(args: argparse.Namespace) -> int:
    import shtab

    from tuner.cli import build_parser  # here, not at the top: tuner.cli imports this module

    sys.stdout.write(shtab.complete(build_parser(), shell=args.shell))
    return 0

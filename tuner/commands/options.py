"""Command-line options that more than one command takes with one meaning (the proof's knobs aside, which
live with ``tune``): parsed and checked here once."""

from __future__ import annotations

import argparse

from tuner.errors import UserError


def add_trials_argument(parser: argparse.ArgumentParser, *, counted: str) -> None:
    """``--trials``, shared by ``tune`` and ``fleet work``: a cap on the search besides the budget (Optuna's
    ``n_trials``), for a quick look at a new host or a test that needs a few trials and not the whole night.
    ``counted`` says which trials count, for the help."""
    parser.add_argument("--trials", type=int,
                        help=f"stop the search after this many trials, {counted} (default: only the budget limits)")


def trials_limit(args: argparse.Namespace) -> int | None:
    """``--trials`` as given, refused below 1 (a search of no trials would prove only the baseline)."""
    trials: int | None = getattr(args, "trials", None)
    if trials is not None and trials < 1:
        raise UserError(f"--trials must be at least 1, got {trials}",
                        "pass e.g. --trials 20, or leave it out to search until the budget is spent")
    return trials

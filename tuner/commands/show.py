"""``llamahost show``: a study's trials, baseline and best so far, and the proven result if there is one."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tuner.errors import UserError
from tuner.output import console, print_json
from tuner.paths import results_dir


def register(sub: Any) -> None:
    parser = sub.add_parser("show", help="trials so far, best configuration, baseline, confidence, roofline")
    parser.add_argument("--study", help="study name (default: the only study, or the list of studies)")
    parser.add_argument("--storage", help="Optuna storage URL (default: the local SQLite store)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--html", type=Path, metavar="FILE", help="also write the HTML report with plots to FILE")
    parser.set_defaults(handler=run_show)


def run_show(args: argparse.Namespace) -> int:
    # Optuna, the store and matplotlib are imported here, not at the top: `llamahost --help` loads none of them.
    from tuner.report import write_report
    from tuner.result import load_result
    from tuner.study import baseline_trial, list_study_names, load_existing_study, open_existing_storage
    from tuner.summary import failures_table, print_result, state_counts, study_rows, trial_row, trials_table

    storage = open_existing_storage(args.storage)
    name = args.study
    if name is None:
        names = list_study_names(storage)
        if len(names) != 1:
            listing = ", ".join(names) if names else "none yet"
            raise UserError(f"pass --study NAME (studies in this storage: {listing})",
                            "run `llamahost tune` to create one" if not names else "choose one of the names above")
        name = names[0]
    study = load_existing_study(name, storage)
    result_path = results_dir() / f"{name}.yaml"
    result = load_result(result_path) if result_path.exists() else None
    if args.html is not None:
        if result is None:
            raise UserError(f"study {name!r} has no verified result yet, so there is no report to write",
                            "let a `llamahost tune` run finish first")
        write_report(args.html, result, study)
    base = baseline_trial(study)
    complete = [r for r in study_rows(study) if r["state"] == "COMPLETE"]
    best = max(complete, key=lambda r: r["value"] or 0.0, default=None)
    if args.json:
        print_json({
            "study": name,
            "binding": study.user_attrs,
            "counts": state_counts(study),
            "baseline": trial_row(base) if base else None,
            "best": best,
            "trials": study_rows(study),
            "result": result.to_dict() if result is not None else None,
        })
        return 0
    out = console()
    counts = ", ".join(f"{v} {k}" for k, v in sorted(state_counts(study).items()))
    out.print(f"study [bold]{name}[/bold] on {study.user_attrs.get('hostname', '?')} "
              f"(objective {study.user_attrs.get('objective')}): {counts}")
    out.print(trials_table(study))
    failures = failures_table(study)
    if failures is not None:
        out.print(failures)
    if result is not None:
        print_result(out, result)
    else:
        out.print("no verified result yet: a finished `llamahost tune` run writes one")
    return 0

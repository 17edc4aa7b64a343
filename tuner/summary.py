"""Readable tables of a study and of a result, shared by ``llamahost tune`` (at the end) and ``show``."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console, Group
from rich.table import Table

from tuner.live.drain import downtime_line
from tuner.result import METRIC_LABELS, TuneResult, metric_names
from tuner.roofline import bandwidth_phrase
from tuner.study import is_baseline

CONFIG_COLUMNS = ("threads", "threads_batch", "batch_size", "ubatch_size", "placement", "cpus", "numa",
                  "memory_policy", "load_mode", "flash_attn", "cache_type_k", "cache_type_v", "repack",
                  "omp_wait_policy", "cpu_strict")


def _ci(block: dict[str, Any] | None) -> str:
    if not block:
        return "-"
    return f"{block['median']:.1f} [{block['ci_low']:.1f}, {block['ci_high']:.1f}]"


def trial_row(trial: FrozenTrial) -> dict[str, Any]:
    """One trial as plain data (used for --json and the table)."""
    summary = trial.user_attrs.get("summary")
    outcome = trial.user_attrs.get("outcome", {})
    return {
        "number": trial.number,
        "role": "baseline" if is_baseline(trial) else "search",
        "state": trial.state.name,
        "value": trial.value,
        "summary": summary,
        "pp_tps": trial.user_attrs.get("pp_tps"),
        "tg_tps": trial.user_attrs.get("tg_tps"),
        "config": trial.user_attrs.get("config"),
        "failure": trial.user_attrs.get("failure"),
        "wall_seconds": outcome.get("wall_seconds"),
        "measuring_seconds": (outcome.get("warmup_seconds", 0) + outcome.get("measure_seconds", 0)
                              + outcome.get("info_seconds", 0)) if outcome else None,
    }


def study_rows(study: optuna.Study) -> list[dict[str, Any]]:
    return [trial_row(t) for t in study.get_trials(deepcopy=False)]


def trials_table(study: optuna.Study, *, limit: int = 15) -> Table:
    trials = study.get_trials(deepcopy=False)
    complete = sorted((t for t in trials if t.state == TrialState.COMPLETE),
                      key=lambda t: t.value or 0.0, reverse=True)
    shown = complete[:limit]
    base = [t for t in complete if is_baseline(t) and t not in shown]
    table = Table(title=f"study {study.study_name}: best {len(shown)} of {len(trials)} trials",
                  title_justify="left")
    for col in ("#", "value [95% CI]", "pp tok/s", "tg tok/s", "threads", "batch", "placement", "fa",
                "load", "kv", "numa"):
        table.add_column(col)
    for trial in shown + base:
        row = trial_row(trial)
        cfg = row["config"] or {}
        mark = " (baseline)" if row["role"] == "baseline" else ""
        table.add_row(
            f"{trial.number}{mark}", _ci(row["summary"]), _ci(row["pp_tps"]), _ci(row["tg_tps"]),
            f"{cfg.get('threads')}/{cfg.get('threads_batch')}", f"{cfg.get('batch_size')}/{cfg.get('ubatch_size')}",
            f"{cfg.get('placement')}" + (f" [{cfg['cpus']}]" if cfg.get("cpus") else ""),
            str(cfg.get("flash_attn")), str(cfg.get("load_mode")),
            f"{cfg.get('cache_type_k')}/{cfg.get('cache_type_v')}",
            f"{cfg.get('numa')}/{cfg.get('memory_policy')}",
        )
    return table


def state_counts(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name.lower()] = counts.get(trial.state.name.lower(), 0) + 1
    return counts


def failures_table(study: optuna.Study, *, limit: int = 10) -> Table | None:
    failed = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.FAIL]
    if not failed:
        return None
    table = Table(title=f"{len(failed)} failed trials (a failure is never scored)", title_justify="left")
    table.add_column("#")
    table.add_column("reason")
    for trial in failed[-limit:]:
        table.add_row(str(trial.number), str(trial.user_attrs.get("failure", "?")))
    return table


def load_line(result: TuneResult) -> str | None:
    """``baseline 0.4 s   chosen 0.5 s (x1.25)``: how long each configuration's server took to come up healthy
    (median of the proof's runs), so a faster token rate never hides a slower start. None for a result file
    written before it was recorded."""
    base, chosen = result.baseline.get("load_seconds"), result.chosen.get("load_seconds")
    if not base or not chosen:
        return None
    return f"baseline {base:.1f} s   chosen {chosen:.1f} s (x{chosen / base:.2f})"


def result_table(result: TuneResult) -> Group:
    verdict = Table(title=f"result: {result.verdict}", title_justify="left", show_header=False)
    verdict.add_column("what")
    verdict.add_column("value")
    verdict.add_row("summary", result.summary)
    for name in metric_names(result):
        baseline, chosen = _ci(result.baseline.get(name)), _ci(result.chosen.get(name))
        verdict.add_row(METRIC_LABELS.get(name, name), f"baseline {baseline}   chosen {chosen}")
    load = load_line(result)
    if load:
        verdict.add_row("server start", load)
    roof = result.roofline
    if roof:
        verdict.add_row("bandwidth roofline",
                        f"{100 * roof['fraction']:.0f}% of {roof['max_tg_tps']:.1f} tg tok/s "
                        f"({bandwidth_phrase(roof)} / {roof['bytes_per_token'] / 1e6:.1f} MB per token)")
        if roof.get("limit"):
            verdict.add_row("limit that binds", f"{roof['limit']['binds']}: {roof['limit']['reason']}")
    search = result.search
    verdict.add_row("time", f"{search['wall_seconds']:.0f} s, {100 * search['measuring_fraction']:.0f}% of it "
                            "measuring")
    if search.get("plan"):
        verdict.add_row("budget", search["plan"]["text"])
    if result.downtime:  # a live run's restarts (tuner.live.drain)
        verdict.add_row("downtime", downtime_line(result.downtime))
    verdict.add_row("llama-server flags", " ".join(result.settings.server_args))
    config = result.settings.config
    settings = Table(title="settings to run", title_justify="left")
    settings.add_column("setting")
    settings.add_column("value")
    settings.add_column("baseline")
    for key in CONFIG_COLUMNS:
        settings.add_row(key, str(config.get(key)), str(result.baseline["config"].get(key)))
    return Group(verdict, settings)


def print_result(console: Console, result: TuneResult) -> None:
    console.print(result_table(result))

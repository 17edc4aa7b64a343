"""The HTML report: one self-contained file a person can open in the morning.

It shows what the result file says, plus the story behind it: every trial over time against the baseline,
the interleaved verification rounds, baseline vs. chosen throughput with confidence intervals, how close
generation is to the bandwidth roofline, and which settings mattered. Plots are rendered with matplotlib
to PNG and embedded, so the file needs no network and no other files.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import optuna
import optuna.visualization.matplotlib
from matplotlib.figure import Figure
from optuna.importance import BaseImportanceEvaluator, PedAnovaImportanceEvaluator
from optuna.trial import FrozenTrial, TrialState

from tuner.atomic import write_atomic
from tuner.cpu_lists import format_cpu_list
from tuner.result import METRIC_LABELS, TuneResult, metric_names
from tuner.roofline import bandwidth_phrase
from tuner.study import is_baseline, quiet_optuna
from tuner.summary import CONFIG_COLUMNS, load_line

COLORS = {"baseline": "#6c757d", "chosen": "#0b7a3e", "search": "#1f77b4", "pruned": "#ff7f0e", "failed": "#d62728"}
SYNTHETIC_PHRASE = (", <b>synthetic</b>: random weights in the real model's shape, so the speeds hold and the "
                    "text does not")


def _png(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def history_figure(study: optuna.Study, unit: str, result: TuneResult | None = None) -> Figure:
    """Every trial's median with its interval, pruned and failed trials marked, the baseline as a band, and
    the trials the proof measured again ringed (the chosen one as a star)."""
    figure, axes = plt.subplots(figsize=(9, 4))
    trials = study.get_trials(deepcopy=False)
    base = next((t for t in trials if is_baseline(t) and t.state == TrialState.COMPLETE), None)
    if base is not None:
        summary = base.user_attrs["summary"]
        axes.axhspan(summary["ci_low"], summary["ci_high"], color=COLORS["baseline"], alpha=0.15)
        axes.axhline(summary["median"], color=COLORS["baseline"], lw=1, label="baseline (95% CI band)")
    done = [t for t in trials if t.state == TrialState.COMPLETE and not is_baseline(t)]
    if done:
        med = [t.user_attrs["summary"]["median"] for t in done]
        low = [m - t.user_attrs["summary"]["ci_low"] for m, t in zip(med, done, strict=True)]
        high = [t.user_attrs["summary"]["ci_high"] - m for m, t in zip(med, done, strict=True)]
        axes.errorbar([t.number for t in done], med, yerr=[low, high], fmt="o", ms=4, color=COLORS["search"],
                      ecolor="#9ecae1", label="trial median (95% CI)")
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    if pruned:
        axes.plot([t.number for t in pruned], [list(t.intermediate_values.values())[-1] for t in pruned], "x",
                  color=COLORS["pruned"], label="pruned (running median)")
    failed = [t.number for t in trials if t.state == TrialState.FAIL]
    if failed:
        axes.plot(failed, [0.0] * len(failed), "|", ms=14, color=COLORS["failed"], label="failed")
    _mark_verified(axes, {t.number: t for t in done}, result)
    axes.set_xlabel("trial")
    axes.set_ylabel(unit)
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    axes.set_title("search")
    return figure


def _mark_verified(axes: Any, searched: dict[int, FrozenTrial], result: TuneResult | None) -> None:
    """Ring the search trials whose configurations the proof measured again; star the one it chose."""
    if result is None:
        return
    chosen = result.chosen.get("label")
    arms = [a for a in result.candidates if a.get("trial") in searched]
    for chosen_only in (False, True):
        picked = [a for a in arms if (a["label"] == chosen) is chosen_only]
        if not picked:
            continue
        axes.plot([a["trial"] for a in picked], [searched[a["trial"]].user_attrs["summary"]["median"] for a in picked],
                  "*" if chosen_only else "o", ms=16 if chosen_only else 11, mfc="none", mew=1.6,
                  color=COLORS["chosen"], label="chosen by the proof" if chosen_only else "re-measured in the proof")


def throughput_figure(result: TuneResult) -> Figure:
    names = metric_names(result)[:4]
    figure, all_axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, metric in zip(all_axes[0], names, strict=True):
        labels: list[str] = []
        meds: list[float] = []
        errs: list[list[float]] = [[], []]
        colors: list[str] = []
        for label in ("baseline", "chosen"):
            block = result.block(label).get(metric)
            if not block:
                continue
            labels.append(label)
            meds.append(block["median"])
            errs[0].append(block["median"] - block["ci_low"])
            errs[1].append(block["ci_high"] - block["median"])
            colors.append(COLORS[label])
        ax.bar(labels, meds, yerr=errs, color=colors, capsize=6)
        ax.set_title(f"{METRIC_LABELS.get(metric, metric)}\n(median, 95% CI)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    return figure


def verification_figure(result: TuneResult) -> Figure | None:
    rounds = result.verification["baseline_round_values"]
    if not result.candidates:
        return None
    figure, axes = plt.subplots(figsize=(8, 3.2))
    x = list(range(1, len(rounds) + 1))
    axes.plot(x, rounds, "o-", color=COLORS["baseline"], label="baseline")
    for arm in result.candidates:
        values = arm["round_values"]
        axes.plot(list(range(1, len(values) + 1)), values, "o--", label=arm["label"])
    axes.set_xlabel("interleaved round")
    axes.set_ylabel("median of the round")
    axes.set_xticks(x)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    axes.set_title("verification: every configuration once per round, in shuffled order")
    return figure


ROOFLINE_TITLE = "Bandwidth roofline"


def _roofline_text(roof: dict[str, Any]) -> str:
    limit = roof.get("limit")
    binds = (f" Limit that binds: <b>{html.escape(limit['binds'])}</b>: {html.escape(limit['reason'])}."
             if limit else "")
    return f"<p>Bandwidth: {html.escape(bandwidth_phrase(roof))}.{binds}</p>"


def roofline_figure(roof: dict[str, Any]) -> Figure:
    figure, axes = plt.subplots(figsize=(8, 1.6))
    axes.barh(["tg"], [roof["max_tg_tps"]], color="#e9ecef", label="bandwidth limit")
    axes.barh(["tg"], [roof["achieved_tg_tps"]], color=COLORS["chosen"], label="achieved")
    axes.set_xlabel("tokens/s")
    axes.set_title(f"{100 * roof['fraction']:.0f}% of the memory-bandwidth roofline "
                   f"({roof['bandwidth_gbps']:.1f} GB/s)")
    axes.legend(loc="lower right", fontsize=8)
    return figure


# Optuna's evaluators as people name them. The one used is passed explicitly, never left to Optuna's default
# (which changed from fANOVA to PED-ANOVA), so the plot says what computed it.
EVALUATOR_NAMES = {"PedAnovaImportanceEvaluator": "PED-ANOVA", "FanovaImportanceEvaluator": "fANOVA",
                   "MeanDecreaseImpurityImportanceEvaluator": "mean decrease in impurity"}
TRIALS_PER_SETTING_FOR_A_RANKING = 5  # below this many complete trials per searched setting, the order is noise
MIN_TRIALS_FOR_A_RANKING = 20


def importance_evaluator() -> BaseImportanceEvaluator:
    return PedAnovaImportanceEvaluator()


def too_few_for_a_ranking(trials: int, settings: int) -> bool:
    """Whether a ranking of ``settings`` from ``trials`` complete trials is noise rather than a finding (pure)."""
    return trials < max(MIN_TRIALS_FOR_A_RANKING, TRIALS_PER_SETTING_FOR_A_RANKING * settings)


def importances_of(study: optuna.Study) -> tuple[int, dict[str, float]]:
    """The complete trials' count and the settings' importances by :func:`importance_evaluator`, computed once
    for both plots that use them (empty when there is nothing to attribute)."""
    complete = sum(1 for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE)
    if complete < 4:
        return complete, {}
    try:
        with quiet_optuna():
            return complete, dict(optuna.importance.get_param_importances(study, evaluator=importance_evaluator()))
    except (ValueError, RuntimeError):
        return complete, {}  # e.g. every trial had the same parameters: nothing to attribute


def importance_figure(complete: int, importances: dict[str, float]) -> Figure | None:
    if not importances:
        return None
    names = list(importances)[::-1]
    figure, axes = plt.subplots(figsize=(8, 0.35 * len(names) + 1.2))
    axes.barh(names, [importances[n] for n in names], color=COLORS["search"])
    evaluator = type(importance_evaluator()).__name__
    method = EVALUATOR_NAMES.get(evaluator, evaluator)
    title = f"which settings mattered ({method} importance over {complete} complete trials)"
    if too_few_for_a_ranking(complete, len(names)):
        title += (f"\n{complete} trials over {len(names)} settings are too few: the order is noise, "
                  f"read it as a hint at most")
    axes.set_title(title, fontsize=10)
    return figure


SLICE_PARAMS = 4  # the most important settings shown one by one


def slice_figure(study: optuna.Study, unit: str, importances: dict[str, float]) -> Figure | None:
    """Optuna's slice plot of the most important settings: every complete trial's value against each setting,
    so a reader sees *how* a setting mattered (more threads, then a plateau), not only that it did."""
    if not importances:
        return None
    try:
        with quiet_optuna():
            axes = optuna.visualization.matplotlib.plot_slice(study, params=list(importances)[:SLICE_PARAMS],
                                                              target_name=unit)
    except (ValueError, RuntimeError):
        return None  # nothing varied, so there is nothing to slice
    first = axes.flat[0] if hasattr(axes, "flat") else axes
    figure = first.get_figure(root=True)
    assert isinstance(figure, Figure)
    figure.set_size_inches(min(12.0, 3.2 * SLICE_PARAMS), 3.4)
    return figure


def _table(rows: Sequence[Sequence[object]], header: tuple[str, ...]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _ci(block: dict[str, Any] | None) -> str:
    return f"{block['median']:.1f} [{block['ci_low']:.1f}, {block['ci_high']:.1f}]" if block else "-"


def trial_rows(trials: Sequence[FrozenTrial]) -> tuple[list[tuple[str, ...]], tuple[str, ...]]:
    """Every trial of the study, one row each: its state, its median or why it has none, and its settings
    (pure: the tests build trials by hand)."""
    header = ("trial", "state", "median", *CONFIG_COLUMNS, "note")
    rows = []
    for trial in trials:
        config = trial.user_attrs.get("config") or {}
        summary = trial.user_attrs.get("summary")
        median = f"{summary['median']:.2f}" if summary else "-"
        note = "baseline" if is_baseline(trial) else str(trial.user_attrs.get("failure", ""))
        if trial.state == TrialState.PRUNED and "pruned_at" in trial.user_attrs:
            note = f"pruned at sample {trial.user_attrs['pruned_at']}"
        rows.append((str(trial.number), trial.state.name.lower(), median,
                     *(_setting(config.get(key)) for key in CONFIG_COLUMNS), note))
    return rows, header


def _setting(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return format_cpu_list(int(v) for v in value)  # cpus and memory nodes, as 0-23,48-71
    return str(value)


STYLE = """body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#212529}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #dee2e6;padding:4px 8px;font-size:14px}
th{background:#f1f3f5}.verdict{font-size:1.2em;padding:.6em;border-radius:6px;background:#e6f4ea}
.stands{background:#f1f3f5}code{background:#f1f3f5;padding:2px 4px}img{max-width:100%}"""


def _build_phrase(llama_cpp: dict[str, Any]) -> str:
    """Which llama.cpp measured: the llama-server build by sha256 and CPU features, else the pinned source."""
    server = llama_cpp.get("llama_server")
    source = f"llama.cpp from llama-cpp-python {llama_cpp['llama_cpp_python']}"
    if not isinstance(server, dict):
        return source
    return (f"{source}, llama-server sha256 {str(server['sha256'])[:12]}... "
            f"({html.escape(str(server.get('system_info') or 'CPU features not reported'))})")


def _context_line(result: TuneResult) -> str:
    host, model = result.host, result.model
    synthetic = SYNTHETIC_PHRASE if model.get("synthetic") else ""
    return (f"<p>Host <b>{html.escape(str(host['hostname']))}</b> ({html.escape(str(host['cpu_model']))}, "
            f"fingerprint {host['fingerprint']}); model <b>{html.escape(str(model['name']))}</b> "
            f"({model['quantization']}, sha256 {model['sha256'][:12]}...{synthetic}); "
            f"{_build_phrase(result.llama_cpp)}; "
            f"written {result.written}.</p>")


def build_report(result: TuneResult, study: optuna.Study) -> str:
    unit = result.unit
    parts = [f"<h1>llamahost: {html.escape(result.study)}</h1>",
             f"<p class='verdict {'' if result.improved else 'stands'}'>{html.escape(result.summary)}</p>",
             _context_line(result)]
    settings = result.settings
    parts.append("<h2>Settings to run</h2>")
    parts.append(_table([(k, str(settings.config.get(k)), str(result.baseline["config"].get(k)))
                         for k in CONFIG_COLUMNS], ("setting", "chosen", "baseline")))
    parts.append(f"<p>llama-server: <code>{html.escape(' '.join(settings.server_args))}</code></p>")
    parts.append("<h2>Measured</h2>")
    parts.append(_table([(METRIC_LABELS.get(n, n), _ci(result.baseline.get(n)), _ci(result.chosen.get(n)))
                         for n in metric_names(result)], ("median [95% CI]", "baseline", "chosen")))
    load = load_line(result)
    if load:
        parts.append(f"<p>Server start (to healthy, median): {html.escape(load)}</p>")
    complete, importances = importances_of(study)
    figures: list[tuple[str, Callable[[], Figure | None]]] = [
        ("Baseline vs. chosen", lambda: throughput_figure(result)),
        ("Verification", lambda: verification_figure(result)),
        ("Search", lambda: history_figure(study, unit, result)),
        ("Settings that mattered", lambda: importance_figure(complete, importances)),
        ("How each of them mattered", lambda: slice_figure(study, unit, importances)),
    ]
    roof = result.roofline
    if roof:
        figures.insert(1, (ROOFLINE_TITLE, lambda: roofline_figure(roof)))
    for title, make in figures:
        figure = make()
        if figure is not None:
            parts.append(f"<h2>{title}</h2><img alt='{title}' src='data:image/png;base64,{_png(figure)}'>")
            if title == ROOFLINE_TITLE and roof:
                parts.append(_roofline_text(roof))
    if result.candidates:
        rows = []
        for arm in result.candidates:
            comp = arm["comparison"]
            rows.append((arm["label"], arm["failure"] or "",
                         f"{comp['ratio']:.3f} [{comp['ci_low']:.3f}, {comp['ci_high']:.3f}]" if comp else "-",
                         f"{comp['p_value']:.3g}" if comp else "-", "yes" if comp and comp["significant"] else "no"))
        level = result.verification.get("level", result.verification["alpha"])
        parts.append("<h2>Candidates</h2>" + _table(rows, (
            "candidate", "failure", f"speed vs baseline [{100 * (1 - level):.3g}% CI]",
            f"p (significant < {level:.3g})", "significant")))
    parts.append("<h2>Every trial</h2>" + _table(*trial_rows(study.get_trials(deepcopy=False))))
    search = result.search
    parts.append(f"<p>{search['study_trials']} trials in the study; this run took {search['wall_seconds']:.0f} s, "
                 f"{100 * search['measuring_fraction']:.0f}% of it measuring.</p>")
    if search.get("plan"):
        parts.append(f"<p>{html.escape(search['plan']['text'])}.</p>")
    body = "\n".join(parts)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>llamahost {html.escape(result.study)}"
            f"</title><style>{STYLE}</style></head><body>{body}</body></html>\n")


def write_report(path: Path, result: TuneResult, study: optuna.Study) -> None:
    write_atomic(path, build_report(result, study))

"""The HTML report's parts that say something a person acts on: which evaluator ranked the settings and whether
there were enough trials for a ranking, which trials the proof measured again, every trial with its settings,
and the level the proof's test really ran at."""

from __future__ import annotations

import random
from typing import Any, Literal

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import TrialState, create_trial
from result_support import proven_tune_result

from tuner.config import RunConfig
from tuner.report import (
    build_report,
    history_figure,
    importance_figure,
    importances_of,
    slice_figure,
    too_few_for_a_ranking,
    trial_rows,
)
from tuner.result import TuneResult, summary_line, verdict_of
from tuner.stats import compare_paired, summarize
from tuner.study import BASELINE, ROLE_ATTR
from tuner.verify import Arm, Verification

DISTRIBUTIONS = {"threads": IntDistribution(1, 32), "flash_attn": CategoricalDistribution(["on", "off"])}


def trial(threads: int, flash: Literal["on", "off"], median: float | None, *,
          state: TrialState = TrialState.COMPLETE, **attrs: object) -> optuna.trial.FrozenTrial:
    config = RunConfig(threads=threads, threads_batch=threads, flash_attn=flash, cpus=tuple(range(threads))).to_dict()
    user_attrs: dict[str, Any] = {"config": config, **attrs}
    if median is not None:
        user_attrs["summary"] = summarize([median * 0.98, median, median * 1.02]).to_dict()
    return create_trial(params={"threads": threads, "flash_attn": flash}, distributions=DISTRIBUTIONS,
                        value=median if state == TrialState.COMPLETE else None, state=state, user_attrs=user_attrs)


def study_of(count: int) -> optuna.Study:
    """A study whose speed depends on the thread count only, plus one trial of each other kind."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    baseline_attrs: dict[str, Any] = {ROLE_ATTR: BASELINE}
    study.add_trial(trial(16, "off", 20.0, **baseline_attrs))
    rng = random.Random(7)
    for _ in range(count - 1):
        threads = rng.randint(1, 32)
        study.add_trial(trial(threads, "on" if rng.random() < 0.5 else "off", 10.0 + threads))
    study.add_trial(trial(4, "on", None, state=TrialState.PRUNED, pruned_at=2))
    study.add_trial(trial(2, "on", None, state=TrialState.FAIL, failure="the server did not come up healthy"))
    return study


def test_every_trial_is_a_row_with_its_settings_state_and_why() -> None:
    rows, header = trial_rows(study_of(3).get_trials())
    column = {name: i for i, name in enumerate(header)}
    assert len(rows) == 5
    assert rows[0][column["note"]] == "baseline" and rows[0][column["cpus"]] == "0-15"
    assert rows[0][column["median"]] == "20.00" and rows[0][column["state"]] == "complete"
    assert rows[3][column["state"]] == "pruned" and rows[3][column["note"]] == "pruned at sample 2"
    assert rows[4][column["median"]] == "-" and rows[4][column["note"]] == "the server did not come up healthy"


@pytest.mark.parametrize(("count", "noise"), [(8, True), (40, False)])
def test_the_importance_plot_names_its_evaluator_and_says_when_the_ranking_is_noise(count: int, noise: bool) -> None:
    figure = importance_figure(*importances_of(study_of(count)))
    assert figure is not None
    title = figure.axes[0].get_title()
    assert f"PED-ANOVA importance over {count} complete trials" in title, title
    assert ("too few" in title) is noise, title
    assert too_few_for_a_ranking(19, 1) and too_few_for_a_ranking(39, 8) and not too_few_for_a_ranking(40, 8)


def test_the_slice_plot_shows_each_searched_setting_against_the_result() -> None:
    study = study_of(40)
    figure = slice_figure(study, "tg tok/s", importances_of(study)[1])
    assert figure is not None
    labels = sorted(axes.get_xlabel() for axes in figure.axes if axes.get_xlabel())
    assert labels == ["flash_attn", "threads"], labels
    few = study_of(2)
    assert slice_figure(few, "tg tok/s", importances_of(few)[1]) is None, "two complete trials show nothing"


def test_the_search_plot_rings_the_re_measured_trials_and_stars_the_chosen_one() -> None:
    study = study_of(6)
    searched = [t for t in study.get_trials() if t.state == TrialState.COMPLETE][1:3]
    result = proven_tune_result()
    result.chosen = {"label": f"trial-{searched[0].number}"}
    result.candidates = [{"label": f"trial-{t.number}", "trial": t.number} for t in searched]
    labels = history_figure(study, "tg tok/s", result).axes[0].get_legend_handles_labels()[1]
    assert "re-measured in the proof" in labels and "chosen by the proof" in labels
    plain = history_figure(study, "tg tok/s").axes[0].get_legend_handles_labels()[1]
    assert "re-measured in the proof" not in plain


def test_the_level_recorded_and_quoted_is_the_one_the_test_used() -> None:
    """Three candidates share the baseline: each test runs at 0.05 / 3, its interval is the 98.3% interval,
    and the result and its summary say so (they once said 95%)."""
    baseline = [100.0, 101.0, 99.0, 100.5, 100.2]
    arms = []
    for i, gain in enumerate((1.10, 1.02, 0.97)):
        arm = Arm(f"trial-{i}", RunConfig(threads=i + 1, threads_batch=i + 1), i,
                  round_values=[v * gain * (1 + 0.002 * (r % 2)) for r, v in enumerate(baseline)])
        arm.comparison = compare_paired(arm.round_values, baseline, alpha=0.05, comparisons=3)
        arms.append(arm)
    verification = Verification(baseline=Arm("baseline", RunConfig(threads=8, threads_batch=8), 0, baseline),
                                candidates=arms, rounds=5, alpha=0.05, min_effect=0.01)
    assert verification.level == pytest.approx(0.05 / 3)
    assert arms[0].comparison is not None
    recorded = arms[0].comparison.to_dict()
    assert recorded["level"] == pytest.approx(0.05 / 3) and recorded["comparisons"] == 3
    assert recorded["ci_confidence"] == pytest.approx(1 - 0.05 / 3)
    assert recorded["significant"] and arms[0].comparison.p_value < arms[0].comparison.level
    line = summary_line(verification, "the baseline")
    assert "98.3% CI" in line and "< 0.0167" in line and "95% CI" not in line, line


def test_the_report_carries_every_trial_the_evaluator_and_the_tests_level() -> None:
    study = study_of(8)
    searched = [t for t in study.get_trials() if t.state == TrialState.COMPLETE][1:3]
    block = {"median": 30.0, "ci_low": 29.0, "ci_high": 31.0}
    comparison = {"ratio": 1.1, "ci_low": 1.05, "ci_high": 1.15, "p_value": 0.001, "significant": True}
    config = RunConfig(threads=8, threads_batch=8).to_dict()
    result = {
        "study": "s", "verdict": "improved", "summary": "trial-2 is +10.0% better <b>", "objective": "tg",
        "unit": "tg tok/s", "written": "2026-12-04T00:00:00+00:00",
        "host": {"hostname": "h1", "cpu_model": "EPYC", "fingerprint": "f" * 16},
        "model": {"name": "m", "quantization": "Q4_1", "sha256": "a" * 64},
        "llama_cpp": {"llama_cpp_python": "0.3.36", "llama_server": {
            "path": "/bin/llama-server", "sha256": "5e480123fe9a" + "0" * 52, "version": "version: 1",
            "system_info": "CPU : AVX2 = 1 | <x> |"}},
        "settings": {"source": "trial-2", "config": config, "server_args": ["--threads", "8"], "role_vars": {}},
        "baseline": {"config": config, "tg_tps": block}, "chosen": {"label": f"trial-{searched[0].number}",
                                                                   "tg_tps": block},
        "verification": {"alpha": 0.05, "comparisons": 2, "level": 0.025, "baseline_round_values": [1.0, 1.1, 1.0]},
        "candidates": [{"label": f"trial-{t.number}", "trial": t.number, "round_values": [1.2, 1.3, 1.2],
                        "failure": None, "comparison": comparison} for t in searched],
        "search": {"study_trials": len(study.trials), "wall_seconds": 60.0, "measuring_fraction": 0.9},
        "kind": "benchmark", "improvement": comparison, "workload": {},
    }
    report = build_report(TuneResult.from_dict(result, origin="the test's result"), study)
    assert "<h2>Every trial</h2>" in report and "<h2>How each of them mattered</h2>" in report
    assert report.count("<tr>") >= len(study.trials) + 1
    assert "the server did not come up healthy" in report and "pruned at sample 2" in report
    assert "97.5% CI" in report and "significant &lt; 0.025" in report
    assert "&lt;b&gt;" in report and "<b>" not in report.split("</h1>")[1].split("</p>")[0]
    assert "llama-server sha256 5e480123fe9a... (CPU : AVX2 = 1 | &lt;x&gt; |)" in report, "the build that measured"


def verification_of(gains: list[float], noise: list[float], rounds: int = 3) -> Verification:
    """Three candidates against one baseline: candidate ``i`` is ``gains[i]`` faster, with round-to-round noise."""
    baseline = [100.0 + r for r in range(rounds)]
    arms = []
    for i, gain in enumerate(gains):
        values = [v * gain * (1 + noise[r % len(noise)]) for r, v in enumerate(baseline)]
        arm = Arm(f"trial-{i}", RunConfig(threads=i + 1, threads_batch=i + 1), i, round_values=values)
        arm.comparison = compare_paired(values, baseline, alpha=0.05, comparisons=len(gains))
        arms.append(arm)
    return Verification(baseline=Arm("baseline", RunConfig(threads=8, threads_batch=8), 0, baseline),
                        candidates=arms, rounds=rounds, alpha=0.05, min_effect=0.01)


def test_a_lead_short_of_proof_is_inconclusive_with_the_rounds_that_would_settle_it() -> None:
    noisy = verification_of([1.06, 0.99, 0.97], noise=[0.0, 0.05, -0.02])
    lead = noisy.candidates[0].comparison
    assert lead is not None and not lead.significant and lead.trending
    assert verdict_of(noisy) == "inconclusive"
    line = summary_line(noisy, "the baseline")
    assert line.startswith("inconclusive: trial-0 looks +") and f"about {lead.rounds_to_settle} rounds" in line
    assert lead.rounds_to_settle is not None and lead.rounds_to_settle > 3
    # The same pattern repeated to that many rounds is proven: the estimate is what it says.
    settled = verification_of([1.06, 0.99, 0.97], noise=[0.0, 0.05, -0.02], rounds=lead.rounds_to_settle + 2)
    assert verdict_of(settled) == "improved"


def test_no_lead_stands_and_a_proven_lead_improves() -> None:
    assert verdict_of(verification_of([0.98, 1.0, 0.97], noise=[0.0, 0.03, -0.02])) == "baseline-stands"
    assert verdict_of(verification_of([1.3, 1.0, 0.97], noise=[0.0, 0.002, -0.001], rounds=5)) == "improved"

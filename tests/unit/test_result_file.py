from __future__ import annotations

from pathlib import Path

import pytest

from tuner.atomic import previous_path
from tuner.errors import UserError
from tuner.result import FORMAT_VERSION, load_result, write_result


def test_result_round_trips_keeps_order_and_previous(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    first = {"format": FORMAT_VERSION, "verdict": "baseline-stands", "zeta": 1, "alpha": (1, 2), "x": 1.23456789}
    write_result(path, first)
    text = path.read_text()
    assert text.index("zeta") < text.index("alpha"), "fields keep the order they were written in"
    loaded = load_result(path)
    assert loaded["alpha"] == [1, 2]
    assert loaded["x"] == pytest.approx(1.2346)
    write_result(path, {**first, "verdict": "improved"})
    assert load_result(path)["verdict"] == "improved"
    assert load_result(previous_path(path))["verdict"] == "baseline-stands"


def test_unreadable_results_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"missing\.yaml: result file not found"):
        load_result(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("format: 99\n")
    with pytest.raises(UserError, match=r"not a llamahost result \(format 1\)"):
        load_result(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1, 2\n")
    with pytest.raises(UserError, match="not a readable result"):
        load_result(broken)

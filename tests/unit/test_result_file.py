"""The result file: written atomically with the previous kept, read back as the typed TuneResult, and refused
block by block when it is damaged or foreign (tuner.result)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from result_support import proven_result

from tuner.atomic import previous_path
from tuner.errors import UserError
from tuner.output import print_json
from tuner.result import FORMAT_VERSION, TuneResult, load_result, load_result_data, write_result, write_result_data


def test_result_round_trips_keeps_order_and_previous(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    first = {"format": FORMAT_VERSION, "verdict": "baseline-stands", "zeta": 1, "alpha": (1, 2), "x": 1.23456789}
    write_result_data(path, first)
    text = path.read_text()
    assert text.index("zeta") < text.index("alpha"), "fields keep the order they were written in"
    loaded = load_result_data(path)
    assert loaded["alpha"] == [1, 2]
    assert loaded["x"] == pytest.approx(1.2346)
    write_result_data(path, {**first, "verdict": "improved"})
    assert load_result_data(path)["verdict"] == "improved"
    assert load_result_data(previous_path(path))["verdict"] == "baseline-stands"


def test_a_typed_result_survives_its_file_and_keeps_blocks_it_does_not_know(tmp_path: Path) -> None:
    data = {**proven_result(kind="live"), "a_newer_block": {"kept": True}}
    result = TuneResult.from_dict(data, origin="r")
    result.downtime = {"restarts": 3}
    path = tmp_path / "r.yaml"
    write_result(path, result)
    again = load_result(path)
    assert again == result and again.kind == "live" and again.improved
    assert again.extra == {"a_newer_block": {"kept": True}} and again.downtime == {"restarts": 3}
    assert list(again.to_dict())[:4] == ["format", "study", "written", "verdict"], "people read the verdict first"
    assert "roofline" not in again.to_dict() and again.to_dict()["improvement"] is not None


def test_json_output_holds_a_typed_result_as_its_file_does(capsys: pytest.CaptureFixture[str]) -> None:
    """``--json`` (tuner.output.print_json) prints a result nested in a report as its plain data, never as the
    text of a Python object, and a path as its text."""
    result = TuneResult.from_dict(proven_result(), origin="r")
    print_json({"result": result, "at": Path("/srv/r.yaml")})
    printed = json.loads(capsys.readouterr().out)
    assert printed["result"] == json.loads(json.dumps(result.to_dict())) and printed["at"] == "/srv/r.yaml"


def test_a_result_written_before_kind_and_unit_existed_still_reads(tmp_path: Path) -> None:
    old = proven_result(kind="live")
    del old["kind"], old["unit"]
    path = tmp_path / "old.yaml"
    write_result_data(path, old)
    result = load_result(path)
    assert result.kind == "live" and result.unit == "live-throughput", "told by its objective"


@pytest.mark.parametrize(("damage", "fragment"), [
    (lambda r: r.pop("settings"), "r.yaml has no settings"),
    (lambda r: r.update(settings={**r["settings"], "config": ["threads", 4]}),
     "settings: config is a list, not a mapping"),
    (lambda r: r.update(verdict="probably"), "verdict 'probably' is not one of improved, baseline-stands"),
    (lambda r: r.update(summary=None), "has no summary"),
    (lambda r: r.update(kind="vibes"), "kind 'vibes' is not one of"),
    (lambda r: r.update(candidates={"0": "x"}), "candidates is a mapping, not a list"),
])
def test_a_damaged_result_is_refused_and_names_the_block(tmp_path: Path, damage: Any, fragment: str) -> None:
    data = proven_result()
    damage(data)
    path = tmp_path / "r.yaml"
    write_result_data(path, data)
    with pytest.raises(UserError, match=r"r\.yaml") as refused:
        load_result(path)
    assert fragment in refused.value.problem and ".prev" in refused.value.fix


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

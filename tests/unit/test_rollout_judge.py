"""The canary's judgement and the rollout's pure parts: which host goes first, what a failed canary is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuner.errors import UserError
from tuner.rollout.judge import CanaryPolicy, Windows, judge
from tuner.rollout.measure import endpoint, script_output
from tuner.rollout.run import restore_previous, rollout_hosts
from tuner.writeback import write_vars

POLICY = CanaryPolicy()


def windows(*throughputs: float, errors: int = 0, requests_each: int = 8) -> Windows:
    return Windows(throughputs=throughputs, requests=requests_each * len(throughputs), errors=errors)


def test_the_same_speed_passes() -> None:
    verdict = judge(windows(100, 102, 98), windows(101, 99, 100), POLICY)
    assert verdict.passed and verdict.reasons == () and verdict.ratio == pytest.approx(1.0, abs=0.02)


def test_a_clearly_slower_canary_fails() -> None:
    verdict = judge(windows(100, 102, 98), windows(60, 61, 59), POLICY)
    assert not verdict.passed and "fell to x0.60" in verdict.reasons[0]


def test_a_big_drop_fails_even_when_a_few_noisy_windows_cannot_prove_it() -> None:
    verdict = judge(windows(100, 160, 40), windows(85, 150, 30), POLICY)
    assert verdict.p_value > POLICY.alpha, "not significant with this spread"
    assert not verdict.passed and "more than the 5% allowed" in verdict.reasons[0]


def test_a_small_but_significant_fall_fails_and_noise_below_the_floor_passes() -> None:
    steady = windows(100.0, 100.2, 99.8, 100.1)
    assert not judge(steady, windows(97.0, 97.1, 96.9, 97.05), POLICY).passed  # 3%: significant
    assert judge(steady, windows(99.6, 99.8, 99.5, 99.7), POLICY).passed  # 0.4%: below the 1% floor


def test_a_faster_canary_passes() -> None:
    assert judge(windows(100, 101, 99), windows(130, 128, 131), POLICY).passed


def test_more_failed_requests_fail_the_canary() -> None:
    verdict = judge(windows(100, 100, 100), windows(100, 100, 100, errors=1), POLICY)
    assert not verdict.passed and "1 of 24 requests failed" in verdict.reasons[0]
    assert judge(windows(100, 100, 100, errors=1), windows(100, 100, 100, errors=1), POLICY).passed


@pytest.mark.parametrize("bad", [{"max_slowdown": 0}, {"alpha": 1.5}, {"max_error_rate": -0.1}])
def test_thresholds_outside_their_range_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(UserError, match="canary thresholds"):
        CanaryPolicy(**bad)


def test_the_canary_is_the_first_sorted_host_and_the_limit_must_be_targets() -> None:
    assert rollout_hosts(("h2", "h1", "h3"), ()) == ["h1", "h2", "h3"]
    assert rollout_hosts(("h2", "h1", "h3"), ("h3", "h2")) == ["h2", "h3"]
    with pytest.raises(UserError, match="does not apply to: h9"):
        rollout_hosts(("h1",), ("h9",))


def test_a_failed_canary_restores_the_vars_file_byte_for_byte(tmp_path: Path) -> None:
    path = tmp_path / "llama_hosts.yml"
    original = "---\n# rack 7\nllama_server_threads: 32   # measured in May\n"
    path.write_text(original)
    write_vars(path, {"llama_server_threads": 1}, note="a winner")
    restore_previous(path)
    assert path.read_text() == original


def test_the_endpoint_is_the_servers_address_as_seen_on_the_host() -> None:
    assert endpoint({}) == ("http://127.0.0.1:8080", "/etc/llama-server/api-key")
    assert endpoint({"llama_server_host": "0.0.0.0", "llama_server_port": 9000,
                     "llama_server_service_name": "llm"}) == ("http://127.0.0.1:9000", "/etc/llm/api-key")
    assert endpoint({"llama_server_host": "10.0.4.12"})[0] == "http://10.0.4.12:8080"


def report(host: str, **outcome: object) -> str:
    return json.dumps({"plays": [{"tasks": [{"hosts": {host: outcome}}]}]})


def test_the_measurement_is_read_from_ansibles_json_report() -> None:
    measured = {"windows": [{"throughput_tps": 10.0, "requests": 4, "errors": 0}] * 2}
    assert script_output(report("h1", stdout=json.dumps(measured) + "\n"), "h1") == measured
    timed = f"Wednesday 02 December 2026 (0:00:00.031) ****\n{report('h1', stdout=json.dumps(measured))}\n=====\n"
    assert script_output(timed, "h1") == measured, "a task timer's lines around the report are skipped"
    with pytest.raises(UserError, match="did not answer"):
        script_output(report("h1", unreachable=True, msg="timeout"), "h1")
    with pytest.raises(UserError, match="failed: health"):
        script_output(report("h1", stdout=json.dumps({"error": "health"})), "h1")
    with pytest.raises(UserError, match="no measurement came back"):
        script_output("not json", "h1")
    with pytest.raises(UserError, match="2 or more"):
        Windows.from_report({"windows": [{"throughput_tps": 1, "requests": 1, "errors": 0}]}, origin="h1")

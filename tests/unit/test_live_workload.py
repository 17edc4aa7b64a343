"""Workload mixes and the numbers a window of requests is reduced to."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuner.errors import UserError
from tuner.live.workload import (
    RequestRecord,
    Window,
    builtin_requests,
    load_jsonl,
    make_request_mix,
    percentile,
)


def test_builtin_mixes_are_deterministic_and_shaped_as_documented() -> None:
    chat = builtin_requests("chat", 50)
    assert chat == builtin_requests("chat", 50), "every trial must replay the same requests"
    assert all(50 <= len(r.prompt.split()) <= 1500 and 64 <= r.max_tokens <= 256 for r in chat)
    batch = builtin_requests("batch", 20)
    assert all(1000 <= len(r.prompt.split()) <= 2500 and 16 <= r.max_tokens <= 64 for r in batch)
    small = builtin_requests("chat", 50, scale=0.1)
    assert max(len(r.prompt.split()) for r in small) <= 150


def test_jsonl_workloads_and_their_errors(tmp_path: Path) -> None:
    good = tmp_path / "w.jsonl"
    good.write_text('{"prompt": "hello there", "max_tokens": 16}\n\n{"prompt": "bye"}\n')
    requests = load_jsonl(good)
    assert [(r.prompt, r.max_tokens) for r in requests] == [("hello there", 16), ("bye", 128)]
    for line, fragment in (("not json", ":1: not JSON"), ('{"max_tokens": 3}', "non-empty string 'prompt'"),
                           ('{"prompt": "x", "max_tokens": 0}', "between 1 and 32768"),
                           ('{"prompt": "x", "max_tokens": true}', "between 1 and 32768")):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(line + "\n")
        with pytest.raises(UserError, match=fragment):
            load_jsonl(bad)
    with pytest.raises(UserError, match="not found"):
        load_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match=r"(?s)workload file rag not found.*pass chat, batch"):
        make_request_mix("rag", concurrency=1)
    with pytest.raises(UserError, match="concurrency"):
        make_request_mix("chat", concurrency=0)


def test_percentiles_are_latencies_that_happened() -> None:
    values = [0.1 * i for i in range(1, 21)]
    assert percentile(values, 95) == pytest.approx(1.9)
    assert percentile(values, 50) == pytest.approx(1.0)
    assert percentile([3.0], 95) == 3.0


def test_window_metrics_ignore_failed_requests_but_count_them() -> None:
    records = (
        RequestRecord(ok=True, ttft_s=0.2, latency_s=1.0, prompt_tokens=100, generated_tokens=50,
                      prompt_per_second=400, predicted_per_second=60),
        RequestRecord(ok=True, ttft_s=0.4, latency_s=2.0, prompt_tokens=300, generated_tokens=50,
                      prompt_per_second=500, predicted_per_second=40),
        RequestRecord(ok=False, error="connection refused", latency_s=0.01),
    )
    window = Window(records=records, wall_s=2.5)
    metrics = window.metrics()
    assert metrics["throughput_tps"] == pytest.approx(40.0)
    assert metrics["prompt_tps"] == pytest.approx(160.0)
    assert metrics["latency_p95_s"] == 2.0 and metrics["ttft_p50_s"] == 0.2
    assert metrics["server_tg_tps"] == 50 and metrics["errors"] == 1
    assert window.errors == ["connection refused"]

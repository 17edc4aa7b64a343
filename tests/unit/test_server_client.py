"""llama-server client pieces that need no server: Prometheus parsing, timings, the server's environment."""

from __future__ import annotations

import pytest

from tuner.server.client import ServerRequestError, Timings, parse_prometheus
from tuner.server.process import server_environment

METRICS = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed, excluding cached tokens
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 10
# HELP llamacpp:tokens_predicted_seconds_total Total time spent generating tokens
# TYPE llamacpp:tokens_predicted_seconds_total counter
llamacpp:tokens_predicted_seconds_total 0.912786
# HELP llamacpp:n_tokens_max Largest observed sequence length (prompt + generation)
# TYPE llamacpp:n_tokens_max counter
llamacpp:n_tokens_max 36
# HELP llamacpp:predicted_tokens_seconds Average generation throughput in tokens/s
# TYPE llamacpp:predicted_tokens_seconds gauge
llamacpp:predicted_tokens_seconds 67.9239
# TYPE llamacpp:spec_decode_num_accepted_tokens_per_pos_total counter
llamacpp:spec_decode_num_accepted_tokens_per_pos_total{position="0"} 3
"""


def test_counters_and_gauges_are_kept_apart() -> None:
    metrics = parse_prometheus(METRICS)
    assert metrics.counters == {
        "llamacpp:prompt_tokens_total": 10.0,
        "llamacpp:tokens_predicted_seconds_total": 0.912786,
        "llamacpp:n_tokens_max": 36.0,
        'llamacpp:spec_decode_num_accepted_tokens_per_pos_total{position="0"}': 3.0,
    }
    assert metrics.gauges == {"llamacpp:predicted_tokens_seconds": 67.9239}


def test_counter_delta_between_scrapes() -> None:
    earlier = parse_prometheus(METRICS)
    later = parse_prometheus(METRICS.replace("_total 10", "_total 25"))
    assert later.counter_delta(earlier)["llamacpp:prompt_tokens_total"] == 15.0


def test_timings_need_every_field() -> None:
    data = {"cache_n": 0, "prompt_n": 5, "prompt_ms": 38.4, "prompt_per_second": 130.3, "predicted_n": 32,
            "predicted_ms": 479.3, "predicted_per_second": 64.7, "prompt_per_token_ms": 7.7}
    assert Timings.from_json(data).predicted_per_second == 64.7
    del data["predicted_ms"]
    with pytest.raises(ServerRequestError, match="predicted_ms"):
        Timings.from_json(data)


def test_the_server_inherits_no_llama_or_openmp_settings() -> None:
    environ = {"PATH": "/usr/bin", "HOME": "/root", "LLAMA_ARG_CTX_SIZE": "65536", "LLAMA_API_KEY": "k",
               "OMP_PROC_BIND": "true", "GOMP_CPU_AFFINITY": "0-3", "LLAMA_CACHE": "/tmp/c"}
    assert server_environment(environ) == {"PATH": "/usr/bin", "HOME": "/root", "LLAMA_CACHE": "/tmp/c"}

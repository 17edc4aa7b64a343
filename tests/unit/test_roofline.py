"""The roofline's denominator (best probe figure, never below what llama.cpp read) and the limit that binds."""

from __future__ import annotations

import pytest
from model_support import a_model

from tuner.roofline import (
    COMPUTE,
    COMPUTE_OR_OVERHEAD,
    MEMORY,
    OVERHEAD,
    bandwidth_phrase,
    binding_limit,
    roofline,
    thread_scaling,
)

GB = 1e9
MODEL = a_model(4 * 1024**3)  # 4 GiB of weights read per token


def test_thread_scaling_takes_the_two_largest_measured_counts() -> None:
    scaling = thread_scaling({1: 5.0, 2: 9.0, 4: 13.5, 3: 0.0})
    assert scaling is not None and (scaling.fewer, scaling.most) == (2, 4)
    assert scaling.gain == pytest.approx(0.5) and scaling.efficiency == pytest.approx(0.5)
    assert thread_scaling({8: 20.0}) is None and thread_scaling({}) is None


@pytest.mark.parametrize(("read", "now", "scaling", "binds"), [
    (27.0, 29.0, {1: 6.0, 2: 6.1}, MEMORY),  # 93% of the minute's bandwidth: memory, whatever threads did
    (17.0, 51.0, {1: 11.0, 2: 19.0}, COMPUTE),  # a third of the bandwidth, and the 2nd core added 73%
    (17.0, 51.0, {1: 16.0, 2: 17.0}, OVERHEAD),  # a third of the bandwidth, and the 2nd core added 6%
    (17.0, 51.0, {2: 17.0}, COMPUTE_OR_OVERHEAD),  # one thread count measured: cannot tell
])
def test_the_limit_that_binds(read: float, now: float, scaling: dict[int, float], binds: str) -> None:
    limit = binding_limit(read, now, thread_scaling(scaling))
    assert limit.binds == binds and f"{read:.1f} GB/s" in limit.reason


def test_the_denominator_is_the_best_probe_figure_and_the_limit_is_judged_next_to_the_trials() -> None:
    """The same llama.cpp speed on a machine whose bandwidth swung: the fraction is of the best figure (what the
    memory can deliver), the limit is judged against the minute the trials ran in."""
    per_token = MODEL.bytes_per_token + MODEL.kv_bytes_per_token() * 100
    tg = 27.0 * GB / per_token  # llama.cpp read 27 GB/s
    roof = roofline(54.0, MODEL, tg, depth=100, probe_runs_gbps=(28.6, 51.0, 54.0), bandwidth_now_gbps=28.0,
                    tg_by_threads={1: tg / 1.9, 2: tg})
    assert roof.bandwidth_gbps == 54.0 and roof.bandwidth_source == "probe"
    assert roof.fraction == pytest.approx(0.5) and roof.read_gbps == pytest.approx(27.0)
    assert roof.limit.binds == MEMORY, "96% of what memory delivered in that minute"
    data = roof.to_dict()
    assert data["fraction_of_now"] == pytest.approx(27 / 28) and data["probe_runs_gbps"] == [28.6, 51.0, 54.0]
    assert "best of 3 probe measurement(s), 28.6-54.0; 28.0 GB/s next to the trials" in bandwidth_phrase(data)


def test_llama_cpp_reading_faster_than_any_probe_sets_the_denominator() -> None:
    per_token = MODEL.bytes_per_token + MODEL.kv_bytes_per_token() * 100
    tg = 30.0 * GB / per_token
    roof = roofline(25.0, MODEL, tg, depth=100, bandwidth_now_gbps=24.0)
    assert roof.bandwidth_source == "llama.cpp" and roof.bandwidth_gbps == pytest.approx(30.0)
    assert roof.fraction == pytest.approx(1.0) and roof.limit.binds == MEMORY
    assert "the probe underestimates" in bandwidth_phrase(roof.to_dict())


def test_a_result_written_before_the_limit_was_recorded_still_reads() -> None:
    old = {"bandwidth_gbps": 29.3, "fraction": 0.6, "max_tg_tps": 10.0}
    assert bandwidth_phrase(old) == "29.3 GB/s, best of 1 probe measurement(s)"
    with pytest.raises(ValueError, match="positive"):
        roofline(0.0, MODEL, 1.0, depth=1)

"""Memory bandwidth: the measurement plan (pure), a real short measurement on this machine, the cache."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tuner.probe import BandwidthError, BandwidthResult, HostProbe, probe_host, read_host
from tuner.probe.bandwidth import (
    ALL_NODES,
    METHOD,
    MIB,
    BandwidthPlan,
    Phase,
    Span,
    aggregate_sample,
    plan_measurement,
    run_plan,
)
from tuner.probe.bandwidth_cache import (
    HISTORY_LIMIT,
    best_sustained,
    cache_path,
    cached_or_measured_bandwidth,
    load_cached,
    load_history,
    record,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hosts"
SHORT = 0.3  # seconds of streaming per real measurement in these tests


@pytest.fixture(scope="module")
def this_host() -> HostProbe:
    return read_host("/")


def test_plan_for_a_two_socket_epyc_samples_every_node_then_all() -> None:
    topo = read_host(FIXTURES / "epyc-9654-2s-nps4").topology
    plan = plan_measurement(topo, seconds=3.0, available_bytes=1024**4)
    assert plan.worker_cpus == tuple(range(192))  # one per physical core, first threads only
    assert [p.scope for p in plan.phases] == [*range(8), ALL_NODES]
    assert [plan.worker_cpus[i] for i in plan.phases[1].workers] == list(range(24, 48))
    assert len(plan.phases[-1].workers) == 192
    # 8 x 24 x 32 MiB of L3: 8x that over 192 workers is 32 MiB each, so the 128 MiB floor wins
    assert plan.buffer_bytes == 128 * MIB
    # 9 scopes in 3 s: at least 0.1 s per sample and 3 samples per scope
    assert plan.repetitions == 3 and plan.window_s == pytest.approx(3.0 / 27)
    assert plan.streaming_seconds == pytest.approx(3.0)


def test_plan_on_one_node_has_one_scope_and_uses_allowed_siblings() -> None:
    topo = read_host(FIXTURES / "xeon-8480-1s").topology
    plan = plan_measurement(topo, seconds=1.0, allowed_cpus={60, 61, 5})
    assert plan.worker_cpus == (60, 5)  # core 4 through its second thread, core 5 through its first
    assert [p.scope for p in plan.phases] == [ALL_NODES]
    assert plan.repetitions == 5 and plan.window_s == pytest.approx(0.2)


def test_buffers_shrink_to_free_memory_and_refuse_when_it_is_too_little() -> None:
    topo = read_host(FIXTURES / "xeon-8480-1s").topology
    roomy = plan_measurement(topo, available_bytes=None)
    assert roomy.buffer_bytes == 128 * MIB  # 8 x 105 MiB / 56 workers is below the floor
    tight = plan_measurement(topo, available_bytes=56 * 4 * 64 * MIB)
    assert tight.buffer_bytes == 64 * MIB
    with pytest.raises(BandwidthError, match="not enough free memory"):
        plan_measurement(topo, available_bytes=512 * MIB)
    with pytest.raises(ValueError, match="positive"):
        plan_measurement(topo, seconds=0)
    with pytest.raises(BandwidthError, match="no CPU"):
        plan_measurement(topo, allowed_cpus={4096})


def test_a_sample_is_all_bytes_over_the_whole_span() -> None:
    sample = aggregate_sample([Span(10.0, 11.0, 4_000_000_000, 1.0), Span(10.5, 12.0, 2_000_000_000, 0.75)])
    assert sample.gbps == pytest.approx(3.0)  # 6 GB over 2 s, not 4 + 1.33 GB/s
    assert sample.cpu_share == pytest.approx(1.75 / 2.5)


def test_a_worker_that_cannot_pin_fails_the_measurement(this_host: HostProbe) -> None:
    impossible = BandwidthPlan(worker_cpus=(4095,), phases=(Phase(ALL_NODES, (0,)),),
                               buffer_bytes=16 * MIB, repetitions=1, window_s=0.1)
    with pytest.raises(BandwidthError, match="CPU 4095 failed: OSError"):
        run_plan(impossible)


def _fake_result(gbps: float, cpu_share: float = 1.0, at: str = "2000-01-01T00:00:00+00:00") -> BandwidthResult:
    return BandwidthResult(all_nodes_gbps=gbps, per_node_gbps={0: gbps}, threads=2, buffer_bytes=128 * MIB,
                           samples_gbps=(gbps,), method=METHOD, per_node_samples_gbps={0: (gbps,)},
                           measured_at=at, cpu_share=cpu_share)


def test_cache_hit_returns_the_stored_result_without_measuring(this_host: HostProbe, tmp_path: Path) -> None:
    stored = _fake_result(123.45)
    record(cache_path(this_host.fingerprint(), tmp_path), this_host.fingerprint(), stored)
    assert cached_or_measured_bandwidth(this_host, seconds=SHORT, cache_dir=tmp_path) == \
        dataclasses.replace(stored, runs_gbps=(123.45,))


def test_probe_host_attaches_the_cached_bandwidth(this_host: HostProbe, tmp_path: Path) -> None:
    stored = _fake_result(55.5)
    record(cache_path(this_host.fingerprint(), tmp_path), this_host.fingerprint(), stored)
    probe = probe_host(cache_dir=tmp_path)
    assert probe.bandwidth is not None and probe.bandwidth.all_nodes_gbps == 55.5
    assert probe.fingerprint() == this_host.fingerprint()
    assert probe_host(bandwidth=False).bandwidth is None


def test_real_measurement_replaces_a_contended_cache_entry(this_host: HostProbe, tmp_path: Path) -> None:
    """A result taken while other processes held the CPUs is shown once, never reused: this measures."""
    fingerprint = this_host.fingerprint()
    path = cache_path(fingerprint, tmp_path)
    record(path, fingerprint, _fake_result(2.0, cpu_share=0.4))
    result = cached_or_measured_bandwidth(this_host, seconds=SHORT, cache_dir=tmp_path)
    assert result.measured_at != "2000-01-01T00:00:00+00:00" and len(load_history(path, fingerprint)) == 2
    if not result.contended:  # this machine is shared: the new measurement may have been contended too
        assert load_cached(path, fingerprint) == result and result.runs_gbps == (result.all_nodes_gbps,)
    repetitions = plan_measurement(this_host.topology, seconds=SHORT).repetitions
    assert len(result.samples_gbps) == repetitions == 3 and all(s > 0 for s in result.samples_gbps)
    # DRAM reads of any machine this runs on: above 1 GB/s, below what 24 DDR5 channels deliver
    assert 1.0 < result.all_nodes_gbps < 1500.0
    assert min(result.samples_gbps) <= result.all_nodes_gbps <= max(result.samples_gbps)
    assert result.threads == this_host.topology.physical_core_count
    assert set(result.per_node_gbps) == set(this_host.topology.nodes_with_cpus)
    assert 0 < result.cpu_share <= 1 and result.method == METHOD


def test_remeasure_adds_a_measurement_and_the_best_sustained_one_stays_the_figure(
        this_host: HostProbe, tmp_path: Path) -> None:
    fingerprint = this_host.fingerprint()
    path = cache_path(fingerprint, tmp_path)
    record(path, fingerprint, _fake_result(0.5))  # below anything real: the new measurement beats it
    figure = cached_or_measured_bandwidth(this_host, seconds=SHORT, remeasure=True, cache_dir=tmp_path)
    history = load_history(path, fingerprint)
    assert len(history) == 2 and history[-1].measured_at != "2000-01-01T00:00:00+00:00"
    if not history[-1].contended:
        assert figure.all_nodes_gbps == history[-1].all_nodes_gbps > 0.5
        assert figure.runs_gbps == (0.5, history[-1].all_nodes_gbps)
    record(path, fingerprint, _fake_result(9999.0))  # a figure no later, lower measurement replaces
    assert cached_or_measured_bandwidth(this_host, seconds=SHORT, cache_dir=tmp_path).all_nodes_gbps == 9999.0


def test_the_best_sustained_figure_leaves_contended_measurements_out_and_keeps_the_spread(tmp_path: Path) -> None:
    history = [_fake_result(28.6, at="1"), _fake_result(80.0, cpu_share=0.5, at="2"), _fake_result(54.0, at="3"),
               _fake_result(51.0, at="4")]
    best = best_sustained(history)
    assert best is not None and best.all_nodes_gbps == 54.0 and best.measured_at == "3"
    assert best.runs_gbps == (28.6, 54.0, 51.0)
    assert best_sustained([_fake_result(80.0, cpu_share=0.5)]) is None
    path = tmp_path / "bandwidth-FP.json"
    record(path, "FP", _fake_result(80.0, cpu_share=0.5, at="contended"))
    cached = load_cached(path, "FP")
    assert cached is not None and cached.measured_at == "contended", "shown when nothing better is on record"
    for n in range(HISTORY_LIMIT + 3):
        record(path, "FP", _fake_result(10.0 + n, at=str(n)))
    kept = load_history(path, "FP")
    assert len(kept) == HISTORY_LIMIT and kept[0].measured_at == "3" and kept[-1].all_nodes_gbps == 32.0


def test_a_cache_file_of_the_first_version_is_read_as_one_measurement(tmp_path: Path) -> None:
    path = tmp_path / "bandwidth-FP.json"
    path.write_text(json.dumps({"schema": 1, "fingerprint": "FP", "result": dataclasses.asdict(_fake_result(42.0))}))
    assert [r.all_nodes_gbps for r in load_history(path, "FP")] == [42.0]
    record(path, "FP", _fake_result(40.0))
    cached = load_cached(path, "FP")
    assert json.loads(path.read_text())["schema"] == 2 and cached is not None and cached.runs_gbps == (42.0, 40.0)


@pytest.mark.parametrize("content", [
    "{not json",
    json.dumps({"schema": 1, "fingerprint": "0000000000000000", "result": {}}),
    json.dumps({"schema": 99, "fingerprint": "FP", "result": {}}),
    json.dumps({"schema": 1, "fingerprint": "FP", "result": {"all_nodes_gbps": "fast"}}),
    json.dumps({"schema": 2, "fingerprint": "FP", "measurements": "not a list"}),
])
def test_damaged_or_foreign_cache_files_are_ignored(tmp_path: Path, content: str) -> None:
    path = tmp_path / "bandwidth-FP.json"
    path.write_text(content)
    assert load_cached(path, "FP") is None


def test_cache_file_names_carry_the_fingerprint(this_host: HostProbe, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMAHOST_HOME", str(tmp_path))
    path = cache_path(this_host.fingerprint())
    assert path == tmp_path / "cache" / f"bandwidth-{this_host.fingerprint()}.json"
    other = dataclasses.replace(this_host, cpu_model="something else")
    assert cache_path(other.fingerprint()) != path

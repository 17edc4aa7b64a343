"""``llamahost probe`` end to end through the real command line entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuner.cli import main
from tuner.probe import BandwidthResult, read_host
from tuner.probe.bandwidth import METHOD
from tuner.probe.bandwidth_cache import cache_path, record

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hosts"


@pytest.fixture(autouse=True)
def private_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LLAMAHOST_HOME", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "160")
    return tmp_path


def test_json_of_a_recorded_tree(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--root", str(FIXTURES / "epyc-9654-2s-nps4"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fingerprint"] == read_host(FIXTURES / "epyc-9654-2s-nps4").fingerprint()
    assert data["bandwidth"] is None and len(data["topology"]["nodes"]) == 8
    assert data["topology"]["nodes"][0]["cpus"][:3] == [0, 1, 2]


def test_table_names_layout_nodes_and_kernel_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--root", str(FIXTURES / "epyc-9654-2s-nps4")]) == 0
    out = capsys.readouterr().out
    assert "2 socket(s), 8 NUMA node(s), 192 cores x 2 thread(s) = 384 logical CPUs, 24 LLC domain(s)" in out
    assert "0-23,192-215" in out and "3 x 32M" in out and "2M 1000/1024, 1G 4/4" in out
    assert "performance x384" in out and "ggml warns" in out  # numa_balancing=1 on a multi-node host
    assert "memory bandwidth: not measured" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["--remeasure", "--no-bandwidth"], "contradict"),
    (["--seconds", "0"], "--seconds must be positive"),
    (["--root", "/nonexistent-root"], "holds neither sys/ nor proc/"),
    (["--root", str(FIXTURES / "xeon-8480-1s"), "--remeasure"], "cannot be combined with --root"),
])
def test_bad_options_exit_2_with_a_fix(capsys: pytest.CaptureFixture[str], argv: list[str], message: str,
                                       private_home: Path) -> None:
    assert main(["probe", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "fix:" in err
    assert not (private_home / "cache").exists()  # nothing measured, nothing written


def test_live_probe_uses_the_cached_bandwidth_of_this_host(capsys: pytest.CaptureFixture[str]) -> None:
    host = read_host("/")
    cached = BandwidthResult(all_nodes_gbps=77.7, per_node_gbps={0: 77.7}, threads=2, buffer_bytes=1 << 27,
                             samples_gbps=(77.0, 77.7, 78.0), method=METHOD, measured_at="2000-01-01T00:00:00")
    record(cache_path(host.fingerprint()), host.fingerprint(), cached)
    assert main(["probe", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bandwidth"]["all_nodes_gbps"] == 77.7
    assert main(["probe"]) == 0
    assert "77.7" in capsys.readouterr().out


def test_live_probe_without_bandwidth(capsys: pytest.CaptureFixture[str], private_home: Path) -> None:
    assert main(["probe", "--no-bandwidth", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["bandwidth"] is None and data["fingerprint"] == read_host("/").fingerprint()
    assert not (private_home / "cache").exists()

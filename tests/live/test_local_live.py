"""The local live server (no systemd): supervised llama-server, trial configurations, dead-man switch,
the one-tuner lock, and live trials measured under a real workload. Real binary, real model."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from control_contract import (
    ControlUnderTest,
    check_a_configuration_that_cannot_start_is_reported_and_the_baseline_comes_back,
    check_a_second_tuner_is_refused_at_once,
    check_a_trial_runs_and_the_baseline_comes_back,
    check_the_dead_man_switch_restores_the_baseline,
)
from process_support import session_processes

from tuner.config import RunConfig
from tuner.cpu_lists import format_cpu_list
from tuner.errors import TrialFailed, UserError
from tuner.live.local import LocalServer, ServerSpec
from tuner.live.measure import Guards, Heartbeat, LiveMeasurer, LiveObjective, LiveSettings
from tuner.live.workload import make_request_mix
from tuner.model_pages import cpus_allowed, threads_status
from tuner.server.client import complete
from tuner.server.process import free_port
from tuner.stats import StopRule

pytestmark = pytest.mark.server

BASE = RunConfig(threads=1, threads_batch=1, parallel=1, ctx_size=1024)
TRIAL = RunConfig(threads=1, threads_batch=1, parallel=2, cont_batching=True, ctx_size=2048)


@pytest.fixture
def server(tmp_path: Path, llama_server_binary: Path, model_path: Path) -> Iterator[LocalServer]:
    spec = ServerSpec(binary=str(llama_server_binary), model=str(model_path), host="127.0.0.1", port=free_port(),
                      deadman_s=4.0, health_timeout_s=60.0)
    control = LocalServer(tmp_path / "state", spec)
    control.start(BASE)
    yield control
    control.shutdown()
    deadline = time.monotonic() + 10
    while session_processes(str(tmp_path / "state").encode()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert session_processes(str(tmp_path / "state").encode()) == [], "the supervisor outlived its shutdown"


def running_args(control: LocalServer) -> str:
    pid = control.server_pid()
    assert pid is not None
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def oom_score_adj(server: LocalServer) -> str:
    return Path(f"/proc/{server.server_pid()}/oom_score_adj").read_text().strip()


def contract(server: LocalServer) -> ControlUnderTest:
    """The local supervisor under tests/control_contract.py: what runs is read from the server's /proc cmdline."""

    def runs(config: RunConfig) -> bool:
        pid = server.server_pid()
        try:  # between a stop and a start there is no process to read
            args = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            return False
        return pid is not None and f" {' '.join(config.server_args())} " in f" {args} "

    return ControlUnderTest(
        name="the local supervisor", control=server, baseline=BASE, trial=TRIAL,
        unstartable=RunConfig(threads=1, threads_batch=1, parallel=64, ctx_size=16_777_216),  # KV far beyond RAM
        runs=runs, second_tuner=server.lock, refusal="another llamahost run is already measuring on this host",
        refused_within_s=1.0, dead_man_within_s=server.spec.deadman_s + 30)


def test_trial_and_baseline_configurations_swap(server: LocalServer) -> None:
    """A trial's server is the out-of-memory killer's first choice; the baseline keeps the score it inherits."""
    inherited = Path("/proc/self/oom_score_adj").read_text().strip()
    assert oom_score_adj(server) == inherited

    def on_trial() -> None:
        assert "--ctx-size 2048" in running_args(server) and oom_score_adj(server) == "1000"

    def on_baseline() -> None:
        assert oom_score_adj(server) == inherited

    check_a_trial_runs_and_the_baseline_comes_back(contract(server), on_trial=on_trial, on_baseline=on_baseline)


def test_a_strictly_placed_trial_is_placed_as_asked(server: LocalServer) -> None:
    """llama.cpp narrows the main thread of a ``--cpu-strict 1`` server to one CPU: the placement read-back takes
    every thread's mask, so the trial starts instead of failing as "not placed as asked"."""
    cpus = tuple(sorted(os.sched_getaffinity(0)))[:2]
    if len(cpus) < 2:
        pytest.skip("strict placement needs two CPUs this process may use")
    server.apply(RunConfig(threads=2, threads_batch=2, cpus=cpus, placement="compact", cpu_strict=True,
                           ctx_size=1024))
    assert "--cpu-strict 1" in running_args(server)
    assert server.last_applied["cpus_allowed"] == format_cpu_list(cpus)
    # Once it has computed, the main thread alone says one CPU; every thread's mask together says the set.
    complete(f"http://127.0.0.1:{server.spec.port}", "Hello", 4)
    pid = server.server_pid()
    assert pid is not None
    assert len(cpus_allowed(Path(f"/proc/{pid}/status").read_text()) or ()) == 1
    assert cpus_allowed(threads_status(pid)) == cpus
    server.restore_baseline()


def test_dead_man_switch_restores_the_baseline_when_the_controller_goes_quiet(server: LocalServer) -> None:
    check_the_dead_man_switch_restores_the_baseline(contract(server), lambda: server.apply(TRIAL),
                                                    silent_for_at_least_s=server.spec.deadman_s / 2)
    assert "baseline restored" in (server.state / "supervisor.log").read_text()


def test_a_wall_clock_step_neither_fires_the_dead_man_switch_nor_keeps_it_from_firing(server: LocalServer) -> None:
    """While the tuner beats, the heartbeat file looks an hour old (the clock stepped ahead): the trial stays.
    Then silence, and the file looks an hour newer (the clock stepped back): the baseline is back within the
    limit. tests/unit/test_deadman_clock.py does the same to the host-side switch."""
    beat = server.state / "heartbeat"
    server.apply(TRIAL)
    until = time.monotonic() + 2 * server.spec.deadman_s
    while time.monotonic() < until:
        server.heartbeat()
        stamp = time.time() - 3600
        os.utime(beat, (stamp, stamp))
        time.sleep(0.5)
    assert "baseline restored" not in supervisor_log(server) and "--parallel 2" in running_args(server)
    silent_from = time.monotonic()
    stamp = time.time() + 3600
    os.utime(beat, (stamp, stamp))
    while "baseline restored" not in supervisor_log(server) and time.monotonic() - silent_from < 60:
        time.sleep(0.2)
    waited = time.monotonic() - silent_from
    assert "baseline restored" in supervisor_log(server)
    assert waited < server.spec.deadman_s + 10, f"restored after {waited:.0f} s (limit {server.spec.deadman_s} s)"


def supervisor_log(server: LocalServer) -> str:
    path = server.state / "supervisor.log"
    return path.read_text() if path.exists() else ""


def test_a_second_tuner_is_refused_within_a_second(server: LocalServer) -> None:
    with server.lock():
        check_a_second_tuner_is_refused_at_once(contract(server))


def test_a_configuration_that_cannot_start_is_reported_and_the_baseline_comes_back(server: LocalServer) -> None:
    check_a_configuration_that_cannot_start_is_reported_and_the_baseline_comes_back(contract(server))


def test_an_invalid_configuration_is_refused_before_the_supervisor_sees_it(server: LocalServer) -> None:
    running = server.server_pid()
    with pytest.raises(UserError, match="ctx_size must be an integer"):
        server.apply(RunConfig(threads=1, threads_batch=1, ctx_size=10**9))
    assert not (server.state / "trial.json").exists()
    assert server.server_pid() == running and "--parallel 1" in running_args(server)


def test_a_server_that_dies_is_started_again(server: LocalServer) -> None:
    pid = server.server_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while (server.server_pid() in (None, pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.server_pid() not in (None, pid)


@pytest.fixture
def beating(server: LocalServer) -> Iterator[LocalServer]:
    """The server with a controller that keeps beating, as a tuning session has: a measured window may last
    longer than the tests' short dead-man limit on a slow machine."""
    with Heartbeat(server, 1.0):
        yield server


def measurer(server: LocalServer, **guards: float) -> LiveMeasurer:
    mix = make_request_mix("chat", concurrency=2, count=4, scale=0.1)
    settings = LiveSettings(stop=StopRule(min_samples=3, max_samples=3, target_rel_ci=0.5), max_measure_seconds=60,
                            warmup_windows=1, request_timeout_s=60)
    return LiveMeasurer(server, mix, LiveObjective("throughput"), settings, Guards(**guards))  # type: ignore[arg-type]


def test_a_live_trial_measures_throughput_and_latency(beating: LocalServer) -> None:
    server = beating
    outcome = measurer(server).run(TRIAL, "t")
    assert len(outcome.values) == 3
    for name in ("throughput_tps", "latency_p95_s", "ttft_p95_s", "server_tg_tps", "server_pp_tps"):
        assert all(v > 0 for v in outcome.series[name]), name
    assert outcome.values == outcome.series["throughput_tps"]


def test_latency_and_memory_guards_fail_a_trial_and_restore_the_baseline(beating: LocalServer) -> None:
    server = beating
    strict = measurer(server, latency_multiple=1e-6)
    strict.baseline_latency_p95 = 1.0
    with pytest.raises(TrialFailed, match="p95 latency"):
        strict.run(TRIAL, "t")
    assert "--parallel 1" in running_args(server)
    with pytest.raises(TrialFailed, match="over the limit"):
        measurer(server, max_memory_bytes=1024).run(TRIAL, "t")
    assert "--parallel 1" in running_args(server)


def test_a_server_killed_mid_trial_fails_the_trial(beating: LocalServer) -> None:
    server = beating
    live = measurer(server)
    live.settings = LiveSettings(stop=StopRule(min_samples=30, max_samples=30, target_rel_ci=0.01),
                                 max_measure_seconds=120, warmup_windows=1, request_timeout_s=30)

    def kill_soon() -> None:
        time.sleep(3)
        pid = server.server_pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_soon)
    killer.start()
    with pytest.raises(TrialFailed, match="requests failed"):
        live.run(TRIAL, "t")
    killer.join()
    assert "--parallel 1" in running_args(server)

"""Real trials: the llama-server build the role deploys, on the real small model, in real workers.

Each way a trial can end is exercised for real: success, a llama.cpp error, a worker killed by SIGKILL
(what the out-of-memory killer does), a hard timeout, and a prune decision. After each one no worker
and no llama-server process may be left behind.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest
from process_support import session_processes

from tuner.config import RunConfig
from tuner.errors import TrialFailed
from tuner.model.checksum import sha256_of
from tuner.stats import StopRule
from tuner.trial.protocol import TrialSpec, Warmup, Workload
from tuner.trial.runner import TrialStopped, run_trial

pytestmark = pytest.mark.model

QUICK = Workload(pp_tokens=64, tg_tokens=16)


class SpecMaker(Protocol):
    def __call__(self, model: Path, config: RunConfig, *, objective: str = "tg", samples: int = 4) -> TrialSpec: ...


@pytest.fixture
def spec(llama_server_binary: Path) -> SpecMaker:
    """Trial specs that run the llama-server build the role deploys (``make test`` builds it first)."""

    def make(model: Path, config: RunConfig, *, objective: str = "tg", samples: int = 4) -> TrialSpec:
        return TrialSpec(model_path=str(model), config=config.to_dict(), objective=objective,  # type: ignore[arg-type]
                         server_binary=str(llama_server_binary), workload=QUICK,
                         warmup=Warmup(max_runs=3, max_seconds=10),
                         stop=StopRule(min_samples=3, max_samples=samples, target_rel_ci=0.5), max_measure_seconds=20)

    return make


def workers() -> list[int]:
    """PIDs of this session's trial workers still alive (their command line names the worker module)."""
    return session_processes("tuner.trial.worker")


def servers() -> list[int]:
    """PIDs of this session's benchmark llama-servers still alive."""
    return session_processes(b"llama-server\0")


@pytest.fixture(autouse=True)
def no_leftover_workers() -> Iterator[None]:
    yield
    deadline = time.monotonic() + 5
    while (workers() or servers()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert workers() == [], "a trial worker outlived its trial"
    assert servers() == [], "a trial's llama-server outlived its trial"


def test_a_trial_measures_pp_and_tg(model_path: Path, tmp_path: Path, spec: SpecMaker,
                                    llama_server_binary: Path) -> None:
    cpu = max(os.sched_getaffinity(0))
    config = RunConfig(threads=1, threads_batch=1, cpus=(cpu,), placement="compact", memory_policy="interleave",
                       memory_nodes=(0,))
    outcome = run_trial(spec(model_path, config, objective="both"), timeout_s=120, log_path=tmp_path / "t.log")
    assert not (tmp_path / "t.log").exists() or (tmp_path / "t.log").stat().st_size > 0, "an empty log is not kept"
    assert 3 <= len(outcome.values) <= 4
    pp, tg = outcome.series["pp_tps"], outcome.series["tg_tps"]
    assert all(v > 0 for v in pp + tg)
    assert len(pp) == len(tg) == len(outcome.values)
    assert outcome.applied["cpus"] == [cpu]
    assert (outcome.applied["memory_policy"], outcome.applied["memory_nodes"]) == ("interleave", [0])
    pages = outcome.applied["model_pages"]  # llama.cpp mmaps the model: its pages read back from the server
    assert pages["policy"] == "interleave" and pages["policy_nodes"] == "0" and pages["pages_per_node"]["0"] > 0
    assert "AVX" in outcome.applied["system_info"] or "NEON" in outcome.applied["system_info"]
    assert outcome.applied["binary_sha256"] == sha256_of(llama_server_binary), "measured on the deployed build"
    assert 0 < outcome.measuring_seconds < outcome.wall_seconds
    assert outcome.stop_reason in ("ci-narrow", "max-samples")


def test_a_strictly_placed_trial_is_read_back_on_its_whole_cpu_set(model_path: Path, tmp_path: Path,
                                                                   spec: SpecMaker) -> None:
    """``--cpu-strict 1`` narrows llama.cpp's main thread to one CPU of the set: the read-back takes every thread's
    mask, so the trial is measured, not failed as "runs on CPU 0, not the trial's 0-1"."""
    cpus = tuple(sorted(os.sched_getaffinity(0)))[:2]
    if len(cpus) < 2:
        pytest.skip("strict placement needs two CPUs this process may use")
    config = RunConfig(threads=2, threads_batch=2, cpus=cpus, placement="compact", cpu_strict=True)
    outcome = run_trial(spec(model_path, config), timeout_s=120, log_path=tmp_path / "t.log")
    assert outcome.applied["cpus"] == list(cpus)
    assert all(v > 0 for v in outcome.values)


def test_tg_objective_still_reports_pp(model_path: Path, tmp_path: Path, spec: SpecMaker) -> None:
    outcome = run_trial(spec(model_path, RunConfig(threads=1, threads_batch=1)), timeout_s=120,
                        log_path=tmp_path / "t.log")
    assert "pp_tps" not in outcome.series and len(outcome.info["pp_tps"]) == 2
    pp = outcome.metric_summary("pp_tps")
    assert pp is not None and pp.median > 0


def test_llama_cpp_refusing_the_model_is_a_failed_trial(tmp_path: Path, spec: SpecMaker) -> None:
    not_a_model = tmp_path / "model.gguf"
    not_a_model.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(TrialFailed, match=r"llama-server exited with code 1 before it became healthy[\s\S]*"
                                          r"error loading model"):
        run_trial(spec(not_a_model, RunConfig(threads=1, threads_batch=1)), timeout_s=60,
                  log_path=tmp_path / "t.log")


def test_a_worker_killed_by_sigkill_is_a_failed_trial(model_path: Path, tmp_path: Path, spec: SpecMaker) -> None:
    """Also: the worker is the out-of-memory killer's first choice (oom_score_adj 1000), so when a trial runs
    the host out of memory the kernel kills the trial, not the tuner or sshd."""
    scores: list[str] = []

    def kill_first_worker() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for pid in workers():
                time.sleep(1.0)  # let it load and start measuring
                scores.append(Path(f"/proc/{pid}/oom_score_adj").read_text().strip())
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_first_worker)
    killer.start()
    with pytest.raises(TrialFailed, match="killed by SIGKILL"):
        run_trial(spec(model_path, RunConfig(threads=1, threads_batch=1), samples=30), timeout_s=120,
                  log_path=tmp_path / "t.log")
    killer.join()
    assert scores == ["1000"], "the tuner itself keeps its own score (inherited otherwise)"


def test_a_trial_past_its_deadline_is_killed(model_path: Path, tmp_path: Path, spec: SpecMaker) -> None:
    started = time.monotonic()
    with pytest.raises(TrialFailed, match="timed out after 2 s"):
        run_trial(spec(model_path, RunConfig(threads=1, threads_batch=1), samples=30), timeout_s=2,
                  log_path=tmp_path / "t.log")
    assert time.monotonic() - started < 15


def test_a_prune_decision_stops_the_worker(model_path: Path, tmp_path: Path, spec: SpecMaker) -> None:
    steps: list[int] = []

    def prune_after_two(step: int, running_median: float) -> bool:
        steps.append(step)
        assert running_median > 0
        return step >= 1

    with pytest.raises(TrialStopped) as stopped:
        run_trial(spec(model_path, RunConfig(threads=1, threads_batch=1), samples=30), timeout_s=120,
                  log_path=tmp_path / "t.log", on_sample=prune_after_two)
    assert stopped.value.step == 1
    assert steps == [0, 1]


@pytest.mark.parametrize(("says", "kept"), [("", False), ("echo 'ggml: out of memory' >&2", True)])
def test_a_trial_log_is_kept_only_when_the_worker_wrote_to_it(tmp_path: Path, says: str, kept: bool,
                                                              spec: SpecMaker) -> None:
    """A worker stand-in (run as the trial's python) that dies with or without a word: the empty log goes, the
    one that holds something stays, and the failure quotes it."""
    stand_in = tmp_path / "python"
    stand_in.write_text(f"#!/bin/sh\n{says}\nexit 3\n")
    stand_in.chmod(0o755)
    log = tmp_path / "logs" / "trial-1.log"
    with pytest.raises(TrialFailed, match="exited with status 3") as failed:
        run_trial(spec(tmp_path / "m.gguf", RunConfig(threads=1, threads_batch=1)), timeout_s=30, log_path=log,
                  python=str(stand_in))
    assert log.exists() is kept
    assert ("out of memory" in str(failed.value)) is kept

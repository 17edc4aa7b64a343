"""Trial manager: start a worker process, watch it under a hard deadline, collect its results.

The manager never trusts the worker to end by itself. It reads the worker's event stream with a deadline,
kills the whole process group on timeout, on a prune decision, on Ctrl-C/SIGTERM, or when anything goes
wrong in the manager itself, and turns every way a worker can die into :class:`TrialFailed` with a
reason a person can act on. A failure is never a score.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from tuner.errors import TrialFailed
from tuner.server.process import child_setup
from tuner.stats import Summary, summarize
from tuner.trial.protocol import TrialSpec

LOG_TAIL_BYTES = 2000
KILL_GRACE_S = 2.0


class TrialStopped(Exception):
    """The manager stopped a healthy trial on purpose (a prune decision)."""

    def __init__(self, step: int, value: float) -> None:
        super().__init__(f"stopped at sample {step} (running median {value:.2f})")
        self.step = step
        self.value = value


# Called after each sample with (sample index, running median); returns True to stop the trial.
SampleCallback = Callable[[int, float], bool]


@dataclass
class TrialOutcome:
    """Everything one worker measured, with the time accounting the benchmarks report."""

    values: list[float] = field(default_factory=list)
    # Per-sample measurements by name (``pp_tps``/``tg_tps`` for benchmark trials; throughput and latency
    # figures for live trials), and extra runs of metrics the objective does not sample.
    series: dict[str, list[float]] = field(default_factory=dict)
    info: dict[str, list[float]] = field(default_factory=dict)
    warmup_values: list[float] = field(default_factory=list)
    stop_reason: str = ""
    warmup_stable: bool = False
    load_seconds: float = 0.0
    warmup_seconds: float = 0.0
    measure_seconds: float = 0.0
    info_seconds: float = 0.0
    wall_seconds: float = 0.0
    applied: dict[str, Any] = field(default_factory=dict)

    @property
    def value(self) -> float:
        return summarize(self.values).median

    def summary(self) -> Summary:
        return summarize(self.values)

    def metric(self, name: str) -> list[float]:
        """A metric's samples, or its informational runs when the objective did not sample it."""
        return self.series.get(name) or self.info.get(name) or []

    @property
    def metric_names(self) -> list[str]:
        return sorted(set(self.series) | set(self.info))

    def metric_summary(self, name: str) -> Summary | None:
        samples = self.metric(name)
        return summarize(samples) if samples else None

    @property
    def measuring_seconds(self) -> float:
        """Seconds spent running llama.cpp on the workload (warm-up included), vs. overhead."""
        return self.warmup_seconds + self.measure_seconds + self.info_seconds

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "values": self.values,
            "series": self.series,
            "info": self.info,
            "warmup_values": self.warmup_values,
            "stop_reason": self.stop_reason,
            "warmup_stable": self.warmup_stable,
            "load_seconds": self.load_seconds,
            "warmup_seconds": self.warmup_seconds,
            "measure_seconds": self.measure_seconds,
            "info_seconds": self.info_seconds,
            "wall_seconds": self.wall_seconds,
            "applied": self.applied,
        }
        return out


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=KILL_GRACE_S * 5)


def _log_tail(path: Path) -> str:
    try:
        data = path.read_bytes()[-LOG_TAIL_BYTES:]
    except OSError:
        return ""
    lines = [ln for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
    return " | ".join(lines[-5:])


@contextlib.contextmanager
def _kept_only_if_written(log_path: Path) -> Iterator[BinaryIO]:
    """The worker's log, opened for appending and removed again if the worker wrote nothing to it: a study's
    log directory then lists only the trials that had something to say (llama.cpp's warnings, a crash)."""
    try:
        with log_path.open("ab") as log:
            yield log
    finally:
        with contextlib.suppress(OSError):
            if log_path.stat().st_size == 0:
                log_path.unlink()


def _death_reason(returncode: int, error: str | None, log_path: Path) -> str:
    if error:
        return error
    if returncode < 0:
        sig = signal.Signals(-returncode).name
        if -returncode == signal.SIGKILL:
            return f"worker killed by {sig} (the out-of-memory killer is the usual cause)"
        return f"worker died from {sig}: {_log_tail(log_path)}"
    return f"worker exited with status {returncode} without a result: {_log_tail(log_path)}"


def run_trial(
    spec: TrialSpec,
    *,
    timeout_s: float,
    log_path: Path,
    on_sample: SampleCallback | None = None,
    python: str = sys.executable,
) -> TrialOutcome:
    """Run one trial in a fresh worker and return what it measured.

    Raises :class:`TrialFailed` for any failure (crash, timeout, llama.cpp error, OOM),
    :class:`TrialStopped` when ``on_sample`` asked to stop, and lets ``KeyboardInterrupt`` through after
    killing the worker.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    read_fd, write_fd = os.pipe()
    started = time.monotonic()
    deadline = started + timeout_s
    outcome = TrialOutcome()
    with _kept_only_if_written(log_path) as log:
        try:
            proc = subprocess.Popen(
                [python, "-m", "tuner.trial.worker", str(write_fd)],
                stdin=subprocess.PIPE, stdout=log, stderr=log, pass_fds=(write_fd,),
                start_new_session=True,  # its own process group: one kill takes every thread and child
                preexec_fn=child_setup(die_with_parent=False, oom_victim=True),  # noqa: PLW1509 (system calls)
            )
        finally:
            os.close(write_fd)
        try:
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(json.dumps(spec.to_json_dict()).encode())
                proc.stdin.close()
            error = _collect(proc, read_fd, outcome, deadline=deadline, on_sample=on_sample, timeout_s=timeout_s)
            returncode = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise TrialFailed(f"worker did not exit after its result (timeout {timeout_s:.0f} s)") from None
        except BaseException:
            _kill_group(proc)
            raise
        finally:
            os.close(read_fd)
    outcome.wall_seconds = time.monotonic() - started
    if error is not None or returncode != 0 or not outcome.stop_reason:
        raise TrialFailed(_death_reason(returncode, error, log_path))
    return outcome


def _collect(
    proc: subprocess.Popen[bytes],
    read_fd: int,
    outcome: TrialOutcome,
    *,
    deadline: float,
    on_sample: SampleCallback | None,
    timeout_s: float,
) -> str | None:
    """Read events until the worker closes its pipe; returns the worker's error message, if any."""
    selector = selectors.DefaultSelector()
    selector.register(read_fd, selectors.EVENT_READ)
    buffer = b""
    phase = "starting"
    error: str | None = None
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _kill_group(proc)
                raise TrialFailed(f"timed out after {timeout_s:.0f} s while {phase}")
            if not selector.select(timeout=min(remaining, 1.0)):
                continue
            chunk = os.read(read_fd, 65536)
            if not chunk:
                return error
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if not line.strip():
                    continue
                event = json.loads(line)
                phase = _apply_event(event, outcome, phase)
                if event["event"] == "error":
                    error = str(event.get("message", "unknown error"))
                if event["event"] == "sample" and on_sample is not None:
                    running = summarize(outcome.values).median
                    if on_sample(len(outcome.values) - 1, running):
                        _kill_group(proc)
                        raise TrialStopped(len(outcome.values) - 1, running)
    finally:
        selector.close()


def _apply_event(event: dict[str, Any], outcome: TrialOutcome, phase: str) -> str:
    kind = event["event"]
    if kind == "ready":
        outcome.load_seconds = float(event["load_seconds"])
        outcome.applied = {k: event[k] for k in ("cpus", "memory_policy", "memory_nodes", "system_info",
                                                 "binary_sha256", "model_pages") if k in event}
        return "warming up"
    if kind == "warmup":
        outcome.warmup_values.append(float(event["value"]))
        return "warming up"
    if kind == "sample":
        outcome.values.append(float(event["value"]))
        for name, value in event.get("metrics", {}).items():
            outcome.series.setdefault(name, []).append(float(value))
        return "sampling"
    if kind == "done":
        outcome.stop_reason = str(event["reason"])
        outcome.warmup_stable = bool(event["warmup_stable"])
        outcome.warmup_seconds = float(event["warmup_seconds"])
        outcome.measure_seconds = float(event["measure_seconds"])
        outcome.info_seconds = float(event["info_seconds"])
        outcome.info = {name: [float(v) for v in runs] for name, runs in event.get("info", {}).items()}
        return "finishing"
    return phase

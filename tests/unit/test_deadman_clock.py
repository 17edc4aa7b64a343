"""The dead-man switches count silence in seconds since boot: a wall-clock step neither fires them early nor
keeps them from firing.

A clock step is what the old switches saw through the heartbeat file's modification time: a step forward makes
the file look old, a step back makes it look new. Here the file's time is moved by an hour each way while the
heartbeat's content is all that changes; the host-side shell switch runs for real (its paths moved into a temp
directory, ``systemctl`` replaced by a recorder), the local supervisor's in tests/live/test_local_live.py.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

from tuner.live.heartbeat import SHELL_WRITE, heartbeat_age, write_heartbeat
from tuner.live.unit import DEADMAN_LOG, HEARTBEAT_FILE, dropin_path, render_deadman_script

LIMIT_S = 3
HOUR = 3600.0


def step_file_clock(path: Path, seconds: float) -> None:
    """What a wall-clock step of ``seconds`` does to a file written just before it, seen from after it."""
    stamp = time.time() - seconds
    os.utime(path, (stamp, stamp))


def test_the_age_is_read_from_the_content_not_the_file_time(tmp_path: Path) -> None:
    beat = tmp_path / "heartbeat"
    assert heartbeat_age(beat) == float("inf")
    write_heartbeat(beat)
    step_file_clock(beat, HOUR)
    assert 0 <= heartbeat_age(beat) < 1
    subprocess.run(["sh", "-c", SHELL_WRITE.format(path=beat)], check=True)  # the host side writes the same
    assert 0 <= heartbeat_age(beat) < 2  # /proc/uptime has 1/100 s; the shell reader keeps whole seconds
    beat.write_text("not a number\n")
    assert heartbeat_age(beat) == float("inf")


def test_the_host_switch_neither_fires_on_a_forward_step_nor_misses_after_a_backward_one(tmp_path: Path) -> None:
    beat, dropin, log = tmp_path / "heartbeat", tmp_path / "trial.conf", tmp_path / "deadman.log"
    script = (render_deadman_script("llama-server", LIMIT_S).replace(HEARTBEAT_FILE, str(beat))
              .replace(str(dropin_path("llama-server")), str(dropin)).replace(DEADMAN_LOG, str(log)))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "systemctl.calls"}\n')
    (bin_dir / "systemctl").chmod(0o755)
    dropin.write_text("[Service]\n")
    write = SHELL_WRITE.format(path=beat)
    subprocess.run(["sh", "-c", write], check=True)
    switch = subprocess.Popen(["sh", "-c", script], env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
                              stdout=subprocess.PIPE, text=True)
    try:
        until = time.monotonic() + 2 * LIMIT_S + 2
        while time.monotonic() < until:  # a live controller, and a clock that jumped an hour ahead
            subprocess.run(["sh", "-c", write], check=True)
            step_file_clock(beat, HOUR)
            assert switch.poll() is None, "the switch fired while the controller was alive"
            time.sleep(0.5)
        assert dropin.exists()
        silent_from = time.monotonic()  # the controller dies, and the clock is set an hour back
        step_file_clock(beat, -HOUR)
        out, _ = switch.communicate(timeout=LIMIT_S + 10)
        waited = time.monotonic() - silent_from
    finally:
        switch.kill()
    assert switch.returncode == 0 and "trial removed" in out
    assert not dropin.exists() and "restart llama-server.service" in (tmp_path / "systemctl.calls").read_text()
    assert LIMIT_S - 1 <= waited <= LIMIT_S + 4, f"fired after {waited:.1f} s of silence (limit {LIMIT_S} s)"


def test_heartbeat_writers_at_the_same_moment_all_succeed_and_leave_no_temporary(tmp_path: Path) -> None:
    """The heartbeat thread and a command that beats first (the dead-man start before a trial) may write at the
    same moment: with one shared temporary name, 65 of 100 concurrent writers failed their mv (stop 24's CI)."""
    beat = tmp_path / "heartbeat"
    writers = [subprocess.Popen(["sh", "-c", SHELL_WRITE.format(path=beat)], stderr=subprocess.PIPE)
               for _ in range(50)]
    failed = [w.stderr.read() for w in writers if w.wait() != 0 and w.stderr is not None]
    assert failed == []
    assert [p.name for p in tmp_path.iterdir()] == ["heartbeat"] and float(beat.read_text()) > 0


def test_threads_of_one_process_beat_at_the_same_moment_without_failing(tmp_path: Path) -> None:
    """The heartbeat thread and a control command (applying a trial) beat at once; with a temporary file named by
    the process alone, one thread's rename found the other's file gone (a live run ended on FileNotFoundError)."""
    beat = tmp_path / "heartbeat"
    errors: list[BaseException] = []

    def beat_often() -> None:
        try:
            for _ in range(300):
                write_heartbeat(beat)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=beat_often) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and 0 <= heartbeat_age(beat) < 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heartbeat"], "no temporary file left behind"

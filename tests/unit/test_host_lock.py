"""One measuring run per host: while one run holds the host's lock, every command that measures is refused at
once, names the holder, and leaves nothing behind; the lock dies with its holder.

The holder here is a real second process holding :func:`tuner.host_lock.measuring_lock`; a real tune holding it
against a second tune and a fleet worker is in tests/tuning/test_tune_cli.py. The lock a live run over SSH takes
on its host is the same file (its shell runs here with sh).
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tuner.errors import UserError
from tuner.host_lock import LOCK_DIR_ENV, LOCK_NAME, lock_path, measuring_lock
from tuner.live.unit import LOCK_REFUSED_RC, remote_lock_script

HOLDER = ("import sys, time\nfrom tuner.host_lock import measuring_lock\n"
          "with measuring_lock('llamahost tune'):\n    print('held', flush=True)\n    time.sleep(600)\n")


@pytest.fixture
def lock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "locks"
    monkeypatch.setenv(LOCK_DIR_ENV, str(directory))
    return directory


@pytest.fixture
def holder(lock_dir: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding this host's lock as a tune would."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, LOCK_DIR_ENV: str(lock_dir)})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_run_is_refused_within_a_second_and_the_lock_dies_with_its_holder(
        holder: subprocess.Popen[str]) -> None:
    started = time.monotonic()
    with (pytest.raises(UserError, match="another llamahost run is already measuring on this host") as refused,
          measuring_lock("llamahost fleet work")):
        pytest.fail("the lock was taken twice")
    assert time.monotonic() - started < 1.0
    assert f"llamahost tune (pid {holder.pid} on " in str(refused.value)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with measuring_lock("llamahost fleet work"):  # no stale lock: the kernel dropped it with the process
        assert "llamahost fleet work (pid" in lock_path().read_text()


def test_the_lock_file_is_shared_by_every_user(lock_dir: Path) -> None:
    old = os.umask(0o077)  # a user who keeps new files private still leaves a lock the next user can open
    try:
        with measuring_lock("llamahost tune"):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE((lock_dir / LOCK_NAME).stat().st_mode) == 0o666


def test_without_a_setting_the_lock_is_in_the_system_lock_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LOCK_DIR_ENV, raising=False)
    system = next((d for d in (Path("/run/lock"), Path("/var/lock")) if os.access(d, os.W_OK | os.X_OK)), None)
    if system is None:
        pytest.skip("no writable system lock directory on this machine")
    assert lock_path() == system / LOCK_NAME


def run_cli(*args: str, home: Path, lock_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LLAMAHOST_HOME": str(home), LOCK_DIR_ENV: str(lock_dir)}
    return subprocess.run([sys.executable, "-m", "tuner.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120, check=False)


@pytest.mark.parametrize("command", [
    ["tune", "--budget", "1m"],
    ["fleet", "work", "--storage", "sqlite:///{home}/fleet.db", "--trials", "1"],
    ["fleet", "finish", "--storage", "sqlite:///{home}/fleet.db"],
    ["tune", "--live", "--local", "--port", "18999", "--budget", "1m"],
], ids=["tune", "fleet work", "fleet finish", "tune --live --local"])
def test_every_measuring_command_is_refused_while_another_run_measures(
        holder: subprocess.Popen[str], lock_dir: Path, tmp_path: Path, model_path: Path, command: list[str]) -> None:
    home = tmp_path / "home"
    args = [part.replace("{home}", str(home)) for part in command]
    done = run_cli(*args, "--model", str(model_path), home=home, lock_dir=lock_dir)
    assert done.returncode == 2, done.stderr
    assert "another llamahost run is already measuring on this host" in done.stderr
    assert f"llamahost tune (pid {holder.pid}" in done.stderr and "Traceback" not in done.stderr
    assert not (home / "fleet.db").exists() and not (home / "data" / "studies.db").exists(), "nothing measured"


def test_a_live_run_over_ssh_and_a_benchmark_run_refuse_each_other(lock_dir: Path,
                                                                     holder: subprocess.Popen[str]) -> None:
    """The shell a live run over SSH runs on the host takes the same lock: run here with sh, as on the host."""
    script = remote_lock_script("live tune over SSH (pid 1 on controller)", str(lock_path()))
    refused = subprocess.run(["sh", "-c", script], check=False, capture_output=True, text=True, timeout=10)
    assert refused.returncode == LOCK_REFUSED_RC
    assert refused.stdout.startswith("busy\n") and f"llamahost tune (pid {holder.pid} on " in refused.stdout
    holder.kill()
    holder.wait()
    live = subprocess.Popen(["sh", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout is not None and live.stdout.readline().strip() == "locked"
        with (pytest.raises(UserError, match="already measuring on this host: live tune over SSH") as refusal,
              measuring_lock("llamahost tune")):
            pytest.fail("a benchmark tune measured beside a live run")
        assert "pid 1 on controller" in str(refusal.value)
    finally:
        assert live.stdin is not None
        live.stdin.close()  # the tuner's end of the SSH session closes: the lock goes with it
        assert live.wait(timeout=10) == 0
    with measuring_lock("llamahost tune"):
        assert "llamahost tune (pid" in lock_path().read_text()

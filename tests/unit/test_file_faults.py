"""A full disk, undecodable files and a corrupt study store: one message with exit 2, no traceback, and the
files as they were.

The full disk is a real one: a small tmpfs mounted for the test (root only; skipped elsewhere with the reason), under
a vars file or under a SQLite study store in use.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from result_support import DEPLOYS_MEASURED_SERVER, MODEL_SHA, proven_result, write_result_file
from sqlalchemy import event
from sqlalchemy.engine import Engine

from tuner.errors import UserError
from tuner.study import open_storage

DEPLOYED = f'llama_server_model_sha256: "{MODEL_SHA}"\nllama_server_threads: 32\n{DEPLOYS_MEASURED_SERVER}'


def llamahost(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tuner.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LLAMAHOST_HOME": str(home)}, check=False)


def assert_refused(done: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert fragment in done.stderr and "Traceback" not in done.stderr, done.stderr


@contextlib.contextmanager
def small_tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` at ``mount`` (root only: skipped elsewhere, with the reason)."""
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(mount: Path) -> None:
    """Write ``mount``'s last free byte."""
    with (mount / "filler").open("wb", buffering=0) as filler, contextlib.suppress(OSError):
        while True:
            filler.write(b"\0" * 4096)


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A tiny tmpfs holding a deployed vars file, then filled to the last byte."""
    with small_tmpfs(tmp_path / "full", "64k") as mount:
        (mount / "h1.yml").write_text(DEPLOYED)
        fill(mount)
        yield mount


def test_a_full_disk_keeps_the_vars_file_and_says_so(full_disk: Path, tmp_path: Path) -> None:
    vars_file = full_disk / "h1.yml"
    result = write_result_file(tmp_path / "r.yaml", proven_result())
    done = llamahost("write-back", str(result), "--vars", str(vars_file), home=tmp_path / "home")
    assert_refused(done, f"cannot write {vars_file}: No space left on device")
    assert "h1.yml is unchanged" in done.stderr
    assert vars_file.read_text() == DEPLOYED
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler", "h1.yml"], "no temporary file is left"


def test_a_vars_file_that_is_not_utf8_is_refused_untouched(tmp_path: Path) -> None:
    vars_file = tmp_path / "h1.yml"
    vars_file.write_bytes(DEPLOYED.encode() + b"# caf\xe9 in latin-1\n")
    before = vars_file.read_bytes()
    result = write_result_file(tmp_path / "r.yaml", proven_result())
    done = llamahost("write-back", str(result), "--vars", str(vars_file), home=tmp_path / "home")
    assert_refused(done, "vars file is not UTF-8 text (byte 0xe9 at offset")
    assert vars_file.read_bytes() == before and not list(tmp_path.glob("h1.yml.*"))


def test_a_result_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    vars_file = tmp_path / "h1.yml"
    vars_file.write_text(DEPLOYED)
    result = tmp_path / "r.yaml"
    result.write_bytes(b"verdict: \xff\xfe\n")
    done = llamahost("write-back", str(result), "--vars", str(vars_file), home=tmp_path / "home")
    assert_refused(done, "result file is not UTF-8 text (byte 0xff at offset 9)")
    assert vars_file.read_text() == DEPLOYED


def test_role_variables_that_are_not_utf8_are_refused(tmp_path: Path) -> None:
    baseline = tmp_path / "baseline.yml"
    baseline.write_bytes(b"llama_server_threads: 4 # \x80\n")
    done = llamahost("tune", "--live", "--local", "--baseline-vars", str(baseline), "--budget", "1m",
                     home=tmp_path / "home")
    assert_refused(done, "role variables file is not UTF-8 text (byte 0x80 at offset 26)")


@pytest.mark.parametrize("command", [["show"], ["tune", "--budget", "1m"]], ids=["show", "tune"])
def test_a_corrupt_study_store_is_named_corrupt_and_left_as_it_was(tmp_path: Path, command: list[str]) -> None:
    store = tmp_path / "studies.db"
    garbage = bytes(range(256)) * 64
    store.write_bytes(garbage)
    done = llamahost(*command, "--storage", f"sqlite:///{store}", home=tmp_path / "home")
    assert_refused(done, f"{store} is corrupt, not a readable SQLite database")
    assert f"mv {store} {store}.corrupt" in done.stderr
    assert store.read_bytes() == garbage and not list(tmp_path.glob("studies.db?*")), "no journal, no rewrite"


def test_a_full_disk_under_the_sqlite_store_ends_the_run_at_once_with_one_message(tmp_path: Path) -> None:
    """Not an outage to wait out for a quarter of an hour: the first write that finds the disk full ends the run
    with the fix, and every trial recorded before is there once space is freed."""
    with small_tmpfs(tmp_path / "store", "2m") as mount:
        url = f"sqlite:///{mount / 'studies.db'}"
        storage = open_storage(url)
        study = optuna.create_study(study_name="night", storage=storage)
        for value in (1.0, 2.0):
            study.tell(study.ask(), value)
        fill(mount)
        started = time.monotonic()
        with pytest.raises(UserError) as full:
            for _ in range(64):  # the pages SQLite had free are used up within a few writes
                study.ask().set_user_attr("samples", "x" * 65536)
        assert time.monotonic() - started < 10, "waited as for an outage"
        assert "the study store cannot be written" in full.value.problem
        assert "disk is full" in full.value.problem or "disk i/o error" in full.value.problem.lower()
        assert "free space on the disk that holds the study store" in full.value.fix
        storage.engine.dispose()
        (mount / "filler").unlink()
        reopened = open_storage(url)
        kept = optuna.load_study(study_name="night", storage=reopened)
        assert sorted(t.values[0] for t in kept.trials if t.state == TrialState.COMPLETE) == [1.0, 2.0]
        reopened.engine.dispose()


def test_a_store_another_program_creates_at_the_same_moment_is_opened_not_refused(tmp_path: Path) -> None:
    """optuna-dashboard (or any RDBStorage) records the new store's schema version between llamahost's read of it
    and its own insert: the insert fails on the unique key (the clean CI saw "UNIQUE constraint failed:
    alembic_version.version_num" end a live run), and llamahost opens the completed store instead."""
    db = tmp_path / "studies.db"
    raced: list[str] = []

    def another_program_first(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if not raced and statement.lstrip().upper().startswith("INSERT INTO ALEMBIC_VERSION"):
            raced.append(statement)
            with contextlib.closing(sqlite3.connect(db)) as other:
                other.execute(statement, parameters)
                other.commit()

    event.listen(Engine, "before_cursor_execute", another_program_first)
    try:
        storage = open_storage(f"sqlite:///{db}")
    finally:
        event.remove(Engine, "before_cursor_execute", another_program_first)
    assert raced, "the race happened"
    study = optuna.create_study(storage=storage, study_name="night")
    study.enqueue_trial({})
    assert [t.state for t in study.trials] == [TrialState.WAITING]

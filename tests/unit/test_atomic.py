"""Atomic writes: readers see the old or the new file, never half of one, and the old one is kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuner.atomic import previous_path, write_atomic


def test_write_replaces_and_keeps_previous(tmp_path: Path) -> None:
    target = tmp_path / "result.yaml"
    write_atomic(target, "one\n")
    assert target.read_text() == "one\n"
    assert not previous_path(target).exists()
    write_atomic(target, "two\n")
    assert target.read_text() == "two\n"
    assert previous_path(target).read_text() == "one\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.yaml", "result.yaml.prev"]


def test_mode_of_an_existing_file_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "host_vars.yml"
    write_atomic(target, "a: 1\n", mode=0o600)
    write_atomic(target, "a: 2\n")
    assert target.stat().st_mode & 0o777 == 0o600


def test_failure_mid_write_leaves_the_original_and_no_temp_file(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "result.yaml"
    write_atomic(target, "original\n")

    def broken_fsync(fd: int) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr("os.fsync", broken_fsync)
    with pytest.raises(OSError, match="disk on fire"):
        write_atomic(target, "new\n")
    assert target.read_text() == "original\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.yaml"]

"""Atomic file replacement that keeps the previous version.

Every file llamahost writes for a user (results, host_vars, reports) goes through :func:`write_atomic`:
the new content is written to a temporary file in the same directory, fsynced, and renamed over the
target, so a reader sees either the old or the new file, never half of one. The old file survives as
``<name>.prev`` so a bad write-back can be undone by hand.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from tuner.errors import UserError

PREVIOUS_SUFFIX = ".prev"
# A full disk or quota, a read-only file system, no permission: the user can fix these, and the old file stands.
_USER_FIXABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def previous_path(path: Path) -> Path:
    """Where the version replaced by the last :func:`write_atomic` is kept."""
    return path.with_name(path.name + PREVIOUS_SUFFIX)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files of writers that were killed (SIGKILL cannot be cleaned up after) are removed by the
    next writer; a temporary file of a live writer is left alone."""
    for candidate in path.parent.glob(f".{path.name}.*.tmp"):
        parts = candidate.name[len(path.name) + 2:].split(".")
        if parts and parts[0].isdigit() and not _pid_alive(int(parts[0])):
            candidate.unlink(missing_ok=True)


def write_atomic(path: Path, content: str | bytes, *, keep_previous: bool = True, mode: int = 0o644) -> None:
    """Replace ``path`` with ``content`` atomically; keep the old file as ``<name>.prev``.

    The previous version is preserved with a hard link taken before the rename, so at every instant
    either ``path`` holds the old or the new content in full.
    """
    with atomic_writer(path, keep_previous=keep_previous, mode=mode) as handle:
        handle.write(content.encode() if isinstance(content, str) else content)


@contextlib.contextmanager
def atomic_writer(path: Path, *, keep_previous: bool = True, mode: int = 0o644) -> Iterator[BinaryIO]:
    """:func:`write_atomic` for content too large to hold in memory (a model file): write it to the handle
    this yields; ``path`` is replaced when the block ends without an exception, and left as it was otherwise."""
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=directory)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if path.exists():
            with contextlib.suppress(FileNotFoundError):
                mode = path.stat().st_mode & 0o7777
            if keep_previous:
                link_tmp = directory / f".{path.name}.{os.getpid()}.prev.tmp"
                link_tmp.unlink(missing_ok=True)
                os.link(path, link_tmp)
                os.replace(link_tmp, previous_path(path))
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        _fsync_directory(directory)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in _USER_FIXABLE:
            raise UserError(f"cannot write {path}: {exc.strerror}",
                            f"free space on (or write access to) {directory}; {path.name} is unchanged"
                            ) from None
        raise

"""One measuring run per host: a second tune, fleet worker or live run on the same machine is refused at once.

Two runs that measure on one host measure each other's load: both searches are skewed, and a baseline taken
while the other run is busy makes a winner look better than it is. So every command that measures holds one
lock per host for as long as it runs: ``flock`` on a file in ``/run/lock`` (shared by every user and by any
``LLAMAHOST_HOME``), taken without waiting. The kernel drops it when the holder exits, however it exits, so no
stale lock outlives a killed run. The file says who holds it, for the refusal message.

``LLAMAHOST_LOCK_DIR`` moves the lock; tests use it to run two workers as two "hosts" on one machine.
A live run on a systemd unit (over SSH, or on the host) takes the same file there, from a shell
(``tuner.live.unit``), and writes its holder into it the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tuner.errors import UserError

LOCK_DIR_ENV = "LLAMAHOST_LOCK_DIR"
LOCK_NAME = "llamahost-measure.lock"
SYSTEM_LOCK_DIRS = (Path("/run/lock"), Path("/var/lock"))


def lock_path() -> Path:
    """``$LLAMAHOST_LOCK_DIR``, else the first writable system lock directory, else the temp directory."""
    configured = os.environ.get(LOCK_DIR_ENV, "")
    if configured:
        directory = Path(configured)
        directory.mkdir(parents=True, exist_ok=True)
        return directory / LOCK_NAME
    for directory in SYSTEM_LOCK_DIRS:
        if directory.is_dir() and os.access(directory, os.W_OK | os.X_OK):
            return directory / LOCK_NAME
    return Path(tempfile.gettempdir()) / LOCK_NAME


def _open_shared(path: Path) -> tuple[int, bool]:
    """Open the lock file, creating it readable and writable by all; return (fd, whether it is writable).

    An existing file is opened without ``O_CREAT``: in a sticky, world-writable directory the kernel
    (``fs.protected_regular``) refuses ``O_CREAT`` on another user's file, even to root."""
    while True:
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC), True
        except PermissionError:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC), False  # flock works on a read-only descriptor
        except FileNotFoundError:
            pass
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue  # another run created it between the two opens
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o666)  # past the umask: the next run may be another user
        return fd, True


def _holder(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip() or "holder unknown"
    except OSError:
        return "holder unknown"


@contextlib.contextmanager
def measuring_lock(what: str) -> Iterator[None]:
    """Hold the host's measuring lock while the block runs, or raise :class:`UserError` at once naming the holder.

    ``what`` says which run holds it (``tune``, ``fleet work``, ...), for the next run's refusal."""
    path = lock_path()
    try:
        fd, writable = _open_shared(path)
    except OSError as exc:
        raise UserError(f"cannot open the host's measuring lock {path}: {exc.strerror}",
                        f"make {path.parent} writable, or set {LOCK_DIR_ENV} to a directory every llamahost user "
                        "on this host can write") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another llamahost run is already measuring on this host: {_holder(fd)}",
                            "two runs on one host measure each other's load; wait for it to finish, or stop it "
                            "(Ctrl-C / kill), then run again") from None
        if writable:
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            note = f"{what} (pid {os.getpid()} on {socket.gethostname()}, since {since})\n".encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, note, 0)
        yield
    finally:
        os.close(fd)  # the kernel drops the lock with the last descriptor

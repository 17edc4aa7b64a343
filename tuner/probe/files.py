"""Read-only access to a host's /sys and /proc, rooted anywhere.

Every parser in :mod:`tuner.probe` reads through a :class:`HostFiles`, never through ``open`` directly,
for two reasons:

* tests point it at a recorded or generated tree under ``tests/fixtures/hosts/<name>/`` instead of ``/``;
* :class:`RecordingHostFiles` notes every path a probe touches, so recording a new fixture copies exactly
  the files the parsers read (``tests/fixtures/hosts/generate.py record``), no more, no less.

Containers and VMs hide many of these files, and sysfs answers some reads with EINVAL or ENODEV. A file
that cannot be read is reported as ``None`` (or an empty listing): absence is a fact about the host, not a
crash.
"""

from __future__ import annotations

from pathlib import Path

from tuner.config import parse_cpu_list
from tuner.errors import UserError


def tolerant_cpu_list(text: str | None) -> tuple[int, ...] | None:
    """A kernel CPU list (``0-3,8``) read from the host: ``None`` when absent or malformed, never an error."""
    if text is None:
        return None
    try:
        return parse_cpu_list(text)
    except UserError:
        return None


class HostFiles:
    """The files of one host as seen from ``root`` (``/`` for the machine this runs on)."""

    def __init__(self, root: Path | str = "/") -> None:
        self.root = Path(root)

    @property
    def is_live(self) -> bool:
        """Whether this is the running machine (so measuring and process state apply to it)."""
        return self.root.resolve() == Path("/")

    def path(self, host_path: str) -> Path:
        """``/sys/devices/...`` on the host -> the same file under :attr:`root`."""
        return self.root / host_path.lstrip("/")

    def text(self, host_path: str) -> str | None:
        """The file's content without surrounding whitespace, or ``None`` if it cannot be read."""
        try:
            return self.path(host_path).read_text(encoding="utf-8", errors="strict").strip()
        except (OSError, UnicodeDecodeError):
            return None

    def integer(self, host_path: str) -> int | None:
        """The file as one integer, or ``None`` if missing or not a number."""
        raw = self.text(host_path)
        if raw is None:
            return None
        try:
            return int(raw.split()[0]) if raw else None
        except ValueError:
            return None

    def cpu_list(self, host_path: str) -> tuple[int, ...] | None:
        """A kernel CPU/node list file (``0-3,8``), or ``None`` if missing or malformed."""
        return tolerant_cpu_list(self.text(host_path))

    def listdir(self, host_path: str) -> tuple[str, ...]:
        """Sorted entry names of a directory; empty when it is missing."""
        try:
            return tuple(sorted(entry.name for entry in self.path(host_path).iterdir()))
        except OSError:
            return ()


class RecordingHostFiles(HostFiles):
    """A :class:`HostFiles` that remembers which files were read and which exist.

    Used to record a fixture: run the parsers once against ``/`` through this class, then copy
    :attr:`files_read` into the fixture tree.
    """

    def __init__(self, root: Path | str = "/") -> None:
        super().__init__(root)
        self.files_read: set[str] = set()

    def text(self, host_path: str) -> str | None:
        content = super().text(host_path)
        if content is not None:
            self.files_read.add("/" + host_path.lstrip("/"))
        return content

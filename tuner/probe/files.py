"""A :class:`tuner.host_sysfs.HostFiles` that records what the probe reads, to make a host fixture.

Every parser of a host's /sys and /proc reads through a ``HostFiles``, never through ``open`` directly, so
tests can point it at a recorded or generated tree under ``tests/fixtures/hosts/<name>/`` instead of ``/``,
and :class:`RecordingHostFiles` can note every path a probe touches: recording a new fixture copies exactly
the files the parsers read (``tests/fixtures/hosts/generate.py record``), no more, no less. Recording is the
tuner's alone; the collection's ``host_topology`` only reads.
"""

from __future__ import annotations

from pathlib import Path

from tuner.host_sysfs import HostFiles


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

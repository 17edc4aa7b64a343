"""File operations shared by the modules that place model files on a host (model_fetch, model_versions).

It runs on the managed host (Ansible ships module_utils with a module), so it keeps to the standard library and
to Python 3.8 syntax at run time.
"""

from __future__ import annotations

import hashlib
import os

CHUNK = 4 * 1024 * 1024


def sha256_of(path, digest=None, limit=None):
    """The sha256 of ``path`` (its first ``limit`` bytes), continuing ``digest`` when given."""
    digest = digest or hashlib.sha256()
    left = limit
    with open(path, "rb") as handle:
        while left is None or left > 0:
            block = handle.read(CHUNK if left is None else min(CHUNK, left))
            if not block:
                break
            digest.update(block)
            if left is not None:
                left -= len(block)
    return digest


def fsync_directory(directory):
    """Flush ``directory``'s entries to disk: a rename, a link or an unlink in it is only durable then (after a
    power cut, the unit could otherwise name a model whose directory entry was never written)."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)

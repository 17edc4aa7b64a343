"""SHA-256 of model files, remembered across runs.

Result files and fleet study names carry the model's sha256 so results from different files are never
compared. Hashing a 200 GB model takes minutes, so the digest is cached per file identity in the cache
directory: path, size, modification time, inode and change time. The change time cannot be set back by hand
(``touch -d`` sets the modification time and moves the change time to now), so a file rewritten in place
with its old size and modification time still gets a new digest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from tuner.atomic import write_atomic
from tuner.paths import cache_dir

CHUNK = 8 * 1024 * 1024


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


FileIdentity = tuple[int, int, int, int, int]  # device, inode, size, mtime_ns, ctime_ns


def file_identity(path: Path) -> FileIdentity:
    """What changes whenever the file's bytes may have: replaced (inode), rewritten (size, times)."""
    stat = path.stat()
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def _cache_file() -> Path:
    return cache_dir() / "sha256.json"


def cached_sha256(path: Path) -> str:
    """sha256 of ``path`` (all shards joined by '+' for a split model is the caller's business)."""
    path = path.resolve()
    key = f"{path}:" + ":".join(map(str, file_identity(path)))
    cache = _cache_file()
    known: dict[str, str] = {}
    if cache.exists():
        try:
            loaded = json.loads(cache.read_text())
            if isinstance(loaded, dict):
                known = {str(k): str(v) for k, v in loaded.items()}
        except (OSError, ValueError):
            known = {}  # a damaged cache only costs a re-hash
    if key in known:
        return known[key]
    value = sha256_of(path)
    known[key] = value
    write_atomic(cache, json.dumps(known, indent=1, sort_keys=True), keep_previous=False)
    return value


def model_sha256(files: tuple[Path, ...]) -> str:
    """One digest for a model: the file's own, or for a split model the digest of its shards' digests."""
    return combined_sha256([cached_sha256(p) for p in files])


def combined_sha256(digests: Sequence[str]) -> str:
    """A model's identity from its files' sha256 digests in shard order: the one digest itself, or the sha256
    of the digests joined by newlines. The llama_server role pins a split model the same way (a list in
    ``llama_server_model_sha256``), so both sides name a model with one string."""
    lowered = [d.strip().lower() for d in digests]
    if len(lowered) == 1:
        return lowered[0]
    return hashlib.sha256("\n".join(lowered).encode()).hexdigest()

"""Measured bandwidth, remembered per host fingerprint: every measurement, and the best sustained one.

Measuring takes seconds and loads every core, so a host is measured once and the result is reused for every
later probe of a host with the same fingerprint (same CPU model, ISA, topology and memory size). A shared
machine's bandwidth swings from minute to minute: on the 2-vCPU development VM one probe read 28.6 GB/s and two
others 51-57 GB/s on the same day. So the cache keeps every measurement (the last :data:`HISTORY_LIMIT`), and the
host's figure is the best sustained one among them (each measurement is already the median of its samples):
what this memory can deliver, not what it delivered in an unlucky minute. Every later measurement (``probe
--remeasure``, the one a tuning run takes next to its trials) adds to the history, so the figure only improves
and its spread is on record (``BandwidthResult.runs_gbps``).

A measurement taken while other processes competed for the CPUs (``BandwidthResult.contended``) is too low to
count: it is shown once, kept out of the figure, and the next probe measures again when no other is on record.
The cache lives in :func:`tuner.paths.cache_dir` because it can always be measured again; a damaged or foreign
file is ignored and replaced, never trusted. A version-1 file (one measurement) is read as a history of one.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from tuner import paths
from tuner.atomic import write_atomic
from tuner.probe.bandwidth import DEFAULT_SECONDS, METHOD, measure_bandwidth
from tuner.probe.host import BandwidthResult, HostProbe

SCHEMA = 2
HISTORY_LIMIT = 20


def cache_path(fingerprint: str, cache_dir: Path | None = None) -> Path:
    return (cache_dir or paths.cache_dir()) / f"bandwidth-{fingerprint}.json"


def load_history(path: Path, fingerprint: str) -> list[BandwidthResult]:
    """Every measurement on record for this host, oldest first; empty when absent, unreadable, from another
    host or measured by another method."""
    try:
        data = json.loads(path.read_text())
        if data.get("fingerprint") != fingerprint or data.get("schema") not in (1, SCHEMA):
            return []
        entries = [data["result"]] if data["schema"] == 1 else data["measurements"]
        history = [BandwidthResult.from_dict(entry) for entry in entries]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    return [result for result in history if result.method == METHOD and result.all_nodes_gbps > 0]


def best_sustained(history: Sequence[BandwidthResult]) -> BandwidthResult | None:
    """The uncontended measurement with the highest figure, carrying every uncontended figure in ``runs_gbps``;
    None when there is none."""
    trusted = [result for result in history if not result.contended]
    if not trusted:
        return None
    best = max(trusted, key=lambda result: result.all_nodes_gbps)
    return dataclasses.replace(best, runs_gbps=tuple(result.all_nodes_gbps for result in trusted))


def load_cached(path: Path, fingerprint: str) -> BandwidthResult | None:
    """The host's figure on record: the best sustained measurement, or the latest one when every measurement on
    record was contended (shown, not reused); None when nothing is on record."""
    history = load_history(path, fingerprint)
    return best_sustained(history) or (history[-1] if history else None)


def record(path: Path, fingerprint: str, result: BandwidthResult) -> list[BandwidthResult]:
    """Add ``result`` to the host's history (atomically; the oldest beyond HISTORY_LIMIT drop out)."""
    history = [*load_history(path, fingerprint), dataclasses.replace(result, runs_gbps=())][-HISTORY_LIMIT:]
    content = {"schema": SCHEMA, "fingerprint": fingerprint, "measurements": [asdict(entry) for entry in history]}
    write_atomic(path, json.dumps(content, indent=1, sort_keys=True) + "\n", keep_previous=False)
    return history


def measure_and_record(probe: HostProbe, *, seconds: float = DEFAULT_SECONDS,
                       cache_dir: Path | None = None) -> tuple[BandwidthResult, BandwidthResult]:
    """Measure the host ``probe`` describes (the machine this runs on) now and add it to the history: this
    measurement, and the host's figure with it counted (the fresh one again when every one was contended)."""
    fingerprint = probe.fingerprint()
    fresh = measure_bandwidth(probe.topology, seconds=seconds, available_bytes=probe.memory_available_bytes)
    history = record(cache_path(fingerprint, cache_dir), fingerprint, fresh)
    return fresh, best_sustained(history) or fresh


def cached_or_measured_bandwidth(
    probe: HostProbe,
    *,
    seconds: float = DEFAULT_SECONDS,
    remeasure: bool = False,
    cache_dir: Path | None = None,
) -> BandwidthResult:
    """The host's bandwidth figure (the best sustained measurement on record), measuring first when nothing
    trustworthy is on record or ``remeasure`` asks for one more measurement."""
    if not remeasure:
        fingerprint = probe.fingerprint()
        cached = best_sustained(load_history(cache_path(fingerprint, cache_dir), fingerprint))
        if cached is not None:
            return cached
    return measure_and_record(probe, seconds=seconds, cache_dir=cache_dir)[1]

"""Measured bandwidth, remembered per host fingerprint.

Measuring takes seconds and loads every core, so a host is measured once and the result is reused for
every later probe of a host with the same fingerprint (same CPU model, ISA, topology and memory size).
A result measured while other processes competed for the CPUs (see ``BandwidthResult.contended``) is
too low to serve as a roofline, so it is shown but not reused: the next probe measures again.
The cache lives in :func:`tuner.paths.cache_dir` because it can always be measured again; a damaged or
foreign file is ignored and replaced, never trusted.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from tuner import paths
from tuner.atomic import write_atomic
from tuner.probe.bandwidth import DEFAULT_SECONDS, METHOD, measure_bandwidth
from tuner.probe.host import BandwidthResult, HostProbe

SCHEMA = 1


def cache_path(fingerprint: str, cache_dir: Path | None = None) -> Path:
    return (cache_dir or paths.cache_dir()) / f"bandwidth-{fingerprint}.json"


def load_cached(path: Path, fingerprint: str) -> BandwidthResult | None:
    """The cached result, or ``None`` when absent, unreadable, from another host or another method."""
    try:
        data = json.loads(path.read_text())
        if data.get("schema") != SCHEMA or data.get("fingerprint") != fingerprint:
            return None
        result = BandwidthResult.from_dict(data["result"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return result if result.method == METHOD and result.all_nodes_gbps > 0 else None


def load_trusted(path: Path, fingerprint: str) -> BandwidthResult | None:
    """A cached result worth reusing: not one taken while other processes competed for the CPUs."""
    result = load_cached(path, fingerprint)
    return None if result is None or result.contended else result


def save_cached(path: Path, fingerprint: str, result: BandwidthResult) -> None:
    content = {"schema": SCHEMA, "fingerprint": fingerprint, "result": asdict(result)}
    write_atomic(path, json.dumps(content, indent=1, sort_keys=True) + "\n", keep_previous=False)


def cached_or_measured_bandwidth(
    probe: HostProbe,
    *,
    seconds: float = DEFAULT_SECONDS,
    remeasure: bool = False,
    cache_dir: Path | None = None,
) -> BandwidthResult:
    """The bandwidth of the host ``probe`` describes (the machine this runs on): cached or measured now."""
    fingerprint = probe.fingerprint()
    path = cache_path(fingerprint, cache_dir)
    if not remeasure:
        cached = load_trusted(path, fingerprint)
        if cached is not None:
            return cached
    result = measure_bandwidth(probe.topology, seconds=seconds, available_bytes=probe.memory_available_bytes)
    save_cached(path, fingerprint, result)
    return result

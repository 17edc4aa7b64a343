"""How close token generation is to the memory-bandwidth limit of the host, and which limit binds.

Generating one token reads every active weight once, plus the KV cache of the context so far, so
``tg tok/s <= bandwidth / bytes read per token``. The bandwidth is measured on the same host, not taken from a
datasheet, so the fraction says how much of what this memory can really deliver llama.cpp gets:

* **The best sustained figure.** A shared machine's bandwidth swings from minute to minute (on the 2-vCPU
  development VM one probe read 28.6 GB/s and two others 51-57 GB/s on the same day). What the memory can deliver
  is the best of the probe's measurements (each the median of its samples), kept per host with their spread
  (:mod:`tuner.probe.bandwidth_cache`).
* **Never below what llama.cpp read.** When llama.cpp itself read faster than any probe did, the probe
  underestimates; llama.cpp's own read rate is then the denominator, and the result says so.
* **Measured next to the trials.** The fraction against the best figure says how much headroom the memory has;
  which limit binds in the minute the trials ran is judged against the bandwidth measured right after them.
  A host at 100% of a depressed minute's bandwidth is memory bound, whatever its best figure says.
* **Compute is measured too.** When llama.cpp reads well below what memory delivers, the trials' thread counts
  tell compute from per-token overhead: if the last threads added still raised tg by at least half their
  proportional share, more (or faster) cores would help, and compute binds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tuner.model.gguf_file import ModelInfo

BANDWIDTH_BOUND_SHARE = 0.85  # llama.cpp reads at least this share of what memory delivered next to the trials
SCALING_STILL_PAYS = 0.5  # the last threads added raised tg by at least this share of linear scaling
MEMORY = "memory bandwidth"
COMPUTE = "compute"
OVERHEAD = "per-token overhead"
COMPUTE_OR_OVERHEAD = "compute or per-token overhead"

# Bytes per KV cache element for llama.cpp's cache types (block size / bytes per block for quantized ones).
CACHE_TYPE_BYTES = {
    "f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
    "q5_0": 22 / 32, "q5_1": 24 / 32, "iq4_nl": 18 / 32,
}


@dataclass(frozen=True)
class Limit:
    """Which limit binds token generation, and the measurements that say so."""

    binds: str  # MEMORY, COMPUTE, OVERHEAD or COMPUTE_OR_OVERHEAD
    reason: str


@dataclass(frozen=True)
class ThreadScaling:
    """How tg changed between the two largest thread counts the trials measured (best trial of each)."""

    fewer: int
    most: int
    tg_fewer: float
    tg_most: float

    @property
    def gain(self) -> float:
        return self.tg_most / self.tg_fewer - 1.0

    @property
    def efficiency(self) -> float:
        """The gain as a share of linear scaling: 1.0 when tg grew as fast as the thread count."""
        return self.gain / (self.most / self.fewer - 1.0)


def thread_scaling(tg_by_threads: Mapping[int, float]) -> ThreadScaling | None:
    """The step between the two largest thread counts with a measured tg, or None with fewer than two."""
    counts = sorted(count for count, tg in tg_by_threads.items() if tg > 0)
    if len(counts) < 2:
        return None
    fewer, most = counts[-2], counts[-1]
    return ThreadScaling(fewer, most, tg_by_threads[fewer], tg_by_threads[most])


def binding_limit(read_gbps: float, bandwidth_now_gbps: float, scaling: ThreadScaling | None) -> Limit:
    """Memory when llama.cpp reads at least BANDWIDTH_BOUND_SHARE of what memory delivered in the same minute;
    otherwise compute when more threads still paid, per-token overhead when they did not."""
    share = read_gbps / bandwidth_now_gbps
    reads = f"llama.cpp read {read_gbps:.1f} GB/s, {share:.0%} of the {bandwidth_now_gbps:.1f} GB/s memory delivered"
    if share >= BANDWIDTH_BOUND_SHARE:
        return Limit(MEMORY, f"{reads}: faster memory, or fewer bytes per token (a smaller quantization), is what "
                             "raises tg")
    if scaling is None:
        return Limit(COMPUTE_OR_OVERHEAD, f"{reads}; no two thread counts were measured to tell compute from "
                                          "per-token overhead")
    step = (f"{scaling.fewer} -> {scaling.most} threads raised tg by {scaling.gain:.0%} "
            f"({scaling.efficiency:.0%} of linear)")
    if scaling.efficiency >= SCALING_STILL_PAYS:
        return Limit(COMPUTE, f"{reads}; {step}: more or faster cores would raise tg")
    return Limit(OVERHEAD, f"{reads}; {step}: per-token work other than reading weights (synchronisation, "
                           "a small model's fixed costs) binds")


@dataclass(frozen=True)
class Roofline:
    """tg against the bandwidth limit. ``bandwidth_gbps`` is the denominator: the probe's best sustained figure,
    the one measured next to the trials, or llama.cpp's own read rate, whichever is highest."""

    bandwidth_gbps: float
    weight_bytes_per_token: float
    kv_bytes_per_token: float
    max_tg_tps: float
    achieved_tg_tps: float
    probe_best_gbps: float
    probe_runs_gbps: tuple[float, ...]  # every uncontended probe measurement of this host, oldest first
    bandwidth_now_gbps: float | None  # measured right after the trials; None when it could not be
    bandwidth_source: str  # "probe" or "llama.cpp" (llama.cpp read faster than any probe)
    limit: Limit

    @property
    def bytes_per_token(self) -> float:
        return self.weight_bytes_per_token + self.kv_bytes_per_token

    @property
    def fraction(self) -> float:
        return self.achieved_tg_tps / self.max_tg_tps if self.max_tg_tps > 0 else 0.0

    @property
    def read_gbps(self) -> float:
        """What llama.cpp read: tg x bytes per token."""
        return self.achieved_tg_tps * self.bytes_per_token / 1e9

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["probe_runs_gbps"] = list(self.probe_runs_gbps)
        out["bytes_per_token"] = self.bytes_per_token
        out["fraction"] = self.fraction
        out["read_gbps"] = round(self.read_gbps, 3)
        if self.bandwidth_now_gbps:
            out["fraction_of_now"] = self.read_gbps / self.bandwidth_now_gbps
        return out


def bandwidth_phrase(roof: Mapping[str, Any]) -> str:
    """Where a result's roofline denominator came from, in words (older results lack the newer keys)."""
    if roof.get("bandwidth_source") == "llama.cpp":
        return (f"{roof['bandwidth_gbps']:.1f} GB/s as llama.cpp read it: faster than any probe "
                f"({roof['probe_best_gbps']:.1f} GB/s best), so the probe underestimates this memory")
    runs = roof.get("probe_runs_gbps") or [roof["bandwidth_gbps"]]
    spread = f", {min(runs):.1f}-{max(runs):.1f}" if len(runs) > 1 else ""
    now = roof.get("bandwidth_now_gbps")
    beside = f"; {now:.1f} GB/s next to the trials" if now else ""
    return f"{roof['bandwidth_gbps']:.1f} GB/s, best of {len(runs)} probe measurement(s){spread}{beside}"


def mean_context_depth(pp_tokens: int, tg_tokens: int) -> float:
    """tg is measured after a prompt of ``pp_tokens``; token i of the generation sees pp_tokens + i."""
    return pp_tokens + (tg_tokens - 1) / 2.0


def roofline(bandwidth_gbps: float, model: ModelInfo, achieved_tg_tps: float, *, depth: float,
             cache_type_k: str = "f16", cache_type_v: str = "f16", probe_runs_gbps: Sequence[float] = (),
             bandwidth_now_gbps: float | None = None, tg_by_threads: Mapping[int, float] | None = None) -> Roofline:
    """``bandwidth_gbps`` is the probe's best sustained figure for this host; ``bandwidth_now_gbps`` the one
    measured next to the trials, ``tg_by_threads`` the best measured tg per thread count (for the limit)."""
    if bandwidth_gbps <= 0:
        raise ValueError("bandwidth must be positive")
    kv = model.kv_bytes_per_token(CACHE_TYPE_BYTES[cache_type_k], CACHE_TYPE_BYTES[cache_type_v]) * depth
    total = model.bytes_per_token + kv
    read = achieved_tg_tps * total / 1e9
    probed = max(bandwidth_gbps, bandwidth_now_gbps or 0.0)
    denominator = max(probed, read)
    return Roofline(
        bandwidth_gbps=denominator,
        weight_bytes_per_token=float(model.bytes_per_token),
        kv_bytes_per_token=kv,
        max_tg_tps=denominator * 1e9 / total,
        achieved_tg_tps=achieved_tg_tps,
        probe_best_gbps=bandwidth_gbps,
        probe_runs_gbps=tuple(probe_runs_gbps) or (bandwidth_gbps,),
        bandwidth_now_gbps=bandwidth_now_gbps,
        bandwidth_source="llama.cpp" if read > probed else "probe",
        limit=binding_limit(read, max(bandwidth_now_gbps or bandwidth_gbps, read),
                            thread_scaling(tg_by_threads or {})),
    )

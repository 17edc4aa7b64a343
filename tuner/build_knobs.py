"""Which build-dependent settings a llama-server build offers, read from the build itself.

Three settings move CPU throughput and exist only in some builds:

* **the OpenMP wait policy.** An OpenMP build (``OPENMP = 1`` in llama.cpp's ``system_info``) runs its
  threads in libgomp, which reads ``OMP_WAIT_POLICY`` from the environment: ACTIVE keeps idle threads
  spinning between operations, PASSIVE puts them to sleep. One public result: 39.9 tok/s with ACTIVE against
  33.0 with PASSIVE. A build with llama.cpp's own threadpool ignores the variable (it has ``--poll``).
* **weight repacking.** A build with repacked CPU kernels (``REPACK = 1``) rearranges quantized weights at load
  time for faster matrix kernels; ``--no-repack`` turns that off. It speeds prompt processing, moves
  generation either way, and can stretch the load a lot: worth a measurement, not a default.
* **strict placement.** ``--cpu-strict 1`` with a ``--cpu-mask`` pins each of llama.cpp's threads to its own
  CPU of the mask (read back on this machine from an OpenMP build: the compute threads each get one CPU), where
  the process's affinity alone lets them move within the set. Offered when the help has both flags; searched
  only for pinned configurations.

``--prio`` is not offered: the role's unit runs unprivileged without CAP_SYS_NICE, so a raised priority would be
measured by a trial started as root and then silently dropped by the server that serves.

All facts come from the binary that will run (its ``system_info`` line and its ``--help``), never from a list
kept here, so a build without a setting leaves it out of the search space instead of failing every trial.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

_FEATURE = re.compile(r"(\w+) = (\w+)")


def system_info_features(system_info: str) -> dict[str, str]:
    """``"CPU : AVX2 = 1 | OPENMP = 1 | REPACK = 1 |"`` -> ``{"AVX2": "1", "OPENMP": "1", "REPACK": "1"}``."""
    return dict(_FEATURE.findall(system_info))


@dataclass(frozen=True)
class BuildKnobs:
    """The build-dependent settings one llama-server build offers, each with the reason it does or not."""

    omp_wait_policy: bool = False
    repack: bool = False
    cpu_strict: bool = False
    omp_reason: str = "the build was not inspected"
    repack_reason: str = "the build was not inspected"
    cpu_strict_reason: str = "the build was not inspected"


def knobs_of(system_info: str, flag_names: Collection[str]) -> BuildKnobs:
    """What a build offers, from its ``system_info`` features and the flag names of its ``--help`` (no I/O)."""
    features = system_info_features(system_info)
    openmp = features.get("OPENMP") == "1"
    omp_reason = "an OpenMP build: libgomp reads OMP_WAIT_POLICY" if openmp else \
        "not an OpenMP build (no OPENMP = 1 in its system_info): OMP_WAIT_POLICY does nothing"
    has_flag = "--no-repack" in flag_names
    has_kernels = features.get("REPACK") == "1"
    if has_flag and has_kernels:
        repack_reason = "the build repacks weights (REPACK = 1) and has --no-repack"
    elif not has_flag:
        repack_reason = "the build's --help has no --no-repack"
    else:
        repack_reason = "the build has no repacked kernels (no REPACK = 1 in its system_info)"
    strict = "--cpu-strict" in flag_names and "--cpu-mask" in flag_names
    strict_reason = "the build has --cpu-strict and --cpu-mask (searched for pinned configurations)" if strict \
        else "the build's --help has no --cpu-strict or no --cpu-mask"
    return BuildKnobs(omp_wait_policy=openmp, repack=has_flag and has_kernels, cpu_strict=strict,
                      omp_reason=omp_reason, repack_reason=repack_reason, cpu_strict_reason=strict_reason)

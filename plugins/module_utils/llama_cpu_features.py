"""Which CPU features a llama.cpp build runs with, and which fast ones of the host it leaves unused.

llama.cpp prints a ``system_info`` line at start (at debug verbosity in llama-server): the features of the CPU
backend it runs with, compiled in or, in a ``GGML_BACKEND_DL`` build, the variant it loaded. The tuner names a
build by that line (``tuner.server.identity``), and the llama_server role's ``verify.yml`` reports it for the
build that serves, with the fast features the host has and the build does not use: a portable x86-64-v3 build
on a Sapphire Rapids or Genoa host runs without its AVX-512, VNNI and AMX kernels.

This file is the collection's module_utils and also the tuner's ``tuner.server.cpu_features`` (a link), so it
keeps to the standard library and to Python 3.8 syntax at run time.
"""

from __future__ import annotations

from collections.abc import Iterable

SYSTEM_INFO_MARK = "system_info:"

# A host CPU flag (/proc/cpuinfo "flags" on x86, "Features" on arm64) -> llama.cpp's name for the kernels that
# use it (ggml-cpu's feature list). Only the features that bring faster kernels on server CPUs are listed: a
# build without them still runs, slower, which is what the report is for.
FAST_FEATURES = (
    ("avx512f", "AVX512"),
    ("avx512vbmi", "AVX512_VBMI"),
    ("avx512_vnni", "AVX512_VNNI"),
    ("avx512_bf16", "AVX512_BF16"),
    ("amx_int8", "AMX_INT8"),
    ("avx_vnni", "AVX_VNNI"),
    ("asimddp", "DOTPROD"),
    ("i8mm", "MATMUL_INT8"),
    ("sve", "SVE"),
    ("sme", "SME"),
)


def parse_system_info(log: str) -> str:
    """The feature list of the first ``system_info`` line in ``log`` (its thread counts, which vary per run,
    removed): ``"CPU : SSE3 = 1 | AVX2 = 1 | ... | REPACK = 1 |"``; ``""`` when there is none."""
    for line in log.splitlines():
        _, mark, rest = line.partition(SYSTEM_INFO_MARK)
        if mark:
            _threads, bar, features = rest.partition("| ")
            return (features if bar else rest).strip()
    return ""


def enabled_features(system_info: str) -> list[str]:
    """The names set to 1 in a ``system_info`` feature list, in its order: ``["SSE3", "AVX2", ...]``."""
    names: list[str] = []
    for field in system_info.split("|"):
        name, equals, value = field.partition("=")
        name = name.rpartition(":")[2].strip()
        if equals and value.strip() == "1" and name:
            names.append(name)
    return names


def unused_fast_features(system_info: str, host_flags: Iterable[str]) -> list[str]:
    """llama.cpp's names of the fast features the host has and the build does not run with."""
    enabled = set(enabled_features(system_info))
    flags = set(host_flags)
    return [name for flag, name in FAST_FEATURES if flag in flags and name not in enabled]

"""What the CPU is and what it can do: vendor, model, the ISA extensions llama.cpp dispatches on, memory.

/proc/cpuinfo is the source. On x86 it names the model and lists ``flags``; on Arm it lists ``Features``
and identifies the core by ``CPU implementer``/``CPU part`` codes (MIDR fields), which are mapped to
names here for the parts llama.cpp hosts commonly run on. Only the ISA flags that change which ggml
kernels run are kept, so the host fingerprint does not move when a kernel update adds an unrelated flag.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tuner.host_sysfs import CpuinfoTopology, HostFiles, cpuinfo_topology, int_or_none, parse_cpuinfo_blocks

# Kernel flag names (as /proc/cpuinfo spells them) that select ggml CPU kernels.
X86_ISA = (
    "avx", "avx2", "fma", "f16c",
    "avx512f", "avx512bw", "avx512vl", "avx512vbmi", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
)
ARM_ISA = ("asimd", "asimddp", "asimdhp", "i8mm", "sve", "sve2", "bf16")

# MIDR implementer codes and (implementer, part) codes of common server cores, from the Arm and
# vendor technical reference manuals (the same table util-linux's lscpu carries).
ARM_IMPLEMENTERS = {0x41: "ARM", 0x48: "HiSilicon", 0x4E: "NVIDIA", 0x51: "Qualcomm", 0x61: "Apple",
                    0xC0: "Ampere"}
ARM_PARTS = {
    (0x41, 0xD0C): "Neoverse-N1",
    (0x41, 0xD40): "Neoverse-V1",
    (0x41, 0xD49): "Neoverse-N2",
    (0x41, 0xD4F): "Neoverse-V2",
    (0x41, 0xD8E): "Neoverse-N3",
    (0x41, 0xD84): "Neoverse-V3",
    (0x41, 0xD0B): "Cortex-A76",
    (0x41, 0xD0D): "Cortex-A77",
    (0x41, 0xD41): "Cortex-A78",
    (0x41, 0xD08): "Cortex-A72",
    (0x41, 0xD03): "Cortex-A53",
    (0x48, 0xD01): "Kunpeng-920",
    (0xC0, 0xAC3): "Ampere-1",
    (0xC0, 0xAC4): "Ampere-1a",
}


@dataclass(frozen=True)
class CpuIdentity:
    """Vendor, model, architecture family and the llama.cpp-relevant ISA flags of the host's CPUs."""

    architecture: str  # "x86_64", "aarch64" or "unknown"
    vendor: str
    model: str
    isa: tuple[str, ...]
    topology: Mapping[int, CpuinfoTopology]


def identify_cpu(blocks: list[dict[str, str]]) -> CpuIdentity:
    """Identify the CPU from parsed /proc/cpuinfo blocks (the first block names the model)."""
    topology = cpuinfo_topology(blocks)
    if not blocks:
        return CpuIdentity("unknown", "unknown", "unknown", (), topology)
    first = blocks[0]
    if "flags" in first:
        flags = set(first["flags"].split())
        isa = tuple(f for f in X86_ISA if f in flags)
        return CpuIdentity("x86_64", first.get("vendor_id", "unknown"), first.get("model name", "unknown"),
                           isa, topology)
    if "Features" in first:
        features = set(first["Features"].split())
        isa = tuple(f for f in ARM_ISA if f in features)
        implementer = int_or_none(first.get("CPU implementer"), 16)
        part = int_or_none(first.get("CPU part"), 16)
        vendor = ARM_IMPLEMENTERS.get(implementer or -1, f"implementer {first.get('CPU implementer', '?')}")
        model = first.get("model name") or ARM_PARTS.get(
            (implementer or -1, part or -1), f"part {first.get('CPU part', '?')}")
        return CpuIdentity("aarch64", vendor, model, isa, topology)
    return CpuIdentity("unknown", first.get("vendor_id", "unknown"), first.get("model name", "unknown"), (),
                       topology)


def read_cpu_identity(files: HostFiles) -> CpuIdentity:
    return identify_cpu(parse_cpuinfo_blocks(files.text("/proc/cpuinfo")))


def isa_warnings(identity: CpuIdentity) -> list[str]:
    """Hardware llama.cpp runs slowly or untested on: a warning, never an error."""
    isa = set(identity.isa)
    if identity.architecture == "x86_64" and "avx2" not in isa:
        return ["this x86 CPU lacks AVX2: llama.cpp falls back to slow generic kernels"]
    if identity.architecture == "aarch64" and "asimddp" not in isa:
        return ["this Arm CPU lacks the dot-product extension (asimddp): llama.cpp's quantized kernels "
                "run slowly"]
    if identity.architecture == "unknown":
        return ["CPU architecture not recognised from /proc/cpuinfo: no ISA flags reported"]
    return []

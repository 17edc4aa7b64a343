"""The few numbers the sizing engine cannot read from a model or the catalog, with where each comes from.

They are parameters, not constants buried in formulas, so a measurement can replace them: above all
``efficiency``, the fraction of theoretical socket bandwidth llama.cpp turns into token generation. The
default is the low end of what was measured on well-placed single sockets; the tuner measures the real
fraction of a host (tg tok/s x bytes per token / bandwidth) and ``llamahost size --efficiency`` takes it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from tuner.errors import UserError

GIB = 1024**3

# Measured tg reaches 60-68% of theoretical bandwidth on a well-placed single socket (EPYC 9R14,
# 8B BF16/Q8_0) and ~74% on two sockets after NUMA placement was fixed (llama.cpp#11744). The low end
# keeps predictions from promising what an untuned host will not deliver.
DEFAULT_EFFICIENCY = 0.60
# Across two sockets llama.cpp reached 41% of theoretical before NUMA placement was fixed and 74% after
# (llama.cpp#11744): until the tuner has set placement, a spanning size gets 0.41 / 0.74 of the
# single-socket efficiency on its bandwidth.
DEFAULT_NUMA_SPANNING_FACTOR = round(0.41 / 0.74, 3)
# Kernel, page tables, sshd/SSM agent and llama-server's own heap; and a margin for what the estimate
# of llama.cpp's buffers misses. A host that fits "exactly" swaps or is killed when a request arrives.
DEFAULT_OS_RESERVE_BYTES = 2 * GIB
DEFAULT_HEADROOM_FRACTION = 0.10


@dataclass(frozen=True)
class SizingAssumptions:
    """What turns a model and a workload into memory and speed, beyond the model's own metadata."""

    efficiency: float = DEFAULT_EFFICIENCY
    numa_spanning_factor: float = DEFAULT_NUMA_SPANNING_FACTOR
    os_reserve_bytes: int = DEFAULT_OS_RESERVE_BYTES
    headroom_fraction: float = DEFAULT_HEADROOM_FRACTION

    def validate(self) -> SizingAssumptions:
        problems = []
        if not 0 < self.efficiency <= 1:
            problems.append(f"efficiency {self.efficiency} must be in (0, 1] "
                            "(a fraction of theoretical bandwidth)")
        if not 0 < self.numa_spanning_factor <= 1:
            problems.append(f"numa_spanning_factor {self.numa_spanning_factor} must be in (0, 1]")
        if self.os_reserve_bytes < 0:
            problems.append("os_reserve_bytes must not be negative")
        if not 0 <= self.headroom_fraction < 1:
            problems.append(f"headroom_fraction {self.headroom_fraction} must be in [0, 1)")
        if problems:
            raise UserError("invalid sizing assumptions: " + "; ".join(problems),
                            "pass --efficiency as a fraction such as 0.65 (65% of theoretical bandwidth)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

"""Kernel CPU lists (``0-3,8,10``): the one implementation for the tuner and the collection.

The tuner (as ``tuner.cpu_lists``, a link to this file), the roles' filters and the modules all read and write CPU
lists through these functions, so a list the tuner writes into host_vars names the same CPUs on the host, and
llama.cpp's ``--cpu-mask`` is written the same way by both. It runs on the managed host too (Ansible ships
module_utils with a module), so it keeps to the standard library and to Python 3.8 syntax at run time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# The highest CPU id a list may name: the kernel's CONFIG_NR_CPUS tops out at 8192.
MAX_CPU_ID = 8191
_PART = re.compile(r"^(\d+)(?:-(\d+))?$")


class CpuListError(ValueError):
    """A malformed CPU list; ``part`` is the piece that could not be read."""

    def __init__(self, text: str, part: str) -> None:
        super().__init__(f"malformed CPU list {text!r} (bad part {part!r})")
        self.text = text
        self.part = part


def parse_cpu_list(text: str, *, spaces: bool = False) -> tuple[int, ...]:
    """``"0-3,8,10"`` -> ``(0, 1, 2, 3, 8, 10)``; empty text is the empty set.

    ``spaces``: whitespace separates parts too, as in ``systemctl show``'s ``CPUAffinity=0 2``. Raises
    :class:`CpuListError` for anything else, including ids above :data:`MAX_CPU_ID` and reversed ranges."""
    text = str(text).strip()
    if not text:
        return ()
    cpus: set[int] = set()
    for raw_part in re.split(r"\s*,\s*|\s+" if spaces else ",", text):
        part = raw_part.strip()
        match = _PART.match(part) if part.isascii() else None
        if match is None:
            raise CpuListError(text, part)
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low or high > MAX_CPU_ID:
            raise CpuListError(text, part)
        cpus.update(range(low, high + 1))
    return tuple(sorted(cpus))


def format_cpu_list(cpus: Iterable[int]) -> str:
    """``[0, 1, 2, 3, 8, 10]`` -> ``"0-3,8,10"``, the kernel's and systemd's CPU list syntax."""
    ranges: list[list[int]] = []
    for cpu in sorted({int(cpu) for cpu in cpus}):
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(f"{low}-{high}" if low != high else f"{low}" for low, high in ranges)


def cpu_mask(cpus: Iterable[int]) -> str:
    """``[4, 6]`` -> ``"0x50"``: llama.cpp's ``--cpu-mask`` (hex, the highest CPU in the first digit)."""
    return hex(sum(1 << cpu for cpu in {int(cpu) for cpu in cpus}))

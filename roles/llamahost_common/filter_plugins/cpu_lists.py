"""Jinja filters for kernel CPU lists (``0-3,8,10``), shared by the llamahost roles.

The same syntax as ``tuner.config.parse_cpu_list``/``format_cpu_list``, so a CPU list the tuner writes
into host_vars means the same CPUs here. ``systemctl show`` prints CPU sets separated by spaces
(``CPUAffinity=0 2``), so whitespace is accepted as a separator too.
"""

from __future__ import annotations

import re

from ansible.errors import AnsibleFilterError

_PART = re.compile(r"^(\d+)(?:-(\d+))?$")


def _parse(text):
    cpus = set()
    text = str(text).strip()
    if not text:
        return []
    for part in re.split(r"\s*,\s*|\s+", text):
        match = _PART.match(part)
        if not match:
            raise ValueError(part)
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise ValueError(part)
        cpus.update(range(low, high + 1))
    return sorted(cpus)


def cpu_list(text):
    """``"0-3,8"`` -> ``[0, 1, 2, 3, 8]``; ``""`` -> ``[]``."""
    try:
        return _parse(text)
    except ValueError as exc:
        raise AnsibleFilterError(f"malformed CPU list {text!r} (bad part {exc.args[0]!r})") from None


def cpu_list_ok(text):
    """Whether ``text`` is a well-formed CPU list (validation asserts on this, then names the variable)."""
    try:
        _parse(text)
    except ValueError:
        return False
    return True


def cpu_list_format(cpus):
    """``[0, 1, 2, 3, 8]`` -> ``"0-3,8"``."""
    ordered = sorted({int(cpu) for cpu in cpus})
    parts, start, prev = [], None, None
    for cpu in ordered:
        if start is None:
            start = prev = cpu
        elif cpu == prev + 1:
            prev = cpu
        else:
            parts.append(f"{start}-{prev}" if start != prev else f"{start}")
            start = prev = cpu
    if start is not None:
        parts.append(f"{start}-{prev}" if start != prev else f"{start}")
    return ",".join(parts)


def cpu_mask(cpus):
    """``[4, 6]`` -> ``"0x50"``: llama.cpp's ``--cpu-mask``, as ``tuner.config.cpu_mask`` writes it."""
    return hex(sum(1 << int(cpu) for cpu in set(cpus)))


class FilterModule:
    def filters(self):
        return {"cpu_list": cpu_list, "cpu_list_ok": cpu_list_ok, "cpu_list_format": cpu_list_format,
                "cpu_mask": cpu_mask}

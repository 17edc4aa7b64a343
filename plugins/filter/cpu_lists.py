"""Jinja filters for kernel CPU lists (``0-3,8,10``), shared by the llamahost roles.

They call the collection's ``cpu_lists`` module_utils, which is also the tuner's ``tuner.cpu_lists``: a CPU list the
tuner writes into host_vars names the same CPUs here. ``systemctl show`` prints CPU sets separated by spaces
(``CPUAffinity=0 2``), so whitespace is accepted as a separator too.
"""

from __future__ import annotations

from ansible.errors import AnsibleFilterError
from ansible_collections.llamahost.host.plugins.module_utils.cpu_lists import (
    CpuListError,
    cpu_mask,
    format_cpu_list,
    parse_cpu_list,
)


def cpu_list(text):
    """``"0-3,8"`` -> ``[0, 1, 2, 3, 8]``; ``""`` -> ``[]``."""
    try:
        return list(parse_cpu_list(text, spaces=True))
    except CpuListError as exc:
        raise AnsibleFilterError(str(exc)) from None


def cpu_list_ok(text):
    """Whether ``text`` is a well-formed CPU list (validation asserts on this, then names the variable)."""
    try:
        parse_cpu_list(text, spaces=True)
    except CpuListError:
        return False
    return True


class FilterModule:
    def filters(self):
        return {"cpu_list": cpu_list, "cpu_list_ok": cpu_list_ok, "cpu_list_format": format_cpu_list,
                "cpu_mask": cpu_mask}

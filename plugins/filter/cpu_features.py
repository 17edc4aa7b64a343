"""Jinja filter for the CPU features of the llama-server build that serves (the role's verify.yml).

It calls the collection's ``llama_cpu_features`` module_utils, which is also the tuner's
``tuner.server.cpu_features``: the role reports a build's features as the tuner names them in a result.
"""

from __future__ import annotations

from ansible_collections.llamahost.host.plugins.module_utils.llama_cpu_features import (
    enabled_features,
    parse_system_info,
    unused_fast_features,
)


def llama_cpu_features(debug_output, host_flags):
    """What llama-server printed at debug verbosity, and the host's CPU flags (host_topology's ``cpu_flags``) ->
    the build's CPU features: ``{"system_info": "CPU : ... |", "features": [...], "unused_host_features": [...]}``."""
    system_info = parse_system_info(str(debug_output))
    return {
        "system_info": system_info,
        "features": enabled_features(system_info),
        "unused_host_features": unused_fast_features(system_info, [str(flag) for flag in host_flags or []]),
    }


class FilterModule:
    def filters(self):
        return {"llama_cpu_features": llama_cpu_features}

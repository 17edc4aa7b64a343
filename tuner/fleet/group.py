"""Hardware groups: which hosts may share one study, and the study's deterministic name.

Two hosts belong to the same group when a configuration tuned on one is valid and equally fast on the
other: same CPU model and ISA, sockets, NUMA layout (CPUs per node and the distance table), physical
cores, SMT state (threads per core), last-level-cache domains, memory size (GiB), the same llama-server
build (its sha256, and llama.cpp's system_info: the CPU features and backends it runs with), and the same
model file (sha256). The group fingerprint is a hash of exactly these fields.

What is *not* in it, and why:

* **Memory speed.** It lives only in SMBIOS type 17 records (``/sys/firmware/dmi/entries/17-*/raw``,
  what ``dmidecode`` reads), which the kernel makes readable by root only; no file under /sys or /proc
  that an unprivileged process can read has it (EDAC's per-DIMM files give type and size, not speed). A
  key that depended on who runs the tuner would put the same host in two groups, so speed is left out.
  Memory *size* (MemTotal, rounded to GiB) is in.
* Free memory, hostname, kernel settings (THP, governor): they vary between runs of the same host and
  are what the Ansible roles set, not what the hardware is.

The study of a group is named ``fleet-<model>-<objective>-p<pp>t<tg>-<group[:12]>``: every host of a
group computes the same name by itself, and hosts of different groups can never meet in one study.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from tuner.probe.host import HostProbe
from tuner.server.identity import ServerBinary
from tuner.study import FLEET_STUDY, StudyBinding
from tuner.trial.protocol import Workload

NOT_READ = {
    "memory_speed": "only in SMBIOS type 17 (/sys/firmware/dmi/entries/17-*/raw, dmidecode), readable by root "
                    "only; left out so a host's group does not depend on the user running the tuner",
}


@dataclass(frozen=True)
class GroupFingerprint:
    fields: dict[str, Any]

    @property
    def digest(self) -> str:
        blob = json.dumps(self.fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def group_fingerprint(probe: HostProbe, server: ServerBinary, model_sha256: str) -> GroupFingerprint:
    """The fields that decide a host's group (see the module docstring for what is left out)."""
    topology = probe.topology
    return GroupFingerprint({
        **probe.fingerprint_fields(),
        "smt_threads_per_core": topology.threads_per_core,
        "numa_distances": [list(node.distances) for node in topology.nodes],
        "llama_server_sha256": server.sha256,
        "llama_cpp_system_info": server.system_info,
        "model_sha256": model_sha256,
    })


def group_study_name(model_stem: str, objective: str, workload: Workload, group: GroupFingerprint) -> str:
    stem = model_stem.lower().replace(" ", "-")[:32]
    return f"fleet-{stem}-{objective}-p{workload.pp_tokens}t{workload.tg_tokens}-{group.digest[:12]}"


def group_binding(group: GroupFingerprint, objective: str, workload_attrs: dict[str, Any],
                  model_name: str) -> StudyBinding:
    """What a group study is bound to: the group's fingerprint (its fields kept to explain refusals)."""
    return StudyBinding(
        host_fingerprint=group.digest,
        model_sha256=str(group.fields["model_sha256"]),
        objective=objective,
        workload=workload_attrs,
        extra={"host": group.fields, "model_name": model_name},
        kind=FLEET_STUDY,
        llama_server_sha256=str(group.fields["llama_server_sha256"]),
    )

"""The two ways a live run names a host's ``llama_server`` unit, as :class:`tuner.live.control.Connection` s.

* ``--inventory FILE --host NAME`` (:class:`InventoryConnection`): from a controller, over SSH. The inventory gives
  the connection and the deployed settings; the controller needs a copy of the served model to read its metadata,
  and proves it is the same file by its sha256 on the host.
* ``--unit NAME`` (:class:`OnHostConnection`): on the host itself, which is how ``playbooks/tune.yml`` runs it (a
  transient systemd unit started over Ansible's own connection, SSH or SSM). The model is the file the unit serves;
  the deployed settings come from ``--baseline-vars`` (the playbook writes the host's ``llama_server_*`` variables
  there). A winner is not applied here: the controller writes it back and rolls it out.

Both describe the host the same way (:func:`describe_unit`), from one :class:`SystemdServer`.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tuner.config import RunConfig, parse_cpu_list
from tuner.cpu_lists import format_cpu_list
from tuner.durations import parse_duration
from tuner.errors import UserError
from tuner.inventory import read_host_variables
from tuner.live.control import Target, TargetOptions
from tuner.live.host_shell import LocalShell
from tuner.live.ssh import SshLink, host_facts
from tuner.live.systemd import SystemdServer, serving_cores
from tuner.live.unit import UnitSettings
from tuner.model.checksum import model_sha256
from tuner.model.gguf_file import ModelInfo, check_fits_in_memory, inspect_model
from tuner.probe.host import HostProbe
from tuner.yamlfile import read_yaml_mapping


@contextlib.contextmanager
def connected_and_locked(control: SystemdServer) -> Iterator[None]:
    control.connect()
    try:
        with control.lock():
            yield
    finally:
        control.disconnect()


def describe_unit(control: SystemdServer, variables: Mapping[str, Any], model: ModelInfo, model_digest: str,
                  probe: HostProbe, *, source: str) -> Target:
    """The target a unit is: its model, hardware, deployed settings, build and the CPUs a trial may pin.
    ``source`` names where the deployed settings come from, for the refusal of settings that cannot run."""
    check_fits_in_memory(model, probe.memory_available_bytes + (control.server_memory_bytes() or 0))
    cpus = parse_cpu_list(str(variables.get("llama_server_cpus", "") or ""))
    deployed = RunConfig.from_role_vars(variables, physical_cores=serving_cores(probe.topology, cpus), source=source)
    server = control.binary_identity()
    return Target(model, model_digest, probe, deployed, server=server, knobs=control.binary_knobs(server),
                  numa_blocked=control.numa_blocked(), usable_cpus=usable_cpus(control, variables, probe))


def usable_cpus(control: SystemdServer, variables: Mapping[str, Any], probe: HostProbe) -> tuple[int, ...] | None:
    """The CPUs a trial may pin: the role's ``cpu_inference_cpus`` (the cpu role keeps the others for housekeeping
    and the server role refuses them), within what the unit's slice may use."""
    declared = parse_cpu_list(str(variables.get("cpu_inference_cpus") or ""))
    usable = set(probe.topology.logical_cpus)
    for narrower in (declared or None, control.slice_cpus()):
        if narrower:
            usable &= set(narrower)
    if not usable:
        raise UserError(f"no online CPU of {control.shell.name} is both an inference CPU ({format_cpu_list(declared)}) "
                        "and usable by the server's slice",
                        "fix cpu_inference_cpus in the inventory and converge the host with site.yml")
    return None if usable == set(probe.topology.logical_cpus) else tuple(sorted(usable))


class InventoryConnection:
    """A host's llama_server unit named by an Ansible inventory (``--inventory FILE --host NAME``), over SSH."""

    def __init__(self, options: TargetOptions) -> None:
        if options.inventory is None or not options.host:
            raise UserError("--inventory and --host go together", "pass both, e.g. --inventory inv.yml --host h1")
        if options.baseline_vars:
            raise UserError("--baseline-vars is for --local and --unit runs",
                            "with --inventory the host's inventory variables are the baseline: drop it")
        if options.apply and options.host_vars is None:
            raise UserError("--apply on an inventory host needs --host-vars",
                            f"pass the host's host_vars file, e.g. --host-vars "
                            f"{options.inventory.parent}/host_vars/{options.host}.yml, so the role applies the "
                            "winner and keeps it")
        self.options = options
        self.host = options.host
        self.variables = read_host_variables(options.inventory, options.host)
        self.control = SystemdServer(SshLink(host_facts(options.host, self.variables)),
                                     UnitSettings.from_role_vars(options.host, self.variables),
                                     inventory=options.inventory,
                                     deadman_s=parse_duration(options.deadman, what="--deadman"),
                                     max_memory_fraction=options.max_server_memory)

    def lock(self) -> contextlib.AbstractContextManager[None]:
        return connected_and_locked(self.control)

    def _local_model(self) -> Path:
        if self.options.model:
            return self.options.model
        source = str(self.variables.get("llama_server_model_src") or "")
        if not source or "{{" in source:
            raise UserError(f"the controller has no copy of {self.host}'s model to read its metadata from "
                            "(llama_server_model_src is empty or a template)",
                            "pass --model with a local copy of the GGUF file the host serves")
        return Path(source).expanduser()

    def describe(self) -> Target:
        probe = self.control.probe()
        model = inspect_model(self._local_model())
        remote = self.control.server_command().model
        shards = [remote, *(str(Path(remote).parent / f.name) for f in model.files[1:])]
        self.control.model_files = shards
        local_digest = model_sha256(model.files)
        remote_digest = self.control.model_digest(shards)
        if remote_digest != local_digest:
            raise UserError(f"the model {self.host} serves ({remote}, sha256 {remote_digest[:12]}...) is not "
                            f"{model.path} (sha256 {local_digest[:12]}...)",
                            "converge the host with playbooks/site.yml, or pass --model with the file it serves")
        return describe_unit(self.control, self.variables, model, local_digest, probe,
                             source=f"{self.host}'s variables in the inventory {self.options.inventory}")


class OnHostConnection:
    """The llama_server unit of the machine the tuner runs on (``--unit NAME``)."""

    def __init__(self, options: TargetOptions) -> None:
        if not options.unit:
            raise UserError("--unit names the systemd service to tune", "pass e.g. --unit llama-server")
        if options.baseline_vars is None:
            raise UserError(f"--unit {options.unit} needs --baseline-vars: the host's llama_server_* settings are the "
                            "baseline every trial is judged against",
                            "pass the YAML file of the host's llama_server_* variables (playbooks/tune.yml writes it "
                            "to /var/lib/llamahost/tune/role-vars.yml)")
        if options.apply or options.host_vars or options.model:
            raise UserError("--apply, --host-vars and --model do not go with --unit: on the host there is no "
                            "inventory to write or converge, and the model is the file the unit serves",
                            "drop them; the controller writes a proven winner back and rolls it out "
                            "(playbooks/tune.yml does both)")
        self.options = options
        self.variables = {**read_yaml_mapping(options.baseline_vars, what="--baseline-vars file",
                                              fix_missing="pass the host's llama_server_* variables as YAML",
                                              fix_shape="pass a host_vars-style YAML mapping"),
                          "llama_server_service_name": options.unit.removesuffix(".service")}
        name = socket.gethostname()
        self.control = SystemdServer(LocalShell(name), UnitSettings.from_role_vars(name, self.variables),
                                     inventory=None, deadman_s=parse_duration(options.deadman, what="--deadman"),
                                     max_memory_fraction=options.max_server_memory)

    def lock(self) -> contextlib.AbstractContextManager[None]:
        return connected_and_locked(self.control)

    def describe(self) -> Target:
        probe = self.control.probe()
        model = inspect_model(Path(self.control.server_command().model))
        self.control.model_files = [str(path) for path in model.files]
        return describe_unit(self.control, self.variables, model, model_sha256(model.files), probe,
                             source=str(self.options.baseline_vars))

"""What to build, decided before any resource exists: instance type, CPU options, volumes, host facts.

Pure functions over plain data, so every decision is unit-tested without Pulumi: the sizing engine
chooses (or checks) the type, :func:`check_catalog_against_aws` refuses a catalog that disagrees with
what EC2 reports for that type, :func:`plan_cpu_options` turns SMT off only where the type allows it,
and :func:`plan_data_volume` sizes a gp3 volume that loads the model at the type's EBS speed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llamahost_infra.settings import StackSettings
from tuner.errors import UserError
from tuner.sizing import (
    Candidate,
    Catalog,
    Constraints,
    InstanceSize,
    ModelDemand,
    SizingAssumptions,
    SizingReport,
    Workload,
    evaluate,
    require_fit,
    require_recommendation,
    size_host,
)

GIB = 1024**3
MIB = 1024**2
ROOT_VOLUME_GIB = 30
MODEL_DIR = "/srv/models"
# gp3 limits (AWS EBS volume types): 3000-16000 IOPS, 125-1000 MiB/s, at most 0.25 MiB/s per IOPS and
# 500 IOPS per GiB.
GP3_MIN_IOPS, GP3_MAX_IOPS = 3000, 16000
GP3_MIN_THROUGHPUT, GP3_MAX_THROUGHPUT = 125, 1000
GP3_MIB_PER_IOPS = 0.25
GP3_IOPS_PER_GIB = 500
# Room for a second copy while a new model version downloads, plus a fixed margin for small models.
DATA_VOLUME_MODEL_FACTOR = 1.25
DATA_VOLUME_MARGIN_GIB = 16


@dataclass(frozen=True)
class InstanceTypeFacts:
    """What ``ec2.get_instance_type`` reports for a type (the live truth the catalog is checked against)."""

    name: str
    vcpus: int
    cores: int
    threads_per_core: int
    valid_cores: tuple[int, ...]
    valid_threads_per_core: tuple[int, ...]
    memory_mib: int
    architectures: tuple[str, ...]
    ebs_max_throughput_mbs: float | None
    bare_metal: bool


@dataclass(frozen=True)
class CpuOptionsPlan:
    core_count: int
    threads_per_core: int


@dataclass(frozen=True)
class DataVolumePlan:
    size_gib: int
    throughput_mibs: int
    iops: int

    def load_seconds(self, model_bytes: int) -> float:
        """Time to read the model once from the volume at its provisioned throughput."""
        return model_bytes / (self.throughput_mibs * MIB)


@dataclass(frozen=True)
class HostPlan:
    """Everything the component needs to create identical hosts, and the facts handed to Ansible."""

    model: ModelDemand
    report: SizingReport
    choice: Candidate
    facts_from_aws: InstanceTypeFacts
    cpu_options: CpuOptionsPlan | None
    data_volume: DataVolumePlan
    install_mode: str = "binary"
    root_volume_gib: int = ROOT_VOLUME_GIB

    @property
    def instance(self) -> InstanceSize:
        return self.choice.instance

    @property
    def threads_per_core(self) -> int:
        return self.cpu_options.threads_per_core if self.cpu_options else self.facts_from_aws.threads_per_core

    @property
    def physical_cores(self) -> int:
        return self.cpu_options.core_count if self.cpu_options else self.facts_from_aws.cores

    def host_facts(self, settings: StackSettings) -> dict[str, Any]:
        """The host variables the roles and the tuner read: ``llamahost_*`` facts about the host, and the
        ``llama_server_*`` settings the stack itself decided (the port its security group opens, the data
        volume it mounts, the install mode its architecture needs, the S3 prefix its role may read and, with
        ``llamahost:modelFile``, the model it was sized for). The bind address is the host's private IP, added
        per host by the component.

        No *tuned* ``llama_server_*`` setting is a host variable: host variables outrank ``group_vars``, so
        a thread count set here would override a fleet's tuned ``group_vars/<group>.yml`` and roll out a mix
        that was never measured. The role's own default (threads 0: the physical cores, llama.cpp's default)
        serves until the tuner writes a measured value.
        """
        size = self.instance
        facts: dict[str, Any] = {
            "llamahost_instance_type": size.name,
            "llamahost_architecture": size.family.architecture,
            "llamahost_vcpus": self.physical_cores * self.threads_per_core,
            "llamahost_physical_cores": self.physical_cores,
            "llamahost_threads_per_core": self.threads_per_core,
            "llamahost_smt": self.threads_per_core > 1,
            "llamahost_sockets": size.sockets_spanned,
            "llamahost_numa_nodes": size.sockets_spanned,
            "llamahost_memory_gib": size.memory_gib,
            "llamahost_instance_store_gb": size.instance_store_gb,
            "llamahost_bandwidth_gbs": round(self.choice.bandwidth_gbs, 1),
            "llamahost_predicted_tg_tokens_per_second": round(self.choice.predicted_tg, 2),
            "llamahost_model_name": self.model.name,
            "llamahost_model_bytes": self.model.weight_bytes,
            "llama_server_model_dir": MODEL_DIR,
            "llama_server_port": settings.server_port,
            "llama_server_install_mode": self.install_mode,
        }
        if settings.model_s3_uri:
            # The grant: the role refuses, before any change, an s3:// model outside what the host may read.
            facts["llama_server_model_s3_prefix"] = settings.model_s3_uri
            facts["llama_server_model_s3_region"] = settings.region
        if settings.model_url:
            # The model the stack was sized for, fetched by the host with its own role onto the data volume.
            facts["llama_server_model_url"] = settings.model_url
            digests = list(settings.model_sha256)
            facts["llama_server_model_sha256"] = digests[0] if len(digests) == 1 else digests
        return facts


def sizing_inputs(settings: StackSettings) -> tuple[Workload, SizingAssumptions, Constraints]:
    return (
        Workload(context=settings.context, parallel=settings.parallel, cache_type=settings.cache_type),
        SizingAssumptions(efficiency=settings.efficiency),
        Constraints(
            region=settings.region,
            max_hourly_price=settings.max_hourly_price,
            min_tokens_per_second=settings.min_tokens_per_second,
            families=settings.families,
        ),
    )


def choose_instance(
    settings: StackSettings, model: ModelDemand, catalog: Catalog
) -> tuple[Candidate, SizingReport]:
    """The sizing engine's recommendation, or the configured type after checking it can do the job."""
    workload, assumptions, constraints = sizing_inputs(settings)
    if settings.instance_type is None:
        report = size_host(model, workload, catalog, assumptions, constraints)
        return require_recommendation(report), report
    size = catalog.get(settings.instance_type)
    report = size_host(model, workload, catalog, assumptions, Constraints(region=settings.region))
    chosen = require_fit(
        evaluate(
            size,
            model,
            workload,
            assumptions=assumptions.validate(),
            constraints=constraints.validate(catalog),
        ),
        model,
    )
    if not chosen.eligible:
        misses = [
            r
            for r in chosen.reasons
            if r.startswith(("below the minimum", "over the price cap", "price unknown"))
        ]
        raise UserError(
            f"llamahost:instanceType {size.name} contradicts the other settings: {'; '.join(misses)}",
            "drop llamahost:minTokensPerSecond/maxHourlyPrice, or unset llamahost:instanceType so a type "
            "that meets them is chosen",
        )
    return chosen, report


def check_catalog_against_aws(size: InstanceSize, facts: InstanceTypeFacts) -> None:
    """Stop when the catalog's figures for ``size`` are not what EC2 reports: the sizing would be wrong."""
    expected = {
        "vCPUs": (size.vcpus, facts.vcpus),
        "memory MiB": (size.memory_gib * 1024, facts.memory_mib),
        "threads per core": (size.family.threads_per_core, facts.threads_per_core),
    }
    wrong = [
        f"{what}: catalog {ours}, AWS {theirs}" for what, (ours, theirs) in expected.items() if ours != theirs
    ]
    if size.family.architecture not in facts.architectures:
        wrong.append(
            f"architecture: catalog {size.family.architecture}, AWS {', '.join(facts.architectures)}"
        )
    if wrong:
        raise UserError(
            f"the instance catalog disagrees with EC2 about {size.name} ({'; '.join(wrong)})",
            "correct the figures in tuner/sizing/catalog.yaml (and their source date), then run again",
        )


def plan_cpu_options(
    size: InstanceSize, facts: InstanceTypeFacts, *, keep_smt: bool
) -> CpuOptionsPlan | None:
    """``threads_per_core=1`` with every core where SMT is on and EC2 allows turning it off; else nothing.

    EC2 needs both values together, from the type's valid lists; types that already run one thread per
    core (AMD 7th gen, Graviton) and SMT kept on need no CPU options at all.
    """
    if keep_smt or facts.threads_per_core == 1:
        return None
    if facts.bare_metal:
        raise UserError(
            f"{size.name} is bare metal: EC2 accepts no CPU options there, so SMT cannot be turned off",
            "set llamahost:smt true, or choose a virtualized size",
        )
    if 1 not in facts.valid_threads_per_core:
        raise UserError(
            f"{size.name} cannot turn SMT off: EC2 allows threads per core "
            f"{list(facts.valid_threads_per_core)}",
            "set llamahost:smt true, or choose a type that allows one thread per core",
        )
    if facts.cores not in facts.valid_cores:
        raise UserError(
            f"{size.name}: EC2 does not list its default {facts.cores} cores among the valid core counts "
            f"{list(facts.valid_cores)}",
            "set llamahost:smt true (no CPU options), or choose another type",
        )
    return CpuOptionsPlan(core_count=facts.cores, threads_per_core=1)


def plan_data_volume(
    model_bytes: int,
    facts: InstanceTypeFacts,
    *,
    size_gib: int | None = None,
    throughput_mibs: int | None = None,
    iops: int | None = None,
) -> DataVolumePlan:
    """An encrypted gp3 volume for the model: big enough for two copies, and as fast as the type can read.

    Throughput defaults to gp3's maximum, capped at the instance's own EBS throughput (more would be paid
    for and never delivered); IOPS default to the minimum gp3 needs for that throughput.
    """
    needed_gib = math.ceil(model_bytes / GIB)
    size = (
        size_gib
        if size_gib is not None
        else max(32, math.ceil(model_bytes * DATA_VOLUME_MODEL_FACTOR / GIB) + DATA_VOLUME_MARGIN_GIB)
    )
    if throughput_mibs is None:
        ceiling = GP3_MAX_THROUGHPUT
        if facts.ebs_max_throughput_mbs:
            ceiling = min(ceiling, math.floor(facts.ebs_max_throughput_mbs * 1e6 / MIB))
        throughput_mibs = max(GP3_MIN_THROUGHPUT, ceiling)
    if iops is None:
        iops = min(GP3_MAX_IOPS, max(GP3_MIN_IOPS, math.ceil(throughput_mibs / GP3_MIB_PER_IOPS)))
    problems = []
    if size < needed_gib:
        problems.append(f"llamahost:dataVolumeGiB {size} cannot hold the model ({needed_gib} GiB)")
    if not GP3_MIN_THROUGHPUT <= throughput_mibs <= GP3_MAX_THROUGHPUT:
        problems.append(
            f"gp3 throughput {throughput_mibs} MiB/s is outside {GP3_MIN_THROUGHPUT}..{GP3_MAX_THROUGHPUT}"
        )
    if not GP3_MIN_IOPS <= iops <= GP3_MAX_IOPS:
        problems.append(f"gp3 IOPS {iops} is outside {GP3_MIN_IOPS}..{GP3_MAX_IOPS}")
    if throughput_mibs > iops * GP3_MIB_PER_IOPS:
        problems.append(
            f"gp3 throughput {throughput_mibs} MiB/s needs at least "
            f"{math.ceil(throughput_mibs / GP3_MIB_PER_IOPS)} IOPS (0.25 MiB/s per IOPS), not {iops}"
        )
    if iops > size * GP3_IOPS_PER_GIB:
        problems.append(
            f"gp3 allows at most {GP3_IOPS_PER_GIB} IOPS per GiB: {iops} IOPS need "
            f"{math.ceil(iops / GP3_IOPS_PER_GIB)} GiB, the volume has {size}"
        )
    if problems:
        raise UserError(
            "invalid data volume: " + "; ".join(problems),
            "adjust llamahost:dataVolumeGiB / dataVolumeThroughput / dataVolumeIops, or unset them",
        )
    return DataVolumePlan(size_gib=size, throughput_mibs=throughput_mibs, iops=iops)


def instance_type_facts(name: str, result: Mapping[str, Any]) -> InstanceTypeFacts:
    """Normalise a ``GetInstanceTypeResult`` (its attributes as a mapping) into :class:`InstanceTypeFacts`."""

    def ints(values: Sequence[Any] | None) -> tuple[int, ...]:
        return tuple(int(v) for v in values or ())

    throughput = result.get("ebs_performance_maximum_throughput")
    return InstanceTypeFacts(
        name=name,
        vcpus=int(result["default_vcpus"]),
        cores=int(result["default_cores"]),
        threads_per_core=int(result["default_threads_per_core"]),
        valid_cores=ints(result.get("valid_cores")),
        valid_threads_per_core=ints(result.get("valid_threads_per_cores")),
        memory_mib=int(result["memory_size"]),
        architectures=tuple(str(a) for a in result.get("supported_architectures") or ()),
        ebs_max_throughput_mbs=float(throughput) if throughput else None,
        bare_metal=bool(result.get("bare_metal")),
    )


def serving_install_mode(requested: str, architecture: str) -> str:
    """The llama_server install mode for a host of ``architecture``: ``auto`` picks one that serves there,
    and an explicit mode that cannot serve there is refused now, before the host exists.

    ``binary`` copies the controller's portable x86-64 build, so it serves only x86_64 hosts; ``source``
    (built on the host with its native flags) and ``python`` serve both architectures.
    """
    if requested == "auto":
        return "binary" if architecture == "x86_64" else "source"
    if requested == "binary" and architecture != "x86_64":
        raise UserError(
            f"llamahost:installMode binary ships the controller's x86-64 llama-server, which cannot run on "
            f"this {architecture} instance type",
            "set llamahost:installMode source (llama.cpp built on the host, for its CPU) or auto, or choose an "
            "x86_64 type (llamahost:instanceType or llamahost:families)",
        )
    return requested


def plan_hosts(
    settings: StackSettings,
    model: ModelDemand,
    catalog: Catalog,
    facts_for: Callable[[str], InstanceTypeFacts],
) -> HostPlan:
    """Choose the type, check it against EC2 (``facts_for(name)`` asks EC2), plan CPU options and disks."""
    choice, report = choose_instance(settings, model, catalog)
    facts = facts_for(choice.instance.name)
    check_catalog_against_aws(choice.instance, facts)
    install_mode = serving_install_mode(settings.install_mode, choice.instance.family.architecture)
    return HostPlan(
        model=model,
        report=report,
        choice=choice,
        facts_from_aws=facts,
        cpu_options=plan_cpu_options(choice.instance, facts, keep_smt=settings.smt),
        data_volume=plan_data_volume(
            model.weight_bytes,
            facts,
            size_gib=settings.data_volume_gib,
            throughput_mibs=settings.data_volume_throughput,
            iops=settings.data_volume_iops,
        ),
        install_mode=install_mode,
    )

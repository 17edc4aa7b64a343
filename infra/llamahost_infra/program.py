"""The stack, start to end: read the configuration, size, check against AWS, build the components.

Every problem a user can fix ends as one :class:`pulumi.RunError` with the problem and the fix (no
traceback), raised before any resource is registered: the configuration is checked, the model read, the
type chosen and checked against EC2, the image, the subnet and the fleet database's group looked up,
and only then are resources built.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pulumi

from llamahost_infra import aws_lookups
from llamahost_infra.cloud_init import render_user_data
from llamahost_infra.host import CpuInferenceHost, CpuInferenceHostArgs
from llamahost_infra.inventory import build_inventory, render_yaml
from llamahost_infra.network import PrivateNetwork, PrivateNetworkArgs
from llamahost_infra.plan import MODEL_DIR, HostPlan, plan_hosts
from llamahost_infra.settings import StackSettings, load_settings
from tuner.errors import UserError
from tuner.sizing import ModelDemand, default_catalog, demand_from_gguf

PROJECT_DIR = Path(__file__).resolve().parents[1]


def model_demand(settings: StackSettings, project_dir: Path = PROJECT_DIR) -> ModelDemand:
    """The model to size for: a GGUF file (relative paths from infra/) or the numbers in modelParams."""
    if settings.model_path is not None:
        path = Path(settings.model_path).expanduser()
        return demand_from_gguf(path if path.is_absolute() else project_dir / path)
    params = dict(settings.model_params or {})
    missing = [
        key for key in ("params", "bitsPerWeight", "layers", "kvHeads", "headDim") if key not in params
    ]
    if missing:
        raise UserError(
            f"llamahost:modelParams lacks {', '.join(missing)}",
            "give params, bitsPerWeight, layers, kvHeads and headDim (see infra/README.md)",
        )
    try:
        return ModelDemand.from_parameters(
            params=float(params["params"]),
            bits_per_weight=float(params["bitsPerWeight"]),
            layers=int(params["layers"]),
            kv_heads=int(params["kvHeads"]),
            head_dim=int(params["headDim"]),
            active_params=float(params["activeParams"]) if "activeParams" in params else None,
            n_embd=int(params["embd"]) if "embd" in params else None,
            n_vocab=int(params["vocab"]) if "vocab" in params else None,
            name=str(params.get("name", "")),
        )
    except (TypeError, ValueError) as exc:
        raise UserError(
            f"llamahost:modelParams has a value that is not a number ({exc})",
            "write numbers, e.g. params: 70.6e9, layers: 80",
        ) from None


def check_image(settings: StackSettings, plan: HostPlan) -> None:
    image = aws_lookups.lookup_image(settings.ami_id)
    wanted = plan.instance.family.architecture
    if image.architecture != wanted:
        raise UserError(
            f"llamahost:amiId {image.ami_id} ({image.name}) is built for {image.architecture}, but "
            f"{plan.instance.name} needs {wanted}",
            f"pin an {wanted} image of the same distribution (infra/README.md, 'Choose the image')",
        )
    if image.state not in ("", "available"):
        raise UserError(
            f"llamahost:amiId {image.ami_id} is {image.state}, not available", "pin an available image"
        )


def network_for(settings: StackSettings, plan: HostPlan, name: str) -> tuple[Any, Any, str]:
    """(vpc id, subnet id, zone): the configured subnet after checking it, or a new private network."""
    zones = aws_lookups.offered_zones(plan.instance.name)
    if not zones:
        raise UserError(
            f"{plan.instance.name} is not offered in any zone of {settings.region}",
            "choose another region (aws:region) or type",
        )
    if settings.subnet_id is None:
        network = PrivateNetwork(
            name,
            PrivateNetworkArgs(
                cidr=settings.network_cidr,
                availability_zone=zones[0],
                region=settings.region,
                nat_gateway=settings.nat_gateway,
                ssm_endpoints=settings.ssm_endpoints,
                tags=stack_tags(settings, plan),
            ),
        )
        return network.vpc_id, network.subnet_id, zones[0]
    subnet = aws_lookups.lookup_subnet(settings.subnet_id)
    if settings.vpc_id and subnet.vpc_id != settings.vpc_id:
        raise UserError(
            f"llamahost:subnetId {subnet.subnet_id} belongs to {subnet.vpc_id}, not llamahost:vpcId "
            f"{settings.vpc_id}",
            "name a subnet of that VPC, or drop llamahost:vpcId",
        )
    if subnet.availability_zone not in zones:
        raise UserError(
            f"{plan.instance.name} is not offered in {subnet.availability_zone}, the zone of "
            f"{subnet.subnet_id} (offered in {', '.join(zones)})",
            "use a subnet in one of those zones, or another type",
        )
    return subnet.vpc_id, subnet.subnet_id, subnet.availability_zone


def check_fleet_database(settings: StackSettings, vpc_id: Any) -> None:
    """The fleet study store's group exists; outside the hosts' VPC a rule reaches it only through peering."""
    if settings.fleet_database_security_group is None:
        return
    group = aws_lookups.lookup_fleet_database_group(settings.fleet_database_security_group)
    if group.vpc_id != vpc_id:
        pulumi.log.warn(
            f"llamahost:fleetDatabaseSecurityGroup {group.group_id} ({group.name}) is in {group.vpc_id}, the "
            f"hosts in {vpc_id}: EC2 accepts the egress rule only while the two VPCs are peered (active, same "
            "region), and the hosts reach the database only with a route over that peering"
        )


def tag_value(text: str) -> str:
    """EC2 tag values allow letters, digits, spaces and ``+ - = . _ : / @``, at most 256 characters."""
    return re.sub(r"[^\w\s+\-=.:/@]", "_", text)[:256]


def stack_tags(settings: StackSettings, plan: HostPlan) -> dict[str, str]:
    return {
        **settings.tags,
        "ManagedBy": "pulumi",
        "llamahost:stack": pulumi.get_stack(),
        "llamahost:model": tag_value(plan.model.name),
    }


def sizing_summary(plan: HostPlan) -> dict[str, Any]:
    """What was chosen and why, for `pulumi stack output sizing`."""
    choice = plan.choice
    return {
        "instance_type": choice.name,
        "reason": plan.report.recommendation_reason if plan.report.recommended is choice else "configured",
        "memory_needed_gib": round(plan.report.budget.total / 1024**3, 2),
        "predicted_tg_tokens_per_second": round(choice.predicted_tg, 2),
        "price_usd_per_hour": choice.price_per_hour,
        "price_basis": choice.price_basis,
        "reasons": list(choice.reasons),
        "cpu_options": None
        if plan.cpu_options is None
        else {
            "core_count": plan.cpu_options.core_count,
            "threads_per_core": plan.cpu_options.threads_per_core,
        },
        "data_volume": {
            "size_gib": plan.data_volume.size_gib,
            "throughput_mibs": plan.data_volume.throughput_mibs,
            "iops": plan.data_volume.iops,
            "model_load_seconds": round(plan.data_volume.load_seconds(plan.model.weight_bytes), 1),
        },
    }


def build_stack(settings: StackSettings) -> dict[str, Any]:
    """Create the resources for ``settings``; return the stack outputs."""
    plan = plan_hosts(settings, model_demand(settings), default_catalog(), aws_lookups.lookup_instance_type)
    check_image(settings, plan)
    partition = aws_lookups.lookup_partition()
    name = settings.name_prefix
    vpc_id, subnet_id, zone = network_for(settings, plan, name)
    check_fleet_database(settings, vpc_id)
    host = CpuInferenceHost(
        name,
        CpuInferenceHostArgs(
            plan=plan,
            ami_id=settings.ami_id,
            region=settings.region,
            vpc_id=vpc_id,
            subnet_id=subnet_id,
            user_data=render_user_data(MODEL_DIR),
            facts=plan.host_facts(settings),
            count=settings.count,
            server_port=settings.server_port,
            client_security_group_id=settings.client_security_group_id,
            fleet_database_security_group_id=settings.fleet_database_security_group,
            fleet_database_port=settings.fleet_database_port,
            access=settings.access,
            key_name=settings.key_name,
            ssm_bucket=settings.ssm_bucket,
            model_s3=settings.model_bucket_and_prefix,
            kms_key_id=settings.kms_key_id,
            partition=partition.partition,
            dns_suffix=partition.dns_suffix,
            tags=stack_tags(settings, plan),
        ),
    )
    return {
        "hosts": host.hosts,
        "ansible_inventory": host.hosts.apply(lambda hosts: render_yaml(build_inventory(hosts))),
        "sizing": sizing_summary(plan),
        "region": settings.region,
        "availability_zone": zone,
        "vpc_id": vpc_id,
        "subnet_id": subnet_id,
        "security_group_id": host.security_group_id,
        "client_security_group_id": host.client_security_group_id,
        "role_arn": host.role_arn,
        "ssm_bucket": host.ssm_bucket,
    }


def main() -> None:
    """The Pulumi entry point: a user's mistake becomes a RunError (message, no traceback)."""
    try:
        outputs = build_stack(load_settings())
    except UserError as exc:
        raise pulumi.RunError(str(exc)) from None
    for key, value in outputs.items():
        if value is not None:
            pulumi.export(key, value)

"""The read-only questions the program asks AWS before it creates anything, as plain data.

Each wraps one Pulumi invoke (``ec2.get_instance_type``, ``ec2.get_ami``, ``ec2.get_subnet``,
``ec2.get_security_group``, ``ec2.get_instance_type_offerings``, ``get_partition``) and turns a failure into
a :class:`UserError` that names the setting to fix. In tests the Pulumi mocks answer these from the same
instance catalog the sizing engine uses, so a check that would fail against EC2 fails there too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import pulumi_aws as aws

from llamahost_infra.plan import InstanceTypeFacts, instance_type_facts
from tuner.errors import UserError

T = TypeVar("T")


def _asked(invoke: Callable[[], T], problem: str, fix: str) -> T:
    """The invoke's answer, or a :class:`UserError` with ``problem``, the invoke's own reason, and ``fix``."""
    try:
        return invoke()
    except Exception as exc:  # the invoke's own error says why (not found, unknown type, no permission)
        raise UserError(f"{problem}: {exc}", fix) from None


@dataclass(frozen=True)
class ImageFacts:
    ami_id: str
    name: str
    architecture: str
    state: str


@dataclass(frozen=True)
class SubnetFacts:
    subnet_id: str
    vpc_id: str
    availability_zone: str
    cidr_block: str
    map_public_ip_on_launch: bool


@dataclass(frozen=True)
class SecurityGroupFacts:
    group_id: str
    vpc_id: str
    name: str


@dataclass(frozen=True)
class PartitionFacts:
    partition: str
    dns_suffix: str


def lookup_instance_type(name: str) -> InstanceTypeFacts:
    result = _asked(
        lambda: aws.ec2.get_instance_type(instance_type=name),
        f"EC2 cannot describe instance type {name}",
        "check aws:region and the credentials, or choose another type",
    )
    fields = (
        "default_vcpus",
        "default_cores",
        "default_threads_per_core",
        "valid_cores",
        "valid_threads_per_cores",
        "memory_size",
        "supported_architectures",
        "ebs_performance_maximum_throughput",
        "bare_metal",
    )
    return instance_type_facts(name, {field: getattr(result, field) for field in fields})


def lookup_image(ami_id: str) -> ImageFacts:
    """The pinned image, looked up by ID only: no name filter, no ``most_recent``, so it never changes."""
    result = _asked(
        lambda: aws.ec2.get_ami(filters=[aws.ec2.GetAmiFilterArgs(name="image-id", values=[ami_id])]),
        f"llamahost:amiId {ami_id} cannot be found in this region",
        "image IDs differ per region: look the image up in aws:region (infra/README.md)",
    )
    return ImageFacts(
        ami_id=ami_id,
        name=str(result.name or ""),
        architecture=str(result.architecture),
        state=str(result.state or ""),
    )


def lookup_subnet(subnet_id: str) -> SubnetFacts:
    result = _asked(
        lambda: aws.ec2.get_subnet(id=subnet_id),
        f"llamahost:subnetId {subnet_id} cannot be found",
        "name a subnet of aws:region, or unset it to create a private network",
    )
    return SubnetFacts(
        subnet_id=subnet_id,
        vpc_id=str(result.vpc_id),
        availability_zone=str(result.availability_zone),
        cidr_block=str(result.cidr_block),
        map_public_ip_on_launch=bool(result.map_public_ip_on_launch),
    )


def lookup_fleet_database_group(group_id: str) -> SecurityGroupFacts:
    """The fleet study store's security group (``llamahost:fleetDatabaseSecurityGroup``), by ID."""
    result = _asked(
        lambda: aws.ec2.get_security_group(id=group_id),
        f"llamahost:fleetDatabaseSecurityGroup {group_id} cannot be found",
        "name the database's security group by its ID in aws:region (`aws ec2 describe-security-groups "
        "--filters Name=group-name,Values=NAME` prints it), or unset it",
    )
    return SecurityGroupFacts(group_id=group_id, vpc_id=str(result.vpc_id), name=str(result.name or ""))


def offered_zones(instance_type: str) -> tuple[str, ...]:
    """Availability zones of the region that offer ``instance_type`` (newer types are not in every zone)."""
    result = aws.ec2.get_instance_type_offerings(
        filters=[aws.ec2.GetInstanceTypeOfferingsFilterArgs(name="instance-type", values=[instance_type])],
        location_type="availability-zone",
    )
    return tuple(sorted(str(zone) for zone in result.locations))


def lookup_partition() -> PartitionFacts:
    result = aws.get_partition()
    return PartitionFacts(partition=str(result.partition), dns_suffix=str(result.dns_suffix))

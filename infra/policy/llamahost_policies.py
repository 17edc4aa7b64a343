"""llamahost's security policies for Pulumi CrossGuard, as plain functions over resource properties.

Each ``check_*`` function takes a resource type and its input properties (the engine's camelCase names,
exactly what a policy pack receives) and returns the violations as sentences; the ``ResourceValidation
Policy`` wrappers in :data:`POLICIES` hand them to Pulumi. Plain functions keep them testable without the
Pulumi CLI, and let the mock tests run every policy over every resource the real program creates.

They guard the defaults of ``CpuInferenceHost`` against later edits and against other programs run with
this pack: IMDSv2 only, encrypted EBS, no ingress from the whole internet, egress to the whole internet
only on TCP 80 and 443 (every other destination, such as the fleet's PostgreSQL, is named by its security
group), no public IP on a host, and no administrator-level IAM.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from pulumi_policy import EnforcementLevel, ReportViolation, ResourceValidationArgs, ResourceValidationPolicy

INSTANCE = "aws:ec2/instance:Instance"
LAUNCH_TEMPLATE = "aws:ec2/launchTemplate:LaunchTemplate"
VOLUME = "aws:ebs/volume:Volume"
SECURITY_GROUP = "aws:ec2/securityGroup:SecurityGroup"
SECURITY_GROUP_RULE = "aws:ec2/securityGroupRule:SecurityGroupRule"
INGRESS_RULE = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
EGRESS_RULE = "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule"
SUBNET = "aws:ec2/subnet:Subnet"
EIP = "aws:ec2/eip:Eip"
EIP_ASSOCIATION = "aws:ec2/eipAssociation:EipAssociation"
ROLE_POLICY_ATTACHMENT = "aws:iam/rolePolicyAttachment:RolePolicyAttachment"
ROLE_POLICY = "aws:iam/rolePolicy:RolePolicy"
IAM_POLICY = "aws:iam/policy:Policy"
ROLE = "aws:iam/role:Role"

WORLD = frozenset({"0.0.0.0/0", "::/0"})
# The only ports the hosts may reach on any address: package mirrors (HTTP) and SSM, S3, HTTPS.
WEB_PORTS = frozenset({80, 443})
TCP = frozenset({"tcp", "6"})
ADMIN_POLICIES = ("AdministratorAccess", "PowerUserAccess", "IAMFullAccess")

Props = Mapping[str, Any]


def _list(value: Any) -> list[Any]:
    """A property that may be one value or many, as a list. The policy pack hands lists over as read-only
    ``Sequence`` proxies (which raise on values unknown during preview), not as ``list``."""
    if value is None:
        return []
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return list(value)
    return [value]


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() == "true")


def check_imdsv2(resource_type: str, props: Props) -> list[str]:
    """Instances and launch templates must require IMDSv2 session tokens (the default allows IMDSv1)."""
    if resource_type not in (INSTANCE, LAUNCH_TEMPLATE):
        return []
    tokens = (props.get("metadataOptions") or {}).get("httpTokens")
    if tokens != "required":
        return [f"metadataOptions.httpTokens is {tokens!r}: set it to 'required' (IMDSv2 only)"]
    return []


def check_ebs_encryption(resource_type: str, props: Props) -> list[str]:
    """Root and data volumes must be encrypted (EBS defaults to unencrypted unless the account says so)."""
    out = []
    if resource_type == INSTANCE:
        if not _truthy((props.get("rootBlockDevice") or {}).get("encrypted")):
            out.append("rootBlockDevice.encrypted is not true")
        for device in _list(props.get("ebsBlockDevices")):
            if not _truthy(device.get("encrypted")):
                out.append(f"ebsBlockDevices {device.get('deviceName', '?')} is not encrypted")
    elif resource_type == VOLUME:
        if not _truthy(props.get("encrypted")):
            out.append("encrypted is not true")
    elif resource_type == LAUNCH_TEMPLATE:
        for mapping in _list(props.get("blockDeviceMappings")):
            if not _truthy((mapping.get("ebs") or {}).get("encrypted")):
                out.append(f"blockDeviceMappings {mapping.get('deviceName', '?')} is not encrypted")
    return out


def _ports(rule: Props) -> str:
    """``22-22`` however the engine typed the numbers (protobuf makes every number a float)."""

    def port(value: Any) -> str:
        return str(int(value)) if isinstance(value, int | float) else str(value)

    return f"{port(rule.get('fromPort'))}-{port(rule.get('toPort'))}"


def _world_cidrs(rule: Props, keys: Sequence[str]) -> list[str]:
    return sorted({cidr for key in keys for cidr in _list(rule.get(key)) if cidr in WORLD})


def check_no_public_ingress(resource_type: str, props: Props) -> list[str]:
    """No ingress rule may admit 0.0.0.0/0 or ::/0 (inline rules, rule resources, and VPC rule resources)."""
    out = []
    if resource_type == SECURITY_GROUP:
        for rule in _list(props.get("ingress")):
            world = _world_cidrs(rule, ("cidrBlocks", "ipv6CidrBlocks"))
            if world:
                out.append(f"ingress {_ports(rule)} from {', '.join(world)}")
    elif resource_type == SECURITY_GROUP_RULE and props.get("type") == "ingress":
        world = _world_cidrs(props, ("cidrBlocks", "ipv6CidrBlocks"))
        if world:
            out.append(f"ingress {_ports(props)} from {', '.join(world)}")
    elif resource_type == INGRESS_RULE:
        world = _world_cidrs(props, ("cidrIpv4", "cidrIpv6"))
        if world:
            out.append(f"ingress {_ports(props)} from {', '.join(world)}")
    return out


def _web_only(rule: Props, protocol_key: str) -> bool:
    """TCP to exactly port 80 or exactly port 443 (a range such as 80-443 is not)."""

    def port(value: Any) -> int | None:
        return int(value) if isinstance(value, int | float) else None

    low, high = port(rule.get("fromPort")), port(rule.get("toPort"))
    return str(rule.get(protocol_key, "")).lower() in TCP and low == high and low in WEB_PORTS


def check_egress_to_the_world_is_web_only(resource_type: str, props: Props) -> list[str]:
    """Egress to 0.0.0.0/0 or ::/0 only on TCP 80 and 443; any other port (PostgreSQL's 5432, all traffic)
    must name its destination, by security group or by a narrower network."""
    rules: list[tuple[Props, Sequence[str], str]] = []
    if resource_type == SECURITY_GROUP:
        rules = [(rule, ("cidrBlocks", "ipv6CidrBlocks"), "protocol") for rule in _list(props.get("egress"))]
    elif resource_type == SECURITY_GROUP_RULE and props.get("type") == "egress":
        rules = [(props, ("cidrBlocks", "ipv6CidrBlocks"), "protocol")]
    elif resource_type == EGRESS_RULE:
        rules = [(props, ("cidrIpv4", "cidrIpv6"), "ipProtocol")]
    out = []
    for rule, keys, protocol_key in rules:
        world = _world_cidrs(rule, keys)
        if world and not _web_only(rule, protocol_key):
            out.append(
                f"egress {rule.get(protocol_key)} {_ports(rule)} to {', '.join(world)}: only TCP 80 and 443 "
                "may go to every address; name the destination's security group instead"
            )
    return out


def check_no_public_ip(resource_type: str, props: Props) -> list[str]:
    """Hosts get no public address: not at launch, not from their subnet, not through an Elastic IP."""
    if resource_type == INSTANCE and _truthy(props.get("associatePublicIpAddress")):
        return ["associatePublicIpAddress is true"]
    if resource_type == INSTANCE and "associatePublicIpAddress" not in props:
        return ["associatePublicIpAddress is not set: the subnet's default could give the host a public IP"]
    if resource_type == SUBNET and _truthy(props.get("mapPublicIpOnLaunch")):
        return ["mapPublicIpOnLaunch is true: every instance launched here gets a public IP"]
    if resource_type == EIP and (props.get("instance") or props.get("networkInterface")):
        return ["an Elastic IP is attached to an instance or network interface"]
    if resource_type == EIP_ASSOCIATION:
        return ["an Elastic IP association gives a host a public address"]
    if resource_type == LAUNCH_TEMPLATE:
        for interface in _list(props.get("networkInterfaces")):
            if _truthy(interface.get("associatePublicIpAddress")):
                return ["networkInterfaces.associatePublicIpAddress is true"]
    return []


def _statements(document: Any) -> list[Props]:
    if isinstance(document, str):
        try:
            document = json.loads(document)
        except json.JSONDecodeError:
            return []
    if not isinstance(document, Mapping):
        return []
    return [s for s in _list(document.get("Statement")) if isinstance(s, Mapping)]


def check_least_privilege(resource_type: str, props: Props) -> list[str]:
    """No administrator-level managed policies; no inline statement that allows every action on everything."""
    out = []
    if resource_type == ROLE_POLICY_ATTACHMENT:
        arn = str(props.get("policyArn", ""))
        if arn.rsplit("/", 1)[-1] in ADMIN_POLICIES:
            out.append(f"attaches {arn}")
    documents: list[Any] = []
    if resource_type in (ROLE_POLICY, IAM_POLICY):
        documents.append(props.get("policy"))
    if resource_type == ROLE:
        documents.extend(p.get("policy") for p in _list(props.get("inlinePolicies")))
    for document in documents:
        for statement in _statements(document):
            actions = _list(statement.get("Action"))
            resources = _list(statement.get("Resource"))
            everything = any(a == "*" or str(a).endswith(":*") for a in actions) and "*" in resources
            if statement.get("Effect") == "Allow" and everything:
                sid = statement.get("Sid")
                label = f"statement {sid!r}" if sid else "a statement"
                out.append(f"{label} allows {', '.join(map(str, actions))} on every resource")
    return out


Check = Callable[[str, Props], list[str]]

CHECKS: dict[str, tuple[Check, str]] = {
    "llamahost-imdsv2-required": (check_imdsv2, "EC2 instances require IMDSv2 session tokens"),
    "llamahost-ebs-encrypted": (check_ebs_encryption, "Root and data EBS volumes are encrypted"),
    "llamahost-no-public-ingress": (
        check_no_public_ingress,
        "No security group ingress from 0.0.0.0/0 or ::/0",
    ),
    "llamahost-egress-web-only": (
        check_egress_to_the_world_is_web_only,
        "Security group egress to 0.0.0.0/0 or ::/0 only on TCP 80 and 443",
    ),
    "llamahost-no-public-ip": (check_no_public_ip, "Inference hosts have no public IP address"),
    "llamahost-least-privilege-iam": (check_least_privilege, "No administrator-level IAM grants"),
}


def violations(resource_type: str, props: Props, checks: Iterable[str] | None = None) -> dict[str, list[str]]:
    """Every violation of ``resource_type``/``props``, by policy name (only policies that found one)."""
    found = {}
    for name in checks or CHECKS:
        problems = CHECKS[name][0](resource_type, props)
        if problems:
            found[name] = problems
    return found


def _policy(name: str, check: Check, description: str) -> ResourceValidationPolicy:
    def validate(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
        for problem in check(args.resource_type, args.props):
            report_violation(f"{args.name}: {problem}", None)

    return ResourceValidationPolicy(
        name=name, description=description, validate=validate, enforcement_level=EnforcementLevel.MANDATORY
    )


POLICIES: list[ResourceValidationPolicy] = [
    _policy(name, check, description) for name, (check, description) in CHECKS.items()
]

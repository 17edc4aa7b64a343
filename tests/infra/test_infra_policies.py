"""The policy pack's checks on good and bad resources, and their wiring into pulumi_policy."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from infra_mocks import EXISTING_SUBNET, FLEET_DB_GROUP, INFRA_DIR
from llamahost_policies import (
    CHECKS,
    POLICIES,
    check_ebs_encryption,
    check_egress_to_the_world_is_web_only,
    check_imdsv2,
    check_least_privilege,
    check_no_public_ingress,
    check_no_public_ip,
    violations,
)
from pulumi_policy import EnforcementLevel, PolicyCustomTimeouts, PolicyResourceOptions, ResourceValidationArgs

INSTANCE = "aws:ec2/instance:Instance"
GOOD_INSTANCE: dict[str, Any] = {
    "metadataOptions": {"httpTokens": "required"},
    "associatePublicIpAddress": False,
    "rootBlockDevice": {"encrypted": True, "volumeType": "gp3"},
    "ebsBlockDevices": [{"deviceName": "/dev/sdf", "encrypted": True}],
}


def bad(**changes: Any) -> dict[str, Any]:
    return {**GOOD_INSTANCE, **changes}


SECURITY_GROUP = "aws:ec2/securityGroup:SecurityGroup"
EGRESS_RULE = "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule"
WEB_EGRESS = [
    {"protocol": "tcp", "fromPort": 80, "toPort": 80, "cidrBlocks": ["0.0.0.0/0"]},
    {"protocol": "tcp", "fromPort": 443, "toPort": 443, "cidrBlocks": ["0.0.0.0/0"]},
]
# The rule llamahost:fleetDatabaseSecurityGroup adds: PostgreSQL to the database's group, not to an address range.
FLEET_DB_EGRESS = {"protocol": "tcp", "fromPort": 5432, "toPort": 5432, "securityGroups": [FLEET_DB_GROUP]}


@pytest.mark.parametrize(
    ("check", "resource_type", "props", "expected"),
    [
        # IMDSv2
        (check_imdsv2, INSTANCE, GOOD_INSTANCE, []),
        (check_imdsv2, INSTANCE, bad(metadataOptions={"httpTokens": "optional"}), ["'optional'"]),
        (
            check_imdsv2,
            INSTANCE,
            {k: v for k, v in GOOD_INSTANCE.items() if k != "metadataOptions"},
            ["None"],
        ),
        (check_imdsv2, "aws:ec2/launchTemplate:LaunchTemplate", {"metadataOptions": {}}, ["None"]),
        (check_imdsv2, "aws:s3/bucket:Bucket", {}, []),
        # encryption
        (check_ebs_encryption, INSTANCE, GOOD_INSTANCE, []),
        (check_ebs_encryption, INSTANCE, bad(rootBlockDevice={"volumeType": "gp3"}), ["rootBlockDevice"]),
        (
            check_ebs_encryption,
            INSTANCE,
            bad(ebsBlockDevices=[{"deviceName": "/dev/sdf", "encrypted": False}]),
            ["/dev/sdf"],
        ),
        (check_ebs_encryption, "aws:ebs/volume:Volume", {"encrypted": True}, []),
        (check_ebs_encryption, "aws:ebs/volume:Volume", {}, ["encrypted is not true"]),
        (
            check_ebs_encryption,
            "aws:ec2/launchTemplate:LaunchTemplate",
            {"blockDeviceMappings": [{"deviceName": "/dev/xvda", "ebs": {"encrypted": "false"}}]},
            ["/dev/xvda"],
        ),
        # public ingress
        (
            check_no_public_ingress,
            "aws:ec2/securityGroup:SecurityGroup",
            {"ingress": [{"fromPort": 8080, "toPort": 8080, "securityGroups": ["sg-1"]}]},
            [],
        ),
        (
            check_no_public_ingress,
            "aws:ec2/securityGroup:SecurityGroup",
            {"ingress": [{"fromPort": 22, "toPort": 22, "cidrBlocks": ["10.0.0.0/8", "0.0.0.0/0"]}]},
            ["22-22"],
        ),
        (
            check_no_public_ingress,
            "aws:ec2/securityGroup:SecurityGroup",
            {"ingress": [{"fromPort": 0, "toPort": 65535, "ipv6CidrBlocks": ["::/0"]}]},
            ["::/0"],
        ),
        (
            check_no_public_ingress,
            "aws:ec2/securityGroup:SecurityGroup",
            {"egress": [{"fromPort": 443, "toPort": 443, "cidrBlocks": ["0.0.0.0/0"]}]},
            [],
        ),  # egress is fine
        (
            check_no_public_ingress,
            "aws:ec2/securityGroupRule:SecurityGroupRule",
            {"type": "ingress", "fromPort": 8080, "toPort": 8080, "cidrBlocks": ["0.0.0.0/0"]},
            ["8080"],
        ),
        (
            check_no_public_ingress,
            "aws:ec2/securityGroupRule:SecurityGroupRule",
            {"type": "egress", "fromPort": 443, "toPort": 443, "cidrBlocks": ["0.0.0.0/0"]},
            [],
        ),
        (
            check_no_public_ingress,
            "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule",
            {"fromPort": 8080, "toPort": 8080, "cidrIpv4": "0.0.0.0/0"},
            ["0.0.0.0/0"],
        ),
        # egress to every address: TCP 80 and 443 only; the fleet's database by its group
        (check_egress_to_the_world_is_web_only, SECURITY_GROUP, {"egress": WEB_EGRESS}, []),
        (check_egress_to_the_world_is_web_only, SECURITY_GROUP, {"egress": [*WEB_EGRESS, FLEET_DB_EGRESS]}, []),
        (
            check_egress_to_the_world_is_web_only,
            SECURITY_GROUP,
            {"egress": [*WEB_EGRESS, {**FLEET_DB_EGRESS, "securityGroups": [], "cidrBlocks": ["0.0.0.0/0"]}]},
            ["egress tcp 5432-5432 to 0.0.0.0/0"],
        ),
        (
            check_egress_to_the_world_is_web_only,
            SECURITY_GROUP,
            {"egress": [{**FLEET_DB_EGRESS, "ipv6CidrBlocks": ["::/0"]}]},
            ["5432-5432 to ::/0"],
        ),
        (
            check_egress_to_the_world_is_web_only,
            SECURITY_GROUP,
            {"egress": [{"protocol": "tcp", "fromPort": 5432, "toPort": 5432, "cidrBlocks": ["10.8.0.0/20"]}]},
            [],
        ),  # a named network is not every address
        (
            check_egress_to_the_world_is_web_only,
            SECURITY_GROUP,
            {"egress": [{"protocol": "-1", "fromPort": 0, "toPort": 0, "cidrBlocks": ["0.0.0.0/0"]}]},
            ["egress -1 0-0"],
        ),  # all traffic (AWS's default egress)
        (
            check_egress_to_the_world_is_web_only,
            SECURITY_GROUP,
            {"egress": [{"protocol": "udp", "fromPort": 443, "toPort": 443, "cidrBlocks": ["0.0.0.0/0"]}]},
            ["udp 443-443"],
        ),
        (
            check_egress_to_the_world_is_web_only,
            SECURITY_GROUP,
            {"egress": [{"protocol": "tcp", "fromPort": 80, "toPort": 443, "cidrBlocks": ["0.0.0.0/0"]}]},
            ["80-443"],
        ),  # a range holds 5432's neighbours too
        (
            check_egress_to_the_world_is_web_only,
            SECURITY_GROUP,
            {"ingress": [{"protocol": "tcp", "fromPort": 5432, "toPort": 5432, "cidrBlocks": ["10.0.0.0/8"]}]},
            [],
        ),  # ingress is the other policy's
        (
            check_egress_to_the_world_is_web_only,
            "aws:ec2/securityGroupRule:SecurityGroupRule",
            {"type": "egress", "protocol": "tcp", "fromPort": 5432, "toPort": 5432, "cidrBlocks": ["0.0.0.0/0"]},
            ["5432-5432 to 0.0.0.0/0"],
        ),
        (
            check_egress_to_the_world_is_web_only,
            "aws:ec2/securityGroupRule:SecurityGroupRule",
            {"type": "egress", "protocol": "tcp", "fromPort": 5432, "toPort": 5432, "sourceSecurityGroupId": "sg-1"},
            [],
        ),
        (
            check_egress_to_the_world_is_web_only,
            EGRESS_RULE,
            {"ipProtocol": "tcp", "fromPort": 5432, "toPort": 5432, "cidrIpv4": "0.0.0.0/0"},
            ["5432-5432 to 0.0.0.0/0"],
        ),
        (
            check_egress_to_the_world_is_web_only,
            EGRESS_RULE,
            {"ipProtocol": "tcp", "fromPort": 5432, "toPort": 5432, "referencedSecurityGroupId": "sg-1"},
            [],
        ),
        (
            check_egress_to_the_world_is_web_only,
            EGRESS_RULE,
            {"ipProtocol": "tcp", "fromPort": 443, "toPort": 443, "cidrIpv4": "0.0.0.0/0"},
            [],
        ),
        # public IP
        (check_no_public_ip, INSTANCE, GOOD_INSTANCE, []),
        (
            check_no_public_ip,
            INSTANCE,
            bad(associatePublicIpAddress=True),
            ["associatePublicIpAddress is true"],
        ),
        (
            check_no_public_ip,
            INSTANCE,
            {k: v for k, v in GOOD_INSTANCE.items() if k != "associatePublicIpAddress"},
            ["not set"],
        ),
        (check_no_public_ip, "aws:ec2/subnet:Subnet", {"mapPublicIpOnLaunch": True}, ["mapPublicIpOnLaunch"]),
        (check_no_public_ip, "aws:ec2/subnet:Subnet", {"mapPublicIpOnLaunch": False}, []),
        (check_no_public_ip, "aws:ec2/eip:Eip", {"domain": "vpc"}, []),  # a NAT gateway's address
        (check_no_public_ip, "aws:ec2/eip:Eip", {"domain": "vpc", "instance": "i-1"}, ["Elastic IP"]),
        # IAM
        (
            check_least_privilege,
            "aws:iam/rolePolicyAttachment:RolePolicyAttachment",
            {"policyArn": "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"},
            [],
        ),
        (
            check_least_privilege,
            "aws:iam/rolePolicyAttachment:RolePolicyAttachment",
            {"policyArn": "arn:aws:iam::aws:policy/AdministratorAccess"},
            ["AdministratorAccess"],
        ),
        (
            check_least_privilege,
            "aws:iam/rolePolicy:RolePolicy",
            {"policy": json.dumps({"Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]})},
            ["s3:*"],
        ),
        (
            check_least_privilege,
            "aws:iam/rolePolicy:RolePolicy",
            {
                "policy": json.dumps(
                    {
                        "Statement": [
                            {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::m/*"}
                        ]
                    }
                )
            },
            [],
        ),
        (
            check_least_privilege,
            "aws:iam/role:Role",
            {
                "inlinePolicies": [
                    {
                        "policy": json.dumps(
                            {
                                "Statement": [
                                    {"Sid": "All", "Effect": "Allow", "Action": "*", "Resource": ["*"]}
                                ]
                            }
                        )
                    }
                ]
            },
            ["'All'"],
        ),
    ],
)
def test_checks_on_good_and_bad_resources(
    check: Any, resource_type: str, props: dict[str, Any], expected: list[str]
) -> None:
    problems = check(resource_type, props)
    assert len(problems) == len(expected), problems
    for problem, fragment in zip(problems, expected, strict=True):
        assert fragment in problem


def test_violations_names_the_policy() -> None:
    found = violations(INSTANCE, bad(associatePublicIpAddress=True, metadataOptions={}))
    assert set(found) == {"llamahost-imdsv2-required", "llamahost-no-public-ip"}
    assert violations(INSTANCE, GOOD_INSTANCE) == {}


def test_policies_report_through_pulumi_policy() -> None:
    assert [p.name for p in POLICIES] == list(CHECKS)
    assert all(p.enforcement_level == EnforcementLevel.MANDATORY for p in POLICIES)
    by_name = {p.name: p for p in POLICIES}
    reported: list[str] = []

    def report(message: str, urn: str | None = None) -> None:
        reported.append(message)

    # A resource with no options set: the checks read only the type, props and name.
    no_opts = PolicyResourceOptions(
        protect=False,
        ignore_changes=[],
        delete_before_replace=None,
        aliases=[],
        custom_timeouts=PolicyCustomTimeouts(create_seconds=0, update_seconds=0, delete_seconds=0),
        additional_secret_outputs=[],
    )
    args = ResourceValidationArgs(
        resource_type=INSTANCE,
        props=bad(metadataOptions={"httpTokens": "optional"}),
        urn="urn:pulumi:dev::llamahost::aws:ec2/instance:Instance::host-0",
        name="host-0",
        opts=no_opts,
        provider=None,
    )
    validate = by_name["llamahost-imdsv2-required"].validate
    assert callable(validate)
    validate(args, report)
    assert reported == [
        "host-0: metadataOptions.httpTokens is 'optional': set it to 'required' (IMDSv2 only)"
    ]
    reported.clear()
    good = ResourceValidationArgs(
        resource_type=INSTANCE, props=GOOD_INSTANCE, urn="urn", name="host-0", opts=no_opts, provider=None
    )
    for policy in POLICIES:
        assert callable(policy.validate)
        policy.validate(good, report)
    assert reported == []


def test_the_pack_entry_point_registers_every_policy() -> None:
    """`__main__.py` starts a gRPC server when run, so it is read, not imported."""
    tree = ast.parse((INFRA_DIR / "policy" / "__main__.py").read_text())
    calls = [
        n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "PolicyPack"
    ]
    (call,) = calls
    keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
    assert keywords["policies"] == "list(POLICIES)"
    assert keywords["enforcement_level"] == "EnforcementLevel.MANDATORY"


# ---- the pack as the Pulumi CLI runs it: a gRPC analyzer server ----------------------------------------


@pytest.fixture(scope="module")
def analyzer() -> Iterator[Any]:
    """Start infra/policy/__main__.py the way the CLI does and talk to it over the Analyzer gRPC API."""
    import grpc
    from pulumi.runtime.proto import analyzer_pb2_grpc

    process = subprocess.Popen([sys.executable, "__main__.py"], cwd=INFRA_DIR / "policy",
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        port = process.stdout.readline().strip()
        assert port.isdigit(), process.stderr.read() if process.stderr else port
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=30)
        yield analyzer_pb2_grpc.AnalyzerStub(channel)
        channel.close()
    finally:
        process.terminate()
        process.wait(timeout=30)


def analyze(stub: Any, resource_type: str, props: dict[str, Any], name: str = "r") -> list[tuple[str, str]]:
    from google.protobuf import json_format, struct_pb2
    from pulumi.runtime import proto

    properties = struct_pb2.Struct()
    json_format.ParseDict(json.loads(json.dumps(props)), properties)
    request = proto.AnalyzeRequest(type=resource_type, properties=properties, name=name,
                                   urn=f"urn:pulumi:test::llamahost::{resource_type}::{name}")
    return [(d.policyName, d.message) for d in stub.Analyze(request).diagnostics]


def test_the_served_pack_rejects_bad_resources(analyzer: Any) -> None:
    group = {"ingress": [{"protocol": "tcp", "fromPort": 22, "toPort": 22, "cidrBlocks": ["0.0.0.0/0"]},
                         {"protocol": "tcp", "fromPort": 8080, "toPort": 8080, "securityGroups": ["sg-1"]}]}
    found = analyze(analyzer, "aws:ec2/securityGroup:SecurityGroup", group, name="open")
    assert [policy for policy, _ in found] == ["llamahost-no-public-ingress"]
    assert "ingress 22-22 from 0.0.0.0/0" in found[0][1]
    instance = bad(metadataOptions={"httpTokens": "optional"}, associatePublicIpAddress=True,
                   ebsBlockDevices=[{"deviceName": "/dev/sdf", "encrypted": False}])
    found = analyze(analyzer, INSTANCE, instance)
    assert sorted(policy for policy, _ in found) == ["llamahost-ebs-encrypted", "llamahost-imdsv2-required",
                                                    "llamahost-no-public-ip"]


def test_the_served_pack_refuses_postgresql_to_every_address_and_accepts_it_to_the_database_group(
    analyzer: Any,
) -> None:
    """The fleet's study store is reached by its security group; 0.0.0.0/0 on 5432 stays refused."""
    wide = {"egress": [*WEB_EGRESS, {**FLEET_DB_EGRESS, "securityGroups": [], "cidrBlocks": ["0.0.0.0/0"]}]}
    found = analyze(analyzer, SECURITY_GROUP, wide, name="hosts")
    assert [policy for policy, _ in found] == ["llamahost-egress-web-only"]
    assert "hosts: egress tcp 5432-5432 to 0.0.0.0/0" in found[0][1]
    assert analyze(analyzer, SECURITY_GROUP, {"egress": [*WEB_EGRESS, FLEET_DB_EGRESS]}) == []


@pytest.mark.parametrize(
    "extra",
    [
        {"modelS3Uri": "s3://acme-models/m/"},
        {"subnetId": EXISTING_SUBNET, "fleetDatabaseSecurityGroup": FLEET_DB_GROUP},
    ],
    ids=["model-grant", "fleet-database"],
)
def test_the_served_pack_accepts_every_resource_of_the_program(analyzer: Any, extra: dict[str, str]) -> None:
    from infra_mocks import BASE_CONFIG, deploy

    run = deploy({**BASE_CONFIG, **extra})
    for record in run.mocks.resources:
        assert analyze(analyzer, record.typ, record.inputs, record.name) == [], record.name


def test_the_served_pack_works_during_preview_when_ids_are_unknown(analyzer: Any) -> None:
    """In a preview the new client group's ID is unknown; the checks must not need it."""
    from pulumi_policy.proxy import UNKNOWN_STRING_VALUE

    group = {"ingress": [{"protocol": "tcp", "fromPort": 8080, "toPort": 8080,
                          "securityGroups": [UNKNOWN_STRING_VALUE]}], "vpcId": UNKNOWN_STRING_VALUE}
    assert analyze(analyzer, "aws:ec2/securityGroup:SecurityGroup", group) == []
    instance = {**GOOD_INSTANCE, "subnetId": UNKNOWN_STRING_VALUE, "iamInstanceProfile": UNKNOWN_STRING_VALUE}
    assert analyze(analyzer, INSTANCE, instance) == []

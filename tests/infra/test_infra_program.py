"""The real Pulumi program (infra/__main__.py) under mocks: secure defaults, sizing, CPU options,
volumes, network, IAM, tags, outputs, the inventory, and every configuration error."""

from __future__ import annotations

import base64
import json
import logging
import runpy
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pulumi
import pytest
from infra_mocks import (
    ARM_AMI,
    BASE_CONFIG,
    EXISTING_SUBNET,
    EXISTING_VPC,
    FLEET_DB_GROUP,
    FLEET_DB_GROUP_ELSEWHERE,
    INFRA_DIR,
    LLAMA_70B,
    X86_AMI,
    CatalogBackedAws,
    Deployment,
    deploy,
)
from llamahost_policies import violations
from ruamel.yaml import YAML

from tuner.config import RunConfig

ROLE_FILTERS = Path(__file__).resolve().parents[2] / "plugins" / "filter"

INSTANCE = "aws:ec2/instance:Instance"
SECURITY_GROUP = "aws:ec2/securityGroup:SecurityGroup"
BASE = BASE_CONFIG
INTEL = {"amiId": X86_AMI, "modelParams": LLAMA_70B, "instanceType": "r7i.24xlarge"}
# Hosts in the database's VPC, allowed to reach its PostgreSQL study store (docs/fleet.md).
FLEET = {**BASE, "subnetId": EXISTING_SUBNET, "fleetDatabaseSecurityGroup": FLEET_DB_GROUP}


@pytest.fixture(scope="module")
def default() -> Deployment:
    return deploy(BASE)


def instances(run: Deployment) -> list[dict[str, Any]]:
    return [r.inputs for r in run.resources(INSTANCE)]


def group_named(run: Deployment, suffix: str) -> dict[str, Any]:
    matches = [r for r in run.resources(SECURITY_GROUP) if r.name.endswith(suffix)]
    assert len(matches) == 1, [r.name for r in run.resources(SECURITY_GROUP)]
    return matches[0].inputs


# ---- sizing and the instance ----------------------------------------------------------------------------


def test_the_sizing_engine_chooses_the_type(default: Deployment) -> None:
    (host,) = instances(default)
    assert host["instanceType"] == "c8g.24xlarge"
    sizing = default.outputs["sizing"]
    assert sizing["instance_type"] == "c8g.24xlarge"
    assert "smallest size that owns a whole socket" in sizing["reason"]
    assert sizing["memory_needed_gib"] == pytest.approx(49.0, abs=0.01)
    assert sizing["predicted_tg_tokens_per_second"] == pytest.approx(7.31, abs=0.01)


def test_instance_secure_defaults(default: Deployment) -> None:
    (host,) = instances(default)
    assert host["ami"] == ARM_AMI  # pinned, exactly as configured
    (ami_lookup,) = [args for token, args in default.mocks.calls if token == "aws:ec2/getAmi:getAmi"]
    assert ami_lookup == {"filters": [{"name": "image-id", "values": [ARM_AMI]}]}  # by ID: no most_recent
    assert host["metadataOptions"] == {
        "httpEndpoint": "enabled",
        "httpTokens": "required",
        "httpPutResponseHopLimit": 1,
        "instanceMetadataTags": "disabled",
    }
    assert host["associatePublicIpAddress"] is False
    assert "keyName" not in host  # SSM, not SSH
    assert host["iamInstanceProfile"] == "llamahost-test-profile"
    root = host["rootBlockDevice"]
    assert (root["volumeType"], root["encrypted"], root["volumeSize"]) == ("gp3", True, 30)
    (data,) = host["ebsBlockDevices"]
    # 42.8 GB model: ceil(1.25 x 39.86 GiB) + 16 = 66 GiB; 1000 MiB/s needs 4000 IOPS.
    assert (data["volumeType"], data["encrypted"], data["volumeSize"]) == ("gp3", True, 66)
    assert (data["throughput"], data["iops"]) == (1000, 4000)
    assert "cpuOptions" not in host  # Graviton already runs one thread per core


def test_user_data_makes_the_host_ready_for_ansible(default: Deployment) -> None:
    (host,) = instances(default)
    user_data = base64.b64decode(host["userDataBase64"]).decode()
    assert user_data.startswith("#cloud-config\n")
    document = YAML(typ="safe").load(user_data)
    assert document["packages"] == ["python3", "python3-botocore"]
    assert document["runcmd"] == [["/usr/local/sbin/llamahost-data-volume", "/srv/models"]]
    assert "ssh_authorized_keys" not in document
    assert host["tags"]["llamahost:user-data-sha256"]


def test_tags_name_the_stack_and_model(default: Deployment) -> None:
    (host,) = instances(default)
    assert host["tags"]["Name"] == "llamahost-test-0"
    assert host["tags"]["llamahost:stack"] == "test"
    assert host["tags"]["llamahost:model"] == "Llama-3.1-70B Q4_K_M"
    assert host["tags"]["ManagedBy"] == "pulumi"
    assert host["volumeTags"]["llamahost:role"] == "inference"
    tagged = deploy({**BASE, "tags": {"team": "ml", "cost-center": "42"}})
    for record in tagged.mocks.resources:
        if "tags" in record.inputs:
            assert record.inputs["tags"]["team"] == "ml", record.name


# ---- network access ----------------------------------------------------------------------------------


def test_server_port_only_from_the_client_group_and_no_ssh(default: Deployment) -> None:
    hosts_group = group_named(default, "-hosts")
    (rule,) = hosts_group["ingress"]
    assert (rule["protocol"], rule["fromPort"], rule["toPort"]) == ("tcp", 8080, 8080)
    assert "cidrBlocks" not in rule and len(rule["securityGroups"]) == 1
    assert {(e["fromPort"], tuple(e["cidrBlocks"])) for e in hosts_group["egress"]} == {
        (80, ("0.0.0.0/0",)),
        (443, ("0.0.0.0/0",)),
    }
    clients = group_named(default, "-clients")
    # Its egress is the one separate rule: an inline list beside it would claim (and after a refresh delete) it.
    assert clients["ingress"] == [] and "egress" not in clients
    (client_egress,) = [
        r.inputs for r in default.resources("aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule")
    ]
    assert (client_egress["fromPort"], client_egress["toPort"]) == (8080, 8080)


def test_an_existing_client_group_is_used_as_is() -> None:
    run = deploy({**BASE, "clientSecurityGroupId": "sg-0aaaabbbbccccdddd", "serverPort": "9000"})
    (rule,) = group_named(run, "-hosts")["ingress"]
    assert rule["securityGroups"] == ["sg-0aaaabbbbccccdddd"]
    assert rule["fromPort"] == 9000
    assert not [r for r in run.resources(SECURITY_GROUP) if r.name.endswith("-clients")]
    assert run.outputs["client_security_group_id"] == "sg-0aaaabbbbccccdddd"


def test_the_fleet_database_group_is_reachable_on_its_port_only() -> None:
    """One more egress rule on the hosts' group: TCP 5432 to the database's group, by reference, not CIDR;
    everything else as without the setting."""
    run = deploy(FLEET)
    egress = group_named(run, "-hosts")["egress"]
    (rule,) = [e for e in egress if "securityGroups" in e]
    assert (rule["protocol"], rule["fromPort"], rule["toPort"]) == ("tcp", 5432, 5432)
    assert rule["securityGroups"] == [FLEET_DB_GROUP]
    assert "cidrBlocks" not in rule and "ipv6CidrBlocks" not in rule
    assert sorted((e["fromPort"], tuple(e["cidrBlocks"])) for e in egress if e is not rule) == [
        (80, ("0.0.0.0/0",)),
        (443, ("0.0.0.0/0",)),
    ]
    without = deploy({**BASE, "subnetId": EXISTING_SUBNET})
    assert sorted(r.name for r in run.mocks.resources) == sorted(r.name for r in without.mocks.resources)
    lookups = [args for token, args in run.mocks.calls if token == "aws:ec2/getSecurityGroup:getSecurityGroup"]
    assert lookups == [{"id": FLEET_DB_GROUP}]


def test_the_fleet_database_port_is_configurable() -> None:
    run = deploy({**FLEET, "fleetDatabasePort": "6432"})
    (rule,) = [e for e in group_named(run, "-hosts")["egress"] if "securityGroups" in e]
    assert (rule["fromPort"], rule["toPort"], rule["securityGroups"]) == (6432, 6432, [FLEET_DB_GROUP])


def test_without_a_fleet_database_the_hosts_reach_80_and_443_only(default: Deployment) -> None:
    egress = group_named(default, "-hosts")["egress"]
    assert all("securityGroups" not in e for e in egress)
    assert sorted((e["protocol"], e["fromPort"], e["toPort"]) for e in egress) == [
        ("tcp", 80, 80),
        ("tcp", 443, 443),
    ]
    assert not [t for t, _ in default.mocks.calls if t == "aws:ec2/getSecurityGroup:getSecurityGroup"]


def test_a_fleet_database_group_in_another_vpc_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """A peered VPC can hold the database; EC2 is the judge of the peering, so the stack only says so."""
    with caplog.at_level(logging.WARNING):
        run = deploy({**FLEET, "fleetDatabaseSecurityGroup": FLEET_DB_GROUP_ELSEWHERE})
    (rule,) = [e for e in group_named(run, "-hosts")["egress"] if "securityGroups" in e]
    assert rule["securityGroups"] == [FLEET_DB_GROUP_ELSEWHERE]
    warnings = [r.getMessage() for r in caplog.records if "fleetDatabaseSecurityGroup" in r.getMessage()]
    assert len(warnings) == 1
    assert "is in vpc-0fedcba987654321f, the hosts in vpc-0123456789abcdef0" in warnings[0]
    assert "peered" in warnings[0]


def test_new_private_network_with_nat_and_s3_endpoint(default: Deployment) -> None:
    (subnet_private,) = [
        r.inputs for r in default.resources("aws:ec2/subnet:Subnet") if r.name.endswith("private")
    ]
    assert subnet_private["mapPublicIpOnLaunch"] is False
    assert subnet_private["cidrBlock"] == "10.42.0.0/17"
    assert subnet_private["availabilityZone"] == "us-east-1a"
    assert len(default.resources("aws:ec2/natGateway:NatGateway")) == 1
    (endpoint,) = [r.inputs for r in default.resources("aws:ec2/vpcEndpoint:VpcEndpoint")]
    assert (endpoint["serviceName"], endpoint["vpcEndpointType"]) == ("com.amazonaws.us-east-1.s3", "Gateway")
    default_group = default.one("aws:ec2/defaultSecurityGroup:DefaultSecurityGroup").inputs
    assert default_group.get("ingress", []) == [] and default_group.get("egress", []) == []


def test_without_nat_ssm_goes_through_interface_endpoints() -> None:
    run = deploy({**BASE, "natGateway": "false", "ssmEndpoints": "true"})
    assert not run.resources("aws:ec2/natGateway:NatGateway")
    assert not run.resources("aws:ec2/internetGateway:InternetGateway")
    assert not run.resources("aws:ec2/eip:Eip")
    services = sorted(
        r.inputs["serviceName"].rsplit(".", 1)[1] for r in run.resources("aws:ec2/vpcEndpoint:VpcEndpoint")
    )
    assert services == ["ec2messages", "s3", "ssm", "ssmmessages"]
    endpoints_group = group_named(run, "-endpoints")
    assert endpoints_group["ingress"][0]["cidrBlocks"] == ["10.42.0.0/16"]


def test_an_existing_subnet_creates_no_network() -> None:
    run = deploy({**BASE, "subnetId": EXISTING_SUBNET})
    assert not run.resources("aws:ec2/vpc:Vpc")
    (host,) = instances(run)
    assert host["subnetId"] == EXISTING_SUBNET
    assert group_named(run, "-hosts")["vpcId"] == EXISTING_VPC
    assert run.outputs["availability_zone"] == "us-east-1b"


# ---- IAM -----------------------------------------------------------------------------------------------


def test_role_is_ssm_core_only_by_default(default: Deployment) -> None:
    role = default.one("aws:iam/role:Role").inputs
    trust = json.loads(role["assumeRolePolicy"])
    assert trust["Statement"] == [
        {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}
    ]
    (attachment,) = [r.inputs for r in default.resources("aws:iam/rolePolicyAttachment:RolePolicyAttachment")]
    assert attachment["policyArn"] == "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"
    assert not default.resources("aws:iam/rolePolicy:RolePolicy")


def test_model_prefix_read_is_granted_and_nothing_more() -> None:
    run = deploy({**BASE, "modelS3Uri": "s3://acme-models/llama-3.1-70b/"})
    policy = json.loads(run.one("aws:iam/rolePolicy:RolePolicy").inputs["policy"])
    read, listing = policy["Statement"]
    assert (read["Action"], read["Resource"]) == ("s3:GetObject", "arn:aws:s3:::acme-models/llama-3.1-70b/*")
    assert listing["Action"] == "s3:ListBucket"
    assert listing["Condition"] == {"StringLike": {"s3:prefix": ["llama-3.1-70b", "llama-3.1-70b/*"]}}
    variables = run.outputs["hosts"][0]["vars"]
    assert variables["llama_server_model_s3_prefix"] == "s3://acme-models/llama-3.1-70b/"
    assert variables["llama_server_model_s3_region"] == "us-east-1"
    assert "llama_server_model_url" not in variables  # no modelFile: the user names the model


def test_the_model_the_stack_names_is_what_the_role_fetches_and_may_read() -> None:
    """modelFile and modelSha256 become the role's model URL and digests, inside the grant: the role's own
    filters (the checks its validation runs) find nothing wrong with them."""
    digests = ["ab" * 32, "cd" * 32]
    run = deploy({**BASE, "modelS3Uri": "s3://acme-models/llama-3.1-70b/",
                  "modelFile": "Llama-3.1-70B-Q4_K_M-00001-of-00002.gguf", "modelSha256": json.dumps(digests)})
    variables = run.outputs["hosts"][0]["vars"]
    url = "s3://acme-models/llama-3.1-70b/Llama-3.1-70B-Q4_K_M-00001-of-00002.gguf"
    assert (variables["llama_server_model_url"], variables["llama_server_model_sha256"]) == (url, digests)
    shards = runpy.run_path(str(ROLE_FILTERS / "model_shards.py"))
    assert shards["model_shard_problems"](url, digests) == []
    assert shards["model_url_problems"](url, variables["llama_server_model_s3_prefix"],
                                        variables["llama_server_model_s3_region"]) == []
    files = shards["model_shards"](url, digests, variables["llama_server_model_dir"])
    version = shards["model_version"](digests)
    assert [f["path"] for f in files] == [f"/srv/models/{version}/Llama-3.1-70B-Q4_K_M-0000{i}-of-00002.gguf"
                                          for i in (1, 2)]
    policy = json.loads(run.one("aws:iam/rolePolicy:RolePolicy").inputs["policy"])
    granted = policy["Statement"][0]["Resource"].removeprefix("arn:aws:s3:::").removesuffix("*")
    assert all(f["source"].removeprefix("s3://").startswith(granted) for f in files)


def test_ssm_transfer_bucket_is_private_encrypted_and_expiring(default: Deployment) -> None:
    block = default.one("aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock").inputs
    assert all(
        block[k]
        for k in ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets")
    )
    encryption = default.one(
        "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration"
    )
    assert encryption.inputs["rules"][0]["applyServerSideEncryptionByDefault"]["sseAlgorithm"] == "AES256"
    expiry = default.one("aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration").inputs
    assert expiry["rules"][0]["expiration"]["days"] == 1
    assert default.outputs["ssm_bucket"].startswith("llamahost-test-ssm-")


# ---- CPU options and identical hosts -------------------------------------------------------------------


def test_smt_is_turned_off_on_intel_with_all_cores() -> None:
    run = deploy(INTEL)
    (host,) = instances(run)
    assert host["cpuOptions"] == {"coreCount": 48, "threadsPerCore": 1}
    facts = run.outputs["hosts"][0]["vars"]
    assert (facts["llamahost_smt"], facts["llamahost_threads_per_core"], facts["llamahost_vcpus"]) == (
        False,
        1,
        48,
    )
    tuned = set(RunConfig(threads=1, threads_batch=1).role_vars())
    assert not tuned & set(facts), "no host var outranks tuned group_vars"


def test_smt_kept_on_when_asked() -> None:
    run = deploy({**INTEL, "smt": "true"})
    (host,) = instances(run)
    assert "cpuOptions" not in host
    facts = run.outputs["hosts"][0]["vars"]
    assert (facts["llamahost_smt"], facts["llamahost_vcpus"], facts["llamahost_physical_cores"]) == (
        True,
        96,
        48,
    )


def test_ec2_refusing_one_thread_per_core_is_caught() -> None:
    mocks = CatalogBackedAws(instance_type_overrides={"r7i.24xlarge": {"validThreadsPerCores": [2]}})
    with pytest.raises(
        pulumi.RunError, match=r"r7i\.24xlarge cannot turn SMT off: EC2 allows threads per core \[2\]"
    ):
        deploy(INTEL, mocks)
    assert not mocks.resources


def test_catalog_that_disagrees_with_ec2_stops_the_program() -> None:
    mocks = CatalogBackedAws(
        instance_type_overrides={"r7i.24xlarge": {"defaultVcpus": 192, "memorySize": 1572864}}
    )
    with pytest.raises(
        pulumi.RunError, match=r"catalog disagrees with EC2 about r7i\.24xlarge .*vCPUs: catalog 96, AWS 192"
    ):
        deploy(INTEL, mocks)
    assert not mocks.resources


def test_count_makes_identical_hosts() -> None:
    run = deploy({**BASE, "count": 3})
    hosts = instances(run)
    assert len(hosts) == 3
    comparable = [{k: v for k, v in h.items() if k not in ("tags", "volumeTags")} for h in hosts]
    assert comparable[0] == comparable[1] == comparable[2]
    assert [h["name"] for h in run.outputs["hosts"]] == [
        "llamahost-test-0",
        "llamahost-test-1",
        "llamahost-test-2",
    ]
    assert len({h["instance_id"] for h in run.outputs["hosts"]}) == 3


def test_a_minimum_speed_only_two_sockets_reach_is_flagged_in_the_facts() -> None:
    run = deploy({**BASE, "minTokensPerSecond": "7.5"})
    assert instances(run)[0]["instanceType"] == "c8g.48xlarge"
    facts = run.outputs["hosts"][0]["vars"]
    assert (facts["llamahost_numa_nodes"], facts["llamahost_sockets"]) == (2, 2)
    assert any("spans 2 sockets" in r for r in run.outputs["sizing"]["reasons"])


def test_a_gguf_file_sizes_the_stack(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in (
        (writer.add_block_count, 2),
        (writer.add_head_count, 4),
        (writer.add_head_count_kv, 2),
        (writer.add_embedding_length, 64),
        (writer.add_key_length, 16),
        (writer.add_value_length, 16),
    ):
        add(value)
    writer.add_tensor("output.weight", np.ones((64, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    run = deploy({"amiId": X86_AMI, "model": str(path), "instanceType": "c7a.large"})
    facts = run.outputs["hosts"][0]["vars"]
    assert facts["llamahost_model_bytes"] == path.stat().st_size
    assert instances(run)[0]["ebsBlockDevices"][0]["volumeSize"] == 32  # the minimum


# ---- outputs and the inventory -------------------------------------------------------------------------


def test_outputs_carry_ids_addresses_and_facts(default: Deployment) -> None:
    (host,) = default.outputs["hosts"]
    assert host["instance_id"].startswith("i-")
    assert host["private_ip"] == "10.42.0.10"
    assert host["instance_type"] == "c8g.24xlarge"
    facts = host["vars"]
    assert facts["llamahost_instance_type"] == "c8g.24xlarge"
    assert facts["llamahost_numa_nodes"] == 1
    assert facts["llamahost_smt"] is False
    assert facts["llamahost_model_bytes"] == 42_801_250_000
    assert facts["llamahost_physical_cores"] == 96


def test_the_inventory_hands_the_role_what_the_stack_decided(default: Deployment) -> None:
    """Port, bind address, model directory and install mode reach the llama_server role under its own
    names: the port the security group opens, the private IP clients reach, the mounted data volume, and a
    mode that serves the arm64 type the sizing engine chose."""
    (host,) = default.outputs["hosts"]
    facts = host["vars"]
    opened = {rule["fromPort"] for rule in group_named(default, "-hosts")["ingress"]}
    assert facts["llama_server_port"] == 8080 and opened == {8080}
    assert facts["llama_server_host"] == host["private_ip"] == "10.42.0.10"
    assert facts["llama_server_model_dir"] == "/srv/models"
    assert facts["llama_server_install_mode"] == "source"
    assert not any(name.startswith("llamahost_server") or name == "llamahost_model_dir" for name in facts)


@pytest.mark.parametrize(
    ("config", "mode"),
    [({**INTEL, "serverPort": "9090"}, "binary"), ({**INTEL, "installMode": "python"}, "python")],
)
def test_an_x86_host_gets_the_binary_mode_and_the_configured_port(config: dict[str, Any], mode: str) -> None:
    run = deploy(config)
    facts = run.outputs["hosts"][0]["vars"]
    assert facts["llama_server_install_mode"] == mode
    assert facts["llama_server_port"] == int(config.get("serverPort", 8080))


def test_inventory_output_puts_hosts_in_llama_hosts_with_ssm(default: Deployment) -> None:
    inventory = YAML(typ="safe").load(default.outputs["ansible_inventory"])
    hosts = inventory["all"]["children"]["llama_hosts"]["hosts"]
    (name,) = hosts
    variables = hosts[name]
    instance_id = default.outputs["hosts"][0]["instance_id"]
    assert variables["ansible_connection"] == "amazon.aws.aws_ssm"
    assert variables["ansible_aws_ssm_instance_id"] == instance_id
    assert variables["ansible_aws_ssm_region"] == "us-east-1"
    assert variables["ansible_aws_ssm_bucket_name"] == default.outputs["ssm_bucket"]
    assert variables["llamahost_private_ip"] == "10.42.0.10"


def test_ssh_access_opens_port_22_to_the_client_group_only() -> None:
    run = deploy({**BASE, "access": "ssh", "keyName": "ops"})
    (host,) = instances(run)
    assert host["keyName"] == "ops"
    ports = {(r["fromPort"], tuple(r["securityGroups"])) for r in group_named(run, "-hosts")["ingress"]}
    assert {p for p, _ in ports} == {22, 8080}
    assert all("cidrBlocks" not in r for r in group_named(run, "-hosts")["ingress"])
    assert not run.resources("aws:s3/bucket:Bucket")
    variables = run.outputs["hosts"][0]["vars"]
    assert variables["ansible_host"] == "10.42.0.10"
    assert "ansible_connection" not in variables


# ---- every resource passes the policy pack ------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        BASE,
        INTEL,
        {**BASE, "access": "ssh", "keyName": "ops"},
        {**BASE, "natGateway": "false", "ssmEndpoints": "true"},
        {**BASE, "subnetId": EXISTING_SUBNET, "modelS3Uri": "s3://acme-models/m/"},
        FLEET,
    ],
    ids=["default", "intel", "ssh", "endpoints", "existing-subnet", "fleet-database"],
)
def test_every_resource_passes_every_policy(config: dict[str, Any]) -> None:
    run = deploy(config)
    assert run.mocks.resources
    found = {r.name: violations(r.typ, r.inputs) for r in run.mocks.resources}
    assert {name: v for name, v in found.items() if v} == {}


# ---- configuration errors: one clear message, nothing created -----------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {**BASE, "instanceType": "r7a.24xlrage"},
            r"instance type 'r7a\.24xlrage' is not in llamahost's catalog",
        ),
        (
            {**BASE, "instanceType": "r7a.xlarge"},
            r"r7a\.xlarge has 32 GiB but Llama-3\.1-70B Q4_K_M needs 49\.0 GiB",
        ),
        (
            {**BASE, "instanceType": "r8g.24xlarge", "maxHourlyPrice": "2"},
            r"contradicts the other settings: over the price cap",
        ),
        ({**BASE, "model": "x.gguf"}, r"llamahost:model and llamahost:modelParams both describe the model"),
        ({"amiId": ARM_AMI}, r"no model: set llamahost:model"),
        (
            {**BASE, "subnetId": EXISTING_SUBNET, "natGateway": "false"},
            r"llamahost:natGateway shapes a new network",
        ),
        ({**BASE, "natGateway": "false"}, r"could reach neither SSM nor package mirrors"),
        ({**BASE, "access": "ssh"}, r"access is ssh but llamahost:keyName is not set"),
        ({**BASE, "keyName": "ops"}, r"keyName is set but llamahost:access is ssm"),
        ({**BASE, "instanceType": "r7a.24xlarge", "families": ["c8g"]}, r"families only applies when"),
        ({"modelParams": LLAMA_70B}, r"llamahost:amiId is not set"),
        (
            {**BASE, "instancetype": "r7a.24xlarge"},
            r"unknown setting llamahost:instancetype \(did you mean llamahost:instanceType\?\)",
        ),
        ({**BASE, "count": "0"}, r"llamahost:count 0 is outside 1\.\.20"),
        (
            {**BASE, "amiId": "ami-0123456789abcdef1"},
            r"amiId ami-0123456789abcdef1 cannot be found in this region",
        ),
        ({**BASE, "amiId": X86_AMI}, r"is built for x86_64, but c8g\.24xlarge needs arm64"),
        (
            {**BASE, "subnetId": EXISTING_SUBNET, "vpcId": "vpc-0fedcba987654321f"},
            r"belongs to vpc-0123456789abcdef0",
        ),
        (
            {**BASE, "subnetId": "subnet-0fffffffffffffff0"},
            r"subnetId subnet-0fffffffffffffff0 cannot be found",
        ),
        (
            {**BASE, "modelParams": {**LLAMA_70B, "params": 2e12, "bitsPerWeight": 16}},
            r"needs 4103\.0 GiB; the largest size considered, x2idn\.32xlarge, has 2048 GiB",
        ),
        ({**BASE, "dataVolumeGiB": "20"}, r"dataVolumeGiB 20 cannot hold the model \(40 GiB\)"),
        ({**BASE, "dataVolumeThroughput": "1000", "dataVolumeIops": "3000"}, r"needs at least 4000 IOPS"),
        ({**BASE, "modelParams": {**LLAMA_70B, "layer": 80}}, r"modelParams has unknown keys layer"),
        ({**BASE, "networkCidr": "8.8.0.0/16"}, r"must be a private IPv4 network"),
        (
            {**BASE, "installMode": "binary"},
            r"installMode binary ships the controller's x86-64 llama-server, which cannot run on this arm64 "
            r"instance type\n  fix: set llamahost:installMode source",
        ),
        ({**BASE, "installMode": "docker"}, r"llamahost:installMode"),
        (
            {**FLEET, "fleetDatabaseSecurityGroup": "fleet-postgres"},
            r"llamahost:fleetDatabaseSecurityGroup 'fleet-postgres' is malformed \(expected e\.g\. "
            r"sg-0123456789abcdef0\)",
        ),
        ({**FLEET, "fleetDatabasePort": "65536"}, r"llamahost:fleetDatabasePort 65536 is outside 1\.\.65535"),
        (
            {**BASE, "subnetId": EXISTING_SUBNET, "fleetDatabasePort": "5432"},
            r"llamahost:fleetDatabasePort is the port of the store in llamahost:fleetDatabaseSecurityGroup",
        ),
        (
            {**BASE, "fleetDatabaseSecurityGroup": FLEET_DB_GROUP},
            r"without llamahost:subnetId the hosts go into a new network that cannot reach it",
        ),
        (
            {**FLEET, "fleetDatabaseSecurityGroup": "sg-0fffffffffffffff0"},
            r"fleetDatabaseSecurityGroup sg-0fffffffffffffff0 cannot be found",
        ),
    ],
)
def test_configuration_errors_fail_with_a_clear_message(config: dict[str, Any], message: str) -> None:
    mocks = CatalogBackedAws()
    with pytest.raises(pulumi.RunError, match=message) as info:
        deploy(config, mocks)
    assert "fix:" in str(info.value)
    assert not mocks.resources, "no resource may be registered before the configuration is known to be good"


def test_type_not_offered_in_the_subnets_zone() -> None:
    mocks = CatalogBackedAws(zones=("us-east-1a", "us-east-1c"))
    with pytest.raises(
        pulumi.RunError,
        match=r"c8g\.24xlarge is not offered in us-east-1b.*offered in us-east-1a, "
        r"us-east-1c",
    ):
        deploy({**BASE, "subnetId": EXISTING_SUBNET}, mocks)
    assert not mocks.resources


def test_the_documented_example_stack_deploys() -> None:
    stack_file = YAML(typ="safe").load((INFRA_DIR / "Pulumi.example.yaml").read_text())
    config = {}
    for key, value in stack_file["config"].items():
        config[key] = value if isinstance(value, str) else json.dumps(value)
    run = deploy(config)
    assert instances(run)
    assert run.outputs["hosts"][0]["vars"]["ansible_connection"] == "amazon.aws.aws_ssm"

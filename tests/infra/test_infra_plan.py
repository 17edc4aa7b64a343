"""Pure decisions behind the stack: settings, CPU options, volumes, catalog cross-check, cloud-init, IAM."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import replace

import pytest
from infra_mocks import catalog_instance_type
from llamahost_infra.access import assume_role_policy, model_read_policy, ssm_core_policy_arn
from llamahost_infra.cloud_init import DATA_VOLUME_SCRIPT, render_user_data
from llamahost_infra.plan import (
    InstanceTypeFacts,
    check_catalog_against_aws,
    instance_type_facts,
    plan_cpu_options,
    plan_data_volume,
)
from llamahost_infra.settings import KEYS, default_name_prefix, parse_settings
from ruamel.yaml import YAML

from tuner.errors import UserError
from tuner.sizing import default_catalog

GIB = 1024**3


def facts(name: str, **changes: object) -> InstanceTypeFacts:
    """EC2's answer for a catalog type, as the program normalises it (snake_case result fields)."""
    raw = catalog_instance_type(name)
    result = {
        "default_vcpus": raw["defaultVcpus"],
        "default_cores": raw["defaultCores"],
        "default_threads_per_core": raw["defaultThreadsPerCore"],
        "valid_cores": raw["validCores"],
        "valid_threads_per_cores": raw["validThreadsPerCores"],
        "memory_size": raw["memorySize"],
        "supported_architectures": raw["supportedArchitectures"],
        "ebs_performance_maximum_throughput": raw["ebsPerformanceMaximumThroughput"],
        "bare_metal": False,
    }
    return replace(instance_type_facts(name, result), **changes)  # type: ignore[arg-type]


# ---- settings ------------------------------------------------------------------------------------------


def test_defaults_are_secure_and_explicit() -> None:
    settings = parse_settings(
        {"amiId": "ami-0123456789abcdef0", "model": "m.gguf"}, stack="dev", region="us-east-1"
    )
    assert (settings.access, settings.smt, settings.count, settings.server_port) == ("ssm", False, 1, 8080)
    assert (settings.nat_gateway, settings.ssm_endpoints, settings.new_network) == (True, False, True)
    assert settings.name_prefix == "llamahost-dev"
    assert (settings.context, settings.parallel, settings.cache_type) == (8192, 1, "f16")


def test_zero_and_false_are_kept_not_replaced_by_defaults() -> None:
    settings = parse_settings(
        {
            "amiId": "ami-0123456789abcdef0",
            "model": "m.gguf",
            "natGateway": "false",
            "ssmEndpoints": "true",
            "smt": "true",
        },
        stack="dev",
        region="us-east-1",
    )
    assert settings.nat_gateway is False and settings.ssm_endpoints is True and settings.smt is True
    with pytest.raises(UserError, match=r"llamahost:parallel 0 is outside 1\.\.1024"):
        parse_settings(
            {"amiId": "ami-0123456789abcdef0", "model": "m.gguf", "parallel": "0"},
            stack="dev",
            region="us-east-1",
        )


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(UserError) as info:
        parse_settings(
            {
                "model": "m.gguf",
                "count": "many",
                "smt": "yes",
                "serverPort": "80",
                "cacheType": "q3",
                "subnetId": "sub-1",
                "amiid": "ami-1",
            },
            stack="dev",
            region=None,
        )
    message = str(info.value)
    for expected in (
        "aws:region is not set",
        "llamahost:amiId is not set",
        "'many' is not an integer",
        "'yes' is not true or false",
        "serverPort 80 is outside 1024..65535",
        "cacheType 'q3' is not one of",
        "subnetId 'sub-1' is malformed",
        "unknown setting llamahost:amiid (did you mean llamahost:amiId?)",
    ):
        assert expected in message, expected


def test_model_s3_uri_is_split_into_bucket_and_prefix() -> None:
    settings = parse_settings(
        {"amiId": "ami-0123456789abcdef0", "model": "m.gguf", "modelS3Uri": "s3://acme-models/llama/70b/"},
        stack="dev",
        region="us-east-1",
    )
    assert settings.model_bucket_and_prefix == ("acme-models", "llama/70b")
    with pytest.raises(UserError, match="modelS3Uri 'https://acme' is malformed"):
        parse_settings(
            {"amiId": "ami-0123456789abcdef0", "model": "m.gguf", "modelS3Uri": "https://acme"},
            stack="dev",
            region="us-east-1",
        )


@pytest.mark.parametrize(
    ("model_keys", "problem"),
    [
        ({"modelFile": "m.gguf", "modelSha256": "ab" * 32}, "modelFile names an object under llamahost:modelS3Uri"),
        ({"modelS3Uri": "s3://acme/m/", "modelFile": "m.gguf"}, "modelFile and llamahost:modelSha256 go together"),
        ({"modelS3Uri": "s3://acme/m/", "modelFile": "m-00001-of-00003.gguf", "modelSha256": "ab" * 32},
         "is the first of 3 shards, so llamahost:modelSha256 must list 3"),
        ({"modelS3Uri": "s3://acme/m/", "modelFile": "m.gguf", "modelSha256": "xyz"}, "64-hex-digit sha256"),
        ({"modelS3Uri": "s3://acme/m/", "modelFile": "/abs/m.bin", "modelSha256": "ab" * 32},
         "modelFile '/abs/m.bin' is malformed"),
    ],
)
def test_a_model_the_hosts_cannot_fetch_and_check_is_refused_before_any_resource(
        model_keys: dict[str, str], problem: str) -> None:
    with pytest.raises(UserError, match=re.escape(problem)):
        parse_settings({"amiId": "ami-0123456789abcdef0", "model": "m.gguf", **model_keys}, stack="dev",
                       region="us-east-1")


def test_a_split_model_in_the_grant_names_its_first_shard() -> None:
    settings = parse_settings(
        {"amiId": "ami-0123456789abcdef0", "model": "m.gguf", "modelS3Uri": "s3://acme-models/llama/70b",
         "modelFile": "L-00001-of-00002.gguf", "modelSha256": json.dumps(["AB" * 32, "cd" * 32])},
        stack="dev", region="us-east-1")
    assert settings.model_url == "s3://acme-models/llama/70b/L-00001-of-00002.gguf"
    assert settings.model_sha256 == ("ab" * 32, "cd" * 32)


def test_the_fleet_database_is_unset_by_default_and_its_port_is_postgresqls() -> None:
    base = {"amiId": "ami-0123456789abcdef0", "model": "m.gguf", "subnetId": "subnet-0123456789abcdef0"}
    settings = parse_settings(base, stack="dev", region="us-east-1")
    assert (settings.fleet_database_security_group, settings.fleet_database_port) == (None, 5432)
    settings = parse_settings(
        {**base, "fleetDatabaseSecurityGroup": "sg-0d8b0d8b0d8b0d8b0"}, stack="dev", region="us-east-1"
    )
    assert (settings.fleet_database_security_group, settings.fleet_database_port) == ("sg-0d8b0d8b0d8b0d8b0", 5432)


@pytest.mark.parametrize(
    ("fleet_keys", "problem"),
    [
        ({"fleetDatabaseSecurityGroup": "fleet-postgres"},
         "llamahost:fleetDatabaseSecurityGroup 'fleet-postgres' is malformed (expected e.g. sg-0123456789abcdef0)"),
        ({"fleetDatabaseSecurityGroup": "sg-12"}, "llamahost:fleetDatabaseSecurityGroup 'sg-12' is malformed"),
        ({"fleetDatabaseSecurityGroup": "0.0.0.0/0"}, "llamahost:fleetDatabaseSecurityGroup '0.0.0.0/0' is malformed"),
        ({"fleetDatabaseSecurityGroup": "sg-0d8b0d8b0d8b0d8b0", "fleetDatabasePort": "0"},
         "llamahost:fleetDatabasePort 0 is outside 1..65535"),
        ({"fleetDatabasePort": "5432"}, "set that group too, or drop the port"),
    ],
)
def test_a_bad_fleet_database_setting_is_refused_with_the_fix(fleet_keys: dict[str, str], problem: str) -> None:
    base = {"amiId": "ami-0123456789abcdef0", "model": "m.gguf", "subnetId": "subnet-0123456789abcdef0"}
    with pytest.raises(UserError, match=re.escape(problem)) as info:
        parse_settings({**base, **fleet_keys}, stack="dev", region="us-east-1")
    assert "pulumi config set llamahost:<key> <value>" in str(info.value)


def test_every_key_is_documented_in_the_infra_readme() -> None:
    from infra_mocks import INFRA_DIR

    readme = (INFRA_DIR / "README.md").read_text()
    missing = [key for key in KEYS if f"`llamahost:{key}`" not in readme]
    assert not missing


# ---- CPU options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "keep_smt", "expected"),
    [
        ("r7i.24xlarge", False, (48, 1)),
        ("x2idn.32xlarge", False, (64, 1)),
        ("r7i.24xlarge", True, None),
        ("r7a.24xlarge", False, None),  # AMD 7th gen: one thread per core already, threads cannot change
        ("c8g.24xlarge", False, None),  # Graviton
    ],
)
def test_cpu_options_turn_smt_off_only_where_it_is_on_and_allowed(
    name: str, keep_smt: bool, expected: tuple[int, int] | None
) -> None:
    plan = plan_cpu_options(default_catalog().get(name), facts(name), keep_smt=keep_smt)
    assert (None if plan is None else (plan.core_count, plan.threads_per_core)) == expected


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"valid_threads_per_core": (2,)}, r"cannot turn SMT off: EC2 allows threads per core \[2\]"),
        ({"valid_cores": (2, 4, 8)}, r"does not list its default 48 cores among the valid core counts"),
        ({"bare_metal": True}, r"is bare metal: EC2 accepts no CPU options"),
    ],
)
def test_invalid_cpu_option_combinations_are_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(UserError, match=message):
        plan_cpu_options(
            default_catalog().get("r7i.24xlarge"), facts("r7i.24xlarge", **changes), keep_smt=False
        )


def test_catalog_is_checked_against_ec2() -> None:
    size = default_catalog().get("r8g.24xlarge")
    check_catalog_against_aws(size, facts("r8g.24xlarge"))
    with pytest.raises(
        UserError,
        match=r"memory MiB: catalog 786432, AWS 393216; architecture: catalog arm64, "
        r"AWS x86_64",
    ):
        check_catalog_against_aws(size, facts("r8g.24xlarge", memory_mib=393216, architectures=("x86_64",)))


# ---- data volume ---------------------------------------------------------------------------------------


def test_data_volume_defaults_hold_two_copies_at_full_gp3_speed() -> None:
    plan = plan_data_volume(int(40 * GIB), facts("r7a.24xlarge"))
    assert (plan.size_gib, plan.throughput_mibs, plan.iops) == (66, 1000, 4000)
    assert plan.load_seconds(int(40 * GIB)) == pytest.approx(40 * 1024 / 1000)


def test_data_volume_throughput_stops_at_the_instances_ebs_limit() -> None:
    # 4,750 Mbps of EBS bandwidth = 593.75 MB/s = 566 MiB/s: more gp3 throughput would never arrive.
    slow = facts("r7a.large", ebs_max_throughput_mbs=593.75)
    plan = plan_data_volume(5 * GIB, slow)
    assert (plan.size_gib, plan.throughput_mibs, plan.iops) == (32, 566, 3000)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size_gib": 10}, r"dataVolumeGiB 10 cannot hold the model \(40 GiB\)"),
        ({"throughput_mibs": 1000, "iops": 3000}, r"needs at least 4000 IOPS"),
    ],
)
def test_data_volume_overrides_are_checked_against_gp3_rules(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(UserError, match=message):
        plan_data_volume(int(40 * GIB), facts("r7a.24xlarge"), **kwargs)


def test_gp3_iops_per_gib_limit() -> None:
    with pytest.raises(
        UserError, match=r"at most 500 IOPS per GiB: 16000 IOPS need 32 GiB, the volume has 20"
    ):
        plan_data_volume(10 * GIB, facts("r7a.24xlarge"), size_gib=20, iops=16000, throughput_mibs=125)


# ---- cloud-init and IAM documents ----------------------------------------------------------------------


def test_user_data_is_cloud_config_and_the_volume_script_parses_in_sh() -> None:
    text = render_user_data("/srv/models")
    assert text.startswith("#cloud-config\n")
    document = YAML(typ="safe").load(text)
    (script,) = document["write_files"]
    assert script["content"] == DATA_VOLUME_SCRIPT
    assert script["permissions"] == "0755"
    done = subprocess.run(["sh", "-n"], input=DATA_VOLUME_SCRIPT, text=True, capture_output=True, check=False)
    assert done.returncode == 0, done.stderr
    assert 'mkfs.ext4 -q -L "$label" "$dev"' in DATA_VOLUME_SCRIPT
    assert "Amazon Elastic Block Store" in DATA_VOLUME_SCRIPT  # never the instance-store disks


def test_iam_documents_are_minimal() -> None:
    trust = json.loads(assume_role_policy("amazonaws.com.cn"))
    assert trust["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com.cn"}
    assert ssm_core_policy_arn("aws-us-gov") == "arn:aws-us-gov:iam::aws:policy/AmazonSSMManagedInstanceCore"
    whole_bucket = json.loads(model_read_policy("aws", "models", ""))
    read, listing = whole_bucket["Statement"]
    assert read["Resource"] == "arn:aws:s3:::models/*"
    assert "Condition" not in listing
    actions = {s["Action"] for s in json.loads(model_read_policy("aws", "models", "a/b/"))["Statement"]}
    assert actions == {"s3:GetObject", "s3:ListBucket"}


@pytest.mark.parametrize(("stack", "prefix"), [("dev", "llamahost-dev"), ("Prod_EU.1", "llamahost-prod-eu-1"),
                                               ("a" * 40, "llamahost-" + "a" * 21)])
def test_default_name_prefix_is_valid_for_every_resource_name(stack: str, prefix: str) -> None:
    assert default_name_prefix(stack) == prefix


def test_model_names_become_valid_tag_values() -> None:
    from llamahost_infra.program import tag_value

    assert tag_value("Llama-3.1-70B (Q4_K_M), v2") == "Llama-3.1-70B _Q4_K_M__ v2"
    assert tag_value("x" * 300) == "x" * 256

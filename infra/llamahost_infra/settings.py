"""Stack configuration: every ``llamahost:*`` key, parsed, typed and checked before anything is planned.

Pulumi stores configuration as strings (objects as JSON). :func:`parse_settings` turns them into one
:class:`StackSettings` and collects every problem at once: a misspelt key (Pulumi itself ignores unknown
keys, so ``instancetype`` would silently do nothing), a value of the wrong type, and settings that
contradict each other. :func:`load_settings` is the only part that touches Pulumi.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from tuner.errors import UserError
from tuner.model.gguf_file import SHARD_PATTERN
from tuner.sizing.assumptions import DEFAULT_EFFICIENCY
from tuner.sizing.demand import CACHE_TYPE_BYTES

NAMESPACE = "llamahost"
AMI_PATTERN = re.compile(r"^ami-[0-9a-f]{8,17}$")
S3_URI_PATTERN = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(?P<prefix>.*))?$")
SUBNET_PATTERN = re.compile(r"^subnet-[0-9a-f]{8,17}$")
VPC_PATTERN = re.compile(r"^vpc-[0-9a-f]{8,17}$")
SG_PATTERN = re.compile(r"^sg-[0-9a-f]{8,17}$")
NAME_PREFIX_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
MODEL_FILE_PATTERN = re.compile(r"^[^/\s][^\s]*\.gguf$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
MAX_COUNT = 20
MODEL_PARAM_KEYS = {
    "params",
    "bitsPerWeight",
    "layers",
    "kvHeads",
    "headDim",
    "activeParams",
    "embd",
    "vocab",
    "name",
}
DEFAULT_NETWORK_CIDR = "10.42.0.0/16"
DEFAULT_FLEET_DATABASE_PORT = 5432  # PostgreSQL's
# "auto" and the llama_server role's own modes (roles/llama_server/defaults/main.yml).
INSTALL_MODES = ("auto", "binary", "source", "python")

Access = Literal["ssm", "ssh"]

# Every key the program reads, its type, and a one-line description (the README's table comes from here).
KEYS: dict[str, tuple[str, str]] = {
    "amiId": ("string", "pinned image ID (ami-...); required, never looked up by 'most recent'"),
    "model": ("string", "path of the GGUF file to size for (relative to infra/), or use modelParams"),
    "modelParams": ("object", "the model as numbers: params, bitsPerWeight, layers, kvHeads, headDim, ..."),
    "modelS3Uri": ("string", "s3://bucket/prefix/ the hosts may read the model from (read-only IAM grant)"),
    "modelFile": (
        "string",
        "the model's object under modelS3Uri (a split model's first shard, NAME-00001-of-000NN.gguf): the "
        "hosts fetch it with their own role",
    ),
    "modelSha256": ("string or array", "with modelFile: its sha256, or one per shard of a split model"),
    "context": ("integer", "tokens of context per slot (default 8192)"),
    "parallel": ("integer", "parallel slots (default 1)"),
    "cacheType": ("string", "KV cache type (default f16)"),
    "instanceType": ("string", "explicit type; unset = chosen by the sizing engine"),
    "minTokensPerSecond": ("number", "automatic choice: minimum predicted generation speed"),
    "maxHourlyPrice": ("number", "automatic choice: on-demand USD per hour cap"),
    "efficiency": ("number", f"fraction of theoretical bandwidth reached (default {DEFAULT_EFFICIENCY})"),
    "families": ("array", "automatic choice: consider only these families"),
    "count": ("integer", "identical hosts to create (default 1)"),
    "smt": ("boolean", "keep SMT siblings on (default false: threads_per_core=1 where allowed)"),
    "vpcId": ("string", "existing VPC (with subnetId); unset = a new private network"),
    "subnetId": ("string", "existing private subnet for the hosts"),
    "networkCidr": ("string", f"CIDR of a new network (default {DEFAULT_NETWORK_CIDR})"),
    "natGateway": ("boolean", "new network: NAT gateway for package downloads (default true)"),
    "ssmEndpoints": (
        "boolean",
        "new network: interface endpoints for SSM (default false; required without NAT)",
    ),
    "clientSecurityGroupId": ("string", "security group allowed to reach the server port; unset = a new one"),
    "serverPort": ("integer", "llama-server port opened to the client group (default 8080)"),
    "fleetDatabaseSecurityGroup": (
        "string",
        "security group of the fleet's PostgreSQL study store (sg-..., in the hosts' VPC): the hosts may open "
        "connections to its members on fleetDatabasePort; unset = no such rule",
    ),
    "fleetDatabasePort": ("integer", "with fleetDatabaseSecurityGroup: the store's port (default 5432)"),
    "installMode": (
        "string",
        "how the role installs llama-server: auto (default: binary on x86_64, source on arm64), binary, source, "
        "python",
    ),
    "access": ("string", "how Ansible connects: ssm (default) or ssh"),
    "keyName": ("string", "EC2 key pair, access=ssh only"),
    "ssmBucket": ("string", "existing S3 bucket for Ansible's SSM file transfers; unset = a new one"),
    "dataVolumeGiB": ("integer", "model volume size (default: 1.25 x model + 16 GiB)"),
    "dataVolumeThroughput": (
        "integer",
        "model volume gp3 MiB/s (default: up to 1000, within the type's EBS limit)",
    ),
    "dataVolumeIops": (
        "integer",
        "model volume gp3 IOPS (default: enough for the throughput, at least 3000)",
    ),
    "kmsKeyId": ("string", "KMS key for EBS encryption (default: the account's aws/ebs key)"),
    "tags": ("object", "extra tags on every resource"),
    "namePrefix": ("string", "prefix of resource names (default llamahost-<stack>)"),
}


@dataclass(frozen=True)
class StackSettings:
    """The parsed ``llamahost:*`` configuration of one stack."""

    name_prefix: str
    region: str
    ami_id: str
    model_path: str | None = None
    model_params: Mapping[str, Any] | None = None
    model_s3_uri: str | None = None
    model_file: str | None = None
    model_sha256: tuple[str, ...] = ()
    context: int = 8192
    parallel: int = 1
    cache_type: str = "f16"
    instance_type: str | None = None
    min_tokens_per_second: float | None = None
    max_hourly_price: float | None = None
    efficiency: float = DEFAULT_EFFICIENCY
    families: tuple[str, ...] = ()
    count: int = 1
    smt: bool = False
    vpc_id: str | None = None
    subnet_id: str | None = None
    network_cidr: str = DEFAULT_NETWORK_CIDR
    nat_gateway: bool = True
    ssm_endpoints: bool = False
    client_security_group_id: str | None = None
    server_port: int = 8080
    fleet_database_security_group: str | None = None
    fleet_database_port: int = DEFAULT_FLEET_DATABASE_PORT
    install_mode: str = "auto"
    access: Access = "ssm"
    key_name: str | None = None
    ssm_bucket: str | None = None
    data_volume_gib: int | None = None
    data_volume_throughput: int | None = None
    data_volume_iops: int | None = None
    kms_key_id: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)

    @property
    def new_network(self) -> bool:
        return self.subnet_id is None

    @property
    def model_bucket_and_prefix(self) -> tuple[str, str] | None:
        if not self.model_s3_uri:
            return None
        match = S3_URI_PATTERN.match(self.model_s3_uri)
        if match is None:  # refused by parse_settings; kept total for type checkers
            return None
        return match.group("bucket"), (match.group("prefix") or "").strip("/")

    @property
    def model_url(self) -> str | None:
        """The ``s3://`` URL of the model (its first shard), inside the granted prefix."""
        grant = self.model_bucket_and_prefix
        if grant is None or not self.model_file:
            return None
        bucket, prefix = grant
        return f"s3://{bucket}/{prefix + '/' if prefix else ''}{self.model_file}"


class _Reader:
    """Typed access to raw string values, collecting problems instead of stopping at the first."""

    def __init__(self, raw: Mapping[str, str]) -> None:
        self.raw = raw
        self.problems: list[str] = []

    def _value(self, key: str) -> str | None:
        value = self.raw.get(key)
        return None if value is None or value == "" else value

    def string(self, key: str, pattern: re.Pattern[str] | None = None, example: str = "") -> str | None:
        value = self._value(key)
        if value is not None and pattern is not None and not pattern.match(value):
            self.problems.append(f"{NAMESPACE}:{key} {value!r} is malformed (expected e.g. {example})")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self._value(key)
        if value is None:
            return default
        if value not in choices:
            self.problems.append(f"{NAMESPACE}:{key} {value!r} is not one of {', '.join(choices)}")
            return default
        return value

    def integer(self, key: str, low: int, high: int) -> int | None:
        value = self._value(key)
        if value is None:
            return None
        try:
            number = int(value)
        except ValueError:
            self.problems.append(f"{NAMESPACE}:{key} {value!r} is not an integer")
            return None
        if not low <= number <= high:
            self.problems.append(f"{NAMESPACE}:{key} {number} is outside {low}..{high}")
        return number

    def integer_or(self, key: str, low: int, high: int, default: int) -> int:
        value = self.integer(key, low, high)
        return default if value is None else value

    def number(self, key: str) -> float | None:
        value = self._value(key)
        if value is None:
            return None
        try:
            number = float(value)
        except ValueError:
            self.problems.append(f"{NAMESPACE}:{key} {value!r} is not a number")
            return None
        if number <= 0:
            self.problems.append(f"{NAMESPACE}:{key} must be positive")
        return number

    def boolean(self, key: str, default: bool) -> bool:
        value = self._value(key)
        if value is None:
            return default
        if value.lower() in ("true", "false"):
            return value.lower() == "true"
        self.problems.append(f"{NAMESPACE}:{key} {value!r} is not true or false")
        return default

    def sha256s(self, key: str) -> tuple[str, ...]:
        """One sha256, or a JSON list of them (one per shard of a split model)."""
        value = self._value(key)
        if value is None:
            return ()
        digests = self.json(key, list) if value.lstrip().startswith("[") else [value]
        digests = [str(d).lower() for d in digests or ()]
        bad = [d for d in digests if not SHA256_PATTERN.match(d)]
        if bad or not digests:
            self.problems.append(f"{NAMESPACE}:{key} must be a 64-hex-digit sha256 or a list of them, got {bad}")
        return tuple(digests)

    def json(self, key: str, kind: type) -> Any:
        value = self._value(key)
        if value is None:
            return None
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            self.problems.append(
                f"{NAMESPACE}:{key} is not valid JSON (set it with `pulumi config set --path` "
                "or in the stack file as a YAML mapping/list)"
            )
            return None
        if not isinstance(parsed, kind):
            self.problems.append(f"{NAMESPACE}:{key} must be a {'mapping' if kind is dict else 'list'}")
            return None
        return parsed


def _unknown_keys(raw: Mapping[str, str]) -> list[str]:
    problems = []
    for key in sorted(set(raw) - set(KEYS)):
        close = difflib.get_close_matches(key, KEYS, n=1, cutoff=0.6)
        hint = f" (did you mean {NAMESPACE}:{close[0]}?)" if close else ""
        problems.append(f"unknown setting {NAMESPACE}:{key}{hint}")
    return problems


def _contradictions(s: StackSettings, raw: Mapping[str, str]) -> list[str]:
    """Settings that cannot all hold; each message names both sides."""
    out = []
    if s.model_path and s.model_params:
        out.append("llamahost:model and llamahost:modelParams both describe the model: keep one")
    if not s.model_path and not s.model_params:
        out.append(
            "no model: set llamahost:model (a GGUF path) or llamahost:modelParams (the host is sized "
            "and its data volume made for it)"
        )
    if s.model_file and not s.model_s3_uri:
        out.append("llamahost:modelFile names an object under llamahost:modelS3Uri: set that prefix too")
    if bool(s.model_file) != bool(s.model_sha256):
        out.append(
            "llamahost:modelFile and llamahost:modelSha256 go together: the hosts check what they fetch "
            "against the pinned sha256 (sha256sum FILE; a list, one per shard, for a split model)"
        )
    elif s.model_file:
        # A split GGUF is named by its first shard (gguf-split's names); the role fetches the others beside it.
        shard = SHARD_PATTERN.match(s.model_file.rsplit("/", 1)[-1])
        first = shard is not None and int(shard.group("no")) == 1
        shards = int(shard.group("count")) if shard is not None and first else 1
        if len(s.model_sha256) != shards:
            what = f"the first of {shards} shards" if first else "one file"
            out.append(
                f"llamahost:modelFile {s.model_file} is {what}, "
                f"so llamahost:modelSha256 must list {shards} sha256 digest(s), got {len(s.model_sha256)}"
            )
    if s.instance_type and s.families:
        out.append(
            "llamahost:families only applies when the type is chosen automatically; it conflicts with "
            "llamahost:instanceType"
        )
    if s.vpc_id and not s.subnet_id:
        out.append("llamahost:vpcId without llamahost:subnetId: name the private subnet the hosts go into")
    if s.subnet_id:
        for key in ("networkCidr", "natGateway", "ssmEndpoints"):
            if key in raw:
                out.append(
                    f"llamahost:{key} shapes a new network but llamahost:subnetId uses an existing one"
                )
    elif not s.nat_gateway and not s.ssm_endpoints:
        out.append(
            "llamahost:natGateway and llamahost:ssmEndpoints are both false: the hosts could reach "
            "neither SSM nor package mirrors; enable one"
        )
    if "fleetDatabasePort" in raw and not s.fleet_database_security_group:
        out.append(
            "llamahost:fleetDatabasePort is the port of the store in llamahost:fleetDatabaseSecurityGroup: "
            "set that group too, or drop the port"
        )
    if s.fleet_database_security_group and s.new_network:
        # A rule may reference a group of its own VPC or of an active peering; a new VPC has no peering yet.
        out.append(
            "llamahost:fleetDatabaseSecurityGroup names a group of an existing VPC, but without "
            "llamahost:subnetId the hosts go into a new network that cannot reach it: set llamahost:subnetId "
            "(and llamahost:vpcId) to a private subnet of the database's VPC"
        )
    if s.access == "ssh" and not s.key_name:
        out.append("llamahost:access is ssh but llamahost:keyName is not set")
    if s.access == "ssm" and s.key_name:
        out.append("llamahost:keyName is set but llamahost:access is ssm (no SSH): drop the key or use ssh")
    if s.access == "ssh" and s.ssm_bucket:
        out.append("llamahost:ssmBucket is only used with llamahost:access ssm")
    if s.model_params is not None:
        unknown = sorted(set(s.model_params) - MODEL_PARAM_KEYS)
        if unknown:
            out.append(
                f"llamahost:modelParams has unknown keys {', '.join(unknown)} "
                f"(known: {', '.join(sorted(MODEL_PARAM_KEYS))})"
            )
    for key in s.tags:
        if key.lower().startswith("aws:"):
            out.append(f"tag {key!r}: keys starting with 'aws:' are reserved by AWS")
    return out


def default_name_prefix(stack: str) -> str:
    """``llamahost-<stack>`` in the characters every resource name allows (S3 bucket names are the
    strictest: lowercase letters, digits and hyphens)."""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", f"llamahost-{stack}".lower())
    return cleaned[:31].rstrip("-")


def _cidr(read: _Reader, key: str) -> str:
    """A private IPv4 network of /16 to /24, so a private and a public /26..28 subnet fit inside."""
    value = read.string(key)
    if value is None:
        return DEFAULT_NETWORK_CIDR
    try:
        network = ipaddress.ip_network(value)
    except ValueError:
        read.problems.append(f"{NAMESPACE}:{key} {value!r} is not a network such as {DEFAULT_NETWORK_CIDR}")
        return DEFAULT_NETWORK_CIDR
    if network.version != 4 or not network.is_private or not 16 <= network.prefixlen <= 24:
        read.problems.append(f"{NAMESPACE}:{key} {value} must be a private IPv4 network from /16 to /24")
    return str(network)


def parse_settings(raw: Mapping[str, str], *, stack: str, region: str | None) -> StackSettings:
    """Parse the ``llamahost:*`` values (without the namespace) of one stack; raise one :class:`UserError`
    listing every problem."""
    read = _Reader(raw)
    problems = _unknown_keys(raw)
    if not region:
        problems.append("aws:region is not set")
    ami_id = read.string("amiId", AMI_PATTERN, "ami-0123456789abcdef0")
    if ami_id is None:
        problems.append("llamahost:amiId is not set: pin the image (see infra/README.md, 'Choose the image')")
    access = read.choice("access", ("ssm", "ssh"), "ssm")
    families = read.json("families", list)
    tags = read.json("tags", dict)
    name_prefix = read.string("namePrefix", NAME_PREFIX_PATTERN, "llamahost-dev")
    efficiency = read.number("efficiency")
    settings = StackSettings(
        name_prefix=default_name_prefix(stack) if name_prefix is None else name_prefix,
        region=region or "",
        ami_id=ami_id or "",
        model_path=read.string("model"),
        model_params=read.json("modelParams", dict),
        model_s3_uri=read.string("modelS3Uri", S3_URI_PATTERN, "s3://my-models/llama-3.1-70b/"),
        model_file=read.string("modelFile", MODEL_FILE_PATTERN, "Llama-3.3-70B-Q4_K_M-00001-of-00002.gguf"),
        model_sha256=read.sha256s("modelSha256"),
        context=read.integer_or("context", 1, 10_000_000, 8192),
        parallel=read.integer_or("parallel", 1, 1024, 1),
        cache_type=read.choice("cacheType", tuple(CACHE_TYPE_BYTES), "f16"),
        instance_type=read.string("instanceType"),
        min_tokens_per_second=read.number("minTokensPerSecond"),
        max_hourly_price=read.number("maxHourlyPrice"),
        efficiency=DEFAULT_EFFICIENCY if efficiency is None else efficiency,
        families=tuple(str(f) for f in families or ()),
        count=read.integer_or("count", 1, MAX_COUNT, 1),
        smt=read.boolean("smt", default=False),
        vpc_id=read.string("vpcId", VPC_PATTERN, "vpc-0123456789abcdef0"),
        subnet_id=read.string("subnetId", SUBNET_PATTERN, "subnet-0123456789abcdef0"),
        network_cidr=_cidr(read, "networkCidr"),
        nat_gateway=read.boolean("natGateway", default=True),
        ssm_endpoints=read.boolean("ssmEndpoints", default=False),
        client_security_group_id=read.string("clientSecurityGroupId", SG_PATTERN, "sg-0123456789abcdef0"),
        server_port=read.integer_or("serverPort", 1024, 65535, 8080),
        fleet_database_security_group=read.string(
            "fleetDatabaseSecurityGroup", SG_PATTERN, "sg-0123456789abcdef0"
        ),
        fleet_database_port=read.integer_or("fleetDatabasePort", 1, 65535, DEFAULT_FLEET_DATABASE_PORT),
        install_mode=read.choice("installMode", INSTALL_MODES, "auto"),
        access="ssh" if access == "ssh" else "ssm",
        key_name=read.string("keyName"),
        ssm_bucket=read.string("ssmBucket"),
        data_volume_gib=read.integer("dataVolumeGiB", 8, 16384),
        data_volume_throughput=read.integer("dataVolumeThroughput", 125, 1000),
        data_volume_iops=read.integer("dataVolumeIops", 3000, 16000),
        kms_key_id=read.string("kmsKeyId"),
        tags={str(k): str(v) for k, v in (tags or {}).items()},
    )
    problems += read.problems + _contradictions(settings, raw)
    if problems:
        raise UserError(
            "invalid stack configuration:\n  - " + "\n  - ".join(problems),
            "fix the settings with `pulumi config set llamahost:<key> <value>` "
            "(every key is described in infra/README.md)",
        )
    return settings


def configured_values(namespace: str = NAMESPACE) -> dict[str, str]:
    """Every ``<namespace>:*`` value of the running stack, without the namespace, as Pulumi stores it."""
    from pulumi.runtime import config as pulumi_config

    keys = set(pulumi_config.CONFIG.get()) | set(pulumi_config.get_config_env())
    prefix = f"{namespace}:"
    values: dict[str, str] = {}
    for key in sorted(k for k in keys if k.startswith(prefix)):
        value = pulumi_config.get_config(key)
        if value is not None:
            values[key.removeprefix(prefix)] = value if isinstance(value, str) else json.dumps(value)
    return values


def load_settings() -> StackSettings:
    """The running stack's settings (the only function here that reads Pulumi's state)."""
    import pulumi

    region = pulumi.Config("aws").get("region")
    return parse_settings(configured_values(), stack=pulumi.get_stack(), region=region)

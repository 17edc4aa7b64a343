"""Pulumi mocks for llamahost's stack, answered from the same data the program trusts.

* ``ec2.get_instance_type`` is answered from the instance catalog (vCPUs, cores, threads per core,
  valid threads, memory, architecture, EBS throughput), so a CPU-options combination the catalog says
  EC2 refuses is refused here too; a test can override one answer to play an EC2 that disagrees.
* ``ec2.get_ami`` knows two pinned images (x86_64 and arm64) and fails for any other ID, as EC2 does.
* ``ec2.get_subnet`` and ``ec2.get_security_group`` know the subnets and groups a test registers;
  ``get_instance_type_offerings`` offers every catalog type in the zones a test allows.
* New resources get provider-like IDs and the outputs the program reads (private IPs, ARNs, names).

Every resource's inputs are recorded (with the engine's camelCase names, as the policy pack sees them).
"""

from __future__ import annotations

import hashlib
import ipaddress
import runpy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pulumi
from pulumi.runtime import settings as pulumi_settings

from tuner.sizing import default_catalog

INFRA_DIR = Path(__file__).resolve().parents[2] / "infra"
PROGRAM = INFRA_DIR / "__main__.py"
ACCOUNT = "123456789012"
X86_AMI = "ami-0a1b2c3d4e5f60718"
ARM_AMI = "ami-0f1e2d3c4b5a69788"
IMAGES = {
    X86_AMI: {
        "architecture": "x86_64",
        "name": "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-20261101",
    },
    ARM_AMI: {
        "architecture": "arm64",
        "name": "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-arm64-server-20261101",
    },
}
# The model most tests size for: Llama-3.1-70B Q4_K_M as numbers (no download needed).
LLAMA_70B = {
    "params": 70.6e9,
    "bitsPerWeight": 4.85,
    "layers": 80,
    "kvHeads": 8,
    "headDim": 128,
    "embd": 8192,
    "vocab": 128256,
    "name": "Llama-3.1-70B Q4_K_M",
}
BASE_CONFIG = {"amiId": ARM_AMI, "modelParams": LLAMA_70B}
EXISTING_SUBNET = "subnet-0123456789abcdef0"
EXISTING_VPC = "vpc-0123456789abcdef0"
OTHER_VPC = "vpc-0fedcba987654321f"
# The fleet's PostgreSQL study store: its security group in the existing subnet's VPC, and one elsewhere.
FLEET_DB_GROUP = "sg-0d8b0d8b0d8b0d8b0"
FLEET_DB_GROUP_ELSEWHERE = "sg-0e1e0e1e0e1e0e1e0"


class ProviderError(Exception):
    """What the AWS provider would answer with an error (no such image, no such subnet).

    Returned to the program as an invoke *failure*, the way the engine reports a data source error, so
    the program can catch it (an exception raised inside ``call`` would be an RPC crash instead).
    """


def catalog_instance_type(name: str) -> dict[str, Any]:
    """What EC2 would say about ``name``, from the catalog (the engine's camelCase result names)."""
    size = default_catalog().get(name)
    family = size.family
    cores = size.vcpus // family.threads_per_core
    return {
        "instanceType": name,
        "defaultVcpus": size.vcpus,
        "defaultCores": cores,
        "defaultThreadsPerCore": family.threads_per_core,
        # The catalog records the default core count only; it is always among EC2's valid counts.
        "validCores": [cores],
        "validThreadsPerCores": list(family.valid_threads_per_core),
        "memorySize": size.memory_gib * 1024,
        "supportedArchitectures": [family.architecture],
        "ebsPerformanceMaximumThroughput": size.ebs_max_mbps / 8,
        "ebsPerformanceMaximumBandwidth": size.ebs_max_mbps,
        "bareMetal": False,
    }


def _digest(*parts: str, length: int = 17) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:length]


@dataclass
class Recorded:
    typ: str
    name: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]


@dataclass
class CatalogBackedAws(pulumi.runtime.Mocks):
    """Answers invokes from the catalog and records every resource."""

    zones: tuple[str, ...] = ("us-east-1a", "us-east-1b", "us-east-1c")
    subnets: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            EXISTING_SUBNET: {
                "id": EXISTING_SUBNET,
                "vpcId": EXISTING_VPC,
                "availabilityZone": "us-east-1b",
                "cidrBlock": "10.8.0.0/20",
                "mapPublicIpOnLaunch": False,
            }
        }
    )
    security_groups: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            FLEET_DB_GROUP: {"id": FLEET_DB_GROUP, "vpcId": EXISTING_VPC, "name": "fleet-postgres"},
            FLEET_DB_GROUP_ELSEWHERE: {"id": FLEET_DB_GROUP_ELSEWHERE, "vpcId": OTHER_VPC, "name": "pg-other"},
        }
    )
    instance_type_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    resources: list[Recorded] = field(default_factory=list)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        self.calls.append((args.token, dict(args.args)))
        handler = self.handlers().get(args.token)
        if handler is None:
            raise AssertionError(f"the program made an invoke the mocks do not know: {args.token}")
        try:
            return handler(dict(args.args)), []
        except ProviderError as exc:
            return {}, [(str(exc), "")]

    def handlers(self) -> Mapping[str, Callable[[dict[str, Any]], dict[str, Any]]]:
        return {
            "aws:ec2/getInstanceType:getInstanceType": self._instance_type,
            "aws:ec2/getAmi:getAmi": self._ami,
            "aws:ec2/getSubnet:getSubnet": self._subnet,
            "aws:ec2/getSecurityGroup:getSecurityGroup": self._security_group,
            "aws:ec2/getInstanceTypeOfferings:getInstanceTypeOfferings": self._offerings,
            "aws:index/getPartition:getPartition": lambda _: {
                "partition": "aws",
                "dnsSuffix": "amazonaws.com",
                "id": "aws",
            },
        }

    def _instance_type(self, args: dict[str, Any]) -> dict[str, Any]:
        name = args["instanceType"]
        answer = catalog_instance_type(name)
        answer.update(self.instance_type_overrides.get(name, {}))
        return answer

    @staticmethod
    def _ami(args: dict[str, Any]) -> dict[str, Any]:
        wanted = [v for f in args.get("filters", []) if f["name"] == "image-id" for v in f["values"]]
        if args.get("mostRecent"):
            raise ProviderError("llamahost must not look images up by most_recent")
        if len(wanted) != 1 or wanted[0] not in IMAGES:
            raise ProviderError(
                "Your query returned no results. Please change your search criteria and try again."
            )
        return {"id": wanted[0], "imageId": wanted[0], "state": "available", **IMAGES[wanted[0]]}

    def _subnet(self, args: dict[str, Any]) -> dict[str, Any]:
        subnet = self.subnets.get(args.get("id", ""))
        if subnet is None:
            raise ProviderError(f"no matching EC2 Subnet found for {args.get('id')}")
        return subnet

    def _security_group(self, args: dict[str, Any]) -> dict[str, Any]:
        group = self.security_groups.get(args.get("id", ""))
        if group is None:
            raise ProviderError(f"no matching EC2 Security Group found for {args.get('id')}")
        return group

    def _offerings(self, args: dict[str, Any]) -> dict[str, Any]:
        types = [v for f in args.get("filters", []) if f["name"] == "instance-type" for v in f["values"]]
        offered = [t for t in types if t in default_catalog().names()]
        return {
            "locations": list(self.zones) if offered else [],
            "instanceTypes": offered * len(self.zones),
            "locationTypes": ["availability-zone"] * (len(self.zones) if offered else 0),
            "id": "us-east-1",
        }

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        inputs = dict(args.inputs)
        resource_id, extra = self._outputs_for(args.typ, args.name, inputs)
        outputs = {**inputs, **extra}
        self.resources.append(Recorded(args.typ, args.name, inputs, outputs))
        return resource_id, outputs

    def _outputs_for(self, typ: str, name: str, inputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        short = typ.rsplit(":", maxsplit=1)[-1]
        arn_base = f"arn:aws:{typ.split(':')[1].split('/', maxsplit=1)[0]}::{ACCOUNT}"
        if short == "Instance":
            index = sum(1 for r in self.resources if r.typ == typ)
            ip = str(ipaddress.ip_address("10.42.0.10") + index)
            return f"i-{_digest(name)}", {
                "privateIp": ip,
                "availabilityZone": "us-east-1a",
                "arn": f"{arn_base}:instance/i-{_digest(name)}",
            }
        if short == "Bucket":
            bucket = f"{inputs.get('bucketPrefix', name)}{_digest(name, length=8)}"
            return bucket, {"bucket": bucket, "arn": f"arn:aws:s3:::{bucket}"}
        if short in ("Role", "InstanceProfile"):
            return name, {
                "name": name,
                "arn": f"arn:aws:iam::{ACCOUNT}:{short.lower()}/{name}",
                "uniqueId": _digest(name, length=20),
            }
        prefixes = {
            "SecurityGroup": "sg",
            "Vpc": "vpc",
            "Subnet": "subnet",
            "RouteTable": "rtb",
            "InternetGateway": "igw",
            "NatGateway": "nat",
            "Eip": "eipalloc",
            "VpcEndpoint": "vpce",
            "DefaultSecurityGroup": "sg",
        }
        prefix = prefixes.get(short, short.lower())
        return f"{prefix}-{_digest(name)}", {"arn": f"{arn_base}:{short.lower()}/{name}"}

    # ---- queries for tests ---------------------------------------------------------------------------

    def of_type(self, token: str) -> list[Recorded]:
        return [r for r in self.resources if r.typ == token]

    def one(self, token: str) -> Recorded:
        found = self.of_type(token)
        assert len(found) == 1, f"expected one {token}, found {[r.name for r in found]}"
        return found[0]


def configure(mocks: CatalogBackedAws, config: Mapping[str, Any], *, stack: str = "test") -> None:
    """Fresh Pulumi runtime state for one program run: mocks, a new root stack, the stack's config."""
    pulumi_settings.ROOT.set(None)
    pulumi.runtime.set_mocks(mocks, project="llamahost", stack=stack, preview=False)
    values = {"aws:region": "us-east-1"}
    for key, value in config.items():
        full = key if ":" in key else f"llamahost:{key}"
        values[full] = value if isinstance(value, str) else _json(value)
    pulumi.runtime.set_all_config(values)


def _json(value: Any) -> str:
    import json

    return json.dumps(value)


# ``pulumi.runtime.test`` is unannotated: it wraps a function returning an Output into one that runs it to completion.
pulumi_test = cast(Callable[[Callable[[], pulumi.Output[None]]], Callable[[], None]], pulumi.runtime.test)


def run_program() -> dict[str, Any]:
    """Run infra/__main__.py (the real program) and return its stack outputs (Outputs, not yet resolved)."""
    runpy.run_path(str(PROGRAM), run_name="__main__")
    root = pulumi_settings.get_root_resource()
    assert root is not None
    outputs: dict[str, Any] = root.outputs  # type: ignore[attr-defined]
    return outputs


@dataclass
class Deployment:
    """One run of the program under mocks: the recorded resources and the resolved stack outputs."""

    mocks: CatalogBackedAws
    outputs: dict[str, Any]

    def resources(self, token: str) -> list[Recorded]:
        return self.mocks.of_type(token)

    def one(self, token: str) -> Recorded:
        return self.mocks.one(token)


def deploy(config: Mapping[str, Any], mocks: CatalogBackedAws | None = None) -> Deployment:
    """Run the real program (infra/__main__.py) with ``config`` under mocks; resolve every output.

    ``@pulumi.runtime.test`` waits for all resource registrations and applies, and re-raises what
    failed inside them, so a broken apply fails the test instead of vanishing.
    """
    mocks = mocks or CatalogBackedAws()
    resolved: dict[str, Any] = {}

    @pulumi_test
    def run() -> pulumi.Output[None]:
        configure(mocks, config)
        outputs = run_program()
        keys = list(outputs)
        return pulumi.Output.all(*[outputs[k] for k in keys]).apply(
            lambda values: resolved.update(zip(keys, values, strict=True))
        )

    run()
    return Deployment(mocks, resolved)

"""``CpuInferenceHost``: identical, locked-down EC2 hosts for llama.cpp, and what Ansible needs to reach them.

Secure by default, not by option: IMDSv2 only (hop limit 1, so containers cannot borrow the role),
encrypted gp3 root and model volumes, no public IP, no SSH port unless SSH access is asked for and then
only from the client security group, the server port only from that group, egress to TCP 80 and 443 only
(plus the fleet's study store, named by its security group, when one is given), an instance role limited to
SSM and (optionally) reading one S3 prefix, SMT off through CPU options where the type allows it, and a
pinned image. All the choices are made beforehand in :class:`~llamahost_infra.plan.HostPlan`; this class
only turns them into resources.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pulumi
import pulumi_aws as aws

from llamahost_infra.access import assume_role_policy, model_read_policy, ssm_core_policy_arn
from llamahost_infra.inventory import connection_vars
from llamahost_infra.plan import HostPlan

DATA_DEVICE = "/dev/sdf"
SSM_TRANSFER_EXPIRY_DAYS = 1
# Ubuntu and Debian mirrors are plain HTTP (packages are signed); everything else is HTTPS.
EGRESS_PORTS = (80, 443)
SSH_PORT = 22


@dataclass(frozen=True)
class CpuInferenceHostArgs:
    """Typed arguments of :class:`CpuInferenceHost`. Plain values except the network, which may be
    created in the same program."""

    plan: HostPlan
    ami_id: str
    region: str
    vpc_id: pulumi.Input[str]
    subnet_id: pulumi.Input[str]
    user_data: str
    facts: Mapping[str, Any]
    count: int = 1
    server_port: int = 8080
    client_security_group_id: pulumi.Input[str] | None = None
    fleet_database_security_group_id: str | None = None
    fleet_database_port: int = 5432
    access: str = "ssm"
    key_name: str | None = None
    ssm_bucket: str | None = None
    model_s3: tuple[str, str] | None = None
    kms_key_id: str | None = None
    partition: str = "aws"
    dns_suffix: str = "amazonaws.com"
    tags: Mapping[str, str] = field(default_factory=dict)


class CpuInferenceHost(pulumi.ComponentResource):
    """``count`` identical inference hosts plus their security groups, role and SSM transfer bucket."""

    hosts: pulumi.Output[list[dict[str, Any]]]
    security_group_id: pulumi.Output[str]
    client_security_group_id: pulumi.Output[str]
    role_arn: pulumi.Output[str]
    ssm_bucket: pulumi.Output[str] | None

    def __init__(
        self, name: str, args: CpuInferenceHostArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("llamahost:infra:CpuInferenceHost", name, None, opts)
        self._name = name
        self._args = args
        self._child = pulumi.ResourceOptions(parent=self)
        tags = {**args.tags, "llamahost:role": "inference"}

        client_group_id = self._client_group(tags)
        host_group = self._host_group(client_group_id, tags)
        profile, role = self._instance_profile(tags)
        bucket = self._ssm_bucket(tags) if args.access == "ssm" else None

        instances = [self._instance(index, host_group, profile, tags) for index in range(args.count)]
        self.hosts = pulumi.Output.all(
            *[self._host_entry(i, instance, bucket) for i, instance in enumerate(instances)]
        )
        self.security_group_id = host_group.id
        self.client_security_group_id = pulumi.Output.from_input(client_group_id)
        self.role_arn = role.arn
        self.ssm_bucket = bucket
        self.register_outputs(
            {
                "hosts": self.hosts,
                "security_group_id": self.security_group_id,
                "client_security_group_id": self.client_security_group_id,
                "role_arn": self.role_arn,
            }
        )

    # ---- network access ------------------------------------------------------------------------------

    def _client_group(self, tags: dict[str, str]) -> pulumi.Input[str]:
        """The named group whose members may call the server; created empty when none is given."""
        args = self._args
        if args.client_security_group_id is not None:
            return args.client_security_group_id
        group = aws.ec2.SecurityGroup(
            f"{self._name}-clients",
            vpc_id=args.vpc_id,
            description="Members may call llama-server on the llamahost hosts",
            ingress=[],
            # No inline egress, not even an empty list: its one egress rule is a separate resource (below), and
            # an inline list would claim every egress rule of the group, so a `pulumi refresh` would see that
            # rule as drift and the next `pulumi up` would delete it. The provider still removes AWS's default
            # allow-all egress when it creates the group.
            tags={**tags, "Name": f"{self._name}-clients"},
            opts=self._child,
        )
        return group.id

    def _host_group(self, client_group_id: pulumi.Input[str], tags: dict[str, str]) -> aws.ec2.SecurityGroup:
        args = self._args
        ingress = [
            aws.ec2.SecurityGroupIngressArgs(
                protocol="tcp",
                from_port=args.server_port,
                to_port=args.server_port,
                security_groups=[client_group_id],
                description="llama-server from the client group",
            )
        ]
        if args.access == "ssh":
            ingress.append(
                aws.ec2.SecurityGroupIngressArgs(
                    protocol="tcp",
                    from_port=SSH_PORT,
                    to_port=SSH_PORT,
                    security_groups=[client_group_id],
                    description="SSH for Ansible from the client group",
                )
            )
        egress = [
            aws.ec2.SecurityGroupEgressArgs(
                protocol="tcp",
                from_port=port,
                to_port=port,
                cidr_blocks=["0.0.0.0/0"],
                description=description,
            )
            for port, description in zip(EGRESS_PORTS, ("package mirrors", "SSM, S3, HTTPS"), strict=True)
        ]
        if args.fleet_database_security_group_id is not None:
            # Fleet tuning: every host talks to one PostgreSQL study store (docs/fleet.md). Its members only,
            # on its port only: the destination is the database's group, never an address range.
            egress.append(
                aws.ec2.SecurityGroupEgressArgs(
                    protocol="tcp",
                    from_port=args.fleet_database_port,
                    to_port=args.fleet_database_port,
                    security_groups=[args.fleet_database_security_group_id],
                    description="fleet study store (PostgreSQL)",
                )
            )
        group = aws.ec2.SecurityGroup(
            f"{self._name}-hosts",
            vpc_id=args.vpc_id,
            description="llamahost inference hosts",
            ingress=ingress,
            egress=egress,
            tags={**tags, "Name": f"{self._name}-hosts"},
            opts=self._child,
        )
        if args.client_security_group_id is None:
            # Clients may only talk to the hosts' server port (a separate rule breaks the reference cycle).
            aws.vpc.SecurityGroupEgressRule(
                f"{self._name}-clients-to-server",
                security_group_id=client_group_id,
                referenced_security_group_id=group.id,
                ip_protocol="tcp",
                from_port=args.server_port,
                to_port=args.server_port,
                description="to llama-server",
                opts=self._child,
            )
        return group

    # ---- identity ------------------------------------------------------------------------------------

    def _instance_profile(self, tags: dict[str, str]) -> tuple[aws.iam.InstanceProfile, aws.iam.Role]:
        args = self._args
        role = aws.iam.Role(
            f"{self._name}-role",
            assume_role_policy=assume_role_policy(args.dns_suffix),
            description="llamahost inference hosts: SSM agent and model reads only",
            tags=tags,
            opts=self._child,
        )
        aws.iam.RolePolicyAttachment(
            f"{self._name}-ssm-core",
            role=role.name,
            policy_arn=ssm_core_policy_arn(args.partition),
            opts=self._child,
        )
        if args.model_s3 is not None:
            bucket, prefix = args.model_s3
            aws.iam.RolePolicy(
                f"{self._name}-model-read",
                role=role.id,
                policy=model_read_policy(args.partition, bucket, prefix),
                opts=self._child,
            )
        profile = aws.iam.InstanceProfile(
            f"{self._name}-profile", role=role.name, tags=tags, opts=self._child
        )
        return profile, role

    def _ssm_bucket(self, tags: dict[str, str]) -> pulumi.Output[str]:
        """Ansible's SSM file transfers: the given bucket, or a private, encrypted, self-emptying one."""
        args = self._args
        if args.ssm_bucket:
            return pulumi.Output.from_input(args.ssm_bucket)
        bucket = aws.s3.Bucket(
            f"{self._name}-ssm",
            bucket_prefix=f"{self._name[:30]}-ssm-",
            force_destroy=True,
            tags=tags,
            opts=self._child,
        )
        aws.s3.BucketPublicAccessBlock(
            f"{self._name}-ssm-private",
            bucket=bucket.id,
            block_public_acls=True,
            block_public_policy=True,
            ignore_public_acls=True,
            restrict_public_buckets=True,
            opts=self._child,
        )
        aws.s3.BucketOwnershipControls(
            f"{self._name}-ssm-owner",
            bucket=bucket.id,
            rule=aws.s3.BucketOwnershipControlsRuleArgs(object_ownership="BucketOwnerEnforced"),
            opts=self._child,
        )
        aws.s3.BucketServerSideEncryptionConfiguration(
            f"{self._name}-ssm-encryption",
            bucket=bucket.id,
            rules=[
                aws.s3.BucketServerSideEncryptionConfigurationRuleArgs(
                    apply_server_side_encryption_by_default=aws.s3.BucketServerSideEncryptionConfigurationRuleApplyServerSideEncryptionByDefaultArgs(
                        sse_algorithm="AES256"
                    )
                )
            ],
            opts=self._child,
        )
        aws.s3.BucketLifecycleConfiguration(
            f"{self._name}-ssm-expiry",
            bucket=bucket.id,
            rules=[
                aws.s3.BucketLifecycleConfigurationRuleArgs(
                    id="expire-transfers",
                    status="Enabled",
                    filter=aws.s3.BucketLifecycleConfigurationRuleFilterArgs(prefix=""),
                    expiration=aws.s3.BucketLifecycleConfigurationRuleExpirationArgs(
                        days=SSM_TRANSFER_EXPIRY_DAYS
                    ),
                )
            ],
            opts=self._child,
        )
        return bucket.bucket

    # ---- hosts ---------------------------------------------------------------------------------------

    def _instance(
        self, index: int, group: aws.ec2.SecurityGroup, profile: aws.iam.InstanceProfile, tags: dict[str, str]
    ) -> aws.ec2.Instance:
        args = self._args
        plan = args.plan
        name = f"{self._name}-{index}"
        volume = plan.data_volume
        cpu = plan.cpu_options
        return aws.ec2.Instance(
            name,
            ami=args.ami_id,
            instance_type=plan.instance.name,
            subnet_id=args.subnet_id,
            vpc_security_group_ids=[group.id],
            iam_instance_profile=profile.name,
            associate_public_ip_address=False,
            key_name=args.key_name if args.access == "ssh" else None,
            ebs_optimized=True,
            monitoring=False,
            metadata_options=aws.ec2.InstanceMetadataOptionsArgs(
                http_endpoint="enabled",
                http_tokens="required",
                http_put_response_hop_limit=1,
                instance_metadata_tags="disabled",
            ),
            cpu_options=(
                aws.ec2.InstanceCpuOptionsArgs(
                    core_count=cpu.core_count, threads_per_core=cpu.threads_per_core
                )
                if cpu
                else None
            ),
            root_block_device=aws.ec2.InstanceRootBlockDeviceArgs(
                volume_type="gp3",
                volume_size=plan.root_volume_gib,
                encrypted=True,
                kms_key_id=args.kms_key_id,
                delete_on_termination=True,
            ),
            ebs_block_devices=[
                aws.ec2.InstanceEbsBlockDeviceArgs(
                    device_name=DATA_DEVICE,
                    volume_type="gp3",
                    volume_size=volume.size_gib,
                    throughput=volume.throughput_mibs,
                    iops=volume.iops,
                    encrypted=True,
                    kms_key_id=args.kms_key_id,
                    delete_on_termination=True,
                )
            ],
            user_data_base64=base64.b64encode(args.user_data.encode()).decode(),
            user_data_replace_on_change=False,
            volume_tags={**tags, "Name": name},
            tags={**tags, "Name": name, "llamahost:user-data-sha256": _short_digest(args.user_data)},
            opts=self._child,
        )

    def _host_entry(
        self, index: int, instance: aws.ec2.Instance, bucket: pulumi.Output[str] | None
    ) -> pulumi.Output[dict[str, Any]]:
        """One host of the ``hosts`` output: identity, address, and its inventory variables."""
        args = self._args
        name = f"{self._name}-{index}"

        def entry(values: list[Any]) -> dict[str, Any]:
            instance_id, private_ip, zone, bucket_name = values
            variables = connection_vars(
                access=args.access,
                instance_id=instance_id,
                private_ip=private_ip,
                region=args.region,
                ssm_bucket=bucket_name,
            )
            variables.update(args.facts)
            variables["llamahost_private_ip"] = private_ip
            # The security group opens the server port to the client group, so the server binds the
            # address clients reach; the role then requires (or generates) an API key.
            variables["llama_server_host"] = private_ip
            variables["llamahost_availability_zone"] = zone
            return {
                "name": name,
                "instance_id": instance_id,
                "private_ip": private_ip,
                "availability_zone": zone,
                "instance_type": args.plan.instance.name,
                "vars": variables,
            }

        return pulumi.Output.all(
            instance.id, instance.private_ip, instance.availability_zone, bucket if bucket is not None else ""
        ).apply(entry)


def _short_digest(text: str) -> str:
    """A tag that shows which boot configuration a host started with (user data changes do not replace it)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]

"""A new private network for the hosts, used when the stack names no existing subnet.

One private subnet in a zone that offers the chosen type; nothing in it gets a public IP. Egress goes
through a NAT gateway in a small public subnet (for package mirrors) unless it is turned off, in which case
interface endpoints carry SSM. S3 is always reachable through a free gateway endpoint (model downloads,
Ansible's SSM file transfers). The VPC's default security group is emptied so nothing falls back to it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

import pulumi
import pulumi_aws as aws

# The interface endpoints the SSM agent needs when there is no NAT (AWS Systems Manager user guide).
SSM_ENDPOINT_SERVICES = ("ssm", "ssmmessages", "ec2messages")


@dataclass(frozen=True)
class PrivateNetworkArgs:
    cidr: str
    availability_zone: str
    region: str
    nat_gateway: bool = True
    ssm_endpoints: bool = False
    tags: Mapping[str, str] = field(default_factory=dict)


def split_cidr(cidr: str) -> tuple[str, str]:
    """The private subnet (first half of the network) and a small public one for the NAT gateway."""
    network = ipaddress.ip_network(cidr)
    private, rest = network.subnets(prefixlen_diff=1)
    public = next(rest.subnets(new_prefix=min(28, rest.prefixlen + 4)))
    return str(private), str(public)


class PrivateNetwork(pulumi.ComponentResource):
    vpc_id: pulumi.Output[str]
    subnet_id: pulumi.Output[str]
    cidr_block: str

    def __init__(
        self, name: str, args: PrivateNetworkArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("llamahost:infra:PrivateNetwork", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        tags = dict(args.tags)
        private_cidr, public_cidr = split_cidr(args.cidr)
        self.cidr_block = args.cidr

        vpc = aws.ec2.Vpc(
            f"{name}-vpc",
            cidr_block=args.cidr,
            enable_dns_support=True,
            enable_dns_hostnames=True,
            tags={**tags, "Name": f"{name}-vpc"},
            opts=child,
        )
        aws.ec2.DefaultSecurityGroup(
            f"{name}-default-sg",
            vpc_id=vpc.id,
            ingress=[],
            egress=[],
            tags={**tags, "Name": f"{name}-default-unused"},
            opts=child,
        )
        private = aws.ec2.Subnet(
            f"{name}-private",
            vpc_id=vpc.id,
            cidr_block=private_cidr,
            availability_zone=args.availability_zone,
            map_public_ip_on_launch=False,
            tags={**tags, "Name": f"{name}-private"},
            opts=child,
        )
        private_routes = aws.ec2.RouteTable(
            f"{name}-private-rt", vpc_id=vpc.id, tags={**tags, "Name": f"{name}-private"}, opts=child
        )
        aws.ec2.RouteTableAssociation(
            f"{name}-private-rta", subnet_id=private.id, route_table_id=private_routes.id, opts=child
        )
        aws.ec2.VpcEndpoint(
            f"{name}-s3",
            vpc_id=vpc.id,
            service_name=f"com.amazonaws.{args.region}.s3",
            vpc_endpoint_type="Gateway",
            route_table_ids=[private_routes.id],
            tags={**tags, "Name": f"{name}-s3"},
            opts=child,
        )
        if args.nat_gateway:
            self._nat(name, vpc, public_cidr, args, private_routes, tags, child)
        if args.ssm_endpoints:
            self._ssm_endpoints(name, vpc, private, args, tags, child)

        self.vpc_id = vpc.id
        self.subnet_id = private.id
        self.register_outputs({"vpc_id": vpc.id, "subnet_id": private.id})

    @staticmethod
    def _nat(
        name: str,
        vpc: aws.ec2.Vpc,
        public_cidr: str,
        args: PrivateNetworkArgs,
        private_routes: aws.ec2.RouteTable,
        tags: dict[str, str],
        child: pulumi.ResourceOptions,
    ) -> None:
        """Egress for package mirrors: the NAT gateway holds the only public address in the network."""
        public = aws.ec2.Subnet(
            f"{name}-public",
            vpc_id=vpc.id,
            cidr_block=public_cidr,
            availability_zone=args.availability_zone,
            map_public_ip_on_launch=False,
            tags={**tags, "Name": f"{name}-public-nat-only"},
            opts=child,
        )
        gateway = aws.ec2.InternetGateway(
            f"{name}-igw", vpc_id=vpc.id, tags={**tags, "Name": f"{name}-igw"}, opts=child
        )
        public_routes = aws.ec2.RouteTable(
            f"{name}-public-rt",
            vpc_id=vpc.id,
            routes=[aws.ec2.RouteTableRouteArgs(cidr_block="0.0.0.0/0", gateway_id=gateway.id)],
            tags={**tags, "Name": f"{name}-public"},
            opts=child,
        )
        aws.ec2.RouteTableAssociation(
            f"{name}-public-rta", subnet_id=public.id, route_table_id=public_routes.id, opts=child
        )
        address = aws.ec2.Eip(
            f"{name}-nat-ip", domain="vpc", tags={**tags, "Name": f"{name}-nat"}, opts=child
        )
        nat = aws.ec2.NatGateway(
            f"{name}-nat",
            subnet_id=public.id,
            allocation_id=address.id,
            tags={**tags, "Name": f"{name}-nat"},
            opts=pulumi.ResourceOptions(parent=child.parent, depends_on=[gateway]),
        )
        aws.ec2.Route(
            f"{name}-private-default",
            route_table_id=private_routes.id,
            destination_cidr_block="0.0.0.0/0",
            nat_gateway_id=nat.id,
            opts=child,
        )

    @staticmethod
    def _ssm_endpoints(
        name: str,
        vpc: aws.ec2.Vpc,
        private: aws.ec2.Subnet,
        args: PrivateNetworkArgs,
        tags: dict[str, str],
        child: pulumi.ResourceOptions,
    ) -> None:
        """SSM without internet: interface endpoints reachable on 443 from inside the VPC only."""
        group = aws.ec2.SecurityGroup(
            f"{name}-endpoints",
            vpc_id=vpc.id,
            description="HTTPS from the llamahost VPC to the SSM endpoints",
            ingress=[
                aws.ec2.SecurityGroupIngressArgs(
                    protocol="tcp",
                    from_port=443,
                    to_port=443,
                    cidr_blocks=[args.cidr],
                    description="VPC to endpoints",
                )
            ],
            egress=[],
            tags={**tags, "Name": f"{name}-endpoints"},
            opts=child,
        )
        for service in SSM_ENDPOINT_SERVICES:
            aws.ec2.VpcEndpoint(
                f"{name}-{service}",
                vpc_id=vpc.id,
                service_name=f"com.amazonaws.{args.region}.{service}",
                vpc_endpoint_type="Interface",
                subnet_ids=[private.id],
                security_group_ids=[group.id],
                private_dns_enabled=True,
                tags={**tags, "Name": f"{name}-{service}"},
                opts=child,
            )

"""IAM documents for the hosts' role: SSM core, and optionally read access to one S3 model prefix.

Nothing else: no wildcard actions, no write access anywhere. Ansible's SSM connection moves files through
presigned S3 URLs made with the operator's credentials, so the hosts need no access to that bucket.
"""

from __future__ import annotations

import json


def assume_role_policy(dns_suffix: str) -> str:
    """Only EC2 (in this partition) may assume the role."""
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"Service": f"ec2.{dns_suffix}"},
                    "Action": "sts:AssumeRole",
                }
            ],
        }
    )


def ssm_core_policy_arn(partition: str) -> str:
    """AWS's managed policy for the SSM agent (sessions, commands, inventory); nothing beyond it."""
    return f"arn:{partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"


def model_read_policy(partition: str, bucket: str, prefix: str) -> str:
    """Read the objects under ``s3://bucket/prefix/`` and list only that prefix."""
    prefix = prefix.strip("/")
    objects = f"arn:{partition}:s3:::{bucket}/{prefix}/*" if prefix else f"arn:{partition}:s3:::{bucket}/*"
    listing: dict[str, object] = {
        "Sid": "ListModelPrefix",
        "Effect": "Allow",
        "Action": "s3:ListBucket",
        "Resource": f"arn:{partition}:s3:::{bucket}",
    }
    if prefix:
        listing["Condition"] = {"StringLike": {"s3:prefix": [prefix, f"{prefix}/*"]}}
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {"Sid": "ReadModelObjects", "Effect": "Allow", "Action": "s3:GetObject", "Resource": objects},
                listing,
            ],
        }
    )

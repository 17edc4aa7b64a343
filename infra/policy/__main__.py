"""The llamahost policy pack: `pulumi preview --policy-pack policy` (the checks are in llamahost_policies)."""

from llamahost_policies import POLICIES
from pulumi_policy import EnforcementLevel, PolicyPack

PolicyPack(
    name="llamahost-security",
    description="IMDSv2, encrypted EBS, no public ingress, public egress on 80/443 only, no public IP, no admin IAM.",
    enforcement_level=EnforcementLevel.MANDATORY,
    policies=list(POLICIES),
)

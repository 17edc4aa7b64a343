"""The hand-off to Ansible: stack outputs -> an inventory with the hosts in group ``llama_hosts``.

One builder for every route: the program exports the inventory as YAML (``pulumi stack output
ansible_inventory``), ``write_inventory.py`` writes the same inventory to a file atomically, and
``stack_inventory.py`` serves it to Ansible as a dynamic inventory script. Each host entry carries the
connection variables (SSM: ``amazon.aws.aws_ssm`` with instance ID, region and transfer bucket; SSH: the
private IP) and the ``llamahost_*`` facts the roles and the tuner read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.compat import StringIO

from tuner.errors import UserError

GROUP = "llama_hosts"
# community.aws.aws_ssm redirects here since community.aws 10 (the `ansible` 12 package ships both).
SSM_CONNECTION = "amazon.aws.aws_ssm"
PYTHON = "/usr/bin/python3"
HOST_KEYS = ("name", "instance_id", "private_ip", "vars")


def connection_vars(
    *,
    access: str,
    instance_id: str,
    private_ip: str,
    region: str,
    ssm_bucket: str | None,
    ssh_user: str = "ubuntu",
) -> dict[str, Any]:
    """How Ansible reaches one host. SSM needs no open port; SSH goes to the private IP."""
    if access == "ssm":
        if not ssm_bucket:
            raise UserError(
                "SSM access needs a transfer bucket", "set llamahost:ssmBucket or let the stack make one"
            )
        return {
            "ansible_connection": SSM_CONNECTION,
            # The plugin reads the instance from ansible_aws_ssm_instance_id; some versions fall back to
            # ansible_host, so both name the instance.
            "ansible_host": instance_id,
            "ansible_aws_ssm_instance_id": instance_id,
            "ansible_aws_ssm_region": region,
            "ansible_aws_ssm_bucket_name": ssm_bucket,
            "ansible_python_interpreter": PYTHON,
        }
    return {"ansible_host": private_ip, "ansible_user": ssh_user, "ansible_python_interpreter": PYTHON}


def build_inventory(hosts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A YAML/JSON inventory: ``all.children.llama_hosts.hosts.<name>: vars``."""
    if not hosts:
        raise UserError("the stack output has no hosts", "run `pulumi up` first, in the infra/ directory")
    entries: dict[str, Any] = {}
    for index, host in enumerate(hosts):
        missing = [key for key in HOST_KEYS if key not in host]
        if missing:
            raise UserError(
                f"host {index} of the stack output lacks {', '.join(missing)}",
                "pass the JSON of `pulumi stack output --json` from llamahost's stack",
            )
        name = str(host["name"])
        if name in entries:
            raise UserError(
                f"host name {name!r} appears twice in the stack output", "check llamahost:namePrefix"
            )
        entries[name] = dict(host["vars"])
    return {"all": {"children": {GROUP: {"hosts": entries}}}}


def inventory_from_stack_output(outputs: Mapping[str, Any]) -> dict[str, Any]:
    """The inventory from the whole ``pulumi stack output --json`` object."""
    hosts = outputs.get("hosts")
    if not isinstance(hosts, list):
        raise UserError(
            "the stack output has no 'hosts' list",
            "pass the JSON of `pulumi stack output --json` run in llamahost's infra/ directory",
        )
    return build_inventory(hosts)


def render_yaml(inventory: Mapping[str, Any]) -> str:
    yaml = YAML()
    yaml.default_flow_style = False
    buffer = StringIO()
    yaml.dump(_plain(inventory), buffer)
    return (
        "# Ansible inventory written from llamahost's Pulumi stack outputs; regenerate, do not edit.\n"
        + str(buffer.getvalue())
    )


def _plain(value: Any) -> Any:
    """Plain dicts/lists so the YAML carries no Python or Pulumi types."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value

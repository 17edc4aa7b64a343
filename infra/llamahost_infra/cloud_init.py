"""The host's first boot: the least that makes it ready for Ansible, nothing the playbook does better.

Two things only: python3 for Ansible's modules (and botocore, with which the llama_server role signs the
requests for a model in the granted S3 prefix with the instance's own role, so the play's validation can
check the volume's room for it before any change), and the model volume formatted (once) and mounted at
:data:`~llamahost_infra.plan.MODEL_DIR`, so the playbook finds a filesystem where the facts say. The data
volume is found as the one blank "Amazon Elastic Block Store" NVMe disk: on Nitro instances EBS volumes
appear as /dev/nvme*n1 in no guaranteed order, and instance-store disks carry a different model name. (The
script's second argument names another disk model: the lab tests run this very script on a QEMU NVMe disk.)
Packages, kernel settings and llama-server are the playbook's job; SSH keys are never written (access
is through SSM unless the stack asks for SSH).
"""

from __future__ import annotations

from ruamel.yaml import YAML
from ruamel.yaml.compat import StringIO
from ruamel.yaml.scalarstring import LiteralScalarString

DATA_VOLUME_LABEL = "llamahost-models"
DATA_VOLUME_SCRIPT_PATH = "/usr/local/sbin/llamahost-data-volume"
# What /sys/block/nvme*n1/device/model says for an EBS volume; instance-store disks say something else.
EBS_DISK_MODEL = "Amazon Elastic Block Store"

DATA_VOLUME_SCRIPT = f"""#!/bin/sh
# Format (once) and mount the llamahost model volume: the only blank EBS disk of this host.
# Idempotent: a labelled filesystem is reused, never formatted again.
# Usage: llamahost-data-volume MOUNT_POINT [DISK_MODEL] (default: EBS's NVMe model name)
set -eu
mount_point="$1"
disk_model="${{2:-{EBS_DISK_MODEL}}}"
label={DATA_VOLUME_LABEL}
if ! blkid -L "$label" >/dev/null 2>&1; then
  for dev in /dev/nvme*n1; do
    [ -b "$dev" ] || continue
    case "$(cat "/sys/block/${{dev#/dev/}}/device/model" 2>/dev/null || true)" in
      "$disk_model"*) ;;
      *) continue ;;
    esac
    [ "$(lsblk -nro NAME "$dev" | wc -l)" -eq 1 ] || continue  # partitioned: the root disk
    if blkid -p "$dev" >/dev/null 2>&1; then continue; fi      # holds data: not ours to format
    mkfs.ext4 -q -L "$label" "$dev"
    break
  done
fi
blkid -L "$label" >/dev/null 2>&1 || {{ echo "llamahost: no blank '$disk_model' data volume found" >&2; exit 1; }}
mkdir -p "$mount_point"
entry="LABEL=$label $mount_point ext4 defaults,noatime,nofail 0 2"
grep -q "^LABEL=$label " /etc/fstab || echo "$entry" >> /etc/fstab
mountpoint -q "$mount_point" || mount "$mount_point"
"""


def render_user_data(model_dir: str) -> str:
    """The ``#cloud-config`` document for every host of the stack (identical hosts, identical boot)."""
    document = {
        "package_update": True,
        "packages": ["python3", "python3-botocore"],
        "write_files": [
            {
                "path": DATA_VOLUME_SCRIPT_PATH,
                "permissions": "0755",
                "owner": "root:root",
                "content": LiteralScalarString(DATA_VOLUME_SCRIPT),
            }
        ],
        "runcmd": [[DATA_VOLUME_SCRIPT_PATH, model_dir]],
    }
    yaml = YAML()
    yaml.default_flow_style = False
    buffer = StringIO()
    yaml.dump(document, buffer)
    header = (
        "#cloud-config\n"
        "# Written by llamahost's Pulumi program (infra/): python3 (and botocore) for Ansible and the model volume.\n"
        "# Everything else is the playbook's job (playbooks/site.yml).\n"
    )
    return header + str(buffer.getvalue())

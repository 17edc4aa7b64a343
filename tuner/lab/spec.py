"""What the lab host is, as plain data: the image recipe and the emulated machine.

The two are kept apart on purpose. The recipe decides what is on the disk and keys the image cache, so
changing it rebuilds the image; the machine (memory, CPU topology) is only a QEMU command line, so
changing it needs nothing but a new boot.

Why these defaults:

* ``Skylake-Server`` with ``sockets=2,cores=2,threads=2``: under TCG it keeps SMT siblings visible to the
  guest (``EPYC`` loses them) and offers ``pdpe1gb``, so 1 GiB pages can be tested.
* A blank NVMe data disk (``data_disk_gib``) beside the virtio root disk: it stands for the stack's EBS model
  volume, which the stack's own first-boot script formats and mounts (NVMe, as on Nitro instances).
* 4 GiB per node: the kernel reserves 1 GiB pages at boot from free, whole, 1 GiB-aligned ranges of each
  node, and node 0 also holds the kernel (anywhere, with KASLR), the initrd and the node's NODE_DATA (at
  its top). With 2 or 3 GiB per node, or 4 GiB with QEMU's default 3 GiB below 4 GiB, node 0 had no
  such gigabyte left and the kernel quietly put node 0's 1 GiB page on node 1 (checked on the lab; the
  hugepages role's verify step caught it). 4 GiB per node with 1 GiB mapped below 4 GiB (see
  tuner.lab.machine) leaves node 0 three whole gigabytes above 4 GiB. Guest memory is allocated on the
  host only when touched, so the lab costs the host far less than 8 GiB.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import asdict, dataclass

from tuner.cpu_lists import format_cpu_list

# Everything the roles need must be on the disk: the guest has no route to any network (see
# tuner.lab.machine), so `apt` in a role can only confirm that a package is installed.
BASE_PACKAGES: tuple[str, ...] = (
    "linux-image-amd64",
    "systemd-sysv",
    "udev",
    "dbus",
    "openssh-server",
    "sudo",
    "python3",
    "python3-apt",  # Ansible's apt module
    "grub-pc-bin",  # the real bootloader (booted through lnxboot.img, see tuner.lab.recipe)
    "grub2-common",  # update-grub, /etc/default/grub's template
    "iproute2",
    "procps",
    "kmod",
)
ROLE_PACKAGES: tuple[str, ...] = (
    "numactl",  # numa role
    "irqbalance",  # cpu role
    "libgomp1",  # llama-server (OpenMP); see the build manifest's debian_packages
)
# What the Pulumi stack's first-boot script needs to format the data volume (infra/llamahost_infra/cloud_init.py);
# Ubuntu's cloud images have it, a minimal Debian does not.
STACK_BOOT_PACKAGES: tuple[str, ...] = ("e2fsprogs",)
# Lab-only kernel arguments, in GRUB_CMDLINE_LINUX: a serial console for the boot log; no CPU
# vulnerability mitigations because page-table isolation makes every system call flush TCG's TLB; and
# no KASLR, so the kernel image sits at 16 MiB in the low gigabyte on every boot. With KASLR it lands at a
# random address, often in one of node 0's three high gigabytes (4-7 GiB, see tuner.lab.machine), where
# the early per-node allocations also go; once it left node 0 no free aligned gigabyte, and the kernel
# put node 0's boot-time 1 GiB page on node 1 (a clean CI saw 0 and 2 pages where the roles asked 1 and 1).
# And no crypto self-tests at boot: a landing CI's boot hung with CPU#6 stuck in cryptomgr_test for 800 s
# (the boot watch in tuner.lab.instance now restarts such a boot, but the reboots inside the lab tests have
# no restart); the self-tests check the kernel's crypto code, which the lab does not test.
LAB_KERNEL_ARGS: tuple[str, ...] = ("console=ttyS0", "mitigations=off", "nokaslr", "cryptomgr.notests")
_UUID_NAMESPACE = uuid.UUID("3f0c9a4e-1f6b-4d55-9a57-6c1d2b7f4e10")


@dataclass(frozen=True)
class ImageRecipe:
    """What goes on the lab disk. Every field is part of the image cache key."""

    suite: str = "bookworm"
    packages: tuple[str, ...] = BASE_PACKAGES + ROLE_PACKAGES + STACK_BOOT_PACKAGES
    disk_gib: int = 6
    user: str = "lab"
    hostname: str = "llamahost-lab"
    kernel_args: tuple[str, ...] = LAB_KERNEL_ARGS

    def fields(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class MachineSpec:
    """The emulated machine: one NUMA node per socket, ``threads_per_core`` SMT siblings per core."""

    sockets: int = 2
    cores_per_socket: int = 2
    threads_per_core: int = 2
    memory_per_node_mib: int = 4096
    cpu_model: str = "Skylake-Server"
    data_disk_gib: int = 2  # sparse: costs the host only what the guest writes; 0 leaves the disk out

    @property
    def cpus(self) -> int:
        return self.sockets * self.cores_per_socket * self.threads_per_core

    @property
    def memory_mib(self) -> int:
        return self.sockets * self.memory_per_node_mib

    def node_cpus(self, node: int) -> str:
        """CPU list of one node. QEMU numbers CPUs socket by socket, core by core, thread by thread."""
        per_node = self.cores_per_socket * self.threads_per_core
        return format_cpu_list(range(node * per_node, (node + 1) * per_node))

    def problems(self) -> list[str]:
        out = []
        for name in ("sockets", "cores_per_socket", "threads_per_core"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be at least 1")
        if self.data_disk_gib < 0:
            out.append("data_disk_gib must be 0 (no data disk) or more")
        if self.memory_per_node_mib < 1024:
            out.append("memory_per_node_mib must be at least 1024 (the guest, the server and its model)")
        return out


def content_key(*parts: object) -> str:
    """A short, stable digest of JSON-serialisable parts (the image cache key)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def root_uuid(key: str) -> str:
    """The root filesystem's UUID, fixed per image so the bootloader can find it by UUID."""
    return str(uuid.uuid5(_UUID_NAMESPACE, key))

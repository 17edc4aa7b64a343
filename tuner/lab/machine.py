"""The QEMU command line of a lab host (pure; :mod:`tuner.lab.instance` runs it).

Decisions, and why:

* TCG only. Nested KVM guests hang at boot on the CI machines this runs on; TCG is slow but works.
* Networking is QEMU's user-mode stack with ``restrict=on``: the guest gets DHCP and nothing else, no
  route to the host or the internet, while the forwarded SSH port still works. The roles are therefore
  proven offline (every package they need is on the image), and no test depends on a mirror.
* SSH is forwarded from ``127.0.0.1`` only, never from all interfaces.
* The disk is a qcow2 overlay on the cached raw base image, so the base stays clean and a new lab is one
  small file. A lab may also start from a saved disk (a converged host, see ``LabInstance.save_disk``): the
  overlay then sits on that qcow2, which sits on the base image. ``cache=unsafe`` skips host flushes: the
  overlay is thrown away with the lab (a disk is saved only after a clean guest shutdown).
* The data disk is an NVMe device (QEMU's model name: :data:`DATA_DISK_MODEL`), a qcow2 of its own: blank, or
  an overlay on a saved lab's data disk. It stands for the stack's EBS model volume, which Nitro instances
  show as NVMe, so the stack's first-boot script finds it the way it finds EBS (by the disk's model name).
* ``max-ram-below-4g=1G``: below 4 GiB QEMU's ``pc`` machine has RAM up to just under 3 GiB (the top
  pages are firmware's), so no gigabyte there is whole RAM and the first holds the kernel and initrd.
  Mapping only 1 GiB low moves the rest of node 0 above 4 GiB as three whole gigabytes; the image turns
  KASLR off (``LAB_KERNEL_ARGS``) so the kernel stays in the low gigabyte instead of taking one of them.
* ``-daemonize`` with a pid file: QEMU's parent exits once the machine runs, so the CLI returns, and a
  guest reboot is a machine reset inside the same QEMU process that goes through GRUB again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tuner.lab.spec import MachineSpec

GUEST_SSH_PORT = 22
# Only the first GiB of guest RAM below 4 GiB: node 0 then continues above 4 GiB with whole, aligned
# gigabytes, so the kernel can reserve its 1 GiB page there (see tuner.lab.spec).
LOW_RAM = "1G"
# /sys/block/nvme0n1/device/model of QEMU's emulated NVMe controller.
DATA_DISK_MODEL = "QEMU NVMe Ctrl"
DATA_DISK_SERIAL = "llamahost-data"
# The guest's one address, from the user-mode stack's DHCP (pinned here rather than left to QEMU's defaults):
# the lab's stand-in for a cloud host's private IP, which a server open to clients binds.
GUEST_NETWORK = "10.0.2.0/24"
GUEST_ADDRESS = "10.0.2.15"


@dataclass(frozen=True)
class MachineFiles:
    """Where one running lab keeps its disk, bootloader and logs."""

    overlay: Path
    data_disk: Path
    bootloader: Path
    serial_log: Path
    qemu_log: Path
    pid_file: Path


def overlay_command(base: Path, overlay: Path, *, base_format: str = "raw") -> list[str]:
    """A copy-on-write disk on top of ``base`` (absolute path: QEMU resolves it later): the cached raw image,
    or a saved lab disk (qcow2, itself on top of the image) that a boot should start from."""
    return ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base.resolve()), "-F", base_format, str(overlay)]


def data_disk_command(data_disk: Path, size_gib: int, *, saved: Path | None = None) -> list[str]:
    """The lab's data disk: blank (``size_gib``, sparse), or an overlay on a saved lab's data disk."""
    if saved is not None:
        return overlay_command(saved, data_disk, base_format="qcow2")
    return ["qemu-img", "create", "-q", "-f", "qcow2", str(data_disk), f"{size_gib}G"]


def saved_data_disk(saved_disk: Path) -> Path:
    """Where a saved lab disk's data disk is kept: beside it, ``<name>.data.qcow2``."""
    return saved_disk.with_name(f"{saved_disk.stem}.data.qcow2")


def qemu_command(machine: MachineSpec, files: MachineFiles, *, ssh_port: int) -> list[str]:
    cmd = [
        "qemu-system-x86_64",
        "-name", "llamahost-lab",
        "-machine", f"pc,max-ram-below-4g={LOW_RAM}",
        "-accel", "tcg,thread=multi",
        "-cpu", machine.cpu_model,
        "-smp", (f"{machine.cpus},sockets={machine.sockets},cores={machine.cores_per_socket},"
                 f"threads={machine.threads_per_core}"),
        "-m", f"{machine.memory_mib}M",
    ]
    for node in range(machine.sockets):
        cmd += [
            "-object", f"memory-backend-ram,id=mem{node},size={machine.memory_per_node_mib}M",
            "-numa", f"node,nodeid={node},cpus={machine.node_cpus(node)},memdev=mem{node}",
        ]
    cmd += [
        "-drive", f"file={files.overlay},if=virtio,format=qcow2,cache=unsafe",
    ]
    if machine.data_disk_gib:
        cmd += [
            "-drive", f"file={files.data_disk},if=none,id=data,format=qcow2,cache=unsafe",
            "-device", f"nvme,drive=data,serial={DATA_DISK_SERIAL}",
        ]
    cmd += [
        "-netdev", (f"user,id=net0,restrict=on,net={GUEST_NETWORK},dhcpstart={GUEST_ADDRESS},"
                    f"hostfwd=tcp:127.0.0.1:{ssh_port}-:{GUEST_SSH_PORT}"),
        "-device", "virtio-net-pci,netdev=net0",
        "-kernel", str(files.bootloader),
        "-display", "none",
        "-vga", "none",
        "-monitor", "none",
        "-serial", f"file:{files.serial_log}",
        "-pidfile", str(files.pid_file),
        "-daemonize",
    ]
    return cmd

"""The lab image build, as command lines and script texts (no I/O here; :mod:`tuner.lab.image` runs them).

Steps: ``mmdebstrap`` builds a Debian root directory from the machine's own apt sources; its hooks
configure it (below); ``mkfs.ext4 -d`` turns the directory into a disk image without loop devices or
mounts. The disk has no partition table: the root filesystem spans the whole virtual disk.

The bootloader is the guest's own GRUB, not QEMU's direct kernel boot. ``grub-mkimage`` (run inside the
new root, so its GRUB modules match) builds a core image that finds the root filesystem by UUID;
prefixed with GRUB's ``lnxboot.img`` it can be handed to QEMU as ``-kernel``. From there everything is as
on a real host: GRUB reads ``/boot/grub/grub.cfg`` from the disk, a role edits ``/etc/default/grub``
(or a drop-in) and runs ``update-grub``, and the next boot, a plain guest reboot, gets the new kernel
command line. The image ships a minimal first ``grub.cfg`` because ``update-grub`` cannot probe the root
device inside a build chroot; the first ``update-grub`` in the guest replaces it with Debian's own.
"""

from __future__ import annotations

from pathlib import Path

from tuner.lab.spec import ImageRecipe, content_key

# Bump when a build step changes in a way the recipe fields and the script texts below do not show.
RECIPE_VERSION = 1
ROOT_LABEL = "llamahost-root"
BOOTLOADER_NAME = "grub.lnx"
HOST_KEY_NAME = "ssh_host_ed25519_key.pub"
# GRUB modules the core image needs before it can read grub.cfg: disk access through the BIOS, ext4,
# finding the root by UUID, and the normal-mode menu that loads Linux.
GRUB_CORE_MODULES = ("biosdisk", "ext2", "search", "search_fs_uuid", "normal", "configfile", "linux", "echo")
# Timers that would wake up under emulation and compete with the test for the two host CPUs.
MASKED_UNITS = ("apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer", "fstrim.timer",
                "systemd-networkd-wait-online.service")
# The initramfs needs only virtio and ext4; the default MODULES=most makes it five times larger, and
# reading and unpacking it under TCG costs boot time.
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "ext4")

ESSENTIAL_HOOK = """\
#!/bin/sh
# mmdebstrap essential hook: runs after the essential packages, before the kernel is installed.
set -eu
root="$1"
mkdir -p "$root/etc/initramfs-tools/conf.d" "$root/usr/share/initramfs-tools/modules.d"
echo 'MODULES=list' > "$root/etc/initramfs-tools/conf.d/llamahost-lab.conf"
printf '%s\\n' {modules} > "$root/usr/share/initramfs-tools/modules.d/llamahost-lab"
"""

CUSTOMIZE_HOOK = """\
#!/bin/sh
# mmdebstrap customize hook: $1 root directory, $2 the lab's public SSH key, $3 output directory for the
# bootloader and the SSH host key, $4 the root filesystem UUID.
set -eu
root="$1"; pubkey="$2"; out="$3"; uuid="$4"
user={user}; hostname={hostname}

echo "$hostname" > "$root/etc/hostname"
printf '127.0.0.1 localhost\\n127.0.1.1 %s\\n' "$hostname" > "$root/etc/hosts"
echo "UUID=$uuid / ext4 errors=remount-ro 0 1" > "$root/etc/fstab"

# Network: DHCP from QEMU's user-mode stack (which routes nothing outside; only SSH is forwarded in).
mkdir -p "$root/etc/systemd/network"
printf '[Match]\\nName=en*\\n\\n[Network]\\nDHCP=yes\\n' > "$root/etc/systemd/network/20-lab.network"
chroot "$root" systemctl enable systemd-networkd.service
chroot "$root" systemctl mask {masked}

# The login Ansible uses: key only, passwordless sudo, like a cloud image's default user.
chroot "$root" useradd --create-home --shell /bin/bash --groups sudo "$user"
echo "$user ALL=(ALL) NOPASSWD:ALL" > "$root/etc/sudoers.d/90-$user"
chmod 0440 "$root/etc/sudoers.d/90-$user"
install -d -m 0700 "$root/home/$user/.ssh"
install -m 0600 "$pubkey" "$root/home/$user/.ssh/authorized_keys"
chroot "$root" chown -R "$user:$user" "/home/$user/.ssh"
printf 'PasswordAuthentication no\\nPermitRootLogin no\\n' > "$root/etc/ssh/sshd_config.d/llamahost-lab.conf"
cp "$root/etc/ssh/{host_key}" "$out/{host_key}"

# GRUB: Debian's default settings file, with the lab's own kernel arguments and no menu delay.
cp "$root/usr/share/grub/default/grub" "$root/etc/default/grub"
sed -i -e 's/^GRUB_TIMEOUT=.*/GRUB_TIMEOUT=0/' \\
       -e 's/^GRUB_CMDLINE_LINUX=.*/GRUB_CMDLINE_LINUX="{kernel_args}"/' "$root/etc/default/grub"
printf 'GRUB_TERMINAL=console\\nGRUB_DISABLE_OS_PROBER=true\\n' >> "$root/etc/default/grub"
install -d "$root/boot/grub/i386-pc"
cp "$root"/usr/lib/grub/i386-pc/*.mod "$root"/usr/lib/grub/i386-pc/*.lst "$root/boot/grub/i386-pc/"
printf 'search --no-floppy --fs-uuid --set=root %s\\nset prefix=($root)/boot/grub\\n' "$uuid" \\
  > "$root/boot/grub/early.cfg"
chroot "$root" grub-mkimage -O i386-pc -o /boot/grub/core.img -c /boot/grub/early.cfg -p /boot/grub \\
  {core_modules}
cat "$root/usr/lib/grub/i386-pc/lnxboot.img" "$root/boot/grub/core.img" > "$out/{bootloader}"
cat > "$root/boot/grub/grub.cfg" <<EOF
# First boot only: the first update-grub on the host replaces this file.
set timeout=0
menuentry 'Debian GNU/Linux (lab first boot)' {{
  linux /vmlinuz root=UUID=$uuid ro {kernel_args}
  initrd /initrd.img
}}
EOF
"""


def essential_hook() -> str:
    return ESSENTIAL_HOOK.format(modules=" ".join(INITRAMFS_MODULES))


def customize_hook(recipe: ImageRecipe) -> str:
    """The customize script; its arguments are the paths and UUID only known at build time."""
    return CUSTOMIZE_HOOK.format(
        user=recipe.user,
        hostname=recipe.hostname,
        masked=" ".join(MASKED_UNITS),
        host_key=HOST_KEY_NAME,
        kernel_args=" ".join(recipe.kernel_args),
        core_modules=" ".join(GRUB_CORE_MODULES),
        bootloader=BOOTLOADER_NAME,
    )


def image_key(recipe: ImageRecipe) -> str:
    """The image cache key: the recipe and every script that shapes the disk."""
    return content_key(RECIPE_VERSION, recipe.fields(), essential_hook(), customize_hook(recipe))


def mmdebstrap_command(recipe: ImageRecipe, *, root_dir: Path, essential_script: Path,
                       customize_script: Path, public_key: Path, out_dir: Path, uuid: str) -> list[str]:
    """Build the root directory. ``variant=apt`` plus an explicit package list keeps it small and fast."""
    customize = (f"sh {_quote(customize_script)} \"$1\" {_quote(public_key)} {_quote(out_dir)} {uuid}")
    return [
        "mmdebstrap",
        "--variant=apt",
        "--mode=root",
        "--format=directory",
        "--aptopt=Acquire::Retries \"3\"",
        f"--include={','.join(recipe.packages)}",
        f"--essential-hook=sh {_quote(essential_script)} \"$1\"",
        f"--customize-hook={customize}",
        recipe.suite,
        str(root_dir),
    ]


def mkfs_command(recipe: ImageRecipe, *, root_dir: Path, image: Path, uuid: str) -> list[str]:
    """Make the disk image from the directory: sparse, owned files kept as they are (needs root)."""
    return [
        "mkfs.ext4", "-q", "-F",
        "-d", str(root_dir),
        "-U", uuid,
        "-L", ROOT_LABEL,
        str(image), f"{recipe.disk_gib}G",
    ]


def _quote(path: Path) -> str:
    """Single-quote a path for the hook's ``sh -c`` (mmdebstrap runs hooks through the shell)."""
    return "'" + str(path).replace("'", "'\\''") + "'"

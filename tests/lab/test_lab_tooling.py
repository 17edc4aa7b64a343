"""The lab's own code, without booting anything: command builders, image keys, client files, process
bookkeeping (with real processes) and the ``llamahost lab`` command line. Fast; no ``lab`` marker."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tuner.errors import UserError
from tuner.lab import instance as instance_module
from tuner.lab.access import SshAccess, inventory_text, known_hosts_line, ssh_command, ssh_config_text
from tuner.lab.image import LabImage
from tuner.lab.instance import LabInstance, LabState
from tuner.lab.machine import (
    MachineFiles,
    data_disk_command,
    overlay_command,
    qemu_command,
    saved_data_disk,
)
from tuner.lab.recipe import customize_hook, essential_hook, image_key, mkfs_command, mmdebstrap_command
from tuner.lab.spec import ImageRecipe, MachineSpec, root_uuid

BIN = Path(sys.executable).parent


def machine_files(tmp_path: Path) -> MachineFiles:
    return MachineFiles(overlay=tmp_path / "overlay.qcow2", data_disk=tmp_path / "data.qcow2",
                        bootloader=tmp_path / "grub.lnx",
                        serial_log=tmp_path / "serial.log", qemu_log=tmp_path / "qemu.log",
                        pid_file=tmp_path / "qemu.pid")


def test_qemu_command_emulates_two_numa_sockets_with_smt_and_forwards_ssh_on_loopback_only(tmp_path: Path) -> None:
    cmd = qemu_command(MachineSpec(), machine_files(tmp_path), ssh_port=40022)
    joined = " ".join(cmd)
    assert cmd[cmd.index("-accel") + 1].startswith("tcg")
    assert "-smp 8,sockets=2,cores=2,threads=2" in joined and "-cpu Skylake-Server" in joined
    assert "node,nodeid=0,cpus=0-3,memdev=mem0" in joined and "node,nodeid=1,cpus=4-7,memdev=mem1" in joined
    assert "memory-backend-ram,id=mem1,size=4096M" in joined and "-m 8192M" in joined
    netdev = cmd[cmd.index("-netdev") + 1]
    assert "restrict=on" in netdev and "hostfwd=tcp:127.0.0.1:40022-:22" in netdev
    assert "max-ram-below-4g=1G" in cmd[cmd.index("-machine") + 1]
    assert "-daemonize" in cmd and cmd[cmd.index("-kernel") + 1].endswith("grub.lnx")
    # The data disk is NVMe, as an EBS volume is on Nitro; without one, no such device.
    assert f"file={tmp_path / 'data.qcow2'},if=none,id=data,format=qcow2,cache=unsafe" in cmd
    assert any(arg.startswith("nvme,drive=data,") for arg in cmd)
    assert "nvme" not in " ".join(qemu_command(MachineSpec(data_disk_gib=0), machine_files(tmp_path), ssh_port=1))


def test_machine_spec_numbers_cpus_socket_by_socket_and_rejects_nonsense() -> None:
    machine = MachineSpec(sockets=2, cores_per_socket=4, threads_per_core=2, memory_per_node_mib=2048)
    assert (machine.cpus, machine.memory_mib) == (16, 4096)
    assert [machine.node_cpus(n) for n in (0, 1)] == ["0-7", "8-15"]
    problems = MachineSpec(sockets=0, memory_per_node_mib=512, data_disk_gib=-1).problems()
    assert any("sockets" in p for p in problems) and any("memory_per_node_mib" in p for p in problems)
    assert any("data_disk_gib" in p for p in problems)


def test_overlay_keeps_the_cached_base_as_an_absolute_read_only_backing_file(tmp_path: Path) -> None:
    cmd = overlay_command(Path("relative/disk.img"), tmp_path / "o.qcow2")
    backing = cmd[cmd.index("-b") + 1]
    assert Path(backing).is_absolute() and cmd[cmd.index("-F") + 1] == "raw"
    on_saved_disk = overlay_command(tmp_path / "converged.qcow2", tmp_path / "o.qcow2", base_format="qcow2")
    assert on_saved_disk[on_saved_disk.index("-F") + 1] == "qcow2"


def test_a_saved_disk_is_a_backing_file_that_later_overlays_leave_as_it_is(tmp_path: Path) -> None:
    """The converged-disk cache's layering, with real qemu-img: raw image <- saved qcow2 <- a lab's overlay."""
    base = tmp_path / "disk.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(base), "16M"], check=True)
    saved, overlay = tmp_path / "converged.qcow2", tmp_path / "overlay.qcow2"
    subprocess.run(overlay_command(base, saved), check=True)
    subprocess.run(overlay_command(saved, overlay, base_format="qcow2"), check=True)
    info = json.loads(subprocess.run(["qemu-img", "info", "--backing-chain", "--output=json", str(overlay)],
                                     capture_output=True, text=True, check=True).stdout)
    assert [(Path(layer["filename"]).name, layer["format"]) for layer in info] == [
        ("overlay.qcow2", "qcow2"), ("converged.qcow2", "qcow2"), ("disk.img", "raw")]


def test_a_saved_data_disk_sits_beside_its_root_disk_and_later_data_disks_grow_on_it(tmp_path: Path) -> None:
    """A blank data disk is sparse qcow2 of the asked size; one on a saved lab's data disk keeps it as is."""
    blank = tmp_path / "data.qcow2"
    subprocess.run(data_disk_command(blank, 2), check=True)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(blank)], capture_output=True,
                                     text=True, check=True).stdout)
    assert info["virtual-size"] == 2 << 30 and info["actual-size"] < 1 << 20 and "backing-filename" not in info
    saved = saved_data_disk(tmp_path / "0123abcd.qcow2")
    assert saved == tmp_path / "0123abcd.data.qcow2"
    blank.rename(saved)
    on_saved = tmp_path / "again.qcow2"
    subprocess.run(data_disk_command(on_saved, 2, saved=saved), check=True)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(on_saved)], capture_output=True,
                                     text=True, check=True).stdout)
    assert Path(info["backing-filename"]) == saved.resolve() and info["virtual-size"] == 2 << 30


def test_image_key_follows_the_recipe_and_nothing_else() -> None:
    base = ImageRecipe()
    assert image_key(base) == image_key(ImageRecipe())
    assert image_key(base) != image_key(ImageRecipe(packages=(*base.packages, "htop")))
    assert image_key(base) != image_key(ImageRecipe(kernel_args=("console=ttyS0",)))
    assert uuid.UUID(root_uuid(image_key(base))) == uuid.UUID(root_uuid(image_key(ImageRecipe())))


def test_build_commands_install_every_package_and_keep_paths_quoted(tmp_path: Path) -> None:
    recipe = ImageRecipe()
    odd = tmp_path / "it's here"
    cmd = mmdebstrap_command(recipe, root_dir=odd / "root", essential_script=odd / "e.sh",
                             customize_script=odd / "c.sh", public_key=odd / "id.pub", out_dir=odd, uuid="U")
    included = next(arg for arg in cmd if arg.startswith("--include=")).removeprefix("--include=")
    assert set(included.split(",")) == set(recipe.packages)
    assert "'\\''" in next(arg for arg in cmd if arg.startswith("--customize-hook="))
    mkfs = mkfs_command(recipe, root_dir=odd / "root", image=odd / "disk.img", uuid="U")
    assert mkfs[:3] == ["mkfs.ext4", "-q", "-F"] and mkfs[-1] == f"{recipe.disk_gib}G" and "-U" in mkfs


@pytest.mark.parametrize("script", [essential_hook(), customize_hook(ImageRecipe())], ids=["essential", "customize"])
def test_hook_scripts_are_valid_shell(script: str, tmp_path: Path) -> None:
    path = tmp_path / "hook.sh"
    path.write_text(script)
    assert subprocess.run(["sh", "-n", str(path)], capture_output=True, check=False).returncode == 0


def test_customize_hook_sets_up_the_real_bootloader_and_the_login() -> None:
    script = customize_hook(ImageRecipe(user="ops", kernel_args=("console=ttyS0", "mitigations=off")))
    assert 'GRUB_CMDLINE_LINUX="console=ttyS0 mitigations=off"' in script
    assert "lnxboot.img" in script and "grub-mkimage -O i386-pc" in script
    assert "user=ops" in script and "NOPASSWD" in script and "PasswordAuthentication no" in script


def access(tmp_path: Path) -> SshAccess:
    return SshAccess(alias="llamahost-lab-default", port=40022, user="lab", identity=tmp_path / "my key",
                     known_hosts=tmp_path / "known_hosts")


def test_inventory_puts_the_lab_in_llama_hosts_with_strict_host_key_checking(tmp_path: Path) -> None:
    inventory = yaml.safe_load(inventory_text(access(tmp_path)))
    host = inventory["llama_hosts"]["hosts"]["llamahost-lab-default"]
    assert (host["ansible_host"], host["ansible_port"], host["ansible_user"]) == ("127.0.0.1", 40022, "lab")
    assert host["ansible_ssh_private_key_file"] == str(tmp_path / "my key")
    assert "StrictHostKeyChecking=yes" in host["ansible_ssh_common_args"]
    assert "HostKeyAlias=llamahost-lab-default" in host["ansible_ssh_common_args"]


def test_ssh_config_and_command_agree_and_pin_the_host_key(tmp_path: Path) -> None:
    config = ssh_config_text(access(tmp_path))
    assert "Host llamahost-lab-default" in config and "Port 40022" in config and "StrictHostKeyChecking yes" in config
    cmd = ssh_command(access(tmp_path), ["true"], connect_timeout=5)
    assert cmd[-2:] == ["lab@127.0.0.1", "true"] and "ConnectTimeout=5" in cmd
    assert known_hosts_line("alias", "ssh-ed25519 AAAAC3Nz root@builder\n") == "alias ssh-ed25519 AAAAC3Nz\n"


def fake_state(instance: LabInstance, pid: int, tmp_path: Path) -> LabState:
    state = LabState(name=instance.name, pid=pid, ssh_port=40022, alias="llamahost-lab-default", user="lab",
                     image_key="k", image_dir=str(tmp_path), started_at="now", machine={}, image_build_s=0.0)
    instance.directory.mkdir(parents=True, exist_ok=True)
    instance.state_file.write_text(json.dumps(state.to_dict()))
    return state


def test_a_stale_state_file_is_not_a_running_lab_and_down_cleans_it_up(tmp_path: Path) -> None:
    instance = LabInstance(tmp_path)
    assert instance.running() is None
    fake_state(instance, pid=2**22 + 1, tmp_path=tmp_path)  # above pid_max's default: never alive
    assert instance.running() is None
    assert instance.down() is False and not instance.state_file.exists()


def started_owner(overlay: Path, code: str, *args: str) -> subprocess.Popen[bytes]:
    """A process that looks like the QEMU running ``overlay``, returned once its command line is visible."""
    process = subprocess.Popen([sys.executable, "-c", code, *args, f"file={overlay}"])
    deadline = time.monotonic() + 10
    while str(overlay).encode() not in Path(f"/proc/{process.pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    return process


def test_only_the_process_that_owns_this_labs_overlay_counts_and_down_stops_it(tmp_path: Path) -> None:
    instance = LabInstance(tmp_path)
    overlay = instance.directory / "overlay.qcow2"
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "unrelated"])
    ours = started_owner(overlay, "import time; time.sleep(60)")
    try:
        fake_state(instance, stranger.pid, tmp_path)
        assert instance.running() is None and instance.down() is False  # never signals a stranger
        assert stranger.poll() is None
        fake_state(instance, ours.pid, tmp_path)
        assert instance.running() is not None
        started = time.monotonic()
        assert instance.down() is True
        assert ours.wait(timeout=10) != 0 and time.monotonic() - started < 10
    finally:
        for process in (stranger, ours):
            process.kill()
            process.wait()


def test_a_boot_whose_console_goes_quiet_or_reports_a_stuck_cpu_is_stalled_but_a_talking_one_is_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(instance_module, "BOOT_STALL_S", 3.0)
    monkeypatch.setattr(LabInstance, "reachable", lambda self, state: False)
    instance = LabInstance(tmp_path)
    overlay = instance.directory / "overlay.qcow2"
    serial = instance.directory / "serial.log"
    # A talking boot may have a short soft lockup (a busy host); a hung one reports the same CPU stuck for
    # longer and longer, a line every few seconds, so its console never goes quiet.
    talker = ("import sys, time\n"
              "open(sys.argv[1], 'a').write('[ 0.9] watchdog: BUG: soft lockup - CPU#1 stuck for 2s! [swapper]\\n')\n"
              "while True:\n"
              "    open(sys.argv[1], 'a').write('[ 1.0] still booting\\n'); time.sleep(0.5)\n")
    stuck = ("import sys, time\n"
             "for seconds in range(1, 100):\n"
             "    open(sys.argv[1], 'a').write(f'[{seconds + 20}.8] watchdog: BUG: soft lockup - CPU#6 stuck for '\n"
             "                                 f'{seconds}s! [cryptomgr_test:90]\\n'); time.sleep(0.5)\n")
    quiet = started_owner(overlay, "import time; time.sleep(60)")
    try:
        state = fake_state(instance, quiet.pid, tmp_path)
        serial.write_text("[    4.32] sched_clock: Marking stable\n")
        started = time.monotonic()
        with pytest.raises(instance_module._BootStalled) as stalled:
            instance.wait_for_ssh(state, deadline=time.monotonic() + 30)
        assert 3 <= time.monotonic() - started < 15
        assert stalled.value.args[0] == "console quiet for 3 s"
        assert any("Marking stable" in line for line in stalled.value.args[1])
    finally:
        quiet.kill()
        quiet.wait()
    talking = started_owner(overlay, talker, str(serial))
    try:
        state = fake_state(instance, talking.pid, tmp_path)
        with pytest.raises(UserError, match="did not answer on SSH within 8 s"):
            instance.wait_for_ssh(state, deadline=time.monotonic() + 8)
    finally:
        talking.kill()
        talking.wait()
    serial.unlink()
    locked = started_owner(overlay, stuck, str(serial))
    try:
        state = fake_state(instance, locked.pid, tmp_path)
        started = time.monotonic()
        with pytest.raises(instance_module._BootStalled) as stalled:
            instance.wait_for_ssh(state, deadline=time.monotonic() + 30)
        assert time.monotonic() - started < 8, "a stuck CPU is a hang before the console goes quiet"
        why = re.fullmatch(r"CPU#6 stuck for (\d+) s", stalled.value.args[0])
        assert why is not None and int(why.group(1)) >= 3, stalled.value.args[0]
        assert any("cryptomgr_test" in line for line in stalled.value.args[1])
    finally:
        locked.kill()
        locked.wait()


def test_lab_names_are_checked() -> None:
    with pytest.raises(UserError, match="may only contain"):
        LabInstance(Path("/tmp"), "../etc")


def test_an_image_is_complete_only_with_all_its_files(tmp_path: Path) -> None:
    image = LabImage("k", tmp_path)
    for path in (image.disk, image.bootloader, image.identity, image.host_public_key):
        path.write_text("x")
    assert not image.complete()
    image.manifest_path.write_text("{}")
    assert image.complete()


def run_cli(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LLAMAHOST_LAB_CACHE": str(cache)}
    return subprocess.run([str(BIN / "llamahost"), "lab", *args], capture_output=True, text=True, env=env,
                          timeout=60, check=False)


def test_cli_status_exits_1_when_no_lab_runs_and_inventory_explains_how_to_start_one(tmp_path: Path) -> None:
    status = run_cli("status", "--json", cache=tmp_path)
    assert status.returncode == 1 and json.loads(status.stdout) == {"name": "default", "running": False}
    inventory = run_cli("inventory", cache=tmp_path)
    assert inventory.returncode == 2 and "not running" in inventory.stderr and "lab up" in inventory.stderr
    assert "Traceback" not in inventory.stderr
    bad = run_cli("up", "--memory-per-node", "100", cache=tmp_path)
    assert bad.returncode == 2 and "memory_per_node_mib" in bad.stderr

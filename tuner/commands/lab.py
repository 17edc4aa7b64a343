"""``llamahost lab up|down|status|ssh|inventory|build``: the QEMU test host, for people and for tests.

``up`` builds the base image once (cached), boots a fresh copy-on-write lab under QEMU/TCG and waits for
SSH; ``inventory`` gives Ansible an inventory with the lab in ``llama_hosts``, so
``ansible-playbook -i "$(llamahost lab inventory --path)" playbooks/site.yml`` converges the roles on
it. ``down`` stops it and throws its disk away. ``status`` exits 0 when the lab runs, 1 when it does
not (like ``systemctl is-active``), so scripts can test it.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from tuner.errors import UserError
from tuner.lab.access import ssh_command
from tuner.lab.image import ensure_image, lab_cache_dir
from tuner.lab.instance import DEFAULT_BOOT_TIMEOUT_S, DEFAULT_NAME, LabInstance, LabState
from tuner.lab.spec import ImageRecipe, MachineSpec
from tuner.output import console, print_json, table

EXIT_NOT_RUNNING = 1


def register(sub: Any) -> None:
    parser = sub.add_parser("lab", help="a disposable QEMU test host (2 sockets, 2 NUMA nodes, SMT) for the roles")
    actions = parser.add_subparsers(dest="lab_command", metavar="ACTION", required=True)

    up = actions.add_parser("up", help="build the image if needed, boot the lab, wait for SSH")
    _add_name(up)
    up.add_argument("--memory-per-node", type=int, default=MachineSpec.memory_per_node_mib, metavar="MIB",
                    help=f"guest memory per NUMA node (default {MachineSpec.memory_per_node_mib})")
    up.add_argument("--boot-timeout", type=float, default=DEFAULT_BOOT_TIMEOUT_S, metavar="SECONDS",
                    help=f"how long to wait for SSH (default {DEFAULT_BOOT_TIMEOUT_S:.0f})")
    up.add_argument("--rebuild", action="store_true", help="build the image again even if it is cached")
    up.add_argument("--json", action="store_true", help="print the lab state as JSON")
    up.set_defaults(handler=run_up)

    down = actions.add_parser("down", help="stop the lab and delete its disk overlay")
    _add_name(down)
    down.set_defaults(handler=run_down)

    status = actions.add_parser("status", help="whether the lab runs (exit 0) or not (exit 1)")
    _add_name(status)
    status.add_argument("--json", action="store_true", help="print the lab state as JSON")
    status.set_defaults(handler=run_status)

    ssh = actions.add_parser("ssh", help="open a shell on the lab, or run a command there")
    _add_name(ssh)
    ssh.add_argument("remote", nargs=argparse.REMAINDER, help="command to run (default: a login shell)")
    ssh.set_defaults(handler=run_ssh)

    inventory = actions.add_parser("inventory", help="print the lab's Ansible inventory (group llama_hosts)")
    _add_name(inventory)
    inventory.add_argument("--path", action="store_true", help="print the inventory file's path instead")
    inventory.set_defaults(handler=run_inventory)

    build = actions.add_parser("build", help="build (or find) the cached base image without booting it")
    build.add_argument("--rebuild", action="store_true", help="build again even if it is cached")
    build.set_defaults(handler=run_build)


def _add_name(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default=DEFAULT_NAME,
                        help=f"which lab, when you run more than one (default {DEFAULT_NAME!r})")


def _progress(message: str) -> None:
    print(f"llamahost lab: {message}", file=sys.stderr, flush=True)


def _instance(args: argparse.Namespace) -> LabInstance:
    return LabInstance(lab_cache_dir(), args.name)


def _running(instance: LabInstance) -> LabState:
    state = instance.running()
    if state is None:
        raise UserError(f"lab {instance.name!r} is not running", "start it with `llamahost lab up` (or make lab-up)")
    return state


def run_up(args: argparse.Namespace) -> int:
    instance = _instance(args)
    machine = MachineSpec(memory_per_node_mib=args.memory_per_node)
    state = instance.up(ImageRecipe(), machine, progress=_progress, boot_timeout=args.boot_timeout,
                        rebuild=args.rebuild)
    _show(instance, state, args.json)
    return 0


def run_down(args: argparse.Namespace) -> int:
    instance = _instance(args)
    was_running = instance.down()
    _progress(f"lab {instance.name!r} stopped" if was_running else f"lab {instance.name!r} was not running")
    return 0


def run_status(args: argparse.Namespace) -> int:
    instance = _instance(args)
    state = instance.running()
    if state is None:
        if args.json:
            print_json({"name": instance.name, "running": False})
        else:
            _progress(f"lab {instance.name!r} is not running")
        return EXIT_NOT_RUNNING
    _show(instance, state, args.json)
    return 0


def run_ssh(args: argparse.Namespace) -> int:
    instance = _instance(args)
    state = _running(instance)
    remote = [part for part in args.remote if part != "--"] if args.remote else []
    cmd = ssh_command(instance.access(state), remote)
    if not remote:
        cmd.insert(1, "-t")  # an interactive login shell needs a terminal
    sys.stdout.flush()
    os.execvp(cmd[0], cmd)


def run_inventory(args: argparse.Namespace) -> int:
    instance = _instance(args)
    _running(instance)
    if args.path:
        print(instance.inventory)
    else:
        sys.stdout.write(instance.inventory.read_text())
    return 0


def run_build(args: argparse.Namespace) -> int:
    image = ensure_image(ImageRecipe(), lab_cache_dir(), progress=_progress, rebuild=args.rebuild)
    print(image.directory)
    return 0


def _show(instance: LabInstance, state: LabState, as_json: bool) -> None:
    data = {**state.to_dict(), "running": True, "ssh_config": str(instance.ssh_config),
            "inventory": str(instance.inventory)}
    if as_json:
        print_json(data)
        return
    rows = [
        ("ssh", f"llamahost lab ssh --name {state.name}   (or ssh -F {instance.ssh_config} {state.alias})"),
        ("inventory", str(instance.inventory)),
        ("ssh port", f"127.0.0.1:{state.ssh_port}"),
        ("qemu pid", str(state.pid)),
        ("image", f"{state.image_key} ({state.image_dir})"),
        ("started", state.started_at),
        ("image build / boot", f"{state.image_build_s:.0f} s / "
                               + (f"{state.boot_s:.0f} s" if state.boot_s is not None else "booting")),
    ]
    console().print(table(f"lab {state.name!r} is running", ("", ""), rows))

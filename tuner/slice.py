"""Run an on-host measurement inside the server's slice, where the inference CPUs are.

The cpu role confines ``init.scope``, ``system.slice`` and ``user.slice`` to the housekeeping CPUs; the server
runs in its own slice (``llama-server.slice``) outside them. A ``tune`` or ``fleet work`` started from a login
or by Ansible lands in ``user.slice``, so its trials could only use the housekeeping CPUs. ``--slice NAME``
moves the run into the server's slice first: the command starts itself again under
``systemd-run --scope --slice=NAME`` (through ``sudo -n`` when not root, as the same user and group, since
only the system manager may place a process in a system slice) and goes on there. The new process checks
``/proc/self/cgroup`` and refuses to measure anywhere else.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from tuner.config import parse_cpu_list
from tuner.cpu_lists import format_cpu_list
from tuner.errors import UserError

CGROUP_ROOT = Path("/sys/fs/cgroup")
ENTERED_ENV = "LLAMAHOST_SLICE_ENTERED"  # set on the second start: never start a third time
# What a run needs from its environment; sudo resets it and a scope inherits systemd-run's.
_KEPT_ENV = re.compile(r"^(HOME|USER|LOGNAME|PATH|LANG|LC_\w+|TZ|XDG_\w+|VIRTUAL_ENV|LLAMAHOST_\w+|PG\w+)$")


def add_slice_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slice", help="measure inside this systemd slice, the server's (e.g. llama-server.slice) "
                                        "on a host whose cpu role keeps user.slice on the housekeeping CPUs; "
                                        "needs root or passwordless sudo")


def check_slice_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9:_.\\-]+\.slice", name):
        raise UserError(f"--slice {name!r} is not a slice unit name", "pass e.g. --slice llama-server.slice")
    return name


def cgroup_path(proc_self_cgroup: str) -> str:
    """This process' cgroup (v2 line ``0::/path``; the systemd hierarchy's under v1 or a hybrid setup, whose
    unified line may say only ``/``)."""
    paths = dict(line.split(":", 2)[1:] for line in proc_self_cgroup.splitlines() if line.count(":") >= 2)
    unified = paths.get("", "/")
    return unified if unified != "/" else paths.get("name=systemd", "/")


def in_slice(name: str, path: str) -> bool:
    """Whether a cgroup path lies in the slice: ``/a.slice/a-b.slice/x.scope`` is in ``a.slice`` and
    ``a-b.slice``."""
    return name in path.strip("/").split("/")


def slice_command(name: str, argv: Sequence[str], *, uid: int, gid: int, euid: int,
                  env: Mapping[str, str]) -> list[str]:
    """The command line that starts ``argv`` again in slice ``name``, as the same user."""
    kept = [f"--setenv={key}={value}" for key, value in sorted(env.items()) if _KEPT_ENV.match(key)]
    run = ["systemd-run", "--scope", "--quiet", "--collect", f"--slice={name}", f"--uid={uid}", f"--gid={gid}",
           *kept, f"--setenv={ENTERED_ENV}={name}", "--", *argv]
    return run if euid == 0 else ["sudo", "-n", *run]


def inference_cpus(slice_cpus: set[int], housekeeping: set[int] | None) -> set[int]:
    """The CPUs a run in the server's slice measures on: the slice's, less the housekeeping CPUs that the cpu
    role confines ``system.slice`` to (none when that slice has every CPU the server's has: no partition)."""
    if housekeeping and housekeeping < slice_cpus:
        return slice_cpus - housekeeping
    return slice_cpus


def _cpuset(cgroup: str) -> set[int] | None:
    try:
        text = (CGROUP_ROOT / cgroup.strip("/") / "cpuset.cpus.effective").read_text().strip()
    except OSError:
        return None
    return set(parse_cpu_list(text)) if text else None


def widen_to_inference_cpus(path: str) -> set[int]:
    """Once in the slice, run on its inference CPUs (a process keeps the affinity it was started with, and
    systemd-run was started on the housekeeping CPUs); read back, since the kernel narrows a mask quietly."""
    slice_cpus = _cpuset(path.rsplit("/", 1)[0]) or set(os.sched_getaffinity(0)) | set(range(os.cpu_count() or 1))
    wanted = inference_cpus(slice_cpus, _cpuset("system.slice"))
    try:
        os.sched_setaffinity(0, wanted)
    except OSError as exc:
        raise UserError(f"cannot run on the inference CPUs {format_cpu_list(wanted)} in {path}: {exc.strerror}",
                        "check the server slice's AllowedCPUs on this host") from None
    return set(os.sched_getaffinity(0))


def enter_slice(name: str, argv: Sequence[str] | None = None) -> None:
    """Return when this process runs in slice ``name`` (on the slice's inference CPUs); otherwise start the
    same command there (``argv``: this ``llamahost`` command; never returns), or explain why it cannot."""
    name = check_slice_name(name)
    path = cgroup_path(Path("/proc/self/cgroup").read_text())
    if in_slice(name, path):
        widen_to_inference_cpus(path)
        return
    if os.environ.get(ENTERED_ENV) == name:
        raise UserError(f"systemd-run did not start the run in {name}: it runs in {path}",
                        f"check that {name} exists on this host (`systemctl status {name}`)")
    if shutil.which("systemd-run") is None or not Path("/run/systemd/system").is_dir():
        raise UserError(f"--slice {name} needs systemd, and this machine does not run it",
                        "drop --slice, or run the tuner on the host the llama_server role prepared")
    if os.geteuid() != 0 and (shutil.which("sudo") is None or subprocess.run(
            ["sudo", "-n", "true"], capture_output=True, check=False, timeout=30).returncode != 0):
        raise UserError(f"only root may start a run in {name}, and this user has no passwordless sudo",
                        "run the command as root, or give this user passwordless sudo (as Ansible's become needs)")
    again = list(argv) if argv is not None else [sys.executable, "-m", "tuner.cli", *sys.argv[1:]]
    command = slice_command(name, again, uid=os.getuid(), gid=os.getgid(), euid=os.geteuid(), env=os.environ)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(command[0], command)

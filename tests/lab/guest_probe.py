"""Read back, on the lab host itself, every setting the roles manage (run as ``sudo python3 -``).

The tests send this file's text over SSH and parse its JSON output; it runs on the guest's Python
(bookworm's 3.11), so it uses the standard library only. It reads the live kernel and systemd, never the
roles' own files, so a test built on it fails when a setting is only written down but not in effect.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

UNIT = "llama-server"
STATE_FILES = (
    "/etc/tmpfiles.d/llamahost-hugepages.conf", "/etc/tmpfiles.d/llamahost-cpu.conf",
    "/etc/default/grub.d/60-llamahost-hugepages.cfg", "/etc/default/grub.d/60-llamahost-cpu.cfg",
    "/boot/grub/grub.cfg", "/etc/sysctl.d/60-llamahost-numa.conf", "/etc/ansible/facts.d/llamahost.fact",
    "/etc/systemd/system/llama-server.service", "/etc/systemd/system.conf.d/60-llamahost-cpu.conf",
    "/etc/systemd/system/system.slice.d/60-llamahost-cpu.conf", "/etc/default/irqbalance", "/etc/fstab",
    "/etc/llama-server/api-key", "/opt/llama-server/bin/llama-server",
)


def read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def selected(text: str) -> str:
    match = re.search(r"\[([^\]]+)\]", text)
    return match.group(1) if match else text


def status_line(path: str, key: str) -> str:
    for line in read(path).splitlines():
        if line.startswith(key + ":"):
            return line.split(":", 1)[1].strip()
    return ""


def unit_properties() -> dict[str, str]:
    names = ["ActiveState", "MainPID", "User", "Slice", "CPUAffinity", "AllowedCPUs", "NUMAPolicy", "NUMAMask",
             "LimitMEMLOCK", "ExecStart", "ActiveEnterTimestampMonotonic", "NoNewPrivileges", "ProtectSystem"]
    out = subprocess.run(["systemctl", "show", UNIT] + [f"--property={n}" for n in names],
                         capture_output=True, text=True, check=False).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def served_at(argv: list[str]) -> tuple[str, int]:
    """The address and port the server listens on, from its command line (llama-server's defaults otherwise)."""
    return value_after(argv, "--host") or "127.0.0.1", int(value_after(argv, "--port") or 8080)


def health(address: tuple[str, int]) -> dict[str, object]:
    try:
        with urllib.request.urlopen(f"http://{address[0]}:{address[1]}/health", timeout=10) as response:
            return {"status": response.status, "body": response.read().decode()}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "body": ""}
    except OSError as exc:
        return {"status": None, "body": str(exc)}


def value_after(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else ""


def findmnt(path: str) -> dict[str, str]:
    """The mount that holds ``path``: its target, source device, type and label."""
    if not path:
        return {}
    out = subprocess.run(["findmnt", "--json", "-o", "TARGET,SOURCE,FSTYPE,LABEL", "-T", path],
                         capture_output=True, text=True, check=False).stdout
    mounts = json.loads(out or '{"filesystems": [{}]}')["filesystems"]
    return {key: str(value) for key, value in mounts[0].items()}


def file_digest(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return "absent"


def main() -> None:
    nodes = {}
    for node_dir in sorted(Path("/sys/devices/system/node").glob("node[0-9]*")):
        node = node_dir.name[4:]
        nodes[node] = {
            "2m": int(read(f"{node_dir}/hugepages/hugepages-2048kB/nr_hugepages") or 0),
            "1g": int(read(f"{node_dir}/hugepages/hugepages-1048576kB/nr_hugepages") or 0),
        }
    unit = unit_properties()
    pid = unit.get("MainPID", "0")
    argv = read(f"/proc/{pid}/cmdline").split("\0") if pid != "0" else []
    address = served_at(argv)
    key_file = Path("/etc/llama-server/api-key")
    key_stat = key_file.stat() if key_file.exists() else None
    report = {
        "boot_id": read("/proc/sys/kernel/random/boot_id"),
        "cmdline": read("/proc/cmdline"),
        "thp_enabled": selected(read("/sys/kernel/mm/transparent_hugepage/enabled")),
        "thp_defrag": selected(read("/sys/kernel/mm/transparent_hugepage/defrag")),
        "nodes": nodes,
        "numa_balancing": read("/proc/sys/kernel/numa_balancing"),
        "zone_reclaim_mode": read("/proc/sys/vm/zone_reclaim_mode"),
        "smt_control": read("/sys/devices/system/cpu/smt/control"),
        "smt_active": read("/sys/devices/system/cpu/smt/active"),
        "online_cpus": read("/sys/devices/system/cpu/online"),
        "pdpe1gb": " pdpe1gb " in f" {read('/proc/cpuinfo')} ".replace("\n", " "),
        "pid1_cpus": status_line("/proc/1/status", "Cpus_allowed_list"),
        "hugetlbfs": [line.split()[1:4] for line in read("/proc/mounts").splitlines() if " hugetlbfs " in line],
        "unit": unit,
        "server_cpus": status_line(f"/proc/{pid}/status", "Cpus_allowed_list") if pid != "0" else "",
        "server_uid": status_line(f"/proc/{pid}/status", "Uid").split()[:1] if pid != "0" else [],
        "server_cmdline": argv,
        "served_at": list(address),
        # Which filesystem holds the model the server was started on: the data volume, on a stack's host.
        "model_filesystem": findmnt(value_after(argv, "--model")),
        "server_environ": [item for item in read(f"/proc/{pid}/environ").split("\0") if item.startswith("OMP_")]
        if pid != "0" else [],
        "server_vmlck_kb": status_line(f"/proc/{pid}/status", "VmLck") if pid != "0" else "",
        "health": health(address),
        "facts": json.loads(read("/etc/ansible/facts.d/llamahost.fact") or "{}"),
        "api_key_file": {"mode": oct(key_stat.st_mode & 0o777), "uid": key_stat.st_uid, "gid": key_stat.st_gid}
        if key_stat else None,
        "ps": subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=False).stdout,
        "files": {path: file_digest(path) for path in STATE_FILES},
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()

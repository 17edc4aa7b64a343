"""What a built ``llama-server`` needs from the host it is copied to: shared libraries and their versions.

The binary is static in llama.cpp's own libraries but links the C/C++ runtime dynamically (a fully
static glibc binary cannot resolve users or load NSS modules reliably). These pure functions read
``ldd`` and ``objdump -T`` output so the build can refuse surprises (libcurl, libssl) and the manifest
can tell the Ansible role which Debian packages and which glibc the host must have.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# soname prefix -> the Debian package that provides it
_RUNTIME_PACKAGES: dict[str, str] = {
    "linux-vdso.so": "",  # provided by the kernel
    "ld-linux-x86-64.so": "libc6",
    "libc.so": "libc6",
    "libm.so": "libc6",
    "libpthread.so": "libc6",
    "libdl.so": "libc6",
    "librt.so": "libc6",
    "libstdc++.so": "libstdc++6",
    "libgcc_s.so": "libgcc-s1",
    "libgomp.so": "libgomp1",
}
_LDD_LINE = re.compile(r"^\s*(\S+)(?:\s+=>\s+(\S+|not found))?(?:\s+\(0x[0-9a-f]+\))?\s*$")


@dataclass(frozen=True)
class LinkedLibrary:
    soname: str
    path: str | None  # None when ldd printed "not found" or no path (vdso)


def parse_ldd(text: str) -> list[LinkedLibrary]:
    """``ldd`` output -> one entry per library (the dynamic loader's own line included)."""
    out: list[LinkedLibrary] = []
    for line in text.splitlines():
        match = _LDD_LINE.match(line)
        if not match or "statically linked" in line:
            continue
        name, target = match.group(1), match.group(2)
        soname = name.rsplit("/", 1)[-1]
        path = name if name.startswith("/") else (None if target in (None, "not found") else target)
        out.append(LinkedLibrary(soname=soname, path=path))
    return out


def _package_of(soname: str) -> str | None:
    for prefix, package in _RUNTIME_PACKAGES.items():
        if soname.startswith(prefix):
            return package
    return None


def disallowed(libraries: list[LinkedLibrary]) -> list[str]:
    """Libraries beyond the C/C++/OpenMP runtime, and any that ldd could not find."""
    return sorted(lib.soname for lib in libraries
                  if _package_of(lib.soname) is None or (lib.path is None and lib.soname != "linux-vdso.so.1"))


def debian_packages(libraries: list[LinkedLibrary]) -> list[str]:
    """Debian/Ubuntu packages a host needs to run the binary (e.g. ``libgomp1``)."""
    return sorted({pkg for lib in libraries if (pkg := _package_of(lib.soname))})


def _max_symbol_version(objdump_text: str, prefix: str) -> str:
    versions = {tuple(int(part) for part in found.split("."))
                for found in re.findall(rf"\b{prefix}_([0-9]+(?:\.[0-9]+)*)\b", objdump_text)}
    return ".".join(str(part) for part in max(versions)) if versions else ""


def glibc_required(objdump_text: str) -> dict[str, str]:
    """Newest GLIBC_ and GLIBCXX_ symbol versions the binary asks for (from ``objdump -T``).

    A host whose glibc or libstdc++ is older cannot run the binary, whatever its CPU.
    """
    return {"glibc": _max_symbol_version(objdump_text, "GLIBC"),
            "glibcxx": _max_symbol_version(objdump_text, "GLIBCXX")}

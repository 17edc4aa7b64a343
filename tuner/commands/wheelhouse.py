"""``llamahost wheelhouse DIR``: build the wheels the ``llamahost_tuner`` role installs on the hosts
(:mod:`tuner.wheelhouse`). By default for this machine's Python, architecture and glibc; for other hosts pass
their ``--python-version``, ``--arch`` and ``--glibc``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tuner.output import console, human_bytes, print_json


def register(sub: Any) -> None:
    parser = sub.add_parser("wheelhouse", help="build the wheels that install llamahost on the hosts (no index there)",
                            description="Build llamahost and its pinned dependencies as wheels, with a manifest and "
                                        "a hash-pinned requirements file, for roles/llamahost_tuner.")
    parser.add_argument("dest", type=Path, help="the wheelhouse directory (replaced; the previous kept as DEST.prev)")
    parser.add_argument("--python-version", help="the hosts' CPython, e.g. 3.12 (default: this one's)")
    parser.add_argument("--arch", help="the hosts' machine architecture, e.g. x86_64 or aarch64")
    parser.add_argument("--glibc", help="the hosts' glibc, e.g. 2.39 (getconf GNU_LIBC_VERSION)")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")
    parser.set_defaults(handler=run_wheelhouse)


def run_wheelhouse(args: argparse.Namespace) -> int:
    from tuner.wheelhouse import build_wheelhouse

    manifest = build_wheelhouse(args.dest, python_version=args.python_version, arch=args.arch, glibc=args.glibc)
    if args.json:
        print_json(manifest.to_dict())
        return 0
    size = sum(path.stat().st_size for path in args.dest.glob("*.whl"))
    console().print(f"wheelhouse {args.dest}: llamahost {manifest.llamahost}, {len(manifest.wheels)} wheels "
                    f"({human_bytes(size)}) for CPython {manifest.python or 'any'} on {manifest.arch or 'any'}, "
                    f"glibc {manifest.glibc or 'any'} or newer")
    return 0

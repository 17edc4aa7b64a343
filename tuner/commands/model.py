"""``llamahost model check FILE``: validate a GGUF file and print its metadata.

The Ansible role calls this on the controller before it copies a model to a host, so a broken file is
refused before anything on the host changes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tuner.model.gguf_file import inspect_model
from tuner.output import console, human_bytes, print_json, table


def register(sub: Any) -> None:
    parser = sub.add_parser("model", help="inspect and validate GGUF model files")
    model_sub = parser.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    check = model_sub.add_parser("check", help="validate a GGUF file and print its metadata")
    check.add_argument("path", type=Path, help="the .gguf file (first shard of a split model)")
    check.add_argument("--json", action="store_true", help="print machine-readable JSON")
    check.set_defaults(handler=run_check)


def run_check(args: argparse.Namespace) -> int:
    info = inspect_model(args.path)
    if args.json:
        print_json(info.to_dict())
        return 0
    rows = [
        ("name", info.name),
        ("architecture", info.architecture),
        ("quantization", f"{info.file_type} ({info.bits_per_weight:.2f} bits/weight)"),
        ("parameters", f"{info.n_params / 1e9:.2f} B"),
        ("file size", human_bytes(info.size_bytes)),
        ("layers / embedding", f"{info.n_layers} / {info.n_embd}"),
        ("heads / KV heads", f"{info.n_head} / {info.n_head_kv}"),
        ("experts (used)", f"{info.expert_count} ({info.expert_used_count})" if info.expert_count else "dense"),
        ("weights read per token", human_bytes(info.bytes_per_token)),
        ("trained context", str(info.context_length)),
    ]
    console().print(table(f"{info.path} is a valid GGUF v{info.gguf_version} model", ("field", "value"), rows))
    return 0

"""``llamahost model check FILE``: validate a GGUF file and print its metadata.
``llamahost model synth OUT``: write a GGUF in a real model's shape with random weights (tuner.model.synth).

The Ansible role calls ``check`` on the controller before it copies a model to a host, so a broken file is
refused before anything on the host changes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tuner.errors import UserError
from tuner.model.gguf_file import inspect_model
from tuner.model.synth_shape import ARCHITECTURES, FILE_TYPES, ModelShape, shape_from_hf_config
from tuner.output import console, human_bytes, print_json, table


def register(sub: Any) -> None:
    parser = sub.add_parser("model", help="inspect and validate GGUF model files")
    model_sub = parser.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    check = model_sub.add_parser("check", help="validate a GGUF file and print its metadata")
    check.add_argument("path", type=Path, help="the .gguf file (first shard of a split model)")
    check.add_argument("--json", action="store_true", help="print machine-readable JSON")
    check.set_defaults(handler=run_check)

    synth = model_sub.add_parser(
        "synth", help="write a GGUF with a real model's shape and random weights (size and tune before you download)",
        description="Write a model with the exact tensor table of a real one and random weights: llama.cpp runs it "
                    "at the real model's speed. Give the shape as a GGUF header (--like: the first megabytes of a "
                    "download do), a Hugging Face config.json (--hf-config), or explicit dimensions (--arch ...).")
    synth.add_argument("output", type=Path, help="the .gguf file to write")
    source = synth.add_mutually_exclusive_group(required=True)
    source.add_argument("--like", type=Path, metavar="GGUF", help="copy this GGUF header's tensors and metadata")
    source.add_argument("--hf-config", type=Path, metavar="JSON", help="a Hugging Face config.json")
    source.add_argument("--arch", choices=ARCHITECTURES, help="explicit dimensions of this architecture")
    dims = synth.add_argument_group("explicit dimensions (with --arch)")
    for flag, what in (("--vocab", "vocabulary size"), ("--embd", "embedding width"), ("--layers", "blocks"),
                       ("--heads", "attention heads"), ("--kv-heads", "KV heads (default: --heads)"),
                       ("--ff", "feed-forward width"), ("--head-dim", "head size (default: embd / heads)"),
                       ("--experts", "experts (MoE)"), ("--experts-used", "experts per token"),
                       ("--expert-ff", "an expert's feed-forward width (default: --ff)")):
        dims.add_argument(flag, type=int, default=0, help=what)
    dims.add_argument("--tied-embeddings", action="store_true", help="no output.weight: the embedding serves")
    synth.add_argument("--type", choices=sorted(FILE_TYPES),
                       help="quantization, as llama-quantize mixes it (with --hf-config or --arch; default Q4_K_M)")
    synth.add_argument("--tokenizer", type=Path,
                       help="a small real GGUF whose tokenizer the model speaks (default: the bundled model)")
    synth.add_argument("--name", help="the model's name (default: from the source)")
    synth.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    synth.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    synth.add_argument("--json", action="store_true", help="print machine-readable JSON")
    synth.set_defaults(handler=run_synth)


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
        *([("synthetic", "yes: random weights in a real model's shape (llamahost model synth)")]
          if info.synthetic else []),
    ]
    console().print(table(f"{info.path} is a valid GGUF v{info.gguf_version} model", ("field", "value"), rows))
    return 0


DEFAULT_FILE_TYPE = "Q4_K_M"
DIMENSIONS = ("vocab", "embd", "layers", "heads", "kv_heads", "ff", "head_dim", "experts", "experts_used", "expert_ff",
              "tied_embeddings")


def _shape(args: argparse.Namespace) -> ModelShape:
    """The shape from --hf-config or from explicit dimensions."""
    if args.hf_config is not None:
        try:
            config = json.loads(Path(args.hf_config).expanduser().read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read {args.hf_config} as a config.json: {exc}",
                            "download the model's config.json from Hugging Face and pass its path") from None
        if not isinstance(config, dict):
            raise UserError(f"{args.hf_config} is not a config.json (not a JSON object)",
                            "pass the model's config.json from Hugging Face")
        name = args.name or str(config.get("_name_or_path") or Path(args.hf_config).parent.name or "synthetic")
        return shape_from_hf_config(config, name=name)
    missing = [flag for flag, value in (("--vocab", args.vocab), ("--embd", args.embd), ("--layers", args.layers),
                                        ("--heads", args.heads), ("--ff", args.ff)) if not value]
    if missing:
        raise UserError(f"--arch {args.arch} needs {', '.join(missing)}", "give every dimension of the shape")
    return ModelShape(arch=args.arch, n_vocab=args.vocab, n_embd=args.embd, n_layer=args.layers, n_head=args.heads,
                      n_head_kv=args.kv_heads or args.heads, n_ff=args.ff, head_dim=args.head_dim,
                      n_expert=args.experts, n_expert_used=args.experts_used, n_ff_expert=args.expert_ff,
                      tied_embeddings=args.tied_embeddings,
                      name=args.name or f"{args.arch}-{args.layers}x{args.embd}").check()


def run_synth(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from tuner.model.synth import plan_from_header, plan_from_shape, summary, write_synthetic

    dimensions = [f"--{name.replace('_', '-')}" for name in DIMENSIONS if getattr(args, name)]
    if args.arch is None and dimensions:
        raise UserError(f"{', '.join(dimensions)} describe a shape only with --arch",
                        "leave them out, or give the shape by --arch and its dimensions alone")
    if args.like is not None:
        ignored = [flag for flag, value in (("--type", args.type), ("--tokenizer", args.tokenizer)) if value]
        if ignored:
            raise UserError(f"{' and '.join(ignored)} cannot change a model copied with --like: its types and "
                            "tokenizer are the header's", "leave them out, or describe the shape with --hf-config")
        if args.output.expanduser().resolve() == args.like.expanduser().resolve():
            raise UserError(f"{args.output} is the model whose shape synth copies",
                            "write the synthetic model to another path")
        plan = plan_from_header(args.like)
    else:
        tokenizer = args.tokenizer
        if tokenizer is None:
            from tuner.model.default_model import default_model_path

            tokenizer = default_model_path()
        plan = plan_from_shape(_shape(args), args.type or DEFAULT_FILE_TYPE, tokenizer=Path(tokenizer).expanduser())
    planned = summary(plan)
    with Progress(TextColumn("writing {task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=Console(file=sys.stderr), transient=True, disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task(args.output.name, total=plan.data_bytes)
        path = write_synthetic(plan, args.output, seed=args.seed, force=args.force,
                               on_progress=lambda done, total: progress.update(task, completed=done))
    info = inspect_model(path)
    if args.json:
        print_json({**planned, "path": str(path), "size_bytes": info.size_bytes, "n_params": info.n_params,
                    "bytes_per_token": info.bytes_per_token, "synthetic": info.synthetic})
        return 0
    rows = [("source", plan.source), ("architecture", info.architecture), ("tensors", str(len(plan.tensors))),
            ("parameters", f"{info.n_params / 1e9:.2f} B"), ("file size", human_bytes(info.size_bytes)),
            ("weights read per token", human_bytes(info.bytes_per_token)),
            ("types", ", ".join(f"{name} {human_bytes(size)}" for name, size in planned["bytes_by_type"].items()))]
    console().print(table(f"{path}: synthetic (random weights; its speed is the real model's, its text is noise)",
                          ("field", "value"), rows))
    return 0

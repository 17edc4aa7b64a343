"""``llamahost size``: which cloud instance a model needs, and how fast it will generate there.

The model is a GGUF file (``--model``; only its metadata is read) or explicit numbers for a model that is
not downloaded yet (``--params 70.6e9 --bits 4.85 --layers 80 --kv-heads 8 --head-dim 128``). The answer is
the memory needed, every catalog size ranked by predicted token generation speed and by tokens per dollar,
the reason for each, and one recommendation. Exit status 0 with a recommendation, 1 when no size fits the
model and the constraints, 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from tuner.errors import UserError
from tuner.output import console, human_bytes, print_json, table
from tuner.sizing import (
    Candidate,
    Constraints,
    ModelDemand,
    SizingAssumptions,
    SizingReport,
    Workload,
    default_catalog,
    demand_from_gguf,
    read_catalog,
    size_host,
)
from tuner.sizing.assumptions import DEFAULT_EFFICIENCY
from tuner.sizing.demand import CACHE_TYPE_BYTES
from tuner.sizing.ranking import DEFAULT_REGION

EXIT_NOTHING_FITS = 1
EXPLICIT_MODEL_OPTIONS = ("params", "bits", "layers", "kv_heads", "head_dim", "active_params", "embd",
                          "vocab")
REQUIRED_MODEL_OPTIONS = ("params", "bits", "layers", "kv_heads", "head_dim")


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "size",
        help="choose a cloud instance for a model (memory, predicted tok/s, price)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = parser.add_argument_group("model (a GGUF file, or explicit numbers)")
    model.add_argument("--model", type=Path, metavar="FILE.gguf",
                       help="read the model's metadata from this file")
    model.add_argument("--params", type=float, help="parameter count, e.g. 70.6e9")
    model.add_argument("--bits", type=float, help="bits per weight of the quantization, e.g. 4.85 for Q4_K_M")
    model.add_argument("--layers", type=int, help="transformer blocks (block_count)")
    model.add_argument("--kv-heads", type=int, help="KV heads (attention.head_count_kv)")
    model.add_argument("--head-dim", type=int, help="dimension of one attention head (key_length)")
    model.add_argument("--active-params", type=float, help="parameters used per token (mixture of experts)")
    model.add_argument("--embd", type=int,
                       help="embedding width (estimated from params and layers if absent)")
    model.add_argument("--vocab", type=int, help="vocabulary size (sizes the logits buffer)")
    model.add_argument("--name", default="", help="a label for the model in the output")

    workload = parser.add_argument_group("workload")
    workload.add_argument("--context", type=int, default=8192,
                          help="tokens of context per slot (default 8192)")
    workload.add_argument("--parallel", type=int, default=1,
                          help="parallel slots (llama-server -np, default 1); "
                               "llama-server's --ctx-size is context x parallel")
    workload.add_argument("--cache-type", default="f16", choices=sorted(CACHE_TYPE_BYTES),
                          help="KV cache type for K and V (default f16)")

    choice = parser.add_argument_group("prediction and choice")
    choice.add_argument(
        "--efficiency", type=float, default=DEFAULT_EFFICIENCY,
        help=f"fraction of theoretical socket bandwidth llama.cpp reaches in token generation (default "
             f"{DEFAULT_EFFICIENCY}, the low end of measured 60-74%%); from a tuned host of the same "
             "family: achieved tg tok/s x bytes per token / its llamahost_bandwidth_gbs "
             "(docs/provisioning.md)",
    )
    choice.add_argument("--region", default=DEFAULT_REGION,
                        help=f"AWS region for prices (default {DEFAULT_REGION})")
    choice.add_argument("--price", action="append", default=[], metavar="TYPE=USD",
                        help="your own hourly price for a type (repeatable), e.g. c8g.24xlarge=2.90")
    choice.add_argument("--max-price", type=float, help="hourly price cap in USD")
    choice.add_argument("--min-tps", type=float, help="minimum predicted generation speed, tokens/s")
    choice.add_argument("--family", action="append", default=[],
                        help="consider only this family (repeatable)")
    choice.add_argument("--arch", action="append", default=[], choices=["x86_64", "arm64"],
                        help="consider only this CPU architecture (repeatable)")
    choice.add_argument("--catalog", type=Path, help="an instance catalog YAML instead of the built-in one")
    choice.add_argument("--top", type=int, default=8, help="rows per ranking in the table (default 8)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON (every candidate)")
    parser.set_defaults(handler=run_size)


def parse_prices(items: Sequence[str]) -> dict[str, float]:
    prices: dict[str, float] = {}
    for item in items:
        name, sep, usd = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError(item)
            prices[name.strip()] = float(usd)
        except ValueError:
            raise UserError(f"--price {item!r} is not TYPE=USD",
                            "write it like --price c8g.24xlarge=2.90") from None
    return prices


def demand_from_args(args: argparse.Namespace) -> ModelDemand:
    """The model from ``--model`` or from the explicit numbers; both or neither is an error."""
    given = [name for name in EXPLICIT_MODEL_OPTIONS if getattr(args, name) is not None]
    if args.model is not None and given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise UserError(f"--model and {flags} both describe the model",
                        "give either a GGUF file or the explicit numbers, not both")
    if args.model is not None:
        demand = demand_from_gguf(args.model)
        return demand
    missing = [name for name in REQUIRED_MODEL_OPTIONS if getattr(args, name) is None]
    if missing:
        flags = ", ".join("--" + name.replace("_", "-") for name in missing)
        raise UserError(f"no model given (missing {flags})",
                        "pass --model FILE.gguf, or --params --bits --layers --kv-heads --head-dim")
    return ModelDemand.from_parameters(
        params=args.params, bits_per_weight=args.bits, layers=args.layers, kv_heads=args.kv_heads,
        head_dim=args.head_dim, active_params=args.active_params, n_embd=args.embd, n_vocab=args.vocab,
        name=args.name,
    )


def run_size(args: argparse.Namespace) -> int:
    if args.top < 1:
        raise UserError("--top must be at least 1", "pass e.g. --top 8")
    model = demand_from_args(args)
    catalog = read_catalog(args.catalog) if args.catalog else default_catalog()
    report = size_host(
        model,
        Workload(context=args.context, parallel=args.parallel, cache_type=args.cache_type),
        catalog,
        SizingAssumptions(efficiency=args.efficiency),
        Constraints(region=args.region, max_hourly_price=args.max_price, min_tokens_per_second=args.min_tps,
                    families=tuple(args.family), architectures=tuple(args.arch),
                    price_overrides=parse_prices(args.price)),
    )
    if args.json:
        print_json(report.to_dict())
    else:
        print_report(report, top=args.top)
    if report.recommended is None:
        print(f"llamahost: no recommendation: {report.recommendation_reason}", file=sys.stderr)
        return EXIT_NOTHING_FITS
    return 0


def _money(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _notes(candidate: Candidate) -> str:
    """Short flags for the table; the full sentences are in the recommendation and in --json."""
    notes = [candidate.instance.family.architecture]
    for reason, flag in (("below the minimum", "< min tok/s"), ("over the price cap", "> price cap"),
                         ("price unknown", "no price")):
        if any(r.startswith(reason) for r in candidate.reasons):
            notes.append(flag)
    return ", ".join(notes)


def _rows(candidates: Sequence[Candidate], recommended: Candidate | None) -> list[list[Any]]:
    rows = []
    for rank, c in enumerate(candidates, start=1):
        per_dollar = c.tokens_per_dollar
        marker = " *" if recommended is not None and c.name == recommended.name else ""
        rows.append([
            rank, c.name + marker, f"{c.memory_needed_bytes / 2**30:.0f}/{c.instance.memory_gib}",
            c.placement,
            f"{c.bandwidth_gbs:.0f}", f"{c.predicted_tg:.1f}", _money(c.price_per_hour),
            "-" if per_dollar is None else f"{per_dollar:,.0f}", _notes(c),
        ])
    return rows


COLUMNS = ("#", "type", "GiB", "socket", "GB/s", "tok/s", "$/h", "tok/$", "notes")


def _ranking_table(title: str, rows: list[list[Any]]) -> Table:
    """The shared table style, with light borders and unbroken figures so 80 columns suffice.

    The GiB column is "needed/has"; socket is "whole", "vCPUs/vCPUs per socket", or "spans N".
    """
    out = table(title, COLUMNS, rows)
    out.box = box.SIMPLE_HEAD
    out.show_edge = False
    out.pad_edge = False
    out.padding = (0, 1, 0, 0)
    for column in out.columns[:-1]:
        column.no_wrap = True
    return out


def print_report(report: SizingReport, *, top: int) -> None:
    out = console()
    budget = report.budget
    workload = report.workload
    out.print(
        f"[bold]{report.model.name}[/bold]: context {workload.context} x {workload.parallel} slot(s), "
        f"KV cache {workload.cache_type} -> needs [bold]{human_bytes(budget.total)}[/bold] "
        f"(weights {human_bytes(budget.weights)}, KV cache {human_bytes(budget.kv_cache)}, "
        f"compute {human_bytes(budget.compute)}, OS {human_bytes(budget.os_reserve)}, "
        f"headroom {human_bytes(budget.headroom)})"
    )
    out.print(
        f"reads {report.bytes_per_token / 1e9:.2f} GB per generated token; predicted tg = "
        f"{report.assumptions.efficiency:.2f} (efficiency) x bandwidth / bytes per token"
    )
    by_speed, by_value = report.by_speed, report.by_value
    fitting = len(by_speed)
    too_small = [c for c in report.candidates if not c.fits]
    if not fitting:
        biggest = sorted(too_small, key=lambda c: -c.instance.memory_gib)[:top]
        out.print(_ranking_table("No size fits: the largest ones", _rows(biggest, None)))
    else:
        title = f"By predicted generation speed (top {min(top, fitting)} of {fitting} sizes that fit)"
        out.print(_ranking_table(title, _rows(by_speed[:top], report.recommended)))
        region = report.constraints.region
        out.print(_ranking_table(f"By tokens per dollar, {region} on-demand (top {min(top, len(by_value))})",
                                 _rows(by_value[:top], report.recommended)))
    if too_small and fitting:
        largest = max(too_small, key=lambda c: c.instance.memory_gib)
        out.print(f"{len(too_small)} sizes are too small (the largest of them: {largest.name}, "
                  f"{largest.instance.memory_gib} GiB).")
    if report.recommended is None:
        out.print(f"[bold red]No recommendation[/bold red]: {report.recommendation_reason}.")
        return
    best = report.recommended
    out.print(f"[bold]Recommended: {best.name}[/bold] (* above): {best.predicted_tg:.1f} tok/s predicted, "
              f"${_money(best.price_per_hour)}/h ({best.price_basis}); {report.recommendation_reason}.")
    for reason in best.reasons:
        out.print(f"  - {reason}")

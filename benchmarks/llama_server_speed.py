#!/usr/bin/env python3
"""Prompt and generation speed of llama-server binaries or flag sets, compared interleaved on this machine.

    python benchmarks/llama_server_speed.py                                   # the cached portable build
    python benchmarks/llama_server_speed.py --variant native=$(llamahost server path --native)
    python benchmarks/llama_server_speed.py --variant omp=BIN --variant noomp=OTHER_BIN --threads 2
    python benchmarks/llama_server_speed.py --variant poll0=BIN:--poll,0 --variant poll50=BIN:--poll,50
    python benchmarks/llama_server_speed.py --knob default= --knob omp-active=omp_wait_policy=active \
        --knob omp-passive=omp_wait_policy=passive --knob no-repack=repack=false --json out.json
    python benchmarks/llama_server_speed.py --knob pinned=cpus=0-1,placement=compact \
        --knob strict=cpus=0-1,placement=compact,cpu_strict=true

A variant is ``NAME=BINARY[:EXTRA,FLAGS]``, or with ``--knob NAME=FIELD=VALUE[,FIELD=VALUE]`` the cached build
run with RunConfig settings changed (rendered to flags and environment as a trial would be). Every variant
gets a fresh server per round, rounds are
interleaved (A B A B ...) so a neighbour's load hits all variants alike, and each row is the median of
the per-request rates the server itself reports (``timings.prompt_per_second`` and
``predicted_per_second``) plus the client-side time to first token and the time from start to a healthy
server (the load). The prompt cache is off and
``ignore_eos`` fixes the output length, so every request does the same work. The load average before and
after says how busy the machine was: on a shared machine a difference smaller than the spread is noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuner.config import RunConfig, parse_cpu_list
from tuner.model.default_model import default_model_path
from tuner.server.build import server_binary
from tuner.server.client import Completion, complete
from tuner.server.process import ServerProcess

PROMPT = " ".join(["The quick brown fox jumps over the lazy dog."] * 12)  # ~130 tokens


@dataclass(frozen=True)
class Variant:
    name: str
    binary: Path
    extra_args: tuple[str, ...]
    changes: tuple[tuple[str, str], ...] = ()  # RunConfig fields and their values, as typed

    def config(self, base: RunConfig) -> RunConfig:
        values: dict[str, Any] = {}
        for field, text in self.changes:
            current = getattr(base, field)
            if isinstance(current, bool):
                values[field] = text.lower() in ("1", "true", "on", "yes")
            elif isinstance(current, tuple):  # cpus, memory_nodes: a CPU list, with ';' for ','
                values[field] = parse_cpu_list(text.replace(";", ","))
            else:
                values[field] = type(current)(text)
        return dataclasses.replace(base, **values).validate()


def parse_variant(text: str) -> Variant:
    name, _, rest = text.partition("=")
    binary, _, extra = rest.partition(":")
    if not name or not binary:
        raise argparse.ArgumentTypeError(f"expected NAME=BINARY[:FLAGS], got {text!r}")
    return Variant(name, Path(binary), tuple(flag for flag in extra.split(",") if flag))


def parse_knob(text: str) -> Variant:
    name, _, rest = text.partition("=")
    pairs = [pair.partition("=") for pair in rest.split(",") if pair]
    known = {field.name for field in dataclasses.fields(RunConfig)}
    if not name or any(not value or field not in known for field, _, value in pairs):
        raise argparse.ArgumentTypeError(f"expected NAME=FIELD=VALUE[,FIELD=VALUE] with RunConfig fields, got {text!r}")
    return Variant(name, server_binary("portable"), (), tuple((field, value) for field, _, value in pairs))


def one_round(variant: Variant, model: Path, config: RunConfig, requests: int,
              n_predict: int) -> tuple[float, list[Completion]]:
    """Seconds from start to healthy, and the measured requests."""
    started = time.monotonic()
    with ServerProcess(variant.binary, model, variant.config(config), ctx_size=1024,
                       extra_args=variant.extra_args) as server:
        server.wait_healthy(120)
        load_s = time.monotonic() - started
        complete(server.base_url, PROMPT, 8, cache_prompt=False)  # warm-up, not counted
        return load_s, [complete(server.base_url, PROMPT, n_predict, ignore_eos=True, cache_prompt=False)
                        for _ in range(requests)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", type=parse_variant, default=[])
    parser.add_argument("--knob", action="append", type=parse_knob, default=[], dest="variant")
    parser.add_argument("--json", type=Path, default=None, help="also write the medians and samples here")
    parser.add_argument("--model", type=Path, default=None, help="default: the embedded SmolLM2-135M")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=4, help="measured requests per round")
    parser.add_argument("--n-predict", type=int, default=64)
    args = parser.parse_args()
    variants = args.variant or [Variant("portable", server_binary("portable"), ())]
    model = args.model or default_model_path()
    config = RunConfig(threads=args.threads, threads_batch=args.threads)
    samples: dict[str, list[Completion]] = {v.name: [] for v in variants}
    loads: dict[str, list[float]] = {v.name: [] for v in variants}
    load_before = os.getloadavg()[0]
    for _ in range(args.rounds):
        for variant in variants:
            load_s, done = one_round(variant, model, config, args.requests, args.n_predict)
            samples[variant.name] += done
            loads[variant.name].append(load_s)
    load_after = os.getloadavg()[0]
    rows: dict[str, dict[str, Any]] = {}
    print(f"model {model.name}, {args.threads} threads, {args.rounds} rounds x {args.requests} requests, "
          f"load average {load_before:.1f} -> {load_after:.1f}")
    print(f"{'variant':<12} {'pp tok/s':>10} {'(min-max)':>15} {'tg tok/s':>10} {'(min-max)':>15} {'TTFT ms':>8} "
          f"{'load s':>7}")
    for name, done in samples.items():
        pp = [c.timings.prompt_per_second for c in done]
        tg = [c.timings.predicted_per_second for c in done]
        ttft = [c.ttft_s * 1000 for c in done if c.ttft_s is not None]
        print(f"{name:<12} {statistics.median(pp):>10.1f} {f'{min(pp):.0f}-{max(pp):.0f}':>15} "
              f"{statistics.median(tg):>10.1f} {f'{min(tg):.0f}-{max(tg):.0f}':>15} {statistics.median(ttft):>8.1f} "
              f"{statistics.median(loads[name]):>7.2f}")
        rows[name] = {"pp_median": statistics.median(pp), "tg_median": statistics.median(tg),
                      "ttft_ms_median": statistics.median(ttft), "load_s_median": statistics.median(loads[name]),
                      "pp": pp, "tg": tg, "load_s": loads[name]}
    first = next(iter(rows))
    base = rows[first]
    print(f"ratios against {first}: " + ", ".join(
        f"{name} pp x{row['pp_median'] / base['pp_median']:.2f} tg x{row['tg_median'] / base['tg_median']:.2f} "
        f"load x{row['load_s_median'] / base['load_s_median']:.2f}" for name, row in rows.items() if name != first))
    if args.json is not None:
        args.json.write_text(json.dumps({"model": model.name, "threads": args.threads, "rounds": args.rounds,
                                         "requests": args.requests, "n_predict": args.n_predict,
                                         "load_average": [load_before, load_after], "variants": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

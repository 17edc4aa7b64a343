#!/usr/bin/env python3
"""Prompt and generation speed of llama-server binaries or flag sets, compared interleaved on this machine.

    python benchmarks/llama_server_speed.py                                   # the cached portable build
    python benchmarks/llama_server_speed.py --variant native=$(llamahost server path --native)
    python benchmarks/llama_server_speed.py --variant omp=BIN --variant noomp=OTHER_BIN --threads 2
    python benchmarks/llama_server_speed.py --variant poll0=BIN:--poll,0 --variant poll50=BIN:--poll,50

A variant is ``NAME=BINARY[:EXTRA,FLAGS]``. Every variant gets a fresh server per round, rounds are
interleaved (A B A B ...) so a neighbour's load hits all variants alike, and each row is the median of
the per-request rates the server itself reports (``timings.prompt_per_second`` and
``predicted_per_second``) plus the client-side time to first token. The prompt cache is off and
``ignore_eos`` fixes the output length, so every request does the same work. The load average before and
after says how busy the machine was: on a shared machine a difference smaller than the spread is noise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuner.config import RunConfig
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


def parse_variant(text: str) -> Variant:
    name, _, rest = text.partition("=")
    binary, _, extra = rest.partition(":")
    if not name or not binary:
        raise argparse.ArgumentTypeError(f"expected NAME=BINARY[:FLAGS], got {text!r}")
    return Variant(name, Path(binary), tuple(flag for flag in extra.split(",") if flag))


def one_round(variant: Variant, model: Path, config: RunConfig, requests: int, n_predict: int) -> list[Completion]:
    with ServerProcess(variant.binary, model, config, ctx_size=1024, extra_args=variant.extra_args) as server:
        server.wait_healthy(120)
        complete(server.base_url, PROMPT, 8, cache_prompt=False)  # warm-up, not counted
        return [complete(server.base_url, PROMPT, n_predict, ignore_eos=True, cache_prompt=False)
                for _ in range(requests)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", type=parse_variant, default=[])
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
    load_before = os.getloadavg()[0]
    for _ in range(args.rounds):
        for variant in variants:
            samples[variant.name] += one_round(variant, model, config, args.requests, args.n_predict)
    load_after = os.getloadavg()[0]
    print(f"model {model.name}, {args.threads} threads, {args.rounds} rounds x {args.requests} requests, "
          f"load average {load_before:.1f} -> {load_after:.1f}")
    print(f"{'variant':<12} {'pp tok/s':>10} {'(min-max)':>15} {'tg tok/s':>10} {'(min-max)':>15} {'TTFT ms':>8}")
    for name, done in samples.items():
        pp = [c.timings.prompt_per_second for c in done]
        tg = [c.timings.predicted_per_second for c in done]
        ttft = [c.ttft_s * 1000 for c in done if c.ttft_s is not None]
        print(f"{name:<12} {statistics.median(pp):>10.1f} {f'{min(pp):.0f}-{max(pp):.0f}':>15} "
              f"{statistics.median(tg):>10.1f} {f'{min(tg):.0f}-{max(tg):.0f}':>15} {statistics.median(ttft):>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

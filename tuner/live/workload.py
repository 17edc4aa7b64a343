"""The workload a live server is measured with: a fixed, seeded mix of requests, sent at a set concurrency.

Every trial replays exactly the same request sequence, so two configurations are compared on the same
work. Built-in mixes model the two common deployments:

* ``chat``: short-to-medium prompts (lognormal around ~300 words), 64-256 generated tokens;
* ``batch``: long prompts (1000-2500 words, document summarisation / RAG), 16-64 generated tokens.

A user's own traffic comes as JSONL, one ``{"prompt": "...", "max_tokens": N}`` per line.

Each request is streamed so both sides are measured: the server's own ``timings`` (llama.cpp's prompt and
generation speed) and the client's view (time to first token, total latency). Outputs have a fixed length
(``ignore_eos``) so a configuration cannot look fast by stopping early.

Every prompt is processed in full (``cache_prompt`` off). A window replays the same requests as the one before,
and llama-server keeps recent prompts in its RAM prompt cache: with caching on, from the second window each
prompt cost one token, so the prefill a production server pays for fresh prompts went unmeasured and the
settings that govern it (``threads_batch``, the batch sizes) looked free. What this gives up is the reuse of a
prefix shared by many real requests (a long system prompt), which is then measured as paid every time.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.errors import UserError
from tuner.server.client import ServerRequestError, complete

BUILTIN_MIXES = ("chat", "batch")
_VOCABULARY = ("the model reads every weight once per token so memory bandwidth bounds generation speed while "
          "prompt processing is compute bound and batches many tokens through the same matrices numa nodes "
          "cache domains threads placement hugepages kernel scheduler latency throughput request server "
          "context window attention keys values layers experts tokens sequence prompt answer summary")
_WORDS = tuple(_VOCABULARY.split())


@dataclass(frozen=True)
class Request:
    prompt: str
    max_tokens: int


@dataclass(frozen=True)
class RequestMix:
    """A named request sequence and the concurrency it is sent at."""

    name: str
    requests: tuple[Request, ...]
    concurrency: int

    def describe(self) -> dict[str, Any]:
        words = [len(r.prompt.split()) for r in self.requests]
        outputs = [r.max_tokens for r in self.requests]
        return {"name": self.name, "requests": len(self.requests), "concurrency": self.concurrency,
                "prompt_words_median": statistics.median(words), "max_tokens_median": statistics.median(outputs)}


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def builtin_requests(mix: str, count: int, *, seed: int = 7, scale: float = 1.0) -> tuple[Request, ...]:
    """``count`` requests of a built-in mix. ``scale`` shrinks prompts and outputs for small test models."""
    if mix not in BUILTIN_MIXES:
        raise UserError(f"unknown workload {mix!r}", f"use one of {', '.join(BUILTIN_MIXES)} or a .jsonl file")
    rng = random.Random(f"{mix}:{seed}")
    out = []
    for _ in range(count):
        if mix == "chat":
            words = min(1500, max(50, int(rng.lognormvariate(math.log(300), 0.6))))
            tokens = rng.randint(64, 256)
        else:
            words = rng.randint(1000, 2500)
            tokens = rng.randint(16, 64)
        out.append(Request(_text(rng, max(1, int(words * scale))), max(1, int(tokens * scale))))
    return tuple(out)


def load_jsonl(path: Path) -> tuple[Request, ...]:
    """A user's requests; every bad line is reported with its number."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise UserError(f"workload file {path} not found", "pass chat, batch or an existing .jsonl file") from None
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not JSON ({exc.msg})",
                            'write one {"prompt": "...", "max_tokens": N} object per line') from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"]:
            raise UserError(f"{path}:{number}: needs a non-empty string 'prompt'",
                            'write one {"prompt": "...", "max_tokens": N} object per line')
        max_tokens = item.get("max_tokens", 128)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= 32768:
            raise UserError(f"{path}:{number}: max_tokens must be an integer between 1 and 32768",
                            "fix that line")
        out.append(Request(item["prompt"], max_tokens))
    if not out:
        raise UserError(f"workload file {path} has no requests", 'add lines like {"prompt": "...", "max_tokens": 64}')
    return tuple(out)


def make_request_mix(spec: str, *, concurrency: int, count: int = 32, scale: float = 1.0) -> RequestMix:
    if concurrency < 1:
        raise UserError("--concurrency must be at least 1", "pass --concurrency 4")
    if spec in BUILTIN_MIXES:
        return RequestMix(spec, builtin_requests(spec, count, scale=scale), concurrency)
    path = Path(spec)
    return RequestMix(path.name, load_jsonl(path), concurrency)


@dataclass(frozen=True)
class RequestRecord:
    ok: bool
    error: str | None = None
    ttft_s: float | None = None
    latency_s: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prompt_per_second: float = 0.0
    predicted_per_second: float = 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: a p95 is a latency some request really had)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Window:
    """One pass over the workload: the aggregate numbers a live trial's sample is made of."""

    records: tuple[RequestRecord, ...]
    wall_s: float

    @property
    def ok(self) -> tuple[RequestRecord, ...]:
        return tuple(r for r in self.records if r.ok)

    @property
    def errors(self) -> list[str]:
        return [r.error or "?" for r in self.records if not r.ok]

    @property
    def throughput_tps(self) -> float:
        """Generated tokens per second over the window, all requests together."""
        return sum(r.generated_tokens for r in self.ok) / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def prompt_tps(self) -> float:
        return sum(r.prompt_tokens for r in self.ok) / self.wall_s if self.wall_s > 0 else 0.0

    def latency(self, q: float) -> float:
        return percentile([r.latency_s for r in self.ok], q)

    def ttft(self, q: float) -> float:
        return percentile([r.ttft_s for r in self.ok if r.ttft_s is not None], q)

    def server_tg_tps(self) -> float:
        """Median per-request generation speed as llama.cpp counted it."""
        values = [r.predicted_per_second for r in self.ok if r.predicted_per_second > 0]
        return statistics.median(values) if values else 0.0

    def server_pp_tps(self) -> float:
        values = [r.prompt_per_second for r in self.ok if r.prompt_per_second > 0]
        return statistics.median(values) if values else 0.0

    def metrics(self) -> dict[str, float]:
        return {
            "throughput_tps": self.throughput_tps,
            "prompt_tps": self.prompt_tps,
            "latency_p50_s": self.latency(50),
            "latency_p95_s": self.latency(95),
            "ttft_p50_s": self.ttft(50),
            "ttft_p95_s": self.ttft(95),
            "server_tg_tps": self.server_tg_tps(),
            "server_pp_tps": self.server_pp_tps(),
            "errors": float(len(self.errors)),
        }


def _send(base_url: str, request: Request, api_key: str | None, timeout_s: float,
          deadline_s: float | None) -> RequestRecord:
    started = time.perf_counter()
    try:
        done = complete(base_url, request.prompt, request.max_tokens, api_key=api_key, ignore_eos=True,
                        cache_prompt=False, timeout_s=timeout_s, deadline_s=deadline_s)
    except ServerRequestError as exc:
        return RequestRecord(ok=False, error=exc.problem, latency_s=time.perf_counter() - started)
    t = done.timings
    return RequestRecord(ok=True, ttft_s=done.ttft_s, latency_s=done.total_s, prompt_tokens=t.prompt_n,
                         generated_tokens=t.predicted_n, prompt_per_second=t.prompt_per_second,
                         predicted_per_second=t.predicted_per_second)


def run_window(base_url: str, mix: RequestMix, *, api_key: str | None = None,
               timeout_s: float = 300.0, deadline_s: float | None = None) -> Window:
    """Send every request of the mix, ``concurrency`` at a time, and collect what each one saw.
    ``deadline_s`` cuts off any one request that takes longer (it is then an error)."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=mix.concurrency, thread_name_prefix="workload") as pool:
        records = tuple(pool.map(lambda r: _send(base_url, r, api_key, timeout_s, deadline_s), mix.requests))
    return Window(records=records, wall_s=time.perf_counter() - started)

"""A small HTTP client for llama-server: health, one streamed completion, and the Prometheus counters.

The live tuner's workload driver is built on :func:`complete`, so it measures both sides of a request:
the server's own per-request ``timings`` (prompt and generation speed as llama.cpp counted them) and the
client's view (time to first token over a streaming connection, total wall time). Standard library only.

``/metrics`` gauges are reset by every scrape; only the ``*_total`` counters can be differenced between
two scrapes, so :class:`Metrics` keeps them apart.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit

from tuner.errors import UserError

DEFAULT_TIMEOUT_S = 300.0
_COUNTER_SUFFIX = "_total"
# The server is addressed directly: an HTTP(S)_PROXY in the environment must not reroute 127.0.0.1.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerRequestError(UserError):
    """The server refused or broke off a request (bad key, bad body, server error)."""


@dataclass(frozen=True)
class Timings:
    """llama-server's own accounting for one request (``timings`` in its response)."""

    cache_n: int  # prompt tokens reused from the slot's cache (not processed again)
    prompt_n: int
    prompt_ms: float
    prompt_per_second: float
    predicted_n: int
    predicted_ms: float
    predicted_per_second: float

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Timings:
        missing = [f.name for f in fields(cls) if f.name not in data]
        if missing:
            raise ServerRequestError(f"the server's timings lack {', '.join(missing)}: {data}",
                                     "use the llama-server built by `llamahost server build`")
        return cls(cache_n=int(data["cache_n"]), prompt_n=int(data["prompt_n"]),
                   prompt_ms=float(data["prompt_ms"]), prompt_per_second=float(data["prompt_per_second"]),
                   predicted_n=int(data["predicted_n"]), predicted_ms=float(data["predicted_ms"]),
                   predicted_per_second=float(data["predicted_per_second"]))


@dataclass(frozen=True)
class Completion:
    """One streamed completion as the server counted it and as the client saw it."""

    text: str
    finish_reason: str | None
    timings: Timings
    ttft_s: float | None  # request sent -> first generated text arrived; None if no text came
    total_s: float  # request sent -> stream closed


@dataclass(frozen=True)
class Metrics:
    """One scrape of ``/metrics``: counters (monotonic, safe to difference) and gauges (reset on scrape)."""

    counters: dict[str, float]
    gauges: dict[str, float]

    def counter_delta(self, earlier: Metrics) -> dict[str, float]:
        """What each counter grew by since ``earlier`` (a server restart makes this negative: check)."""
        return {name: value - earlier.counters.get(name, 0.0) for name, value in self.counters.items()}


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def health(base_url: str, timeout_s: float = 2.0) -> int | None:
    """HTTP status of ``/health`` (200 ready, 503 loading), or None when nothing answers."""
    try:
        with _DIRECT.open(f"{base_url}/health", timeout=timeout_s) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException):
        return None


def parse_prometheus(text: str) -> Metrics:
    """Prometheus text format -> counters and gauges by series name (labels kept in the name)."""
    types: dict[str, str] = {}
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            parts = line.split()
            if len(parts) >= 4:
                types[parts[2]] = parts[3]
        elif line and not line.startswith("#"):
            name, _, number = line.rpartition(" ")
            try:
                values[name] = float(number)
            except ValueError:
                continue
    counters: dict[str, float] = {}
    gauges: dict[str, float] = {}
    for name, value in values.items():
        family = name.split("{", 1)[0]
        is_counter = types.get(family) == "counter" or family.endswith(_COUNTER_SUFFIX)
        (counters if is_counter else gauges)[name] = value
    return Metrics(counters=counters, gauges=gauges)


def read_metrics(base_url: str, *, api_key: str | None = None, timeout_s: float = 10.0) -> Metrics:
    """Scrape ``/metrics`` (the server must run with ``--metrics``, which ServerProcess passes)."""
    request = urllib.request.Request(f"{base_url}/metrics", headers=_headers(api_key))
    try:
        with _DIRECT.open(request, timeout=timeout_s) as response:
            return parse_prometheus(response.read().decode())
    except urllib.error.HTTPError as exc:
        raise ServerRequestError(f"GET {base_url}/metrics answered {exc.code}: {exc.read()[:300]!r}",
                                 "start llama-server with --metrics and pass its API key") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ServerRequestError(f"GET {base_url}/metrics failed: {exc}", "check that the server runs") from None


def model_meta(base_url: str, *, api_key: str | None = None, timeout_s: float = 10.0) -> dict[str, Any]:
    """The loaded model's ``meta`` from ``/v1/models`` (``n_vocab``, ``n_ctx``, ``n_params``, ``size``)."""
    request = urllib.request.Request(f"{base_url}/v1/models", headers=_headers(api_key))
    try:
        with _DIRECT.open(request, timeout=timeout_s) as response:
            data = json.load(response)
        meta = data["data"][0]["meta"]
    except urllib.error.HTTPError as exc:
        raise ServerRequestError(f"GET {base_url}/v1/models answered {exc.code}", "check the API key") from None
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise ServerRequestError(f"GET {base_url}/v1/models gave no model metadata: {exc}",
                                 "use the llama-server built by `llamahost server build`") from None
    if not isinstance(meta, dict):
        raise ServerRequestError(f"GET {base_url}/v1/models gave no model metadata: {meta!r}",
                                 "use the llama-server built by `llamahost server build`")
    return meta


def _stream_events(response: http.client.HTTPResponse) -> Any:
    """Yield each JSON object of a server-sent-event stream until ``[DONE]`` or the end."""
    while True:
        raw = response.readline()
        if not raw:
            return
        line = raw.decode("utf-8", errors="replace").strip()
        if not line.startswith("data:"):
            if line.startswith("error:"):
                raise ServerRequestError(f"the server broke off the stream: {line[6:].strip()}",
                                         "read the server log")
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        yield json.loads(payload)


def complete(base_url: str, prompt: str | list[int], n_predict: int, *, api_key: str | None = None,
             temperature: float = 0.0, seed: int = 42, ignore_eos: bool = False, cache_prompt: bool = True,
             timeout_s: float = DEFAULT_TIMEOUT_S, deadline_s: float | None = None) -> Completion:
    """Stream one ``/v1/completions`` request and return its text, server timings and client TTFT.

    ``prompt`` is text, or token ids (a benchmark's fixed prompt, independent of the tokenizer);
    ``ignore_eos`` makes the server generate exactly ``n_predict`` tokens (fixed-length workloads);
    ``cache_prompt=False`` makes it process the whole prompt again even if a slot holds it.
    ``timeout_s`` bounds each wait on the socket; ``deadline_s`` bounds the whole request, so a server that
    trickles tokens slowly is cut off too (the live tuner's latency guard).
    """
    url = urlsplit(base_url)
    body = json.dumps({
        "prompt": prompt, "max_tokens": n_predict, "stream": True, "temperature": temperature,
        "seed": seed, "ignore_eos": ignore_eos, "cache_prompt": cache_prompt,
    }).encode()
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream", **_headers(api_key)}
    socket_timeout = min(timeout_s, deadline_s) if deadline_s is not None else timeout_s
    connection = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port or 80, timeout=socket_timeout)
    try:
        started = time.perf_counter()
        connection.request("POST", f"{url.path.rstrip('/')}/v1/completions", body=body, headers=headers)
        response = connection.getresponse()
        if response.status != 200:
            detail = response.read()[:500].decode(errors="replace")
            raise ServerRequestError(f"POST /v1/completions answered {response.status}: {detail}",
                                     "check the API key and the request; read the server log")
        text: list[str] = []
        ttft: float | None = None
        timings: dict[str, Any] | None = None
        finish_reason: str | None = None
        for event in _stream_events(response):
            if "error" in event:
                raise ServerRequestError(f"the server reported an error: {event['error']}",
                                         "read the server log")
            for choice in event.get("choices") or ():
                piece = choice.get("text") or ""
                if piece and ttft is None:
                    ttft = time.perf_counter() - started
                text.append(piece)
                finish_reason = choice.get("finish_reason") or finish_reason
            timings = event.get("timings") or timings
            if deadline_s is not None and time.perf_counter() - started > deadline_s:
                raise ServerRequestError(f"the request took longer than {deadline_s:.1f} s",
                                         "the configuration is too slow for this workload")
        total = time.perf_counter() - started
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise ServerRequestError(f"POST {base_url}/v1/completions failed: {exc}",
                                 "check that the server runs; read its log") from None
    finally:
        connection.close()
    if timings is None:
        raise ServerRequestError("the completion stream ended without timings",
                                 "use the llama-server built by `llamahost server build`")
    return Completion(text="".join(text), finish_reason=finish_reason, timings=Timings.from_json(timings),
                      ttft_s=ttft, total_s=total)

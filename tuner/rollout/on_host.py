"""The canary's measurement, run on the host itself: the workload against the local llama-server, as JSON.

It travels as a zip file (:func:`tuner.rollout.measure.pack`) over Ansible's own connection (SSH, SSM or
local) and runs with the host's python3, so it needs neither llamahost installed on the host nor a port
forward. It uses the live tuner's own workload driver (:func:`tuner.live.workload.run_window`): the canary
measures exactly what a live trial measures. Standard library only.

The spec (requests, concurrency, windows) is ``tuner/rollout/spec.json`` inside the zip; the address and the API key
file come on the command line (the key is read on the host, as root; it never travels).
"""

from __future__ import annotations

import argparse
import json
import pkgutil
import time
from pathlib import Path
from typing import Any

from tuner.errors import UserError
from tuner.live.workload import Request, RequestMix, run_window
from tuner.server.client import health

SPEC_NAME = "spec.json"


def read_spec(text: str) -> tuple[RequestMix, int, int]:
    data = json.loads(text)
    requests = tuple(Request(str(r["prompt"]), int(r["max_tokens"])) for r in data["requests"])
    return RequestMix(str(data["name"]), requests, int(data["concurrency"])), int(data["windows"]), \
        int(data["warmup"])


def wait_healthy(base_url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if health(base_url) == 200:
            return
        time.sleep(1.0)
    raise UserError(f"the server at {base_url} did not answer /health with 200 within {timeout_s:.0f} s",
                    "check the unit's journal on the host")


def measure(base_url: str, mix: RequestMix, *, windows: int, warmup: int, api_key: str | None,
            request_timeout_s: float) -> dict[str, Any]:
    """``warmup`` windows (not kept: the first after a restart pages the weights in), then ``windows``."""
    for _ in range(warmup):
        run_window(base_url, mix, api_key=api_key, timeout_s=request_timeout_s)
    out = []
    for _ in range(windows):
        window = run_window(base_url, mix, api_key=api_key, timeout_s=request_timeout_s)
        out.append({"throughput_tps": window.throughput_tps, "requests": len(window.records),
                    "errors": len(window.errors), "wall_s": window.wall_s, "latency_p95_s": window.latency(95),
                    "first_error": window.errors[0] if window.errors else None})
    return {"base_url": base_url, "workload": mix.describe(), "windows": out}


def _spec_text() -> str:
    """``spec.json`` beside this module (inside the zip, where :func:`tuner.rollout.measure.pack` put it)."""
    data = pkgutil.get_data(__package__ or "tuner.rollout", SPEC_NAME)
    if data is None:
        raise UserError(f"no {SPEC_NAME} beside the measurement", "build it with `llamahost rollout`")
    return data.decode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="measure the local llama-server under a workload (JSON)")
    parser.add_argument("--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--key-file", help="the API key file (read if it exists)")
    parser.add_argument("--health-timeout", type=float, default=600.0)
    parser.add_argument("--request-timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    try:
        mix, windows, warmup = read_spec(_spec_text())
        key_path = Path(args.key_file) if args.key_file else None
        api_key = key_path.read_text().strip() if key_path is not None and key_path.is_file() else None
        wait_healthy(args.url, args.health_timeout)
        report = measure(args.url, mix, windows=windows, warmup=warmup, api_key=api_key,
                         request_timeout_s=args.request_timeout)
    except (UserError, OSError, ValueError, KeyError) as exc:
        print(json.dumps({"error": str(exc)}))
        return 2
    print(json.dumps(report))
    return 0

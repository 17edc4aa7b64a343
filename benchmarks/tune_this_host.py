"""Benchmark: tune this host with the real small model and report what the tuner achieved and what it cost.

Reports, from one real `llamahost tune` run in a fresh study:

* baseline vs. tuned pp and tg tokens/s, each with its 95% confidence interval (from the interleaved
  verification rounds, measured side by side in the same run);
* the improvement with its interval and p-value;
* the fraction of the measured memory-bandwidth roofline the tuned configuration reaches;
* the fraction of tuning wall time spent measuring (llama.cpp running the workload: warm-up, samples and
  the informational runs) rather than starting workers, loading the model or sampling parameters.
  Target: >= 80%. The script exits 1 when the target is missed.

With ``--live`` the run is ``llamahost tune --live --local`` instead: a supervised llama-server on this
machine tuned under the built-in chat workload (aggregate tok/s, latency and TTFT with their intervals; no
roofline, and the measuring-time target does not apply: live trials restart a server). The local server is
shut down afterwards.

Usage: python benchmarks/tune_this_host.py [--budget 10m] [--objective both] [--model M.gguf] [--out DIR]
       python benchmarks/tune_this_host.py --live [--budget 15m] [--concurrency 2] [--prompt-scale 0.25]
The JSON and a Markdown summary are written to --out (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

TARGET_MEASURING_FRACTION = 0.80


def tune_command(args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "tuner.cli", "tune", "--budget", args.budget, "--json", "--seed", str(args.seed)]
    if args.live:
        cmd += ["--live", "--local", "--port", str(args.port), "--concurrency", str(args.concurrency),
                "--requests", str(args.requests), "--prompt-scale", str(args.prompt_scale)]
    else:
        cmd += ["--objective", args.objective]
    return cmd + (["--model", str(args.model)] if args.model else [])


def run_tune(args: argparse.Namespace, home: Path) -> dict[str, Any]:
    env = {**os.environ, "LLAMAHOST_HOME": str(home)}
    try:
        done = subprocess.run(tune_command(args), env=env, capture_output=True, text=True, check=False)
    finally:
        if args.live:  # the supervised server outlives a live run (it is the deployment); a benchmark must not
            subprocess.run([sys.executable, "-m", "tuner.cli", "server", "stop", "--port", str(args.port)], env=env,
                           capture_output=True, check=False)
    sys.stderr.write(done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"llamahost tune failed with exit code {done.returncode}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def ci(block: dict[str, Any] | None) -> str:
    if not block:
        return "-"
    return f"{block['median']:.1f} [{block['ci_low']:.1f}, {block['ci_high']:.1f}] (n={block['n']})"


def summarize(result: dict[str, Any], budget: str, *, live: bool) -> tuple[list[tuple[str, str]], bool]:
    from tuner.result import METRIC_LABELS, TuneResult, metric_names

    search = result["search"]
    fraction = search["measuring_fraction"]
    ok = live or fraction >= TARGET_MEASURING_FRACTION
    rows = [
        ("host", f"{result['host']['hostname']} ({result['host']['cpu_model']}, "
                 f"{result['host']['physical_cores']} cores, {result['host']['logical_cpus']} CPUs)"),
        ("model", f"{result['model']['name']} {result['model']['quantization']}"),
        ("budget / wall time", f"{budget} / {search['wall_seconds']:.0f} s"),
        ("trials", f"{search['study_trials']} ({search['complete']} complete, {search['pruned']} pruned, "
                   f"{search['failed']} failed)"),
        ("verdict", result["summary"]),
    ]
    for name in metric_names(TuneResult.from_dict(result, origin="the output of llamahost tune --json")):
        label = METRIC_LABELS.get(name, name)
        rows += [(f"baseline {label}", ci(result["baseline"].get(name))),
                 (f"tuned {label}", ci(result["chosen"].get(name)))]
    improvement = result.get("improvement")
    if improvement:
        rows.append(("improvement (objective)", f"x{improvement['ratio']:.3f} [{improvement['ci_low']:.3f}, "
                                                f"{improvement['ci_high']:.3f}], p={improvement['p_value']:.2g}"))
    roof = result.get("roofline")
    if roof:
        rows.append(("bandwidth roofline", f"{100 * roof['fraction']:.1f}% of {roof['max_tg_tps']:.1f} tg tok/s "
                                           f"({roof['bandwidth_gbps']:.1f} GB/s measured, "
                                           f"{roof['bytes_per_token'] / 1e6:.1f} MB/token)"))
    target = "no target for live runs" if live else \
        f"target >= {100 * TARGET_MEASURING_FRACTION:.0f}%: {'PASS' if ok else 'FAIL'}"
    rows.append(("time spent measuring", f"{100 * fraction:.1f}% ({target})"))
    rows.append(("tuned llama-server flags", " ".join(result["settings"]["server_args"])))
    return rows, ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="10m")
    parser.add_argument("--objective", default="both", choices=("tg", "pp", "both"))
    parser.add_argument("--model", type=Path)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--live", action="store_true", help="tune a local llama-server under a request workload")
    parser.add_argument("--port", type=int, default=18281, help="--live: port of the local server")
    parser.add_argument("--concurrency", type=int, default=2, help="--live: requests in flight")
    parser.add_argument("--requests", type=int, default=8, help="--live: requests per window")
    parser.add_argument("--prompt-scale", type=float, default=0.25, help="--live: scale of the chat mix")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llamahost-bench-") as tmp:
        result = run_tune(args, Path(tmp))
    rows, ok = summarize(result, args.budget, live=args.live)
    width = max(len(k) for k, _ in rows)
    text = "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
    print(text)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / f"{'live' if args.live else 'tune'}-{platform.node()}-{stamp}"
    base.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    base.with_suffix(".md").write_text("| what | value |\n|---|---|\n"
                                       + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n")
    print(f"\nwritten: {base}.json, {base}.md")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

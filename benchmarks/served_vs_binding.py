#!/usr/bin/env python3
"""pp and tg of the llama-server build that serves (what every trial measures now) against llama-cpp-python's own
build of the same llama.cpp (what benchmark trials measured before), interleaved on this machine.

    python benchmarks/served_vs_binding.py [--rounds 5] [--threads 2] [--model M.gguf]

Both sides do the same work, llama-bench style: a prompt of ``--pp-tokens`` random token ids decoded from an empty
context (pp), then ``--tg-tokens`` tokens one at a time after it (tg). The binding side decodes them through
llama-cpp-python's low-level API in a fresh process; the served side is a real benchmark trial
(:func:`tuner.trial.runner.run_trial`): a worker that starts llama-server with the same settings and reads the
server's own timings, so tg includes greedy sampling as serving does. Rounds alternate the two (A B A B ...), so a
neighbour's load hits both alike; the table gives each side's median and the ratio of medians (served / binding).
Writes ``served_vs_binding.json`` and ``.txt`` next to this script (atomic, previous kept).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuner.atomic import write_atomic
from tuner.config import RunConfig
from tuner.model.default_model import default_model_path
from tuner.search import fixed_samples
from tuner.server.build import server_binary
from tuner.server.identity import identify
from tuner.stats import StopRule
from tuner.trial.protocol import TrialSpec, Warmup, Workload
from tuner.trial.runner import run_trial

HERE = Path(__file__).resolve().parent

# One fresh process per round, as a trial worker: load, one warm-up pp+tg, then ``samples`` measured pp+tg.
BINDING_ROUND = textwrap.dedent("""
    import json, random, sys, time
    import llama_cpp as L
    model_path, threads, pp_tokens, tg_tokens, samples = sys.argv[1], *map(int, sys.argv[2:6])
    quiet = L.llama_log_callback(lambda *a: None)  # kept referenced: llama.cpp holds the pointer
    L.llama_log_set(quiet, None)
    L.llama_backend_init()
    model = L.llama_model_load_from_file(model_path.encode(), L.llama_model_default_params())
    params = L.llama_context_default_params()
    params.n_ctx, params.n_threads, params.n_threads_batch = pp_tokens + tg_tokens + 256, threads, threads
    ctx = L.llama_init_from_model(model, params)
    memory = L.llama_get_memory(ctx)
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    rng = random.Random(1234)
    prompt = [rng.randrange(n_vocab) for _ in range(pp_tokens)]
    generated = [rng.randrange(n_vocab) for _ in range(tg_tokens)]
    def decode(tokens):
        array = (L.llama_token * len(tokens))(*tokens)
        assert L.llama_decode(ctx, L.llama_batch_get_one(array, len(tokens))) == 0
    def one():
        L.llama_memory_clear(memory, True)
        start = time.perf_counter()
        for i in range(0, len(prompt), params.n_batch):
            decode(prompt[i:i + params.n_batch])
        L.llama_synchronize(ctx)
        pp = len(prompt) / (time.perf_counter() - start)
        start = time.perf_counter()
        for token in generated:
            decode([token])
        L.llama_synchronize(ctx)
        return pp, len(generated) / (time.perf_counter() - start)
    one()
    runs = [one() for _ in range(samples)]
    print(json.dumps({"pp": [r[0] for r in runs], "tg": [r[1] for r in runs]}))
""")


def binding_round(model: Path, threads: int, workload: Workload, samples: int) -> dict[str, list[float]]:
    done = subprocess.run([sys.executable, "-c", BINDING_ROUND, str(model), str(threads), str(workload.pp_tokens),
                           str(workload.tg_tokens), str(samples)], capture_output=True, text=True, check=True,
                          timeout=600)
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def served_round(model: Path, binary: Path, threads: int, workload: Workload, samples: int) -> dict[str, list[float]]:
    spec = TrialSpec(model_path=str(model), config=RunConfig(threads=threads, threads_batch=threads).to_dict(),
                     objective="both", server_binary=str(binary), workload=workload,
                     warmup=Warmup(max_runs=1, max_seconds=60),
                     stop=fixed_samples(StopRule(), samples),
                     max_measure_seconds=600)
    with tempfile.TemporaryDirectory(prefix="served-vs-binding-") as scratch:
        outcome = run_trial(spec, timeout_s=900, log_path=Path(scratch) / "trial.log")
    return {"pp": outcome.series["pp_tps"], "tg": outcome.series["tg_tps"]}


def load_average() -> float:
    return os.getloadavg()[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=3, help="measured pp+tg runs per round and side (>= 3)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--pp-tokens", type=int, default=512)
    parser.add_argument("--tg-tokens", type=int, default=128)
    parser.add_argument("--model", type=Path)
    args = parser.parse_args()
    model = args.model or default_model_path()
    binary = server_binary("portable")
    workload = Workload(pp_tokens=args.pp_tokens, tg_tokens=args.tg_tokens)
    sides: dict[str, dict[str, list[float]]] = {"binding": {"pp": [], "tg": []}, "served": {"pp": [], "tg": []}}
    load_before = load_average()
    for number in range(args.rounds):
        for side in ("binding", "served") if number % 2 == 0 else ("served", "binding"):
            got = binding_round(model, args.threads, workload, args.samples) if side == "binding" else \
                served_round(model, binary, args.threads, workload, args.samples)
            for metric in ("pp", "tg"):
                sides[side][metric].append(statistics.median(got[metric]))
            print(f"round {number + 1}/{args.rounds} {side}: pp {sides[side]['pp'][-1]:.1f} "
                  f"tg {sides[side]['tg'][-1]:.1f} tok/s", file=sys.stderr, flush=True)
    import llama_cpp

    served = identify(binary)
    medians = {side: {metric: statistics.median(values) for metric, values in by_metric.items()}
               for side, by_metric in sides.items()}
    report = {
        "model": str(model), "threads": args.threads, "rounds": args.rounds, "samples_per_round": args.samples,
        "workload": {"pp_tokens": workload.pp_tokens, "tg_tokens": workload.tg_tokens},
        "binding": {"llama_cpp_python": llama_cpp.__version__,
                    "system_info": llama_cpp.llama_print_system_info().decode().strip()},
        "served": served.to_dict(),
        "round_medians": sides, "medians": medians,
        "ratio_served_over_binding": {metric: medians["served"][metric] / medians["binding"][metric]
                                      for metric in ("pp", "tg")},
        "load_average": {"before": load_before, "after": load_average()},
    }
    lines = [f"{'side':8} {'pp tok/s (median; rounds)':44} {'tg tok/s (median; rounds)':44}"]
    for side in ("binding", "served"):
        cells = [f"{medians[side][m]:7.1f}; " + " ".join(f"{v:.0f}" for v in sides[side][m]) for m in ("pp", "tg")]
        lines.append(f"{side:8} {cells[0]:44} {cells[1]:44}")
    ratio = report["ratio_served_over_binding"]
    lines.append(f"served / binding: pp x{ratio['pp']:.2f}, tg x{ratio['tg']:.2f} "
                 f"(load average {load_before:.2f} -> {report['load_average']['after']:.2f})")
    lines.append(f"binding: llama-cpp-python {llama_cpp.__version__}: {report['binding']['system_info']}")
    lines.append(f"served:  llama-server {served.sha256[:12]}... {served.version}: {served.system_info}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    write_atomic(HERE / "served_vs_binding.json", json.dumps(report, indent=2) + "\n")
    write_atomic(HERE / "served_vs_binding.txt", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

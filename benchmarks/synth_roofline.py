#!/usr/bin/env python3
"""Token generation on a bandwidth-bound synthetic model against the probe's bandwidth, measured side by side.

    python benchmarks/synth_roofline.py                       # Llama-3.2-3B's shape in Q4_K_M (about 1.9 GB)
    python benchmarks/synth_roofline.py --rounds 5 --threads 1,2

SmolLM2-135M is limited by per-token overhead, not memory, so the roofline fraction the tuner reports for it
says little. This writes a model in a real 3B model's shape with `llamahost model synth` (timing the write),
then takes interleaved rounds: the probe's bandwidth, then llama-server's generation speed at each thread count,
so every tg figure is judged against a bandwidth measured within the same minute. Each round's fraction is
``tg x bytes read per token / bandwidth``; above 1 the probe reads slower than llama.cpp does (it underestimates
the machine). Results go to benchmarks/synth_roofline.json and .txt.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuner.config import RunConfig
from tuner.model.default_model import default_model_path
from tuner.model.gguf_file import inspect_model
from tuner.model.synth import plan_from_shape, write_synthetic
from tuner.model.synth_shape import shape_from_hf_config
from tuner.probe.bandwidth import measure_bandwidth
from tuner.probe.collect import read_host
from tuner.roofline import roofline
from tuner.server.build import server_binary
from tuner.server.client import complete
from tuner.server.process import ServerProcess

HERE = Path(__file__).resolve().parent
# meta-llama/Llama-3.2-3B's config.json (the fields synth reads).
LLAMA_32_3B = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 3072,
               "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8,
               "intermediate_size": 8192, "max_position_embeddings": 131072, "rope_theta": 500000.0,
               "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
PROMPT = "The quick brown fox jumps over the lazy dog."


def tg_speed(binary: Path, model: Path, threads: int, requests: int, n_predict: int) -> tuple[float, int]:
    """Median generation speed (tok/s, the server's own timing) and the prompt's length in tokens."""
    config = RunConfig(threads=threads, threads_batch=threads)
    with ServerProcess(binary, model, config, ctx_size=512) as server:
        server.wait_healthy(600)
        complete(server.base_url, PROMPT, 4, cache_prompt=False)  # warm-up: the model's pages are faulted in
        runs = [complete(server.base_url, PROMPT, n_predict, ignore_eos=True, cache_prompt=False)
                for _ in range(requests)]
    return statistics.median(r.timings.predicted_per_second for r in runs), runs[0].timings.prompt_n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path.home() / ".cache/llamahost/synth/llama-3.2-3b-q4_k_m.gguf")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--n-predict", type=int, default=32)
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]

    write_seconds = None
    if not args.model.exists():
        plan = plan_from_shape(shape_from_hf_config(LLAMA_32_3B, name="Llama-3.2-3B"), "Q4_K_M",
                               tokenizer=default_model_path())
        started = time.perf_counter()
        write_synthetic(plan, args.model)
        write_seconds = time.perf_counter() - started
    model = inspect_model(args.model)
    binary = server_binary()
    topology = read_host().topology
    rounds = []
    for number in range(1, args.rounds + 1):
        bandwidth = measure_bandwidth(topology)
        row: dict[str, object] = {"round": number, "bandwidth_gbps": bandwidth.all_nodes_gbps,
                                  "bandwidth_samples_gbps": list(bandwidth.samples_gbps),
                                  "bandwidth_cpu_share": bandwidth.cpu_share, "load_before": os.getloadavg()[0]}
        for count in threads:
            tg, prompt_n = tg_speed(binary, args.model, count, args.requests, args.n_predict)
            roof = roofline(bandwidth.all_nodes_gbps, model, tg, depth=prompt_n + (args.n_predict - 1) / 2)
            row[f"tg_tps_{count}t"] = round(tg, 2)
            row[f"fraction_{count}t"] = round(roof.fraction, 3)
            row[f"read_gbps_{count}t"] = round(tg * roof.bytes_per_token / 1e9, 2)
        rounds.append(row)
        print(json.dumps(row), flush=True)
    summary = {
        "model": {"path": str(args.model), "size_bytes": model.size_bytes, "bytes_per_token": model.bytes_per_token,
                  "synthetic": model.synthetic,
                  "written_in_s": None if write_seconds is None else round(write_seconds, 1),
                  "write_gbps": None if write_seconds is None else round(model.size_bytes / write_seconds / 1e9, 2)},
        "medians": {key: statistics.median(float(r[key]) for r in rounds)  # type: ignore[arg-type]
                    for key in rounds[0] if key not in ("round", "bandwidth_samples_gbps")},
        "rounds": rounds,
    }
    (HERE / "synth_roofline.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"model: {model.name}, {model.size_bytes / 1e9:.2f} GB, {model.bytes_per_token / 1e9:.2f} GB read per "
             f"token (synthetic: {model.synthetic})"]
    if write_seconds is not None:
        lines.append(f"synth wrote it in {write_seconds:.1f} s ({model.size_bytes / write_seconds / 1e9:.2f} GB/s)")
    lines += [f"{key:>22}: {value:.3f}" for key, value in summary["medians"].items()]  # type: ignore[union-attr]
    (HERE / "synth_roofline.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

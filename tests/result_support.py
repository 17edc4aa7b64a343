"""Result files as the tuner writes them, for the write-back tests: built from a real RunConfig, so a test
changes one thing (a hostile variable, another model) against an otherwise faithful result."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from tuner.config import RunConfig, RunKind
from tuner.model.checksum import sha256_of
from tuner.result import FORMAT_VERSION, TuneResult, write_result_data

MODEL_SHA = "ab" * 32
HOST_FINGERPRINT = "f00dfeed" * 8
# flash attention "on": a value YAML 1.1 (Ansible's loader) would read as a boolean if it were written unquoted
WINNER = RunConfig(threads=24, threads_batch=24, cpus=tuple(range(24)), placement="compact", batch_size=1024,
                   flash_attn="on")




def _stand_in_server() -> Path:
    path = Path(tempfile.mkdtemp(prefix="llamahost-measured-")) / "llama-server"
    path.write_bytes(b"#!/bin/sh\n# the llama-server build a benchmark result was measured on (a stand-in)\n")
    return path


# The build benchmark results name: a vars file that deploys it carries DEPLOYS_MEASURED_SERVER.
MEASURED_SERVER = _stand_in_server()
DEPLOYS_MEASURED_SERVER = f'llama_server_binary_src: "{MEASURED_SERVER}"\n'


def proven_result(config: RunConfig = WINNER, *, kind: RunKind = "benchmark", verdict: str = "improved",
                  significant: bool = True, model_sha: str = MODEL_SHA,
                  fleet_group: str | None = None, server: Path | None = MEASURED_SERVER) -> dict[str, Any]:
    result: dict[str, Any] = {
        "format": FORMAT_VERSION, "study": "fleet-smol-tg", "verdict": verdict, "kind": kind,
        "summary": f"{verdict} summary", "written": "2026-11-22T10:00:00+00:00",
        "objective": "tg" if kind == "benchmark" else "live-throughput",
        "improvement": {"ratio": 1.12, "ci_low": 1.05, "ci_high": 1.2, "p_value": 0.001, "significant": significant},
        "settings": {"source": "trial-7", "config": config.to_dict(), "server_args": config.server_args(),
                     "role_vars": config.role_vars(kind)},
        "unit": "tg tok/s" if kind == "benchmark" else "generated tok/s",
        "baseline": {"config": RunConfig(threads=2, threads_batch=2).to_dict(),
                     "tg_tps": {"median": 10.0, "ci_low": 9.8, "ci_high": 10.2, "n": 8}},
        "chosen": {"label": "trial-7", "tg_tps": {"median": 11.2, "ci_low": 11.0, "ci_high": 11.4, "n": 8}},
        "candidates": [], "verification": {"rounds": 8, "alpha": 0.05, "baseline_round_values": []},
        "model": {"path": "/srv/models/m.gguf", "sha256": model_sha, "name": "m"},
        "host": {"fingerprint": HOST_FINGERPRINT, "hostname": "node-a"},
        "workload": {}, "search": {"wall_seconds": 600.0, "measuring_fraction": 0.9},
        # a benchmark's trials ran the build; a live run read it from the deployment, or could not (None)
        "llama_cpp": {"llama_cpp_python": "0.3.36", "llama_server": None if server is None else {
            "path": str(server), "sha256": sha256_of(server), "version": "version: stand-in", "system_info": ""}},
    }
    if fleet_group:
        result["fleet"] = {"group": fleet_group, "hosts": ["node-a", "node-b"]}
    return result


def proven_tune_result(config: RunConfig = WINNER, **options: Any) -> TuneResult:
    """:func:`proven_result` as the tuner holds a result of its own run."""
    return TuneResult.from_dict(proven_result(config, **options), origin="the test's result")


def write_result_file(path: Path, result: dict[str, Any]) -> Path:
    """``result`` as its file, exactly as given (a write-back test's hostile result is not made valid first)."""
    write_result_data(path, result)
    return path

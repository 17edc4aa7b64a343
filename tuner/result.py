"""The result file: what was proven, in llama.cpp's terms, for people and for the playbook.

One YAML document per study, written atomically with the previous version kept as ``.prev``. It holds
the configuration to run (the proven winner, or the baseline when no candidate was significantly
better), its pp/tg throughput with confidence intervals next to the baseline's, the improvement with its
interval, the fraction of the bandwidth roofline reached, and everything needed to know whether the
numbers still apply: host fingerprint, llama.cpp build, model sha256, workload.
"""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from tuner import __version__
from tuner.atomic import write_atomic
from tuner.config import RUN_KINDS, RunKind
from tuner.errors import UserError
from tuner.model.gguf_file import ModelInfo
from tuner.probe.host import HostProbe
from tuner.server.identity import ServerBinary
from tuner.server.source import pinned_version
from tuner.stats import MAX_ROUNDS_TO_SETTLE
from tuner.verify import Arm, Verification
from tuner.yamlfile import as_ansible_reads_it, read_user_text

FORMAT_VERSION = 1
# How each measured metric is shown to people, in display order; live runs measure the latter ones.
METRIC_LABELS = {
    "pp_tps": "pp tok/s",
    "tg_tps": "tg tok/s",
    "throughput_tps": "aggregate generated tok/s",
    "prompt_tps": "aggregate prompt tok/s",
    "server_tg_tps": "tg tok/s per request (server)",
    "server_pp_tps": "pp tok/s per request (server)",
    "latency_p50_s": "p50 latency (s)",
    "latency_p95_s": "p95 latency (s)",
    "ttft_p50_s": "p50 time to first token (s)",
    "ttft_p95_s": "p95 time to first token (s)",
}


def metric_names(result: dict[str, Any]) -> list[str]:
    """The metrics a result carries for its baseline, in display order."""
    present = {k for k, v in result["baseline"].items() if isinstance(v, dict) and "median" in v}
    return [name for name in METRIC_LABELS if name in present] + sorted(present - set(METRIC_LABELS))
IMPROVED = "improved"
BASELINE_STANDS = "baseline-stands"
INCONCLUSIVE = "inconclusive"  # no winner, but a candidate leads by a trend that more rounds could settle


def _yaml() -> YAML:
    yaml = YAML(typ="rt")  # round-trip mode keeps the order the fields were written in
    yaml.default_flow_style = False
    yaml.width = 120
    return yaml


def _plain(value: Any) -> Any:
    """YAML-safe copy: tuples become lists, floats are rounded for people (raw samples keep 4 digits), and a
    string a YAML 1.1 reader would take for something else is quoted (``flash_attn: 'on'``, not ``True`` when
    Ansible or PyYAML reads the role variables)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return round(value, 4)
    return as_ansible_reads_it(value)


def dump_yaml(data: dict[str, Any]) -> str:
    buffer = io.StringIO()
    _yaml().dump(_plain(data), buffer)
    return buffer.getvalue()


def write_result(path: Path, data: dict[str, Any]) -> None:
    header = ("# llamahost tuning result. Apply `settings.role_vars` through the llama_server role, or pass\n"
              "# `settings.server_args` to llama-server. Written atomically; the previous file is kept as .prev.\n")
    write_atomic(path, header + dump_yaml(data))


def load_result(path: Path) -> dict[str, Any]:
    text = read_user_text(path, what="result file", fix_missing="run `llamahost tune` first")
    return parse_result(text, origin=str(path))


def parse_result(text: str, *, origin: str) -> dict[str, Any]:
    """A result from its YAML file or its JSON (``--json`` output; JSON is YAML) - ``origin`` names it in errors."""
    try:
        data = _yaml().load(text)
    except Exception as exc:
        raise UserError(f"{origin} is not a readable result ({str(exc).splitlines()[0] if str(exc) else exc})",
                        "restore it from its .prev copy or run `llamahost tune` again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
        raise UserError(f"{origin} is not a llamahost result (format {FORMAT_VERSION})",
                        "pass a file written by `llamahost tune` or `llamahost fleet finish`, or their --json output")
    return data


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def version_block(server: ServerBinary | None) -> dict[str, Any]:
    """What measured: llamahost, the pinned llama.cpp source (a llama-cpp-python release), and the llama-server
    build the trials ran, by sha256 with the CPU features it runs with (None where the run could not read
    the deployment's binary: a live run over SSH)."""
    return {"llamahost": __version__, "llama_cpp_python": pinned_version(),
            "system_info": server.system_info if server is not None else "",
            "llama_server": server.to_dict() if server is not None else None}


def host_block(probe: HostProbe) -> dict[str, Any]:
    return {"fingerprint": probe.fingerprint(), "hostname": probe.hostname, **probe.fingerprint_fields()}


def model_block(model: ModelInfo, sha256: str) -> dict[str, Any]:
    block = {"path": str(model.path), "sha256": sha256, "name": model.name, "quantization": model.file_type,
             "size_bytes": model.size_bytes, "bytes_per_token": model.bytes_per_token}
    if model.synthetic:  # `llamahost model synth`: tuned for the real model's shape; its outputs are noise
        block["synthetic"] = True
    return block


def metric_blocks(arm: Arm) -> dict[str, Any]:
    """Every metric an arm measured, as median and 95% interval."""
    out: dict[str, Any] = {}
    for name in sorted(arm.samples):
        summary = arm.metric(name)
        if summary is not None:
            out[name] = {"median": summary.median, "ci_low": summary.ci_low, "ci_high": summary.ci_high,
                         "n": summary.n}
    return out


def trend_of(verification: Verification) -> Arm | None:
    """The candidate with the largest unproven lead that more rounds could settle, when nothing was proven."""
    if verification.winner is not None:
        return None
    trending = [a for a in verification.candidates if a.comparison is not None and a.comparison.trending]
    return max(trending, key=lambda a: a.comparison.ratio if a.comparison else 0.0, default=None)


def verdict_of(verification: Verification) -> str:
    if verification.winner is not None:
        return IMPROVED
    return INCONCLUSIVE if trend_of(verification) is not None else BASELINE_STANDS


def summary_line(verification: Verification, baseline_name: str) -> str:
    winner = verification.winner
    if not verification.candidates:
        return "baseline stands: the budget left no time to measure any candidate"
    trend = trend_of(verification)
    if trend is not None and trend.comparison is not None:
        c = trend.comparison
        settle = (f"about {c.rounds_to_settle} rounds would settle it" if c.rounds_to_settle
                  else f"more than {MAX_ROUNDS_TO_SETTLE} rounds would be needed")
        return (f"inconclusive: {trend.label} looks {100 * (c.ratio - 1):+.1f}% faster than {baseline_name}, "
                f"p={c.p_value:.2g} is not below {c.level:.3g} after {verification.rounds} interleaved rounds; "
                f"{settle}: run again with a longer --budget (the study resumes, nothing was written)")
    if winner is None or winner.comparison is None:
        return (f"baseline stands: no candidate was significantly better than {baseline_name} "
                f"({verification.rounds} interleaved rounds)")
    c = winner.comparison
    return (f"{winner.label} is {100 * (c.ratio - 1):+.1f}% better than the baseline "
            f"({100 * (1 - c.level):.3g}% CI {100 * (c.ci_low - 1):+.1f}% .. {100 * (c.ci_high - 1):+.1f}%, "
            f"p={c.p_value:.3g} < {c.level:.3g}, {verification.rounds} interleaved rounds)")


def run_kind(result: dict[str, Any]) -> RunKind:
    """What measured a result: ``live`` (a serving llama-server under its workload) or ``benchmark``.

    Results written before the field existed are told by their objective (live objectives are ``live-*``)."""
    kind = result.get("kind")
    if kind is None:
        return "live" if str(result.get("objective", "")).startswith("live-") else "benchmark"
    if kind not in RUN_KINDS:
        raise UserError(f"the result's kind {kind!r} is not one of {', '.join(RUN_KINDS)}",
                        "pass a result written by this llamahost")
    return "live" if kind == "live" else "benchmark"


def assemble_result(*, kind: RunKind, study: str, study_trials: int, objective: str, unit: str,
                    verification: Verification,
                    host: dict[str, Any], model: dict[str, Any], workload: dict[str, Any],
                    server: ServerBinary | None,
                    search: dict[str, Any], wall_seconds: float, measuring_seconds: float,
                    roofline: dict[str, Any] | None, baseline_name: str) -> dict[str, Any]:
    """The result layout shared by benchmark and live tuning (see the module docstring)."""
    winner = verification.winner
    chosen = winner or verification.baseline
    config = chosen.config
    result: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "study": study,
        "written": now_iso(),
        "verdict": verdict_of(verification),
        "kind": kind,
        "objective": objective,
        "unit": unit,
        "summary": summary_line(verification, baseline_name),
        "settings": {
            "source": chosen.label,
            "config": config.to_dict(),
            "server_args": config.server_args(),
            "role_vars": config.role_vars(kind),
        },
        "baseline": {"config": verification.baseline.config.to_dict(), **metric_blocks(verification.baseline),
                     "load_seconds": verification.baseline.load_median_s},
        "chosen": {"label": chosen.label, **metric_blocks(chosen), "load_seconds": chosen.load_median_s},
        "improvement": winner.comparison.to_dict() if winner and winner.comparison else None,
        "candidates": [a.to_dict() for a in verification.candidates],
        "verification": {"rounds": verification.rounds, "alpha": verification.alpha,
                         "comparisons": verification.comparisons, "level": verification.level,
                         "min_effect": verification.min_effect,
                         "baseline_round_values": verification.baseline.round_values},
        "host": host,
        "model": model,
        "llama_cpp": version_block(server),
        "workload": workload,
        "search": {**search, "study_trials": study_trials, "wall_seconds": wall_seconds,
                   "measuring_seconds": measuring_seconds,
                   "measuring_fraction": measuring_seconds / wall_seconds if wall_seconds > 0 else 0.0},
    }
    if roofline is not None:
        result["roofline"] = roofline
    return result

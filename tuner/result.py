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
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from tuner import __version__
from tuner.atomic import write_atomic
from tuner.config import RUN_KINDS, RunConfig, RunKind
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


def metric_names(result: TuneResult) -> list[str]:
    """The metrics a result carries for its baseline, in display order."""
    present = {k for k, v in result.baseline.items() if isinstance(v, dict) and "median" in v}
    return [name for name in METRIC_LABELS if name in present] + sorted(present - set(METRIC_LABELS))


IMPROVED = "improved"
BASELINE_STANDS = "baseline-stands"
INCONCLUSIVE = "inconclusive"  # no winner, but a candidate leads by a trend that more rounds could settle
VERDICTS = (IMPROVED, BASELINE_STANDS, INCONCLUSIVE)


REGENERATE = "restore it from its .prev copy, or run `llamahost tune` again to write it anew"


@dataclass
class ResultSettings:
    """What to run: the chosen configuration as the tuner's config, llama-server's flags and the role's variables."""

    source: str  # the arm it came from: a trial's label, or "baseline"
    config: dict[str, Any]
    server_args: list[str]
    role_vars: dict[str, Any]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, origin: str) -> ResultSettings:
        shapes = {"source": str, "config": dict, "server_args": list, "role_vars": dict}
        return cls(**_shaped(data, shapes, origin=f"{origin}: settings"))


# Each block of a result and the type its value has in the file (the order is the file's).
_SHAPES: dict[str, type | tuple[type, ...]] = {
    "study": str, "written": str, "verdict": str, "kind": str, "objective": str, "unit": str, "summary": str,
    "settings": dict, "baseline": dict, "chosen": dict, "improvement": dict, "candidates": list,
    "verification": dict, "host": dict, "model": dict, "llama_cpp": dict, "workload": dict, "search": dict,
    "roofline": dict, "server": str, "heartbeat": dict, "downtime": dict, "fleet": dict, "write_back": dict,
}


_SHAPE_NAMES: dict[type, str] = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
                                 int: "a number", float: "a number"}


def _shaped(data: Mapping[str, Any], shapes: Mapping[str, type | tuple[type, ...]], *, origin: str,
            optional: frozenset[str] = frozenset()) -> dict[str, Any]:
    """``data``'s values for ``shapes``, each checked for its type; a missing or ill-typed one is a UserError
    that names it (``optional`` ones may be missing or null)."""
    values: dict[str, Any] = {}
    for name, shape in shapes.items():
        value = data.get(name)
        if value is None:
            if name in optional:
                continue
            raise UserError(f"{origin} has no {name}", REGENERATE)
        if not isinstance(value, shape):
            shapes_allowed = shape if isinstance(shape, tuple) else (shape,)
            wanted = " or ".join(_SHAPE_NAMES.get(t, t.__name__) for t in shapes_allowed)
            got = next((n for t, n in _SHAPE_NAMES.items() if isinstance(value, t)), type(value).__name__)
            raise UserError(f"{origin}: {name} is {got}, not {wanted}", REGENERATE)
        values[name] = value
    return values


@dataclass
class TuneResult:
    """A tuning run's result as the code reads it: typed blocks, where a dict read by string keys once went.

    The file (:meth:`to_dict`, YAML or ``--json``) is the contract with people and the playbook; this is the
    contract inside the tuner. Blocks whose inside is a table of metrics (baseline, chosen, candidates) stay
    plain data: each entry is read the same way, by :func:`metric_names` and the report. A file read back is
    checked block by block (:meth:`from_dict`), so a damaged or foreign file is refused with the block's name
    rather than failing later. Blocks this version does not know are kept as they were (``extra``)."""

    study: str
    written: str
    verdict: str  # IMPROVED, BASELINE_STANDS or INCONCLUSIVE
    kind: RunKind
    objective: str
    unit: str
    summary: str  # one line for people
    settings: ResultSettings
    baseline: dict[str, Any]  # its config, a {median, ci_low, ci_high, n} block per metric, load_seconds
    chosen: dict[str, Any]  # its label and the same blocks
    improvement: dict[str, Any] | None  # the winner's comparison with the baseline; None: nothing proven
    candidates: list[dict[str, Any]]  # every arm of the proof
    verification: dict[str, Any]
    host: dict[str, Any]
    model: dict[str, Any]
    llama_cpp: dict[str, Any]
    workload: dict[str, Any]
    search: dict[str, Any]
    roofline: dict[str, Any] | None = None  # a benchmark run that could measure bandwidth
    server: str | None = None  # a live run: the server it tuned
    heartbeat: dict[str, Any] | None = None  # a live run: the dead-man switch's record
    downtime: dict[str, Any] | None = None  # a live run: its restarts
    fleet: dict[str, Any] | None = None  # `fleet finish`: the group and its hosts
    write_back: dict[str, Any] | None = None  # how far the write-back got (tuner.safe_change)
    extra: dict[str, Any] = field(default_factory=dict)  # blocks of a newer llamahost, kept as they were

    @property
    def improved(self) -> bool:
        return self.verdict == IMPROVED

    def block(self, arm: str) -> dict[str, Any]:
        """The measured block of ``arm`` ("baseline" or "chosen")."""
        return self.baseline if arm == "baseline" else self.chosen

    def chosen_config(self, origin: str = "the chosen configuration") -> RunConfig:
        """The configuration to run (the winner, or the baseline that stands), rebuilt and validated."""
        return RunConfig.from_dict(self.settings.config, origin=origin)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT_VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra":
                out.update(value)
            elif f.name == "settings":
                out["settings"] = {"source": value.source, "config": value.config, "server_args": value.server_args,
                                   "role_vars": value.role_vars}
            elif value is not None or f.name == "improvement":
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, origin: str) -> TuneResult:
        # Optional: what only some runs write, and what results written before the field existed lack (their
        # kind is told by the objective, their unit is the objective's name).
        optional = frozenset(f.name for f in fields(cls) if f.default is not MISSING) | {"improvement", "kind", "unit"}
        values = _shaped(data, _SHAPES, origin=origin, optional=optional)
        values["settings"] = ResultSettings.from_dict(values["settings"], origin=origin)
        values.setdefault("improvement", None)
        values.setdefault("unit", values["objective"])
        try:
            values["kind"] = run_kind(data)
        except UserError as foreign:
            raise UserError(f"{origin}: {foreign.problem}", REGENERATE) from None
        if values["verdict"] not in VERDICTS:
            raise UserError(f"{origin}: verdict {values['verdict']!r} is not one of {', '.join(VERDICTS)}", REGENERATE)
        extra = {k: v for k, v in data.items() if k not in _SHAPES and k != "format"}
        return cls(**values, extra=extra)


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


def write_result(path: Path, result: TuneResult) -> None:
    write_result_data(path, result.to_dict())


def write_result_data(path: Path, data: Mapping[str, Any]) -> None:
    """A result's file from its plain data (:meth:`TuneResult.to_dict`), atomically, the previous kept."""
    header = ("# llamahost tuning result. Apply `settings.role_vars` through the llama_server role, or pass\n"
              "# `settings.server_args` to llama-server. Written atomically; the previous file is kept as .prev.\n")
    write_atomic(path, header + dump_yaml(dict(data)))


def load_result(path: Path) -> TuneResult:
    return TuneResult.from_dict(load_result_data(path), origin=str(path))


def load_result_data(path: Path) -> dict[str, Any]:
    """A result file as plain data, its format checked and nothing else: for the write-back, which checks every
    value it takes itself (:func:`tuner.safe_change.proven_change`)."""
    text = read_user_text(path, what="result file", fix_missing="run `llamahost tune` first")
    return parse_result_data(text, origin=str(path))


def parse_result_data(text: str, *, origin: str) -> dict[str, Any]:
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


def run_kind(result: Mapping[str, Any]) -> RunKind:
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
                    roofline: dict[str, Any] | None, baseline_name: str) -> TuneResult:
    """The result layout shared by benchmark and live tuning (see the module docstring)."""
    winner = verification.winner
    chosen = winner or verification.baseline
    config = chosen.config
    return TuneResult(
        study=study,
        written=now_iso(),
        verdict=verdict_of(verification),
        kind=kind,
        objective=objective,
        unit=unit,
        summary=summary_line(verification, baseline_name),
        settings=ResultSettings(source=chosen.label, config=config.to_dict(), server_args=config.server_args(),
                                role_vars=config.role_vars(kind)),
        baseline={"config": verification.baseline.config.to_dict(), **metric_blocks(verification.baseline),
                  "load_seconds": verification.baseline.load_median_s},
        chosen={"label": chosen.label, **metric_blocks(chosen), "load_seconds": chosen.load_median_s},
        improvement=winner.comparison.to_dict() if winner and winner.comparison else None,
        candidates=[a.to_dict() for a in verification.candidates],
        verification={"rounds": verification.rounds, "alpha": verification.alpha,
                      "comparisons": verification.comparisons, "level": verification.level,
                      "min_effect": verification.min_effect,
                      "baseline_round_values": verification.baseline.round_values},
        host=host,
        model=model,
        llama_cpp=version_block(server),
        workload=workload,
        search={**search, "study_trials": study_trials, "wall_seconds": wall_seconds,
                "measuring_seconds": measuring_seconds,
                "measuring_fraction": measuring_seconds / wall_seconds if wall_seconds > 0 else 0.0},
        roofline=roofline,
    )

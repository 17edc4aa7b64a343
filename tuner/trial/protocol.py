"""What the trial manager sends to a worker, and what the worker streams back.

The manager writes one JSON :class:`TrialSpec` to the worker's stdin; the worker writes JSON lines to a
dedicated pipe (not stdout: llama.cpp and ggml print there and to stderr at will). Each line is one
event:

``{"event": "ready", ...}``        model loaded, placement applied (what was actually applied is reported)
``{"event": "warmup", ...}``       one warm-up result
``{"event": "sample", ...}``       one measured repetition: pp and/or tg tokens per second
``{"event": "done", ...}``         sampling ended, with the reason and time accounting
``{"event": "error", ...}``        a failure the worker could describe before exiting non-zero

Streaming lets the manager report intermediate values to Optuna's pruner and kill a clearly bad trial
after its first repetitions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from tuner.stats import StopRule

Objective = Literal["tg", "pp", "both"]
OBJECTIVES: tuple[str, ...] = ("tg", "pp", "both")


@dataclass(frozen=True)
class Workload:
    """Fixed token sequences, so every trial does exactly the same work.

    pp: a prompt of ``pp_tokens`` tokens decoded from an empty context.
    tg: ``tg_tokens`` tokens generated one at a time after that prompt (context depth ``pp_tokens``),
    which is where a served model generates.
    """

    pp_tokens: int = 512
    tg_tokens: int = 128
    seed: int = 1234

    def n_ctx(self) -> int:
        needed = self.pp_tokens + self.tg_tokens + 16
        return ((needed + 255) // 256) * 256

    def validate(self) -> Workload:
        if self.pp_tokens < 1 or self.tg_tokens < 1:
            raise ValueError("pp_tokens and tg_tokens must be >= 1")
        return self


@dataclass(frozen=True)
class Warmup:
    """Warm up until the last ``window`` runs agree within ``tolerance``, at most ``max_runs`` runs or
    ``max_seconds`` (a host too noisy to settle is measured anyway, and the result says so)."""

    max_runs: int = 8
    window: int = 3
    tolerance: float = 0.05
    max_seconds: float = 30.0


@dataclass(frozen=True)
class TrialSpec:
    model_path: str
    config: dict[str, Any]
    objective: Objective
    server_binary: str  # the llama-server build the role deploys: the one every trial measures
    workload: Workload = field(default_factory=Workload)
    warmup: Warmup = field(default_factory=Warmup)
    stop: StopRule = field(default_factory=StopRule)
    max_measure_seconds: float = 60.0
    # The model's pages were dropped before this trial (its placement differs from the last one's), so each page
    # sits where this trial's policy put it: a bind policy then leaves none outside its nodes.
    pages_placed: bool = False

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> TrialSpec:
        return cls(
            model_path=data["model_path"],
            config=dict(data["config"]),
            objective=data["objective"],
            server_binary=str(data["server_binary"]),
            workload=Workload(**data["workload"]),
            warmup=Warmup(**data["warmup"]),
            stop=StopRule(**data["stop"]),
            max_measure_seconds=float(data["max_measure_seconds"]),
            pages_placed=bool(data.get("pages_placed", False)),
        )


def measures_pp(objective: str) -> bool:
    return objective in ("pp", "both")


def measures_tg(objective: str) -> bool:
    return objective in ("tg", "both")

"""Where a group's search stands, computed from its trials alone (no I/O here: the command reads them).

Hosts and workers come from the ``worker`` record every fleet worker stamps on its trials
(:mod:`tuner.fleet.worker`). A WAITING trial is not attributed to anyone: a re-queued trial carries the
dead worker's record until another worker picks it up and stamps its own.

A worker is *running* while it has a RUNNING trial; *lost* when its last trial was failed by the
heartbeat check (a stale trial has no ``failure`` reason: its worker never got to write one); *stopped*
when its last trial was interrupted; *finished* when it ran its trial limit or its deadline passed;
otherwise *between trials*. The ETA is the longest remaining time of the running and between-trials
workers: each runs until its deadline or until its remaining trials (at the group's mean trial
duration) are done, whichever comes first.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from tuner.fleet.worker import WORKER_ATTR
from tuner.study import best_of, is_baseline

RUNNING = "running"
BETWEEN = "between trials"
LOST = "lost"
STOPPED = "stopped"
FINISHED = "finished"
ACTIVE_STATES = (RUNNING, BETWEEN)
GROUP_FIELDS_SHOWN = ("cpu_model", "sockets", "numa_nodes", "physical_cores", "logical_cpus",
                      "smt_threads_per_core", "memory_gib", "llama_server_sha256")


def state_name(trial: FrozenTrial) -> str:
    return trial.state.name.lower()


def _ci(trial: FrozenTrial) -> dict[str, Any]:
    summary = trial.user_attrs.get("summary") or {}
    return {"value": trial.value, "ci_low": summary.get("ci_low"), "ci_high": summary.get("ci_high"),
            "n": summary.get("n")}


def _worker_of(trial: FrozenTrial) -> dict[str, Any] | None:
    record = trial.user_attrs.get(WORKER_ATTR)
    if trial.state == TrialState.WAITING or not isinstance(record, dict):
        return None
    return record


def trial_seconds(trial: FrozenTrial) -> float | None:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return None
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def counts(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    out = {name: 0 for name in ("running", "waiting", "complete", "pruned", "fail")}
    for trial in trials:
        out[state_name(trial)] = out.get(state_name(trial), 0) + 1
    out["failed"] = out.pop("fail")
    out["finished"] = out["complete"] + out["pruned"] + out["failed"]
    return out


@dataclass
class WorkerState:
    name: str
    hostname: str
    pid: int
    deadline: float | None
    trials_limit: int | None
    finished_trials: int
    running: bool
    state: str
    remaining_seconds: float | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _worker_state(record: dict[str, Any], mine: list[FrozenTrial], now: float, mean_s: float | None) -> WorkerState:
    running = any(t.state == TrialState.RUNNING for t in mine)
    finished = [t for t in mine if t.state.is_finished()]
    last = max(mine, key=lambda t: t.number)
    deadline = record.get("deadline")
    limit = record.get("trials_limit")
    if running:
        state = RUNNING
    elif last.state == TrialState.FAIL and "failure" not in last.user_attrs:
        state = LOST
    elif last.user_attrs.get("failure") == "interrupted":
        state = STOPPED
    elif (limit is not None and len(finished) >= limit) or (deadline is not None and deadline <= now):
        state = FINISHED
    else:
        state = BETWEEN
    remaining: float | None = None
    if state in ACTIVE_STATES:
        estimates = []
        if deadline is not None:
            estimates.append(max(0.0, deadline - now))
        if limit is not None and mean_s is not None:
            estimates.append(max(0, limit - len(finished)) * mean_s)
        remaining = min(estimates) if estimates else None
    else:
        remaining = 0.0
    return WorkerState(name=str(record.get("name")), hostname=str(record.get("hostname")), pid=int(record["pid"]),
                       deadline=deadline, trials_limit=limit, finished_trials=len(finished), running=running,
                       state=state, remaining_seconds=remaining)


def workers(trials: Sequence[FrozenTrial], now: float) -> list[WorkerState]:
    durations = [s for t in trials if t.state.is_finished() and (s := trial_seconds(t)) is not None]
    mean_s = sum(durations) / len(durations) if durations else None
    by_worker: dict[tuple[str, int], tuple[dict[str, Any], list[FrozenTrial]]] = {}
    for trial in trials:
        record = _worker_of(trial)
        if record is None:
            continue
        key = (str(record.get("name")), int(record["pid"]))
        entry = by_worker.setdefault(key, (record, []))
        entry[1].append(trial)
    return [_worker_state(record, mine, now, mean_s) for _key, (record, mine) in sorted(by_worker.items())]


def hosts(trials: Sequence[FrozenTrial]) -> list[dict[str, Any]]:
    """Per worker name (one per host): how many of the group's trials it ran, by state."""
    table: dict[str, dict[str, Any]] = {}
    for trial in trials:
        record = _worker_of(trial)
        if record is None:
            continue
        row = table.setdefault(str(record.get("name")), {"name": str(record.get("name")), "trials": 0,
                                                         "complete": 0, "pruned": 0, "failed": 0, "running": 0})
        row["trials"] += 1
        key = {"fail": "failed"}.get(state_name(trial), state_name(trial))
        if key in row:
            row[key] += 1
    return [table[name] for name in sorted(table)]


def baseline_status(trials: Sequence[FrozenTrial]) -> dict[str, Any] | None:
    mine = sorted((t for t in trials if is_baseline(t)), key=lambda t: t.number)
    if not mine:
        return None
    complete = [t for t in mine if t.state == TrialState.COMPLETE]
    chosen = complete[-1] if complete else mine[-1]
    out: dict[str, Any] = {"trial": chosen.number, "state": state_name(chosen), **_ci(chosen),
                           "pp_tps": chosen.user_attrs.get("pp_tps"), "tg_tps": chosen.user_attrs.get("tg_tps")}
    if chosen.state == TrialState.FAIL:
        out["failure"] = chosen.user_attrs.get("failure", "worker lost (no heartbeat)")
    return out


def best_status(trials: Sequence[FrozenTrial], baseline: dict[str, Any] | None) -> dict[str, Any] | None:
    top = best_of(trials, 1)
    if not top:
        return None
    best = top[0]
    out: dict[str, Any] = {"trial": best.number, **_ci(best), "pp_tps": best.user_attrs.get("pp_tps"),
                           "tg_tps": best.user_attrs.get("tg_tps"), "config": best.user_attrs.get("config"),
                           "host": (best.user_attrs.get(WORKER_ATTR) or {}).get("name")}
    base_value = baseline.get("value") if baseline and baseline.get("state") == "complete" else None
    out["vs_baseline"] = best.value / base_value if base_value and best.value is not None else None
    return out


def group_status(name: str, attrs: dict[str, Any], trials: Sequence[FrozenTrial], now: float) -> dict[str, Any]:
    """Everything `llamahost fleet status` shows for one group study, as plain data."""
    fields = attrs.get("host") or {}
    crew = workers(trials, now)
    active = [w for w in crew if w.state in ACTIVE_STATES]
    remaining = [w.remaining_seconds for w in active if w.remaining_seconds is not None]
    eta_s = max(remaining) if remaining else (0.0 if crew and not active else None)
    baseline = baseline_status(trials)
    return {
        "study": name,
        "group": attrs.get("host_fingerprint"),
        "hardware": {key: fields.get(key) for key in GROUP_FIELDS_SHOWN},
        "model": attrs.get("model_name"),
        "model_sha256": attrs.get("model_sha256"),
        "objective": attrs.get("objective"),
        "workload": attrs.get("workload"),
        "hosts": hosts(trials),
        "counts": counts(trials),
        "baseline": baseline,
        "best": best_status(trials, baseline),
        "workers": [w.to_dict() for w in crew],
        "eta_seconds": eta_s,
        "eta_at": (dt.datetime.fromtimestamp(now + eta_s, dt.UTC).replace(microsecond=0).isoformat()
                   if eta_s is not None else None),
    }

"""Optuna studies: where they are stored, what they are bound to, and how a run resumes one.

A study belongs to one hardware fingerprint, one model file (sha256), one objective and one workload:
trials measured under different conditions are not comparable, so reopening a study under different
conditions is refused with a clear message instead of mixing numbers. These facts are stored as study
user attributes when the study is created.

Storage is an Optuna ``RDBStorage`` with heartbeats: a controller killed with SIGKILL leaves its trial
RUNNING, and the next run (or another fleet worker) marks it FAIL after the grace period and re-queues
it once (``RetryHeartbeatStaleTrialCallback(max_retry=1)``). The embedded default is one SQLite file in
the user's data directory; PostgreSQL is the store for many hosts (see :mod:`tuner.store` for how
a store is opened and checked).
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from tuner.config import RunConfig
from tuner.errors import UserError
from tuner.paths import data_dir, default_storage_url
from tuner.proof_defaults import LOAD_SLACK_S
from tuner.resilient_storage import ResilientRDBStorage, causes
from tuner.store import (
    check_schema,
    creation_lock,
    driver_url,
    engine_kwargs,
    explain_open_error,
    redact,
    store_init_lock,
)

HEARTBEAT_INTERVAL_S = 10
GRACE_PERIOD_S = 30
ROLE_ATTR = "role"
BASELINE = "baseline"
# Study attributes that must match for a run to continue a study.
BINDING_ATTRS = ("host_fingerprint", "model_sha256", "objective", "workload", "llama_server_sha256")


HOST_STUDY = "host"  # one host tunes alone (`llamahost tune`)
FLEET_STUDY = "fleet"  # every host of a hardware group shares it (`llamahost fleet work`)


@dataclass(frozen=True)
class StudyBinding:
    """What a study's trials were measured on.

    ``host_fingerprint`` is the single host's hardware fingerprint, or for a fleet study the fingerprint of
    its hardware group (which also covers the llama.cpp build and the model). ``extra["host"]``, when
    given, holds the fields that fingerprint was computed from, so a refusal can name what differs."""

    host_fingerprint: str
    model_sha256: str
    objective: str
    workload: dict[str, Any]
    extra: dict[str, Any]
    kind: str = HOST_STUDY
    # The llama-server build the trials run (benchmark trials); "" where the study does not name one (a live
    # study measures the deployment's own server, whatever it runs).
    llama_server_sha256: str = ""

    def attrs(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "host_fingerprint": self.host_fingerprint,
            "model_sha256": self.model_sha256,
            "objective": self.objective,
            "workload": self.workload,
            "llama_server_sha256": self.llama_server_sha256,
            **self.extra,
        }


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna logs every trial (failures with a traceback) and warns that heartbeats and grouped TPE are
    experimental; llamahost reports trials itself and pins the Optuna version it was tested with."""
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(previous)


def fail_stale_trials(study: optuna.Study) -> None:
    """Mark trials whose controller stopped sending heartbeats (SIGKILL, power loss) as failed, and re-queue
    them once. Optuna does this only when a new trial starts; a run that goes straight to verification, or
    ends after it, must not leave a dead trial RUNNING in the study it reports on."""
    with quiet_optuna():
        optuna.storages.fail_stale_trials(study)


def open_storage(url: str | None) -> RDBStorage:
    """Open (and for the default, create) the study store, or raise a :class:`UserError`.

    The store's Optuna schema is checked read-only before Optuna touches it, and every way opening can
    fail becomes one message with its fix and without the password (see :mod:`tuner.store`)."""
    if url is None:
        data_dir().mkdir(parents=True, exist_ok=True)
        url = default_storage_url()
    elif url.startswith("sqlite:///"):
        parent = Path(url.removeprefix("sqlite:///")).expanduser().parent
        if not parent.is_dir():
            raise UserError(f"cannot open study storage {url}: directory {parent} does not exist",
                            "create the directory first, or omit --storage to use the default store")
    elif not url.startswith(("sqlite:", "postgresql", "mysql")):
        raise UserError(f"unsupported study storage URL {redact(url)!r}",
                        "use sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DB (or omit --storage)")
    for attempt in range(SCHEMA_RACE_ATTEMPTS):
        try:
            with store_init_lock(url), quiet_optuna():
                check_schema(url)
                return ResilientRDBStorage(
                    driver_url(url),
                    heartbeat_interval=HEARTBEAT_INTERVAL_S,
                    grace_period=GRACE_PERIOD_S,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
                    engine_kwargs=engine_kwargs(url),
                )
        except UserError:
            raise
        except Exception as exc:  # sqlalchemy raises a zoo of driver errors; explain_open_error sorts them
            if attempt + 1 < SCHEMA_RACE_ATTEMPTS and lost_schema_race(exc):
                time.sleep(0.2 * (attempt + 1))
                continue
            raise explain_open_error(url, exc) from None
    raise AssertionError("unreachable: the last attempt returns or raises")


# Another program (optuna-dashboard, a script, any RDBStorage) may create a new store's schema at the moment
# llamahost does; our own processes are serialised by store_init_lock, theirs are not. Both insert Optuna's
# schema version, and the slower one fails on the unique key although the store is now complete: open it again.
SCHEMA_RACE_ATTEMPTS = 3
SCHEMA_VERSION_TABLES = ("alembic_version", "version_info")


def lost_schema_race(error: BaseException) -> bool:
    """Whether ``error`` is the unique-key failure of inserting the schema version another creator inserted."""
    return any(isinstance(cause, sqlalchemy.exc.IntegrityError)
               and any(table in str(cause) for table in SCHEMA_VERSION_TABLES) for cause in causes(error))


def open_existing_storage(url: str | None) -> RDBStorage:
    """Open a store for reading; unlike :func:`open_storage` it never creates the default one."""
    if url is None:
        path = data_dir() / "studies.db"
        if not path.exists():
            raise UserError(f"no studies yet (no store at {path})", "run `llamahost tune` first")
    return open_storage(url)


# Optuna's constraint convention: one value per constraint, <= 0 when it is met.
Constraints = Callable[[FrozenTrial], Sequence[float]]


def make_sampler(seed: int | None = None, constraints: Constraints | None = None) -> optuna.samplers.BaseSampler:
    # multivariate + group: the space is conditional (NUMA mode decides whether placement exists).
    # constant_liar: fleet workers sampling at the same time do not all pick the same point.
    # constraints: a live objective like "max tok/s with p95 TTFT under 2 s" steers away from violations.
    with quiet_optuna():
        return optuna.samplers.TPESampler(multivariate=True, group=True, constant_liar=True, seed=seed,
                                          n_startup_trials=8, constraints_func=constraints)


def make_pruner() -> optuna.pruners.BasePruner:
    # Only clearly bad trials are abandoned: below the bottom quartile of earlier trials at the same
    # sample count, after at least three samples and five finished trials.
    return optuna.pruners.PercentilePruner(75.0, n_startup_trials=5, n_warmup_steps=2)


def open_study(
    name: str,
    storage: RDBStorage,
    binding: StudyBinding,
    *,
    baseline_params: dict[str, Any],
    baseline_config: RunConfig | None = None,
    seed: int | None = None,
    constraints: Constraints | None = None,
) -> tuple[optuna.Study, bool]:
    """Create the study (enqueuing the baseline as its first trial) or reopen it after checking that it
    was made for this host, model, objective and workload. Returns (study, created).

    Creating a study is three writes (study, binding, baseline); they happen under a lock named after the
    study, so fleet workers starting together see either no study or a complete one, and exactly one of
    them enqueues the baseline."""
    with creation_lock(storage, name), quiet_optuna():
        try:
            study = optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                        sampler=make_sampler(seed, constraints), pruner=make_pruner(),
                                        load_if_exists=False)
            created = True
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(seed, constraints),
                                      pruner=make_pruner())
            # A creator that died before its binding was whole (one write per attribute) left a study with no
            # trials: adopt it. Only one that maximizes, as ours do; any other is refused as not ours.
            created = (not study.get_trials(deepcopy=False) and study.directions == [StudyDirection.MAXIMIZE]
                       and not set(binding.attrs()) <= set(study.user_attrs))
        if created:
            for key, value in binding.attrs().items():
                study.set_user_attr(key, value)
            enqueue_baseline(study, baseline_params, baseline_config)
            return study, True
        check_binding(study, binding)
        if not any(is_baseline(t) for t in study.get_trials(deepcopy=False)):
            enqueue_baseline(study, baseline_params, baseline_config)  # creator died between binding and enqueuing
        return study, False


BINDING_WHAT = {
    "host_fingerprint": "a different host (hardware fingerprint)",
    "model_sha256": "a different model file (sha256)",
    "objective": "a different objective",
    "workload": "a different workload",
    "llama_server_sha256": "a different llama-server build (sha256)",
}


def check_binding(study: optuna.Study, binding: StudyBinding) -> None:
    """Refuse to continue a study measured under other conditions, naming what differs."""
    attrs = study.user_attrs
    if not attrs:
        raise UserError(f"study {study.study_name!r} was not made by llamahost",
                        "choose another --study name")
    theirs_kind = attrs.get("kind", HOST_STUDY)
    if theirs_kind != binding.kind:
        command = "llamahost fleet work" if theirs_kind == FLEET_STUDY else "llamahost tune"
        raise UserError(f"study {study.study_name!r} is a {theirs_kind} study, not a {binding.kind} study",
                        f"continue it with `{command}`, or choose another --study name")
    mine = binding.attrs()
    for key in BINDING_ATTRS:
        if attrs.get(key, "") == mine[key]:  # "": a study made before the key was recorded
            continue
        if key == "host_fingerprint" and binding.kind == FLEET_STUDY:
            raise UserError(
                f"this host does not belong to the hardware group of study {study.study_name!r} (group "
                f"{attrs.get(key)}, this host is {mine[key]}): {fingerprint_diff(attrs.get('host'), mine.get('host'))}",
                "omit --study to join the study of this host's own group, or make the host match its group "
                "again (a lost DIMM, SMT switched, another llama-cpp-python); results from different hardware "
                "are not comparable")
        detail = f" ({fingerprint_diff(attrs.get('host'), mine.get('host'))})" if key == "host_fingerprint" else ""
        raise UserError(
            f"study {study.study_name!r} was made for {BINDING_WHAT[key]}: {attrs.get(key)} here is {mine[key]}"
            f"{detail}",
            "pass a new --study name (results from different conditions are not comparable)",
        )


def fingerprint_diff(theirs: Any, mine: Any) -> str:
    """``field: X there, Y here`` for every fingerprint field that differs (or a note when unknown)."""
    if not isinstance(theirs, dict) or not isinstance(mine, dict):
        return "the study does not record the fields its fingerprint was made from"
    keys = sorted(set(theirs) | set(mine))
    parts = [f"{k} {theirs.get(k)!r} there, {mine.get(k)!r} here" for k in keys if theirs.get(k) != mine.get(k)]
    return "; ".join(parts) if parts else "same fields, different fingerprint version"


FIXED_CONFIG_ATTR = "fixed_config"


def enqueue_baseline(study: optuna.Study, params: dict[str, Any], config: RunConfig | None = None) -> None:
    """Queue the baseline as the next trial. A baseline that is a point of the search space is queued by its
    parameters (so the sampler learns from it); one that is not (a deployment's hand-written CPU list, say)
    is queued with no parameters and its configuration recorded, to be measured exactly as it is."""
    attrs: dict[str, Any] = {ROLE_ATTR: BASELINE}
    if not params and config is not None:
        attrs[FIXED_CONFIG_ATTR] = config.to_dict()
    with quiet_optuna():
        study.enqueue_trial(params, user_attrs=attrs, skip_if_exists=False)


def is_baseline(trial: FrozenTrial) -> bool:
    return trial.user_attrs.get(ROLE_ATTR) == BASELINE


def baseline_trial(study: optuna.Study) -> FrozenTrial | None:
    """The completed baseline trial, if any (the latest if it was retried)."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if is_baseline(t)]
    return done[-1] if done else None


def load_seconds_of(trial: FrozenTrial) -> float | None:
    """Seconds from the trial's server start to healthy, as its outcome recorded them."""
    load = (trial.user_attrs.get("outcome") or {}).get("load_seconds")
    return float(load) if isinstance(load, int | float) and load > 0 else None


def load_limit(baseline_load_s: float | None, factor: float) -> float | None:
    """The slowest start a candidate may have: ``factor`` times the baseline's, and never less than
    :data:`LOAD_SLACK_S` over it. None: no bound (``factor`` 0, or the baseline's load is unknown)."""
    if factor <= 0 or not baseline_load_s:
        return None
    return max(factor * baseline_load_s, baseline_load_s + LOAD_SLACK_S)


def load_within(study: optuna.Study, factor: float) -> Callable[[FrozenTrial], bool] | None:
    """Whether a trial's server came up within :func:`load_limit` of the study's baseline (None: no bound)."""
    base = baseline_trial(study)
    limit = load_limit(load_seconds_of(base) if base is not None else None, factor)
    if limit is None:
        return None

    def within(trial: FrozenTrial) -> bool:
        load = load_seconds_of(trial)
        return load is None or load <= limit

    return within


def both(first: Callable[[FrozenTrial], bool] | None,
         second: Callable[[FrozenTrial], bool] | None) -> Callable[[FrozenTrial], bool] | None:
    """Eligible under both rules (either may be None: no rule)."""
    if first is None or second is None:
        return first or second
    return lambda trial: first(trial) and second(trial)


def best_trials(study: optuna.Study, k: int, *,
                eligible: Callable[[FrozenTrial], bool] | None = None) -> list[FrozenTrial]:
    """The ``k`` best completed trials with distinct configurations, best first, baseline excluded;
    ``eligible`` drops trials that violated a constraint (e.g. a TTFT limit)."""
    return best_of(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), k, eligible=eligible)


def best_of(trials: Sequence[FrozenTrial], k: int, *,
            eligible: Callable[[FrozenTrial], bool] | None = None) -> list[FrozenTrial]:
    """:func:`best_trials` over a list of trials already read (the fleet status reads many studies)."""
    seen: set[str] = set()
    best: list[FrozenTrial] = []
    complete = [t for t in trials if t.state == TrialState.COMPLETE and (eligible is None or eligible(t))]
    for trial in sorted(complete, key=lambda t: t.value if t.value is not None else float("-inf"), reverse=True):
        key = str(trial.user_attrs.get("config_key", trial.params))
        if is_baseline(trial) or key in seen:
            continue
        seen.add(key)
        best.append(trial)
        if len(best) == k:
            break
    return best


REPEAT_ATTR = "repeat_of"  # a trial that took an earlier trial's measurement instead of measuring again
NEIGHBOUR_ATTR = "neighbour_of"  # a trial enqueued one step from a configuration the sampler proposed again
REPEAT_LIMIT = 8  # proposals in a row that may take an earlier measurement before one is measured again


class RepeatPolicy:
    """What the search does when the sampler proposes a configuration it has already measured.

    TPE proposes a configuration it has already measured in about one trial of five (replayed over the recorded
    grids, benchmarks/results/grid-*.replay.txt), and each repeat used to cost a full measurement. A repeat now
    takes the earlier trial's measurement, so the sampler learns the same value at no cost, and the next trial
    measures a configuration one step from it that nobody has proposed yet (:meth:`redirect`): a repeat says the
    sampler believes in that region, and its unmeasured neighbours are where the next gain most likely is. On the
    recorded 3B grid that took the median trials to within 2% of the optimum from 34 to 26 (of 160 points).

    Only ``limit`` proposals in a row are answered from earlier measurements; the next is measured again, so a
    search whose region is exhausted still measures, and a leader's value is not one draw forever. Pruned and
    failed configurations are always measured again: their verdict was noisy or the failure may have passed."""

    def __init__(self, limit: int = REPEAT_LIMIT) -> None:
        self.limit = limit
        self._streak = 0

    def earlier_measurement(self, study: optuna.Study, config_key: str) -> FrozenTrial | None:
        """The latest trial that measured ``config_key`` to completion, when this proposal may take its
        measurement; None when it must be measured."""
        earlier = None
        if self._streak < self.limit:
            measured = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                        if t.user_attrs.get("config_key") == config_key and REPEAT_ATTR not in t.user_attrs]
            earlier = measured[-1] if measured else None
        self._streak = self._streak + 1 if earlier is not None else 0
        return earlier

    @staticmethod
    def redirect(study: optuna.Study, repeated: FrozenTrial | optuna.Trial,
                 neighbours: Sequence[tuple[str, dict[str, Any]]]) -> str | None:
        """Enqueue one of ``neighbours`` (key, parameters: :meth:`tuner.space.SearchSpace.neighbours` of the
        repeated proposal) that no trial of the study has proposed, measured or been given yet, as the study's
        next trial; its key, or None when every neighbour has been tried. The pick is random but reproducible:
        seeded by the study and the repeated trial's number, so a seeded run repeats itself."""
        tried = {t.user_attrs.get("config_key") for t in study.get_trials(deepcopy=False)}
        fresh = [(key, params) for key, params in neighbours if key not in tried]
        if not fresh:
            return None
        key, params = random.Random(f"{study.study_name}:{repeated.number}").choice(fresh)
        study.enqueue_trial(params, user_attrs={"config_key": key, NEIGHBOUR_ATTR: repeated.number},
                            skip_if_exists=False)
        return key


def list_study_names(storage: RDBStorage) -> list[str]:
    return [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]


def load_existing_study(name: str, storage: RDBStorage) -> optuna.Study:
    with quiet_optuna():
        try:
            return optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            known = list_study_names(storage)
            hint = f"known studies: {', '.join(known)}" if known else "no studies exist yet: run `llamahost tune`"
            raise UserError(f"no study named {name!r} in this storage", hint) from None


logging.getLogger("sqlalchemy").setLevel(logging.WARNING)

"""What every fleet command checks before it touches a study, in the order a user wants to hear about it.

1. the store URL (given, PostgreSQL) - nothing else is read before that;
2. the model and this host (the same intake as ``llamahost tune``), then the group fingerprint;
3. the store itself (reachable, credentials, schema: see :mod:`tuner.store`);
4. the study: created or joined (``fleet work``), or found (``fleet finish``), and in both cases bound to
   this host's group - a host that does not match is refused with the fields that differ.

Nothing is written before step 4, so a refused command loses nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from optuna.storages import RDBStorage

from tuner.errors import UserError
from tuner.fleet import STORAGE_ENV
from tuner.fleet.group import GroupFingerprint, group_binding, group_fingerprint, group_study_name
from tuner.paths import results_dir
from tuner.store import backend, redact
from tuner.study import check_binding, list_study_names, load_existing_study, open_storage, open_study
from tuner.tune import Intake, TuneContext, TuneRequest, intake, measure_settings, workload_attrs


def fleet_storage_url(url: str | None) -> str:
    """The shared store's URL from ``--storage`` or ``$LLAMAHOST_STORAGE``; it must be PostgreSQL."""
    url = url or os.environ.get(STORAGE_ENV)
    if not url:
        raise UserError("fleet commands need the shared study store",
                        f"pass --storage postgresql://USER@HOST/DB or set {STORAGE_ENV} (see docs/fleet.md; keep the "
                        "password in ~/.pgpass or PGPASSWORD rather than on the command line)")
    if backend(url) != "postgresql":
        raise UserError(f"fleet studies live in PostgreSQL, and {redact(url)!r} is not a PostgreSQL URL",
                        "pass --storage postgresql://USER@HOST/DB (SQLite takes one writer at a time, so hosts "
                        "would wait on each other); to tune one host alone use `llamahost tune`")
    return url


@dataclass(frozen=True)
class HostInGroup:
    """This host's intake and the group it belongs to."""

    taken: Intake
    group: GroupFingerprint

    def study_name(self, request: TuneRequest) -> str:
        return request.study_name or group_study_name(self.taken.model.path.stem, request.objective,
                                                      request.workload, self.group)


def host_in_group(request: TuneRequest) -> HostInGroup:
    taken = intake(request)
    return HostInGroup(taken, group_fingerprint(taken.probe, taken.server, taken.model_sha256))


@dataclass(frozen=True)
class GroupSession:
    ctx: TuneContext
    group: GroupFingerprint
    storage: RDBStorage


def open_group(request: TuneRequest, *, create: bool) -> GroupSession:
    """All checks, then the group's study: joined or created when ``create``, else it must exist."""
    assert request.storage_url is not None, "fleet_storage_url() first"
    host = host_in_group(request)
    taken = host.taken
    name = host.study_name(request)
    storage = open_storage(request.storage_url)
    binding = group_binding(host.group, request.objective, workload_attrs(request.workload), taken.model.name)
    if create:
        study, created = open_study(name, storage, binding, baseline_params=taken.space.baseline_params())
    else:
        known = list_study_names(storage)
        if name not in known:
            raise UserError(f"no study named {name!r} in {redact(request.storage_url)}",
                            "start workers first (`llamahost fleet work`), with the same --model, --objective, "
                            "--pp-tokens and --tg-tokens; `llamahost fleet status` lists the groups' studies")
        study, created = load_existing_study(name, storage), False
        check_binding(study, binding)
    result_path = request.output or results_dir() / f"{name}.yaml"
    ctx = TuneContext(request, taken.model, taken.model_sha256, taken.probe, taken.space, study, created,
                      measure_settings(request, taken.server), result_path, taken.server)
    return GroupSession(ctx, host.group, storage)

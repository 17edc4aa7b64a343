"""Prove a group's winner on one host of the group and write the result file.

The search ran on many hosts; the proof runs on one, exactly as a single-host run ends: the group's best
few distinct configurations and the baseline, re-measured in interleaved rounds on this host, with the
same significance rule (:mod:`tuner.verify`). Trials from all hosts are comparable because every host of
the group is the same hardware with the same llama.cpp build (:mod:`tuner.fleet.group`), and this host
must be one of them (the study binding is checked first).

The result file is the single-host format plus a ``fleet`` block (group fingerprint and fields, hosts,
trial counts). The later write-back into ``group_vars/<group>.yml`` only reads it:
``settings.role_vars`` when ``verdict`` is ``improved`` (see :mod:`tuner.writeback`).
"""

from __future__ import annotations

import time
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from tuner.budget import plan_verification, verification_run_cost
from tuner.errors import UserError
from tuner.fleet.group import NOT_READ
from tuner.fleet.session import GroupSession
from tuner.fleet.status import counts, hosts
from tuner.output import console
from tuner.paths import trial_log_dir
from tuner.pipeline import ProofSettings, verify_candidates
from tuner.progress import TuneProgress
from tuner.search import Interrupted, Measurer, sigterm_as_interrupt
from tuner.study import baseline_trial, best_trials
from tuner.tune import TuneOutcome, build_result, with_bandwidth, write_outcome


def _reference_trial(session: GroupSession) -> FrozenTrial:
    """A completed trial to size the verification runs by: the baseline's, else the best one's."""
    study = session.ctx.study
    reference = baseline_trial(study) or next(iter(best_trials(study, 1)), None)
    if reference is None:
        raise UserError(f"no trial of study {study.study_name!r} has completed yet, so there is nothing to prove",
                        "let the workers run (`llamahost fleet status` shows their progress), then finish again")
    return reference


def fleet_block(session: GroupSession, trials: list[FrozenTrial]) -> dict[str, Any]:
    running = sum(1 for t in trials if t.state == TrialState.RUNNING)
    return {
        "group": session.group.digest,
        "group_fields": session.group.fields,
        "not_in_group_key": NOT_READ,
        "hosts": [row["name"] for row in hosts(trials)],
        "trials": counts(trials),
        "trials_running_at_finish": running,
        "verified_on": session.ctx.probe.hostname,
    }


def finish_group(session: GroupSession) -> TuneOutcome:
    """Verify the group's best candidates against the baseline on this host within the request's budget,
    then write the result file and report; raises :class:`Interrupted` on Ctrl-C/SIGTERM (nothing written)."""
    ctx = session.ctx
    req = ctx.request
    reference = _reference_trial(session)
    ctx.probe = with_bandwidth(ctx.probe)
    run_cost = verification_run_cost(reference.user_attrs["outcome"], req.verify_samples)
    proof = ProofSettings.of(req, ctx.settings.stop, samples=req.verify_samples)
    verify_k, _ = plan_verification(req.budget_seconds, run_cost, req.candidates, max_fraction=1.0,
                                    max_rounds=proof.max_rounds)
    started = time.monotonic()
    deadline = started + req.budget_seconds
    measurer = Measurer(ctx.model, ctx.settings, trial_log_dir(ctx.study.study_name),
                        multi_node=ctx.space.multi_node, model_sha256=ctx.model_sha256)
    title = f"proving the winner of {ctx.study.study_name} on {ctx.probe.hostname}"
    with sigterm_as_interrupt(), TuneProgress(req.budget_seconds, title=title) as progress:
        trials = ctx.study.get_trials(deepcopy=False)
        block = fleet_block(session, trials)
        if block["trials_running_at_finish"]:
            console(stderr=True).print(f"note: {block['trials_running_at_finish']} trial(s) still running; the "
                                       "proof uses the trials finished so far", style="yellow")
        try:
            verification = verify_candidates(ctx.study, ctx.space.baseline(), measurer, progress, deadline,
                                             run_cost, verify_k, proof)
        except KeyboardInterrupt:
            raise Interrupted from None
        tally = block["trials"]
        search = {"trials_run": tally["finished"], "complete": tally["complete"], "pruned": tally["pruned"],
                  "failed": tally["failed"], "interrupted": False}
        result = build_result(ctx, verification, search, time.monotonic() - started, measurer.measuring_seconds)
        result.fleet = block
        write_outcome(ctx, result, progress)
    return TuneOutcome(result, ctx.result_path, verification)

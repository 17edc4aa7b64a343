"""Roll a written winner out: canary first, measured before and after, reverted when it got worse, then the rest.

The winner is already in the vars file (:mod:`tuner.safe_change` wrote it, keeping the previous file as
``.prev``), and no host runs it yet. The rollout:

1. picks the canary: the first (sorted) host the vars file applies to, within ``--limit``;
2. measures it under the workload while it still runs the previous settings;
3. applies the new settings to it alone (the role: validated, health-checked, unit rolled back on failure);
4. measures it again and judges (:mod:`tuner.rollout.judge`): not significantly slower, no more failed
   requests, healthy;
5. passes: applies the settings to the other hosts, one at a time, the first failure stopping them;
   fails: puts the vars file back as it was (its ``.prev``), applies that to the canary, and stops before any
   other host is touched.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.atomic import previous_path, write_atomic
from tuner.errors import UserError
from tuner.inventory import resolve_inventory
from tuner.rollout.converge import converge
from tuner.rollout.judge import CanaryPolicy, CanaryVerdict, judge
from tuner.rollout.measure import CanaryWorkload, measure_host, pack


@dataclass(frozen=True)
class RolloutRequest:
    inventory: Path
    vars_file: Path  # where the winner was written; its .prev is the way back
    limit: tuple[str, ...] = ()  # only these hosts (of those the vars file applies to); empty = all of them
    workload: CanaryWorkload | None = None  # None: no canary, every host at once (one at a time)
    policy: CanaryPolicy = field(default_factory=CanaryPolicy)
    extra_args: tuple[str, ...] = ()  # more ansible-playbook/ansible options (e.g. --vault-password-file)
    dry_run: bool = False  # only say which host would be the canary and which would follow


@dataclass
class RolloutReport:
    hosts: list[str]
    canary: str | None = None
    verdict: CanaryVerdict | None = None
    applied: list[str] = field(default_factory=list)
    reverted: bool = False
    reason: str | None = None  # why the canary failed
    dry_run: bool = False

    @property
    def passed(self) -> bool:
        return not self.reverted

    def to_dict(self) -> dict[str, Any]:
        return {"hosts": self.hosts, "canary": self.canary, "applied": self.applied, "reverted": self.reverted,
                "reason": self.reason, "dry_run": self.dry_run,
                "verdict": self.verdict.to_dict() if self.verdict else None}


def rollout_hosts(targets: Sequence[str], limit: Sequence[str]) -> list[str]:
    """The hosts to roll out to, sorted (the canary first); ``limit`` names must be targets (pure)."""
    unknown = sorted(set(limit) - set(targets))
    if unknown:
        raise UserError(f"--limit names hosts the vars file does not apply to: {', '.join(unknown)}",
                        f"pick from: {', '.join(targets)}")
    chosen = sorted(set(limit) if limit else set(targets))
    if not chosen:
        raise UserError("no host to roll out to", "check the inventory and --limit")
    return chosen


def restore_previous(vars_file: Path) -> None:
    """Put the vars file back as it was before the write-back (its ``.prev``)."""
    write_atomic(vars_file, previous_path(vars_file).read_bytes(), keep_previous=False)


def rollout(request: RolloutRequest, say: Callable[[str], None]) -> RolloutReport:
    resolved = resolve_inventory(request.inventory)
    hosts = rollout_hosts(resolved.targets_of(request.vars_file), request.limit)
    report = RolloutReport(hosts=hosts, dry_run=request.dry_run)
    rest = hosts
    if request.workload is not None:
        if not previous_path(request.vars_file).exists():
            raise UserError(f"{request.vars_file} has no previous version ({previous_path(request.vars_file).name}) "
                            "to revert a failed canary to", "roll out after `llamahost write-back`, which keeps it, "
                            "or pass --no-canary")
        canary, rest = hosts[0], hosts[1:]
        report.canary = canary
        if request.dry_run:
            return report
        _canary(request, canary, resolved.hostvars[canary], report, say)
        if report.reverted:
            return report
    if rest and not request.dry_run:
        say(f"applying to {', '.join(rest)}, one at a time")
        converge(request.inventory, rest, extra_args=request.extra_args)
        report.applied += rest
    return report


def _canary(request: RolloutRequest, canary: str, hostvars: dict[str, Any], report: RolloutReport,
            say: Callable[[str], None]) -> None:
    assert request.workload is not None
    with tempfile.TemporaryDirectory(prefix="llamahost-canary-") as scratch:
        bundle = pack(request.workload, Path(scratch) / "canary.pyz")
        say(f"canary {canary}: measuring the current settings ({request.workload.windows} windows)")
        before, _ = measure_host(request.inventory, canary, hostvars, bundle, extra_args=request.extra_args)
        say(f"canary {canary}: applying the new settings")
        try:
            converge(request.inventory, [canary], extra_args=request.extra_args)
        except UserError as exc:
            restore_previous(request.vars_file)
            raise UserError(f"the canary {canary} did not take the new settings: {exc.problem}",
                            f"{request.vars_file} was put back as it was and no other host was touched; "
                            f"{exc.fix}") from None
        say(f"canary {canary}: measuring the new settings")
        try:
            after, _ = measure_host(request.inventory, canary, hostvars, bundle, extra_args=request.extra_args)
        except UserError as exc:  # unhealthy, or no answer: as failed as a slower server
            report.reason = exc.problem
        else:
            report.verdict = judge(before, after, request.policy)
            if report.verdict.passed:
                say(f"canary {canary}: x{report.verdict.ratio:.3f} of before, healthy: rolling on")
                report.applied.append(canary)
                return
            report.reason = "; ".join(report.verdict.reasons)
        say(f"canary {canary} failed ({report.reason}): reverting it")
        restore_previous(request.vars_file)
        converge(request.inventory, [canary], extra_args=request.extra_args)
        report.reverted = True

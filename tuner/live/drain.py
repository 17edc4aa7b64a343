"""Restarts of the serving unit as the load balancer in front of it sees them: drain and undrain hooks, a cap
on restarts per hour, and the downtime a live run caused (issue 14).

Every restart a live run causes (the deployed configuration at ``start``, each ``trial``, each return to the
``baseline``, the ``adopt`` of a proven winner) goes through one :class:`RestartGuard`, a
:class:`~tuner.live.control.ServerControl` around the real one (the ``--local`` supervisor or a systemd unit):

1. the cap: a trial whose restart would be the ``N+1``-th within the last hour waits (in view, with the time it
   may go on), and the wait counts against the budget; a wait that would outlast the deadline is not started
   (:class:`RestartRefused`, a failed trial, not a score). Returns to the baseline and the adopt never wait (a
   failed trial must not keep serving because of the cap) but count, so the next trial waits for them;
2. ``--drain`` (a shell command, ``sh -c``, or an http(s) URL that gets a POST), then the restart, then, once the
   server answers healthy, ``--undrain``. A restart that does not come up healthy leaves the host drained: the
   baseline that the tuner restores next comes up inside the same drain, and only then is the host undrained;
3. the downtime: from the drain (or the restart when there is no drain) until healthy, per outage.

A failed hook stops the run (:class:`HookFailed`, a :class:`~tuner.errors.UserError`): a failed drain before
anything was restarted (the undrain runs once, in case the drain half took effect); a failed undrain with the host
still drained, which the message says. The guard never restarts the server after a drain that failed.

:class:`RestartWindow` and :class:`Downtime` are pure (tested without processes); running a hook is
:mod:`tuner.live.hooks`.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rich.markup import escape

from tuner.config import RunConfig
from tuner.durations import format_duration
from tuner.errors import TrialFailed, UserError
from tuner.live.control import ServerControl
from tuner.live.hooks import Hook, HookRun, run_hook
from tuner.output import console

HOUR_S = 3600.0
DEFAULT_HOOK_TIMEOUT_S = 30.0
REASONS = ("start", "trial", "baseline", "adopt")  # LLAMAHOST_RESTART_REASON


@dataclass(frozen=True)
class RestartPolicy:
    """What the command line says about restarts (typed; see :func:`tuner.live.setup.restart_policy`)."""

    drain: Hook | None = None
    undrain: Hook | None = None
    hook_timeout_s: float = DEFAULT_HOOK_TIMEOUT_S
    max_per_hour: int | None = None  # None: no cap

    def __post_init__(self) -> None:
        if self.drain is not None and self.undrain is None:
            raise UserError("--drain without --undrain would leave the host drained after the first restart",
                            "pass --undrain too (the command or URL that puts the host back in service)")
        if self.hook_timeout_s <= 0:
            raise UserError("--hook-timeout must be positive", "pass e.g. --hook-timeout 30s")
        if self.max_per_hour is not None and self.max_per_hour < 1:
            raise UserError("--max-restarts-per-hour must be at least 1", "pass e.g. --max-restarts-per-hour 6, "
                                                                          "or leave it out for no cap")


# ---- pure: the rolling window and the downtime -------------------------------------------------------

class RestartWindow:
    """Restart times (a monotonic clock) of the last hour, and when the cap allows the next one."""

    def __init__(self, max_per_hour: int | None, span_s: float = HOUR_S) -> None:
        self.max_per_hour = max_per_hour
        self.span_s = span_s
        self._times: deque[float] = deque()

    def record(self, at: float) -> None:
        self._times.append(at)
        self._forget(at)

    def count(self, now: float) -> int:
        """Restarts within the last ``span_s`` before ``now``."""
        self._forget(now)
        return len(self._times)

    def next_allowed(self, now: float) -> float:
        """The earliest time from ``now`` at which one more restart keeps every hour at ``max_per_hour``."""
        if self.max_per_hour is None or self.count(now) < self.max_per_hour:
            return now
        return self._times[-self.max_per_hour] + self.span_s

    def _forget(self, now: float) -> None:
        while self._times and self._times[0] <= now - self.span_s:
            self._times.popleft()


@dataclass
class Downtime:
    """Restarts and outages: an outage runs from the drain (or the restart) until the server is healthy again,
    and may span several restarts (a trial that does not come up, then the baseline)."""

    restarts: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    outages: list[float] = field(default_factory=list)
    capped_waits_s: float = 0.0
    down_since: float | None = None

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def begin(self, at: float) -> None:
        if self.down_since is None:
            self.down_since = at

    def restart(self, reason: str, at: float) -> None:
        self.begin(at)
        self.restarts += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def healthy(self, at: float) -> None:
        if self.down_since is not None:
            self.outages.append(max(0.0, at - self.down_since))
            self.down_since = None

    def report(self) -> dict[str, Any]:
        return {"restarts": self.restarts, "outages": len(self.outages), "total_s": round(sum(self.outages), 3),
                "longest_s": round(max(self.outages, default=0.0), 3),
                "capped_waits_s": round(self.capped_waits_s, 3), "reasons": dict(self.reasons)}


def downtime_line(report: Mapping[str, Any]) -> str:
    """The result's ``downtime`` block in one line, for people."""
    line = (f"{report['restarts']} restart(s), {report['total_s']:.1f} s out of service in all (longest "
            f"{report['longest_s']:.1f} s)")
    if report.get("max_restarts_per_hour") is not None:
        line += f"; cap {report['max_restarts_per_hour']}/h, {format_duration(report['capped_waits_s'])} waited"
        if report.get("search_held_back"):
            line += ", the search ended early for it"
    if report.get("left_drained"):
        line += "; the host was LEFT DRAINED"
    return line


# ---- the guard -----------------------------------------------------------------------------------------

class HookFailed(UserError):
    """A drain or undrain hook failed: the run stops, and the message says where the host was left."""


class DrainFailed(HookFailed):
    """The drain failed: nothing was restarted."""


class UndrainFailed(HookFailed):
    """The undrain failed after a restart that did come up healthy: the change took effect, the host is drained."""


class RestartRefused(TrialFailed):
    """The restart cap allows this trial's restart only after the deadline: the trial is not run."""


HookRunner = Callable[[Hook, Mapping[str, str], float], HookRun]
_BASELINE = ("baseline", None)  # what the server runs after start, restore_baseline and adopt


class RestartGuard:
    """A :class:`~tuner.live.control.ServerControl` that drains, caps and accounts every restart of ``inner``.

    A call that asks for what the server already runs (the same trial configuration again, the baseline after
    the baseline) passes through without a drain and does not count: the server skips that restart itself
    (the supervisor's key, the unit's unchanged drop-in). Set ``deadline`` (monotonic) to keep cap waits inside
    the budget, and ``events`` to see waits and failures."""

    def __init__(self, inner: ServerControl, policy: RestartPolicy, *, runner: HookRunner = run_hook,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 wall: Callable[[], float] = time.time) -> None:
        self.inner = inner
        self.policy = policy
        self.runner = runner
        self.clock = clock
        self.sleep = sleep
        self.wall = wall
        self.window = RestartWindow(policy.max_per_hour)
        self.downtime = Downtime()
        self.deadline: float | None = None
        self.events: Callable[[str], None] = _to_stderr  # the run's progress display while it runs
        self.search_held_back = False
        self.drained = False  # the drain ran and the undrain has not yet succeeded
        self._state: tuple[str, RunConfig | None] | None = None  # what runs healthy now; None: unknown

    # -- the restarts --------------------------------------------------------------------------------

    def start(self, baseline: RunConfig) -> None:
        self._restart("start", _BASELINE, lambda: self.inner.start(baseline), capped=False)

    def apply(self, config: RunConfig) -> None:
        reason = "baseline" if config == self.inner.baseline else "trial"
        self._restart(reason, ("trial", config), lambda: self.inner.apply(config), capped=reason == "trial")

    def restore_baseline(self) -> None:
        self._restart("baseline", _BASELINE, self.inner.restore_baseline, capped=False)

    def adopt(self, config: RunConfig) -> None:
        self._restart("adopt", None, lambda: self.inner.adopt(config), capped=False)
        self._state = _BASELINE

    def restart_wait_s(self) -> float:
        """How long the cap holds the next trial's restart back from now (0: it may restart now)."""
        now = self.clock()
        return max(0.0, self.window.next_allowed(now) - now)

    def hold_back_search(self) -> str:
        """The search ended with time left because the cap holds the next restart back: the result says so."""
        self.search_held_back = True
        return (f"the restart cap ({self.policy.max_per_hour} per hour) allows no further trial before its part of "
                "the budget ends")

    def _restart(self, reason: str, state: tuple[str, RunConfig | None] | None, call: Callable[[], None], *,
                 capped: bool) -> None:
        if state is not None and state == self._state and not self.downtime.down:
            try:  # nothing to restart: the inner control sees that too and only checks health
                call()
            except BaseException:
                self._state = None
                raise
            return
        if capped:
            self._wait_for_slot()
        if not self.downtime.down:
            began = self.clock()
            if self.policy.drain is not None:
                self._drain(reason)
            self.downtime.begin(began)
        self._state = None
        now = self.clock()
        self.window.record(now)
        self.downtime.restart(reason, now)
        call()  # on any exception the host stays drained: the next restart (the baseline) comes up inside it
        self._state = state
        self.downtime.healthy(self.clock())
        if self.policy.undrain is not None:
            self._undrain(reason)
        self.drained = False

    def _wait_for_slot(self) -> None:
        now = self.clock()
        allowed = self.window.next_allowed(now)
        if allowed <= now:
            return
        cap = self.policy.max_per_hour
        if self.deadline is not None and allowed > self.deadline:
            raise RestartRefused(f"not run: the restart cap ({cap} per hour) allows the next restart at "
                                 f"{self._clock_time(allowed)}, after this part of the budget ends at "
                                 f"{self._clock_time(self.deadline)}")
        self.events(f"restart cap: {cap} restart(s) within the last hour; the next trial waits until "
                    f"{self._clock_time(allowed)} ({format_duration(allowed - now)})")
        self.sleep(allowed - now)
        self.downtime.capped_waits_s += self.clock() - now

    def _clock_time(self, monotonic: float) -> str:
        return time.strftime("%H:%M:%S", time.localtime(self.wall() + monotonic - self.clock()))

    # -- the hooks -----------------------------------------------------------------------------------

    def _env(self, hook: Hook, reason: str) -> dict[str, str]:
        env = {"LLAMAHOST_HOOK": hook.name, "LLAMAHOST_RESTART_REASON": reason,
               "LLAMAHOST_SERVICE": self.inner.describe()}
        with contextlib.suppress(RuntimeError):  # a systemd unit not connected yet
            env["LLAMAHOST_SERVER_URL"] = self.inner.base_url
        return env

    def _drain(self, reason: str) -> None:
        assert self.policy.drain is not None
        drain = self.policy.drain
        ran = self.runner(drain, self._env(drain, reason), self.policy.hook_timeout_s)
        if ran.ok:
            self.drained = True
            return
        after = "the undrain hook is not set"
        if self.policy.undrain is not None:  # nothing was restarted: put back whatever the drain half did
            undone = self.runner(self.policy.undrain, self._env(self.policy.undrain, reason),
                                 self.policy.hook_timeout_s)
            after = ("the undrain hook then ran (ok), so the host is in service" if undone.ok else
                     f"the undrain hook then failed too ({undone.detail}{_quoted(undone.output)}): the host may be "
                     "left drained")
        running = self._running()
        raise DrainFailed(
            f"the drain hook {drain} failed before the {reason} restart ({ran.detail}{_quoted(ran.output)}); the "
            f"run stops with the server not restarted: it still runs {running}; {after}",
            f"make the hook succeed when run by hand (sh -c, or a POST; LLAMAHOST_HOOK=drain, "
            f"LLAMAHOST_RESTART_REASON={reason}) within --hook-timeout ({self.policy.hook_timeout_s:g} s), then run "
            f"the same command again to resume the study"
            + ("; the dead-man switch puts the baseline back shortly after the tuner exits, without a drain"
               if running == "a trial configuration" else ""))

    def _running(self) -> str:
        if self._state is None:
            return "what it ran before"
        config = self._state[1]
        return "a trial configuration" if config is not None and config != self.inner.baseline else "its baseline"

    def _undrain(self, reason: str) -> None:
        assert self.policy.undrain is not None
        undrain = self.policy.undrain
        ran = self.runner(undrain, self._env(undrain, reason), self.policy.hook_timeout_s)
        if ran.ok:
            return
        self.events(f"undrain failed after the {reason} restart: the host is left drained")
        raise UndrainFailed(
            f"the undrain hook {undrain} failed after the {reason} restart ({ran.detail}{_quoted(ran.output)}); the "
            "run stops with the server healthy but the host LEFT DRAINED"
            + (" (no client sees the dead-man switch put the baseline back after the tuner exits)"
               if reason == "trial" else ""),
            f"put the host back in service yourself (run the undrain by hand), make the hook succeed within "
            f"--hook-timeout ({self.policy.hook_timeout_s:g} s), then run the same command again to resume")

    def left_drained(self) -> str | None:
        """Why the host is still drained (a restart that never came up healthy), or None."""
        if not (self.drained and self.downtime.down):
            return None
        return (f"the host is LEFT DRAINED: the server did not come back healthy after the last restart, so the "
                f"undrain hook {self.policy.undrain} was not run; run it yourself once the server is healthy "
                f"again (its log: {self.inner.server_log()})")

    def report(self) -> dict[str, Any]:
        return {**self.downtime.report(), "max_restarts_per_hour": self.policy.max_per_hour,
                "search_held_back": self.search_held_back,
                "hooks": [hook.name for hook in (self.policy.drain, self.policy.undrain) if hook is not None],
                **({"left_drained": True} if self.left_drained() else {})}

    def __enter__(self) -> RestartGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        """Never silent about a host left drained (the error that ended the run says why the server is down)."""
        notice = self.left_drained()
        if notice:
            self.events(notice)

    # -- the rest of the control passes through ------------------------------------------------------

    @property
    def base_url(self) -> str:
        return self.inner.base_url

    @property
    def api_key(self) -> str | None:
        return self.inner.api_key

    @property
    def baseline(self) -> RunConfig:
        return self.inner.baseline

    @property
    def last_applied(self) -> dict[str, Any]:
        return self.inner.last_applied

    @property
    def deadman_seconds(self) -> float:
        return self.inner.deadman_seconds

    def heartbeat(self) -> None:
        self.inner.heartbeat()

    def server_memory_bytes(self) -> int | None:
        return self.inner.server_memory_bytes()

    def describe(self) -> str:
        return self.inner.describe()

    def server_log(self) -> str:
        return self.inner.server_log()


def _to_stderr(message: str) -> None:
    console(stderr=True).print(escape(message), style="yellow")


def _quoted(output: str) -> str:
    return f": {output}" if output else ""

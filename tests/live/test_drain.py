"""Drain and undrain hooks, the restart cap and the downtime record of a live run (tuner.live.drain, .hooks).

The window, the accounting and the guard's order of events are tested with a fake control and a fake clock;
the hooks run for real (shell commands, a POST to an http.server on loopback); a short real run of
``llamahost tune --live --local`` under a restart cap reads the hooks' log back (the hooks around every restart
of an uncapped run are read back from tests/live/test_live_cli.py's shared run).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from tuner.cli import main
from tuner.config import RunConfig
from tuner.errors import TrialFailed, UserError
from tuner.live.control import TrialStartFailed
from tuner.live.drain import (
    HOUR_S,
    REASONS,
    DrainFailed,
    RestartGuard,
    RestartPolicy,
    RestartRefused,
    RestartWindow,
    UndrainFailed,
    downtime_line,
)
from tuner.live.hooks import Hook, HookRun, parse_hook, run_hook
from tuner.server.process import free_port

BASE = RunConfig(threads=1, threads_batch=1, parallel=1, ctx_size=1024)
TRIAL_A = RunConfig(threads=1, threads_batch=1, parallel=2, ctx_size=2048)
TRIAL_B = RunConfig(threads=2, threads_batch=2, parallel=1, ctx_size=1024)


# ---- the rolling window ----------------------------------------------------------------------------------

def test_the_window_allows_n_restarts_in_any_hour_and_names_when_the_next_may_come() -> None:
    window = RestartWindow(2)
    assert window.next_allowed(0.0) == 0.0
    window.record(10.0)
    window.record(100.0)
    assert window.count(200.0) == 2
    assert window.next_allowed(200.0) == 10.0 + HOUR_S  # the older of the last two leaves the hour then
    assert window.next_allowed(10.0 + HOUR_S) == 10.0 + HOUR_S  # a restart exactly an hour ago no longer counts
    assert window.count(10.0 + HOUR_S) == 1
    window.record(3650.0)
    assert window.next_allowed(3650.0) == 100.0 + HOUR_S
    assert window.next_allowed(5000.0) == 5000.0


def test_without_a_cap_every_restart_may_come_at_once() -> None:
    window = RestartWindow(None)
    for at in range(50):
        window.record(float(at))
    assert window.next_allowed(50.0) == 50.0


# ---- the guard, with a fake control and a fake clock -----------------------------------------------------

class FakeControl:
    """Records what the tuner asked; ``fail_next`` makes the next start/apply/restore raise TrialStartFailed."""

    def __init__(self, clock: FakeClock, calls: list[str]) -> None:
        self.clock = clock
        self.calls = calls
        self.fail_next = False
        self._baseline = BASE
        self.base_url = "http://127.0.0.1:9"
        self.api_key = None
        self.last_applied: dict[str, Any] = {}
        self.deadman_seconds = 60.0

    @property
    def baseline(self) -> RunConfig:
        return self._baseline

    def _restart(self, what: str) -> None:
        self.calls.append(what)
        self.clock.now += 2.0  # a restart takes two seconds
        if self.fail_next:
            self.fail_next = False
            raise TrialStartFailed(f"{what} did not come up")

    def start(self, baseline: RunConfig) -> None:
        self._restart("start")

    def apply(self, config: RunConfig) -> None:
        self._restart(f"apply parallel={config.parallel} threads={config.threads}")

    def restore_baseline(self) -> None:
        self._restart("restore")

    def adopt(self, config: RunConfig) -> None:
        self._baseline = config
        self._restart("adopt")

    def heartbeat(self) -> None: ...

    def server_memory_bytes(self) -> int | None:
        return None

    def describe(self) -> str:
        return "fake.service on h1"

    def server_log(self) -> str:
        return "`journalctl -u fake` on h1"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def recording_runner(calls: list[str], failing: Mapping[str, HookRun] | None = None,
                     clock: FakeClock | None = None) -> Callable[[Hook, Mapping[str, str], float], HookRun]:
    def run(hook: Hook, env: Mapping[str, str], timeout_s: float) -> HookRun:
        calls.append(f"{hook.name} {env['LLAMAHOST_RESTART_REASON']}")
        assert env["LLAMAHOST_HOOK"] == hook.name and env["LLAMAHOST_SERVICE"] == "fake.service on h1"
        if clock is not None:
            clock.now += 0.5  # a hook takes half a second
        return (failing or {}).get(hook.name, HookRun(True, "exit 0"))
    return run


HOOKS = RestartPolicy(drain=Hook("drain", "lb drain"), undrain=Hook("undrain", "lb undrain"), hook_timeout_s=5)


def guard(policy: RestartPolicy = HOOKS, failing: Mapping[str, HookRun] | None = None
          ) -> tuple[RestartGuard, FakeControl, FakeClock, list[str], list[str]]:
    clock, calls, events = FakeClock(), list[str](), list[str]()
    control = FakeControl(clock, calls)
    restarts = RestartGuard(control, policy, runner=recording_runner(calls, failing, clock), clock=clock,
                            sleep=clock.sleep, wall=lambda: 1_700_000_000.0)
    restarts.events = events.append
    return restarts, control, clock, calls, events


def test_every_restart_is_drained_before_and_undrained_after_with_its_reason() -> None:
    restarts, _, _, calls, _ = guard()
    restarts.start(BASE)
    restarts.apply(BASE)  # the baseline measured as a trial: its own drop-in, a restart
    restarts.apply(TRIAL_A)
    restarts.restore_baseline()
    restarts.adopt(TRIAL_B)
    assert calls == ["drain start", "start", "undrain start",
                     "drain baseline", "apply parallel=1 threads=1", "undrain baseline",
                     "drain trial", "apply parallel=2 threads=1", "undrain trial",
                     "drain baseline", "restore", "undrain baseline",
                     "drain adopt", "adopt", "undrain adopt"]
    report = restarts.report()
    assert report["restarts"] == report["outages"] == 5
    assert report["reasons"] == {"start": 1, "baseline": 2, "trial": 1, "adopt": 1}
    assert report["total_s"] == pytest.approx(5 * 2.5)  # from the drain until healthy: hook and restart
    assert report["longest_s"] == pytest.approx(2.5) and report["hooks"] == ["drain", "undrain"]
    assert set(report["reasons"]) <= set(REASONS)


def test_a_configuration_that_runs_already_is_not_restarted_drained_or_counted() -> None:
    restarts, _, _, calls, _ = guard()
    restarts.start(BASE)
    restarts.restore_baseline()  # the baseline after the baseline: nothing to do
    restarts.apply(TRIAL_A)
    restarts.apply(TRIAL_A)  # the same trial again: the unit's drop-in is unchanged, the supervisor's key too
    assert calls == ["drain start", "start", "undrain start", "restore",
                     "drain trial", "apply parallel=2 threads=1", "undrain trial", "apply parallel=2 threads=1"]
    assert restarts.report()["restarts"] == 2
    assert restarts.window.count(restarts.clock()) == 2


def test_a_trial_that_does_not_come_up_stays_drained_until_the_baseline_is_healthy_again() -> None:
    """One outage, two restarts: the host is not put back in service while the server is down."""
    restarts, control, _, calls, _ = guard()
    restarts.start(BASE)
    calls.clear()
    control.fail_next = True
    with pytest.raises(TrialStartFailed):
        restarts.apply(TRIAL_A)
    assert restarts.drained and restarts.left_drained() is not None
    restarts.restore_baseline()
    assert calls == ["drain trial", "apply parallel=2 threads=1", "restore", "undrain baseline"]
    report = restarts.report()
    assert report["restarts"] == 3 and report["outages"] == 2
    assert report["longest_s"] == pytest.approx(0.5 + 2 + 2)  # the drain, the failed trial, the baseline
    assert not restarts.drained and restarts.left_drained() is None


def test_a_host_left_drained_is_announced_when_the_guard_closes() -> None:
    restarts, control, _, _, events = guard()
    control.fail_next = True
    with pytest.raises(TrialStartFailed), restarts:
        restarts.start(BASE)
    assert len(events) == 1 and "LEFT DRAINED" in events[0] and "lb undrain" in events[0]
    assert "`journalctl -u fake` on h1" in events[0] and restarts.report()["left_drained"] is True


def test_a_failed_drain_stops_the_run_before_anything_restarts_and_puts_the_host_back() -> None:
    failing = {"drain": HookRun(False, "exit 3", "lb: backend h1 unknown")}
    restarts, _, _, calls, _ = guard(failing=failing)
    with pytest.raises(DrainFailed) as raised:
        restarts.start(BASE)
    assert calls == ["drain start", "undrain start"]  # no restart; the undrain undoes a drain that half worked
    error = raised.value
    assert isinstance(error, UserError)
    assert "the drain hook --drain 'lb drain' failed before the start restart (exit 3: lb: backend h1 unknown)" \
        in error.problem
    assert "server not restarted" in error.problem and "the undrain hook then ran (ok)" in error.problem
    assert "LLAMAHOST_RESTART_REASON=start" in error.fix and "--hook-timeout (5 s)" in error.fix
    assert restarts.report()["restarts"] == 0 and not restarts.drained


def test_a_failed_drain_while_a_trial_runs_says_the_dead_man_switch_brings_the_baseline_back() -> None:
    restarts, _, _, _, _ = guard()
    restarts.start(BASE)
    restarts.apply(TRIAL_A)
    restarts.runner = recording_runner([], {"drain": HookRun(False, "timed out after 5 s (killed)")})
    with pytest.raises(DrainFailed) as raised:
        restarts.apply(TRIAL_B)
    assert "timed out after 5 s" in raised.value.problem and "still runs a trial configuration" in raised.value.problem
    assert "dead-man switch" in raised.value.fix


def test_a_failed_undrain_stops_the_run_and_says_the_host_is_left_drained() -> None:
    restarts, _, _, calls, events = guard(failing={"undrain": HookRun(False, "HTTP 503", "maintenance")})
    with pytest.raises(UndrainFailed) as raised:
        restarts.start(BASE)
    assert calls == ["drain start", "start", "undrain start"]
    assert "(HTTP 503: maintenance)" in raised.value.problem and "LEFT DRAINED" in raised.value.problem
    assert "run the undrain by hand" in raised.value.fix
    assert restarts.report()["restarts"] == 1 and events  # said once, in the error and the display


def test_an_undrain_alone_runs_after_every_restart() -> None:
    restarts, _, _, calls, _ = guard(RestartPolicy(undrain=Hook("undrain", "register")))
    restarts.start(BASE)
    restarts.apply(TRIAL_A)
    assert calls == ["start", "undrain start", "apply parallel=2 threads=1", "undrain trial"]


def test_the_cap_makes_a_trial_wait_in_view_and_the_wait_is_counted() -> None:
    restarts, _, clock, calls, events = guard(RestartPolicy(max_per_hour=2))
    restarts.start(BASE)  # restart 1 at 1000
    restarts.apply(TRIAL_A)  # restart 2 at 1002
    assert restarts.restart_wait_s() == pytest.approx(HOUR_S - 4)
    restarts.apply(TRIAL_B)
    assert clock.slept == [pytest.approx(HOUR_S - 4)]
    assert len(events) == 1
    assert "restart cap: 2 restart(s) within the last hour; the next trial waits until" in events[0]
    assert calls[-1] == "apply parallel=1 threads=2"
    report = restarts.report()
    assert report["capped_waits_s"] == pytest.approx(HOUR_S - 4) and report["max_restarts_per_hour"] == 2
    assert "cap 2/h, 59m56s waited" in downtime_line(report)


def test_the_way_back_to_the_baseline_never_waits_for_the_cap_but_counts() -> None:
    restarts, _, clock, calls, _ = guard(RestartPolicy(max_per_hour=1))
    restarts.start(BASE)
    restarts.deadline = clock() + 10_000
    restarts.apply(TRIAL_A)  # waits an hour
    restarts.restore_baseline()  # a failed trial's way back: at once
    restarts.apply(BASE)
    assert len(clock.slept) == 1 and calls[-2:] == ["restore", "apply parallel=1 threads=1"]
    assert restarts.report()["restarts"] == 4


def test_a_trial_the_cap_allows_only_after_the_deadline_is_not_run_and_not_waited_for() -> None:
    restarts, _, clock, calls, events = guard(RestartPolicy(max_per_hour=1, drain=Hook("drain", "d"),
                                                            undrain=Hook("undrain", "u")))
    restarts.start(BASE)
    calls.clear()
    restarts.deadline = clock() + 600
    with pytest.raises(RestartRefused, match=r"not run: the restart cap \(1 per hour\) allows the next restart at"):
        restarts.apply(TRIAL_A)
    assert issubclass(RestartRefused, TrialFailed)  # a failed trial: never scored
    assert calls == [] and clock.slept == [] and events == []


def test_a_winner_applied_whose_undrain_fails_stays_in_the_vars_file_and_its_restart_counts(tmp_path: Path) -> None:
    """The adopt took effect (only the undrain failed): the inventory must keep naming what the host runs."""
    from types import SimpleNamespace

    from result_support import DEPLOYS_MEASURED_SERVER, HOST_FINGERPRINT, MODEL_SHA, WINNER, proven_tune_result

    from tuner.live.session import LiveRequest, save_write_and_apply

    host_vars = tmp_path / "h1.yml"
    host_vars.write_text(f'llama_server_model_sha256: "{MODEL_SHA}"\nllama_server_threads: 32\n'
                         + DEPLOYS_MEASURED_SERVER)
    restarts, _, _, calls, _ = guard(failing={"undrain": HookRun(False, "exit 1", "lb: api down")})
    ctx: Any = SimpleNamespace(request=LiveRequest(budget_seconds=3600, host_vars=host_vars, apply=True),
                               result_path=tmp_path / "result.yaml", control=restarts,
                               probe=SimpleNamespace(fingerprint=lambda: HOST_FINGERPRINT),
                               study=SimpleNamespace(study_name="live-s"))
    with pytest.raises(UndrainFailed, match="LEFT DRAINED"):
        save_write_and_apply(ctx, proven_tune_result(kind="live"), SimpleNamespace(event=lambda message: None),
                             downtime=restarts.report)
    assert calls == ["drain adopt", "adopt", "undrain adopt"]
    assert f"llama_server_threads: {WINNER.threads}" in host_vars.read_text()
    saved = yaml.safe_load((tmp_path / "result.yaml").read_text())
    assert saved["write_back"]["state"] == "written and applied" and saved["write_back"]["applied"] is True
    assert saved["downtime"]["reasons"] == {"adopt": 1} and saved["downtime"]["restarts"] == 1


# ---- the hooks, for real -----------------------------------------------------------------------------------

ENV = {"LLAMAHOST_HOOK": "drain", "LLAMAHOST_RESTART_REASON": "trial", "LLAMAHOST_SERVICE": "x.service on h1"}


def test_a_command_hook_runs_with_sh_and_sees_why(tmp_path: Path) -> None:
    log = tmp_path / "hooks.log"
    hook = parse_hook("drain", f'echo "$LLAMAHOST_HOOK $LLAMAHOST_RESTART_REASON $LLAMAHOST_SERVICE" >> {log}')
    assert not hook.is_url
    ran = run_hook(hook, ENV, 5)
    assert ran.ok and ran.detail == "exit 0"
    assert log.read_text() == "drain trial x.service on h1\n"


def test_a_failing_command_hook_reports_its_exit_code_and_output() -> None:
    ran = run_hook(Hook("drain", "echo 'lb: no such backend' >&2; exit 3"), ENV, 5)
    assert not ran.ok and ran.detail == "exit 3" and ran.output == "lb: no such backend"


def test_a_command_hook_that_hangs_is_killed_with_its_children_at_the_timeout() -> None:
    started = time.monotonic()
    ran = run_hook(Hook("drain", "echo waiting; sleep 60 & sleep 60"), ENV, 0.5)
    assert time.monotonic() - started < 5
    assert not ran.ok and ran.detail == "timed out after 0.5 s (killed)" and ran.output == "waiting"


class Balancer(BaseHTTPRequestHandler):
    """A load balancer's API on loopback: /ok answers 204, /broken 500, /slow after 3 s, /moved a redirect."""

    posts: ClassVar[list[tuple[str, dict[str, str]]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).posts.append((self.path, body))
        if self.path == "/slow":
            time.sleep(3)
        code = {"/ok": 204, "/broken": 500, "/moved": 302}.get(self.path, 204)
        self.send_response(code)
        if code == 302:
            self.send_header("Location", "/ok")
        payload = b"backend pool locked" if code == 500 else b""
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def balancer() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Balancer)
    Balancer.posts = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_url_hook_is_posted_to_with_why_and_succeeds_on_2xx(balancer: str) -> None:
    hook = parse_hook("drain", f"{balancer}/ok")
    assert hook.is_url
    ran = run_hook(hook, ENV, 5)
    assert ran.ok and ran.detail == "HTTP 204"
    assert Balancer.posts == [("/ok", ENV)]


def test_a_url_hook_fails_on_an_error_status_a_redirect_or_no_answer(balancer: str) -> None:
    broken = run_hook(Hook("drain", f"{balancer}/broken"), ENV, 5)
    assert not broken.ok and broken.detail == "HTTP 500" and broken.output == "backend pool locked"
    moved = run_hook(Hook("drain", f"{balancer}/moved"), ENV, 5)
    assert not moved.ok and moved.detail == "HTTP 302"
    assert [path for path, _ in Balancer.posts] == ["/broken", "/moved"]  # the redirect was not followed
    started = time.monotonic()
    slow = run_hook(Hook("drain", f"{balancer}/slow"), ENV, 0.5)
    assert not slow.ok and slow.detail == "timed out after 0.5 s" and time.monotonic() - started < 3
    closed = run_hook(Hook("drain", f"http://127.0.0.1:{free_port()}/drain"), ENV, 5)
    assert not closed.ok and closed.detail.startswith("cannot connect")


@pytest.mark.parametrize(("text", "fragment"), [
    ("  ", "--drain is empty"),
    ("ftp://lb/drain", "only http and https URLs"),
    ("https:///drain", "names no host"),
])
def test_a_hook_that_cannot_work_is_refused(text: str, fragment: str) -> None:
    with pytest.raises(UserError, match=fragment):
        parse_hook("drain", text)


@pytest.mark.parametrize(("args", "fragment"), [
    (["--live", "--local", "--drain", "true"], "--drain without --undrain would leave the host drained"),
    (["--live", "--local", "--max-restarts-per-hour", "0"], "--max-restarts-per-hour must be at least 1"),
    (["--live", "--local", "--drain", "true", "--undrain", "true", "--hook-timeout", "soon"],
     "cannot read --hook-timeout 'soon'"),
    (["--drain", "true", "--undrain", "true"], "--drain, --undrain only work with --live"),
])
def test_bad_restart_arguments_stop_before_anything_runs(fresh_home: Path, capsys: pytest.CaptureFixture[str],
                                                         args: list[str], fragment: str) -> None:
    assert main(["tune", "--budget", "20m", *args]) == 2
    assert fragment in capsys.readouterr().err
    assert not (fresh_home / "data").exists()


# ---- llamahost tune --live --local with hooks and a cap -------------------------------------------------------

# 150 s: the baseline's own time accounting must leave room for a candidate and the smallest proof (3 rounds of
# 2 runs); at 90 s a slower day's baseline (12 s, 2.3 s a window) left 77 s for a proof planned at 80 s.
BUDGET = "150s"
WORKLOAD = ["--concurrency", "2", "--requests", "4", "--prompt-scale", "0.1", "--verify-windows", "3",
            "--candidates", "1"]
DEPLOYED = "llama_server_threads: 1\nllama_server_parallel: 1\nllama_server_batch_size: 2\n" \
           "llama_server_ubatch_size: 1\n"


def tune_with_hooks(home: Path, model: Path, *extra: str) -> tuple[dict[str, Any], str, list[tuple[str, ...]]]:
    """A short live run whose hooks append ``drain|undrain REASON SERVICE`` to a log; returns the result, the
    run's stderr and the log's lines."""
    home.mkdir(parents=True)
    deployed, log = home / "h1.yml", home / "hooks.log"
    deployed.write_text(DEPLOYED)
    hook = f'echo "$LLAMAHOST_HOOK $LLAMAHOST_RESTART_REASON $LLAMAHOST_SERVICE" >> {shlex.quote(str(log))}'
    port = free_port()
    command = [sys.executable, "-m", "tuner.cli", "tune", "--live", "--local", "--port", str(port),
               "--model", str(model), "--budget", BUDGET, *WORKLOAD, "--baseline-vars", str(deployed),
               "--drain", hook, "--undrain", hook, *extra, "--json"]
    try:
        done = subprocess.run(command, env={**os.environ, "LLAMAHOST_HOME": str(home)}, capture_output=True,
                              text=True, timeout=600, check=False)
    finally:
        stop = [sys.executable, "-m", "tuner.cli", "server", "stop", "--port", str(port)]
        subprocess.run(stop, env={**os.environ, "LLAMAHOST_HOME": str(home)}, capture_output=True, timeout=60,
                       check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [tuple(line.split(" ", 2)) for line in log.read_text().splitlines()]
    return json.loads(done.stdout), done.stderr, lines


@pytest.mark.server
@pytest.mark.timeout(900)
def test_the_restart_cap_holds_the_search_back_within_a_short_budget(tmp_path: Path, model_path: Path,
                                                                     llama_server_binary: Path) -> None:
    """Three restarts an hour: the start, the baseline's own restart and one trial; the next trial would have to
    wait an hour, past the budget, so the search ends (the proof and the way back to the baseline still run)."""
    result, stderr, lines = tune_with_hooks(tmp_path / "home", model_path, "--max-restarts-per-hour", "3")
    reasons = [reason for hook, reason, _ in lines if hook == "drain"]
    assert reasons[:3] == ["start", "baseline", "trial"], reasons
    assert "trial" not in reasons[3:], "a trial restarted beyond the cap (the run is far shorter than an hour)"
    downtime = result["downtime"]
    assert downtime["max_restarts_per_hour"] == 3 and downtime["search_held_back"] is True
    assert downtime["capped_waits_s"] == 0  # an hour's wait never fits the budget: nothing was waited for
    assert "the search ends: the restart cap (3 per hour)" in stderr
    assert result["search"]["trials_run"] <= 2 and downtime["reasons"].get("trial", 0) <= 1

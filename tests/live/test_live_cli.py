"""``llamahost tune --live --local`` and ``llamahost apply`` end to end: a real llama-server with the small
real model under a real request workload, driven through the command line as a user would.

One shared run (about three minutes) backs the result and write-back assertions; the controller-kill test
runs its own. Budgets are small and the workload tiny (``--prompt-scale 0.1``): what is tested is the
machinery (trials, proof, write-back, dead-man switch, resume, lock), not this noisy machine's speed.
"""

from __future__ import annotations

import html
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from study_support import study_trials

from tuner.config import RunConfig
from tuner.live.local import LocalServer, ServerSpec
from tuner.model.checksum import sha256_of
from tuner.safe_change import TUNED_BINARY_VAR
from tuner.server.process import free_port
from tuner.study import GRACE_PERIOD_S

pytestmark = [pytest.mark.server, pytest.mark.timeout(1500)]

WORKLOAD = ["--concurrency", "2", "--requests", "4", "--prompt-scale", "0.1", "--verify-windows", "3"]
HOOKS = "hooks.log"  # the shared run's drain and undrain hooks write here, in its home
DEPLOYED = """\
# llama_server settings for this host (kept by hand; llamahost may update the tuned ones)
llama_server_threads: 1   # one core for the server, one for the rest
llama_server_parallel: 1
llama_server_batch_size: 2   # prompts fed a token at a time
llama_server_ubatch_size: 1

llama_server_api_key: ""  # set through Vault in production
"""


def llamahost_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tuner.cli", *args]


def run(home: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(llamahost_cmd(*args), env={**os.environ, "LLAMAHOST_HOME": str(home)},
                          capture_output=True, text=True, timeout=timeout, check=False)


def supervised(home: Path, port: int, model: Path, binary: Path) -> LocalServer:
    """The local server the CLI supervises (same state directory), for inspection and shutdown."""
    spec = ServerSpec(binary=str(binary), model=str(model), host="127.0.0.1", port=port)
    return LocalServer(home / "data" / "live" / f"local-{port}", spec)


def baseline_args_of(control: LocalServer) -> str:
    """The flags of the configuration the supervisor falls back to (its baseline.json), once written."""
    path = control.state / "baseline.json"
    if not path.exists():
        return ""
    return " ".join(RunConfig.from_dict(json.loads(path.read_text())["config"]).server_args())


def running_args(control: LocalServer) -> str:
    pid = control.server_pid()
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode() if pid else ""


@pytest.fixture(scope="module")
def live_run(tmp_path_factory: pytest.TempPathFactory, model_path: Path,
             llama_server_binary: Path) -> Iterator[tuple[Path, Path, dict[str, object], str]]:
    home = tmp_path_factory.mktemp("live-home")
    host_vars = home.parent / "h1.yml"
    host_vars.write_text(DEPLOYED)
    hook = f'echo "$LLAMAHOST_HOOK $LLAMAHOST_RESTART_REASON $LLAMAHOST_SERVICE" >> {shlex.quote(str(home / HOOKS))}'
    port = free_port()
    done = run(home, "tune", "--live", "--local", "--port", str(port), "--model", str(model_path),
               "--budget", "4m", "--candidates", "1", *WORKLOAD, "--baseline-vars", str(host_vars),
               "--host-vars", str(host_vars), "--drain", hook, "--undrain", hook, "--json")
    try:
        assert done.returncode == 0, done.stderr[-3000:]
        yield home, host_vars, json.loads(done.stdout), done.stderr
    finally:
        server = supervised(home, port, model_path, llama_server_binary)
        stopped = run(home, "server", "stop", "--port", str(port), timeout=60)
        assert stopped.returncode == 0 and server.supervisor_pid() is None, stopped.stderr


def test_live_run_measures_trials_under_the_workload_and_proves_or_keeps_the_baseline(
        live_run: tuple[Path, Path, dict[str, object], str], llama_server_binary: Path) -> None:
    home, _, result, _ = live_run
    measured_on = result["llama_cpp"]["llama_server"]  # type: ignore[index]
    assert measured_on["sha256"] == sha256_of(llama_server_binary), "the result names the build that served"
    assert result["objective"] == "live-throughput" and result["unit"] == "aggregate tok/s"
    assert result["verdict"] in ("improved", "inconclusive", "baseline-stands")
    search = result["search"]
    assert isinstance(search, dict) and search["complete"] >= 2  # the baseline and at least one trial
    baseline = result["baseline"]
    assert isinstance(baseline, dict)
    assert baseline["config"]["threads"] == 1 and baseline["config"]["parallel"] == 1  # read from host_vars
    for metric in ("throughput_tps", "latency_p95_s", "ttft_p95_s"):
        low, median, high = (baseline[metric][k] for k in ("ci_low", "median", "ci_high"))
        assert 0 < low <= median <= high, metric
    workload = result["workload"]
    assert isinstance(workload, dict) and workload["concurrency"] == 2
    heartbeat = result["heartbeat"]
    assert isinstance(heartbeat, dict) and heartbeat["missed"] == 0 and heartbeat["lapses"] == 0, heartbeat
    report = (home / "data" / "results" / f"{result['study']}.yaml").with_suffix(".html").read_text()
    assert html.escape(str(result["summary"])) in report and "aggregate generated tok/s" in report


def test_the_run_drains_and_undrains_around_every_restart(live_run: tuple[Path, Path, dict[str, object], str]) -> None:
    """The shared run's hooks append ``drain|undrain REASON SERVICE`` to a log: each restart is drained before and
    undrained after, with the same reason; the result counts as many outages as drains."""
    home, _, result, stderr = live_run
    lines = [tuple(line.split(" ", 2)) for line in (home / HOOKS).read_text().splitlines()]
    drains = lines[0::2]
    assert [hook for hook, *_ in lines] == ["drain", "undrain"] * len(drains), lines
    assert all(drain[1:] == undrain[1:] for drain, undrain in zip(lines[0::2], lines[1::2], strict=True))
    reasons = [reason for _, reason, _ in drains]
    assert reasons[0] == "start" and "trial" in reasons and set(reasons) <= {"start", "trial", "baseline"}
    assert all(service.startswith("local llama-server on http://127.0.0.1:") for *_, service in lines)
    downtime = result["downtime"]
    assert isinstance(downtime, dict) and downtime["outages"] == len(drains)
    search = result["search"]
    if isinstance(search, dict) and search["failed"] == 0:  # no trial failed to start: each restart was drained
        assert downtime["restarts"] == len(drains)
    assert sum(downtime["reasons"].values()) == downtime["restarts"]
    assert 0 < downtime["longest_s"] <= downtime["total_s"]
    assert downtime["hooks"] == ["drain", "undrain"] and downtime["max_restarts_per_hour"] is None
    assert "downtime: " in stderr and f"{downtime['restarts']} restart(s)" in stderr


def test_a_handicapped_deployment_is_beaten_and_the_winner_written_back_with_its_comments(
        live_run: tuple[Path, Path, dict[str, object], str]) -> None:
    """The deployment serves two concurrent clients with one thread, one slot and prompts fed to the model a token
    at a time (a micro-batch of one) on a two-core machine. A four-minute live tune must prove it can do better and
    write that into host_vars: "baseline stands" fails this test.

    The handicap is the micro-batch, whose cost is CPU work in the server and so holds however the shared machine's
    second core is loaded. A single thread alone is no longer a handicap here: a clean CI run measured the
    deployed one-thread configuration within 5% of the best trial and the test failed. Measured on this machine
    with the micro-batch handicap: baseline 71 aggregate tok/s, the proven winner +55% (95% CI +51% .. +59%,
    p=5e-7 over 5 rounds; the micro-batch only costs since the workload stopped reusing cached prompts). That a
    standing baseline leaves the file alone is tested in tests/unit/test_safe_change.py."""
    _, host_vars, result, _ = live_run
    assert result["verdict"] == "improved", (result["summary"], result["candidates"])
    improvement = result["improvement"]
    assert isinstance(improvement, dict) and improvement["ci_low"] > 1.0 and improvement["significant"]
    write_back = result["write_back"]
    assert isinstance(write_back, dict) and write_back["state"] == "written"
    assert write_back["host_vars"] == str(host_vars) and write_back["changed"]
    text = host_vars.read_text()
    assert "# one core for the server, one for the rest" in text and "# set through Vault in production" in text
    assert host_vars.with_name("h1.yml.prev").read_text() == DEPLOYED
    settings = result["settings"]
    assert isinstance(settings, dict)
    written = yaml.safe_load(text)
    assert all(written[key] == value for key, value in settings["role_vars"].items()), "the proven settings"
    llama_cpp = result["llama_cpp"]
    assert isinstance(llama_cpp, dict) and written[TUNED_BINARY_VAR] == llama_cpp["llama_server"]["sha256"]


def test_apply_dry_run_names_the_candidates_and_the_diff_and_changes_nothing(
        live_run: tuple[Path, Path, dict[str, object], str], model_path: Path, tmp_path: Path) -> None:
    home, _, result, _ = live_run
    study = str(result["study"])
    deployed = tmp_path / "h2.yml"
    deployed.write_text(DEPLOYED)
    trials = len(study_trials(home, study))
    done = run(home, "apply", "--dry-run", "--local", "--port", str(free_port()), "--model", str(model_path),
               "--candidates", "2", *WORKLOAD, "--baseline-vars", str(deployed), "--host-vars", str(deployed),
               "--json", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    plan = json.loads(done.stdout)
    assert plan["dry_run"] and plan["study"] == study and 1 <= len(plan["candidates"]) <= 2
    assert plan["baseline_server_args"][:4] == ["--threads", "1", "--threads-batch", "1"]
    assert plan["host_vars_diff"].startswith(f"--- {deployed}") and "+llama_server_" in plan["host_vars_diff"]
    assert deployed.read_text() == DEPLOYED and not deployed.with_name("h2.yml.prev").exists()
    assert len(study_trials(home, study)) == trials, "a dry run measures nothing"


def test_a_killed_controller_leaves_the_baseline_running_and_the_next_run_resumes(
        tmp_path: Path, model_path: Path, llama_server_binary: Path) -> None:
    home = tmp_path / "home"
    port = free_port()
    args = ["tune", "--live", "--local", "--port", str(port), "--model", str(model_path), "--study", "night",
            "--deadman", "6s", *WORKLOAD]
    controller = subprocess.Popen(llamahost_cmd(*args, "--budget", "30m"),
                                  env={**os.environ, "LLAMAHOST_HOME": str(home)},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    server = supervised(home, port, model_path, llama_server_binary)
    try:
        deadline = time.monotonic() + 400
        baseline_args = ""
        while time.monotonic() < deadline:
            assert controller.poll() is None, controller.communicate()[1][-3000:]
            with_state = [t.state for t in study_trials(home, "night")]
            baseline_args = baseline_args_of(server)
            if with_state.count(optuna.trial.TrialState.COMPLETE) >= 1 and baseline_args \
                    and with_state[-1] == optuna.trial.TrialState.RUNNING and baseline_args not in running_args(server):
                break  # a trial configuration is serving right now
            time.sleep(0.5)
        else:
            pytest.fail("the live run never reached a trial configuration")
        assert baseline_args

        second = run(home, *args, "--budget", "5m", timeout=120)  # the same host, while the first one runs
        assert second.returncode == 2 and "another llamahost run is already measuring on this host" in second.stderr
        assert "Traceback" not in second.stderr

        controller.send_signal(signal.SIGKILL)
        controller.wait(timeout=30)
        killed_at = time.monotonic()
        while baseline_args not in running_args(server) and time.monotonic() - killed_at < 60:
            time.sleep(0.5)
        assert baseline_args in running_args(server), "the dead-man switch did not restore the baseline"
        assert "baseline restored" in (server.state / "supervisor.log").read_text()

        # A trial is known dead once its heartbeat is older than the grace period; then any run fails it.
        time.sleep(max(0.0, killed_at + GRACE_PERIOD_S + 2 - time.monotonic()))
        again = run(home, *args, "--budget", "3m", "--candidates", "1", "--trials", "1")  # one more trial will do
        assert again.returncode == 0, again.stderr[-3000:]
        assert "resumed" in again.stderr
        trials = study_trials(home, "night")
        assert [t.user_attrs.get("role") for t in trials].count("baseline") == 1, "the baseline was measured twice"
        assert not any(t.state == optuna.trial.TrialState.RUNNING for t in trials)
        assert any(t.state == optuna.trial.TrialState.FAIL for t in trials)  # the trial that was cut off
        failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
        assert all(t.user_attrs.get("role") != "baseline" for t in failed)
        assert baseline_args in running_args(server)  # no --apply: the run ends on the baseline
    finally:
        if controller.poll() is None:
            controller.kill()
            controller.wait()
        server.shutdown()


@pytest.mark.parametrize(("change", "refusals"), [
    (("llama_server_batch_size: 2", "llama_server_batch_size: 1"),
     ["the llama_server_* settings in {deployed} cannot run: batch_size 1 is below 2", "correct them in {deployed}"]),
    (("llama_server_parallel: 1", "llama_server_parallel: 1\nllama_server_ctx_size: 16777216"),
     ["does not start, so there is nothing to tune against",
      "correct the llama_server_* settings in {deployed} until llama-server starts with them"]),
], ids=["refused-before-start", "fails-at-start"])
def test_a_deployed_configuration_that_cannot_start_is_a_clear_error_and_changes_nothing(
        tmp_path: Path, model_path: Path, llama_server_binary: Path, change: tuple[str, str],
        refusals: list[str]) -> None:
    """With no baseline there is nothing to judge trials against, so the run must stop with a usage error that
    names the problem and the settings file to correct, not a traceback, and leave that file alone. The
    pinned llama-server aborts at start when its batch holds a single token (llama.cpp's get_sub_batch needs
    two; RunConfig.least_batch_size): refused before any server starts. A context of 16M tokens passes every
    check and fails when llama-server allocates its KV cache, far beyond this machine's memory."""
    home = tmp_path / "home"
    deployed = tmp_path / "h1.yml"
    broken = DEPLOYED.replace(*change)
    assert broken != DEPLOYED
    deployed.write_text(broken)
    port = free_port()
    try:
        done = run(home, "tune", "--live", "--local", "--port", str(port), "--model", str(model_path),
                   "--budget", "4m", *WORKLOAD, "--baseline-vars", str(deployed), "--host-vars", str(deployed),
                   timeout=300)
        assert done.returncode == 2, done.stderr[-3000:]
        for refusal in refusals:
            assert refusal.format(deployed=deployed) in done.stderr, done.stderr[-3000:]
        assert "Traceback" not in done.stderr
        assert deployed.read_text() == broken and not deployed.with_name("h1.yml.prev").exists()
        assert not (home / "data" / "results").exists()
    finally:
        supervised(home, port, model_path, llama_server_binary).shutdown()


@pytest.mark.parametrize(("args", "fragment"), [
    (["--local", "--inventory", "inv.yml", "--host", "h1"], "needs one of --local, --inventory"),
    (["--local", "--objective", "tg"], "--objective tg is a benchmark objective"),
    (["--local", "--verify-windows", "2"], "--verify-windows must be at least 3"),
    (["--local", "--max-server-memory", "1.5"], "--max-server-memory is a fraction"),
    (["--local", "--baseline-vars", "/nonexistent/h1.yml"], "role variables file not found"),
    (["--local", "--workload", "/nonexistent/requests.jsonl"], "requests.jsonl"),
])
def test_bad_live_arguments_are_clear_errors_and_write_nothing(tmp_path: Path, model_path: Path,
                                                                args: list[str], fragment: str) -> None:
    home = tmp_path / "home"
    done = run(home, "tune", "--live", "--model", str(model_path), "--budget", "20m", "--port", str(free_port()),
               *args, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert fragment in done.stderr and "Traceback" not in done.stderr
    assert not (home / "data" / "studies.db").exists() and not (home / "data" / "results").exists()

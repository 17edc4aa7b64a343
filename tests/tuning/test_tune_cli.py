"""`llamahost tune` and `show` end to end, as a user runs them: real trials, real study store, real files.

Also every kind of bad input the issue lists: a clear message, exit code 2, no traceback, nothing written,
no existing study lost.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import yaml
from gguf import GGMLQuantizationType, GGUFWriter
from study_support import study_trials

from tuner.probe.collect import read_host
from tuner.roofline import COMPUTE, COMPUTE_OR_OVERHEAD, MEMORY, OVERHEAD
from tuner.safe_change import TUNED_BINARY_VAR
from tuner.server.build import ServerBuild
from tuner.study import StudyBinding, open_storage, open_study

pytestmark = pytest.mark.model

FAST = ["--pp-tokens", "64", "--tg-tokens", "16", "--max-measure", "4", "--seed", "1"]


def llamahost(*args: str, home: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LLAMAHOST_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "tuner.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)


MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# What the host_vars file holds before the run: the deployed model and a setting no benchmark measures.
DEPLOYED_VARS = f"llama_server_model_sha256: {MODEL_SHA256}\nllama_server_parallel: 4\n"


@pytest.fixture(scope="module")
def tuned_home(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> tuple[Path, dict[str, Any]]:
    """One real tuning run of about a minute and a half, shared by the assertions below; ``--host-vars`` names
    this machine's host_vars file in an inventory of its own (``<home>/inventory``)."""
    home = tmp_path_factory.mktemp("home")
    inventory = home / "inventory"
    (inventory / "host_vars").mkdir(parents=True)
    (inventory / "hosts.yml").write_text("llama_hosts:\n  hosts:\n    this-host:\n      ansible_connection: local\n")
    (inventory / "host_vars" / "this-host.yml").write_text(DEPLOYED_VARS)
    done = llamahost("tune", "--model", str(model_path), "--budget", "100s", *FAST, "--json",
                     "--host-vars", str(inventory / "host_vars" / "this-host.yml"), home=home)
    assert done.returncode == 0, done.stderr[-3000:]
    return home, json.loads(done.stdout)


def test_a_benchmark_tune_writes_its_proven_winner_through_the_safety_chain(
        tuned_home: tuple[Path, dict[str, Any]]) -> None:
    """--host-vars on a benchmark tune: what `llamahost write-back` would write, and only that (never the
    server's slots), recorded in the result file."""
    home, result = tuned_home
    host_vars = home / "inventory" / "host_vars" / "this-host.yml"
    saved = yaml.safe_load((home / "data" / "results" / f"{result['study']}.yaml").read_text())
    if result["verdict"] == "improved":
        written = yaml.safe_load(host_vars.read_text())
        measured_build = result["llama_cpp"]["llama_server"]["sha256"]  # for the role to compare with its copy
        assert written == {**yaml.safe_load(DEPLOYED_VARS), **result["settings"]["role_vars"],
                           TUNED_BINARY_VAR: measured_build}
        assert written["llama_server_parallel"] == 4, "a benchmark never measured the slots"
        assert saved["write_back"]["state"] == "written" and saved["write_back"]["changed"]
    else:
        assert host_vars.read_text() == DEPLOYED_VARS
        assert saved["write_back"]["state"] == "nothing to write"


def test_tune_writes_a_proven_result(tuned_home: tuple[Path, dict[str, Any]], llama_server_build: ServerBuild) -> None:
    home, result = tuned_home
    measured_on = result["llama_cpp"]["llama_server"]
    assert measured_on["sha256"] == llama_server_build.manifest["binary_sha256"], "the build the role deploys"
    assert "AVX" in measured_on["system_info"] or "NEON" in measured_on["system_info"]
    assert result["verdict"] in ("improved", "inconclusive", "baseline-stands")
    settings = result["settings"]
    assert isinstance(settings, dict)
    assert "--threads" in settings["server_args"]
    assert settings["role_vars"]["llama_server_threads"] >= 1
    baseline = result["baseline"]
    assert isinstance(baseline, dict)
    tg = baseline["tg_tps"]
    assert 0 < tg["ci_low"] <= tg["median"] <= tg["ci_high"]
    roof = result["roofline"]
    assert isinstance(roof, dict)
    assert 0 < roof["fraction"] <= 1 and roof["bandwidth_gbps"] >= max(roof["probe_best_gbps"], roof["read_gbps"])
    assert roof["limit"]["binds"] in (MEMORY, COMPUTE, OVERHEAD, COMPUTE_OR_OVERHEAD)
    assert "llama.cpp read" in roof["limit"]["reason"]
    # measured when the run began and again next to the trials: both in the host's history
    history = json.loads(next((home / "cache").glob("bandwidth-*.json")).read_text())["measurements"]
    assert len(history) >= 2 and history[-1]["measured_at"] >= history[0]["measured_at"]
    search = result["search"]
    assert isinstance(search, dict)
    assert search["complete"] >= 1 and 0 < search["measuring_fraction"] <= 1
    plan = search["plan"]  # made once the baseline was measured: what the rest of the budget buys
    assert plan["trials"] >= 1 and plan["rounds"] >= 3 and plan["candidates"] >= 1
    assert plan["budget_s"] == 100 and 0 < plan["elapsed_s"] < 100 and plan["detectable"] > 0
    assert result["model"]["sha256"] == MODEL_SHA256
    if result["verdict"] == "improved":
        assert result["improvement"]["ci_low"] > 1.0
    else:
        assert settings["config"] == baseline["config"]
    results = list((home / "data" / "results").glob("*.yaml"))
    assert len(results) == 1 and results[0].name == f"{result['study']}.yaml"
    report = results[0].with_suffix(".html").read_text()
    assert report.count("<img") >= 3 and html.escape(str(result["summary"])) in report  # the report escapes it


def test_show_lists_the_trials_and_the_result(tuned_home: tuple[Path, dict[str, Any]]) -> None:
    home, result = tuned_home
    shown = llamahost("show", "--json", home=home)
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["study"] == result["study"]
    assert data["baseline"]["role"] == "baseline" and data["baseline"]["state"] == "COMPLETE"
    assert data["result"]["verdict"] == result["verdict"]
    assert sum(1 for t in data["trials"] if t["role"] == "baseline") == 1
    table = llamahost("show", "--html", str(home / "again.html"), home=home)
    assert table.returncode == 0 and "(baseline)" in table.stdout and "settings to run" in table.stdout
    assert "<img" in (home / "again.html").read_text()


def wait_for_running_trial(proc: subprocess.Popen[str], home: Path, study: str, *, complete: int) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {complete} trials finished and another "
                        f"started: {proc.communicate()[1][-3000:]}")
        states = [t.state for t in study_trials(home, study)]
        if states.count(optuna.trial.TrialState.COMPLETE) >= complete and states[-1] == optuna.trial.TrialState.RUNNING:
            return
        time.sleep(0.5)
    proc.kill()
    pytest.fail(f"the study never got {complete} finished trials and a running one")


def test_sigterm_stops_cleanly_and_the_next_run_resumes(tmp_path: Path, model_path: Path) -> None:
    """Also: while it measures, a second tune and a fleet worker on this host are refused and measure nothing."""
    home = tmp_path / "home"
    env = {**os.environ, "LLAMAHOST_HOME": str(home)}
    cmd = [sys.executable, "-m", "tuner.cli", "tune", "--model", str(model_path), "--budget", "20m",
           "--study", "resume-me", *FAST]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_running_trial(proc, home, "resume-me", complete=2)
    fleet_store = f"sqlite:///{tmp_path / 'f.db'}"
    for second in (["tune", "--study", "second", *FAST], ["fleet", "work", "--storage", fleet_store]):
        refused = llamahost(*second, "--model", str(model_path), "--budget", "1m", home=home, timeout=120)
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert f"already measuring on this host: llamahost tune (pid {proc.pid}" in refused.stderr
        assert "Traceback" not in refused.stderr
    assert not study_trials(home, "second") and not (tmp_path / "f.db").exists()
    wait_for_running_trial(proc, home, "resume-me", complete=2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "resume" in err and "Traceback" not in err
    before = study_trials(home, "resume-me")
    interrupted = [t for t in before if t.state == optuna.trial.TrialState.FAIL]
    assert [t.user_attrs.get("failure") for t in interrupted] == ["interrupted"]
    assert not any(t.state == optuna.trial.TrialState.RUNNING for t in before)

    # Generous budget and one candidate: on a loaded machine the verification reserve must not eat the run.
    # --trials 2 ends the search long before the budget: two trials, the kept baseline not measured again.
    again = llamahost("tune", "--model", str(model_path), "--budget", "3m", "--candidates", "1", "--trials", "2",
                      "--study", "resume-me", *FAST, "--json", home=home)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed" in again.stderr and "the search ends: it ran the trials --trials asked for" in again.stderr
    search = json.loads(again.stdout)["search"]
    assert search["trials_run"] == 2 and search["trial_limit_reached"], search
    after = study_trials(home, "resume-me")
    assert len(after) == len(before) + 2, again.stderr[-3000:]
    assert [t.number for t in after[: len(before)]] == [t.number for t in before]
    baselines = [t for t in after if t.user_attrs.get("role") == "baseline"]
    assert len(baselines) == 1, "resuming must not measure the baseline again"


def test_a_model_replaced_mid_run_stops_the_run_and_keeps_the_trials(tmp_path: Path, model_path: Path,
                                                                     tiny_model_path: Path) -> None:
    """Another model copied over the one being tuned: the next trial refuses to measure it (exit 2, no
    traceback); what was measured on the original stays in the study, nothing is left running."""
    home = tmp_path / "home"
    model = tmp_path / "m.gguf"
    shutil.copy(model_path, model)
    env = {**os.environ, "LLAMAHOST_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "tuner.cli", "tune", "--model", str(model), "--budget", "20m",
                             "--study", "swapped", *FAST], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for_running_trial(proc, home, "swapped", complete=1)
    staged = tmp_path / "other.gguf"
    shutil.copy(tiny_model_path, staged)
    os.replace(staged, model)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    assert f"{model} changed during the run (its sha256 is not the one measured so far)" in err
    assert "Traceback" not in err
    trials = study_trials(home, "swapped")
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) >= 1
    assert not any(t.state == optuna.trial.TrialState.RUNNING for t in trials)


# ---- bad input --------------------------------------------------------------------------------------

def sparse_model(path: Path, gib: int) -> Path:
    """A valid GGUF whose one tensor is ``gib`` GiB, stored sparsely: large on paper, free on disk."""
    n_bytes = gib * 1024**3
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(4096)
    writer.add_tensor_info("blk.0.ffn_up.weight", (n_bytes // 4 // 4096, 4096), np.dtype(np.float32), n_bytes,
                           raw_dtype=GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    data_start = (path.stat().st_size + 31) // 32 * 32
    with path.open("r+b") as handle:
        handle.truncate(data_start + n_bytes)
    return path


def assert_refused(done: subprocess.CompletedProcess[str], fragment: str, home: Path) -> None:
    assert done.returncode == 2, done.stderr
    assert "llamahost: error:" in done.stderr and fragment in done.stderr
    assert "fix:" in done.stderr and "Traceback" not in done.stderr
    assert not (home / "data" / "studies.db").exists(), "a refused run must not create a study"
    assert not (home / "data" / "results").exists()


@pytest.mark.parametrize(("args", "fragment"), [
    (["--model", "/nonexistent/model.gguf"], "model file not found"),
    (["--budget", "0"], "budget must be positive"),
    (["--budget", "soon"], "cannot read budget"),
    (["--storage", "postgresql://nobody:secret@127.0.0.1:9/none"], "cannot open study storage"),
    (["--storage", "sqlite:////nonexistent/dir/studies.db"], "does not exist"),
    (["--storage", "redis://localhost"], "unsupported study storage URL"),
    (["--apply"], "--apply only work with --live"),
    (["--baseline-vars", "deployed.yml", "--max-ttft-p95", "2s"], "--baseline-vars, --max-ttft-p95 only work with"),
    (["--trials", "0"], "--trials must be at least 1, got 0"),
])
def test_bad_arguments(tmp_path: Path, model_path: Path, args: list[str], fragment: str) -> None:
    home = tmp_path / "home"
    full = ["tune", "--budget", "1m", *args] if "--model" in args else ["tune", "--model", str(model_path), *args]
    if "--budget" not in args:
        full += ["--budget", "1m"]
    done = llamahost(*full, home=home)
    assert_refused(done, fragment, home)
    assert "secret" not in done.stderr, "a password must never be printed"


def test_unknown_objective(tmp_path: Path) -> None:
    done = llamahost("tune", "--objective", "speed", home=tmp_path)
    assert done.returncode == 2 and "invalid choice: 'speed'" in done.stderr


def test_not_gguf_truncated_and_too_large(tmp_path: Path, model_path: Path) -> None:
    home = tmp_path / "home"
    text = tmp_path / "notes.gguf"
    text.write_text("hello")
    assert_refused(llamahost("tune", "--model", str(text), "--budget", "1m", home=home), "not a GGUF file", home)
    truncated = tmp_path / "cut.gguf"
    with model_path.open("rb") as src:
        truncated.write_bytes(src.read(50_000_000))
    assert_refused(llamahost("tune", "--model", str(truncated), "--budget", "1m", home=home), "truncated", home)
    huge = sparse_model(tmp_path / "huge.gguf", gib=256)
    assert_refused(llamahost("tune", "--model", str(huge), "--budget", "1m", home=home),
                   "of memory is available on this host", home)


def test_a_budget_that_buys_no_candidate_is_refused_with_one_that_would_and_keeps_the_baseline(
        tmp_path: Path, model_path: Path) -> None:
    """Half a minute holds the baseline (each sample generates 512 tokens) and the proof's minimum rounds, but not
    one candidate trial: before the budget plan such a run reported "baseline stands" as if it were a finding."""
    home = tmp_path / "home"
    done = llamahost("tune", "--model", str(model_path), "--budget", "30s", "--pp-tokens", "64", "--tg-tokens",
                     "512", "--seed", "1", "--study", "short", home=home, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "a budget of 30s leaves no time for a single candidate" in done.stderr, done.stderr[-3000:]
    assert "fix: pass --budget " in done.stderr and "Traceback" not in done.stderr
    assert not (home / "data" / "results").exists(), "no result for a run that bought no verdict"
    trials = study_trials(home, "short")
    assert [t.user_attrs.get("role") for t in trials] == ["baseline"], "the baseline is kept for the next run"
    assert trials[0].state == optuna.trial.TrialState.COMPLETE


def test_a_study_measured_on_another_llama_server_build_is_refused(tmp_path: Path, model_path: Path) -> None:
    """Trials of one study must all have run one build: a study bound to another sha256 is not continued."""
    home = tmp_path / "home"
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    here = StudyBinding(host_fingerprint=read_host().fingerprint(), model_sha256=MODEL_SHA256, objective="tg",
                        workload={"pp_tokens": 512, "tg_tokens": 128, "seed": 1234}, extra={},
                        llama_server_sha256="0" * 64)
    open_study("night-2", open_storage(url), here, baseline_params={"threads": 2})
    done = llamahost("tune", "--model", str(model_path), "--budget", "1m", "--study", "night-2", "--storage", url,
                     home=home)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "a different llama-server build (sha256)" in done.stderr


def test_study_from_another_host_is_refused_and_kept(tmp_path: Path, model_path: Path) -> None:
    home = tmp_path / "home"
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    foreign = StudyBinding(host_fingerprint="0123456789abcdef", model_sha256="x", objective="tg",
                           workload={"pp_tokens": 512, "tg_tokens": 128, "seed": 1234}, extra={})
    study, created = open_study("night-1", open_storage(url), foreign, baseline_params={"threads": 2})
    assert created
    before = len(study.trials)
    done = llamahost("tune", "--model", str(model_path), "--budget", "1m", "--study", "night-1", "--storage", url,
                     home=home)
    assert done.returncode == 2 and "different host" in done.stderr and "Traceback" not in done.stderr
    again = optuna.load_study(study_name="night-1", storage=url)
    assert len(again.trials) == before and again.user_attrs["host_fingerprint"] == "0123456789abcdef"

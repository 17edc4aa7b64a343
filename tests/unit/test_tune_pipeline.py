"""The benchmark pipeline end to end in the fast tier: baseline, search, stale check, proof, result file.

Everything is real (the search space of a recorded host, Optuna's sampler on a SQLite study, the interleaved
proof, the result and report writers) except the measurer, which answers at once with the throughput a known
function of the configuration gives, plus seeded noise. So the test knows the right answer: a handicapped
baseline must be beaten, proven and written as the result; when nothing is better, nothing may be "improved".
The real measurer is exercised by the tuning tier (tests/tuning), which runs llama-server.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from model_support import a_model

from tuner.config import RunConfig
from tuner.probe import read_host
from tuner.result import BASELINE_STANDS, IMPROVED, load_result
from tuner.safe_change import write_back
from tuner.search import MeasureSettings
from tuner.server.identity import ServerBinary
from tuner.space import SearchSpace
from tuner.study import StudyBinding, open_storage, open_study
from tuner.trial.runner import TrialOutcome
from tuner.tune import TuneContext, TuneRequest, run

HOST = Path(__file__).resolve().parents[1] / "fixtures" / "hosts" / "epyc-kvm-2vcpu"
SAMPLES = 5


class FakeMeasurer:
    """tg tok/s = ``speed(config)`` with 1% Gaussian noise per sample; every run takes no time at all."""

    def __init__(self, speed: Callable[[RunConfig], float], seed: int = 7) -> None:
        self.speed = speed
        self.random = random.Random(seed)
        self.measuring_seconds = 0.0
        self.runs: list[RunConfig] = []

    def run(self, config: RunConfig, label: str, **_: Any) -> TrialOutcome:
        self.runs.append(config)
        mean = self.speed(config)
        samples = [mean * self.random.gauss(1.0, 0.01) for _ in range(SAMPLES)]
        self.measuring_seconds += 0.5
        return TrialOutcome(values=samples, series={"tg_tps": samples}, info={"pp_tps": [100.0]},
                            stop_reason="samples", measure_seconds=0.5, wall_seconds=0.6, load_seconds=0.1)


def flash_attention_wins(config: RunConfig) -> float:
    """The baseline (flash attention left to llama.cpp, 2 threads) runs 10 tok/s; forcing it on is 30% faster
    and one thread halves everything: a clear optimum the search must find and the proof must confirm."""
    return 10.0 * (1.3 if config.flash_attn == "on" else 1.0) * (0.5 if config.threads == 1 else 1.0)


def context(tmp_path: Path, seed: int) -> TuneContext:
    probe = read_host(HOST)
    model = a_model()
    space = SearchSpace(probe, model, "tg")
    binding = StudyBinding(host_fingerprint=probe.fingerprint(), model_sha256="ab" * 32, objective="tg",
                           workload={"pp_tokens": 512, "tg_tokens": 128, "seed": 1234}, extra={"hostname": "fake"})
    storage = open_storage(f"sqlite:///{tmp_path / 'studies.db'}")
    study, created = open_study("pipeline", storage, binding, baseline_params=space.baseline_params(), seed=seed)
    request = TuneRequest(budget_seconds=600, trials=14, candidates=2, seed=seed, output=tmp_path / "result.yaml")
    build = tmp_path / "llama-server"  # the build the result names; write-back checks the deployment runs it
    build.write_bytes(b"a llama-server build")
    server = ServerBinary(path=str(build), sha256=hashlib.sha256(build.read_bytes()).hexdigest(),
                          version="version: 0 (build 0, commit 0)", system_info="CPU : AVX2 = 1 |")
    settings = MeasureSettings(objective="tg", server_binary=Path(server.path))
    return TuneContext(request, model, "ab" * 32, probe, space, study, created, settings, tmp_path / "result.yaml",
                       server)


def test_a_handicapped_baseline_is_beaten_proven_and_written_as_the_result(tmp_path: Path) -> None:
    ctx = context(tmp_path, seed=3)
    measurer = FakeMeasurer(flash_attention_wins)
    outcome = run(ctx, measurer)

    written = load_result(tmp_path / "result.yaml")
    assert written.verdict == IMPROVED, written.summary
    assert written.settings.config["flash_attn"] == "on"
    assert written.settings.config["threads"] == 2
    assert written.settings.role_vars["llama_server_flash_attn"] == "on"
    # as Ansible (YAML 1.1) reads the file too, where a plain `on` would be True
    as_ansible_reads = yaml.safe_load((tmp_path / "result.yaml").read_text())
    assert as_ansible_reads["settings"]["role_vars"]["llama_server_flash_attn"] == "on"
    assert written.improvement is not None and written.improvement["ci_low"] > 0.2, written.improvement  # +30%
    assert written.baseline["config"] == ctx.space.baseline().to_dict()
    assert outcome.verification.winner is not None and outcome.verification.rounds >= 1
    assert (tmp_path / "result.html").stat().st_size > 0
    # the proof measured the baseline again, interleaved with the winner, after the search
    proof = measurer.runs[-2 * outcome.verification.rounds:]
    assert ctx.space.baseline() in proof and outcome.verification.winner.config in proof

    # and the playbook keeps it: the write-back puts the proven setting into the deployment's vars
    vars_file = tmp_path / "llama_hosts.yml"
    vars_file.write_text(f"llama_server_binary_src: {ctx.server.path}\nllama_server_threads: 2\n"
                         "llama_server_flash_attn: auto\n")
    write_back(written.to_dict(), vars_file)
    text = vars_file.read_text()
    assert "llama_server_flash_attn: 'on'" in text and "llama_server_threads: 2" in text, text


def test_max_rounds_ends_the_proof_before_the_budget_and_still_proves_a_clear_win(tmp_path: Path) -> None:
    """--max-rounds 3: the same search, a proof of three rounds where the budget would buy eight."""
    capped = context(tmp_path, seed=3)
    capped.request = dataclasses.replace(capped.request, max_rounds=3)
    measurer = FakeMeasurer(flash_attention_wins)
    outcome = run(capped, measurer)
    assert outcome.verification.rounds == 3
    written = load_result(tmp_path / "result.yaml")
    assert written.verdict == IMPROVED and written.verification["rounds"] == 3, written.summary
    (tmp_path / "uncapped").mkdir()
    uncapped = context(tmp_path / "uncapped", seed=3)
    assert run(uncapped, FakeMeasurer(flash_attention_wins)).verification.rounds > 3, "the budget buys more"


@pytest.mark.parametrize("seed", [1, 2])
def test_when_nothing_is_faster_the_baseline_stands(tmp_path: Path, seed: int) -> None:
    """Noise alone must never come out as a proven win (the search still picks a 'best' trial by chance)."""
    ctx = context(tmp_path, seed=seed)
    run(ctx, FakeMeasurer(lambda config: 10.0, seed=seed))
    written = load_result(tmp_path / "result.yaml")
    assert written.verdict != IMPROVED, written.summary
    assert written.settings.config == ctx.space.baseline().to_dict()
    assert written.verdict in (BASELINE_STANDS, "inconclusive")

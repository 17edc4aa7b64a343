"""The build-dependent knobs (OpenMP wait policy, weight repacking): read from the build, searched only where it
offers them, rendered to the process's argv and environment, the unit and a live trial's drop-in."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from model_support import a_model

from tuner.build_knobs import knobs_of, system_info_features
from tuner.config import RunConfig
from tuner.errors import UserError
from tuner.live.space import LiveSearchSpace, params_for
from tuner.live.unit import ServerCommand, render_trial_dropin
from tuner.probe import read_host
from tuner.server.flags import parse_help
from tuner.space import SearchSpace

HELP = Path(__file__).resolve().parents[1] / "server" / "data" / "llama-server-help-0c1e57098.txt"
HOST = Path(__file__).resolve().parents[1] / "fixtures" / "hosts" / "xeon-8480-1s"
# The system_info line of the pinned portable build (llama-server -lv 4), thread counts removed.
OPENMP_BUILD = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | LLAMAFILE = 1 | "
                "OPENMP = 1 | REPACK = 1 |")
THREADPOOL_BUILD = "CPU : SSE3 = 1 | AVX2 = 1 | LLAMAFILE = 1 | REPACK = 1 |"


def test_the_knobs_come_from_the_builds_system_info_and_help() -> None:
    flags = parse_help(HELP.read_text())
    assert system_info_features(OPENMP_BUILD)["OPENMP"] == "1"
    both = knobs_of(OPENMP_BUILD, flags)
    assert both.omp_wait_policy and both.repack
    threadpool = knobs_of(THREADPOOL_BUILD, flags)
    assert not threadpool.omp_wait_policy and "not an OpenMP build" in threadpool.omp_reason
    assert threadpool.repack
    no_flag = knobs_of(OPENMP_BUILD, {name: spec for name, spec in flags.items() if "repack" not in name})
    assert not no_flag.repack and "--no-repack" in no_flag.repack_reason
    no_kernels = knobs_of(OPENMP_BUILD.replace("REPACK = 1", "REPACK = 0"), flags)
    assert not no_kernels.repack and "REPACK" in no_kernels.repack_reason


def drawn(space: SearchSpace, count: int = 60) -> list[RunConfig]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=5))
    return [space.draw(study.ask()) for _ in range(count)]


def test_strict_placement_is_searched_only_for_pinned_configurations() -> None:
    space = SearchSpace(read_host(HOST), a_model(), "both", knobs=knobs_of(OPENMP_BUILD, parse_help(HELP.read_text())))
    configs = drawn(space, 120)
    assert {c.cpu_strict for c in configs if c.cpus} == {True, False}
    assert not any(c.cpu_strict for c in configs if not c.cpus)
    strict = RunConfig(threads=2, threads_batch=2, cpus=(4, 6), placement="compact", cpu_strict=True)
    assert strict.server_args()[-4:] == ["--cpu-mask", "0x50", "--cpu-strict", "1"]
    with pytest.raises(UserError, match="cpu_strict"):
        RunConfig(threads=2, threads_batch=2, cpu_strict=True).validate()
    command = ServerCommand(("/opt/llama-server/bin/llama-server", "--model", "m.gguf", *strict.server_args()))
    assert command.kept == ("/opt/llama-server/bin/llama-server", "--model", "m.gguf")


def test_a_build_without_a_knob_leaves_it_out_of_the_space() -> None:
    host, flags = read_host(HOST), parse_help(HELP.read_text())
    offered = SearchSpace(host, a_model(), "both", knobs=knobs_of(OPENMP_BUILD, flags))
    configs = drawn(offered)
    assert {c.omp_wait_policy for c in configs} == {"default", "active", "passive"}
    assert {c.repack for c in configs} == {True, False}
    dims = {d.name: d for d in offered.dimensions()}
    assert dims["repack"].searched and dims["omp_wait_policy"].searched and dims["cpu_strict"].searched
    baseline = offered.baseline()
    assert (baseline.repack, baseline.omp_wait_policy) == (True, "default"), "the baseline is llama.cpp's default"

    threadpool = SearchSpace(host, a_model(), "both", knobs=knobs_of(THREADPOOL_BUILD, flags))
    assert {c.omp_wait_policy for c in drawn(threadpool)} == {"default"}
    assert not {d.name: d for d in threadpool.dimensions()}["omp_wait_policy"].searched
    uninspected = SearchSpace(host, a_model(), "both")
    assert {(c.repack, c.omp_wait_policy, c.cpu_strict) for c in drawn(uninspected)} == {(True, "default", False)}


def test_a_live_space_without_the_knobs_keeps_the_deployed_values() -> None:
    deployed = RunConfig(threads=4, threads_batch=4, repack=False, omp_wait_policy="active", cpus=(0, 1, 2, 3),
                         placement="compact", cpu_strict=True)
    space = LiveSearchSpace(read_host(HOST), a_model(), concurrency=1, ctx_per_slot=512, baseline=deployed)
    configs = drawn(space)
    assert {(c.repack, c.omp_wait_policy) for c in configs} == {(False, "active")}
    assert all(c.cpu_strict == bool(c.cpus) for c in configs), "strict where pinned, as deployed"
    unpinned = deployed.with_changes(cpus=(), placement="os", cpu_strict=False)
    offered = LiveSearchSpace(read_host(HOST), a_model(), concurrency=1, ctx_per_slot=512, baseline=unpinned,
                              knobs=knobs_of(OPENMP_BUILD, parse_help(HELP.read_text())))
    params = params_for(offered, offered.baseline())
    assert params is not None and (params["repack"], params["omp_wait_policy"]) == (False, "active")


def test_the_knobs_render_to_flags_environment_and_role_variables() -> None:
    tuned = RunConfig(threads=2, threads_batch=2, repack=False, omp_wait_policy="passive")
    assert tuned.server_args()[-1] == "--no-repack"
    assert tuned.server_environment() == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert RunConfig(threads=2, threads_batch=2).server_environment() == {}
    role_vars = tuned.role_vars("benchmark")
    assert role_vars["llama_server_repack"] is False and role_vars["llama_server_omp_wait_policy"] == "passive"
    assert RunConfig.from_role_vars(role_vars) == tuned
    assert RunConfig.from_role_vars({"llama_server_threads": 2, "llama_server_repack": "no"}).repack is False


def test_a_key_names_the_knobs_only_when_they_are_set() -> None:
    """Keys recorded before the knobs existed still name the same configuration."""
    plain = RunConfig(threads=2, threads_batch=2)
    assert "repack" not in plain.key() and "omp_wait_policy" not in plain.key()
    keys = {plain.key(), plain.with_changes(repack=False).key(), plain.with_changes(omp_wait_policy="active").key()}
    assert len(keys) == 3


@pytest.mark.parametrize("bad", [{"omp_wait_policy": "ACTIVE\nExecStartPre=/bin/sh"}, {"repack": "maybe"}])
def test_a_poisoned_knob_in_a_result_is_refused(bad: dict[str, str]) -> None:
    with pytest.raises(UserError, match=next(iter(bad))):
        RunConfig.from_dict({"threads": 2, "threads_batch": 2, **bad}, origin="result.json")


def test_a_live_trial_sets_or_unsets_the_environment_the_units_settings_gave() -> None:
    command = ServerCommand(("/opt/llama-server/bin/llama-server", "--model", "m.gguf", "--threads", "4",
                             "--no-repack", "--flash-attn", "on"))
    assert "--no-repack" not in command.kept, "a trial decides repacking itself"
    active = RunConfig(threads=2, threads_batch=2, omp_wait_policy="active", repack=False)
    lines = render_trial_dropin(command, active, ()).splitlines()
    assert "Environment=OMP_WAIT_POLICY=ACTIVE" in lines
    assert next(line for line in lines if line.startswith("ExecStart=/")).endswith("--no-repack")
    default = render_trial_dropin(command, RunConfig(threads=2, threads_batch=2), ()).splitlines()
    assert "UnsetEnvironment=OMP_WAIT_POLICY" in default
    assert "--no-repack" not in next(line for line in default if line.startswith("ExecStart=/"))

"""The search space on every fixture topology: what is searched, the baseline, and validity by construction."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna
import pytest
from model_support import a_model

from tuner.errors import UserError
from tuner.probe import read_host
from tuner.probe.host import HostProbe
from tuner.space import SearchSpace

HOST_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hosts"
FIXTURE_NAMES = sorted(p.name for p in HOST_FIXTURES.iterdir() if (p / "sys").is_dir())


@pytest.fixture(params=FIXTURE_NAMES)
def host(request: pytest.FixtureRequest) -> HostProbe:
    return read_host(HOST_FIXTURES / request.param)


def searched(space: SearchSpace) -> set[str]:
    return {d.name for d in space.dimensions() if d.searched}


def test_fixture_set_covers_the_topologies_the_issue_names() -> None:
    assert {"epyc-9654-2s-nps4", "xeon-8480-1s", "epyc-kvm-2vcpu"} <= set(FIXTURE_NAMES)


def test_dimensions_follow_the_topology(host: HostProbe) -> None:
    space = SearchSpace(host, a_model(), "both")
    dims = searched(space)
    topo = host.topology
    assert ("numa" in dims) == (len(topo.nodes) > 1)
    assert ("memory_policy" in dims) == (len(topo.nodes) > 1)
    assert ("smt" in dims) == topo.has_smt
    multi_domain = len(topo.nodes) > 1 or len(topo.llc_domains) > 1
    assert ("scatter" in space.placements) == multi_domain


def test_numa_settings_are_left_out_with_the_reason_when_the_model_pages_cannot_be_put_back() -> None:
    host = read_host(HOST_FIXTURES / "epyc-9654-2s-nps4")
    reason = "another process maps the model file"
    space = SearchSpace(host, a_model(), "both", numa_blocked=reason)
    dims = {d.name: d for d in space.dimensions()}
    assert not dims["numa"].searched and not dims["memory_policy"].searched
    assert dims["numa"].reason == dims["memory_policy"].reason == f"not searched: {reason}"
    assert {"placement", "smt", "threads"} <= searched(space), "CPU placement is still searched"
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    configs = [space.draw(study.ask()) for _ in range(40)]
    assert {(c.numa, c.memory_policy) for c in configs} == {("none", "default")}
    assert {c.placement for c in configs} > {"os"}
    one_node = SearchSpace(read_host(HOST_FIXTURES / "xeon-8480-1s"), a_model(), "both", numa_blocked=reason)
    assert one_node.numa_blocked is None, "on one node there is nothing to leave out"


def test_a_quantized_kv_cache_is_not_searched_for_a_head_size_llama_cpp_refuses_it_for() -> None:
    host = read_host(HOST_FIXTURES / "epyc-kvm-2vcpu")
    tiny = dataclasses.replace(a_model(), head_dim_k=16, head_dim_v=16)  # the lab's generated model
    space = SearchSpace(host, tiny, "both")
    dims = {d.name: d for d in space.dimensions()}
    kv = dims["kv cache type"]
    assert not kv.searched and "not a multiple of q8_0's 32-value block" in kv.reason
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=5))
    assert {(c.cache_type_k, c.cache_type_v) for c in (space.draw(study.ask()) for _ in range(20))} == {("f16", "f16")}
    assert "kv cache type" in searched(SearchSpace(host, a_model(), "both")), "head size 128: searched"


def test_objective_decides_which_thread_and_batch_knobs_matter(host: HostProbe) -> None:
    tg = searched(SearchSpace(host, a_model(), "tg"))
    pp = searched(SearchSpace(host, a_model(), "pp"))
    assert "threads" in tg and "threads_batch" not in tg and "batch/ubatch" not in tg
    assert "threads" not in pp and "threads_batch" in pp and "batch/ubatch" in pp


def test_mlock_offered_only_when_the_model_can_be_locked(host: HostProbe) -> None:
    locked = dataclasses.replace(host, kernel=dataclasses.replace(host.kernel, can_lock_memory=True))
    unlocked = dataclasses.replace(host, kernel=dataclasses.replace(
        host.kernel, can_lock_memory=False, memlock_limit_bytes=64 * 1024))
    assert "mlock" in SearchSpace(locked, a_model(), "tg").load_modes
    assert "mlock" not in SearchSpace(unlocked, a_model(), "tg").load_modes


def test_baseline_is_llama_cpp_defaults(host: HostProbe) -> None:
    base = SearchSpace(host, a_model(), "both").baseline()
    cores = host.topology.physical_core_count
    assert (base.threads, base.threads_batch) == (cores, cores)
    assert (base.batch_size, base.ubatch_size) == (2048, 512)
    assert base.placement == "os" and base.cpus == ()
    assert (base.numa, base.memory_policy, base.load_mode, base.flash_attn) == ("none", "default", "auto", "auto")
    assert (base.cache_type_k, base.cache_type_v) == ("f16", "f16")


@pytest.mark.parametrize("objective", ["tg", "pp", "both"])
def test_enqueued_baseline_params_reproduce_the_baseline(host: HostProbe, objective: str) -> None:
    space = SearchSpace(host, a_model(), objective)
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial(space.baseline_params())
    trial = study.ask()
    assert space.draw(trial) == space.baseline()


@pytest.mark.parametrize("objective", ["tg", "both"])
def test_every_sampled_configuration_is_valid_and_rebuildable(host: HostProbe, objective: str) -> None:
    space = SearchSpace(host, a_model(), objective)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=3))
    topo = host.topology
    seen_pinned = False
    for _ in range(60):
        trial = study.ask()
        config = space.draw(trial)  # validate() inside: an invalid combination would raise here
        study.tell(trial, 1.0)
        assert config.ubatch_size <= config.batch_size
        if config.cpus:
            seen_pinned = True
            assert len(config.cpus) >= max(config.threads, config.threads_batch)
            assert set(config.cpus) <= set(topo.logical_cpus)
            if not config.smt and topo.has_smt:
                cores = [topo.cpu(c).core for c in config.cpus]
                assert len(cores) == len(set(cores)), "SMT off must use one thread per physical core"
        if config.numa in ("distribute", "isolate"):
            assert config.cpus == ()
        if config.flash_attn == "off":
            assert config.cache_type_v == "f16"
        assert space.config_from_params(trial.params) == config
    assert seen_pinned


def test_kv_cache_can_be_pinned_to_f16(host: HostProbe) -> None:
    space = SearchSpace(host, a_model(), "tg", search_kv_cache=False)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(10):
        config = space.draw(study.ask())
        assert (config.cache_type_k, config.cache_type_v) == ("f16", "f16")


def test_candidates_stay_inside_the_cpus_the_trials_may_use() -> None:
    """A host partitioned like the cpu role does it: the tuner may use node 1's CPUs only (CPU 0's node keeps
    the housekeeping), and one SMT sibling there is taken too. No candidate may name another CPU."""
    host = read_host(HOST_FIXTURES / "epyc-9654-2s-nps4")
    node = host.topology.nodes[1]
    usable = set(node.cpus) - {max(node.cpus)}
    space = SearchSpace(host, a_model(), "both", usable_cpus=usable)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    pinned = 0
    for _ in range(300):
        config = space.draw(study.ask())
        assert set(config.cpus) <= usable, config
        pinned += bool(config.cpus)
    assert pinned > 50
    inside = host.topology.restricted_to(usable)
    assert space.baseline().threads == inside.physical_core_count
    assert space.physical_cores == inside.physical_core_count < host.topology.physical_core_count


def test_a_process_that_may_use_none_of_the_cpus_is_refused() -> None:
    host = read_host(HOST_FIXTURES / "epyc-kvm-2vcpu")
    with pytest.raises(UserError, match="none of this host's online CPUs"):
        SearchSpace(host, a_model(), "both", usable_cpus=[4095])

"""A live search space draws only configurations llama-server starts with."""

from __future__ import annotations

from pathlib import Path

import optuna
from model_support import a_model

from tuner.config import MAX_CTX_SIZE, RunConfig, slots_of
from tuner.live.space import MAX_SLOTS, LiveSearchSpace, slot_choices
from tuner.probe import read_host

HOST = Path(__file__).resolve().parents[1] / "fixtures" / "hosts" / "xeon-8480-1s"


def test_slot_counts_follow_the_concurrency_up_to_the_smallest_batch() -> None:
    assert slot_choices(1) == (-1, 1, 2)
    assert slot_choices(5) == (-1, 1, 2, 4, 8, 16)
    assert slot_choices(500) == (-1, 1, 2, 4, 8, 16, MAX_SLOTS)


def test_every_drawn_configuration_has_a_batch_of_at_least_its_slots() -> None:
    """Under a heavy concurrency the space offers its most slots; each draw is valid (draw validates) and
    llama-server would start it: the batch holds every slot."""
    space = LiveSearchSpace(read_host(HOST), a_model(), concurrency=500, ctx_per_slot=512)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=11))
    configs = [space.draw(study.ask()) for _ in range(300)]
    assert max(slots_of(config.parallel) for config in configs) == MAX_SLOTS
    assert min(config.batch_size for config in configs) == MAX_SLOTS, "the smallest batch was drawn too"
    assert all(config.batch_size >= config.least_batch_size() for config in configs)


def drawn_configs(space: LiveSearchSpace, n: int = 200) -> list[RunConfig]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    return [space.draw(study.ask()) for _ in range(n)]


def test_no_configuration_shortens_the_deployed_context() -> None:
    """A deployment of 16M tokens over llama-server's automatic 4 slots keeps 16M in its baseline and in every
    candidate; a candidate with more slots gives each the deployed share (4M), up to llama-server's bound. A
    workload of short requests asks for 512 per slot and once wrote back 2048 over the deployed 16M."""
    deployed = RunConfig(threads=4, threads_batch=4, ctx_size=1 << 24)
    space = LiveSearchSpace(read_host(HOST), a_model(), concurrency=16, ctx_per_slot=512, baseline=deployed)
    assert space.baseline().ctx_size == 1 << 24
    configs = drawn_configs(space)
    assert {slots_of(c.parallel) for c in configs} >= {1, 2, 4, 8}
    assert all(c.ctx_size == MAX_CTX_SIZE for c in configs)

    one_slot = RunConfig(threads=4, threads_batch=4, parallel=1, ctx_size=2048)
    space = LiveSearchSpace(read_host(HOST), a_model(), concurrency=4, ctx_per_slot=512, baseline=one_slot)
    assert space.baseline().ctx_size == 2048
    by_slots = {slots_of(c.parallel): c.ctx_size for c in drawn_configs(space)}
    assert by_slots == {1: 2048, 2: 4096, 4: 8192, 8: 16384}, "each slot keeps the deployed slot's 2048"


def test_a_deployed_context_of_zero_is_the_models_trained_context_and_the_workload_can_raise_it() -> None:
    deployed = RunConfig(threads=4, threads_batch=4, parallel=2, ctx_size=0)
    space = LiveSearchSpace(read_host(HOST), a_model(), concurrency=1, ctx_per_slot=512, baseline=deployed)
    assert a_model().context_length == 8192
    assert space.baseline().ctx_size == 8192
    assert {c.ctx_size for c in drawn_configs(space) if c.parallel == 1} == {8192}

    long_requests = LiveSearchSpace(read_host(HOST), a_model(), concurrency=1, ctx_per_slot=6144, baseline=deployed)
    assert long_requests.baseline().ctx_size == 2 * 6144, "a workload longer than the deployed share raises it"
    assert LiveSearchSpace(read_host(HOST), a_model(), concurrency=1, ctx_per_slot=512).baseline().ctx_size == 4 * 512


def test_slot_counts_whose_kv_cache_cannot_fit_beside_the_model_are_not_offered() -> None:
    """On a 23.5 GiB host, a 4 GiB model serving 32K tokens in one slot (128 KiB of f16 KV per token): 2 and
    4 slots of 32K (8 and 16 GiB of KV) fit beside the model in 90% of RAM, 8 slots (32 GiB) do not and are
    never drawn, which would otherwise be a failed trial each time."""
    host = read_host(HOST.parent / "epyc-kvm-2vcpu")
    model = a_model()
    assert model.kv_bytes_per_token() == 128 * 1024
    deployed = RunConfig(threads=2, threads_batch=2, parallel=1, ctx_size=32768)
    space = LiveSearchSpace(host, model, concurrency=4, ctx_per_slot=512, baseline=deployed)
    assert space.slots == (-1, 1, 2, 4)
    assert {slots_of(c.parallel) for c in drawn_configs(space)} == {1, 2, 4}
    assert space.baseline().ctx_size == 32768
    roomy = LiveSearchSpace(read_host(HOST), model, concurrency=4, ctx_per_slot=512, baseline=deployed)
    assert roomy.slots == (-1, 1, 2, 4, 8), "509 GiB hold 8 slots of 32K"

"""A live search space draws only configurations llama-server starts with."""

from __future__ import annotations

from pathlib import Path

import optuna
from model_support import a_model

from tuner.config import slots_of
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

"""Worked examples for the sizing engine, computed by hand here and checked against the engine.

The arithmetic in each case is written out so a reader can follow it: weights = params x bits / 8;
KV bytes per token = layers x KV heads x (2 x head dim) x bytes per element; compute = 4 x 512 x
(vocab + 8 x n_embd); headroom = 10% of those three; OS reserve 2 GiB. Predicted tg = 0.60 x bandwidth /
(streamed weights + KV per token x context / 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest

from tuner.errors import UserError
from tuner.sizing import (
    Constraints,
    ModelDemand,
    SizingAssumptions,
    Workload,
    default_catalog,
    evaluate,
    require_fit,
    require_recommendation,
    size_host,
)
from tuner.sizing.demand import CACHE_TYPE_BYTES, memory_budget

GIB = 1024**3
OS_RESERVE = 2 * GIB

LLAMA_70B_Q4_K_M: dict[str, Any] = {
    "params": 70.6e9,
    "bits_per_weight": 4.85,
    "layers": 80,
    "kv_heads": 8,
    "head_dim": 128,
    "n_embd": 8192,
    "n_vocab": 128256,
    "name": "Llama-3.1-70B Q4_K_M",
}
LLAMA_8B_Q8_0: dict[str, Any] = {
    "params": 8.03e9,
    "bits_per_weight": 8.5,
    "layers": 32,
    "kv_heads": 8,
    "head_dim": 128,
    "n_embd": 4096,
    "n_vocab": 128256,
    "name": "Llama-3.1-8B Q8_0",
}
FITS_NOWHERE: dict[str, Any] = {
    "params": 2.0e12,
    "bits_per_weight": 16,
    "layers": 120,
    "kv_heads": 16,
    "head_dim": 128,
    "n_embd": 16384,
    "n_vocab": 128256,
    "name": "2T BF16",
}


def demand(spec: dict[str, Any]) -> ModelDemand:
    return ModelDemand.from_parameters(**spec)


def hand_total(m: dict[str, Any], context: int = 8192) -> int:
    """Memory by hand, for one slot of f16 KV cache."""
    weights: int = math.ceil(m["params"] * m["bits_per_weight"] / 8)
    kv: int = math.ceil(m["layers"] * m["kv_heads"] * 2 * m["head_dim"] * 2.0 * context)
    compute: int = 4 * 512 * (m["n_vocab"] + 8 * m["n_embd"])
    return weights + kv + compute + math.ceil((weights + kv + compute) * 0.10) + OS_RESERVE


def hand_tg(bandwidth_gbs: float, m: dict[str, Any], efficiency: float = 0.60, context: int = 8192) -> float:
    """Predicted tg by hand: efficiency x bandwidth / (weights + f16 KV of half the context)."""
    per_token: float = math.ceil(m["params"] * m["bits_per_weight"] / 8)
    per_token += m["layers"] * m["kv_heads"] * 2 * m["head_dim"] * 2.0 * context / 2
    return efficiency * bandwidth_gbs * 1e9 / per_token


@dataclass(frozen=True)
class Case:
    label: str
    model: dict[str, Any]
    expected_total: int
    recommended: str | None
    expected_tg: float | None = None
    constraints: Constraints = field(default_factory=Constraints)
    reason_contains: str = ""


CASES = [
    Case(
        "70B Q4_K_M: smallest whole socket, best per dollar",
        LLAMA_70B_Q4_K_M,
        52_618_223_282,
        "c8g.24xlarge",
        expected_tg=hand_tg(537.6, LLAMA_70B_Q4_K_M),
        reason_contains="smallest size that owns a whole socket",
    ),
    Case(
        "70B Q4_K_M on x86 only: Genoa beats Sapphire Rapids per dollar at equal size",
        LLAMA_70B_Q4_K_M,
        52_618_223_282,
        "c7a.24xlarge",
        expected_tg=hand_tg(460.8, LLAMA_70B_Q4_K_M),
        constraints=Constraints(architectures=("x86_64",)),
    ),
    Case(
        "70B Q4_K_M needing 7.5 tok/s: only a two-socket size reaches it, and it is flagged",
        LLAMA_70B_Q4_K_M,
        52_618_223_282,
        "c8g.48xlarge",
        expected_tg=hand_tg(2 * 537.6, LLAMA_70B_Q4_K_M, efficiency=0.60 * 0.554),
        constraints=Constraints(min_tokens_per_second=7.5),
        reason_contains="span sockets",
    ),
    Case(
        "8B Q8_0: smallest whole socket",
        LLAMA_8B_Q8_0,
        13_076_417_022,
        "c8g.24xlarge",
        expected_tg=hand_tg(537.6, LLAMA_8B_Q8_0),
    ),
    Case(
        "8B Q8_0 under $1/h: the fastest part-socket size, cheapest among equally fast",
        LLAMA_8B_Q8_0,
        13_076_417_022,
        "c8g.4xlarge",
        expected_tg=hand_tg(537.6 * 16 / 96, LLAMA_8B_Q8_0),
        constraints=Constraints(max_hourly_price=1.0),
        reason_contains="part-socket",
    ),
    Case(
        "8B Q8_0 under $1/h on x86",
        LLAMA_8B_Q8_0,
        13_076_417_022,
        "c7a.4xlarge",
        expected_tg=hand_tg(460.8 * 16 / 96, LLAMA_8B_Q8_0),
        constraints=Constraints(max_hourly_price=1.0, architectures=("x86_64",)),
    ),
    Case(
        "2T parameters at 16 bits fit nowhere",
        FITS_NOWHERE,
        hand_total(FITS_NOWHERE),
        None,
        reason_contains="does not fit in any size",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_worked_examples(case: Case) -> None:
    model = demand(case.model)
    report = size_host(model, Workload(), default_catalog(), constraints=case.constraints)
    assert report.budget.total == case.expected_total
    assert case.reason_contains in report.recommendation_reason
    if case.recommended is None:
        assert report.recommended is None
        assert not report.by_speed
        return
    assert report.recommended is not None
    assert report.recommended.name == case.recommended
    assert report.recommended.predicted_tg == pytest.approx(case.expected_tg, rel=1e-3)


def test_hand_totals_match_the_formula_in_the_docstring() -> None:
    assert hand_total(LLAMA_70B_Q4_K_M) == 52_618_223_282
    assert hand_total(LLAMA_8B_Q8_0) == 13_076_417_022


def test_rankings_order_by_speed_and_by_value_and_exclude_sizes_that_do_not_fit() -> None:
    report = size_host(demand(LLAMA_70B_Q4_K_M), Workload(), default_catalog())
    speeds = [c.predicted_tg for c in report.by_speed]
    assert speeds == sorted(speeds, reverse=True)
    # Tokens per dollar compare at 3 significant digits (linear prices tie), ties go to the faster size.
    keys = [(float(f"{c.tokens_per_dollar:.3g}"), c.predicted_tg) for c in report.by_value]
    assert keys == sorted(keys, reverse=True)
    assert report.by_value[0].name == "c8g.24xlarge"  # ties with smaller c8g sizes, and is the fastest
    assert all(c.fits for c in report.by_speed)
    too_small = {c.name for c in report.candidates if not c.fits}
    assert "r7a.xlarge" in too_small  # 32 GiB < 49 GiB
    assert "r7a.xlarge" not in {c.name for c in report.by_speed}


def test_each_candidate_gives_reasons_for_fit_sockets_bandwidth_and_isa() -> None:
    report = size_host(demand(LLAMA_70B_Q4_K_M), Workload(), default_catalog())
    by_name = {c.name: c for c in report.candidates}
    spanning = by_name["r7a.48xlarge"]
    assert spanning.spans_sockets
    assert any("spans 2 sockets" in r and "NUMA" in r for r in spanning.reasons)
    part = by_name["r7i.4xlarge"]
    assert any("part of a socket (16 of 96 vCPUs)" in r for r in part.reasons)
    assert any("bandwidth 51.2 GB/s" in r for r in part.reasons)
    assert any("AMX" in r for r in part.reasons)
    arm = by_name["r8g.24xlarge"]
    assert any("needs an arm64 AMI" in r for r in arm.reasons)
    small = by_name["c7a.4xlarge"]
    assert small.reasons[0].startswith("too small: needs 49.0 GiB, has 32 GiB")


@pytest.mark.parametrize(("cache_type", "per_token"), [("f16", 327_680), ("q8_0", 174_080), ("q4_0", 92_160)])
def test_kv_cache_type_changes_memory(cache_type: str, per_token: int) -> None:
    model = demand(LLAMA_70B_Q4_K_M)
    assert model.kv_bytes_per_token(cache_type) == per_token  # 80 x 8 x 256 x bytes per element
    budget = memory_budget(
        model, Workload(context=32768, parallel=4, cache_type=cache_type), SizingAssumptions()
    )
    assert budget.kv_cache == per_token * 32768 * 4


def test_cache_types_cover_everything_llama_cpp_accepts() -> None:
    from tuner.config import CACHE_TYPES

    assert set(CACHE_TYPE_BYTES) == set(CACHE_TYPES)


def test_efficiency_scales_prediction_and_is_validated() -> None:
    model = demand(LLAMA_8B_Q8_0)
    catalog = default_catalog()
    base = size_host(model, Workload(), catalog).recommended
    measured = size_host(model, Workload(), catalog, SizingAssumptions(efficiency=0.72)).recommended
    assert base is not None and measured is not None
    assert measured.predicted_tg == pytest.approx(base.predicted_tg * 0.72 / 0.60)
    with pytest.raises(UserError, match=r"efficiency 1\.5 must be in"):
        size_host(model, Workload(), catalog, SizingAssumptions(efficiency=1.5))


def test_mixture_of_experts_streams_only_active_weights() -> None:
    dense = ModelDemand.from_parameters(params=30e9, bits_per_weight=4.5, layers=48, kv_heads=4, head_dim=128)
    moe = ModelDemand.from_parameters(
        params=30e9, bits_per_weight=4.5, layers=48, kv_heads=4, head_dim=128, active_params=3e9
    )
    assert moe.weight_bytes == dense.weight_bytes
    assert moe.streamed_bytes_per_token == pytest.approx(dense.streamed_bytes_per_token / 10, rel=1e-6)


def test_constraints_that_name_nothing_real_are_refused() -> None:
    model = demand(LLAMA_8B_Q8_0)
    with pytest.raises(UserError, match="unknown families m5"):
        size_host(model, Workload(), default_catalog(), constraints=Constraints(families=("m5",)))
    with pytest.raises(UserError, match=r"price given for 'm5\.large'"):
        size_host(
            model, Workload(), default_catalog(), constraints=Constraints(price_overrides={"m5.large": 1})
        )
    with pytest.raises(UserError, match="parallel 0 must be at least 1"):
        size_host(model, Workload(parallel=0), default_catalog())
    with pytest.raises(UserError, match="params must be positive"):
        ModelDemand.from_parameters(params=0, bits_per_weight=4, layers=1, kv_heads=1, head_dim=1)


def test_region_without_prices_ranks_speed_only_unless_prices_are_given() -> None:
    model = demand(LLAMA_8B_Q8_0)
    report = size_host(model, Workload(), default_catalog(), constraints=Constraints(region="eu-west-1"))
    assert not report.by_value
    assert report.by_speed
    assert report.recommended is not None  # no price cap: price is not needed to recommend
    capped = size_host(
        model,
        Workload(),
        default_catalog(),
        constraints=Constraints(
            region="eu-west-1", max_hourly_price=5.0, price_overrides={"r7a.24xlarge": 4.0}
        ),
    )
    assert capped.recommended is not None and capped.recommended.name == "r7a.24xlarge"
    assert [c.name for c in capped.by_value] == ["r7a.24xlarge"]


def test_require_recommendation_and_require_fit_explain_the_fix() -> None:
    catalog = default_catalog()
    nowhere = size_host(demand(FITS_NOWHERE), Workload(), catalog)
    with pytest.raises(
        UserError, match=r"the largest size considered, x2idn\.32xlarge, has 2048 GiB"
    ) as info:
        require_recommendation(nowhere)
    assert "smaller quantization" in str(info.value)
    model = demand(LLAMA_70B_Q4_K_M)
    strict = size_host(model, Workload(), catalog, constraints=Constraints(max_hourly_price=0.3))
    with pytest.raises(UserError, match="meets the constraints"):
        require_recommendation(strict)
    small = evaluate(
        catalog.get("r7a.xlarge"),
        model,
        Workload(),
        assumptions=SizingAssumptions(),
        constraints=Constraints(),
    )
    with pytest.raises(UserError, match=r"r7a\.xlarge has 32 GiB but Llama-3\.1-70B Q4_K_M needs 49\.0 GiB"):
        require_fit(small, model)
    enough = evaluate(
        catalog.get("r7a.2xlarge"),
        model,
        Workload(),
        assumptions=SizingAssumptions(),
        constraints=Constraints(),
    )
    assert require_fit(enough, model) is enough

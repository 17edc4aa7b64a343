"""Score every catalog size for a model and workload, rank them, and recommend one.

Prediction (the bandwidth roofline of token generation, see ANCHORS "llama.cpp on CPUs")::

    tg tok/s = efficiency x bandwidth available to the size / bytes read per token

* bandwidth available: the socket's theoretical bandwidth times the share of the socket the size owns
  (a 16-vCPU slice of a 96-vCPU socket is assumed to get 1/6: its neighbours use the rest);
* a size that spans sockets gets its sockets' bandwidth, but at ``numa_spanning_factor`` of the
  efficiency until the tuner has fixed NUMA placement, and is flagged;
* bytes read per token: streamed weights plus the KV cache of one slot at average fill.

Recommendation: among sizes that fit and meet the constraints, the smallest one that owns one whole socket
(its bandwidth is not shared with neighbours and no NUMA placement is needed), best tokens per dollar
among equals. Without one, the fastest single-socket size; only then a size that spans sockets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tuner.errors import UserError
from tuner.sizing.assumptions import SizingAssumptions
from tuner.sizing.catalog import Catalog, InstanceSize
from tuner.sizing.demand import MemoryBudget, ModelDemand, Workload, bytes_read_per_token, memory_budget

GIB = 1024**3
DEFAULT_REGION = "us-east-1"
ISA_LABELS = {
    "avx512f": "AVX-512", "avx512_vnni": "VNNI", "avx512_bf16": "BF16", "avx512_fp16": "FP16", "amx": "AMX",
    "sve2": "SVE2", "i8mm": "I8MM", "dotprod": "DOTPROD", "bf16": "BF16", "neon": "NEON", "avx2": "AVX2",
}


@dataclass(frozen=True)
class Constraints:
    """What the user asks of the host besides holding the model."""

    region: str = DEFAULT_REGION
    max_hourly_price: float | None = None
    min_tokens_per_second: float | None = None
    families: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ()
    price_overrides: Mapping[str, float] = field(default_factory=dict)

    def validate(self, catalog: Catalog) -> Constraints:
        problems = []
        unknown_families = [f for f in self.families if f not in catalog.families]
        if unknown_families:
            problems.append(f"unknown families {', '.join(unknown_families)} "
                            f"(known: {', '.join(catalog.families)})")
        known_arches = sorted({f.architecture for f in catalog.families.values()})
        unknown_arches = [a for a in self.architectures if a not in known_arches]
        if unknown_arches:
            problems.append(f"unknown architectures {', '.join(unknown_arches)} "
                            f"(known: {', '.join(known_arches)})")
        for name, usd in self.price_overrides.items():
            if name not in catalog.names():
                problems.append(f"price given for {name!r}, which is not in the catalog")
            if usd <= 0:
                problems.append(f"price for {name} must be positive")
        if self.max_hourly_price is not None and self.max_hourly_price <= 0:
            problems.append("the maximum hourly price must be positive")
        if self.min_tokens_per_second is not None and self.min_tokens_per_second <= 0:
            problems.append("the minimum tokens per second must be positive")
        if problems:
            raise UserError("invalid sizing constraints: " + "; ".join(problems),
                            "fix the options named above (`llamahost size --help`)")
        return self

    def admits(self, size: InstanceSize) -> bool:
        return ((not self.families or size.family.name in self.families)
                and (not self.architectures or size.family.architecture in self.architectures))

    def to_dict(self) -> dict[str, Any]:
        return {
            "region": self.region,
            "max_hourly_price": self.max_hourly_price,
            "min_tokens_per_second": self.min_tokens_per_second,
            "families": list(self.families),
            "architectures": list(self.architectures),
            "price_overrides": dict(self.price_overrides),
        }


@dataclass(frozen=True)
class Candidate:
    """One instance size judged for one model and workload."""

    instance: InstanceSize
    fits: bool
    memory_needed_bytes: int
    bandwidth_gbs: float
    efficiency_used: float
    predicted_tg: float
    price_per_hour: float | None
    price_basis: str
    eligible: bool
    placement: str
    reasons: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.instance.name

    @property
    def spans_sockets(self) -> bool:
        return self.instance.sockets_spanned > 1

    @property
    def owns_one_socket(self) -> bool:
        return self.instance.sockets_spanned == 1 and self.instance.whole_sockets

    @property
    def tokens_per_dollar(self) -> float | None:
        """Tokens one stream generates per dollar of instance time."""
        if not self.price_per_hour:
            return None
        return self.predicted_tg * 3600 / self.price_per_hour

    def to_dict(self) -> dict[str, Any]:
        size = self.instance
        per_dollar = self.tokens_per_dollar
        return {
            "instance_type": size.name,
            "family": size.family.name,
            "architecture": size.family.architecture,
            "vcpus": size.vcpus,
            "physical_cores": size.physical_cores,
            "memory_gib": size.memory_gib,
            "fits": self.fits,
            "eligible": self.eligible,
            "memory_needed_gib": round(self.memory_needed_bytes / GIB, 2),
            "placement": self.placement,
            "sockets_spanned": size.sockets_spanned,
            "numa_nodes": size.sockets_spanned,
            "socket_share": round(size.socket_share, 4),
            "bandwidth_gbs": round(self.bandwidth_gbs, 1),
            "efficiency_used": round(self.efficiency_used, 4),
            "predicted_tg_tokens_per_second": round(self.predicted_tg, 2),
            "price_usd_per_hour": self.price_per_hour,
            "price_basis": self.price_basis,
            "tokens_per_dollar": None if per_dollar is None else round(per_dollar),
            "isa": list(size.family.isa),
            "reasons": list(self.reasons),
        }


@dataclass(frozen=True)
class SizingReport:
    model: ModelDemand
    workload: Workload
    assumptions: SizingAssumptions
    constraints: Constraints
    budget: MemoryBudget
    bytes_per_token: float
    candidates: tuple[Candidate, ...]
    recommended: Candidate | None
    recommendation_reason: str

    @property
    def by_speed(self) -> tuple[Candidate, ...]:
        """Sizes that fit, fastest first."""
        fitting = [c for c in self.candidates if c.fits]
        return tuple(sorted(fitting, key=lambda c: (-c.predicted_tg, c.price_per_hour or float("inf"))))

    @property
    def by_value(self) -> tuple[Candidate, ...]:
        """Sizes that fit and have a price, most tokens per dollar first."""
        priced = [c for c in self.candidates if c.fits and c.tokens_per_dollar is not None]
        return tuple(sorted(priced, key=lambda c: (-_comparable(c.tokens_per_dollar), -c.predicted_tg)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "workload": self.workload.to_dict(),
            "assumptions": self.assumptions.to_dict(),
            "constraints": self.constraints.to_dict(),
            "memory_needed": {k: v for k, v in self.budget.to_dict().items()},
            "bytes_read_per_token": round(self.bytes_per_token),
            "recommended": None if self.recommended is None else self.recommended.name,
            "recommendation_reason": self.recommendation_reason,
            "by_predicted_tg": [c.name for c in self.by_speed],
            "by_tokens_per_dollar": [c.name for c in self.by_value],
            "candidates": [c.to_dict() for c in self.candidates],
        }


def _comparable(value: float | None) -> float:
    """A value rounded to 3 significant digits: sizes priced linearly in vCPUs tie on tokens per dollar up
    to the price list's rounding, and such ties are broken by speed, not by a rounding artefact."""
    return float(f"{value or 0.0:.3g}")


def isa_label(size: InstanceSize) -> str:
    family = size.family
    features = [ISA_LABELS.get(x, x.upper()) for x in family.isa if x not in ("avx2", "neon")]
    label = f"{family.architecture} {'/'.join(dict.fromkeys(features))}"
    if family.architecture == "arm64":
        label += " (needs an arm64 AMI and an arm64 llama.cpp build)"
    return label


def _placement(size: InstanceSize, assumptions: SizingAssumptions) -> tuple[str, str]:
    """A short placement label and the sentence that explains it."""
    per_socket = size.family.vcpus_per_socket
    if size.sockets_spanned == 1 and size.whole_sockets:
        return "whole", f"owns one whole socket ({size.vcpus} of {per_socket} vCPUs, 1 NUMA node)"
    if size.sockets_spanned == 1:
        return (f"{size.vcpus}/{per_socket}",
                f"part of a socket ({size.vcpus} of {per_socket} vCPUs): assumes its proportional share of "
                "the socket's bandwidth, neighbours use the rest")
    owned = "owns all of them" if size.whole_sockets else f"{size.vcpus} vCPUs over sockets of {per_socket}"
    return (f"spans {size.sockets_spanned}",
            f"spans {size.sockets_spanned} sockets / NUMA nodes ({owned}): needs NUMA placement; "
            f"predicted at {assumptions.numa_spanning_factor:.2f} x efficiency until the tuner has placed it")


def _price(size: InstanceSize, constraints: Constraints) -> tuple[float | None, str]:
    if size.name in constraints.price_overrides:
        return constraints.price_overrides[size.name], "given on the command line"
    price = size.price(constraints.region)
    if price is None:
        return None, f"no price for {constraints.region} in the catalog"
    if price.derived_from:
        return price.usd_per_hour, f"derived from {price.derived_from}: {price.source.cite()}"
    return price.usd_per_hour, f"quoted: {price.source.cite()}"


def evaluate(size: InstanceSize, model: ModelDemand, workload: Workload, *, assumptions: SizingAssumptions,
             constraints: Constraints, budget: MemoryBudget | None = None) -> Candidate:
    """Judge one size: does the model fit, how fast would it generate, what does it cost, and why."""
    budget = budget or memory_budget(model, workload, assumptions)
    needed = budget.total
    fits = needed <= size.memory_bytes
    family = size.family
    bandwidth = family.bandwidth_per_socket_gbs * size.socket_share
    spanning_factor = assumptions.numa_spanning_factor if size.sockets_spanned > 1 else 1.0
    efficiency = assumptions.efficiency * spanning_factor
    predicted = efficiency * bandwidth * 1e9 / bytes_read_per_token(model, workload)
    price, price_basis = _price(size, constraints)
    placement, placement_reason = _placement(size, assumptions)

    reasons = [
        (f"fits: needs {needed / GIB:.1f} GiB of {size.memory_gib} GiB" if fits
         else f"too small: needs {needed / GIB:.1f} GiB, has {size.memory_gib} GiB"),
        placement_reason,
        f"bandwidth {bandwidth:.1f} GB/s "
        f"({family.bandwidth_per_socket_gbs} GB/s per socket, {family.memory_label})",
        f"ISA {isa_label(size)}",
    ]
    eligible = fits
    if constraints.min_tokens_per_second is not None and predicted < constraints.min_tokens_per_second:
        eligible = False
        reasons.append(f"below the minimum: {predicted:.1f} < {constraints.min_tokens_per_second:g} tok/s")
    if constraints.max_hourly_price is not None:
        if price is None:
            eligible = False
            reasons.append(f"price unknown ({price_basis}), so the price cap cannot be checked")
        elif price > constraints.max_hourly_price:
            eligible = False
            reasons.append(f"over the price cap: ${price:.2f}/h > ${constraints.max_hourly_price:.2f}/h")
    return Candidate(
        instance=size, fits=fits, memory_needed_bytes=needed, bandwidth_gbs=bandwidth,
        efficiency_used=efficiency, predicted_tg=predicted, price_per_hour=price, price_basis=price_basis,
        eligible=eligible, placement=placement, reasons=tuple(reasons),
    )


def _recommend(candidates: Sequence[Candidate]) -> tuple[Candidate | None, str]:
    eligible = [c for c in candidates if c.eligible]
    if not eligible:
        if not any(c.fits for c in candidates):
            return None, "the model does not fit in any size considered"
        return None, "sizes that fit miss the constraints (see the reasons of each)"

    def value(c: Candidate) -> float:
        return _comparable(c.tokens_per_dollar)

    whole = [c for c in eligible if c.owns_one_socket]
    if whole:
        best = min(whole, key=lambda c: (c.instance.memory_gib, -value(c), -c.predicted_tg))
        return best, ("the smallest size that owns a whole socket and fits, most tokens per dollar among "
                      "equals: its bandwidth is not shared and it needs no NUMA placement")
    single = [c for c in eligible if not c.spans_sockets]
    if single:
        best = max(single, key=lambda c: (c.predicted_tg, value(c)))
        return best, ("no whole-socket size meets the constraints: the fastest part-socket size that does "
                      "(its bandwidth share is an assumption; measure it with the tuner)")
    best = max(eligible, key=lambda c: (c.predicted_tg, value(c)))
    return best, ("only sizes that span sockets fit and meet the constraints: the fastest one; run the tuner "
                  "so NUMA placement is set before trusting its speed")


def size_host(model: ModelDemand, workload: Workload, catalog: Catalog,
              assumptions: SizingAssumptions | None = None,
              constraints: Constraints | None = None) -> SizingReport:
    """Judge every admitted catalog size and recommend one (or none, with the reason)."""
    assumptions = (assumptions or SizingAssumptions()).validate()
    constraints = (constraints or Constraints()).validate(catalog)
    workload = workload.validate()
    budget = memory_budget(model, workload, assumptions)
    candidates = tuple(evaluate(size, model, workload, assumptions=assumptions, constraints=constraints,
                                budget=budget)
                       for size in catalog.sizes if constraints.admits(size))
    if not candidates:
        raise UserError("no catalog size matches the family/architecture filter",
                        f"use families among {', '.join(catalog.families)}")
    recommended, reason = _recommend(candidates)
    return SizingReport(model=model, workload=workload, assumptions=assumptions, constraints=constraints,
                        budget=budget, bytes_per_token=bytes_read_per_token(model, workload),
                        candidates=candidates, recommended=recommended, recommendation_reason=reason)


def require_recommendation(report: SizingReport) -> Candidate:
    """The recommended size, or a :class:`UserError` saying why there is none and what to change."""
    if report.recommended is not None:
        return report.recommended
    largest = max(report.candidates, key=lambda c: c.instance.memory_gib)
    if not any(c.fits for c in report.candidates):
        raise UserError(
            f"{report.model.name} needs {report.budget.total / GIB:.1f} GiB; the largest size considered, "
            f"{largest.name}, has {largest.instance.memory_gib} GiB",
            "use a smaller quantization, a shorter context or fewer parallel slots, a KV cache type such as "
            "q8_0, or split the model across hosts",
        )
    fitting = [c for c in report.candidates if c.fits]
    fastest = max(fitting, key=lambda c: c.predicted_tg)
    raise UserError(
        f"no size that fits {report.model.name} meets the constraints (fastest fitting: {fastest.name} at "
        f"{fastest.predicted_tg:.1f} tok/s, ${fastest.price_per_hour or 0:.2f}/h)",
        "raise the price cap, lower the minimum tokens per second, or allow more families",
    )


def require_fit(candidate: Candidate, model: ModelDemand) -> Candidate:
    """An explicitly chosen size must hold the model: refuse it with the numbers when it cannot."""
    if not candidate.fits:
        raise UserError(
            f"{candidate.name} has {candidate.instance.memory_gib} GiB but {model.name} needs "
            f"{candidate.memory_needed_bytes / GIB:.1f} GiB with this context and parallel slots",
            "choose a larger type (`llamahost size` ranks them) or leave the type unset so it is chosen "
            "for you",
        )
    return candidate

"""Sizing engine: which cloud host a model needs, and how fast it will generate there.

Pure logic over data (the instance catalog in ``catalog.yaml``) so both ``llamahost size`` and the Pulumi
program in ``infra/`` use the same answer. Nothing here talks to a cloud.
"""

from tuner.sizing.assumptions import SizingAssumptions
from tuner.sizing.catalog import Catalog, Family, InstanceSize, default_catalog, read_catalog
from tuner.sizing.demand import MemoryBudget, ModelDemand, Workload, demand_from_gguf
from tuner.sizing.ranking import (
    Candidate,
    Constraints,
    SizingReport,
    evaluate,
    require_fit,
    require_recommendation,
    size_host,
)

__all__ = [
    "Candidate",
    "Catalog",
    "Constraints",
    "Family",
    "InstanceSize",
    "MemoryBudget",
    "ModelDemand",
    "SizingAssumptions",
    "SizingReport",
    "Workload",
    "default_catalog",
    "demand_from_gguf",
    "evaluate",
    "read_catalog",
    "require_fit",
    "require_recommendation",
    "size_host",
]

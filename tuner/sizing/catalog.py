"""The instance catalog: AWS instance families and sizes as data, with the provenance of every figure.

The figures live in ``catalog.yaml`` next to this module so they can be reviewed and updated without
touching code. This module only parses and checks them: a group of figures without a known, dated source
is refused, and a socket bandwidth that does not equal channels x MT/s x 8 bytes is refused, because a
sizing answer is only as good as the numbers behind it.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from tuner.errors import UserError
from tuner.yamlfile import read_yaml_mapping

CATALOG_SCHEMA = 1
GIB = 1024**3
DERIVED_PRICE_SOURCE = "derived-linear-price"
SIZE_COLUMNS = ("size", "vcpus", "memory_gib", "ebs_max_mbps", "instance_store_gb")


@dataclass(frozen=True)
class Source:
    """Where a group of figures comes from, and when it was taken."""

    id: str
    title: str
    reference: str
    date: date

    def cite(self) -> str:
        return f"{self.id}, {self.date.isoformat()}"


@dataclass(frozen=True)
class Price:
    """On-demand USD per hour in one region; ``derived_from`` names the quoted size it was derived from."""

    usd_per_hour: float
    source: Source
    derived_from: str = ""


@dataclass(frozen=True)
class Family:
    """An instance family: one processor and one memory system, shared by all its sizes."""

    name: str
    description: str
    processor: str
    architecture: str
    isa: tuple[str, ...]
    cores_per_socket: int
    threads_per_core: int
    memory_channels: int
    memory_type: str
    transfer_mts: int
    bandwidth_per_socket_gbs: float
    valid_threads_per_core: tuple[int, ...]
    sources: Mapping[str, Source]

    @property
    def vcpus_per_socket(self) -> int:
        return self.cores_per_socket * self.threads_per_core

    @property
    def memory_label(self) -> str:
        return f"{self.memory_channels}ch {self.memory_type}-{self.transfer_mts}"

    @property
    def can_disable_smt(self) -> bool:
        """Whether SMT is on by default and CPU options can turn it off (threads_per_core=1)."""
        return self.threads_per_core > 1 and 1 in self.valid_threads_per_core


@dataclass(frozen=True)
class InstanceSize:
    """One instance type (``r7a.24xlarge``) and what follows from its family's socket layout."""

    name: str
    family: Family
    vcpus: int
    memory_gib: int
    ebs_max_mbps: int
    instance_store_gb: int
    source: Source
    prices: Mapping[str, Price] = field(default_factory=dict)

    @property
    def memory_bytes(self) -> int:
        return self.memory_gib * GIB

    @property
    def physical_cores(self) -> int:
        return self.vcpus // self.family.threads_per_core

    @property
    def socket_share(self) -> float:
        """How many sockets' worth of cores this size owns (0.25 for a quarter socket, 2.0 for two)."""
        return self.vcpus / self.family.vcpus_per_socket

    @property
    def sockets_spanned(self) -> int:
        """Sockets (and, on these families, NUMA nodes) the size's vCPUs are spread over."""
        return math.ceil(self.socket_share)

    @property
    def whole_sockets(self) -> bool:
        """True when the size owns every core of the sockets it spans (no neighbour shares them)."""
        return self.vcpus % self.family.vcpus_per_socket == 0

    @property
    def ebs_max_mbytes_per_second(self) -> float:
        return self.ebs_max_mbps / 8

    def price(self, region: str) -> Price | None:
        return self.prices.get(region)


@dataclass(frozen=True)
class Catalog:
    sources: Mapping[str, Source]
    families: Mapping[str, Family]
    sizes: tuple[InstanceSize, ...]

    def names(self) -> tuple[str, ...]:
        return tuple(size.name for size in self.sizes)

    def get(self, name: str) -> InstanceSize:
        """The size called ``name``, or a :class:`UserError` that suggests the closest known names."""
        for size in self.sizes:
            if size.name == name:
                return size
        close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(
            f"instance type {name!r} is not in llamahost's catalog",
            f"{hint}use one of the families {', '.join(self.families)} "
            "(`llamahost size` lists them), or add the type with sourced figures to "
            "tuner/sizing/catalog.yaml",
        )


class CatalogError(UserError):
    """The catalog file itself is wrong: a maintainer, not a user, has to fix it."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"instance catalog: {problem}", "fix tuner/sizing/catalog.yaml (see its header)")


def _require(mapping: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in mapping:
        raise CatalogError(f"{where} has no {key!r}")
    return mapping[key]


def _source_of(group: Mapping[str, Any], sources: Mapping[str, Source], where: str) -> Source:
    src = group.get("src")
    if not src:
        raise CatalogError(f"{where} names no source ('src')")
    if src not in sources:
        raise CatalogError(f"{where} names an unknown source {src!r}")
    return sources[src]


def _parse_sources(raw: Mapping[str, Any]) -> dict[str, Source]:
    sources: dict[str, Source] = {}
    for key, entry in raw.items():
        where = f"source {key!r}"
        raw_date = _require(entry, "date", where)
        try:
            when = date.fromisoformat(str(raw_date))
        except ValueError:
            raise CatalogError(f"{where} has a malformed date {raw_date!r} (use YYYY-MM-DD)") from None
        sources[key] = Source(id=key, title=str(_require(entry, "title", where)),
                              reference=str(_require(entry, "reference", where)), date=when)
    return sources


def _parse_family(name: str, raw: Mapping[str, Any], sources: Mapping[str, Source]) -> Family:
    where = f"family {name!r}"
    processor = _require(raw, "processor", where)
    memory = _require(raw, "memory", where)
    cpu_options = _require(raw, "cpu_options", where)
    groups = {"processor": processor, "memory": memory, "cpu_options": cpu_options}
    cited = {group: _source_of(value, sources, f"{where} {group}") for group, value in groups.items()}
    channels = int(_require(memory, "channels", where))
    mts = int(_require(memory, "transfer_mts", where))
    bandwidth = float(_require(memory, "bandwidth_gbs", where))
    expected = channels * mts * 8 / 1000
    if not math.isclose(bandwidth, expected, rel_tol=1e-6):
        raise CatalogError(f"{where}: bandwidth_gbs {bandwidth} is not channels x MT/s x 8 bytes "
                           f"= {expected:.1f}")
    threads = int(_require(processor, "threads_per_core", where))
    valid_threads = tuple(int(t) for t in _require(cpu_options, "valid_threads_per_core", where))
    if threads not in valid_threads:
        raise CatalogError(f"{where}: default threads_per_core {threads} is not among the valid ones "
                           f"{valid_threads}")
    return Family(
        name=name,
        description=str(raw.get("description", "")),
        processor=str(_require(processor, "name", where)),
        architecture=str(_require(processor, "architecture", where)),
        isa=tuple(str(x) for x in _require(processor, "isa", where)),
        cores_per_socket=int(_require(processor, "cores_per_socket", where)),
        threads_per_core=threads,
        memory_channels=channels,
        memory_type=str(_require(memory, "type", where)),
        transfer_mts=mts,
        bandwidth_per_socket_gbs=bandwidth,
        valid_threads_per_core=valid_threads,
        sources=cited,
    )


def _parse_sizes(family: Family, raw: Mapping[str, Any], columns: Sequence[str],
                 sources: Mapping[str, Source]) -> list[InstanceSize]:
    where = f"family {family.name!r} sizes"
    sizes_raw = _require(raw, "sizes", f"family {family.name!r}")
    source = _source_of(sizes_raw, sources, where)
    sizes: list[InstanceSize] = []
    for row in _require(sizes_raw, "rows", where):
        if len(row) != len(columns):
            raise CatalogError(f"{where}: row {row} has {len(row)} values for the {len(columns)} columns "
                               f"{', '.join(columns)}")
        values = dict(zip(columns, row, strict=True))
        vcpus = int(values["vcpus"])
        if vcpus % family.threads_per_core:
            raise CatalogError(f"{where}: {values['size']} has {vcpus} vCPUs, not a multiple of "
                               f"{family.threads_per_core} threads per core")
        sizes.append(InstanceSize(
            name=f"{family.name}.{values['size']}", family=family, vcpus=vcpus,
            memory_gib=int(values["memory_gib"]), ebs_max_mbps=int(values["ebs_max_mbps"]),
            instance_store_gb=int(values["instance_store_gb"]), source=source,
        ))
    return sizes


def _with_prices(family_sizes: list[InstanceSize], raw_prices: Mapping[str, Any],
                 sources: Mapping[str, Source], family: str) -> list[InstanceSize]:
    """Attach quoted prices, and derive the other sizes' prices linearly in vCPUs from the quoted one."""
    by_short = {size.name.split(".", 1)[1]: size for size in family_sizes}
    prices: dict[str, dict[str, Price]] = {size.name: {} for size in family_sizes}
    for region, quote in raw_prices.items():
        where = f"family {family!r} price for {region}"
        source = _source_of(quote, sources, where)
        anchor_name = str(_require(quote, "size", where))
        if anchor_name not in by_short:
            raise CatalogError(f"{where} quotes size {anchor_name!r}, which the family does not list")
        anchor = by_short[anchor_name]
        usd = float(_require(quote, "usd_per_hour", where))
        for size in family_sizes:
            if size is anchor:
                prices[size.name][region] = Price(usd, source)
            else:
                prices[size.name][region] = Price(round(usd * size.vcpus / anchor.vcpus, 4),
                                                  sources[DERIVED_PRICE_SOURCE], derived_from=anchor.name)
    return [replace(size, prices=prices[size.name]) for size in family_sizes]


def parse_catalog(data: Mapping[str, Any]) -> Catalog:
    """Build a :class:`Catalog` from the parsed YAML document, checking provenance and consistency."""
    if data.get("schema") != CATALOG_SCHEMA:
        raise CatalogError(f"schema {data.get('schema')!r} is not {CATALOG_SCHEMA}")
    sources = _parse_sources(_require(data, "sources", "the catalog"))
    if DERIVED_PRICE_SOURCE not in sources:
        raise CatalogError(f"source {DERIVED_PRICE_SOURCE!r} (for derived prices) is missing")
    columns = tuple(_require(data, "size_columns", "the catalog"))
    if set(columns) != set(SIZE_COLUMNS):
        raise CatalogError(f"size_columns must be {', '.join(SIZE_COLUMNS)} in any order")
    families: dict[str, Family] = {}
    sizes: list[InstanceSize] = []
    for name, raw in _require(data, "families", "the catalog").items():
        family = _parse_family(name, raw, sources)
        families[name] = family
        family_sizes = _parse_sizes(family, raw, columns, sources)
        sizes.extend(_with_prices(family_sizes, raw.get("prices", {}), sources, name))
    names = [size.name for size in sizes]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise CatalogError(f"sizes listed twice: {', '.join(duplicates)}")
    return Catalog(sources=sources, families=families, sizes=tuple(sizes))


def read_catalog(path: Path) -> Catalog:
    """Load a catalog file (a user's own, or the packaged one)."""
    data = read_yaml_mapping(path, what="catalog file", fix_missing="pass an existing catalog YAML file",
                             fix_shape="start from tuner/sizing/catalog.yaml")
    return parse_catalog(data)


@cache
def default_catalog() -> Catalog:
    """The catalog shipped with llamahost (``tuner/sizing/catalog.yaml``), parsed once per process."""
    with resources.as_file(resources.files("tuner.sizing") / "catalog.yaml") as path:
        return read_catalog(path)

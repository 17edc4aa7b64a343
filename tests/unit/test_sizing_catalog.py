"""The instance catalog: every figure sourced and dated, consistency checks that reject typos."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from tuner.errors import UserError
from tuner.sizing import default_catalog, read_catalog
from tuner.sizing.catalog import DERIVED_PRICE_SOURCE, CatalogError, parse_catalog

CATALOG_FILE = Path(__file__).parents[2] / "tuner" / "sizing" / "catalog.yaml"


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    data: dict[str, Any] = YAML(typ="safe").load(CATALOG_FILE.read_text())
    return data


def test_every_figure_group_names_a_dated_source() -> None:
    catalog = default_catalog()
    for family in catalog.families.values():
        assert set(family.sources) == {"processor", "memory", "cpu_options"}
        for source in family.sources.values():
            assert source.date.year >= 2026
    for size in catalog.sizes:
        assert size.source.id == "aws-instance-specs"
        assert "us-east-1" in size.prices
        assert size.prices["us-east-1"].source.date.isoformat() == "2026-07-20"


def test_anchor_prices_are_quoted_and_other_sizes_derived_linearly() -> None:
    catalog = default_catalog()
    quoted = {
        "c8g.24xlarge": 3.83,
        "r8g.24xlarge": 5.66,
        "c7a.24xlarge": 4.93,
        "r7a.24xlarge": 7.30,
        "r7i.24xlarge": 6.35,
        "x2idn.32xlarge": 13.34,
    }
    for name, usd in quoted.items():
        price = catalog.get(name).prices["us-east-1"]
        assert price.usd_per_hour == usd
        assert not price.derived_from
    derived = catalog.get("r7a.4xlarge").prices["us-east-1"]
    assert derived.derived_from == "r7a.24xlarge"
    assert derived.source.id == DERIVED_PRICE_SOURCE
    assert derived.usd_per_hour == pytest.approx(7.30 * 16 / 96, abs=1e-4)
    half = catalog.get("x2idn.16xlarge").prices["us-east-1"]
    assert half.usd_per_hour == pytest.approx(13.34 / 2, abs=1e-4)


@pytest.mark.parametrize(
    ("name", "sockets", "whole", "cores", "bandwidth"),
    [
        ("r7a.24xlarge", 1, True, 96, 460.8),
        ("r7a.48xlarge", 2, True, 192, 460.8),
        ("r7a.32xlarge", 2, False, 128, 460.8),  # 128 vCPUs over 96-core sockets
        ("r7i.24xlarge", 1, True, 48, 307.2),  # 96 vCPUs are 48 cores x 2 threads
        ("r8g.4xlarge", 1, False, 16, 537.6),
        ("x2idn.24xlarge", 2, False, 48, 204.8),  # 96 vCPUs over 64-vCPU sockets
        ("x2idn.16xlarge", 1, True, 32, 204.8),
    ],
)
def test_socket_layout_follows_from_family_data(
    name: str, sockets: int, whole: bool, cores: int, bandwidth: float
) -> None:
    size = default_catalog().get(name)
    assert size.sockets_spanned == sockets
    assert size.whole_sockets is whole
    assert size.physical_cores == cores
    assert size.family.bandwidth_per_socket_gbs == bandwidth


def test_smt_can_be_turned_off_only_where_aws_allows_it() -> None:
    families = default_catalog().families
    assert families["r7i"].can_disable_smt and families["x2idn"].can_disable_smt
    for name in ("r7a", "c7a", "r8g", "c8g"):  # already one thread per core, threads cannot be changed
        assert not families[name].can_disable_smt
        assert families[name].valid_threads_per_core == (1,)


def test_unknown_type_suggests_close_names() -> None:
    with pytest.raises(UserError, match=r"r7a\.24xlarge") as info:
        default_catalog().get("r7a.24xlrage")
    assert "not in llamahost's catalog" in str(info.value)


def _break(raw: dict[str, Any], path: list[Any], value: Any) -> dict[str, Any]:
    broken = copy.deepcopy(raw)
    target = broken
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return broken


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["families", "r7a", "memory", "src"], KeyError, "names no source"),
        (["families", "r7a", "memory", "src"], "nowhere", "unknown source 'nowhere'"),
        (["families", "r7a", "sizes", "src"], KeyError, "names no source"),
        (["families", "r7a", "prices", "us-east-1", "src"], KeyError, "names no source"),
        (["sources", "memory-spec", "date"], KeyError, "has no 'date'"),
        (["sources", "memory-spec", "date"], "last week", "malformed date"),
        (["families", "r7a", "memory", "bandwidth_gbs"], 480.0, "is not channels x MT/s x 8 bytes"),
        (["families", "r7i", "processor", "threads_per_core"], 4, "not among the valid ones"),
        (["families", "r7a", "prices", "us-east-1", "size"], "96xlarge", "does not list"),
        (["schema"], 2, "schema 2"),
    ],
)
def test_broken_catalogs_are_refused(raw: dict[str, Any], path: list[Any], value: Any, message: str) -> None:
    with pytest.raises(CatalogError, match=message):
        parse_catalog(_break(raw, path, value))


def test_a_row_with_missing_columns_is_refused(raw: dict[str, Any]) -> None:
    broken = copy.deepcopy(raw)
    broken["families"]["c7a"]["sizes"]["rows"][0] = ["large", 2, 4]
    with pytest.raises(CatalogError, match="has 3 values for the 5 columns"):
        parse_catalog(broken)


def test_a_user_catalog_file_is_read_and_bad_yaml_is_a_user_error(
    tmp_path: Path, raw: dict[str, Any]
) -> None:
    only_r7a = copy.deepcopy(raw)
    only_r7a["families"] = {"r7a": raw["families"]["r7a"]}
    good = tmp_path / "catalog.yaml"
    YAML(typ="safe").dump(only_r7a, good)
    assert {s.family.name for s in read_catalog(good).sizes} == {"r7a"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("families: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        read_catalog(bad)
    with pytest.raises(UserError, match="catalog file not found"):
        read_catalog(tmp_path / "missing.yaml")

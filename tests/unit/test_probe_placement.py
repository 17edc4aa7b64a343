"""CPU selection for trials (compact/scatter, SMT on/off) on every fixture topology."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuner.probe import Topology, max_threads, read_host, select_cpus
from tuner.probe.placement import PLACEMENT_MODES, core_order

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hosts"
NAMES = ("epyc-9654-2s-nps4", "xeon-8480-1s", "graviton3-64c", "epyc-kvm-2vcpu")


@pytest.fixture(scope="module")
def topologies() -> dict[str, Topology]:
    return {name: read_host(FIXTURES / name).topology for name in NAMES}


MAX_THREADS = {  # (smt off, smt on)
    "epyc-9654-2s-nps4": (192, 384),
    "xeon-8480-1s": (56, 112),
    "graviton3-64c": (64, 64),
    "epyc-kvm-2vcpu": (2, 2),
}


@pytest.mark.parametrize("name", NAMES)
def test_max_threads(topologies: dict[str, Topology], name: str) -> None:
    topo = topologies[name]
    assert (max_threads(topo, smt=False), max_threads(topo, smt=True)) == MAX_THREADS[name]


@pytest.mark.parametrize("placement", PLACEMENT_MODES)
@pytest.mark.parametrize("smt", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_every_placement_covers_the_host_without_repeats(
        topologies: dict[str, Topology], name: str, smt: bool, placement: str) -> None:
    topo = topologies[name]
    limit = max_threads(topo, smt)
    everything = select_cpus(topo, limit, smt=smt, placement=placement)  # type: ignore[arg-type]
    assert len(everything) == len(set(everything)) == limit
    expected = set(topo.logical_cpus) if smt else set(topo.primary_cpus())
    assert set(everything) == expected
    # each count is a prefix of the next: growing the thread count only adds CPUs
    for count in {1, 2, limit // 3 or 1, limit - 1 or 1}:
        assert select_cpus(topo, count, smt=smt, placement=placement) == everything[:count]  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot place"):
        select_cpus(topo, limit + 1, smt=smt, placement=placement)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot place"):
        select_cpus(topo, 0, smt=smt, placement=placement)  # type: ignore[arg-type]


def test_epyc_compact_fills_a_ccx_then_the_node_then_the_next_node(topologies: dict[str, Topology]) -> None:
    topo = topologies["epyc-9654-2s-nps4"]
    cpus = select_cpus(topo, 25, smt=False, placement="compact")
    assert cpus[:8] == tuple(range(8))  # one CCX (one L3)
    assert {topo.cpu(c).llc for c in cpus[:8]} == {0}
    assert cpus[8] == 8 and topo.cpu(8).llc == 1  # next CCX on node 0
    assert {topo.cpu(c).node for c in cpus[:24]} == {0}
    assert cpus[24] == 24 and topo.cpu(24).node == 1


def test_epyc_compact_with_smt_takes_both_siblings_first(topologies: dict[str, Topology]) -> None:
    topo = topologies["epyc-9654-2s-nps4"]
    assert select_cpus(topo, 5, smt=True, placement="compact") == (0, 192, 1, 193, 2)
    assert {topo.cpu(c).llc for c in select_cpus(topo, 16, smt=True, placement="compact")} == {0}


def test_epyc_scatter_round_robins_nodes_then_ccxs(topologies: dict[str, Topology]) -> None:
    topo = topologies["epyc-9654-2s-nps4"]
    cpus = select_cpus(topo, 25, smt=False, placement="scatter")
    assert cpus[:8] == (0, 24, 48, 72, 96, 120, 144, 168)  # first core of every node
    assert [topo.cpu(c).node for c in cpus[:8]] == list(range(8))
    assert cpus[8:16] == (8, 32, 56, 80, 104, 128, 152, 176)  # each node's second CCX
    assert cpus[16:24] == (16, 40, 64, 88, 112, 136, 160, 184)  # ... and third
    assert cpus[24] == 1  # back to node 0's first CCX
    assert len({topo.cpu(c).llc for c in cpus[:24]}) == 24
    assert select_cpus(topo, 4, smt=True, placement="scatter") == (0, 192, 24, 216)


def test_single_domain_hosts_place_identically(topologies: dict[str, Topology]) -> None:
    xeon = topologies["xeon-8480-1s"]
    assert select_cpus(xeon, 3, smt=True, placement="compact") == (0, 56, 1)
    for count in (1, 7, 56):
        assert select_cpus(xeon, count, smt=False, placement="compact") == tuple(range(count))
        assert select_cpus(xeon, count, smt=False, placement="scatter") == tuple(range(count))
    graviton = topologies["graviton3-64c"]
    assert select_cpus(graviton, 64, smt=True, placement="scatter") == tuple(range(64))
    assert select_cpus(topologies["epyc-kvm-2vcpu"], 2, smt=False, placement="scatter") == (0, 1)


def test_unknown_placement_is_rejected(topologies: dict[str, Topology]) -> None:
    with pytest.raises(ValueError, match="unknown placement"):
        core_order(topologies["xeon-8480-1s"], "diagonal")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown placement"):
        select_cpus(topologies["xeon-8480-1s"], 2, smt=False, placement="os")  # type: ignore[arg-type]

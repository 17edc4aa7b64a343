"""The fixture trees themselves: generated ones match their generator, recorded ones hold only what the
parsers read, and recording this machine is one call that reproduces what the live probe sees."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tuner.probe import HostProbe, read_host
from tuner.probe.files import RecordingHostFiles

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hosts"


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fixture_generator", FIXTURES / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def fixture_kind(root: Path) -> str:
    return str(json.loads((root / "FIXTURE.json").read_text())["kind"])


def test_committed_generated_trees_are_exactly_what_the_generator_writes(generator: ModuleType) -> None:
    for spec in generator.SPECS:
        committed = {rel: content.decode() for rel, content in tree(FIXTURES / spec.name).items()}
        assert committed == generator.render_fixture(spec), f"run: generate.py generate {spec.name}"


def test_generate_writes_a_tree_the_parsers_read(generator: ModuleType, tmp_path: Path) -> None:
    epyc = next(s for s in generator.SPECS if s.name == "epyc-9654-2s-nps4")
    small = dataclasses.replace(epyc, name="small-epyc", cores_per_socket=8, llc_per_socket=2)
    topo = read_host(generator.generate(small, tmp_path)).topology
    assert (len(topo.sockets), len(topo.nodes), topo.physical_core_count, len(topo.llc_domains)) == (2, 8, 16, 4)
    assert topo.nodes[1].cpus == (2, 3, 18, 19)  # 2 cores per quadrant, siblings 16 higher
    assert topo.cores()[topo.cpu(9).core] == (9, 25) and topo.cpu(9).socket == 1


def test_every_fixture_dir_is_declared_recorded_or_generated(generator: ModuleType) -> None:
    names = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    kinds = {name: fixture_kind(FIXTURES / name) for name in names}
    assert {n for n, k in kinds.items() if k == "generated"} == {s.name for s in generator.SPECS}
    assert "epyc-kvm-2vcpu" in {n for n, k in kinds.items() if k == "recorded"}
    assert set(kinds.values()) <= {"recorded", "generated"}


@pytest.mark.parametrize("name", [p.name for p in sorted(FIXTURES.iterdir())
                                  if p.is_dir() and (p / "FIXTURE.json").exists()
                                  and fixture_kind(p) == "recorded"])
def test_recorded_trees_hold_only_files_the_parsers_read(name: str) -> None:
    files = RecordingHostFiles(FIXTURES / name)
    read_host(files=files)
    present = {"/" + rel for rel in tree(FIXTURES / name) if rel != "FIXTURE.json"}
    assert present == files.files_read


def _without_moving_parts(probe: HostProbe) -> HostProbe:
    """Free memory and this process' identity change between two reads; the hardware does not."""
    topo = probe.topology
    nodes = tuple(dataclasses.replace(n, memory_free_bytes=0, memory_total_bytes=0) for n in topo.nodes)
    return dataclasses.replace(
        probe, topology=dataclasses.replace(topo, nodes=nodes), memory_available_bytes=0, warnings=(),
        kernel=dataclasses.replace(probe.kernel, hugepages_free={}))


def test_record_mode_reproduces_the_live_probe(generator: ModuleType, tmp_path: Path) -> None:
    recorded = generator.record("this-host", Path("/"), "test recording", tmp_path)
    assert fixture_kind(recorded) == "recorded"
    live, replay = read_host("/"), read_host(recorded)
    assert replay.fingerprint() == live.fingerprint()
    assert _without_moving_parts(replay) == _without_moving_parts(live)
    with pytest.raises(SystemExit, match="exists"):
        generator.record("this-host", Path("/"), "again", tmp_path)


@pytest.mark.parametrize("name", [p.name for p in sorted(FIXTURES.iterdir()) if (p / "FIXTURE.json").exists()])
def test_every_fixture_parses_into_a_consistent_topology(name: str) -> None:
    """Holds for any tree dropped in later, before anyone writes its expected counts."""
    probe = read_host(FIXTURES / name)
    topo = probe.topology
    assert sorted(c for n in topo.nodes for c in n.cpus) == sorted(topo.logical_cpus)
    assert all(topo.cpu(c).node == n.id for n in topo.nodes for c in n.cpus)
    for siblings in topo.cores().values():  # a core lives in one socket, node and LLC domain
        assert len({(topo.cpu(c).socket, topo.cpu(c).node, topo.cpu(c).llc) for c in siblings}) == 1
    assert all(len(n.distances) == len(topo.nodes) for n in topo.nodes)
    assert probe.memory_total_bytes > 0 and probe.architecture in ("x86_64", "aarch64")

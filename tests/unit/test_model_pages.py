"""Where a model's pages sit: when they are dropped, how they are dropped, and how /proc is read back.

The drop itself runs for real on this machine's page cache (a file on the checkout's disk, not /tmp, which may
be a tmpfs whose pages cannot be dropped); residency is read with util-linux's ``fincore``. The NUMA effect
(pages landing on the node a policy names) needs two nodes: tests/lab/test_live_systemd.py observes it.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tuner.config import RunConfig
from tuner.model.gguf_file import inspect_model
from tuner.model_pages import (
    cpus_allowed,
    evict_page_cache,
    evict_shell,
    mapped_pages,
    model_file_names,
    needs_page_reset,
    page_placement,
    page_reset_blocked,
    placement_problem,
    threads_status,
)
from tuner.model_pages import resident_bytes as counted_resident_bytes
from tuner.trial.protocol import TrialSpec
from tuner.trial.worker import WorkerError, model_pages_of

MODEL = "/srv/models/tiny.gguf"
NUMA_MAPS = f"""\
55d0c0a00000 bind:1 file=/usr/bin/llama-server mapped=300 N1=300 kernelpagesize_kB=4
55d0c1000000 bind:1 heap anon=40 dirty=40 N0=2 N1=38 kernelpagesize_kB=4
7f0a00000000 bind:1 file={MODEL} mapped=1500 mapmax=2 N1=1500 kernelpagesize_kB=4
7f0a10000000 bind:1 file={MODEL} mapped=20 N0=4 N1=16 kernelpagesize_kB=4
7ffc00000000 bind:1 stack anon=3 dirty=3 N1=3 kernelpagesize_kB=4
"""
BOUND = RunConfig(threads=2, threads_batch=2, cpus=(4, 6), placement="compact", memory_policy="bind")


def test_the_models_pages_are_summed_over_its_mappings_with_the_policy_they_run_under() -> None:
    mapped = mapped_pages(NUMA_MAPS, [MODEL])
    assert mapped is not None
    assert (mapped.policy, mapped.policy_nodes) == ("bind", (1,))
    assert dict(mapped.pages_per_node) == {1: 1516, 0: 4}
    assert mapped.nodes_used == (0, 1)
    assert mapped.to_dict() == {"policy": "bind", "policy_nodes": "1", "pages_per_node": {"0": 4, "1": 1516}}
    assert mapped_pages(NUMA_MAPS, ["/srv/models/other.gguf"]) is None
    assert mapped_pages(NUMA_MAPS, [f"{MODEL}.bak"]) is None, "a path is matched whole, not as a prefix"


@pytest.mark.parametrize(("field", "policy", "nodes"), [
    ("default", "default", ()),
    ("interleave:0-1", "interleave", (0, 1)),
    ("bind=static:0", "bind", (0,)),
    ("prefer:1", "prefer", (1,)),
])
def test_every_policy_spelling_of_the_kernel_is_read(field: str, policy: str, nodes: tuple[int, ...]) -> None:
    mapped = mapped_pages(f"7f0a00000000 {field} file={MODEL} mapped=8 N0=8 kernelpagesize_kB=4\n", [MODEL])
    assert mapped is not None and (mapped.policy, mapped.policy_nodes) == (policy, nodes)


def test_the_cpus_a_process_may_use_are_read_from_its_status() -> None:
    assert cpus_allowed("Name:\tllama-server\nCpus_allowed:\t50\nCpus_allowed_list:\t4,6\n") == (4, 6)
    assert cpus_allowed("Cpus_allowed_list:\t0-3\n") == (0, 1, 2, 3)
    assert cpus_allowed("Name:\tx\n") is None
    here = cpus_allowed(Path("/proc/self/status").read_text())
    assert here is not None and set(here) == os.sched_getaffinity(0)
    # every thread's status: strict placement narrows single threads, the main one included, to one CPU
    threads = "Name:\tllama-server\nCpus_allowed_list:\t4\n" + "Cpus_allowed_list:\t4,6\n" + "Cpus_allowed_list:\t6\n"
    assert cpus_allowed(threads) == (4, 6)
    assert cpus_allowed(threads_status(os.getpid())) == tuple(sorted(os.sched_getaffinity(0)))
    assert threads_status(2**22 + 1) == "", "a process that is gone has no threads"


def test_pages_are_dropped_only_on_a_numa_host_and_only_when_the_placement_changes() -> None:
    interleaved = RunConfig(threads=2, threads_batch=2, memory_policy="interleave")
    assert needs_page_reset(None, BOUND, multi_node=True), "nobody knows where the pages are: drop them"
    assert not needs_page_reset(page_placement(BOUND), BOUND, multi_node=True)
    assert needs_page_reset(page_placement(BOUND), interleaved, multi_node=True)
    more_threads = RunConfig(threads=1, threads_batch=1, cpus=(4, 6), placement="compact", memory_policy="bind")
    assert not needs_page_reset(page_placement(BOUND), more_threads, multi_node=True), "threads place no pages"
    assert not needs_page_reset(None, interleaved, multi_node=False), "one node: every page is local"


def test_a_placement_that_took_effect_has_no_problem() -> None:
    mapped = mapped_pages(NUMA_MAPS.replace("N0=4 N1=16", "N1=20"), [MODEL])
    assert placement_problem(BOUND, (1,), mapped, cpus_allowed=(4, 6), pages_placed=True) is None
    assert placement_problem(RunConfig(threads=1, threads_batch=1), (0, 1), None, cpus_allowed=(0, 1, 2),
                             pages_placed=False) is None, "unpinned, not mapped (--no-mmap): nothing to hold it to"


@pytest.mark.parametrize(("config", "nodes", "cpus", "placed", "problem"), [
    (BOUND, (1,), (0, 2, 4, 6), True, "the CPU mask 4,6 did not take effect: the server may run on CPUs 0,2,4,6"),
    (BOUND, (0,), (4, 6), True, "the memory policy bind on nodes 0 did not take effect: the server runs under bind "
                                "on nodes 1"),
    (BOUND, (1,), (4, 6), True, "4 of the model's pages sit on nodes 0 although memory is bound to nodes 1"),
    (RunConfig(threads=2, threads_batch=2), (0, 1), None, False,
     "the memory policy default did not take effect: the server runs under bind"),
])
def test_a_placement_that_did_not_take_effect_is_named(config: RunConfig, nodes: tuple[int, ...],
                                                         cpus: tuple[int, ...] | None, placed: bool,
                                                         problem: str) -> None:
    assert placement_problem(config, nodes, mapped_pages(NUMA_MAPS, [MODEL]), cpus_allowed=cpus,
                             pages_placed=placed) == problem


def test_stray_pages_of_a_bind_policy_are_no_problem_while_nobody_dropped_them() -> None:
    """Pages another process faulted in earlier stay where they are: only after a drop must all be bound."""
    assert placement_problem(BOUND, (1,), mapped_pages(NUMA_MAPS, [MODEL]), cpus_allowed=(4, 6),
                             pages_placed=False) is None


@pytest.fixture()
def cached_file() -> Iterator[Path]:
    """A 4 MiB file on the checkout's disk, written, synced (only clean pages can be dropped) and read back
    into the page cache."""
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as directory:
        path = Path(directory) / "model with space.gguf"
        with path.open("wb") as handle:
            handle.write(os.urandom(4 * 2**20))
            handle.flush()
            os.fsync(handle.fileno())
        path.read_bytes()
        yield path


def resident_bytes(path: Path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip())


def test_the_benchmark_drop_empties_the_page_cache_of_the_model(cached_file: Path) -> None:
    assert resident_bytes(cached_file) > 2**20
    evict_page_cache([cached_file])
    assert resident_bytes(cached_file) == 0


def test_the_hosts_drop_command_empties_the_page_cache_of_the_model(cached_file: Path) -> None:
    assert resident_bytes(cached_file) > 2**20
    subprocess.run(["sh", "-ec", evict_shell([str(cached_file)])], check=True)
    assert resident_bytes(cached_file) == 0


def test_residency_is_counted_like_fincore_does(cached_file: Path) -> None:
    assert counted_resident_bytes([cached_file]) == resident_bytes(cached_file) == 4 * 2**20
    evict_page_cache([cached_file])
    assert counted_resident_bytes([cached_file]) == 0


def test_a_model_that_another_process_maps_cannot_have_its_pages_put_back(cached_file: Path) -> None:
    assert page_reset_blocked([cached_file]) is None
    cached_file.read_bytes()
    holder = subprocess.Popen(  # maps the file and touches every page, as a running llama-server does
        [sys.executable, "-c", "import mmap, sys; f = open(sys.argv[1], 'rb'); m = mmap.mmap(f.fileno(), 0, "
         "prot=mmap.PROT_READ); sum(m[i] for i in range(0, len(m), 4096)); print('mapped', flush=True); "
         "sys.stdin.read()", str(cached_file)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "mapped"
        reason = page_reset_blocked([cached_file])
        assert reason is not None and "4 MiB of the model stay in the page cache" in reason
        assert "another process maps the model file" in reason
    finally:
        holder.communicate("")
    assert page_reset_blocked([cached_file]) is None


def test_a_models_shards_are_named_as_given_and_as_the_kernel_opened_them(tmp_path: Path) -> None:
    versioned = tmp_path / "model-v2.gguf"
    versioned.write_bytes(b"GGUF")
    (tmp_path / "model.gguf").symlink_to(versioned)
    assert model_file_names([tmp_path / "model.gguf", versioned]) == (str(tmp_path / "model.gguf"), str(versioned))


def test_a_benchmark_worker_reads_the_servers_mapping_of_the_model_and_refuses_a_policy_that_missed_it(
        tiny_split_model_path: Path) -> None:
    """The worker's read-back, on this test process standing in for llama-server: it maps the model's shards
    (as llama.cpp does), runs under the default policy, and so is not placed as a trial bound to node 0 says."""
    files = inspect_model(tiny_split_model_path).files
    spec = TrialSpec(model_path=str(tiny_split_model_path), config={}, objective="tg", server_binary="-")
    with contextlib.ExitStack() as stack:
        for path in files:
            handle = stack.enter_context(path.open("rb"))
            view = stack.enter_context(mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ))
            assert view[:4] == b"GGUF"  # fault a page in, so numa_maps counts it
        pages = model_pages_of(os.getpid(), spec, RunConfig(threads=1, threads_batch=1))
        assert pages is not None and pages.policy == "default" and sum(pages.pages_per_node.values()) >= len(files)
        bound = RunConfig(threads=1, threads_batch=1, memory_policy="bind", memory_nodes=(0,))
        with pytest.raises(WorkerError, match="the memory policy bind on nodes 0 did not take effect"):
            model_pages_of(os.getpid(), spec, bound)
    unmapped = model_pages_of(os.getpid(), spec, RunConfig(threads=1, threads_batch=1))
    assert unmapped is None, "unmapped: nothing to read back"

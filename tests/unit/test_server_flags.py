"""Parsing llama-server's --help and checking command lines against it (recorded help of the pinned build)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuner.config import RunConfig
from tuner.server.flags import FlagSpec, find_problems, parse_help

HELP = Path(__file__).resolve().parents[1] / "server" / "data" / "llama-server-help-0c1e57098.txt"


@pytest.fixture(scope="module")
def flags() -> dict[str, FlagSpec]:
    return parse_help(HELP.read_text())


def test_every_option_line_is_parsed(flags: dict[str, FlagSpec]) -> None:
    option_lines = [line for line in HELP.read_text().splitlines()
                    if line.startswith("-") and not line.startswith("-----")]
    assert len({id(spec) for spec in flags.values()}) == len(option_lines)
    assert flags["-t"] is flags["--threads"]
    assert flags["--threads"].value_hints == ("N",)


@pytest.mark.parametrize(("name", "hints", "choices"), [
    ("--flash-attn", ("[on|off|auto]",), ("on", "off", "auto")),
    ("--split-mode", ("{none,layer,row,tensor}",), ("none", "layer", "row", "tensor")),
    ("--cache-type-v", ("TYPE",), ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")),
    ("--load-mode", ("MODE",), ("auto", "none", "mmap", "mlock", "mmap+mlock", "dio")),
    ("--numa", ("TYPE",), ("distribute", "isolate", "numactl")),
    # bullets that leave out the documented default ("auto") are not a complete list: no choices
    ("--reasoning-format", ("FORMAT",), ()),
    # numbered bullets under a numeric hint describe levels, not the only values
    ("--verbosity", ("N",), ()),
    ("--control-vector-layer-range", ("START", "END"), ()),
    ("--override-tensor", ("<tensor name pattern>=<buffer type>,...",), ()),
    ("--tensor-split", ("N0,N1,N2,...",), ()),
    ("--device", ("<dev1,dev2,..>",), ()),
    ("--poll", ("<0...100>",), ()),
    ("--no-cont-batching", (), ()),
])
def test_value_hints_and_choices(
    flags: dict[str, FlagSpec], name: str, hints: tuple[str, ...], choices: tuple[str, ...]
) -> None:
    assert flags[name].value_hints == hints
    assert flags[name].choices == choices


def test_a_run_config_renders_only_known_flags(flags: dict[str, FlagSpec]) -> None:
    config = RunConfig(threads=4, threads_batch=8, numa="numactl", load_mode="mmap+mlock", flash_attn="on",
                       cache_type_k="q8_0", cache_type_v="q4_0", parallel=2, cont_batching=False)
    assert find_problems(flags, config.server_args()) == []


@pytest.mark.parametrize(("args", "problem"), [
    (["--mlock"], "unknown flag '--mlock'"),
    (["--no-mmap"], "unknown flag '--no-mmap'"),
    (["--flash-attn"], "--flash-attn needs 1 value(s)"),
    (["-fa", "yes"], "-fa 'yes' is not one of on, off, auto"),
    (["--load-mode", "hugepages"], "--load-mode 'hugepages' is not one of"),
    (["--cache-type-k", "q3_k"], "is not one of"),
    (["model.gguf"], "unexpected argument"),
    (["--control-vector-layer-range", "1"], "needs 2 value(s)"),
])
def test_problems_are_named(flags: dict[str, FlagSpec], args: list[str], problem: str) -> None:
    found = find_problems(flags, args)
    assert len(found) == 1 and problem in found[0]


def test_values_are_not_mistaken_for_flags(flags: dict[str, FlagSpec]) -> None:
    # a negative value and an underscore spelling (llama.cpp reads --ctx_size as --ctx-size)
    assert find_problems(flags, ["--keep", "-1", "--ctx_size", "512", "--control-vector-layer-range", "1", "4"]) == []

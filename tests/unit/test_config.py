"""RunConfig: validation, CPU lists, and the two renderings the server and the playbook consume."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tuner.config import RunConfig, parse_cpu_list
from tuner.cpu_lists import format_cpu_list
from tuner.errors import UserError


@given(st.sets(st.integers(min_value=0, max_value=512), max_size=64))
def test_cpu_list_round_trips(cpus: set[int]) -> None:
    assert parse_cpu_list(format_cpu_list(cpus)) == tuple(sorted(cpus))


def test_cpu_list_format_matches_the_kernel() -> None:
    assert format_cpu_list([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"
    assert parse_cpu_list("0-3, 8,10-11") == (0, 1, 2, 3, 8, 10, 11)
    assert parse_cpu_list("") == ()


@pytest.mark.parametrize("bad", ["0-", "a", "3-1", "-1", "1,,2"])
def test_malformed_cpu_list_is_a_user_error(bad: str) -> None:
    with pytest.raises(UserError, match="malformed CPU list"):
        parse_cpu_list(bad)


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"ubatch_size": 1024, "batch_size": 512}, "ubatch_size 1024 is larger"),
    ({"batch_size": 1, "ubatch_size": 1}, "batch_size 1 is below 2"),
    ({"batch_size": 2, "ubatch_size": 2, "parallel": 4}, "batch_size 2 is below 4"),
    ({"batch_size": 3, "ubatch_size": 1, "parallel": -1}, "batch_size 3 is below 4"),
    ({"threads": 4, "cpus": (0, 1), "placement": "compact"}, "oversubscribe"),
    ({"cache_type_v": "q8_0", "flash_attn": "off"}, "quantized V cache needs flash attention"),
    ({"numa": "distribute", "cpus": (0, 1), "placement": "compact"}, "cannot be combined with a CPU list"),
    ({"placement": "compact"}, "needs a CPU list"),
    ({"load_mode": "fast"}, "load_mode must be one of"),
])
def test_invalid_combinations_are_named(changes: dict[str, object], fragment: str) -> None:
    config = RunConfig(threads=2, threads_batch=2).with_changes(**changes)
    assert any(fragment in p for p in config.problems())
    with pytest.raises(UserError):
        config.validate()


def test_server_args_render_every_setting() -> None:
    config = RunConfig(threads=6, threads_batch=12, batch_size=1024, ubatch_size=256, numa="numactl",
                       load_mode="none", flash_attn="on", cache_type_k="q8_0", cache_type_v="q8_0",
                       parallel=4, cont_batching=False)
    args = config.server_args()
    pairs = dict(zip(args[::2], args[1::2], strict=False))
    assert pairs["--threads"] == "6"
    assert pairs["--threads-batch"] == "12"
    assert pairs["--batch-size"] == "1024"
    assert pairs["--ubatch-size"] == "256"
    assert "--numa" in args and args[args.index("--numa") + 1] == "numactl"
    assert args[args.index("--load-mode") + 1] == "none"
    assert "--no-cont-batching" in args


def test_defaults_render_no_numa_or_load_mode_flags() -> None:
    args = RunConfig(threads=4, threads_batch=4).server_args()
    assert "--numa" not in args
    assert "--load-mode" not in args


def test_role_vars_round_trip() -> None:
    config = RunConfig(threads=8, threads_batch=16, cpus=(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                       placement="compact", memory_policy="bind", memory_nodes=(0,), numa="numactl",
                       load_mode="mlock", flash_attn="off")
    variables = config.role_vars()
    assert variables["llama_server_cpus"] == "0-15"
    assert variables["llama_server_numa_policy"] == "bind"
    back = RunConfig.from_role_vars(variables)
    for name in ("threads", "threads_batch", "cpus", "memory_policy", "memory_nodes", "numa", "load_mode",
                 "flash_attn", "batch_size", "ubatch_size"):
        assert getattr(back, name) == getattr(config, name)


def test_dict_round_trip_and_unknown_keys() -> None:
    config = RunConfig(threads=3, threads_batch=3, cpus=(0, 2, 4), placement="scatter")
    assert RunConfig.from_dict(config.to_dict()) == config
    with pytest.raises(UserError, match="unknown configuration keys: colour"):
        RunConfig.from_dict({"threads": 1, "threads_batch": 1, "colour": "red"})


def test_role_variables_llama_server_cannot_run_are_refused_naming_their_file() -> None:
    variables = {"llama_server_threads": 1, "llama_server_batch_size": 1, "llama_server_ubatch_size": 1}
    with pytest.raises(UserError, match=r"the llama_server_\* settings in h1\.yml cannot run: batch_size 1 is below 2"
                       ) as refused:
        RunConfig.from_role_vars(variables, source="h1.yml")
    assert "correct them in h1.yml" in refused.value.fix
    assert RunConfig.from_role_vars({**variables, "llama_server_batch_size": 2}, source="h1.yml").batch_size == 2

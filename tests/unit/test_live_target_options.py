"""The live connections are built from typed options, not from the command line's namespace: what the
parser gives becomes :class:`TargetOptions`, and a connection refuses what does not fit it before any host
or file is touched."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuner.cli import build_parser
from tuner.errors import UserError
from tuner.live.control import TargetOptions
from tuner.live.local import DEFAULT_LOCAL_PORT
from tuner.live.setup import connection_from_args
from tuner.live.unit_connection import InventoryConnection, OnHostConnection


def test_the_command_lines_live_options_become_typed_values() -> None:
    args = build_parser().parse_args(["tune", "--live", "--inventory", "inv/hosts.yml", "--host", "h1", "--host-vars",
                                      "inv/host_vars/h1.yml", "--apply", "--deadman", "90s"])
    assert TargetOptions.from_args(args) == TargetOptions(
        local=False, port=DEFAULT_LOCAL_PORT, inventory=Path("inv/hosts.yml"), host="h1", model=None,
        baseline_vars=None, host_vars=Path("inv/host_vars/h1.yml"), apply=True, deadman="90s", max_server_memory=0.9)
    local = TargetOptions.from_args(build_parser().parse_args(["apply", "--local", "--port", "9000",
                                                               "--model", "m.gguf"]))
    assert local.local and local.port == 9000 and local.model == Path("m.gguf") and local.inventory is None


@pytest.mark.parametrize(("options", "problem"), [
    (TargetOptions(inventory=Path("/nonexistent/hosts.yml"), host="h1", baseline_vars=Path("b.yml")),
     "--baseline-vars is for --local and --unit runs"),
    (TargetOptions(inventory=Path("/nonexistent/hosts.yml"), host="h1", apply=True), "needs --host-vars"),
    (TargetOptions(host="h1"), "--inventory and --host go together"),
])
def test_a_remote_connection_refuses_options_that_do_not_fit_before_it_reads_the_inventory(
        options: TargetOptions, problem: str) -> None:
    with pytest.raises(UserError, match=problem):
        InventoryConnection(options)


@pytest.mark.parametrize(("options", "problem"), [
    (TargetOptions(unit="llama-server"), "needs --baseline-vars"),
    (TargetOptions(unit="llama-server", baseline_vars=Path("b.yml"), apply=True), "do not go with --unit"),
    (TargetOptions(unit="llama-server", baseline_vars=Path("b.yml"), model=Path("m.gguf")), "do not go with --unit"),
    (TargetOptions(unit="llama-server", baseline_vars=Path("/nonexistent/b.yml")), "--baseline-vars file"),
])
def test_an_on_host_connection_refuses_options_that_do_not_fit_before_it_touches_the_unit(
        options: TargetOptions, problem: str) -> None:
    with pytest.raises(UserError, match=problem):
        OnHostConnection(options)


@pytest.mark.parametrize("argv", [
    ["--local", "--unit", "llama-server"], ["--unit", "llama-server", "--inventory", "i.yml", "--host", "h1"], []])
def test_a_live_run_names_exactly_one_server(argv: list[str]) -> None:
    args = build_parser().parse_args(["apply", *argv])
    with pytest.raises(UserError, match="needs one of --local, --inventory FILE --host NAME, or --unit NAME"):
        connection_from_args(args)

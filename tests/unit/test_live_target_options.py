"""The live connections are built from typed options, not from the command line's namespace: what the
parser gives becomes :class:`TargetOptions`, and a connection refuses what does not fit it before any host
or file is touched."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest
from model_support import a_model

from tuner.cli import build_parser
from tuner.errors import UserError
from tuner.live.control import TargetOptions
from tuner.live.local import DEFAULT_LOCAL_PORT
from tuner.live.setup import connection_from_args
from tuner.live.systemd import SystemdServer
from tuner.live.unit_connection import InventoryConnection, OnHostConnection, describe_unit
from tuner.probe import read_host

HOST_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hosts"


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


class _NoServerRunning:
    """The one part of a unit's control that describe_unit asks before it reads the deployed settings."""

    def server_memory_bytes(self) -> int | None:
        return None


def test_deployed_settings_that_cannot_run_are_refused_naming_where_they_come_from() -> None:
    """On the host (playbooks/tune.yml) the settings come from the --baseline-vars file; from the controller,
    from the host's inventory variables: the refusal names the one the user reads."""
    probe = read_host(HOST_FIXTURES / "xeon-8480-1s")
    broken = {"llama_server_batch_size": 1, "llama_server_ubatch_size": 1}
    source = "/var/lib/llamahost/tune/run-1/role-vars.yml"
    with pytest.raises(UserError, match=r"settings in /var/lib/llamahost/tune/run-1/role-vars\.yml cannot run: "
                                        r"batch_size 1 is below 2") as refused:
        describe_unit(cast(SystemdServer, _NoServerRunning()), broken, a_model(1024**3), "ab" * 32, probe,
                      source=source)
    assert f"correct them in {source}" in refused.value.fix

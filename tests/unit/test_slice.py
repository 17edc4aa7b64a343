"""`--slice`: the pure parts of moving an on-host run into the server's slice, and its refusals.

Moving for real needs systemd as PID 1 and a partitioned host: tests/lab/test_live_systemd.py does it on the
lab (user.slice on CPU 0, the run lands in llama-server.slice on CPUs 2,4,6)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tuner.cli import main
from tuner.errors import UserError
from tuner.slice import ENTERED_ENV, cgroup_path, check_slice_name, in_slice, inference_cpus, slice_command


def test_the_cgroup_is_read_from_v2_and_from_v1_systemd_lines() -> None:
    session = "/user.slice/user-1000.slice/session-4.scope"
    assert cgroup_path(f"0::{session}\n") == session
    v1 = "12:cpuset:/\n1:name=systemd:/system.slice/ssh.service\n0::/\n"
    assert cgroup_path(v1) == "/system.slice/ssh.service"
    assert cgroup_path("") == "/"


def test_a_slice_is_matched_as_a_whole_path_component() -> None:
    assert in_slice("llama-server.slice", "/llama-server.slice/run-r1.scope")
    assert in_slice("user.slice", "/user.slice/user-1000.slice/session-4.scope")
    assert not in_slice("llama-server.slice", "/user.slice/user-1000.slice/session-4.scope")
    assert not in_slice("server.slice", "/llama-server.slice/run-r1.scope")


def test_the_inference_cpus_are_the_slices_less_the_housekeeping_ones() -> None:
    assert inference_cpus({0, 2, 4, 6}, {0}) == {2, 4, 6}
    assert inference_cpus({0, 1, 2, 3}, {0, 1, 2, 3}) == {0, 1, 2, 3}, "no partition: every CPU"
    assert inference_cpus({0, 1}, None) == {0, 1}, "no cpuset on system.slice: every CPU"


def test_the_run_starts_again_as_the_same_user_with_its_environment_through_sudo_unless_root() -> None:
    env = {"HOME": "/home/op", "LLAMAHOST_STORAGE": "postgresql://db/x", "PGPASSFILE": "/home/op/.pgpass",
           "SSH_AUTH_SOCK": "/tmp/agent", "PATH": "/usr/bin"}
    command = slice_command("llama-server.slice", ["/venv/bin/python", "-m", "tuner.cli", "fleet", "work"], uid=1000,
                            gid=1000, euid=1000, env=env)
    assert command[:3] == ["sudo", "-n", "systemd-run"]
    assert {"--scope", "--slice=llama-server.slice", "--uid=1000", "--gid=1000"} <= set(command)
    kept = {arg.removeprefix("--setenv=") for arg in command if arg.startswith("--setenv=")}
    assert kept == {"HOME=/home/op", "LLAMAHOST_STORAGE=postgresql://db/x", "PGPASSFILE=/home/op/.pgpass",
                    "PATH=/usr/bin", f"{ENTERED_ENV}=llama-server.slice"}, "no agent socket or other secrets"
    assert command[command.index("--") + 1:] == ["/venv/bin/python", "-m", "tuner.cli", "fleet", "work"]
    as_root = slice_command("llama-server.slice", ["x"], uid=0, gid=0, euid=0, env={})
    assert as_root[0] == "systemd-run"


@pytest.mark.parametrize("name", ["llama-server", "../x.slice", "a b.slice", ""])
def test_a_name_that_is_no_slice_is_refused(name: str) -> None:
    with pytest.raises(UserError, match="is not a slice unit name"):
        check_slice_name(name)


def test_slice_is_refused_with_a_reason_where_it_cannot_work(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)  # a machine without systemd-run
    monkeypatch.setenv("LLAMAHOST_HOME", str(tmp_path))
    assert main(["tune", "--slice", "llama-server.slice", "--budget", "5m"]) == 2
    assert "--slice llama-server.slice needs systemd" in capsys.readouterr().err
    assert main(["fleet", "work", "--slice", "llama-server", "--budget", "5m"]) == 2
    assert "is not a slice unit name" in capsys.readouterr().err
    assert main(["tune", "--live", "--local", "--slice", "llama-server.slice"]) == 2
    assert "--slice is for a run that measures on this host" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.db")), "nothing was opened"

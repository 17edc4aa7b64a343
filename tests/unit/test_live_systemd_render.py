"""The pure pieces of live tuning over systemd: inventory facts, the unit's command line, the trial
drop-in, the dead-man script and the remote probe's file list. The same code runs against the QEMU lab
in tests/lab/test_live_systemd.py; here it runs without a host."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import pytest
import yaml

from tuner.cli import build_parser, main
from tuner.config import RunConfig
from tuner.errors import UserError
from tuner.inventory import read_host_variables
from tuner.live.control import TargetOptions
from tuner.live.host_shell import LocalShell
from tuner.live.remote_probe import PROBE_COLLECTOR, PROBE_GLOBS, probe_from_files
from tuner.live.ssh import host_facts
from tuner.live.systemd import serving_cores
from tuner.live.unit import (
    DEADMAN_LOG,
    HEARTBEAT_FILE,
    ServerCommand,
    UnitSettings,
    dropin_path,
    exec_words,
    render_deadman_script,
    render_trial_dropin,
    server_command,
    split_exec_words,
)
from tuner.live.unit_connection import OnHostConnection
from tuner.model_pages import policy_nodes
from tuner.probe import read_host
from tuner.probe.files import RecordingHostFiles

REPO = Path(__file__).resolve().parents[2]
HOSTS = REPO / "tests" / "fixtures" / "hosts"
LAB_VARS: dict[str, Any] = {
    "ansible_host": "127.0.0.1", "ansible_port": 42217, "ansible_user": "lab",
    "ansible_ssh_private_key_file": "~/.cache/lab/id_ed25519",
    "ansible_ssh_common_args": "-o IdentitiesOnly=yes -o 'UserKnownHostsFile=/tmp/a b/known_hosts'",
    "llama_server_service_name": "llama-server",
}
TUNED = RunConfig(threads=2, threads_batch=2, batch_size=256, ubatch_size=128, cpus=(4, 6), placement="compact",
                  memory_policy="bind", load_mode="mmap+mlock", flash_attn="on", ctx_size=512)
ROLE_ARGV = ["/opt/llama-server/bin/llama-server", "--model", "/var/lib/llama-server/models/m 1%.gguf",
             "--host", "127.0.0.1", "--port", "8080", "--api-key-file", "/etc/llama-server/api-key",
             *TUNED.server_args(), "--metrics", "-c", "8192"]


def role_exec_filter() -> Any:
    path = REPO / "plugins" / "filter" / "systemd_exec.py"
    spec = importlib.util.spec_from_file_location("systemd_exec", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.systemd_exec_args


def role_unit(argv: list[str]) -> str:
    return f"[Unit]\nDescription=x\n[Service]\nType=exec\nExecStart={role_exec_filter()(argv)}\nRestart=on-failure\n"


def test_connection_facts_come_from_the_inventory_variables() -> None:
    facts = host_facts("lab", LAB_VARS)
    assert (facts.address, facts.port, facts.user) == ("127.0.0.1", 42217, "lab")
    assert facts.private_key == str(Path("~/.cache/lab/id_ed25519").expanduser())
    assert facts.ssh_args == ("-o", "IdentitiesOnly=yes", "-o", "UserKnownHostsFile=/tmp/a b/known_hosts")
    assert facts.needs_sudo
    assert UnitSettings.from_role_vars("lab", LAB_VARS) == UnitSettings("lab", "llama-server", 600)
    bare = host_facts("h1.example", {"ansible_user": "root", "llama_server_health_timeout": 30})
    assert (bare.address, bare.port, bare.needs_sudo) == ("h1.example", None, False)
    assert UnitSettings.from_role_vars("h1", {"llama_server_health_timeout": 30,
                                             "llama_server_service_name": "big"}) == UnitSettings("h1", "big", 30)


@pytest.mark.parametrize(("variables", "named"), [
    ({"ansible_connection": "amazon.aws.aws_ssm"}, "ansible_connection"),
    ({"ansible_host": "{{ lookup('env', 'HOST') }}"}, "ansible_host"),
])
def test_connections_the_tuner_cannot_use_are_refused(variables: dict[str, Any], named: str) -> None:
    with pytest.raises(UserError, match=named):
        host_facts("h1", variables)


def write_inventory(tmp_path: Path) -> Path:
    inventory = tmp_path / "inv" / "hosts.yml"
    inventory.parent.mkdir()
    inventory.write_text(yaml.safe_dump({"llama_hosts": {"hosts": {"h1": {"ansible_host": "10.0.0.5"}}}}))
    (inventory.parent / "group_vars").mkdir()
    (inventory.parent / "group_vars" / "llama_hosts.yml").write_text(yaml.safe_dump({"llama_server_port": 8181}))
    return inventory


def test_host_variables_are_read_with_ansible_inventory(tmp_path: Path) -> None:
    inventory = write_inventory(tmp_path)
    variables = read_host_variables(inventory, "h1")
    assert variables["ansible_host"] == "10.0.0.5" and variables["llama_server_port"] == 8181
    with pytest.raises(UserError, match="h2 is not in the inventory"):
        read_host_variables(inventory, "h2")
    with pytest.raises(UserError, match="does not exist"):
        read_host_variables(tmp_path / "nope.yml", "h1")


def test_cli_refuses_an_unknown_host_and_apply_without_host_vars(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    inventory = str(write_inventory(tmp_path))
    assert main(["tune", "--live", "--inventory", inventory, "--host", "h9", "--budget", "1h"]) == 2
    assert "h9 is not in the inventory" in capsys.readouterr().err
    assert main(["tune", "--live", "--inventory", inventory, "--host", "h1", "--budget", "1h", "--apply"]) == 2
    assert "--apply on an inventory host needs --host-vars" in capsys.readouterr().err


@pytest.mark.parametrize("args", [
    ["/bin/x", "--model", "/m/a b%.gguf", "$HOME", 'q"', "back\\slash", "50%%"],
    ROLE_ARGV,
])
def test_exec_start_words_round_trip_through_the_roles_quoting(args: list[str]) -> None:
    assert split_exec_words(role_exec_filter()(args)) == args
    assert exec_words(args) == role_exec_filter()(args)


def test_the_unit_command_keeps_address_model_key_and_extras_and_drops_the_tuned_flags() -> None:
    command = server_command(role_unit(ROLE_ARGV))
    assert command.kept == ("/opt/llama-server/bin/llama-server", "--model", "/var/lib/llama-server/models/m 1%.gguf",
                            "--host", "127.0.0.1", "--port", "8080", "--api-key-file", "/etc/llama-server/api-key",
                            "--metrics", "-c", "8192")
    trial = RunConfig(threads=1, threads_batch=2, parallel=4, cont_batching=False, ctx_size=2048, numa="distribute")
    argv = command.with_config(trial)
    assert argv[-len(trial.server_args()):] == trial.server_args()  # last: wins over "-c 8192"
    assert command.model == "/var/lib/llama-server/models/m 1%.gguf"
    assert command.listen == ("127.0.0.1", 8080) and command.api_key_file == "/etc/llama-server/api-key"
    assert ServerCommand(("/x/llama-server", "--model", "m", "--host", "0.0.0.0")).listen == ("127.0.0.1", 8080)


def test_a_unit_that_is_not_llama_server_is_refused() -> None:
    with pytest.raises(UserError, match="not llama-server"):
        server_command(role_unit(["/opt/llama-server/venv/bin/python", "-m", "llama_cpp.server"]))
    with pytest.raises(UserError, match="no ExecStart"):
        server_command("[Service]\nType=exec\n")


def test_the_trial_dropin_resets_exec_start_and_carries_placement() -> None:
    command = server_command(role_unit(ROLE_ARGV))
    text = render_trial_dropin(command, TUNED, (1,))
    lines = text.splitlines()
    assert lines.index("ExecStart=") < lines.index("[Service]") + 2
    exec_line = next(line for line in lines if line.startswith("ExecStart=/"))
    assert split_exec_words(exec_line.removeprefix("ExecStart=")) == command.with_config(TUNED)
    assert [line for line in lines if line.startswith(("CPUAffinity", "AllowedCPUs"))] == \
        ["CPUAffinity=", "AllowedCPUs=", "CPUAffinity=4,6", "AllowedCPUs=4,6"]
    assert "NUMAPolicy=bind" in lines and "LimitMEMLOCK=infinity" in lines
    # NUMAMask= adds up across unit and drop-in like CPUAffinity=: reset first, or node 1 + node 0 = "0-1"
    assert [line for line in lines if line.startswith("NUMAMask")] == ["NUMAMask=", "NUMAMask=1"]
    unpinned = render_trial_dropin(command, RunConfig(threads=2, threads_batch=2), ()).splitlines()
    assert "CPUAffinity=4,6" not in unpinned and "CPUAffinity=" in unpinned and "AllowedCPUs=" in unpinned
    assert "NUMAPolicy=default" in unpinned and "NUMAMask=" in unpinned
    assert not any(line.startswith("LimitMEMLOCK") for line in unpinned)
    assert dropin_path("llama-server") == "/run/systemd/system/llama-server.service.d/50-llamahost-trial.conf"


def test_a_trial_is_the_oom_killers_first_choice_and_capped_at_the_memory_guard() -> None:
    command = server_command(role_unit(ROLE_ARGV))
    capped = render_trial_dropin(command, TUNED, (1,), memory_max_bytes=57 * 2**30).splitlines()
    assert "OOMScoreAdjust=1000" in capped and f"MemoryMax={57 * 2**30}" in capped
    assert "MemoryMax=infinity" in render_trial_dropin(command, TUNED, (1,)).splitlines()


def test_the_policy_nodes_follow_the_role() -> None:
    topology = read_host(HOSTS / "epyc-9654-2s-nps4").topology
    bound = RunConfig(threads=1, threads_batch=1, memory_policy="bind", memory_nodes=(3,))
    assert policy_nodes(bound, topology) == (3,)
    pinned = RunConfig(threads=2, threads_batch=2, cpus=(0, 1), placement="compact", memory_policy="bind")
    assert policy_nodes(pinned, topology) == topology.nodes_of((0, 1))
    assert policy_nodes(RunConfig(threads=1, threads_batch=1, memory_policy="interleave"), topology) == \
        topology.node_ids
    assert serving_cores(topology, ()) == 192 and serving_cores(topology, (0, 1, 192)) == 2


def test_the_deadman_script_is_valid_shell_and_guards_the_right_files() -> None:
    script = render_deadman_script("llama-server", 60)
    subprocess.run(["sh", "-n"], input=script, text=True, check=True)
    assert f"heartbeat={HEARTBEAT_FILE}" in script and "limit=60" in script
    assert f"dropin={dropin_path('llama-server')}" in script and DEADMAN_LOG in script
    assert "systemctl restart llama-server.service" in script and "exit 0" in script
    assert "sleep 5" in script and "sleep 1" in render_deadman_script("x", 4)


def test_every_file_the_probe_parsers_read_is_collected() -> None:
    """The globs cover what the parsers read on this machine and on every fixture (/proc/self aside)."""
    recorder = RecordingHostFiles("/")
    read_host(files=recorder)
    read_paths = set(recorder.files_read)
    for fixture in HOSTS.iterdir():
        if fixture.is_dir():
            read_paths |= {"/" + str(p.relative_to(fixture)) for p in fixture.rglob("*") if p.is_file()
                           and p.name != "FIXTURE.json"}
    missed = sorted(p for p in read_paths if not p.startswith("/proc/self/")
                    and not any(fnmatchcase(p, g) for g in PROBE_GLOBS))
    assert missed == []


def test_the_remote_probe_sees_what_a_local_probe_sees() -> None:
    """The collector runs with a plain python3 (as on the host) over this machine's real files."""
    done = subprocess.run([sys.executable, "-I", "-c", PROBE_COLLECTOR, json.dumps(PROBE_GLOBS)],
                          capture_output=True, text=True, check=True, timeout=60)
    remote = probe_from_files(json.loads(done.stdout))
    local = read_host("/")
    assert remote.topology.cpus == local.topology.cpus  # free memory moves between the two reads; the rest not
    assert [(n.id, n.cpus, n.memory_total_bytes, n.distances) for n in remote.topology.nodes] == \
        [(n.id, n.cpus, n.memory_total_bytes, n.distances) for n in local.topology.nodes]
    assert (remote.hostname, remote.cpu_model, remote.isa) == (local.hostname, local.cpu_model, local.isa)
    assert remote.memory_total_bytes == local.memory_total_bytes
    assert remote.kernel.can_lock_memory and remote.kernel.memlock_limit_bytes is None  # systemd's limits
    assert remote.allowed_cpus is None
    assert remote.fingerprint() == local.fingerprint()


def run_tune_playbook(inventory: Path, *extra: str, first_on_path: Path | None = None
                      ) -> subprocess.CompletedProcess[str]:
    path = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    env = {"PATH": f"{first_on_path}:{path}" if first_on_path else path, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
           "ANSIBLE_NOCOLOR": "1", "HOME": str(inventory.parent)}
    return subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory),
                           str(REPO / "playbooks" / "tune.yml"), *extra], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


def test_the_tune_playbook_needs_a_budget_and_tries_every_host_when_some_cannot_be_reached(tmp_path: Path) -> None:
    inventory = tmp_path / "hosts.yml"
    unreachable = {"ansible_host": "127.0.0.1", "ansible_port": 9, "ansible_user": "root"}
    inventory.write_text(yaml.safe_dump({"llama_hosts": {"hosts": {"h1": unreachable, "h2": unreachable}}}))
    missing = run_tune_playbook(inventory)
    assert missing.returncode != 0 and "-e tune_budget=8h" in missing.stdout
    unreadable = run_tune_playbook(inventory, "-e", "tune_budget=overnight")
    assert unreadable.returncode != 0 and "got overnight" in unreadable.stdout
    lost = run_tune_playbook(inventory, "-e", "tune_budget=1h", "-e", "tune_install=false")
    assert lost.returncode != 0
    assert "fatal: [h1]: UNREACHABLE" in lost.stdout and "fatal: [h2]: UNREACHABLE" in lost.stdout, \
        "all hosts tune at once: one lost host does not stop the others"
    assert not (tmp_path / "host_vars").exists(), "nothing is written for a host without a result"


# systemd's commands as tune.yml calls them, for a machine without systemd as PID 1: no unit is running, and
# systemd-run records the command it was asked to start (one word per line) instead of starting it.
FAKE_SYSTEMD = """#!/bin/sh
case "$(basename "$0")" in
  systemd-run) printf '%s\\n' "$@" > "{log}/started-$(date +%s%N)"; exit 0 ;;
  systemctl) [ "$1" = is-active ] && { [ "$2" = -q ] || echo inactive; exit 3; }; exit 0 ;;
esac
exit 0
"""


def started_commands(tmp_path: Path, **settings: Any) -> list[list[str]]:
    """The argv of every tuner tune.yml started on a local host with ``settings`` as extra vars (its own tune
    home under ``tmp_path``; nothing started really runs, so each run ends as FAILED without a result)."""
    fakes, log = tmp_path / "fake-bin", tmp_path / "started"
    if not fakes.exists():
        fakes.mkdir()
        log.mkdir()
        (fakes / "systemd").write_text(FAKE_SYSTEMD.replace("{log}", str(log)))
        (fakes / "systemd").chmod(0o755)
        for name in ("systemd-run", "systemctl", "journalctl"):
            (fakes / name).symlink_to(fakes / "systemd")
        local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable, "ansible_become": False}
        (tmp_path / "hosts.yml").write_text(yaml.safe_dump({"llama_hosts": {"hosts": {"h1": local}}}))
    extra = {"tune_budget": "1h", "tune_install": False, "tune_rollout": False, "tune_wait_poll_s": 1,
             "tune_home": str(tmp_path / "tune"), **settings}
    done = run_tune_playbook(tmp_path / "hosts.yml", "-e", json.dumps(extra), first_on_path=fakes)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "h1: FAILED" in done.stdout, "nothing ran, so there is no result"
    return [path.read_text().splitlines() for path in sorted(log.iterdir())]


def flag_values(argv: list[str], *flags: str) -> dict[str, str]:
    return {flag: argv[argv.index(flag) + 1] for flag in flags if flag in argv}


def tuner_arguments(started: list[str]) -> list[str]:
    """What the tuner systemd-run started reads: its arguments file (``@FILE``), as the tuner's own parser
    expands it; the file holds the run's settings, so it may be read by root alone."""
    at_file = Path(started[started.index("--") + 2].removeprefix("@"))
    assert started[started.index("--") + 2:] == [f"@{at_file}"], "systemd sees nothing but the file's name"
    assert at_file.stat().st_mode & 0o777 == 0o600
    return [started[started.index("--") + 1], *at_file.read_text().splitlines()]


def test_without_an_install_the_host_s_llamahost_runs_unless_the_inventory_names_one(tmp_path: Path) -> None:
    """tune.yml takes its command from playbooks/vars/tuner_command.yml, as tune_fleet.yml does: with
    tune_install=false, `llamahost` on the host's PATH (the role's link from an earlier install, or a pip
    install), and tune_llamahost_command wherever it is given. (With an install, the installed release's own
    path: tests/fleet/test_fleet_playbook.py and the lab's tune.yml test run that one.)"""
    for name in ("default", "named"):
        (tmp_path / name).mkdir()
    default = started_commands(tmp_path / "default")
    named = started_commands(tmp_path / "named", tune_llamahost_command="/srv/llamahost/bin/llamahost")
    assert [argv[argv.index("--") + 1] for argv in default] == ["llamahost"], default
    assert [argv[argv.index("--") + 1] for argv in named] == ["/srv/llamahost/bin/llamahost"], named


def test_drain_undrain_and_the_restart_cap_reach_the_tuner_on_the_host_and_make_another_run(tmp_path: Path) -> None:
    """The hooks reach the tuner as written, through its arguments file: not on a command line (a hook URL's
    token would be in every process list and in the unit) and never seen by systemd, which would expand a hook's
    own ${LLAMAHOST_HOOK} when it starts the tuner instead of leaving it to the hook's shell."""
    hooks = {"tune_drain": 'curl -fsS -X POST "http://lb.internal/${LLAMAHOST_HOOK}/h1?pid=$$" -H \'X: a\\b\'',
             "tune_undrain": "https://lb.internal/up/h1?token=s3cret", "tune_hook_timeout": "20s",
             "tune_max_restarts_per_hour": 6}
    flags = ("--drain", "--undrain", "--hook-timeout", "--max-restarts-per-hour")
    plain, = started_commands(tmp_path)
    assert flag_values(tuner_arguments(plain), *flags) == {}
    first, hooked = started_commands(tmp_path, **hooks)
    assert first == plain
    assert not any("lb.internal" in arg for arg in hooked)
    tuner = tuner_arguments(hooked)
    assert tuner[1:4] == ["tune", "--live", "--unit"], "the hooks run with the tuner, on the host"
    assert flag_values(tuner, *flags) == {"--drain": hooks["tune_drain"], "--undrain": hooks["tune_undrain"],
                                          "--hook-timeout": "20s", "--max-restarts-per-hour": "6"}
    parsed = build_parser().parse_args(hooked[hooked.index("--") + 2:])
    assert (parsed.drain, parsed.undrain) == (hooks["tune_drain"], hooks["tune_undrain"])
    assert flag_values(tuner, "--study") != flag_values(tuner_arguments(plain), "--study"), \
        "other hooks make another run"


def test_a_hook_on_two_lines_is_refused_before_anything_starts(tmp_path: Path) -> None:
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump({"llama_hosts": {"hosts": {"h1": {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable, "ansible_become": False}}}}))
    done = run_tune_playbook(tmp_path / "hosts.yml", "-e", json.dumps(
        {"tune_budget": "1h", "tune_install": False, "tune_drain": "lbctl drain\nlbctl wait"}))
    assert done.returncode != 0 and "one line each" in done.stdout, done.stdout[-2000:]


# What the playbook may use: modules that act through Ansible's connection, and on the controller only llamahost's
# write-back and rollout (which run ansible-playbook, so the same connection).
CONNECTION_MODULES = {"ansible.builtin.assert", "ansible.builtin.include_role", "ansible.builtin.file",
                      "ansible.builtin.copy", "ansible.builtin.shell", "ansible.builtin.command",
                      "ansible.builtin.set_fact", "ansible.builtin.debug", "ansible.builtin.stat",
                      "ansible.builtin.find"}


def playbook_tasks(path: Path) -> list[dict[str, Any]]:
    """Every task of the playbook's plays, a block's own tasks after the block."""
    def flat(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [each for task in tasks for each in (task, *flat(task.get("block", [])))]
    return [task for play in yaml.safe_load(path.read_text()) for task in flat(play.get("tasks", []))]


def test_the_tune_playbook_reaches_the_hosts_only_through_ansibles_own_connection() -> None:
    """No ssh, no port forward, no --inventory/--host run from the controller: the tuner runs on the host
    (`--unit`), started and read through the connection Ansible has (SSH, SSM or local alike)."""
    tasks = [*playbook_tasks(REPO / "playbooks" / "tune.yml"),
             *yaml.safe_load((REPO / "roles" / "llamahost_tuner" / "tasks" / "main.yml").read_text())]
    used = {key for task in tasks for key in task if key.startswith("ansible.")}
    assert used <= CONNECTION_MODULES, used - CONNECTION_MODULES
    text = (REPO / "playbooks" / "tune.yml").read_text()
    assert "ssh" not in text.replace("SSH, amazon.aws.aws_ssm", "") and "forward" not in text
    arguments = next(task for task in tasks if task["name"].startswith("Write the tuner's arguments"))
    argv = arguments["ansible.builtin.copy"]["content"]
    assert "'--unit'" in argv and "'--inventory'" not in argv and "'--host'" not in argv
    start = next(task for task in tasks if task["name"] == "Start the tuner on the host as a transient unit")
    assert "delegate_to" not in arguments and "delegate_to" not in start
    delegated = [str(task.get("ansible.builtin.command", {}).get("argv")) for task in tasks
                 if task.get("delegate_to") == "localhost" and "ansible.builtin.command" in task]
    assert len(delegated) == 2 and "write-back" in delegated[0] and "'rollout'" in delegated[1], delegated


def test_on_the_host_the_unit_is_driven_through_a_local_shell_and_its_own_address(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tripwire = tmp_path / "bin" / "ssh"
    tripwire.parent.mkdir()
    tripwire.write_text("#!/bin/sh\necho ssh was called >&2\nexit 99\n")
    tripwire.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tripwire.parent}:{os.environ['PATH']}")
    role_vars = tmp_path / "role-vars.yml"
    role_vars.write_text("llama_server_health_timeout: 30\nllama_server_service_name: other\n")
    connection = OnHostConnection(TargetOptions(unit="big.service", baseline_vars=role_vars))
    shell = connection.control.shell
    assert isinstance(shell, LocalShell)
    assert (connection.control.service, connection.control.settings.health_timeout_s) == ("big", 30)
    assert shell.reach("127.0.0.1", 8080) == ("127.0.0.1", 8080), "no port forward: the server's own address"
    assert shell.run("echo ran here", root=False).stdout.strip() == "ran here"

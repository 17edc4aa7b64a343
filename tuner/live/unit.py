"""What live tuning writes on a host and reads from its unit, as text (pure: no I/O here).

The host was prepared by the ``llama_server`` role: a hardened unit (default ``llama-server.service``). Every change
a live run makes lives under ``/run`` only, so a reboot forgets it; the role's unit file and ``/etc`` are never
touched:

``/run/systemd/system/<unit>.service.d/50-llamahost-trial.conf``
    the trial: an ``ExecStart=`` reset and a new ``ExecStart=`` that keeps the role's binary, model,
    address and key file and carries the trial's flags, plus its CPU placement and memory policy;
``/run/llamahost/heartbeat``
    written by the tuner: the host's seconds since boot (:mod:`tuner.live.heartbeat`). A transient unit
    ``llamahost-deadman`` (``systemd-run``) removes the trial, reloads and restarts the unit on its
    baseline when the heartbeat is older than the dead-man limit;
``/run/lock/llamahost-measure.lock``
    the host's measuring lock (:mod:`tuner.host_lock`), the one a benchmark ``tune`` or a fleet worker on the
    host takes too: ``flock``-ed by a shell the tuner keeps open for the whole run (over SSH, or on the host
    itself). When the tuner dies, its end of that shell's stdin closes, ``cat`` exits and the kernel drops the lock.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.config import SERVER_ENVIRONMENT_NAMES, RunConfig
from tuner.cpu_lists import format_cpu_list
from tuner.errors import UserError
from tuner.host_lock import LOCK_NAME, SYSTEM_LOCK_DIRS
from tuner.live.heartbeat import SHELL_WRITE
from tuner.server.process import OOM_VICTIM_SCORE_ADJ

DROPIN_NAME = "50-llamahost-trial.conf"
STATE_DIR = "/run/llamahost"
HEARTBEAT_FILE = f"{STATE_DIR}/heartbeat"
LOCK_FILE = str(SYSTEM_LOCK_DIRS[0] / LOCK_NAME)  # the host's measuring lock: one measuring run per host
DEADMAN_UNIT = "llamahost-deadman"
DEADMAN_SCRIPT = f"{STATE_DIR}/deadman.sh"
DEADMAN_LOG = f"{STATE_DIR}/deadman.log"
DEFAULT_SERVICE = "llama-server"
DEFAULT_HEALTH_TIMEOUT_S = 600.0
LOCK_REFUSED_RC = 75

JOURNAL_LINES = 30

_PLAIN_WORD = re.compile(r"^[A-Za-z0-9_./:=+,@-]+$")  # needs no quotes in ExecStart= (as the role's filter)

# The flags RunConfig.server_args() renders, with the number of values each takes. A trial's command is
# the unit's command without these, followed by the trial's own.
TUNED_FLAGS: dict[str, int] = {
    "--threads": 1, "--threads-batch": 1, "--batch-size": 1, "--ubatch-size": 1, "--flash-attn": 1,
    "--cache-type-k": 1, "--cache-type-v": 1, "--parallel": 1, "--cont-batching": 0, "--no-cont-batching": 0,
    "--ctx-size": 1, "--numa": 1, "--load-mode": 1, "--no-repack": 0, "--repack": 0, "-nr": 0,
    "--cpu-mask": 1, "-C": 1, "--cpu-strict": 1,
}


def remote_lock_script(owner: str, lock_file: str = LOCK_FILE) -> str:
    """Shell that takes the host's measuring lock without waiting and holds it until its stdin closes.

    The lock is :mod:`tuner.host_lock`'s file, so a live run over SSH, a benchmark tune and a fleet worker on the
    host refuse each other; like that module it leaves the file open to every user and names its holder in it.
    Prints ``locked``, or ``busy`` and the holder, then exits with :data:`LOCK_REFUSED_RC`."""
    lock = shlex.quote(lock_file)
    return (f"mkdir -p {shlex.quote(str(Path(lock_file).parent))}; exec 9>>{lock}; chmod 0666 {lock} 2>/dev/null\n"
            f"if flock -n 9; then printf '%s\\n' {shlex.quote(owner)} > {lock}; echo locked; exec cat >/dev/null\n"
            f"else echo busy; cat {lock} 2>/dev/null; exit {LOCK_REFUSED_RC}; fi\n")


@dataclass(frozen=True)
class UnitSettings:
    """The unit a live run tunes and how long it may take to come up, from the role's variables."""

    host: str  # the host as messages name it
    service: str = DEFAULT_SERVICE
    health_timeout_s: float = DEFAULT_HEALTH_TIMEOUT_S

    @classmethod
    def from_role_vars(cls, host: str, variables: Mapping[str, Any]) -> UnitSettings:
        timeout = variables.get("llama_server_health_timeout")
        return cls(host=host, service=str(variables.get("llama_server_service_name") or DEFAULT_SERVICE),
                   health_timeout_s=float(timeout) if timeout is not None else DEFAULT_HEALTH_TIMEOUT_S)


# ---- the unit's command line (pure) ---------------------------------------------------------------

def split_exec_words(line: str) -> list[str]:
    """An ``ExecStart=`` value -> arguments, as systemd splits it (quotes, backslash escapes, ``%%``/``$$``)."""
    words = shlex.split(line, posix=True)
    return [word.replace("%%", "%").replace("$$", "$") for word in words]


def exec_words(args: Sequence[str]) -> str:
    """Arguments -> an ``ExecStart=`` value: systemd expands ``%`` and ``$`` and splits on blanks, so
    both are doubled and any argument that is not plainly safe is double-quoted."""
    out = []
    for arg in args:
        escaped = arg.replace("%", "%%").replace("$", "$$")
        if not _PLAIN_WORD.match(escaped):
            escaped = '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'
        out.append(escaped)
    return " ".join(out)


def unit_exec_start(unit_text: str) -> list[str]:
    """The (last) ``ExecStart=`` of a unit file, as arguments."""
    found: list[str] | None = None
    for raw in unit_text.splitlines():
        line = raw.strip()
        if line.startswith("ExecStart="):
            value = line.removeprefix("ExecStart=").strip()
            found = split_exec_words(value.lstrip("-@:+!")) if value else None
    if not found:
        raise UserError("the unit file has no ExecStart= line", "converge the host with playbooks/site.yml first")
    return found


@dataclass(frozen=True)
class ServerCommand:
    """The role's llama-server command line, split into what a trial keeps and what it replaces."""

    argv: tuple[str, ...]

    def _value(self, flag: str) -> str | None:
        for index, word in enumerate(self.argv[:-1]):
            if word == flag:
                return self.argv[index + 1]
        return None

    @property
    def kept(self) -> tuple[str, ...]:
        """Everything but the tuned flags: binary, model, address, key file, the role's extra args."""
        out: list[str] = []
        skip = 0
        for word in self.argv:
            if skip:
                skip -= 1
            elif word in TUNED_FLAGS:
                skip = TUNED_FLAGS[word]
            else:
                out.append(word)
        return tuple(out)

    def with_config(self, config: RunConfig) -> list[str]:
        """The trial's command: its flags come last, so they win over any alias in the extra args."""
        return [*self.kept, *config.server_args()]

    @property
    def model(self) -> str:
        model = self._value("--model") or self._value("-m")
        if model is None:
            raise UserError("the unit's command has no --model", "converge the host with playbooks/site.yml")
        return model

    @property
    def listen(self) -> tuple[str, int]:
        host = self._value("--host") or "127.0.0.1"
        return ("127.0.0.1" if host in ("0.0.0.0", "::", "localhost") else host), int(self._value("--port") or 8080)

    @property
    def api_key_file(self) -> str | None:
        return self._value("--api-key-file")


def server_command(unit_text: str) -> ServerCommand:
    argv = unit_exec_start(unit_text)
    if not Path(argv[0]).name.startswith("llama-server"):
        raise UserError(f"the unit runs {argv[0]}, not llama-server",
                        "live tuning needs llama_server_install_mode binary or source (llama.cpp's server)")
    return ServerCommand(tuple(argv))


def render_trial_dropin(command: ServerCommand, config: RunConfig, mask: tuple[int, ...],
                        memory_max_bytes: int | None = None) -> str:
    """The transient drop-in that makes the unit run ``config`` (placement included) until removed.

    A trial is contained: the out-of-memory killer takes it first (``OOMScoreAdjust=1000``), and with
    ``memory_max_bytes`` (the memory guard's limit) its cgroup is capped, so a trial that grows past the
    limit is reclaimed or killed inside its own unit instead of pushing sshd or a neighbour out."""
    cpus = format_cpu_list(config.cpus)
    lines = [
        "# llamahost live tuning: a trial configuration. Transient (under /run); the tuner or its dead-man",
        "# switch removes it, and a reboot forgets it.",
        "[Service]",
        "ExecStart=",
        f"ExecStart={exec_words(command.with_config(config))}",
        f"OOMScoreAdjust={OOM_VICTIM_SCORE_ADJ}",
        f"MemoryMax={memory_max_bytes if memory_max_bytes else 'infinity'}",
        # An empty assignment resets what the role's unit set; then the trial's value, if any.
        "CPUAffinity=",
        "AllowedCPUs=",
    ]
    if cpus:
        lines += [f"CPUAffinity={cpus}", f"AllowedCPUs={cpus}"]
    # NUMAMask= is a list that adds up like CPUAffinity=: without the empty assignment, a trial's mask would
    # join the role's (node 1 and a trial's node 0 became "bind on 0-1", read back on the lab).
    lines += [f"NUMAPolicy={config.memory_policy}", "NUMAMask="]
    if config.memory_policy != "default":
        lines.append(f"NUMAMask={format_cpu_list(mask)}")
    if config.load_mode in ("mlock", "mmap+mlock"):
        lines.append("LimitMEMLOCK=infinity")
    # The trial's environment replaces what the role's unit set for the same variables: an assignment
    # overrides the unit's, and a variable the trial leaves unset is removed.
    environment = config.server_environment()
    for name in SERVER_ENVIRONMENT_NAMES:
        lines.append(f"Environment={name}={environment[name]}" if name in environment
                     else f"UnsetEnvironment={name}")
    return "\n".join(lines) + "\n"


def dropin_path(service: str) -> str:
    return f"/run/systemd/system/{service}.service.d/{DROPIN_NAME}"


def render_deadman_script(service: str, deadman_s: float) -> str:
    """The host side of the dead-man switch, run by ``systemd-run`` as a transient unit.

    It checks the heartbeat's age every few seconds; once the controller has been silent longer than
    the limit it removes the trial drop-in (if any), reloads, restarts the unit on its baseline, notes it
    in the log, and exits: with no controller there is nothing more to guard."""
    limit = max(1, round(deadman_s))
    poll = max(1, min(5, limit // 10))
    return f"""#!/bin/sh
# llamahost dead-man switch for {service}.service (started by llamahost tune --live; transient)
heartbeat={HEARTBEAT_FILE}
dropin={dropin_path(service)}
limit={limit}
while :; do
    # seconds since boot on both sides (tuner.live.heartbeat): a wall-clock step moves neither
    now=$(cut -d. -f1 /proc/uptime)
    beat=$(cut -d. -f1 "$heartbeat" 2>/dev/null)
    case "$beat" in ''|*[!0-9]*) beat=0 ;; esac
    silent=$((now - beat))
    if [ "$silent" -gt "$limit" ]; then
        if [ -e "$dropin" ]; then
            rm -f "$dropin"
            systemctl daemon-reload
            systemctl restart {service}.service
            echo "$(date -u +%FT%TZ) controller silent for $silent s (limit $limit s): trial removed, \
{service} restarted on its baseline" | tee -a {DEADMAN_LOG}
        else
            echo "controller silent for $silent s, no trial active: nothing to restore"
        fi
        exit 0
    fi
    sleep {poll}
done
"""


def write_heartbeat_command() -> str:
    """The heartbeat write, creating the state directory first: the measuring lock lives in /run/lock, so
    nothing before the first heartbeat is sure to have made /run/llamahost (it is gone after every boot)."""
    return f"mkdir -p {STATE_DIR} && " + SHELL_WRITE.format(path=HEARTBEAT_FILE)


def deadman_start_script() -> str:
    """Shell lines that (re)start the dead-man unit unless it runs; the heartbeat is touched first so a
    new switch never fires at once."""
    return (f"{write_heartbeat_command()}\n"
            f"if ! systemctl is-active -q {DEADMAN_UNIT}; then\n"
            f"    systemctl reset-failed {DEADMAN_UNIT} 2>/dev/null || true\n"
            f"    systemd-run --quiet --collect --unit={DEADMAN_UNIT} "
            f"--description='llamahost dead-man switch' /bin/sh {DEADMAN_SCRIPT}\n"
            "fi\n")

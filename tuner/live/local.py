"""A live server on this machine without systemd: a supervisor process plays the role of the unit manager.

The supervisor (``python -m tuner.live.local STATE_DIR``) runs detached from the tuner and keeps one
llama-server running with the configuration the state directory asks for:

``baseline.json``  the configuration the server runs when nobody is tuning (like the unit file);
``trial.json``     a trial's configuration while it is present (like the transient drop-in);
``heartbeat``      written by the tuner (seconds since boot, :mod:`tuner.live.heartbeat`); when it is older
                   than the dead-man limit while a trial is active, the supervisor deletes ``trial.json``
                   and restores the baseline;
``status.json``    what the supervisor runs now: configuration key, state, server pid, last error;
``stop``           ask the supervisor to stop the server and exit.

Like ``Restart=on-failure``, a server that dies is started again. A trial configuration that cannot
start is reported as failed and not retried until the tuner asks for something else. The tuner side is
:class:`LocalServer`; it holds the host's measuring lock (:mod:`tuner.host_lock`) so a second tuner is
refused at once, and the kernel releases the lock if the tuner dies.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.atomic import write_atomic
from tuner.config import RunConfig
from tuner.cpu_lists import format_cpu_list
from tuner.errors import UserError
from tuner.host_lock import measuring_lock
from tuner.host_sysfs import Topology
from tuner.live.control import TrialStartFailed
from tuner.live.heartbeat import heartbeat_age, write_heartbeat
from tuner.model.gguf_file import inspect_model
from tuner.model_pages import (
    PlacementKey,
    cpus_allowed,
    evict_page_cache,
    mapped_pages,
    model_file_names,
    needs_page_reset,
    page_placement,
    placement_problem,
    policy_nodes,
    threads_status,
)
from tuner.probe.collect import read_host
from tuner.server.process import ServerProcess, ServerStartError, api_key_from_text

POLL_S = 0.2
DEFAULT_DEADMAN_S = 60.0
DEFAULT_HEALTH_TIMEOUT_S = 120.0

DEFAULT_LOCAL_PORT = 8181  # `tune --live --local` and `server stop`


@dataclass(frozen=True)
class ServerSpec:
    """What stays the same across configurations: binary, model, address."""

    binary: str
    model: str
    host: str
    port: int
    api_key_file: str | None = None
    deadman_s: float = DEFAULT_DEADMAN_S
    health_timeout_s: float = DEFAULT_HEALTH_TIMEOUT_S


def desired_entry(config: RunConfig) -> dict[str, Any]:
    return {"config": config.to_dict()}


def entry_key(entry: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")


# ---- the supervisor --------------------------------------------------------------------------------

class Supervisor:
    def __init__(self, state: Path) -> None:
        self.state = state
        spec = _read_json(state / "spec.json")
        if spec is None:
            raise SystemExit(f"no spec.json in {state}")
        self.spec = ServerSpec(**spec)
        self.server: ServerProcess | None = None
        self.running_key: str | None = None
        self.failed_key: str | None = None
        self.restarts = 0
        self.stopping = False
        self.multi_node = len(read_host().topology.nodes) > 1
        self.pages_placed_for: PlacementKey | None = None  # the placement the model's pages were dropped for

    def _reset_pages(self, config: RunConfig) -> bool:
        """With the previous server stopped (nothing maps the model), drop the model's pages when they were
        placed for another placement (:mod:`tuner.model_pages`); a model that cannot be read is left alone and
        the server's own start reports it."""
        if not needs_page_reset(self.pages_placed_for, config, multi_node=self.multi_node):
            return False
        try:
            evict_page_cache(inspect_model(Path(self.spec.model)).files)
        except (OSError, UserError) as exc:
            self.log(f"the model's pages were not dropped: {exc}")
            return False
        self.pages_placed_for = page_placement(config)
        return True

    def log(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with (self.state / "supervisor.log").open("a") as handle:
            handle.write(f"{stamp} {message}\n")

    def status(self, state: str, **extra: Any) -> None:
        data = {"supervisor_pid": os.getpid(), "key": self.running_key, "state": state,
                "server_pid": self.server.pid if self.server else None, "restarts": self.restarts,
                "updated": time.time(), **extra}
        write_atomic(self.state / "status.json", json.dumps(data), keep_previous=False)

    def desired(self) -> dict[str, Any]:
        trial = self.state / "trial.json"
        if trial.exists():
            age = heartbeat_age(self.state / "heartbeat")
            if age > self.spec.deadman_s:
                trial.unlink(missing_ok=True)
                self.log(f"controller silent for {age:.0f} s (limit {self.spec.deadman_s:.0f} s): baseline restored")
                with (self.state / "deadman.log").open("a") as handle:
                    handle.write(f"{time.time():.0f} reverted after {age:.0f} s\n")
            else:
                entry = _read_json(trial)
                if entry is not None:
                    return entry
        entry = _read_json(self.state / "baseline.json")
        if entry is None:
            raise SystemExit(f"no baseline.json in {self.state}")
        return entry

    def start(self, entry: dict[str, Any], key: str) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        self.running_key = key
        try:  # the tuner validates before writing; a hand-edited or foreign file must not kill the supervisor
            config = RunConfig.from_dict(entry["config"], origin=f"{key}'s configuration")
        except (UserError, KeyError, TypeError) as exc:
            self.failed_key = key
            self.log(f"{key} refused: {exc}")
            self.status("failed", error=str(exc).splitlines()[0])
            return
        reset = self._reset_pages(config)
        self.status("starting", page_cache_reset=reset)
        self.log(f"starting {key}: {' '.join(config.server_args())}" + (" (model pages dropped)" if reset else ""))
        server = ServerProcess(Path(self.spec.binary), Path(self.spec.model), config, host=self.spec.host,
                               port=self.spec.port,
                               api_key_file=Path(self.spec.api_key_file) if self.spec.api_key_file else None,
                               log_path=self.state / "server.log", die_with_parent=True,
                               oom_victim=(self.state / "trial.json").exists())  # a trial dies first, not sshd
        try:
            server.start()
            self.server = server
            waited = server.wait_healthy(self.spec.health_timeout_s)
        except (ServerStartError, UserError) as exc:
            self.server = None
            self.failed_key = key
            tail = getattr(exc, "log_tail", "")
            self.log(f"{key} failed: {exc}")
            self.status("failed", error=str(exc).splitlines()[0], log_tail=tail[-2000:])
            return
        self.failed_key = None
        self.log(f"{key} healthy after {waited:.1f} s")
        self.status("healthy", page_cache_reset=reset,
                    pages_placed=self.pages_placed_for == page_placement(config))

    def step(self) -> None:
        entry = self.desired()
        key = entry_key(entry)
        if key == self.failed_key:
            return
        if key != self.running_key or self.server is None:
            self.start(entry, key)
        elif self.server.poll() is not None:
            self.restarts += 1
            self.log(f"server exited with {self.server.poll()}: restarting ({self.restarts})")
            self.start(entry, key)

    def run(self) -> None:
        def _stop(signum: int, frame: object) -> None:
            self.stopping = True

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        (self.state / "supervisor.pid").write_text(str(os.getpid()))
        try:
            while not self.stopping and not (self.state / "stop").exists():
                self.step()
                time.sleep(POLL_S)
        finally:
            if self.server is not None:
                self.server.stop()
            self.server = None
            self.status("stopped")
            (self.state / "stop").unlink(missing_ok=True)
            self.log("supervisor stopped")


# ---- the tuner's side ------------------------------------------------------------------------------

class LocalServer:
    """Controls a supervised llama-server on this machine (see the module docstring)."""

    def __init__(self, state: Path, spec: ServerSpec) -> None:
        self.state = state
        self.spec = spec
        self._baseline: RunConfig | None = None
        self._topology: Topology | None = None
        self._model_paths_of: tuple[str, tuple[str, ...]] | None = None  # (spec.model, its shard paths)
        self.last_applied: dict[str, Any] = {}  # what the last start did and read back (a trial's record)

    @property
    def base_url(self) -> str:
        return f"http://{self.spec.host}:{self.spec.port}"

    @property
    def api_key(self) -> str | None:
        if not self.spec.api_key_file:
            return None
        return api_key_from_text(Path(self.spec.api_key_file).read_text())

    @property
    def baseline(self) -> RunConfig:
        if self._baseline is None:
            raise RuntimeError("start() the server with its baseline first")
        return self._baseline

    def describe(self) -> str:
        return f"local llama-server on {self.base_url} (supervised, state in {self.state})"

    def server_log(self) -> str:
        return f"{self.state / 'server.log'} (the supervisor's own in supervisor.log beside it)"

    @property
    def deadman_seconds(self) -> float:
        return self.spec.deadman_s

    def adopt(self, config: RunConfig) -> None:
        """The proven winner becomes the supervisor's baseline: what the server runs from now on."""
        self._baseline = config
        write_atomic(self.state / "baseline.json", json.dumps(self._entry(config)), keep_previous=True)
        (self.state / "trial.json").unlink(missing_ok=True)
        self._wait_for(self._entry(config), what="the adopted configuration")

    def lock(self) -> AbstractContextManager[None]:
        """One measuring run per host (:mod:`tuner.host_lock`): a second tuner, or a benchmark tune or fleet
        worker on this machine, is refused at once; the kernel releases the lock if the tuner dies."""
        return measuring_lock(f"llamahost tune --live of {self.base_url}")

    def _entry(self, config: RunConfig) -> dict[str, Any]:
        return desired_entry(config.validate())

    def supervisor_pid(self) -> int | None:
        try:
            pid = int((self.state / "supervisor.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _pid_alive(pid) else None

    def start(self, baseline: RunConfig) -> None:
        """Run ``baseline`` whenever no trial is active: start the supervisor if it is not running (a trial
        left over from a killed tuner is dropped), and wait until the baseline is healthy."""
        self._baseline = baseline
        self.state.mkdir(parents=True, exist_ok=True)
        write_atomic(self.state / "spec.json", json.dumps(self.spec.__dict__), keep_previous=False)
        write_atomic(self.state / "baseline.json", json.dumps(self._entry(baseline)), keep_previous=False)
        (self.state / "trial.json").unlink(missing_ok=True)
        self.heartbeat()
        if self.supervisor_pid() is None:
            (self.state / "stop").unlink(missing_ok=True)
            with (self.state / "supervisor.out").open("ab") as out:
                subprocess.Popen([sys.executable, "-m", "tuner.live.local", str(self.state)],
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                                 close_fds=True)
        self._wait_for(self._entry(baseline), what="the baseline")

    def _wait_for(self, entry: dict[str, Any], *, what: str) -> None:
        """Wait until the supervisor runs ``entry`` healthy, then read back how the server is placed."""
        status = self._wait_healthy(entry, what=what)
        self.last_applied = {"page_cache_reset": bool(status.get("page_cache_reset"))}
        self._check_placement(RunConfig.from_dict(entry["config"]), bool(status.get("pages_placed")), what=what)

    def _check_placement(self, config: RunConfig, status_placed: bool, *, what: str) -> None:
        """The server's CPU mask and memory policy as /proc reads them back, recorded; a placement that did not
        take effect fails the start (:func:`tuner.model_pages.placement_problem`)."""
        pid = self.server_pid()
        if pid is None:
            return
        try:
            status = threads_status(pid)
            numa_maps = Path(f"/proc/{pid}/numa_maps").read_text()
        except OSError:
            return  # it exited meanwhile: the next window's requests fail the trial
        cpus, mapped = cpus_allowed(status), mapped_pages(numa_maps, self._model_paths())
        self.last_applied.update({"cpus_allowed": format_cpu_list(cpus or ()),
                                  **({"model_pages": mapped.to_dict()} if mapped is not None else {})})
        if self._topology is None:
            self._topology = read_host().topology
        problem = placement_problem(config, policy_nodes(config, self._topology), mapped, cpus_allowed=cpus,
                                    pages_placed=bool(status_placed))
        if problem:
            raise TrialStartFailed(f"{what} ({' '.join(config.server_args())}) is not placed as asked: {problem}")

    def _model_paths(self) -> tuple[str, ...]:
        """The model's shards as given and as resolved (numa_maps names the resolved file), read once per model
        rather than once per trial."""
        if self._model_paths_of is None or self._model_paths_of[0] != self.spec.model:
            self._model_paths_of = (self.spec.model, model_file_names(inspect_model(Path(self.spec.model)).files))
        return self._model_paths_of[1]

    def _wait_healthy(self, entry: dict[str, Any], *, what: str) -> dict[str, Any]:
        key = entry_key(entry)
        deadline = time.monotonic() + self.spec.health_timeout_s + 30
        while time.monotonic() < deadline:
            self.heartbeat()
            status = _read_json(self.state / "status.json") or {}
            if status.get("key") == key:
                if status.get("state") == "healthy":
                    return status
                if status.get("state") == "failed":
                    raise TrialStartFailed(f"{what} did not come up: {status.get('error')}\n"
                                           f"{status.get('log_tail', '')[-1500:]}")
            if self.supervisor_pid() is None and time.monotonic() > deadline - self.spec.health_timeout_s:
                tail = (self.state / "supervisor.out").read_text()[-1500:] if (
                    self.state / "supervisor.out").exists() else ""
                raise TrialStartFailed(f"the local server supervisor is not running: {tail}")
            time.sleep(POLL_S)
        raise TrialStartFailed(f"{what} did not become healthy within {self.spec.health_timeout_s:.0f} s")

    def apply(self, config: RunConfig) -> None:
        entry = self._entry(config)
        self.heartbeat()
        write_atomic(self.state / "trial.json", json.dumps(entry), keep_previous=False)
        self._wait_for(entry, what="the trial configuration")

    def restore_baseline(self) -> None:
        (self.state / "trial.json").unlink(missing_ok=True)
        self._wait_for(self._entry(self.baseline), what="the baseline")

    def heartbeat(self) -> None:
        write_heartbeat(self.state / "heartbeat")

    def server_pid(self) -> int | None:
        status = _read_json(self.state / "status.json") or {}
        pid = status.get("server_pid")
        return int(pid) if isinstance(pid, int) and _pid_alive(pid) else None

    def server_memory_bytes(self) -> int | None:
        pid = self.server_pid()
        if pid is None:
            return None
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the supervisor and its server (tests, and `llamahost server stop --local`)."""
        pid = self.supervisor_pid()
        if pid is None:
            return
        (self.state / "stop").touch()
        deadline = time.monotonic() + timeout_s
        while self.supervisor_pid() is not None and time.monotonic() < deadline:
            time.sleep(POLL_S)
        if self.supervisor_pid() is not None:
            os.kill(pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tuner.live.local STATE_DIR", file=sys.stderr)
        return 2
    Supervisor(Path(args[0])).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

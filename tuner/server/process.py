"""Run one ``llama-server`` with a RunConfig, and never leave it behind.

This is the ``--local`` half of live tuning (on systemd hosts the role's unit does the same job): start
the server with exactly the trial's settings, wait until it answers ``/health`` with 200, and stop it,
its whole process group, whatever happens to the caller. Specifically:

* the flags come from :meth:`RunConfig.server_args` and are checked against the binary's ``--help``
  before anything starts, so a wrong flag is a clear error instead of a server that exits at once;
* CPU affinity and memory policy are applied to the process before llama.cpp loads the model
  (:mod:`tuner.server.placement`);
* ``LLAMA_ARG_*`` and OpenMP variables are removed from the server's environment: llama.cpp and libgomp
  read them as defaults, and a trial must run the configuration it claims, nothing inherited; the
  variables the RunConfig itself sets (:meth:`RunConfig.server_environment`) are then added;
* the server runs in its own session (one ``killpg`` reaches every child), and by default the kernel
  kills it if the Python process dies without cleaning up (``PR_SET_PDEATHSIG``). That signal follows
  the *thread* that started the server: start it from a thread that lives as long as the server;
* a server that exits or stays unhealthy past the deadline is stopped and reported with its log tail.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from tuner.config import RunConfig
from tuner.errors import UserError
from tuner.server.client import health
from tuner.server.flags import check_flags
from tuner.server.placement import ProcessPlacement, placement_for

DEFAULT_HOST = "127.0.0.1"
DEFAULT_HEALTH_TIMEOUT_S = 120.0
DEFAULT_STOP_GRACE_S = 10.0
_HEALTH_POLL_S = 0.2
_STOP_POLL_S = 0.05
_LOG_TAIL_BYTES = 16 * 1024
_PR_SET_PDEATHSIG = 1
# Environment variables that would silently change what the server runs.
_SCRUBBED_PREFIXES = ("LLAMA_ARG_", "OMP_", "GOMP_")
_SCRUBBED_NAMES = frozenset({"LLAMA_API_KEY"})


class ServerStartError(UserError):
    """llama-server did not become healthy: it refused its flags, failed to load, or took too long."""

    def __init__(self, problem: str, fix: str, *, returncode: int | None, log_tail: str) -> None:
        super().__init__(f"{problem}\n--- last lines of the server log ---\n{log_tail}", fix)
        self.returncode = returncode
        self.log_tail = log_tail


OOM_VICTIM_SCORE_ADJ = 1000  # the kernel's maximum: killed first when memory runs out


def free_port(host: str = DEFAULT_HOST) -> int:
    """A TCP port nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def server_environment(environ: dict[str, str]) -> dict[str, str]:
    """``environ`` without the variables that llama.cpp or OpenMP would read as settings."""
    return {key: value for key, value in environ.items()
            if not key.startswith(_SCRUBBED_PREFIXES) and key not in _SCRUBBED_NAMES}


def _child_setup(cpus: tuple[int, ...], die_with_parent: bool, parent_pid: int,
                 prctl: Callable[..., int] | None, oom_score_adj: bytes | None) -> Callable[[], None]:
    """What runs in the child between fork and exec: only system calls, no locks, no imports."""

    def setup() -> None:
        if die_with_parent and prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent_pid:  # the parent died before the line above took effect
                os._exit(1)
        if cpus:
            os.sched_setaffinity(0, cpus)
        if oom_score_adj is not None:  # raising it needs no privilege
            fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
            try:
                os.write(fd, oom_score_adj)
            finally:
                os.close(fd)

    return setup


def _libc_prctl() -> Callable[..., int] | None:
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
        return prctl
    except (OSError, AttributeError):
        return None


def child_setup(cpus: tuple[int, ...] = (), *, die_with_parent: bool = True,
                oom_victim: bool = False) -> Callable[[], None]:
    """The ``preexec_fn`` of a child process that must not outlive this one (the kernel sends it SIGKILL
    when the starting thread dies) and, with ``cpus``, runs pinned. Build it in the parent, just before
    starting the child: it captures this process's pid to catch a parent that died during the fork.

    ``oom_victim`` makes the child the out-of-memory killer's first choice (``oom_score_adj`` 1000): a trial
    that runs the host out of memory is what dies, not sshd, the tuner or a neighbouring service."""
    return _child_setup(cpus, die_with_parent, os.getpid(), _libc_prctl() if die_with_parent else None,
                        str(OOM_VICTIM_SCORE_ADJ).encode() if oom_victim else None)


def api_key_from_text(text: str) -> str | None:
    """The key in a llama-server ``--api-key-file``: its first line that is neither blank nor a comment."""
    return next((line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")), None)


class ServerProcess:
    """One llama-server process for one model and RunConfig. Use as a context manager::

        with ServerProcess(binary, model, config) as server:
            server.wait_healthy()
            complete(server.base_url, "Hello", 16)
    """

    def __init__(self, binary: Path, model: Path, config: RunConfig, *, host: str = DEFAULT_HOST,
                 port: int | None = None, ctx_size: int | None = None, api_key_file: Path | None = None,
                 log_path: Path | None = None, metrics: bool = True, extra_args: Sequence[str] = (),
                 stop_grace_s: float = DEFAULT_STOP_GRACE_S, die_with_parent: bool = True,
                 oom_victim: bool = False, inherit_placement: bool = False) -> None:
        self.binary = Path(binary)
        self.model = Path(model)
        self.config = config.validate()
        self.host = host
        self.port = port
        self.ctx_size = ctx_size
        self.api_key_file = api_key_file
        self.metrics = metrics
        self.extra_args = tuple(extra_args)
        self.stop_grace_s = stop_grace_s
        self.die_with_parent = die_with_parent
        self.oom_victim = oom_victim
        # True: the caller has already placed itself (the benchmark trial worker pins and sets its memory
        # policy, then reads both back), and the server inherits that instead of a second numactl.
        self.inherit_placement = inherit_placement
        self._log_path = log_path
        self._owns_log = log_path is None
        self._proc: subprocess.Popen[bytes] | None = None
        self._placement: ProcessPlacement | None = None

    # ---- what will run -----------------------------------------------------------------------------

    def server_args(self, port: int) -> list[str]:
        """llama-server's own flags: model, address, the RunConfig's settings, and extras."""
        args = ["--model", str(self.model), "--host", self.host, "--port", str(port)]
        if self.ctx_size is not None:
            args += ["--ctx-size", str(self.ctx_size)]
        if self.api_key_file is not None:
            args += ["--api-key-file", str(self.api_key_file)]
        if self.metrics:
            args.append("--metrics")
        return [*args, *self.config.server_args(), *self.extra_args]

    def environment(self) -> dict[str, str]:
        """This process's environment without inherited settings, plus the ones the RunConfig sets."""
        return server_environment(dict(os.environ)) | self.config.server_environment()

    def _check_inputs(self) -> None:
        if not (self.binary.is_file() and os.access(self.binary, os.X_OK)):
            raise UserError(f"llama-server binary {self.binary} does not exist or is not executable",
                            "build it with `llamahost server build`")
        if not self.model.is_file():
            raise UserError(f"model file {self.model} does not exist", "pass the path of a .gguf file")
        if self.api_key_file is not None and not os.access(self.api_key_file, os.R_OK):
            raise UserError(f"API key file {self.api_key_file} is not readable",
                            "write the key, one per line, to a file this user can read")
        if self.ctx_size is not None and self.ctx_size < 0:
            raise UserError(f"ctx_size must be 0 (the model's) or positive, got {self.ctx_size}",
                            "pass a context size in tokens")

    # ---- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> ServerProcess:
        """Check everything that can be checked, then start the server (it loads in the background)."""
        if self._proc is not None:
            raise RuntimeError("this ServerProcess was already started")
        self._check_inputs()
        port = self.port if self.port is not None else free_port(self.host)
        args = self.server_args(port)
        check_flags(self.binary, args)
        self._placement = ProcessPlacement(cpus=(), launcher=()) if self.inherit_placement \
            else placement_for(self.config)
        if self._log_path is None:
            fd, name = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [*self._placement.launcher, str(self.binary), *args]
        setup = child_setup(self._placement.cpus, die_with_parent=self.die_with_parent, oom_victim=self.oom_victim)
        try:
            with self._log_path.open("ab") as log:
                self._proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                              stderr=subprocess.STDOUT, env=self.environment(),
                                              start_new_session=True,
                                              preexec_fn=setup)  # noqa: PLW1509 - only syscalls, see _child_setup
        except BaseException:
            if self._owns_log:
                self._log_path.unlink(missing_ok=True)
            raise
        self.port = port
        self._command = command
        return self

    @property
    def command(self) -> list[str]:
        """The full command line of the running server (launcher included)."""
        if self._proc is None:
            raise RuntimeError("the server has not been started")
        return list(self._command)

    @property
    def placement(self) -> ProcessPlacement | None:
        return self._placement

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("the server has not been started")
        return self._proc.pid

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("the server has not been started")
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    @property
    def api_key(self) -> str | None:
        """The first key in the key file (comments skipped), for clients of this server."""
        return None if self.api_key_file is None else api_key_from_text(self.api_key_file.read_text())

    def poll(self) -> int | None:
        """The exit code if the server has exited, else None.

        The exited process is not reaped here: until :meth:`stop` reaps it, its process group id
        cannot be reused, so signalling the group can only ever reach the server's own processes.
        """
        if self._proc is None:
            return None
        if self._proc.returncode is not None:
            return self._proc.returncode
        return _peek_exit(self._proc.pid)

    def log_tail(self, max_bytes: int = _LOG_TAIL_BYTES) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        with self._log_path.open("rb") as handle:
            handle.seek(max(0, self._log_path.stat().st_size - max_bytes))
            lines = handle.read().decode(errors="replace").splitlines()
        return "\n".join(lines[-30:])

    def wait_healthy(self, timeout_s: float = DEFAULT_HEALTH_TIMEOUT_S) -> float:
        """Block until ``/health`` answers 200; return the seconds waited.

        Fails fast (and stops the server) when the process exits or ``timeout_s`` passes.
        """
        if self._proc is None:
            raise RuntimeError("start() the server before waiting for it")
        started = time.monotonic()
        deadline = started + timeout_s
        status: int | None = None
        while True:
            code = self.poll()
            if code is not None:
                self._fail(f"llama-server exited with code {code} before it became healthy", code)
            status = health(self.base_url, timeout_s=min(2.0, max(0.1, deadline - time.monotonic())))
            if status == 200:
                return time.monotonic() - started
            if time.monotonic() >= deadline:
                seen = {None: "no answer", 503: "503, still loading"}.get(status, str(status))
                self._fail(f"llama-server did not become healthy within {timeout_s:.0f} s "
                           f"(last /health: {seen})", None)
            time.sleep(_HEALTH_POLL_S)

    def _fail(self, problem: str, code: int | None) -> None:
        tail = self.log_tail()
        log_note = "" if self._owns_log else f" (full log: {self._log_path})"
        self.stop()
        raise ServerStartError(problem + log_note,
                               "check the flags and the model named in the log lines above",
                               returncode=code, log_tail=tail)

    def stop(self, grace_s: float | None = None) -> int | None:
        """SIGTERM the process group, SIGKILL it after ``grace_s``; return the exit code. Idempotent."""
        proc = self._proc
        if proc is None:
            return None
        grace = self.stop_grace_s if grace_s is None else grace_s
        try:
            if proc.returncode is None:  # not reaped yet, so the group id is still the server's
                if _peek_exit(proc.pid) is None:
                    _signal_group(proc.pid, signal.SIGTERM)
                    deadline = time.monotonic() + grace
                    while _peek_exit(proc.pid) is None and time.monotonic() < deadline:
                        time.sleep(_STOP_POLL_S)
                # The leader is gone (a zombie) or ignored SIGTERM: kill it and anything left in its session.
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        finally:
            if self._owns_log and self._log_path is not None:
                self._log_path.unlink(missing_ok=True)
        return proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _peek_exit(pid: int) -> int | None:
    """Exit code of our child ``pid`` if it has exited (negative signal number if killed), without reaping it."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)

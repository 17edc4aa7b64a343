"""A private, throw-away PostgreSQL cluster on 127.0.0.1, for the fleet tests and benchmarks/fleet_speedup.py.

Found to work on Debian bookworm with the `postgresql` package (15), as root in a fresh clone:

* the server binaries live in /usr/lib/postgresql/<major>/bin, not on PATH (only the client wrappers
  are); the newest major there is used;
* initdb (and postgres) refuse to run as root, so as root every server command runs as the `postgres`
  system user the package creates, through `runuser`; as any other user, as that user;
* the cluster lives in a fresh directory under /tmp owned by the server's user (pytest's own temporary
  directories are mode 0700 root, which `postgres` cannot enter), listens on 127.0.0.1 on a free port
  and on a Unix socket inside that directory (never the system's /var/run/postgresql), and is removed
  with everything in it on stop;
* a detached watchdog stops and removes the cluster when the process that started it dies without
  stopping it (pytest killed by a timeout or SIGKILL), so no server outlives its test session.

Every connection, the superuser's included, authenticates with a password (scram-sha-256), as a real
shared store would; administration goes through psycopg2 over TCP.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2

SERVER_USER = "postgres"
SUPERUSER = "postgres"


def server_bindir() -> Path:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if candidates:
        return candidates[-1].parent
    found = shutil.which("initdb")
    if found is None:
        raise RuntimeError("no PostgreSQL server binaries: install the Debian package `postgresql` "
                           "(.ci/system-deps.sh does)")
    return Path(found).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PgCluster:
    root: Path
    port: int
    bindir: Path
    superuser_password: str
    _run_as: list[str] = field(default_factory=list)
    _watchdog: subprocess.Popen[bytes] | None = None

    @property
    def data(self) -> Path:
        return self.root / "data"

    @classmethod
    def start(cls) -> PgCluster:
        bindir = server_bindir()
        root = Path(tempfile.mkdtemp(prefix="llamahost-pg-"))
        run_as: list[str] = []
        if os.geteuid() == 0:
            account = pwd.getpwnam(SERVER_USER)
            os.chown(root, account.pw_uid, account.pw_gid)
            run_as = ["runuser", "-u", SERVER_USER, "--"]
        cluster = cls(root, free_port(), bindir, secrets.token_hex(12), run_as)
        try:
            cluster._init_and_start()
            cluster._start_watchdog()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _server(self, *args: str, timeout: float = 120) -> None:
        done = subprocess.run([*self._run_as, *args], capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            log = (self.root / "server.log").read_text() if (self.root / "server.log").exists() else ""
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr[-2000:]} {log[-2000:]}")

    def _init_and_start(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.superuser_password + "\n")
        if self._run_as:
            account = pwd.getpwnam(SERVER_USER)
            os.chown(pwfile, account.pw_uid, account.pw_gid)
        pwfile.chmod(0o600)
        self._server(str(self.bindir / "initdb"), "-D", str(self.data), "-U", SUPERUSER, f"--pwfile={pwfile}",
                     "--auth=scram-sha-256", "-E", "UTF8", "--no-sync", "--no-instructions")
        pwfile.unlink()
        self.resume()

    def resume(self) -> None:
        """Start the server (again, after :meth:`pause`), on the same port and data.

        ``fsync=off`` is safe for a test cluster: :meth:`pause` kills the server, not the machine, and the
        kernel keeps what was written. ``synchronous_commit`` stays on, as in a default install: with it off,
        a commit acknowledged in the last few hundred milliseconds before an immediate stop is lost, and the
        restart test would then measure a database that forgets trials rather than an outage."""
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c full_page_writes=off -c max_connections=200")
        self._server(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"),
                     "-w", "-t", "60", "-o", options, "start")

    def pause(self) -> None:
        """Stop the server at once, as a crash or a restart at 3 a.m. would: every connection drops."""
        self._server(*self._stop_command()[len(self._run_as):], timeout=60)

    def _stop_command(self) -> list[str]:
        return [*self._run_as, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"]

    def _start_watchdog(self) -> None:
        stop = " ".join(shlex.quote(part) for part in self._stop_command())
        script = (f"while kill -0 {os.getpid()} 2>/dev/null; do sleep 2; done; {stop} >/dev/null 2>&1; "
                  f"rm -rf {shlex.quote(str(self.root))}")
        self._watchdog = subprocess.Popen(["sh", "-c", script], start_new_session=True,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def url(self, user: str, password: str, database: str) -> str:
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{database}"

    def admin(self, sql: str, *params: object, database: str = "postgres") -> list[tuple[object, ...]]:
        """Run one statement as the superuser (autocommit: CREATE DATABASE cannot run in a transaction)."""
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, password=self.superuser_password,
                                dbname=database)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql, params or None)
                return list(cur.fetchall()) if cur.description else []
        finally:
            conn.close()

    def create_user(self, name: str, password: str) -> None:
        self.admin(f'CREATE ROLE "{name}" LOGIN PASSWORD %s', password)

    def create_database(self, name: str, owner: str) -> None:
        self.admin(f'CREATE DATABASE "{name}" OWNER "{owner}"')

    def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.kill()
            self._watchdog.wait()
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                self._server(*self._stop_command()[len(self._run_as):], timeout=60)
        for _ in range(50):
            if not (self.data / "postmaster.pid").exists():
                break
            time.sleep(0.1)
        shutil.rmtree(self.root, ignore_errors=True)

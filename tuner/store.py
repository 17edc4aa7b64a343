"""The shared study store: opened with clear errors, checked before it is touched, locked while a study is born.

PostgreSQL is the fleet's store (many hosts, one study per hardware group); the single-host default is a
SQLite file. Three things Optuna's ``RDBStorage`` does not do for us, checked on Optuna 5.0.0:

* **Schema from another Optuna version.** ``RDBStorage.__init__`` runs ``create_all()`` (adding any table
  its version lacks) *before* it compares the alembic revision with its own and raises ``RuntimeError``.
  So :func:`check_schema` reads the revision first, read-only, and refuses with the fix (upgrade the store,
  or upgrade this host) before anything is written.
* **Connection errors** surface as SQLAlchemy-wrapped driver errors. :func:`explain_open_error` turns them
  into one message per cause (unreachable, wrong credentials, missing database, pg_hba) with the URL's
  password replaced by ``***`` everywhere; libpq's own ``connect_timeout`` bounds an unreachable host.
* **Study creation is not atomic**: ``create_study`` then ``set_user_attr`` then ``enqueue_trial`` are
  separate writes, so a second worker starting at the same moment could see a study without its binding,
  or enqueue a second baseline. :func:`creation_lock` serialises the create-or-check step per study name
  (a PostgreSQL advisory lock, released by the server if the holder dies; ``flock`` for SQLite).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import RDBStorage
from sqlalchemy.engine import URL, make_url

from tuner.errors import UserError

CONNECT_TIMEOUT_S = 10
UNREACHABLE_MARKERS = ("connection refused", "could not connect", "timeout expired", "could not translate host",
                       "no route to host", "network is unreachable", "server closed the connection",
                       "name or service not known")
CORRUPT_SQLITE_MARKERS = ("file is not a database", "database disk image is malformed")


def parse_url(url: str) -> URL | None:
    try:
        return make_url(url)
    except Exception:  # sqlalchemy raises ArgumentError (and ValueError for bad ports)
        return None


def driver_url(url: str) -> str:
    """The URL SQLAlchemy is given: a plain ``postgresql://`` names psycopg2, the driver llamahost installs
    (SQLAlchemy 2.1 would pick psycopg 3 for it)."""
    parsed = parse_url(url)
    if parsed is None or parsed.drivername != "postgresql":
        return url
    return parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)


def redact(url: str) -> str:
    """The URL as it may be printed: the password, if any, replaced by ``***``."""
    parsed = parse_url(url)
    if parsed is None:
        return url.split("@", 1)[-1] if "@" in url else url
    return parsed.render_as_string(hide_password=True)


def hide_secret(text: str, url: str) -> str:
    """``text`` with every occurrence of the URL's password (raw or as written in the URL) replaced."""
    parsed = parse_url(url)
    secrets = {parsed.password} if parsed is not None and parsed.password else set()
    if "://" in url and "@" in url:
        creds = url.split("://", 1)[1].rsplit("@", 1)[0]
        if ":" in creds:
            secrets.add(creds.split(":", 1)[1])
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(str(secret), "***")
    return text


def backend(url: str) -> str:
    parsed = parse_url(url)
    return parsed.get_backend_name() if parsed is not None else ""


def engine_kwargs(url: str) -> dict[str, Any] | None:
    """Connection settings per backend: a dropped server connection is re-opened (pre-ping) and an
    unreachable PostgreSQL host fails after CONNECT_TIMEOUT_S instead of the TCP default of minutes."""
    if backend(url) == "postgresql":
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
    if backend(url) == "sqlite":
        return None
    return {"pool_pre_ping": True}


@functools.cache
def optuna_schema() -> tuple[str, tuple[str, ...]]:
    """(head revision, every revision) of the table schema this Optuna writes, from an in-memory store."""
    probe = RDBStorage("sqlite://", skip_compatibility_check=True)
    try:
        return probe.get_head_version(), tuple(probe.get_all_versions())
    finally:
        probe.engine.dispose()


def _stored_schema(url: str) -> tuple[str | None, str | None]:
    """(alembic revision, Optuna version that set the store up), read-only; None where absent."""
    engine = sqlalchemy.create_engine(driver_url(url), **(engine_kwargs(url) or {}))
    try:
        with engine.connect() as conn:
            tables = set(sqlalchemy.inspect(conn).get_table_names())
            revision = library = None
            if "alembic_version" in tables:
                revision = conn.execute(sqlalchemy.text("SELECT version_num FROM alembic_version")).scalar()
            if "version_info" in tables:
                library = conn.execute(sqlalchemy.text("SELECT library_version FROM version_info")).scalar()
            return revision, library
    finally:
        engine.dispose()


def check_schema(url: str) -> None:
    """Refuse a store whose Optuna schema this Optuna would have to change or cannot read.

    Reads only. A store without Optuna tables is new and fine (``RDBStorage`` creates them)."""
    if backend(url) == "sqlite":
        path = sqlite_path(url)
        if path is None or not path.exists() or path.stat().st_size == 0:
            return  # in-memory, or about to be created: nothing to be incompatible with
    revision, library = _stored_schema(url)
    head, known = optuna_schema()
    if revision is None or revision == head:
        return  # a new store, or one RDBStorage stamps itself (tables that predate Optuna's migrations)
    shown = redact(url)
    mine = f"Optuna {optuna.__version__} (schema {head})"
    made_by = f"the store says it was set up by Optuna {library}" if library else "no Optuna version recorded"
    if revision in known:
        raise UserError(
            f"cannot open study storage {shown}: its tables have an older Optuna schema (revision {revision}; "
            f"{made_by}) and this llamahost uses {mine}; nothing was changed",
            "back the database up (pg_dump), then upgrade its schema once with `optuna storage upgrade --storage "
            "URL` run from llamahost's Python environment (hosts still on the old version can no longer use it "
            "afterwards), or point --storage at a new database")
    raise UserError(
        f"cannot open study storage {shown}: it has a newer Optuna schema (revision {revision}, unknown to "
        f"{mine}; {made_by}); nothing was changed",
        "upgrade llamahost on this host to the version the rest of the fleet runs (every host sharing a store "
        "must run the same llamahost), or point --storage at another database")


def explain_open_error(url: str, exc: BaseException) -> UserError:
    """One clear message for why the store could not be opened; the password is never part of it."""
    original = getattr(exc, "orig", None) or exc
    text = hide_secret(str(original).strip(), url)
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(original).__name__)
    lowered = text.lower()
    shown = redact(url)
    parsed = parse_url(url)
    host = f"{(parsed.host if parsed else None) or 'localhost'}:{(parsed.port if parsed else None) or 5432}"
    user = parsed.username if parsed else None
    database = parsed.database if parsed else None
    prefix = f"cannot open study storage {shown}"
    if backend(url) == "postgresql":
        if "password authentication failed" in lowered or "authentication failed" in lowered:
            return UserError(f"{prefix}: PostgreSQL at {host} refused the credentials of user {user!r}",
                             "check the user name and password (in the URL, in PGPASSWORD or in ~/.pgpass); "
                             "the server's log names the reason")
        if "no password supplied" in lowered:
            return UserError(f"{prefix}: PostgreSQL at {host} wants a password for user {user!r} and none was given",
                             "put it in ~/.pgpass (mode 0600) or PGPASSWORD, or in the URL")
        if "does not exist" in lowered and "database" in lowered:
            return UserError(f"{prefix}: database {database!r} does not exist on {host}",
                             f"create it once: createdb -h HOST -U postgres -O {user or 'USER'} {database} "
                             "(see docs/fleet.md)")
        if "no pg_hba.conf entry" in lowered:
            return UserError(f"{prefix}: the server at {host} does not accept connections from this host ({first})",
                             "add a line for this host to the server's pg_hba.conf (host DB USER ADDRESS/32 "
                             "scram-sha-256) and reload it")
        if any(marker in lowered for marker in UNREACHABLE_MARKERS):
            return UserError(f"{prefix}: cannot reach PostgreSQL at {host} ({first})",
                             "check that the server runs and listens there (listen_addresses, port, firewall), "
                             "and the host name in the URL")
    if backend(url) == "sqlite" and any(marker in lowered for marker in CORRUPT_SQLITE_MARKERS):
        path = sqlite_path(url)
        return UserError(f"{prefix}: {path} is corrupt, not a readable SQLite database ({first})",
                         f"nothing in it was changed: keep it as the backup (mv {path} {path}.corrupt) and run "
                         "again to start a new store, or put back a copy you trust")
    if isinstance(original, ModuleNotFoundError | ImportError):
        return UserError(f"{prefix}: the database driver is not installed ({first})",
                         "install llamahost with its fleet extra: pip install 'llamahost[fleet]'")
    return UserError(f"{prefix}: {first}",
                     "check the URL, that the database server is running and reachable, and the credentials")


def sqlite_path(url: str) -> Path | None:
    parsed = parse_url(url)
    if parsed is None or parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return None if parsed.database == ":memory:" else Path(parsed.database)


@contextlib.contextmanager
def store_init_lock(url: str) -> Iterator[None]:
    """Serialise opening a PostgreSQL store across hosts: the first ``RDBStorage`` creates the tables and
    stamps the schema revision, and two doing it at once collide (duplicate catalog entries), or one sees
    the other's tables before their revision and takes them for an old schema. Other backends: no-op."""
    if backend(url) != "postgresql":
        yield
        return
    engine = sqlalchemy.create_engine(driver_url(url), **(engine_kwargs(url) or {}))
    try:
        with _advisory_lock(engine, "llamahost-store-init"):
            yield
    finally:
        engine.dispose()


@contextlib.contextmanager
def _advisory_lock(engine: sqlalchemy.engine.Engine, key: str) -> Iterator[None]:
    """A PostgreSQL session-level advisory lock, held on a connection of its own; the server releases it
    when that connection ends, so a holder killed with SIGKILL cannot block the others for ever."""
    with engine.connect() as raw:
        conn = raw.execution_options(isolation_level="AUTOCOMMIT")
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:id)"), {"id": _lock_id(key)})
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:id)"), {"id": _lock_id(key)})


def _lock_id(key: str) -> int:
    """A stable signed 64-bit advisory lock id for a name."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)


@contextlib.contextmanager
def creation_lock(storage: RDBStorage, key: str) -> Iterator[None]:
    """Hold a lock named after ``key`` across processes and hosts sharing ``storage``."""
    dialect = storage.engine.dialect.name
    if dialect == "postgresql":
        with _advisory_lock(storage.engine, f"llamahost-study:{key}"):
            yield
        return
    path = sqlite_path(str(storage.url)) if dialect == "sqlite" else None
    if path is None:
        yield  # an in-memory store lives in one process
        return
    with path.with_name(path.name + ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

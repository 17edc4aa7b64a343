"""Helpers shared by the fleet tests: the store a test gets, and running `llamahost` as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import optuna
from pg_cluster import PgCluster

FLEET_USER = "fleet"
FLEET_PASSWORD = "s3cret-fleet-pw"  # asserted never to appear in any output
TINY = ["--pp-tokens", "32", "--tg-tokens", "8", "--max-measure", "2"]


@dataclass(frozen=True)
class Store:
    cluster: PgCluster
    database: str

    @property
    def url(self) -> str:
        return self.cluster.url(FLEET_USER, FLEET_PASSWORD, self.database)

    def studies(self) -> dict[str, list[optuna.trial.FrozenTrial]]:
        """Every study in the store with its trials, read with a plain Optuna storage (no llamahost code;
        SQLAlchemy 2.1 would pick psycopg 3 for a plain postgresql:// URL, so the driver is named)."""
        storage = optuna.storages.RDBStorage(self.url.replace("postgresql://", "postgresql+psycopg2://"))
        try:
            return {s.study_name: optuna.load_study(study_name=s.study_name, storage=storage).get_trials()
                    for s in optuna.get_all_study_summaries(storage)}
        finally:
            storage.engine.dispose()


def new_store(cluster: PgCluster) -> Store:
    """A fresh database of its own, owned by the fleet user."""
    database = f"t_{uuid.uuid4().hex[:12]}"
    cluster.create_database(database, FLEET_USER)
    return Store(cluster, database)


def llamahost_env(home: Path, host: str | None = None) -> dict[str, str]:
    """The environment of a llamahost run; ``host`` names the simulated host it runs on: each has its own
    measuring lock, as separate machines would (one machine plays every host here)."""
    env = {**os.environ, "LLAMAHOST_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("LLAMAHOST_STORAGE", None)
    if host is not None:
        env["LLAMAHOST_LOCK_DIR"] = str(home / "locks" / host)
    return env


def llamahost(*args: str, home: Path, timeout: float = 600, host: str | None = None
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tuner.cli", *args], capture_output=True, text=True,
                          env=llamahost_env(home, host), timeout=timeout, check=False)


def start_llamahost(*args: str, home: Path, host: str | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tuner.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=llamahost_env(home, host))

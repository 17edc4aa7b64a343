"""Reading a study the way a test watching a running ``llamahost`` process must: the database file, its schema
and the study row appear a moment apart, and until all exist there are simply no trials yet. The watcher only
reads: it opens the store only once the schema version is recorded. Optuna's RDBStorage records it when it finds
none, even with ``skip_table_creation``, and a watcher doing that while the tuner creates the store raced it (both
insert the version; the loser fails on the unique key; the tuner now opens the store again when it loses)."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import optuna
import sqlalchemy.exc


def schema_recorded(db: Path) -> bool:
    """Whether the tuner has finished creating the store: Optuna's schema version is in it (read-only)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as connection:
            return bool(connection.execute("SELECT count(*) FROM alembic_version").fetchone()[0] > 0)
    except sqlite3.Error:
        return False


def study_trials(home: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    """The trials of study ``name`` in the default store under ``home``; none while it does not exist."""
    db = home / "data" / "studies.db"
    if not db.exists() or not schema_recorded(db):
        return []
    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///{db}", skip_compatibility_check=True,
                                             skip_table_creation=True)
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:  # the run has created the schema but not the study yet
        return []
    except (sqlalchemy.exc.DatabaseError, optuna.exceptions.StorageInternalError):
        # The run is still creating the schema (no such table, locked); Optuna reports that as its own
        # StorageInternalError when it happens while it reads the schema version.
        return []
    return study.get_trials(deepcopy=False)

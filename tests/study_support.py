"""Reading a study the way a test watching a running ``llamahost`` process must: the database file, its schema
and the study row appear a moment apart, and until all exist there are simply no trials yet. The watcher only
reads: it never creates the schema itself, which would race the tuner creating it (both insert the schema
version; the loser fails with a unique-constraint error, and the loser could be the tuner)."""

from __future__ import annotations

from pathlib import Path

import optuna
import sqlalchemy.exc


def study_trials(home: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    """The trials of study ``name`` in the default store under ``home``; none while it does not exist."""
    db = home / "data" / "studies.db"
    if not db.exists():
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

"""Reading a study the way a test watching a running ``llamahost`` process must: the database file and the
study row appear a moment apart, and until both exist there are simply no trials yet."""

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
        study = optuna.load_study(study_name=name, storage=optuna.storages.RDBStorage(f"sqlite:///{db}"))
    except KeyError:  # the run has created the file but not the study yet
        return []
    except sqlalchemy.exc.OperationalError:  # the run is still creating the schema ("table ... already exists")
        return []
    return study.get_trials(deepcopy=False)

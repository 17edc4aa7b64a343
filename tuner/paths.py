"""Where llamahost keeps its state on the controller: studies, results, cached models, logs.

All locations honour ``LLAMAHOST_HOME`` so tests and CI can run in a throw-away directory; otherwise the
user's XDG data and cache directories are used.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP = "llamahost"


def data_dir() -> Path:
    """Studies and result files: things a user would be sorry to lose."""
    home = os.environ.get("LLAMAHOST_HOME")
    return Path(home) / "data" if home else Path(platformdirs.user_data_dir(APP))


def cache_dir() -> Path:
    """Fetched models and measured host facts: things that can be fetched or measured again."""
    home = os.environ.get("LLAMAHOST_HOME")
    return Path(home) / "cache" if home else Path(platformdirs.user_cache_dir(APP))


def state_dir() -> Path:
    """Logs: useful to read after a run, not worth keeping forever (XDG state, ``~/.local/state/llamahost``)."""
    home = os.environ.get("LLAMAHOST_HOME")
    return Path(home) / "state" if home else Path(platformdirs.user_state_dir(APP))


def trial_log_dir(study: str) -> Path:
    """Where a study's trial workers write their output (only logs that hold something are kept)."""
    return state_dir() / "logs" / study


def default_storage_url() -> str:
    """The embedded study store: one SQLite file for one host."""
    return f"sqlite:///{data_dir() / 'studies.db'}"


def results_dir() -> Path:
    return data_dir() / "results"

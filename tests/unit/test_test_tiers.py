"""The test tiers mean what they say: this fast tier builds nothing, and a test that needs the llama-server
build is marked ``builds`` wherever it lives (tests/conftest.py marks by the fixtures a test uses)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def collected(*args: str) -> list[str]:
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                          capture_output=True, text=True, timeout=300, cwd=TESTS.parent, check=False)
    assert done.returncode in (0, 5), done.stdout[-2000:] + done.stderr[-2000:]  # 5: nothing collected
    return [line for line in done.stdout.splitlines() if "::" in line]


def test_the_pure_tier_needs_no_llama_cpp_build_and_the_server_tier_is_marked() -> None:
    assert collected("-m", "builds", str(TESTS / "unit")) == []
    marked = collected("-m", "builds", str(TESTS / "server" / "test_llama_server_cli.py"))
    assert any("test_run_serves_until_terminated" in test for test in marked), marked
    unmarked = collected("-m", "not builds", str(TESTS / "server" / "test_llama_server_cli.py"))
    assert unmarked == [], "every test of the server command line uses the build"

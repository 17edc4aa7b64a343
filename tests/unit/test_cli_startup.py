"""The command line starts without loading what only a run needs: every ``--help`` (and a mistyped option)
imports none of the heavy libraries. How long that takes is measured in benchmarks/cli_startup.py.

Each case runs in a new interpreter, since this test session has imported everything already.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from tuner.cli import COMMAND_MODULES

# What a run needs and --help does not: together about two seconds of imports on this machine.
HEAVY = ("scipy", "matplotlib", "llama_cpp", "optuna", "sqlalchemy", "numpy", "psycopg2", "gguf", "pulumi", "ansible")

PROBE = f"""
import json, sys
from tuner.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as done:
    code = done.code
print(json.dumps({{"code": code, "loaded": sorted(m for m in {HEAVY!r} if m in sys.modules)}}))
"""

COMMANDS = [name.rsplit(".", 1)[1].replace("writeback", "write-back") for name in COMMAND_MODULES]


def loaded_by(*argv: str) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("argv", [["--help"], *([command, "--help"] for command in COMMANDS),
                                  ["fleet", "work", "--help"], ["tune", "--no-such-option"]],
                         ids=" ".join)
def test_help_and_usage_errors_load_none_of_the_heavy_libraries(argv: list[str]) -> None:
    outcome = loaded_by(*argv)
    assert outcome["code"] == (2 if "--no-such-option" in argv else 0)
    assert outcome["loaded"] == [], f"llamahost {' '.join(argv)} imported {outcome['loaded']}"


def test_a_command_that_runs_still_gets_what_it_needs(tmp_path: Path) -> None:
    """The other side of lazy imports: a command that reads a study imports Optuna when it runs, and works."""
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    study = optuna.create_study(study_name="night", storage=url)
    study.tell(study.ask(), 1.0)
    outcome = loaded_by("show", "--json", "--study", "night", "--storage", url)
    loaded = outcome["loaded"]
    assert outcome["code"] == 0 and isinstance(loaded, list) and {"optuna", "sqlalchemy"} <= set(loaded)

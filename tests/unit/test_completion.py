"""``llamahost completion bash|zsh``: the scripts complete what the command line has, in the real shells."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tuner.cli import COMMAND_MODULES

COMMANDS = [name.rsplit(".", 1)[1].replace("writeback", "write-back") for name in COMMAND_MODULES]

# COMP_* as bash sets them when <TAB> is pressed after the given words; prints what would be offered.
BASH_COMPLETE = """
source "$1"; shift
COMP_WORDS=("$@"); COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 )); COMP_LINE="${COMP_WORDS[*]}"; COMP_POINT=${#COMP_LINE}
COMPREPLY=()
_shtab_llamahost llamahost "${COMP_WORDS[-1]}" "${COMP_WORDS[-2]}"
printf '%s\\n' "${COMPREPLY[@]}"
"""


def script(shell: str, tmp_path: Path) -> Path:
    done = subprocess.run([sys.executable, "-m", "tuner.cli", "completion", shell], capture_output=True, text=True,
                          timeout=60, check=True)
    path = tmp_path / f"llamahost.{shell}"
    path.write_text(done.stdout)
    return path


@pytest.mark.parametrize(("words", "offered"), [
    (["llamahost", ""], COMMANDS),
    (["llamahost", "wr"], ["write-back"]),
    (["llamahost", "write-back", "r.yaml", "--dr"], ["--dry-run"]),
    (["llamahost", "tune", "--objective", ""], ["tg", "pp", "both", "throughput", "latency"]),
    (["llamahost", "fleet", "fi"], ["finish", "fingerprint"]),
])
def test_bash_completes_commands_options_and_choices(tmp_path: Path, words: list[str], offered: list[str]) -> None:
    bash = script("bash", tmp_path)
    done = subprocess.run(["bash", "-c", BASH_COMPLETE, "complete", str(bash), *words], capture_output=True,
                          text=True, timeout=60, check=True)
    assert sorted(done.stdout.split()) == sorted(offered), done.stderr


def test_zsh_loads_the_script_under_compinit_and_it_names_every_command(tmp_path: Path) -> None:
    zsh = shutil.which("zsh")
    assert zsh, "zsh is missing: .ci/system-deps.sh installs it"
    path = script("zsh", tmp_path)
    text = path.read_text()
    assert text.startswith("#compdef llamahost")
    syntax = subprocess.run([zsh, "-n", str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert syntax.returncode == 0, syntax.stderr
    loaded = subprocess.run([zsh, "-f", "-c", f"autoload -Uz compinit && compinit -u -d {tmp_path}/zcompdump && "
                             f"source {path} && whence -w _shtab_llamahost _shtab_llamahost_commands"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split() == ["_shtab_llamahost:", "function", "_shtab_llamahost_commands:", "function"]
    block = text[text.index("_shtab_llamahost_commands() {"):]
    block = block[:block.index("\n  )")]
    named = {line.strip().split(":", 1)[0] for line in block.splitlines()[2:]}
    assert named == set(COMMANDS), named

"""ansible-lint with the production profile over the roles and playbooks (config: .ansible-lint). Fast
enough for every run (about 15 s); no lab needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_roles_and_playbooks_pass_ansible_lint_production_profile() -> None:
    done = subprocess.run([str(BIN / "ansible-lint"), "--nocolor", "-f", "pep8", "roles", "playbooks",
                           "tests/lab/playbooks"], cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "Profile 'production' was required, and it passed" in output, output[-2000:]

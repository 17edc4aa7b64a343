"""The infra tests import the Pulumi program's package from infra/ (Pulumi runs it from there)."""

from __future__ import annotations

import sys
from pathlib import Path

INFRA = Path(__file__).resolve().parents[2] / "infra"
for path in (INFRA, INFRA / "policy"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

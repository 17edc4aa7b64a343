"""Reading a user's YAML file that must hold a mapping, with errors that name the file and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from tuner.errors import UserError


def read_yaml_mapping(path: Path, *, what: str, fix_missing: str, fix_shape: str) -> dict[str, Any]:
    """The mapping in ``path``; a missing file, bad YAML or another shape is a :class:`UserError`."""
    try:
        data = YAML(typ="safe").load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found", fix_missing) from None
    except YAMLError as exc:
        raise UserError(f"{path}: {what} is not valid YAML ({str(exc).splitlines()[0]})",
                        "fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: {what} is not a YAML mapping", fix_shape)
    return data

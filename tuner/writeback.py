"""Write a proven configuration into an Ansible ``host_vars``/``group_vars`` file, keeping it the user's file.

People comment their inventories and order keys by meaning. A tuner that rewrote the file from a dict
would throw that away, so the file is edited in place with a round-trip YAML parser: existing
``llama_server_*`` keys keep their position and comments and only their values change, new keys are
appended under one comment that says where they came from. The write is atomic and the previous file is
kept as ``<name>.prev``; a file that is not a YAML mapping is refused, not overwritten.

Only a result whose verdict is "improved" may be written: :func:`changes_from_result` refuses anything
else, so an A/A comparison or a noisy night can never change a deployment.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import YAMLError

from tuner.atomic import write_atomic
from tuner.errors import UserError
from tuner.result import IMPROVED

TUNED_PREFIX = "llama_server_"


@dataclass(frozen=True)
class WriteBack:
    """What changed in the file: key -> (old value or None, new value)."""

    path: Path
    changed: dict[str, tuple[Any, Any]]

    @property
    def wrote(self) -> bool:
        return bool(self.changed)


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096  # never re-wrap the user's long lines
    return yaml


def changes_from_result(result: dict[str, Any]) -> dict[str, Any]:
    """The role variables a result asks to write; refuses results that did not prove an improvement."""
    if result.get("verdict") != IMPROVED:
        raise UserError(
            f"study {result.get('study')!r} did not prove an improvement ({result.get('summary', 'no summary')})",
            "nothing to write: the current configuration stands; tune longer or with a larger --budget")
    improvement = result.get("improvement") or {}
    if not improvement.get("significant"):
        raise UserError("the result's improvement is not statistically significant", "nothing was written")
    role_vars: dict[str, Any] = dict(result["settings"]["role_vars"])
    unknown = [k for k in role_vars if not k.startswith(TUNED_PREFIX)]
    if unknown:
        raise UserError(f"the result names variables outside {TUNED_PREFIX}*: {', '.join(unknown)}",
                        "regenerate the result with this version of llamahost")
    return role_vars


def load_vars_file(path: Path) -> CommentedMap:
    if not path.exists():
        return CommentedMap()
    try:
        data = _yaml().load(path.read_text())
    except YAMLError as exc:
        raise UserError(f"{path} is not valid YAML ({str(exc).splitlines()[0]})",
                        f"fix the file (its last good version may be {path.name}.prev)") from None
    if data is None:
        return CommentedMap()
    if not isinstance(data, CommentedMap):
        raise UserError(f"{path} does not hold a mapping of variables", "host_vars files must be YAML mappings")
    return data


def render(data: CommentedMap, *, explicit_start: bool) -> str:
    buffer = io.StringIO()
    yaml = _yaml()
    yaml.explicit_start = explicit_start
    yaml.dump(data, buffer)
    return buffer.getvalue()


def apply_changes(data: CommentedMap, changes: dict[str, Any], note: str) -> dict[str, tuple[Any, Any]]:
    """Set ``changes`` in ``data`` in place; returns what actually changed."""
    changed: dict[str, tuple[Any, Any]] = {}
    first_new = True
    for key, value in changes.items():
        old = data.get(key)
        if key in data:
            if old != value:
                data[key] = value
                changed[key] = (old, value)
            continue
        data[key] = value
        changed[key] = (None, value)
        if first_new:
            data.yaml_set_comment_before_after_key(key, before=note)
            first_new = False
    return changed


def result_note(result: dict[str, Any]) -> str:
    """The comment written above the tuner's keys: which study proved them, and by how much."""
    improvement = result["improvement"]
    return (f"tuned by llamahost {result['written']}: study {result['study']}, {result['objective']} "
            f"x{improvement['ratio']:.3f} [{improvement['ci_low']:.3f}, {improvement['ci_high']:.3f}]")


def write_result_vars(path: Path, result: dict[str, Any]) -> WriteBack | None:
    """Write a result's role variables into ``path`` when it proved an improvement; ``None`` (and the file
    untouched) when the current configuration stands. The one write-back path of every tuner mode."""
    if result.get("verdict") != IMPROVED:
        return None
    return write_vars(path, changes_from_result(result), note=result_note(result))


def write_vars(path: Path, changes: dict[str, Any], *, note: str) -> WriteBack:
    """Write ``changes`` into the vars file at ``path`` (created if missing). Nothing is written when
    every value is already what it should be."""
    data = load_vars_file(path)
    changed = apply_changes(data, changes, note)
    if changed:
        explicit_start = not path.exists() or path.read_text().lstrip().startswith("---")
        write_atomic(path, render(data, explicit_start=explicit_start))
    return WriteBack(path=path, changed=changed)

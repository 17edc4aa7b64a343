"""Write a proven configuration into an Ansible ``host_vars``/``group_vars`` file, keeping it the user's file.

People comment their inventories and order keys by meaning. A tuner that rewrote the file from a dict
would throw that away, so the file is edited in place with a round-trip YAML parser: existing
``llama_server_*`` keys keep their position and comments and only their values change, new keys are
appended under one comment that says where they came from. The write is atomic and the previous file is
kept as ``<name>.prev``; a file that is not a YAML mapping is refused, not overwritten.

This module only edits the file. What may be written, and the checks around the write (a proven,
validated change, the same model, the resolved variables), are :mod:`tuner.safe_change`'s.
"""

from __future__ import annotations

import difflib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import YAMLError

from tuner.atomic import write_atomic
from tuner.errors import UserError
from tuner.yamlfile import as_ansible_reads_it, misread_by_ansible, read_user_text


@dataclass(frozen=True)
class WriteBack:
    """What changed in the file: key -> (old value or None, new value)."""

    path: Path
    changed: dict[str, tuple[Any, Any]]
    previous: bytes | None = None  # the file's bytes before the write; None when it did not exist

    @property
    def wrote(self) -> bool:
        return bool(self.changed)

    def restore(self) -> None:
        """Put the file back byte for byte as it was before this write (a later check refused the change)."""
        if not self.wrote:
            return
        if self.previous is None:
            self.path.unlink(missing_ok=True)
        else:
            write_atomic(self.path, self.previous, keep_previous=False)


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096  # never re-wrap the user's long lines
    return yaml


def load_vars_file(path: Path) -> CommentedMap:
    if not path.exists():
        return CommentedMap()
    text = read_user_text(path, what="vars file", fix_missing="check the path")
    try:
        data = _yaml().load(text)
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
    """Set ``changes`` in ``data`` in place; returns what actually changed. A value already there but written so
    that Ansible reads it as another type (``flash_attn: on``) counts as changed and is rewritten quoted."""
    changed: dict[str, tuple[Any, Any]] = {}
    first_new = True
    for raw_key, raw_value in changes.items():
        key, value = raw_key, as_ansible_reads_it(raw_value)
        old = data.get(key)
        if key in data:
            if old != value or misread_by_ansible(old):
                data[key] = value
                changed[key] = (old, raw_value)
            continue
        data[key] = value
        changed[key] = (None, raw_value)
        if first_new:
            data.yaml_set_comment_before_after_key(key, before=note)
            first_new = False
    return changed


@dataclass(frozen=True)
class PlannedWrite:
    """What writing ``changes`` into a vars file would do, computed without touching it."""

    path: Path
    changed: dict[str, tuple[Any, Any]]
    previous: bytes | None  # the file's bytes now; None when it does not exist
    text: str  # the file as it would be written (the old text when nothing changes)

    @property
    def diff(self) -> str:
        """A unified diff from the file as it is to the file as it would be (empty when nothing changes)."""
        old = self.previous.decode() if self.previous is not None else ""
        lines = difflib.unified_diff(old.splitlines(keepends=True), self.text.splitlines(keepends=True),
                                     fromfile=str(self.path) if self.previous is not None else "/dev/null",
                                     tofile=str(self.path))
        return "".join(lines) if self.changed else ""


def plan_vars(path: Path, changes: dict[str, Any], *, note: str) -> PlannedWrite:
    """Edit the vars file at ``path`` in memory: what :func:`write_vars` would write (``--dry-run`` shows it)."""
    data = load_vars_file(path)
    previous = path.read_bytes() if path.exists() else None
    changed = apply_changes(data, changes, note)
    if not changed:
        return PlannedWrite(path=path, changed={}, previous=previous, text=(previous or b"").decode())
    explicit_start = previous is None or previous.lstrip().startswith(b"---")
    return PlannedWrite(path=path, changed=changed, previous=previous,
                        text=render(data, explicit_start=explicit_start))


def write_vars(path: Path, changes: dict[str, Any], *, note: str) -> WriteBack:
    """Write ``changes`` into the vars file at ``path`` (created if missing). Nothing is written when
    every value is already what it should be."""
    plan = plan_vars(path, changes, note=note)
    if plan.changed:
        try:
            write_atomic(path, plan.text)
        except OSError as exc:
            raise UserError(f"cannot write {path} ({exc.strerror})", "the file was left as it was; free space "
                            "or fix permissions, then write back again") from None
    return WriteBack(path=path, changed=plan.changed, previous=plan.previous)

"""Reading a user's file (text, or YAML that must hold a mapping), with errors that name the file and the fix."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError
from ruamel.yaml.scalarstring import ScalarString, SingleQuotedScalarString

from tuner.errors import UserError


def read_user_text(path: Path, *, what: str, fix_missing: str) -> str:
    """The UTF-8 text of ``path``; a missing, unreadable or undecodable file is a :class:`UserError`, never a
    traceback (vars files and results are UTF-8 for Ansible and for llamahost alike)."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found", fix_missing) from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: {what} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                        f"{exc.start})", "save it as UTF-8") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the {what} ({exc.strerror})",
                        "check the path and its permissions") from None


def read_yaml_mapping(path: Path, *, what: str, fix_missing: str, fix_shape: str) -> dict[str, Any]:
    """The mapping in ``path``; a missing file, bad YAML or another shape is a :class:`UserError`."""
    text = read_user_text(path, what=what, fix_missing=fix_missing)
    try:
        data = YAML(typ="safe").load(text)
    except YAMLError as exc:
        raise UserError(f"{path}: {what} is not valid YAML ({str(exc).splitlines()[0]})",
                        "fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: {what} is not a YAML mapping", fix_shape)
    return data


def _ansible_reads_as_given(text: str) -> bool:
    """Whether Ansible, whose loader speaks YAML 1.1, reads this plain (unquoted) scalar back as the same string.

    llamahost's own files are YAML 1.2 (ruamel), where ``on``, ``off``, ``yes`` or ``012`` are strings; in
    YAML 1.1 they are a boolean or a number, so ``llama_server_flash_attn: on`` would reach the role as ``True``."""
    reader = YAML(typ="safe", pure=True)
    reader.version = (1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return bool(reader.load(text) == text)
        except YAMLError:
            return False


def misread_by_ansible(value: Any) -> bool:
    """A plain (unquoted) string that Ansible would read back as something else."""
    return isinstance(value, str) and not isinstance(value, ScalarString) and not _ansible_reads_as_given(value)


def as_ansible_reads_it(value: Any) -> Any:
    """``value`` quoted when Ansible would otherwise read it as something else than this string."""
    return SingleQuotedScalarString(value) if misread_by_ansible(value) else value

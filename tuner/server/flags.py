"""Check llama-server flags against the installed binary's own ``--help`` before starting it.

llama.cpp renames flags between versions (``--mlock``/``--no-mmap`` became ``--load-mode``; ``-fa``
took a value), and llama-server answers an unknown flag by exiting. A trial that fails for that reason
would look like a bad configuration, so every command line is checked first, against the help text of
the very binary that will run it: the flag must exist, it must get as many values as its help shows,
and a value must be one of the choices the help lists, where it lists them.

The help format (``common_arg::to_string`` in llama.cpp's common/arg.cpp): a line starting at column 0
holds the comma-separated names and an optional value hint (``N``, ``TYPE``, ``[on|off|auto]``,
``{none,layer,row}``, two hints for two values); the description follows, continuation lines are
indented. Choices come from the hint, from an "allowed values:" line, or from "- name:" bullets when
those include the documented default (they are not always exhaustive).
"""

from __future__ import annotations

import functools
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tuner.errors import UserError

HELP_TIMEOUT_S = 30
_CHOICE_GROUP = re.compile(r"^[\[{<]([\w.+-]+(?:[|,][\w.+-]+)+)[\]}>]$")
_BULLET = re.compile(r"^\s+- ([\w.+-]+)(?: \(default\))?:")
_ALLOWED = re.compile(r"allowed values:\s*(.+)$", re.M)
_DEFAULT = re.compile(r"\(default: '?([\w.+-]+)")
_NUMERIC_HINTS = frozenset({"N", "M", "SEED", "PORT", "INDEX"})


@dataclass(frozen=True)
class FlagSpec:
    """One option of llama-server as its help describes it."""

    names: tuple[str, ...]
    value_hints: tuple[str, ...]  # one per value the flag takes; empty for a switch
    choices: tuple[str, ...]  # allowed values of the (single) value; empty when any value goes

    @property
    def arity(self) -> int:
        return len(self.value_hints)


def _split_hints(text: str) -> tuple[str, ...]:
    """Split a value-hint string on spaces outside ``<>``, ``[]`` and ``{}``."""
    hints: list[str] = []
    depth = 0
    current = ""
    for char in text:
        if char in "<[{":
            depth += 1
        elif char in ">]}":
            depth = max(0, depth - 1)
        if char == " " and depth == 0:
            if current:
                hints.append(current)
            current = ""
        else:
            current += char
    if current:
        hints.append(current)
    return tuple(hints)


def _parse_head(head: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``-t,    --threads N`` -> names (-t, --threads) and value hints (N,)."""
    parts = [part.strip() for part in head.split(",")]
    names: list[str] = []
    hints: tuple[str, ...] = ()
    for index, part in enumerate(parts):
        words = part.split(" ", 1)
        if not words[0].startswith("-"):
            # a comma inside the value hint (``N0,N1,...``): the rest belongs to the hint
            hints = _split_hints(" ".join(hints) + "," + ",".join(parts[index:])) if hints else hints
            break
        names.append(words[0])
        if len(words) > 1:
            hints = _split_hints(words[1].strip())
    return tuple(names), hints


def _choices(hints: tuple[str, ...], description: list[str]) -> tuple[str, ...]:
    if len(hints) != 1:
        return ()
    group = _CHOICE_GROUP.match(hints[0])
    if group and ".." not in hints[0]:
        return tuple(re.split(r"[|,]", group.group(1)))
    text = "\n".join(description)
    allowed = _ALLOWED.search(text)
    if allowed:
        return tuple(value.strip() for value in allowed.group(1).split(",") if value.strip())
    if hints[0] in _NUMERIC_HINTS:
        return ()
    bullets = tuple(match.group(1) for line in description if (match := _BULLET.match(line)))
    default = _DEFAULT.search(text)
    if bullets and (default is None or default.group(1) in bullets):
        return bullets
    return ()


def parse_help(text: str) -> dict[str, FlagSpec]:
    """Every flag name in a llama-server ``--help`` text -> its spec."""
    entries: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("-") and not line.startswith("-----"):
            head, _, rest = re.sub(r",\s+", ", ", line).partition("  ")
            entries.append((head.strip(), [rest.strip()] if rest.strip() else []))
        elif entries and line.startswith(" "):
            entries[-1][1].append(line)
    flags: dict[str, FlagSpec] = {}
    for head, description in entries:
        names, hints = _parse_head(head)
        spec = FlagSpec(names=names, value_hints=hints, choices=_choices(hints, description))
        for name in names:
            flags[name] = spec
    return flags


def find_problems(flags: dict[str, FlagSpec], args: Sequence[str]) -> list[str]:
    """What is wrong with ``args`` for a binary whose help parsed to ``flags`` (no I/O)."""
    problems: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        # llama.cpp reads --long_name as --long-name
        name = "--" + arg[2:].replace("_", "-") if arg.startswith("--") else arg
        spec = flags.get(name)
        if spec is None:
            what = "unknown flag" if arg.startswith("-") else "unexpected argument (llama-server takes none)"
            problems.append(f"{what} {arg!r}")
            index += 1
            continue
        values = list(args[index + 1:index + 1 + spec.arity])
        if len(values) < spec.arity:
            problems.append(f"{arg} needs {spec.arity} value(s) ({' '.join(spec.value_hints)})")
        elif spec.choices and values[0] not in spec.choices:
            problems.append(f"{arg} {values[0]!r} is not one of {', '.join(spec.choices)}")
        index += 1 + spec.arity
    return problems


@functools.lru_cache(maxsize=8)
def _help_of(binary: str, mtime_ns: int, size: int) -> dict[str, FlagSpec]:
    done = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=HELP_TIMEOUT_S, check=False)
    flags = parse_help(done.stdout + done.stderr)
    if done.returncode != 0 or "--model" not in flags:
        raise UserError(f"{binary} --help did not print llama-server's options (exit {done.returncode})",
                        "rebuild it with `llamahost server build`")
    return flags


def server_flags(binary: Path) -> dict[str, FlagSpec]:
    """The parsed ``--help`` of ``binary``, read once per file version."""
    stat = binary.stat()
    return _help_of(str(binary), stat.st_mtime_ns, stat.st_size)


def check_flags(binary: Path, args: Sequence[str]) -> None:
    """Refuse ``args`` unless ``binary`` accepts every flag and listed value in them."""
    problems = find_problems(server_flags(binary), args)
    if problems:
        raise UserError(f"{binary.name} would refuse these flags: " + "; ".join(problems),
                        f"use flags from `{binary} --help` (llama.cpp renames flags between versions)")

"""Jinja filter: render an argument list as a systemd ``ExecStart=`` command line.

systemd splits ``ExecStart=`` on whitespace, honours double quotes with C-style escapes, expands
``%`` specifiers and ``$`` variables. Every argument goes through here so a model path with a space,
``%`` or ``$`` reaches the server exactly as written.
"""

from __future__ import annotations

import re

_SAFE = re.compile(r"^[A-Za-z0-9_./:=+,@-]+$")


def systemd_exec_args(args):
    words = []
    for arg in args:
        text = str(arg).replace("%", "%%").replace("$", "$$")
        if not _SAFE.match(text):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        words.append(text)
    return " ".join(words)


class FilterModule:
    def filters(self):
        return {"systemd_exec_args": systemd_exec_args}

"""Drain and undrain hooks (``--drain``, ``--undrain``): what a hook is, and running one.

A hook is a shell command, run with ``sh -c`` on the machine the tuner runs on (success: exit 0), or an http(s)
URL that gets a POST (success: a 2xx answer). Each runs under a timeout and gets what it is run for in its
environment, or as the POST's JSON body: ``LLAMAHOST_HOOK`` (drain or undrain), ``LLAMAHOST_RESTART_REASON``
(start, trial, baseline, adopt), ``LLAMAHOST_SERVICE`` and ``LLAMAHOST_SERVER_URL``.
:mod:`tuner.live.drain` decides when they run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from tuner.errors import UserError

OUTPUT_TAIL = 600  # characters of a failed hook's output quoted in the error


@dataclass(frozen=True)
class Hook:
    """``--drain`` or ``--undrain``: a shell command, or an http(s) URL that is POSTed to."""

    name: str  # "drain" or "undrain"
    target: str

    @property
    def is_url(self) -> bool:
        return urlsplit(self.target).scheme in ("http", "https")

    def __str__(self) -> str:
        return f"--{self.name} {self.target!r}"


def parse_hook(name: str, text: str) -> Hook:
    target = text.strip()
    if not target:
        raise UserError(f"--{name} is empty", f"pass a shell command or an http(s) URL, e.g. --{name} "
                                               f"'lbctl {name} $(hostname)'")
    parts = urlsplit(target)
    if "://" in target.split()[0] and parts.scheme not in ("http", "https"):
        raise UserError(f"--{name} {target!r}: only http and https URLs are POSTed to",
                        "pass an http(s) URL, or a shell command (run with sh -c on this machine)")
    if parts.scheme in ("http", "https") and not parts.hostname:
        raise UserError(f"--{name} {target!r} names no host", f"pass e.g. --{name} https://lb.example/api/{name}")
    return Hook(name, target)


@dataclass(frozen=True)
class HookRun:
    ok: bool
    detail: str  # "exit 0", "HTTP 204", "exit 3", "timed out after 30 s", "cannot connect: ..."
    output: str = ""
    seconds: float = 0.0


def run_hook(hook: Hook, env: Mapping[str, str], timeout_s: float) -> HookRun:
    """A command runs with ``sh -c`` and ``env`` added to this process's environment (success: exit 0); a URL
    gets a POST with ``env`` as a JSON body (success: a 2xx answer; a redirect is not followed). Either is
    stopped after ``timeout_s``; a command's whole process group is killed then."""
    started = time.monotonic()
    result = _post(hook.target, env, timeout_s) if hook.is_url else _command(hook.target, env, timeout_s)
    return HookRun(result.ok, result.detail, result.output[-OUTPUT_TAIL:].strip(), time.monotonic() - started)


def _command(command: str, env: Mapping[str, str], timeout_s: float) -> HookRun:
    try:
        process = subprocess.Popen(["sh", "-c", command], env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as exc:
        return HookRun(False, f"cannot run sh: {exc}")
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # its own session: a child holding the pipe dies too
        output, _ = process.communicate()
        return HookRun(False, f"timed out after {timeout_s:g} s (killed)", output.decode(errors="replace"))
    text = output.decode(errors="replace")
    return HookRun(process.returncode == 0, f"exit {process.returncode}", text)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a 3xx is an answer, not a success: the POST is not turned into a GET elsewhere


def _post(url: str, env: Mapping[str, str], timeout_s: float) -> HookRun:
    body = json.dumps(dict(env)).encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "llamahost"})
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=timeout_s) as answer:
            text = answer.read(4096).decode(errors="replace")
            return HookRun(200 <= answer.status < 300, f"HTTP {answer.status}", text)
    except urllib.error.HTTPError as exc:
        return HookRun(False, f"HTTP {exc.code}", exc.read(4096).decode(errors="replace") if exc.fp else "")
    except TimeoutError:
        return HookRun(False, f"timed out after {timeout_s:g} s")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError):
            return HookRun(False, f"timed out after {timeout_s:g} s")
        return HookRun(False, f"cannot connect: {reason}")

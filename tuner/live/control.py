"""How the live tuner changes what a running server runs: one interface, two implementations.

* :class:`tuner.live.local.LocalServer` - a server process on this machine, kept by a small supervisor
  (the CI machine has no systemd; ``llamahost tune --live --local``);
* :class:`tuner.live.systemd.SystemdServer` - the ``llama_server`` role's systemd unit on a host, changed
  through a transient drop-in under ``/run`` (gone after a reboot).

Both share the safety rules: trial settings never touch the baseline configuration, a dead-man switch on
the server side restores the baseline when the controller stops confirming, and one tuner at a time holds
a lock the kernel releases if the holder dies.
"""

from __future__ import annotations

import argparse
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tuner.build_knobs import BuildKnobs
from tuner.config import RunConfig
from tuner.model.gguf_file import ModelInfo
from tuner.probe.host import HostProbe
from tuner.server.identity import ServerBinary


class TrialStartFailed(Exception):
    """A trial configuration did not come up healthy; the message carries the server's log tail."""


class ServerControl(Protocol):
    @property
    def base_url(self) -> str: ...

    @property
    def api_key(self) -> str | None: ...

    @property
    def baseline(self) -> RunConfig: ...

    def start(self, baseline: RunConfig) -> None:
        """Make sure the server runs ``baseline`` (and no leftover trial), healthy, before tuning starts."""

    def apply(self, config: RunConfig) -> None:
        """Run ``config`` (restart, wait for /health) or raise :class:`TrialStartFailed`."""

    def restore_baseline(self) -> None:
        """Back to the baseline configuration, healthy, before anything else happens."""

    @property
    def last_applied(self) -> dict[str, Any]:
        """What the last start did and read back from /proc: ``page_cache_reset`` (the model's pages were
        dropped first, :mod:`tuner.model_pages`), ``cpus_allowed`` and ``model_pages``; a trial records it."""

    def heartbeat(self) -> None:
        """Tell the server side the controller is alive (resets the dead-man switch)."""

    def server_memory_bytes(self) -> int | None:
        """Resident memory of the server process, for the memory guard; None when unknown."""

    @property
    def deadman_seconds(self) -> float:
        """How long the server side waits for a heartbeat before it restores the baseline."""

    def adopt(self, config: RunConfig) -> None:
        """Make ``config`` the configuration the server runs from now on (a proven winner)."""

    def describe(self) -> str: ...

    def server_log(self) -> str:
        """Where a person reads the server's own log (named in messages about a failed start)."""


@dataclass(frozen=True)
class TargetOptions:
    """What the command line says about the server to tune: the typed values the connections are built from
    (they never read an ``argparse.Namespace``). Paths are as given; nothing is checked or opened here."""

    local: bool = False
    port: int = 0  # --local: the supervised server's port
    inventory: Path | None = None
    host: str | None = None
    unit: str | None = None  # --unit: the systemd service of the machine the tuner runs on
    model: Path | None = None  # a local copy of the served GGUF (default: the inventory's, or the embedded model)
    baseline_vars: Path | None = None  # --local: the deployed llama_server_* settings
    host_vars: Path | None = None
    apply: bool = False
    deadman: str = "60s"
    max_server_memory: float = 0.9

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TargetOptions:
        def path(value: object) -> Path | None:
            return Path(str(value)) if value else None

        return cls(local=bool(args.local), port=int(args.port), inventory=path(args.inventory), host=args.host or None,
                   unit=getattr(args, "unit", None) or None, model=path(args.model),
                   baseline_vars=path(args.baseline_vars), host_vars=path(args.host_vars), apply=bool(args.apply),
                   deadman=str(args.deadman), max_server_memory=float(args.max_server_memory))


@dataclass(frozen=True)
class Target:
    """What a live run needs to know about the server it tunes (read once the lock is held)."""

    model: ModelInfo
    model_sha256: str
    probe: HostProbe
    deployed: RunConfig | None
    server: ServerBinary | None = None  # the llama-server build the deployment runs, when it can be read
    numa_blocked: str | None = None  # why the model's pages cannot be put back between trials (tuner.model_pages)
    usable_cpus: tuple[int, ...] | None = None  # the CPUs trials may pin (the inference CPUs); None: every CPU
    knobs: BuildKnobs | None = None  # the build-dependent settings the deployed build offers (None: none searched)


class Connection(Protocol):
    """The server to tune: its control, the one-tuner lock, and a way to describe it."""

    @property
    def control(self) -> ServerControl: ...

    def lock(self) -> AbstractContextManager[None]: ...

    def describe(self) -> Target: ...

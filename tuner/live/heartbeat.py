"""The dead-man switch's clock: a heartbeat holds the host's seconds since boot, not a file time.

A dead-man switch that compares a file's modification time with the wall clock fires early when the clock
steps forward (an NTP correction, a hand-set date) and never when it steps back. Seconds since boot
(``CLOCK_BOOTTIME``, the first field of ``/proc/uptime``) only move forward, keep counting through a suspend,
and are one clock for every process on the host, so the tuner writes them and the switch reads them: the
supervisor of a local server here, the shell script of the systemd switch on a host (the same format, written
and read with ``/proc/uptime``).
"""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path

# Shell: write the host's seconds since boot into a heartbeat file, atomically (the reader never sees it empty).
# The temporary file is the writing shell's own ($$): the heartbeat thread and a command that beats first (the
# dead-man start before a trial) may write at the same moment, and with one shared name the second `mv` failed.
SHELL_WRITE = "cut -d' ' -f1 /proc/uptime > {path}.$$ && mv -f {path}.$$ {path}"


def boot_seconds() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def write_heartbeat(path: Path) -> None:
    """Atomically. The temporary file is this thread's own: the heartbeat thread and a control command that beats
    first (applying a trial) write at the same moment, and with one name per process the second rename failed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    # Rounded down, as /proc/uptime is: a beat rounded up would lie in the future and read as a negative age.
    tmp.write_text(f"{math.floor(boot_seconds() * 100) / 100:.2f}\n")
    os.replace(tmp, path)


def heartbeat_age(path: Path) -> float:
    """Seconds since the last heartbeat; infinite when there is none or it cannot be read (a switch then fires:
    no proof of a live controller is no controller)."""
    try:
        beat = float(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return math.inf
    return max(0.0, boot_seconds() - beat) if math.isfinite(beat) else math.inf

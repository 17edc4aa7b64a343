"""Progress while tuning: a live bar with ETA on a terminal, one line per event in a log.

Overnight runs write to a log file or the journal, where a redrawn bar is noise; there every finished
trial is one timestamped line instead. Both go to stderr so ``--json`` output on stdout stays clean.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class TuneProgress:
    """Budget-driven progress: the search ends when the budget does, so ETA = budget - elapsed."""

    def __init__(self, budget_seconds: float, *, title: str, console: Console | None = None) -> None:
        self.budget = budget_seconds
        self.started = time.monotonic()
        self.console = console or Console(file=sys.stderr, highlight=False, soft_wrap=not sys.stderr.isatty())
        self.live = self.console.is_terminal
        self.title = title
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self.status = "starting"

    def __enter__(self) -> TuneProgress:
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"), TextColumn("{task.fields[status]}"),
                console=self.console, transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.title, total=self.budget, eta=_clock(self.budget),
                                                 status=self.status)
        else:
            self.console.print(f"{self.title}: budget {_clock(self.budget)}")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def update(self, status: str) -> None:
        self.status = status
        if self._progress is not None and self._task is not None:
            elapsed = min(self.elapsed, self.budget)
            self._progress.update(self._task, completed=elapsed, eta=_clock(self.budget - elapsed), status=status)

    def event(self, message: str) -> None:
        """Something worth a line of its own (a finished trial, a failure, a phase change)."""
        stamp = _clock(self.elapsed)
        if self._progress is not None:
            self._progress.console.print(f"[dim]{stamp}[/dim] {message}")
        else:
            eta = _clock(max(0.0, self.budget - self.elapsed))
            self.console.print(f"[{stamp} ETA {eta}] {message}")
        self.update(self.status)

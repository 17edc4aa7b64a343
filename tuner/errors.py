"""One error type for everything a user can fix.

Bad input must end in a clear message that names the problem and the fix, exit code 2, and no traceback.
Code that detects such a problem raises :class:`UserError`; the command line turns it into that message.
Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_USAGE = 2


class UserError(Exception):
    """A problem in the user's input or environment, with the fix spelled out."""

    def __init__(self, problem: str, fix: str = "") -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix

    def __str__(self) -> str:
        if self.fix:
            return f"{self.problem}\n  fix: {self.fix}"
        return self.problem


class TrialFailed(Exception):
    """The trial produced no valid measurement; ``reason`` says why, for the study record.

    Here rather than beside the trial runner, so the command line can catch it without importing the runner."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

"""Errors a user can fix. The CLI turns them into one clear line and a non-zero exit.

`CaseError` names the case and the reason; batch stages collect them, carry on with the other
cases, and exit with `EXIT_SKIPPED` when any case was skipped.
"""

from __future__ import annotations

EXIT_USAGE = 2
"""A user error: bad option, missing folder, unreadable config."""
EXIT_SKIPPED = 3
"""The stage finished but skipped at least one bad case (each named on its own line)."""


class PetctlError(Exception):
    """An error with a message fit to show a user as one line."""


class CaseError(PetctlError):
    """A single case cannot be used; `case` says which, the message says why."""

    def __init__(self, case: str, reason: str) -> None:
        super().__init__(f"{case}: {reason}")
        self.case = case
        self.reason = reason

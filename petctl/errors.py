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


def case_reason(case: str, exc: BaseException, limit: int = 300) -> str:
    """Why `case` was skipped, as one line without the case's own name (its line puts it in front).

    A `CaseError` gives its reason; any other error its message with a leading "case: " dropped, and
    one that is not a `PetctlError` (a reader's bug, MemoryError) its type's name in front, so the
    line says what broke. Whitespace (a traceback-like multi-line message) collapses to single
    spaces and a long message is cut at `limit` characters.
    """
    if isinstance(exc, CaseError):
        text = exc.reason
    else:
        text = str(exc).strip()
        text = text[len(case) + 2:] if text.startswith(f"{case}: ") else text
        if not isinstance(exc, PetctlError):
            text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    text = " ".join(text.split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"

"""One rich console for the whole CLI, plus the one-line error printer and progress factory."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console()
err_console = Console(stderr=True)


def error_line(message: str) -> None:
    """Print one clear error line on stderr (no traceback)."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


def warning_line(message: str) -> None:
    """Print one warning line on stderr: the work goes on (a demo's plan past its time budget, a case skipped)."""
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def warn_line(message: str) -> None:
    err_console.print(f"[yellow]skipped:[/] {message}", highlight=False, soft_wrap=True)


def progress(disable: bool | None = None) -> Progress:
    """A progress bar that disables itself when stderr is not a terminal-like sink."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        disable=bool(disable) if disable is not None else False,
        transient=not sys.stderr.isatty(),
    )

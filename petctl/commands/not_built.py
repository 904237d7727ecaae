"""Verbs that the CLI already names but whose capability is not built yet.

They say so in one line and exit with `EXIT_NOT_BUILT`, so scripts can tell them apart.
"""

from __future__ import annotations

from typing import Callable

import typer

from petctl.errors import EXIT_NOT_BUILT

VERBS = ("slurm", "demo")

_HELP = {
    "slurm": "Generate and submit sbatch scripts for the whole chain (not built yet).",
    "demo": "The whole method end to end on the embedded synthetic cohort (not built yet).",
}


def help_for(verb: str) -> str:
    return _HELP[verb]


def make(verb: str) -> Callable[[typer.Context], None]:
    def command(ctx: typer.Context) -> None:
        from petctl.console import error_line

        error_line(f"`petctl {verb}` is not built yet in this version.")
        raise typer.Exit(EXIT_NOT_BUILT)

    command.__name__ = verb.replace("-", "_")
    return command

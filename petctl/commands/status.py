"""Show the run registry: runs, their steps, status, times and key metrics."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from petctl.engine.registry import Registry, RegistryWarning, RunRecord, StepRecord, json_safe
from petctl.home import resolve_home

MAX_METRICS = 4
STATUS_STYLE = {"pending": "dim", "running": "cyan", "done": "green", "failed": "bold red"}


@dataclass(frozen=True)
class StepColumn:
    """One column of the steps table: its header and how to render a step into a cell."""

    header: str
    cell: Callable[[StepRecord], str]
    no_wrap: bool = True


def _time(stamp: str | None) -> str:
    return stamp[:19].replace("T", " ") if stamp else "-"


def _parse(stamp: str | None) -> datetime | None:
    """An ISO-8601 time; one without a zone (hand-written, or another tool's) is taken as UTC, as petctl writes."""
    try:
        when = datetime.fromisoformat(stamp) if isinstance(stamp, str) and stamp else None
    except ValueError:
        return None
    return when.replace(tzinfo=timezone.utc) if when is not None and when.tzinfo is None else when


def format_duration(seconds: float) -> str:
    """`42s`, `3m05s`, `2h07m`, `1d04h`."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def duration(step: StepRecord, now: datetime | None = None) -> str:
    """Run time of the latest attempt; a running step counts up to now (marked with `…`)."""
    start = _parse(step.started)
    if start is None:
        return "-"
    end = _parse(step.ended)
    if end is None:
        if step.status != "running":
            return "-"
        return format_duration(((now or datetime.now(timezone.utc)) - start).total_seconds()) + "…"
    return format_duration((end - start).total_seconds())


def key_metrics(metrics: dict[str, Any], limit: int = MAX_METRICS) -> str:
    """The `limit` most recently written numeric metrics as `name=value`, 4 significant digits."""
    numeric = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return " ".join(f"{k}={v:.4g}" for k, v in numeric[-limit:])


def _status_cell(step: StepRecord) -> str:
    return f"[{STATUS_STYLE.get(step.status, '')}]{step.status}[/]"


def _metrics_cell(step: StepRecord) -> str:
    text = key_metrics(step.metrics)
    if step.status == "failed" and step.message:
        from rich.markup import escape

        return f"{text}\n[red]{escape(step.message)}[/]" if text else f"[red]{escape(step.message)}[/]"
    return text


def step_columns() -> list[StepColumn]:
    """The steps table's columns. The SLURM state is looked up lazily, once per table, and only
    when a step has a SLURM job id (`JobStates`: squeue, then scontrol, then sacct; "–" without SLURM)."""
    from petctl.engine.slurm import JobStates

    slurm = JobStates()
    return [
        StepColumn("step", lambda s: s.step),
        StepColumn("kind", lambda s: s.kind),
        StepColumn("status", _status_cell),
        StepColumn("tries", lambda s: str(s.attempts)),
        StepColumn("started (UTC)", lambda s: _time(s.started)),
        StepColumn("duration", duration),
        StepColumn("host", lambda s: s.host or "-"),
        StepColumn("SLURM job", lambda s: s.slurm_job_id or "-"),
        StepColumn("SLURM state", lambda s: slurm.state(s.slurm_job_id)),
        StepColumn("metrics / message", _metrics_cell, no_wrap=False),
    ]


def collect(registry: Registry, run: str | None = None) -> list[tuple[RunRecord, list[StepRecord]]]:
    """The runs to show (all, or just `run`) with their steps."""
    records = [registry.run(run)] if run is not None else registry.runs()
    return [(record, registry.steps(record.run)) for record in records]


def as_json(home: Path, runs: Sequence[tuple[RunRecord, list[StepRecord]]]) -> dict[str, Any]:
    return {
        "home": str(home),
        "runs": [{**record.to_json(), "steps": [s.to_json() for s in steps]} for record, steps in runs],
    }


def _render(runs: Sequence[tuple[RunRecord, list[StepRecord]]], home: Path) -> None:
    from rich.table import Table

    from petctl.console import console

    overview = Table(title=f"runs in {home}", title_justify="left")
    for header in ("run", "kind", "parent", "created (UTC)", "done/total", "failed"):
        overview.add_column(header, no_wrap=True)
    for record, steps in runs:
        done = sum(s.status == "done" for s in steps)
        failed = sum(s.status == "failed" for s in steps)
        overview.add_row(
            record.run, record.kind, record.parent or "-", _time(record.created), f"{done}/{len(steps)}",
            f"[bold red]{failed}[/]" if failed else "0",
        )
    console.print(overview)

    columns = step_columns()
    for record, steps in runs:
        if not steps:
            continue
        table = Table(title=f"run {record.run}", title_justify="left")
        for column in columns:
            table.add_column(column.header, no_wrap=column.no_wrap, overflow="fold")
        for step in steps:
            table.add_row(*(column.cell(step) for column in columns))
        console.print(table)


def status(
    run: Annotated[Optional[str], typer.Option("--run", help="Show only this run.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")] = False,
    home: Annotated[
        Optional[Path], typer.Option("--home", help="petctl home folder (default: $PETCTL_HOME, else ./cache).")
    ] = None,
) -> None:
    """Print the registry under HOME as tables, or as JSON with `--json`."""
    home_dir = resolve_home(home)
    registry = Registry(home_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RegistryWarning)  # unreadable files show as rows instead
        runs = collect(registry, run)
    if json_out:
        typer.echo(json.dumps(json_safe(as_json(home_dir, runs)), indent=2, allow_nan=False))
        return
    if not runs:
        typer.echo(f"No runs in {home_dir}.")
        return
    _render(runs, home_dir)

"""Shared pieces of the benchmark scripts: single-thread pinning, timing records, sizes, the table.

Benchmarks print ratios against baselines measured in the same run (see shared STYLE.md); this
module holds what every such script needs so that each script is only its approaches.
Import it before numpy/torch and call `pin_threads()` first: thread pools read their environment
variables once, at import.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS", "NUMEXPR_MAX_THREADS", "BLOSC_NTHREADS", "VECLIB_MAXIMUM_THREADS")


def pin_threads() -> None:
    """One thread for every pool (OpenMP, BLAS, numexpr, Blosc); call before importing numpy/torch."""
    for var in _THREAD_VARS:
        os.environ[var] = "1"


def pin_torch_threads() -> None:
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)


@dataclass
class Measure:
    """One approach's result: `num_patches` made in `cpu_seconds` of this process's CPU time
    (`wall_seconds` of wall clock), reading `disk_bytes` of files."""

    name: str
    num_patches: int
    cpu_seconds: float
    wall_seconds: float
    disk_bytes: int
    note: str = ""

    @property
    def rate(self) -> float:
        """Patches per CPU-second (nan when the approach did not run).

        Single-threaded work on page-cache-hot files, so this is the rate on an idle core; unlike
        wall clock it does not depend on what other processes do on a shared machine.
        """
        return self.num_patches / self.cpu_seconds if self.cpu_seconds > 0 and self.num_patches > 0 else math.nan


def not_run(name: str, disk_bytes: int, why: str) -> Measure:
    return Measure(name, 0, math.nan, math.nan, disk_bytes, why)


@dataclass
class Approach:
    """One way of producing patches: `step(item)` does one unit of work and returns its patch count."""

    name: str
    step: Callable[[Any], int]
    items: list[Any]
    disk_bytes: int
    note: str = ""


def run_interleaved(approaches: list[Approach], rounds: int) -> dict[str, Measure]:
    """Time every approach on its items (CPU and wall clock), in `rounds` alternating slices.

    On a shared machine a burst of load from other processes (or a cache effect) then hits all
    approaches alike instead of whichever ran at that moment. Item order is kept within an
    approach, so approaches given the same items see the same sequence.
    """
    cpu = {a.name: 0.0 for a in approaches}
    wall = {a.name: 0.0 for a in approaches}
    patches = {a.name: 0 for a in approaches}
    for r in range(rounds):
        for a in approaches:
            part = a.items[r * len(a.items) // rounds : (r + 1) * len(a.items) // rounds]
            c0, w0 = time.process_time(), time.perf_counter()
            patches[a.name] += sum(a.step(item) for item in part)
            cpu[a.name] += time.process_time() - c0
            wall[a.name] += time.perf_counter() - w0
    return {a.name: Measure(a.name, patches[a.name], cpu[a.name], wall[a.name], a.disk_bytes, a.note) for a in approaches}


def disk_bytes(paths: Iterable[Path]) -> int:
    """Total size of the given files and of every file below the given folders."""
    total = 0
    for p in paths:
        p = Path(p)
        if p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        elif p.exists():
            total += p.stat().st_size
    return total


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def ratio(ours: Measure, other: Measure) -> float:
    """ours.rate / other.rate (nan when either did not run)."""
    return ours.rate / other.rate if other.rate > 0 else math.nan


def print_table(title: str, ours: Measure, others: list[Measure]) -> None:
    """A rich table: one row per approach, with our speed-up over it."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col, justify in (("approach", "left"), ("patches", "right"), ("CPU s", "right"), ("wall s", "right"),
                         ("patches/s", "right"), (f"{ours.name} speed-up", "right"), ("on disk", "right"), ("note", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for m in [ours, *others]:
        r = ratio(ours, m)
        speedup = "—" if m is ours else ("n/a" if math.isnan(r) else f"{r:.2f}×")
        table.add_row(m.name, str(m.num_patches), f"{m.cpu_seconds:.2f}", f"{m.wall_seconds:.2f}", f"{m.rate:.1f}", speedup,
                      human_bytes(m.disk_bytes), m.note)
    Console(width=160, markup=False, highlight=False).print(table)

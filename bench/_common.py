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
    """One approach's result: `num_patches` produced in `seconds`, reading `disk_bytes` of files."""

    name: str
    num_patches: int
    seconds: float
    disk_bytes: int
    note: str = ""

    @property
    def rate(self) -> float:
        """Patches per second (nan when the approach did not run)."""
        return self.num_patches / self.seconds if self.seconds > 0 and self.num_patches > 0 else math.nan


def not_run(name: str, disk_bytes: int, why: str) -> Measure:
    return Measure(name, 0, math.nan, disk_bytes, why)


def timed(fn: Callable[[Any], Any], items: Iterable[Any]) -> float:
    """Seconds to call `fn` on every item (wall clock)."""
    t0 = time.perf_counter()
    for item in items:
        fn(item)
    return time.perf_counter() - t0


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
    for col, justify in (("approach", "left"), ("patches", "right"), ("seconds", "right"), ("patches/s", "right"),
                         (f"{ours.name} speed-up", "right"), ("on disk", "right"), ("note", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for m in [ours, *others]:
        speedup = "—" if m is ours else f"{ratio(ours, m):.2f}×"
        table.add_row(m.name, str(m.num_patches), f"{m.seconds:.2f}", f"{m.rate:.1f}", speedup, human_bytes(m.disk_bytes), m.note)
    Console(width=160).print(table)

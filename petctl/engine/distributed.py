"""All accelerate / process-group plumbing in one place.

Model builders, samplers and metrics know nothing about distribution; the trainer asks this module
for the `Accelerator`, rank-aware printing, reductions, a cross-rank "stop now" vote (for
SIGTERM/SIGUSR1), and a careful teardown (gloo can abort at exit when references outlive the
process group).
"""

from __future__ import annotations

import datetime as dt
import gc
import signal
from typing import Any

import torch


def make_accelerator(mixed_precision: str, grad_accum: int, timeout_s: int, project_dir: str | None = None):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    kwargs = [InitProcessGroupKwargs(timeout=dt.timedelta(seconds=timeout_s))]
    log_with = None
    try:
        import tensorboard  # noqa: F401

        log_with = "tensorboard"
    except ImportError:
        pass
    return Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        kwargs_handlers=kwargs,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=project_dir, logging_dir=project_dir) if project_dir else None,
    )


class StopFlag:
    """Set by SIGTERM/SIGUSR1 (what SLURM sends before preemption or the time limit)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> "StopFlag":
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def any_rank(accelerator, flag: bool) -> bool:
    """True on every rank when any rank says True (one tiny all-reduce)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def mean_over_ranks(accelerator, value: float, count: int = 1) -> float:
    """Mean of per-rank sums weighted by counts."""
    t = torch.tensor([value * count, float(count)], device=accelerator.device, dtype=torch.float64)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return float(t[0] / t[1]) if t[1] > 0 else float("nan")


def gather_objects(accelerator, items: list[Any]) -> list[Any]:
    """Concatenate picklable per-rank lists on every rank."""
    if accelerator.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object

    return list(gather_object(items))


def teardown(accelerator, *refs: Any) -> None:
    """wait, drop references, free memory, collect, end — the order that held in repeated gloo runs."""
    accelerator.wait_for_everyone()
    del refs
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

"""The cyclical cosine learning-rate schedule of the paper (C cycles × E epochs, NAdam at 5e-4).

Within each cycle the rate falls along a half cosine from its maximum towards its minimum and
restarts at the maximum on the first step of the next cycle, so each cycle ends at a low-rate
snapshot. An optional linear warmup occupies the first steps of the first cycle only; cycle
boundaries stay at multiples of `steps_per_cycle` so that they line up with epochs.
`cyclic_cosine_lr` is the pure formula; `make_scheduler` wraps it as a torch `LambdaLR`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def cycle_of(step: int, steps_per_cycle: int) -> int:
    """The 0-based cycle that optimizer step `step` (0-based) belongs to."""
    if steps_per_cycle < 1:
        raise ValueError(f"steps_per_cycle must be >= 1, got {steps_per_cycle}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return step // steps_per_cycle


def cyclic_cosine_lr(step: int, steps_per_cycle: int, lr_max: float, lr_min: float = 0.0, warmup_steps: int = 0) -> float:
    """Learning rate at 0-based optimizer step `step`.

    At position p = step mod steps_per_cycle the rate is
    lr_min + (lr_max − lr_min) · (1 + cos(π · p / steps_per_cycle)) / 2: lr_max at p = 0, and
    one step short of lr_min at the cycle's last step (as torch's CosineAnnealingWarmRestarts),
    so no step is spent at lr_min = 0. With warmup, steps 0..warmup_steps−1 rise linearly
    to lr_max · warmup_steps / (warmup_steps + 1) and the first cycle's cosine runs over the
    remaining steps_per_cycle − warmup_steps steps.
    """
    cycle = cycle_of(step, steps_per_cycle)
    if not 0.0 <= lr_min <= lr_max:
        raise ValueError(f"need 0 <= lr_min <= lr_max, got lr_min={lr_min}, lr_max={lr_max}")
    if not 0 <= warmup_steps < steps_per_cycle:
        raise ValueError(f"need 0 <= warmup_steps < steps_per_cycle, got {warmup_steps} and {steps_per_cycle}")
    position = step - cycle * steps_per_cycle
    length = steps_per_cycle
    if cycle == 0 and warmup_steps:
        if position < warmup_steps:
            return lr_max * (position + 1) / (warmup_steps + 1)
        position -= warmup_steps
        length -= warmup_steps
    return lr_min + (lr_max - lr_min) * 0.5 * (1.0 + math.cos(math.pi * position / length))


class CyclicCosineFactor:
    """The per-step factor of `make_scheduler` as a callable object — LambdaLR keeps an object's
    fields in its state dict, so a last cycle cut short (`retime`) resumes as cut.

    `retime(step, end)` lets the last cycle end at `end` instead (never past its planned end): from
    `step` on, the part of the cosine not yet run is spread over the steps left, so the rate keeps its
    value at `step` and still falls to the minimum at the new end (a training deadline's cut, undone
    in part or whole when the steps speed up again)."""

    def __init__(self, steps_per_cycle: int, num_cycles: int, lr_min_ratio: float = 0.0, warmup_steps: int = 0) -> None:
        if num_cycles < 1:
            raise ValueError(f"num_cycles must be >= 1, got {num_cycles}")
        cyclic_cosine_lr(0, steps_per_cycle, 1.0, lr_min_ratio, warmup_steps)  # validate now, not at the first step()
        self.steps_per_cycle, self.num_cycles = steps_per_cycle, num_cycles
        self.lr_min_ratio, self.warmup_steps = lr_min_ratio, warmup_steps
        self.cut: list[float] | None = None  # [from_step, cosine progress there, end_step] once retimed

    @property
    def total_steps(self) -> int:
        return int(self.cut[2]) if self.cut else self.steps_per_cycle * self.num_cycles

    def progress(self, step: int) -> float:
        """How far along its cosine (0..1) the last cycle is at `step`."""
        if self.cut and step >= self.cut[0]:
            from_step, p0, end = self.cut
            return min(1.0, p0 + (1.0 - p0) * (step - from_step) / (end - from_step))
        start = (self.num_cycles - 1) * self.steps_per_cycle
        position, length = step - start, self.steps_per_cycle
        if self.num_cycles == 1 and self.warmup_steps:
            position, length = position - self.warmup_steps, length - self.warmup_steps
        return min(1.0, max(0.0, position / length))

    def retime(self, step: int, end_step: int) -> None:
        """End the last cycle at `end_step` (step < end_step ≤ its planned end), from `step` on."""
        start, planned = (self.num_cycles - 1) * self.steps_per_cycle, self.steps_per_cycle * self.num_cycles
        if not start <= step < min(end_step, self.total_steps) or end_step > planned:
            raise ValueError(f"retime: need {start} <= step {step} < end {end_step} <= {planned} and step < {self.total_steps} "
                             "(the last cycle only, never past its plan)")
        if self.num_cycles == 1 and step < self.warmup_steps:
            raise ValueError(f"retime: step {step} is still in the warmup ({self.warmup_steps} steps)")
        self.cut = [int(step), self.progress(step), int(end_step)]

    def __call__(self, step: int) -> float:
        if step >= self.total_steps:
            return self.lr_min_ratio
        if self.cut and step >= self.cut[0]:
            return self.lr_min_ratio + (1.0 - self.lr_min_ratio) * 0.5 * (1.0 + math.cos(math.pi * self.progress(step)))
        return cyclic_cosine_lr(step, self.steps_per_cycle, 1.0, self.lr_min_ratio, self.warmup_steps)


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    steps_per_cycle: int,
    num_cycles: int,
    lr_min_ratio: float = 0.0,
    warmup_steps: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step `LambdaLR` scaling each group's base lr by the cyclic cosine factor.

    Call `scheduler.step()` after every optimizer step. Past the last cycle
    (step >= steps_per_cycle · num_cycles) the factor stays at `lr_min_ratio` rather than
    starting a cycle that was not asked for. The factor is a `CyclicCosineFactor`
    (`scheduler.lr_lambdas[0]`), whose fields — a deadline's cut among them — the state dict keeps
    beside the step count and base lrs: resume by rebuilding the scheduler with the same arguments
    and calling `load_state_dict` (a state dict written before the factor was an object restores no cut).
    """
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, CyclicCosineFactor(steps_per_cycle, num_cycles, lr_min_ratio, warmup_steps))

"""Cyclic cosine schedule: restarts, monotone fall, end-of-cycle floor, warmup, scheduler resume."""

from __future__ import annotations

import io
import math

import pytest
import torch

from petctl.engine.schedule import cycle_of, cyclic_cosine_lr, make_scheduler

CASES = [
    # steps_per_cycle, lr_max, lr_min, warmup_steps
    (10, 5e-4, 0.0, 0),
    (37, 5e-4, 1e-5, 0),
    (100, 1.0, 0.1, 0),
    (50, 5e-4, 0.0, 5),
    (8, 2e-3, 1e-4, 3),
]


@pytest.mark.parametrize(("steps_per_cycle", "lr_max", "lr_min", "warmup_steps"), CASES)
def test_restarts_at_lr_max_exactly_at_each_cycle_boundary(steps_per_cycle: int, lr_max: float, lr_min: float,
                                                            warmup_steps: int) -> None:
    for cycle in range(1 if warmup_steps else 0, 5):
        boundary = cycle * steps_per_cycle
        assert cyclic_cosine_lr(boundary, steps_per_cycle, lr_max, lr_min, warmup_steps) == lr_max
        assert cycle_of(boundary, steps_per_cycle) == cycle
        if boundary:
            before = cyclic_cosine_lr(boundary - 1, steps_per_cycle, lr_max, lr_min, warmup_steps)
            length = steps_per_cycle - (warmup_steps if cycle == 1 else 0)
            assert before - lr_min <= (lr_max - lr_min) * math.pi ** 2 / (4 * length ** 2) + 1e-15
            assert cycle_of(boundary - 1, steps_per_cycle) == cycle - 1


@pytest.mark.parametrize(("steps_per_cycle", "lr_max", "lr_min", "warmup_steps"), CASES)
def test_falls_strictly_within_a_cycle_and_ends_near_lr_min(steps_per_cycle: int, lr_max: float, lr_min: float,
                                                           warmup_steps: int) -> None:
    for cycle in range(3):
        first = cycle * steps_per_cycle + (warmup_steps if cycle == 0 else 0)
        lrs = [cyclic_cosine_lr(s, steps_per_cycle, lr_max, lr_min, warmup_steps)
               for s in range(first, (cycle + 1) * steps_per_cycle)]
        assert lrs[0] == lr_max
        assert all(a > b for a, b in zip(lrs, lrs[1:]))
        assert all(lr_min <= lr <= lr_max for lr in lrs)
        # One step short of the end of the half cosine: (1 − cos(π / L)) / 2 ≤ π² / (4 L²) of the range.
        length = len(lrs)
        assert lrs[-1] - lr_min <= (lr_max - lr_min) * math.pi ** 2 / (4 * length ** 2) + 1e-15


@pytest.mark.parametrize("steps_per_cycle", [2, 10, 64])
def test_halfway_through_a_cycle_is_the_midpoint(steps_per_cycle: int) -> None:
    half = cyclic_cosine_lr(3 * steps_per_cycle + steps_per_cycle // 2, steps_per_cycle, 1e-3, 1e-4)
    assert half == pytest.approx(0.5 * (1e-3 + 1e-4), rel=1e-12)


@pytest.mark.parametrize("warmup_steps", [1, 4, 9])
def test_warmup_rises_linearly_in_the_first_cycle_only(warmup_steps: int) -> None:
    steps_per_cycle, lr_max = 10, 5e-4
    warm = [cyclic_cosine_lr(s, steps_per_cycle, lr_max, 0.0, warmup_steps) for s in range(warmup_steps + 1)]
    assert warm == pytest.approx([lr_max * (s + 1) / (warmup_steps + 1) for s in range(warmup_steps)] + [lr_max])
    # The second cycle starts at lr_max and falls from its first step: no second warmup.
    second = [cyclic_cosine_lr(s, steps_per_cycle, lr_max, 0.0, warmup_steps) for s in range(10, 20)]
    no_warmup = [cyclic_cosine_lr(s, steps_per_cycle, lr_max) for s in range(10, 20)]
    assert second == no_warmup


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"step": -1}, "step"),
        ({"steps_per_cycle": 0}, "steps_per_cycle"),
        ({"lr_min": 1.0}, "lr_min"),
        ({"warmup_steps": 10}, "warmup_steps"),
    ],
)
def test_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"step": 0, "steps_per_cycle": 10, "lr_max": 0.5, "lr_min": 0.0, "warmup_steps": 0} | kwargs
    with pytest.raises(ValueError, match=match):
        cyclic_cosine_lr(**args)


def make_optimizer(lr: float = 5e-4) -> torch.optim.Optimizer:
    return torch.optim.NAdam([torch.nn.Parameter(torch.zeros(3))], lr=lr)


@pytest.mark.parametrize(("steps_per_cycle", "num_cycles", "lr_min_ratio", "warmup_steps"),
                         [(7, 3, 0.0, 0), (12, 2, 0.02, 4)])
def test_scheduler_follows_the_formula_and_holds_the_floor_after_the_last_cycle(
        steps_per_cycle: int, num_cycles: int, lr_min_ratio: float, warmup_steps: int) -> None:
    base_lr = 5e-4
    optimizer = make_optimizer(base_lr)
    scheduler = make_scheduler(optimizer, steps_per_cycle, num_cycles, lr_min_ratio, warmup_steps)
    total = steps_per_cycle * num_cycles
    for step in range(total + 3):
        expected = (base_lr * lr_min_ratio if step >= total else
                    cyclic_cosine_lr(step, steps_per_cycle, base_lr, base_lr * lr_min_ratio, warmup_steps))
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-18)
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("resume_at", [0, 5, 13, 21])
def test_scheduler_state_dict_round_trip_gives_the_same_next_lrs(resume_at: int) -> None:
    args = (7, 3, 0.01, 2)
    optimizer = make_optimizer()
    scheduler = make_scheduler(optimizer, *args)
    for _ in range(resume_at):
        optimizer.step()
        scheduler.step()
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed_optimizer = make_optimizer()
    resumed = make_scheduler(resumed_optimizer, *args)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    resumed.load_state_dict(saved["scheduler"])
    assert resumed.last_epoch == resume_at
    for _ in range(10):
        for opt, sched in ((optimizer, scheduler), (resumed_optimizer, resumed)):
            opt.step()
            sched.step()
        assert resumed_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
        assert resumed.get_last_lr() == scheduler.get_last_lr()


def test_make_scheduler_validates_at_construction() -> None:
    with pytest.raises(ValueError, match="num_cycles"):
        make_scheduler(make_optimizer(), 10, 0)
    with pytest.raises(ValueError, match="warmup_steps"):
        make_scheduler(make_optimizer(), 10, 2, warmup_steps=10)


@pytest.mark.parametrize("num_cycles, lr_min", [(1, 0.02), (3, 0.0)])
def test_a_cut_last_cycle_keeps_the_rate_and_still_reaches_the_minimum(num_cycles, lr_min):
    from petctl.engine.schedule import CyclicCosineFactor

    spc = 100
    f = CyclicCosineFactor(spc, num_cycles, lr_min)
    start = (num_cycles - 1) * spc
    plain = [f(s) for s in range(start, start + spc)]
    step, end = start + 30, start + 70
    f.retime(step, end)
    assert f.total_steps == end and f(step) == pytest.approx(plain[30])  # no jump where the cut starts
    assert [f(s) for s in range(start, step)] == pytest.approx(plain[:30])  # nothing before it moves
    cut = [f(s) for s in range(step, end)]
    assert all(a > b for a, b in zip(cut, cut[1:]))  # still falling, faster
    assert cut[-1] < plain[69] and f(end) == lr_min and f(end + 5) == lr_min
    assert cut[-1] == pytest.approx(lr_min, abs=0.01)  # one step short of the minimum, as an uncut cycle ends
    f.retime(step + 20, end - 10)  # a second cut continues from where the first had got to
    assert f(step + 20) == pytest.approx(cut[20]) and f.total_steps == end - 10
    before = f(step + 25)
    f.retime(step + 25, start + spc)  # faster again: back to the planned end, still continuous
    assert f(step + 25) == pytest.approx(before) and f.total_steps == start + spc
    with pytest.raises(ValueError):
        f.retime(step + 40, start + spc + 5)  # never past the plan
    with pytest.raises(ValueError):
        f.retime(start + spc, start + spc)  # nor after the end
    if num_cycles > 1:
        with pytest.raises(ValueError):
            CyclicCosineFactor(spc, num_cycles, lr_min).retime(start - 10, start + 50)  # the last cycle only


def test_the_cut_resumes_from_the_state_dict_and_old_state_dicts_load():
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = make_scheduler(opt, 100, 1, lr_min_ratio=0.02)
    for _ in range(40):
        opt.step()
        sched.step()
    sched.lr_lambdas[0].retime(40, 60)
    state = sched.state_dict()
    fresh_opt = torch.optim.SGD(model.parameters(), lr=1.0)
    fresh = make_scheduler(fresh_opt, 100, 1, lr_min_ratio=0.02)
    fresh.load_state_dict(state)
    assert fresh.lr_lambdas[0].total_steps == 60 and fresh.lr_lambdas[0](50) == pytest.approx(sched.lr_lambdas[0](50))
    old = {**state, "lr_lambdas": [None]}  # written when the factor was a closure: no cut to restore
    before = make_scheduler(torch.optim.SGD(model.parameters(), lr=1.0), 100, 1, lr_min_ratio=0.02)
    before.load_state_dict(old)
    assert before.lr_lambdas[0].cut is None and before.lr_lambdas[0].total_steps == 100

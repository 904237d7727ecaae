"""The demo's time budget: how many epochs fit the minutes a user gave on the machine at hand.

The CPU machines the demo runs on differ by about 2× in speed per training step (the same demo took
16½ minutes on one and 31 on another). Before training, `probe_seg_step` times a few real training
steps of the preset's segmentation net (one thread each, as many side by side as folds train at
once, since they share the memory bandwidth); `fit_epochs` then scales the
segmentation and classifier epochs down, by the same share, until the demo's estimated end lies
within the budget, and gives the classifier the time the whole segmentation epochs leave. The
probe is one moment of the machine's pace: the demo gives the segmentation folds' steps a deadline
(`seg_deadline_s`; the loop cuts its cosine short when it projects its end past it) and replans the
classifier at the pace the folds ran (`replan_cls_epochs`). The estimate is pure arithmetic on the probe (`DemoCost`): every later stage's
cost is expressed in probe steps, measured on finished demos. A machine fast enough for the preset
trains more epochs than the preset, up to a share of them the caller sets (`fit_epochs(max_share=)`,
the demo's `--stretch`), so the budget is used rather than left over.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from petctl.errors import PetctlError


@dataclass(frozen=True)
class DemoCost:
    """The demo's stages in units of one probed training step (`probe_seg_step`, as many nets side by
    side as folds train at once) at `batch_size` patches; a stage whose work does not grow with the
    batch (validation, classifiers, calibrate and predict) is counted in steps at that batch and scaled
    by the probed time per patch. Measured on cpu-small demos on 2 cores (AMD EPYC, 2026-11-30): a
    fold's step took 0.95 and 1.05 probe steps (5151, 5252, batch 4; a lone probe had run 1.24× faster
    than the folds and planned past the budget; 5252 still ran 5 % past its estimate, hence
    `HEADROOM`); a validation case ~4, a classifier epoch 10-12 (5151, 4747), two folds at a time. Calibrate and predict segment each test-split and imagesTs scan the gate lets
    through with each fold of the ensemble: 4.8 steps a scan on 5050 (two folds, 41 of 46 let through),
    2.6 on 5151 (two folds, a stricter gate) and 2.3 on 6464 (one fold, 30 of 30); every scan and fold
    is counted at 2.25, so a gate that stops many leaves time over."""

    batch_size: int = 8
    """The batch the per-stage costs below are counted at."""
    seg_step: float = 1.0
    ddp_step: float = 1.2
    """A step of a fold on several processes (DDP over gloo: the ranks wait for each other and
    exchange gradients), in probe steps at the per-process batch: one fold on 2 processes × 2 patches
    ran 0.317 s a step on seed 6464's cohort, where two nets side by side probed 0.245 s and, in the
    demo, 0.277 s (1.29 and 1.14 probe steps)."""
    seg_val_case: float = 4.0
    cls_epoch: float = 12.0
    lesion_map: float = 1.2
    """A classifier epoch with the lesion-map head (`TrainConfig.cls_head`), as a share of one with the
    global head: 40 epochs took 248 s against the global head's 220 s on one cohort, and 274 s against
    80 epochs' 417 s on another (2026-12-07; both projections side by side, one thread each). On that
    machine a global-head epoch took 5.2 s, 11.8 of the probe's units (0.44 s), as `cls_epoch` says."""
    infer_scan: float = 2.25
    """Calibrate + predict, per scan of the test split and imagesTs and per fold of the ensemble."""
    report_s: float = 10.0
    """Evaluate and the report (PNGs, tables), whatever the machine."""
    launch_s: float = 15.0
    """Seconds per round of fold launches (accelerate, imports), whatever the machine."""


@dataclass(frozen=True)
class EpochPlan:
    seg_epochs: int
    cls_epochs: int
    estimate_s: float
    """The demo's estimated total (elapsed before training included)."""
    step_s: float
    fits: bool
    """False when even the floor runs past the budget less its headroom (the plan is then the floor)."""
    seg_stage_s: float = 0.0
    """The estimate's segmentation stage (all its rounds, launches and validation included)."""
    seg_steps_s: float = 0.0
    """Of it, one round's launch and training steps: the demo's deadline for the folds' steps."""
    max_cls_epochs: int = 0
    """The most classifier epochs a later replan may give (the preset's, or its stretch where the
    segmentation trains all of the preset's epochs)."""


CLS_CORE_SHARE = 0.3
"""The share of the classifier's epochs that shrinks with the segmentation's (`fit_epochs(cls_core_share=)`):
12 of cpu-small's 40, about the 13 it trained before 2026-12-07. The rest come only from time the
segmentation leaves: the 40 cost about four segmentation epochs, and the segmentation comes first.
Scaled whole, a machine like 2026-11-30's (5 / 5 of 12 / 13 in 18½–19¾ minutes) would have run its
floor's 5 / 17 ~2½ minutes past the budget, and faster ones would have given up segmentation epochs."""

HEADROOM = 0.05
"""The share of the budget a plan leaves free: demos ran up to 5 % past their estimate (5252: 1257 s
against 19.9 min) as the machine's load and the gate's stops vary."""


def fit_epochs(*, budget_s: float, elapsed_s: float, step_s: float, seg_epochs: int, cls_epochs: int,
               seg_steps_per_epoch: int, num_val_cases: int, seg_rounds: int, cls_rounds: int, infer_scans: int,
               batch_size: int = 8, seg_processes: int = 1, min_share: float = 0.4, max_share: float = 1.0,
               cls_core_share: float = 1.0, headroom: float = HEADROOM, cost: DemoCost = DemoCost()) -> EpochPlan:
    """The most segmentation epochs, a share of the preset's `seg_epochs` (never below `min_share` of
    them: 5 of the cpu-small preset's 12), whose estimated demo ends within `budget_s` less `headroom`
    of it with the classifier at the same share of its `cls_epochs`; then the classifier takes the
    time the whole segmentation epochs leave, epoch by epoch up to the preset's. A classifier epoch
    costs about a fifth of a segmentation epoch, and cut to 5 or 6 of 13 by the common share on
    2026-11-30's slow machine the classifiers missed the AUROC target on 4 of 9 fresh seeds
    (0.78-0.94; the preset's 13 gave 0.987 on average over 18 seeds). Only `cls_core_share` of
    `cls_epochs` (the demo: `CLS_CORE_SHARE`) shrinks with the segmentation's share; the classifier's
    other epochs come only from the time left over. Where even the floor does not fit, the plan is the
    floor, flagged.
    `seg_rounds` and `cls_rounds` are how many times the folds of a task run one after another
    (folds / concurrent folds);
    `infer_scans` how many scans calibrate and predict may segment (test split + imagesTs) times the
    folds of the ensemble; `step_s`
    was probed at `batch_size` patches (per process, each fold running `seg_processes`).
    `max_share` > 1 lets a machine fast enough for the preset train more of both, up to that share
    of their epochs (`stretched_epochs`; the classifier only once the segmentation trains all of the
    preset's), rather than end minutes inside the budget: fresh seed 7878's
    demo trained the preset in 887 s of its 1200 on 2026-12-01's machine."""
    if (budget_s <= 0 or step_s <= 0 or seg_epochs < 1 or cls_epochs < 1 or infer_scans < 0 or batch_size < 1
            or not 0 < min_share <= 1 or not 0 < cls_core_share <= 1 or max_share < 1 or not 0 <= headroom < 1):
        raise PetctlError(f"budget {budget_s} s, step {step_s} s, epochs {seg_epochs}/{cls_epochs}, share {min_share}..{max_share}, "
                          f"classifier core {cls_core_share}, headroom {headroom}: all must be positive (min share and core at most 1, "
                          f"max share at least 1, headroom below 1)")

    unit = step_s * cost.batch_size / batch_size  # a step at the costs' batch, at the probed time per patch
    limit = budget_s * (1 - headroom)

    def seg_steps(seg: int) -> float:
        return seg * seg_steps_per_epoch * seg_step_cost(seg_processes, cost) * step_s + cost.launch_s

    def seg_stage(seg: int) -> float:
        return seg_rounds * (seg_steps(seg) + num_val_cases * cost.seg_val_case * unit)

    def estimate(seg: int, cls: int) -> float:
        return elapsed_s + seg_stage(seg) + after_segmentation(cls, cls_rounds=cls_rounds, infer_scans=infer_scans, unit_s=unit, cost=cost)

    def shared(seg: int) -> int:
        return min(shared_cls_epochs(core_cls_epochs(cls_epochs, cls_core_share), seg, seg_epochs), cls_top(seg))

    def cls_top(seg: int) -> int:  # the classifier stretches only where the segmentation trains all its preset's epochs
        return stretched_epochs(cls_epochs, max_share) if seg >= seg_epochs else cls_epochs

    floor = max(1, math.ceil(seg_epochs * min_share))
    for seg in range(stretched_epochs(seg_epochs, max_share), floor - 1, -1):
        if estimate(seg, shared(seg)) <= limit:  # the time left over goes to the classifier, as a replan at the probe's pace would
            cls = replan_cls_epochs(budget_s=budget_s, elapsed_s=elapsed_s + seg_stage(seg), pace=1.0, unit_s=unit, low=shared(seg),
                                    high=cls_top(seg), cls_rounds=cls_rounds, infer_scans=infer_scans, headroom=headroom, cost=cost)
            return EpochPlan(seg, cls, estimate(seg, cls), step_s, True, seg_stage(seg), seg_steps(seg), cls_top(seg))
    return EpochPlan(floor, shared(floor), estimate(floor, shared(floor)), step_s, False, seg_stage(floor), seg_steps(floor),
                     cls_top(floor))


def stretched_epochs(epochs: int, max_share: float) -> int:
    """The most epochs a plan may give a task whose preset trains `epochs`: `max_share` of them,
    rounded down (1.25 × 12 = 15; 1.25 × 40 = 50), never fewer than the preset's."""
    return max(epochs, math.floor(epochs * max_share + 1e-9))


def core_cls_epochs(cls_epochs: int, core_share: float) -> int:
    """The classifier's epochs that shrink with the segmentation's share (`fit_epochs(cls_core_share=)`)."""
    return max(1, math.ceil(cls_epochs * core_share - 1e-9))


def seg_step_cost(processes: int, cost: DemoCost = DemoCost()) -> float:
    """A segmentation fold's step in probe steps, its fold running `processes` processes."""
    return cost.seg_step * (cost.ddp_step if processes > 1 else 1.0)


def shared_cls_epochs(cls_epochs: int, seg: int, seg_epochs: int) -> int:
    """The classifier's epochs at the share `seg` / `seg_epochs` of the segmentation's (at least 1)."""
    return max(1, round(cls_epochs * seg / seg_epochs))


def after_segmentation(cls: int, *, cls_rounds: int, infer_scans: int, unit_s: float, cost: DemoCost = DemoCost()) -> float:
    """The estimated seconds from the segmentation folds' end to the report: the classifier rounds at
    `cls` epochs, calibrate and predict, the report; `unit_s` is a step at the costs' batch."""
    return cls_rounds * (cls * cost.cls_epoch * unit_s + cost.launch_s) + infer_scans * cost.infer_scan * unit_s + cost.report_s


def replan_cls_epochs(*, budget_s: float, elapsed_s: float, pace: float, unit_s: float,
                      low: int, high: int, cls_rounds: int, infer_scans: int, headroom: float = HEADROOM,
                      cost: DemoCost = DemoCost()) -> int:
    """The classifier's epochs once the segmentation folds are done and have shown the machine's
    `pace` (their seconds a step over the probe's; the probe is a few seconds, and the folds ran
    0.95-1.2× its pace on 2026-11-30's machine as its load moved: 6060's demo ran 12 % past its
    estimate): the most in [`low`, `high`] whose remaining estimate, at the probe's `unit_s` times
    `pace`, ends within `budget_s` less `headroom` from `elapsed_s` on; `low` when none does."""
    if pace <= 0 or not 1 <= low <= high:
        raise PetctlError(f"replan: pace {pace}, epochs {low}..{high}: all must be positive, low ≤ high")
    limit = budget_s * (1 - headroom)
    cls = low
    while cls < high and elapsed_s + after_segmentation(cls + 1, cls_rounds=cls_rounds, infer_scans=infer_scans,
                                                         unit_s=unit_s * pace, cost=cost) <= limit:
        cls += 1
    return cls


def seg_deadline_s(*, budget_s: float, elapsed_s: float, seg_steps_s: float, seg_stage_s: float, unit_s: float, low: int,
                   cls_rounds: int, infer_scans: int, headroom: float = HEADROOM, cost: DemoCost = DemoCost()) -> float:
    """Seconds from now by which the segmentation folds' steps should be done: the plan's estimate of
    them (`seg_steps_s`), or sooner when the rest of the demo — validation, the classifier at `low`
    epochs, calibrate, predict, the report, at the probe's pace — would otherwise end past `budget_s`
    less `headroom` (a plan flagged as past the budget)."""
    rest = (seg_stage_s - seg_steps_s) + after_segmentation(low, cls_rounds=cls_rounds, infer_scans=infer_scans, unit_s=unit_s, cost=cost)
    return min(seg_steps_s, budget_s * (1 - headroom) - elapsed_s - rest)


def describe_replan(plan: dict) -> str:
    """One line for the classifier's replan (`plan["cls_replan"]`, written by the demo)."""
    r = plan["cls_replan"]
    moved = ("kept" if plan["cls_epochs"] == r["planned_cls_epochs"]
             else f"{'raised' if plan['cls_epochs'] > r['planned_cls_epochs'] else 'cut'} from {r['planned_cls_epochs']}")
    cut = f", cut to {r['seg_steps_run']} of {r['seg_steps_planned']} steps by their deadline" if r.get("seg_steps_run") else ""
    return (f"classifier replanned after the segmentation folds ({r['seg_stage_s']:.0f} s, {r['pace']:.2f}× the probe's time a step{cut}): "
            f"{plan['cls_epochs']} of {plan['preset_cls_epochs']} epochs ({moved})")


def describe_plan(plan: dict) -> str:
    """One line for a demo plan (`OUT/budget.json`): the demo's message and the report's sentence."""
    cls = plan.get("cls_replan", {}).get("planned_cls_epochs", plan["cls_epochs"])  # as planned, before any replan
    if (plan["seg_epochs"], cls) == (plan["preset_seg_epochs"], plan["preset_cls_epochs"]):
        what = "the preset's epochs fit"
    elif plan["seg_epochs"] >= plan["preset_seg_epochs"] and cls >= plan["preset_cls_epochs"]:
        what = (f"so {plan['seg_epochs']} segmentation and {cls} classifier epochs, the preset's {plan['preset_seg_epochs']} and "
                f"{plan['preset_cls_epochs']} stretched to use it (--stretch 1 keeps the preset's)")
    else:
        seg = (f"{plan['seg_epochs']} segmentation epochs (the preset's {plan['preset_seg_epochs']} stretched)"
               if plan["seg_epochs"] > plan["preset_seg_epochs"] else f"{plan['seg_epochs']} of {plan['preset_seg_epochs']} segmentation")
        what = f"so {seg} and {cls} of {plan['preset_cls_epochs']} classifier epochs (--budget 0 trains them all)"
    if plan["fits"]:
        past = ""
    elif plan["estimate_s"] <= plan["budget_min"] * 60:
        past = f", within the budget but not the {HEADROOM:.0%} of it a plan keeps free, even at the fewest epochs it cuts to"
    else:
        past = ", past the budget even at the fewest epochs it cuts to"
    return (f"time budget {plan['budget_min']:g} min: {plan['step_s']:.2f} s per training step here, {what}; "
            f"estimate {plan['estimate_s'] / 60:.1f} min{past}")


def probe_seg_step(cfg, num_steps: int = 16, warmup: int = 3, concurrent: int = 1) -> float:
    """Seconds per training step (forward, backward, NAdam) of `cfg`'s segmentation net on a batch of
    random patches, one thread each, `concurrent` nets stepping side by side (as the demo's folds do:
    they share the memory bandwidth and caches, which a lone probe ran up to 1.25× faster than a fold
    on 2026-11-30's machines); the median over all of `num_steps` after `warmup`. The caller's thread
    count is restored. Sixteen steps (~9 s for cpu-small on 2 cores): six, back to back on one idle
    machine, gave 0.353–0.470 s where sixteen gave 0.420–0.471 s and the folds ran 0.44–0.46 s; fresh
    seed 5757 probed 0.376 s with six, planned 6 epochs for 17.8 min and took 21 min."""
    import threading

    import torch

    from petctl.engine.models import as_channels_last, build_seg_model, channels_last, torch_threads

    if concurrent < 1:
        raise PetctlError(f"probe: concurrent must be at least 1 (got {concurrent})")
    with torch_threads(1):  # each op runs in its calling thread: `concurrent` threads, one core each
        generator = torch.Generator().manual_seed(0)
        x = as_channels_last(torch.randn(cfg.batch_size, cfg.in_channels, *cfg.patch_size, generator=generator), cfg.channels_last)
        y = (torch.rand(cfg.batch_size, 1, *cfg.patch_size, generator=generator) > 0.9).float()
        nets = []
        for _ in range(concurrent):
            model = channels_last(build_seg_model(cfg.arch, in_channels=cfg.in_channels, feature_size=cfg.feature_size,
                                                  features=cfg.features, patch_size=cfg.patch_size), cfg.channels_last)
            nets.append((model, torch.optim.NAdam(model.parameters(), lr=cfg.lr)))
        times: list[float] = []
        errors: list[BaseException] = []
        start = threading.Barrier(concurrent)

        def steps(model, optimizer) -> None:
            try:
                start.wait()
                for i in range(warmup + num_steps):
                    t = time.perf_counter()
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if i >= warmup:
                        times.append(time.perf_counter() - t)
            except BaseException as exc:  # raised in the caller below
                errors.append(exc)
                start.abort()

        workers = [threading.Thread(target=steps, args=net) for net in nets[1:]]
        for w in workers:
            w.start()
        steps(*nets[0])
        for w in workers:
            w.join()
        if errors:  # the cause, not a thread's broken start
            raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
        return float(sorted(times)[len(times) // 2])

"""The demo's time budget: the cost model, the probe, and the plan the demo trains by."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from petctl.engine.budget import HEADROOM, describe_plan, describe_replan, fit_epochs, probe_seg_step, replan_cls_epochs
from petctl.errors import PetctlError

# The cpu-small demo of seed 4747 as measured (2 cores, batch 8, a fold's step 0.79 s): 115 s before
# training, one round of two segmentation folds (65 training cases, 17 validation), two rounds of
# classifier folds, 30 test-split and 16 imagesTs scans for calibrate and predict. It took 1884 s.
DEMO = dict(elapsed_s=115.0, seg_epochs=12, cls_epochs=13, seg_steps_per_epoch=130, num_val_cases=17, seg_rounds=1, cls_rounds=2,
            infer_scans=92)
# Seed 5050 at half the epochs (batch 8, a fold's step 0.87 s, 131 s before training, 61 training and
# 16 validation cases): 1213 s. Seed 5151 at batch 4, 7 / 8 epochs (two nets side by side probed
# 0.467 s a step on that machine; 120 s before training): 1307 s.
HALF = dict(elapsed_s=131.0, seg_epochs=6, cls_epochs=6, seg_steps_per_epoch=122, num_val_cases=16, seg_rounds=1, cls_rounds=2,
            infer_scans=92)
BATCH4 = dict(elapsed_s=120.0, seg_epochs=7, cls_epochs=8, seg_steps_per_epoch=264, num_val_cases=16, seg_rounds=1, cls_rounds=2,
              infer_scans=92, batch_size=4)

# Seed 6464 with one fold on both cores (DDP, 2 processes × 2 patches; two nets side by side at 2
# patches probed 0.277 s), 7 / 13 epochs, 135 s before training, 17 validation cases over 2 ranks,
# one round of classifiers, 30 scans × 1 fold for calibrate and predict: 1041 s.
DDP = dict(elapsed_s=135.0, seg_epochs=7, cls_epochs=13, seg_steps_per_epoch=264, num_val_cases=9, seg_rounds=1, cls_rounds=1,
           infer_scans=30, batch_size=2, seg_processes=2)


@pytest.mark.parametrize("demo, step_s, measured_s", [(DEMO, 0.79, 1884), (HALF, 0.87, 1213), (BATCH4, 0.467, 1307), (DDP, 0.277, 1041)])
def test_the_cost_model_reproduces_the_measured_demos(demo, step_s, measured_s):
    plan = fit_epochs(budget_s=10_000, step_s=step_s, **demo)
    assert (plan.seg_epochs, plan.cls_epochs, plan.fits) == (demo["seg_epochs"], demo["cls_epochs"], True)
    assert plan.estimate_s == pytest.approx(measured_s, rel=0.15)
    assert plan.estimate_s > 0.97 * measured_s  # errs long rather than short: a plan must not run past the budget


@pytest.mark.parametrize("step_s, seg, cls, fits", [
    (0.40, 12, 13, True),   # the machines of earlier sessions: the preset fits (16½ min measured)
    (0.60, 8, 12, True),    # the classifier takes what the whole segmentation epochs leave (9 at their share)
    (0.78, 6, 7, True),
    (0.87, 5, 7, True),     # the 2026-11-30 machines: 5 of 12 (6 ran past 20 min: 5050, 1213 s)
    (3.00, 5, 5, False),    # far too slow: the floor, flagged, at the common share
])
def test_epochs_shrink_with_the_machine_and_stop_at_the_floor(step_s, seg, cls, fits):
    plan = fit_epochs(budget_s=1200, step_s=step_s, **DEMO)
    target = 1200 * (1 - HEADROOM)  # the plan leaves 5 % of the budget free
    assert (plan.seg_epochs, plan.cls_epochs, plan.fits) == (seg, cls, fits)
    assert (plan.estimate_s <= target) == fits
    if seg < 12:  # one more segmentation epoch would not have fitted, even with the classifier at the common share
        more = fit_epochs(budget_s=1200, step_s=step_s, **{**DEMO, "seg_epochs": seg + 1, "cls_epochs": round(13 * (seg + 1) / 12)},
                          min_share=1.0)
        assert more.estimate_s > target
    if fits and cls < 13:  # nor one more classifier epoch
        assert fit_epochs(budget_s=1200, step_s=step_s, **{**DEMO, "seg_epochs": seg, "cls_epochs": cls + 1}, min_share=1.0).estimate_s > target
    if fits:
        assert cls >= round(13 * seg / 12)  # never below the segmentation's share
    assert fit_epochs(budget_s=1200, step_s=step_s, **DEMO, headroom=0.0).seg_epochs >= seg  # no headroom: never fewer


def test_a_probe_at_half_the_batch_plans_the_same_demo():
    """Twice the steps of half the patches, probed at half the time: the same plan (the stages that do
    not grow with the batch are scaled by the time per patch)."""
    at8 = fit_epochs(budget_s=1200, step_s=0.7, **DEMO)
    at4 = fit_epochs(budget_s=1200, step_s=0.35, **{**DEMO, "seg_steps_per_epoch": 260}, batch_size=4)
    assert (at4.seg_epochs, at4.cls_epochs) == (at8.seg_epochs, at8.cls_epochs)
    assert at4.estimate_s == pytest.approx(at8.estimate_s)


def test_more_rounds_or_less_budget_never_buy_more_epochs():
    base = fit_epochs(budget_s=1500, step_s=0.6, **DEMO)
    assert fit_epochs(budget_s=1500, step_s=0.6, **{**DEMO, "seg_rounds": 2}).seg_epochs <= base.seg_epochs
    assert fit_epochs(budget_s=1000, step_s=0.6, **DEMO).seg_epochs <= base.seg_epochs
    assert fit_epochs(budget_s=1500, step_s=0.6, **DEMO, min_share=1.0).seg_epochs == 12  # no cut allowed


def test_the_classifier_is_replanned_at_the_pace_the_segmentation_folds_ran():
    """The plan at 0.87 s a step trains 5 / 7 epochs; once the segmentation folds are done, the
    classifier keeps its 7 at the probe's pace, loses epochs (never below the common share) when the
    folds ran slower, and gains them (never above the preset's) when they ran faster."""
    plan = fit_epochs(budget_s=1200, step_s=0.87, **DEMO)
    assert (plan.seg_epochs, plan.cls_epochs) == (5, 7) and 0 < plan.seg_steps_s < plan.seg_stage_s
    args = dict(budget_s=1200, unit_s=0.87, low=5, high=13, cls_rounds=2, infer_scans=92)  # batch 8: a probe step is the unit
    at = {pace: replan_cls_epochs(elapsed_s=115.0 + pace * plan.seg_stage_s, pace=pace, **args) for pace in (1.0, 1.03, 1.3, 0.97, 0.5)}
    assert at[1.0] == 7  # as planned
    assert at[1.03] < 7 and at[1.3] == 5  # slower: fewer, down to the common share and no further
    assert 7 < at[0.97] < 13 and at[0.5] == 13  # faster: more, up to the preset's
    with pytest.raises(PetctlError, match="low ≤ high"):
        replan_cls_epochs(elapsed_s=100.0, pace=1.0, **{**args, "low": 9, "high": 8})
    with pytest.raises(PetctlError, match="must be positive"):
        replan_cls_epochs(elapsed_s=100.0, pace=0.0, **args)


def test_the_segmentation_deadline_is_the_plan_or_what_the_budget_leaves():
    from petctl.engine.budget import seg_deadline_s

    plan = fit_epochs(budget_s=1200, step_s=0.87, **DEMO)
    args = dict(budget_s=1200, seg_steps_s=plan.seg_steps_s, seg_stage_s=plan.seg_stage_s, unit_s=0.87, low=5, cls_rounds=2, infer_scans=92)
    assert seg_deadline_s(elapsed_s=115.0, **args) == pytest.approx(plan.seg_steps_s)  # a plan that fits: its own estimate
    slow = fit_epochs(budget_s=1200, step_s=1.5, **DEMO)  # flagged: even 5 epochs end past the budget
    assert not slow.fits
    args.update(seg_steps_s=slow.seg_steps_s, seg_stage_s=slow.seg_stage_s, unit_s=1.5)
    tight = seg_deadline_s(elapsed_s=115.0, **args)
    assert tight < slow.seg_steps_s
    # the rest of the demo, at the classifier's common share, then ends 5 % inside the budget
    rest = fit_epochs(budget_s=10_000, step_s=1.5, **{**DEMO, "seg_epochs": 5, "cls_epochs": 5}).estimate_s - 115.0 - slow.seg_steps_s
    assert 115.0 + tight + rest == pytest.approx(1200 * (1 - HEADROOM))


def test_the_demo_replans_once_and_says_so(tmp_path: Path, monkeypatch):
    from petctl.engine.config import preset
    from petctl.engine.demo import DemoConfig, replan_classifier

    train_cfg, plan, _, _ = _fit(tmp_path, monkeypatch, 0.44)  # 2026-11-30's machine at batch 4
    assert plan["cls_rounds"] == 2 and plan["seg_rounds"] == 1 and plan["infer_scans"] == 92 and plan["unit_s"] == pytest.approx(0.88)
    assert 0 < plan["seg_steps_estimate_s"] < plan["seg_stage_estimate_s"]
    said: list[str] = []
    cfg = DemoConfig(out=str(tmp_path))
    slow, replanned = replan_classifier(cfg, train_cfg, plan, seg_stage_s=1.15 * plan["seg_stage_estimate_s"],
                                        elapsed_s=115.0 + 1.15 * plan["seg_stage_estimate_s"], say=said.append)
    assert replanned["cls_replan"]["planned_cls_epochs"] == plan["cls_epochs"] and replanned["cls_replan"]["pace"] == pytest.approx(1.15)
    assert slow.cls_epochs_per_cycle == replanned["cls_epochs"] == 5 < plan["cls_epochs"]  # the common share of 5 / 12
    assert slow.epochs_per_cycle == train_cfg.epochs_per_cycle == 5
    assert json.loads((tmp_path / "budget.json").read_text()) == replanned
    assert said == [describe_replan(replanned)] and f"cut from {plan['cls_epochs']}" in said[0] and "1.15× the probe's" in said[0]
    assert f"{plan['cls_epochs']} of 40 classifier epochs" in describe_plan(replanned)  # the plan as it was made
    # a resumed demo keeps the replan it made
    again, kept = replan_classifier(cfg, preset("cpu-small"), replanned, seg_stage_s=1.0, elapsed_s=1.0, say=said.append)
    assert kept == replanned and again.cls_epochs_per_cycle == 5


def test_one_fold_on_every_core_plans_ddp_steps_and_one_classifier_round(tmp_path: Path, monkeypatch):
    from petctl.engine.budget import DemoCost, seg_step_cost
    from petctl.engine.demo import DemoLaunch
    from petctl.engine.folds import FoldLaunch

    ddp = DemoLaunch(seg=FoldLaunch(processes=2, concurrent=1), cls=FoldLaunch(processes=1, concurrent=2), seg_batch=2)
    train_cfg, plan, said, warned = _fit(tmp_path / "ddp", monkeypatch, 0.24, launches=ddp)  # two nets × 2 patches side by side
    assert train_cfg.batch_size == 2 and plan["seg_processes"] == 2 and (plan["seg_rounds"], plan["cls_rounds"]) == (1, 1)
    assert plan["unit_s"] == pytest.approx(0.96)  # the probe's time per patch, at the costs' batch of 8
    assert seg_step_cost(2) == DemoCost().ddp_step > seg_step_cost(1) == 1.0
    # the same machine's two single-process folds side by side (batch 4: 0.48 s a step) fit fewer epochs of each
    two = _fit(tmp_path / "two", monkeypatch, 0.48)[1]
    assert two["seg_processes"] == 1 and two["cls_rounds"] == 2
    assert plan["seg_epochs"] > two["seg_epochs"] and plan["cls_epochs"] >= two["cls_epochs"]
    # the replan reads the DDP fold's pace against the probe's step times the DDP cost
    run = tmp_path / "home" / "runs" / "demo" / "seg" / "fold0"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"cycles": [{"step_seconds": 0.24 * DemoCost().ddp_step, "global_step": 100}]}))
    from petctl.engine.demo import DemoConfig, replan_classifier

    _, replanned = replan_classifier(DemoConfig(out=str(tmp_path / "ddp")), train_cfg, plan, seg_stage_s=600.0, elapsed_s=700.0,
                                     say=said.append, home=tmp_path / "home")
    assert replanned["cls_replan"]["pace"] == pytest.approx(1.0)


def test_demo_launches_one_fold_on_every_core_and_the_classifier_one_process_per_core(monkeypatch):
    import os

    from petctl.engine import folds
    from petctl.engine.demo import DemoConfig, demo_launches
    from petctl.engine.folds import FoldLaunch

    monkeypatch.setattr(folds, "gpu_count", lambda: 0)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    one = demo_launches(DemoConfig(), 1, 4)  # the default: one fold, DDP over the 2 cores, 2 patches each
    assert (one.seg, one.seg_batch, one.cls) == (FoldLaunch(processes=2, concurrent=1), 2, FoldLaunch(processes=1, concurrent=2))
    assert not one.shared
    two = demo_launches(DemoConfig(train_folds=2), 2, 4)  # two single-process folds side by side, one queue with the classifier
    assert (two.seg, two.seg_batch) == (FoldLaunch(processes=1, concurrent=2), 4) and two.shared
    assert demo_launches(DemoConfig(processes=1), 1, 4).seg == FoldLaunch(processes=1, concurrent=1)
    assert demo_launches(DemoConfig(train_folds=2, concurrent=1), 2, 4).seg == FoldLaunch(processes=2, concurrent=1)
    monkeypatch.setattr(folds, "gpu_count", lambda: 4)  # GPUs: one process a fold, the folds dealt out over them
    gpus = demo_launches(DemoConfig(train_folds=2), 2, 4)
    assert (gpus.seg, gpus.seg_batch, gpus.cls) == (FoldLaunch(processes=1, concurrent=2), 4, FoldLaunch(processes=1, concurrent=4))
    with pytest.raises(PetctlError, match="--processes must be at least 1"):
        DemoConfig(processes=0)
    # one "xy" classifier job: the lone process takes both cores as threads; x and y keep one core each
    monkeypatch.setattr(folds, "gpu_count", lambda: 0)
    assert demo_launches(DemoConfig(), 1, 4, cls_jobs=1).cls == FoldLaunch(processes=1, concurrent=1, threads=2)
    assert demo_launches(DemoConfig(), 1, 4, cls_jobs=2).cls == FoldLaunch(processes=1, concurrent=2)
    assert demo_launches(DemoConfig(concurrent=2), 1, 4, cls_jobs=1).cls == FoldLaunch(processes=1, concurrent=2)
    for bad in (("xx",), ("x", "x"), ("w",)):
        with pytest.raises(PetctlError, match="--cls-projections"):
            DemoConfig(cls_projections=bad)


@pytest.mark.parametrize("bad", [dict(budget_s=0), dict(step_s=0.0), dict(seg_epochs=0), dict(batch_size=0), dict(min_share=0.0),
                                 dict(min_share=1.5), dict(max_share=0.9), dict(headroom=1.0), dict(headroom=-0.1)])
def test_fit_epochs_refuses_nonsense(bad):
    args = dict(budget_s=1200.0, step_s=0.5, **DEMO)
    args.update(bad)
    with pytest.raises(PetctlError, match="must be positive"):
        fit_epochs(**args)


def test_the_probe_times_real_steps_and_restores_the_thread_count():
    import torch

    from petctl.engine.config import preset

    threads = torch.get_num_threads()
    cfg = preset("cpu-tiny").with_image_channels(2)
    alone = probe_seg_step(cfg, num_steps=2, warmup=1)
    side_by_side = probe_seg_step(cfg, num_steps=2, warmup=1, concurrent=2)
    assert 0 < alone < 60 and 0 < side_by_side < 60 and torch.get_num_threads() == threads
    with pytest.raises(PetctlError, match="concurrent must be at least 1"):
        probe_seg_step(cfg, concurrent=0)


def test_a_failing_probe_thread_raises_in_the_caller(monkeypatch):
    """A net that cannot step raises in the caller, from whichever thread failed, and no thread is left waiting."""
    import torch

    from petctl.engine.config import preset

    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            raise RuntimeError("the net cannot step")

    monkeypatch.setattr("petctl.engine.models.build_seg_model", lambda *a, **k: Broken())
    with pytest.raises(RuntimeError, match="cannot step"):
        probe_seg_step(preset("cpu-tiny").with_image_channels(2), num_steps=1, warmup=0, concurrent=2)


def _fit(tmp_path: Path, monkeypatch, step_s: float | None, launches=None, cls_head: str | None = None, **demo):
    from petctl.engine import budget, trainer
    from petctl.engine.config import preset
    from petctl.engine.demo import DemoConfig, DemoLaunch, fit_budget
    from petctl.engine.folds import FoldLaunch

    two_folds = FoldLaunch(processes=1, concurrent=2)
    launches = launches or DemoLaunch(seg=two_folds, cls=two_folds, seg_batch=4)

    def probe(cfg, concurrent):
        if step_s is None:
            raise AssertionError("the probe ran")
        assert cfg.in_channels == 5  # two image channels and the position channels
        assert concurrent == 2  # two folds side by side, or one fold's two processes, as they train
        assert cfg.batch_size == launches.seg_batch
        return step_s

    monkeypatch.setattr(budget, "probe_seg_step", probe)
    def read_fold(store, fold, merged=False):  # the merged folds train on the test split's 12 besides
        return [f"t{i}" for i in range(77 if merged else 65)], [f"v{i}" for i in range(17)]

    monkeypatch.setattr(trainer, "read_fold", read_fold)
    said, warned = [], []
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = DemoConfig(out=str(tmp_path), **demo)
    # as the demo sets it; the classifier a model per view unless asked, as these plans were measured with
    train_cfg = replace(preset("cpu-small"), batch_size=launches.seg_batch, cls_projections=cfg.cls_projections or ("x", "y"))
    train_cfg = replace(train_cfg, cls_head=cls_head) if cls_head else train_cfg
    folds = [0, 1] if launches.seg.processes == 1 else [0]
    train_cfg, plan = fit_budget(cfg, train_cfg, tmp_path / "store", folds, launches, elapsed_s=115.0, infer_scans=46, say=said.append,
                                 warn=warned.append)
    return train_cfg, plan, said, warned


def test_the_demo_trains_what_fits_and_a_resume_keeps_the_plan(tmp_path: Path, monkeypatch):
    train_cfg, plan, said, warned = _fit(tmp_path, monkeypatch, 0.40)  # batch 4, two nets side by side
    # (6 / 6 of 12 / 13 before the lesion-map classifier's 40 epochs, whose core 12 cost 1.2× a global head's)
    assert (train_cfg.epochs_per_cycle, train_cfg.cls_epochs_per_cycle) == (5, 9) and plan["fits"] and not warned
    assert "5 of 12 segmentation and 9 of 40 classifier epochs" in said[0] and said[0].endswith("estimate 18.6 min")
    assert json.loads((tmp_path / "budget.json").read_text()) == plan
    # a resumed demo does not probe again: it trains what the interrupted one started
    again, plan2, _, _ = _fit(tmp_path, monkeypatch, None)
    assert plan2 == plan and again.epochs_per_cycle == 5
    # a half-written plan is planned again, not a traceback
    (tmp_path / "budget.json").write_text("{")
    _, plan3, _, _ = _fit(tmp_path, monkeypatch, 0.20, stretch=1.0)
    assert plan3["seg_epochs"] == 12 and json.loads((tmp_path / "budget.json").read_text()) == plan3


def test_a_fast_machine_trains_the_preset_and_a_slow_one_is_warned(tmp_path: Path, monkeypatch):
    train_cfg, plan, said, _ = _fit(tmp_path / "fast", monkeypatch, 0.10, stretch=1.0)
    assert (train_cfg.epochs_per_cycle, train_cfg.cls_epochs_per_cycle) == (12, 40) and "the preset's epochs fit" in said[0]
    # the segmentation comes first: a machine with time for its 12 but not the classifier's 40 gives the
    # classifier what is left, never less than the share of its core (12 of 40) a cut segmentation would take
    train_cfg, plan, said, _ = _fit(tmp_path / "mid", monkeypatch, 0.20, stretch=1.0)
    assert train_cfg.epochs_per_cycle == 12 and 12 < train_cfg.cls_epochs_per_cycle < 40 and plan["fits"]
    assert f"so 12 of 12 segmentation and {plan['cls_epochs']} of 40 classifier epochs" in said[0]
    one_more = plan["cls_rounds"] * plan["cls_epoch_cost"] * plan["unit_s"]
    assert plan["estimate_s"] <= 1200 * (1 - HEADROOM) < plan["estimate_s"] + one_more  # one more classifier epoch would not have fitted
    train_cfg, plan, _, warned = _fit(tmp_path / "slow", monkeypatch, 1.5)
    assert train_cfg.epochs_per_cycle == 5 and not plan["fits"] and "past the budget even at the fewest epochs" in warned[0]
    train_cfg, plan, _, warned = _fit(tmp_path / "almost", monkeypatch, 0.48)  # 2026-11-30's machine on a slow day (5353)
    assert train_cfg.epochs_per_cycle == 5 and not plan["fits"] and 19 * 60 < plan["estimate_s"] <= 20 * 60
    assert "within the budget but not the 5% of it a plan keeps free" in warned[0]


def test_a_fast_machine_stretches_the_preset_to_use_the_budget(tmp_path: Path, monkeypatch):
    """--stretch (default 1.25): where the preset would end minutes inside the budget, both tasks train
    more epochs, up to 15 and 50 of cpu-small's 12 and 40, and the plan still ends inside it."""
    train_cfg, plan, said, _ = _fit(tmp_path / "fastest", monkeypatch, 0.08)
    assert (train_cfg.epochs_per_cycle, train_cfg.cls_epochs_per_cycle) == (15, 50) == (plan["seg_epochs"], plan["max_cls_epochs"])
    assert plan["fits"] and plan["estimate_s"] <= 1200 * (1 - HEADROOM)
    assert "so 15 segmentation and 50 classifier epochs, the preset's 12 and 40 stretched" in said[0]
    # a little slower: the segmentation still stretches whole, the classifier past its preset as far as the time goes
    train_cfg, plan, said, _ = _fit(tmp_path / "fast", monkeypatch, 0.14)
    assert train_cfg.epochs_per_cycle == 15 and 40 < train_cfg.cls_epochs_per_cycle < 50 and plan["fits"]
    # stretched segmentation epochs before the classifier's beyond its core: a machine with time for 13
    seg13 = _fit(tmp_path / "seg13", monkeypatch, 0.20)[1]
    assert seg13["seg_epochs"] == 13 and 12 < seg13["cls_epochs"] < 40
    assert f"so 13 segmentation epochs (the preset's 12 stretched) and {seg13['cls_epochs']} of 40 classifier epochs" in describe_plan(seg13)
    # a machine where the preset fits with a little time over stretches only as far as that time goes
    mid = _fit(tmp_path / "mid", monkeypatch, 0.20)[1]
    preset_only = _fit(tmp_path / "mid1", monkeypatch, 0.10, stretch=1.0)[1]
    assert (preset_only["seg_epochs"], preset_only["cls_epochs"]) == (12, 40)
    assert 12 < mid["seg_epochs"] < 15 and mid["fits"] and mid["estimate_s"] <= 1200 * (1 - HEADROOM)
    # a machine too slow for the preset plans the same whatever the stretch: the classifier stays within its preset too
    for step_s in (0.34, 0.48):
        slow, slow1 = _fit(tmp_path / f"slow{step_s}", monkeypatch, step_s)[1], _fit(tmp_path / f"slow1{step_s}", monkeypatch, step_s, stretch=1.0)[1]
        assert slow["seg_epochs"] < 12 and (slow["seg_epochs"], slow["cls_epochs"]) == (slow1["seg_epochs"], slow1["cls_epochs"])
        assert slow["max_cls_epochs"] == 40


@pytest.mark.parametrize("step_s, seg", [(0.30, 15), (0.38, 14), (0.40, 13), (0.45, 12), (0.60, 8)])
def test_a_stretched_plan_takes_every_epoch_that_fits_and_no_more(step_s, seg):
    target = 1200 * (1 - HEADROOM)
    plan = fit_epochs(budget_s=1200, step_s=step_s, **DEMO, max_share=1.25)
    preset = fit_epochs(budget_s=1200, step_s=step_s, **DEMO)
    assert plan.seg_epochs == seg and plan.max_cls_epochs == (16 if seg >= 12 else 13) >= plan.cls_epochs
    assert plan.estimate_s <= target
    assert plan.seg_epochs >= preset.seg_epochs and plan.cls_epochs >= min(16, round(13 * plan.seg_epochs / 12))
    if plan.seg_epochs < 15:  # one more segmentation epoch, the classifier at its share, would not have fitted
        more = fit_epochs(budget_s=1200, step_s=step_s, **{**DEMO, "seg_epochs": plan.seg_epochs + 1,
                                                            "cls_epochs": round(13 * (plan.seg_epochs + 1) / 12)}, min_share=1.0)
        assert more.estimate_s > target


@pytest.mark.parametrize("epochs, share, top", [(12, 1.0, 12), (12, 1.25, 15), (13, 1.25, 16), (12, 1.1, 13), (5, 1.05, 5)])
def test_stretched_epochs_round_down_and_never_below_the_preset(epochs, share, top):
    from petctl.engine.budget import stretched_epochs

    assert stretched_epochs(epochs, share) == top


def test_a_stretch_outside_one_to_two_is_refused():
    from petctl.engine.demo import DemoConfig

    for bad in (0.9, 2.5):
        with pytest.raises(PetctlError, match="--stretch must be within 1..2"):
            DemoConfig(stretch=bad)


def test_tta_and_the_merged_retrain_are_counted_in_the_plan(tmp_path: Path, monkeypatch):
    """--tta segments each scan four times and --retrain-merged's second training runs longer epochs
    (training + test cases): both plan fewer epochs than the plain demo on the same machine."""
    plain = _fit(tmp_path / "plain", monkeypatch, 0.20)[1]
    tta = _fit(tmp_path / "tta", monkeypatch, 0.20, tta=True)[1]
    assert tta["infer_scans"] == 4 * plain["infer_scans"] == 4 * 46 * 2
    assert tta["seg_epochs"] < plain["seg_epochs"] and tta["estimate_s"] <= 1200 * (1 - HEADROOM)
    twice = _fit(tmp_path / "twice", monkeypatch, 0.15, retrain_merged=True)[1]
    merged = _fit(tmp_path / "merged", monkeypatch, 0.15, retrain_merged=True, stretch=1.0)[1]
    assert twice["seg_rounds"] == 2 * plain["seg_rounds"] and twice["estimate_s"] <= 1200 * (1 - HEADROOM)
    assert merged["seg_epochs"] <= 12 and merged["estimate_s"] <= 1200 * (1 - HEADROOM)
    # the estimate counts the merged epochs' 77 cases, not the fold's 65: more than twice one training
    from petctl.engine.budget import fit_epochs
    from petctl.engine.sampling import batches_per_epoch

    one = fit_epochs(budget_s=1200, elapsed_s=115.0, step_s=0.15, seg_epochs=twice["seg_epochs"], cls_epochs=twice["cls_epochs"],
                     seg_steps_per_epoch=batches_per_epoch(65, 1, 16, 4, 0), num_val_cases=17, seg_rounds=1, cls_rounds=2, infer_scans=92,
                     batch_size=4, min_share=1.0)
    assert twice["seg_stage_estimate_s"] > 2 * one.seg_stage_s


def test_one_classifier_on_both_views_costs_its_views_on_its_threads(tmp_path: Path, monkeypatch):
    """An "xy" classifier epoch is two views' work on the lone job's two threads (1.46× one's pace)."""
    from petctl.engine.budget import DemoCost
    from petctl.engine.demo import CLS_THREAD_GAIN, DemoLaunch
    from petctl.engine.folds import FoldLaunch

    xy = DemoLaunch(seg=FoldLaunch(processes=1, concurrent=2), cls=FoldLaunch(processes=1, concurrent=1, threads=2), seg_batch=4)
    plain = _fit(tmp_path / "plain", monkeypatch, 0.20)[1]
    both = _fit(tmp_path / "xy", monkeypatch, 0.20, launches=xy, cls_projections=("xy",))[1]
    head = DemoCost().lesion_map  # cpu-small's lesion-map head
    assert plain["cls_epoch_cost"] == pytest.approx(DemoCost().cls_epoch * head, abs=1e-3)
    assert both["cls_epoch_cost"] == pytest.approx(DemoCost().cls_epoch * head * 2 / (1 + CLS_THREAD_GAIN), abs=1e-3)
    assert both["estimate_s"] <= 1200 * (1 - HEADROOM)
    # the global head: a classifier epoch at the measured cost
    glob = _fit(tmp_path / "global", monkeypatch, 0.20, cls_head="global")[1]
    assert glob["cls_epoch_cost"] == DemoCost().cls_epoch


def test_no_budget_means_the_preset_and_no_probe(tmp_path: Path, monkeypatch):
    train_cfg, plan, said, _ = _fit(tmp_path, monkeypatch, None, budget_min=0)
    assert plan is None and train_cfg.epochs_per_cycle == 12 and not said and not (tmp_path / "budget.json").exists()


def test_a_negative_budget_is_refused():
    from petctl.engine.demo import DemoConfig

    with pytest.raises(PetctlError, match="--budget must be ≥ 0"):
        DemoConfig(budget_min=-1)


@pytest.mark.parametrize("step_s", [0.14, 0.20, 0.40, 0.60, 0.87, 3.0])
def test_only_the_classifiers_core_epochs_shrink_with_the_segmentation(step_s):
    """CLS_CORE_SHARE: of cpu-small's 40 classifier epochs only 12 count against the segmentation's
    epochs; the others come from time left over, so the segmentation plans as it would with a
    12-epoch classifier."""
    from petctl.engine.budget import CLS_CORE_SHARE, core_cls_epochs

    assert core_cls_epochs(40, CLS_CORE_SHARE) == 12
    base = {**DEMO, "cls_rounds": 1}
    core = fit_epochs(budget_s=1200, step_s=step_s, **{**base, "cls_epochs": 12}, max_share=1.25)
    plan = fit_epochs(budget_s=1200, step_s=step_s, **{**base, "cls_epochs": 40}, max_share=1.25, cls_core_share=CLS_CORE_SHARE)
    whole = fit_epochs(budget_s=1200, step_s=step_s, **{**base, "cls_epochs": 40}, max_share=1.25)
    assert plan.seg_epochs == core.seg_epochs >= whole.seg_epochs and plan.fits == core.fits
    assert core.cls_epochs <= plan.cls_epochs <= plan.max_cls_epochs == (50 if plan.seg_epochs >= 12 else 40)
    if plan.fits:
        assert plan.estimate_s <= 1200 * (1 - HEADROOM)
    if step_s in (0.40, 0.60, 0.87):  # scaled whole, the classifier's 40 would have cost the segmentation epochs
        assert whole.seg_epochs < plan.seg_epochs


def test_the_classifier_core_share_is_checked():
    with pytest.raises(PetctlError, match="classifier core 0"):
        fit_epochs(budget_s=1200, step_s=0.2, **DEMO, cls_core_share=0.0)


def test_a_plan_made_before_the_classifier_core_scales_the_whole_preset():
    """A resumed demo's budget.json from before `core_cls_epochs` keeps the low end it was planned with."""
    from petctl.engine.demo import _low_cls

    plan = {"preset_seg_epochs": 12, "preset_cls_epochs": 40, "seg_epochs": 6, "max_cls_epochs": 40, "cls_epochs": 20}
    assert _low_cls(plan) == 20  # 6 / 12 of all 40
    assert _low_cls({**plan, "core_cls_epochs": 12}) == 6  # 6 / 12 of the core 12

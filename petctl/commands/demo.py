"""Run the whole AutoPET-II method end to end on the embedded synthetic cohort (or --data).

synth → prepare → segmentation and classifier folds → calibrate → (retrain-merged) → gated
ensemble predict of imagesTs → evaluate against labelsTs → OUT/report.md with PNGs. Every stage is
real and visible in `petctl status`; a re-run with the same options resumes (use --fresh to start over).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def demo(
    data: Annotated[Optional[Path], typer.Option("--data", help="nnU-Net raw cohort (imagesTr/labelsTr, optional imagesTs/labelsTs); default: synthesize one.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Output folder (cohort, store, predictions, report).")] = Path("demo-out"),
    preset: Annotated[str, typer.Option("--preset", help="Training preset.")] = "cpu-small",
    run: Annotated[str, typer.Option("--run", help="Registry run name.")] = "demo",
    cases: Annotated[int, typer.Option("--cases", help="Synthetic training cases.")] = 192,
    test_cases: Annotated[int, typer.Option("--test-cases", help="Synthetic held-out cases of new patients (imagesTs), predicted and evaluated; about half positive.")] = 32,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the synthetic cohort and the splits.")] = 0,
    folds: Annotated[int, typer.Option("--folds", help="Cross-validation folds of the split (the paper's 5).")] = 5,
    train_folds: Annotated[Optional[int], typer.Option("--train-folds", min=1, help="Train and ensemble only the first N folds (0 < N ≤ --folds; on CPU one fold on every core gets the most steps out of the budget; --all-folds trains every one).")] = 1,
    all_folds: Annotated[bool, typer.Option("--all-folds", help="Train every fold of the split (the paper).")] = False,
    test_fraction: Annotated[float, typer.Option("--test-fraction", help="Held-out calibration split of the training cases.")] = 0.15,
    concurrent: Annotated[Optional[int], typer.Option("--concurrent", min=1, help="Folds trained at the same time (default: as many as train, up to one per CPU core or GPU).")] = None,
    processes: Annotated[Optional[int], typer.Option("--processes", min=1, help="Processes (DDP) per segmentation fold, sharing the preset's batch, so they must divide it (default: CPU cores / folds at a time, down to a divisor; 1 on GPUs).")] = None,
    workers: Annotated[int, typer.Option("--workers", help="prepare worker processes.")] = 2,
    clip: Annotated[str, typer.Option("--clip", help="prepare's clip percentiles low,high (the method: 5,95).")] = "5,95",
    pet_clip: Annotated[str, typer.Option("--pet-clip", help="prepare's PET clip percentiles low,high (0,95: the PET floor at the lesions' lowest uptake; 5,95: the paper's).")] = "0,95",
    hot_background: Annotated[float, typer.Option("--hot-background", help="prepare's share of background patches in bright non-lesion tissue, each bright structure whose peak reaches half-way from the lesions' PET p5 to their mean equally often (0: the paper's uniform sampling).")] = 0.5,
    pet_wide: Annotated[bool, typer.Option("--pet-wide", help="prepare's third channel: log(1 + SUV) up to the body's p99.9 beside the clipped PET.")] = False,
    gate_margin: Annotated[float, typer.Option("--gate-margin", help="calibrate's gate margin: the classifier gate's threshold is this fraction of the lowest test-split positive's score (1: the paper's).")] = 0.5,
    gate_positives: Annotated[str, typer.Option("--gate-positives", help="calibrate's gate keeps the test positives the segmentation finds ('detected') or all of them ('all': the paper's).")] = "detected",
    urine_veto: Annotated[bool, typer.Option("--urine-veto/--no-urine-veto", help="calibrate's urine veto: drop predicted components lying mostly in water-density CT regions (the bladder), in calibration and prediction (--no-urine-veto: the paper's).")] = True,
    calibrate_negatives: Annotated[bool, typer.Option("--calibrate-negatives/--no-calibrate-negatives", help="calibrate also segments the test split's negatives, for the FPV curve over them (off: the threshold does not depend on them, and the held-out imagesTs negatives measure the FPV).")] = False,
    hard_lesion_gain: Annotated[Optional[float], typer.Option("--hard-lesion-gain", help="Segmentation training's hard-example mining: a lesion's weight in lesion-centred draws is 1 + GAIN × the share of it the nets missed so far (0: off; default: the preset's).")] = None,
    lesion_dim: Annotated[Optional[float], typer.Option("--lesion-dim", help="Segmentation training's lesion dimming: the probability that a patch's lesions are made fainter (their uptake above the tissue around them × U(0.5, 1); 0: off; default: the preset's).")] = None,
    cls_projections: Annotated[Optional[str], typer.Option("--cls-projections", help="The classifier's MIP projections, comma-separated: x,y (a model each, the paper's) or xy (one model on both views of each scan); default: the preset's (x,y).")] = None,
    cls_pretrained: Annotated[Optional[Path], typer.Option("--cls-pretrained", exists=True, dir_okay=False, help="A local timm state dict the classifier folds start from (never downloaded; for cpu-small the ImageNet weights of timm's resnet10t); default: from scratch.")] = None,
    budget: Annotated[float, typer.Option("--budget", min=0, help="Minutes the demo may take on a CPU machine: a few timed training steps size the epochs to end 5% inside it (never below 2/5 of the preset's; 0: the preset's epochs whatever the time).")] = 20.0,
    stretch: Annotated[float, typer.Option("--stretch", min=1, max=2, help="With a budget, a machine fast enough for the preset trains up to this share of its epochs (1.25: 15 segmentation and 50 classifier epochs of cpu-small's 12 and 40) to use the budget; 1: never more than the preset's.")] = 1.25,
    prob_resample: Annotated[str, typer.Option("--prob-resample", help="calibrate's and predict's resampling of the ensemble's probabilities to the input grid before lesions are detected: 'nearest' (a lesion's core keeps the value the net gave it on its own grid) or 'linear' (trilinear, which can average a narrow core under the threshold).")] = "nearest",
    tta: Annotated[bool, typer.Option("--tta", help="Calibrate and predict with flip test-time augmentation (3 extra passes per fold).")] = False,
    retrain_merged: Annotated[bool, typer.Option("--retrain-merged", help="Retrain with the test split merged in before predicting.")] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="Delete OUT (only an empty folder or an earlier demo's) and the run first instead of resuming.")] = False,
    home: Annotated[Optional[Path], typer.Option("--home", help="petctl home (default $PETCTL_HOME or ./cache).")] = None,
) -> None:
    from rich.table import Table

    from petctl.console import console, warning_line
    from petctl.commands.prepare import percentile_pair
    from petctl.engine.demo import DemoConfig, run_demo
    from petctl.home import resolve_home

    cfg = DemoConfig(out=str(out), data=str(data) if data else None, preset=preset, run=run, cases=cases, test_cases=test_cases,
                     seed=seed, folds=folds, train_folds=None if all_folds else train_folds, test_fraction=test_fraction, concurrent=concurrent, processes=processes, workers=workers,
                     clip=percentile_pair(clip), pet_clip=percentile_pair(pet_clip, "--pet-clip") if pet_clip else None,
                     hot_background=hot_background, pet_wide=pet_wide, tta=tta, gate_margin=gate_margin, gate_positives=gate_positives,
                     urine_veto=urine_veto, calibrate_negatives=calibrate_negatives, prob_resample=prob_resample, hard_lesion_gain=hard_lesion_gain, lesion_dim=lesion_dim,
                     cls_projections=tuple(p.strip() for p in cls_projections.split(",")) if cls_projections else None,
                     cls_pretrained=str(cls_pretrained.resolve()) if cls_pretrained else None, budget_min=budget, stretch=stretch, retrain_merged=retrain_merged, fresh=fresh)
    summary = run_demo(cfg, resolve_home(home), say=console.print, warn=warning_line)
    table = Table(title="petctl demo")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("segmentation threshold", f"{summary['thresholds']['segmentation']:.2f}")
    if summary["thresholds"]["classifier"] is not None:
        table.add_row("classifier threshold", f"{summary['thresholds']['classifier']:.4f}")
    table.add_row("calibration Dice (test split)", f"{summary['calibration']['test_dice']:.3f}")
    test = summary.get("test")
    if test:
        from petctl.engine.evaluate import interval_suffix

        ci = test.get("interval") or {}
        level = f"{ci['level']:.0%} interval" if ci else ""
        table.add_row(f"held-out mean Dice ({test['num_positive']} positives)", f"{test['mean_dice']:.3f}{interval_suffix(ci.get('mean_dice'), 3)}")
        table.add_row(f"held-out mean FPV mL ({test['num_negative']} negatives)", f"{test['mean_fpv_ml_negatives']:.2f}{interval_suffix(ci.get('mean_fpv_ml_negative'), 2)}")
        table.add_row("held-out mean FNV mL (positives)", f"{test['mean_fnv_ml']:.2f}{interval_suffix(ci.get('mean_fnv_ml'), 2)}")
        table.add_row("held-out classifier AUROC", f"{test['classifier_auroc']:.3f}{interval_suffix(ci.get('classifier_auroc'), 3)}")
        if level:
            table.caption = f"in brackets: {level}s, bootstrap over the held-out cases"
        table.add_row("gated (predicted healthy)", f"{test['gated']}/{test['num_positive'] + test['num_negative']}")
        if test.get("lesion_detection"):
            bins = test["lesion_detection"]  # label and counts apart, so the row fits an 80-column terminal
            table.add_row("lesions found " + "/".join(b["bin"].replace(" mL", "").replace(" ", "") for b in bins) + " mL",
                          " · ".join(f"{b['detected']}/{b['lesions']}" for b in bins))
    budget = summary.get("budget")
    if budget:
        table.add_row(f"epochs seg / cls (budget {budget['budget_min']:g} min)", f"{budget['seg_epochs']} / {budget['cls_epochs']}")
    table.add_row("total time", f"{sum(summary['timings_s'].values()):.0f} s")
    console.print(table)
    console.print(f"report: {out / 'report.md'}")

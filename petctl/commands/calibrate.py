"""Choose the segmentation threshold (max Dice) and the classifier gate (sensitivity 1.0, × --gate-margin) on the test set.

By default the threshold is chosen for PET-extent masks (each detected component redrawn at its
background-corrected 50 % SUV isocontour), as predict then draws them; with --urine-veto, after the
components lying mostly in urine on the CT are dropped, as predict then drops them.
Writes HOME/runs/RUN/thresholds.json, calibration_dice.png and calibration_roc.png, and records a
`calibrate` step in the registry. A test case that cannot be read is named on its own line and left
out (thresholds.json lists it under skipped_cases); the exit status is then 3.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def calibrate(
    run: Annotated[str, typer.Option("--run", help="The training run to calibrate.")],
    no_gate: Annotated[bool, typer.Option("--no-gate", help="Skip the classifier (no classifier folds trained).")] = False,
    pet_extent: Annotated[bool, typer.Option("--pet-extent/--no-pet-extent", help="Choose the threshold for PET-extent masks (each detected component redrawn at its background-corrected 50% SUV isocontour), scored on the input grid; needs the prepared cohort's NIfTI files. --no-pet-extent: the paper's plain threshold on the stored grid.")] = True,
    threshold_prior: Annotated[str, typer.Option("--threshold-prior", help="With the PET extent: among the thresholds within one standard error of the best mean Dice, take the one nearest this prior. 'preset': the run's preset's (cpu-small 0.75; autopet-paper none); 'none': the best Dice; or a number in (0, 1).")] = "preset",
    volume_budget_ml: Annotated[float, typer.Option("--volume-budget-ml", help="With the PET extent: consider only thresholds whose mean false-positive volume over the test negatives and mean false-negative volume over the test positives are both within this many mL (when none is: all). Default inf: Dice alone.")] = float("inf"),
    gate_margin: Annotated[float, typer.Option("--gate-margin", help="The classifier gate's threshold is this fraction of the lowest test positive's score (1: the paper's sensitivity-1.0 threshold; `petctl demo` takes 0.5).")] = 1.0,
    gate_positives: Annotated[str, typer.Option("--gate-positives", help="The test positives the gate keeps: 'all' (the paper's sensitivity 1.0) or 'detected' (only those the ensemble's mask at the chosen threshold touches; a positive the segmentation misses keeps an empty mask either way; `petctl demo` takes it).")] = "all",
    urine_veto: Annotated[bool, typer.Option("--urine-veto/--no-urine-veto", help="With the PET extent: drop each predicted component that lies mostly (≥ 50%) in urine — large connected water-density (-30..20 HU) regions of the CT, such as the bladder — before scoring; recorded, so predict drops them too (`petctl demo` takes it).")] = False,
    negatives: Annotated[bool, typer.Option("--negatives/--no-negatives", help="With the PET extent: also segment the test negatives the gate lets through, for their mean false-positive volume per threshold (the curve in calibration_dice.png; --volume-budget-ml needs it). --no-negatives: positives only, about half the time (`petctl demo` takes it).")] = True,
    tta: Annotated[bool, typer.Option("--tta", help="Average each fold over flips too (3 extra passes per fold, ~4× the segmentation time); recorded, so predict flips as well.")] = False,
    resample: Annotated[str, typer.Option("--resample", help="With the PET extent: how the ensemble's probabilities reach the input grid before components are detected: 'linear' (trilinear) or 'nearest' (each input voxel keeps its stored voxel's value, so a lesion's peak is not averaged under the threshold); recorded, so predict resamples alike.")] = "linear",
    component_seed: Annotated[bool, typer.Option("--component-seed", help="With --no-pet-extent: also choose a component seed (0.50-0.90): a component of p >= threshold is kept only when it reaches the seed.")] = False,
    home: Annotated[Optional[Path], typer.Option("--home", help="petctl home (default $PETCTL_HOME or ./cache).")] = None,
) -> None:
    from rich.table import Table

    from petctl.console import console, progress, warn_line
    from petctl.engine.calibrate import calibrate as run_calibrate
    from petctl.engine.calibrate import check_gate_margin, check_gate_positives, gate_rule_text
    from petctl.engine.geometry import check_resample
    from petctl.engine.registry import Registry, check_name, step_context
    from petctl.home import resolve_home

    check_name(run, "run")
    prior = _prior(threshold_prior)
    check_gate_margin(gate_margin)
    check_gate_positives(gate_positives)
    check_resample(resample, source="--resample")
    home_path = resolve_home(home)
    registry = Registry(home_path)
    registry.run(run)  # a clear error when the run does not exist
    run_dir = home_path / "runs" / run
    with progress() as bar, step_context(registry, run, "calibrate", kind="calibrate", config={"gate": not no_gate, "pet_extent": pet_extent, "volume_budget_ml": volume_budget_ml, "threshold_prior": threshold_prior,
                                                                                                "component_seed": component_seed, "tta": tta, "gate_margin": gate_margin,
                                                                                                "gate_positives": gate_positives, "urine_veto": urine_veto, "negatives": negatives,
                                                                                                "resample": resample}):
        task = bar.add_task("ensemble on the test set", total=None)
        result = run_calibrate(run_dir, on_case=lambda c: bar.advance(task), gate=not no_gate,
                               component_seed=component_seed, pet_extent=pet_extent, volume_budget_ml=volume_budget_ml,
                               threshold_prior=prior, tta=tta, gate_margin=gate_margin, gate_positives=gate_positives,
                               urine_veto=urine_veto, negatives=negatives, resample=resample,
                               on_skip=lambda c, r: warn_line(f"{c}: {r}"))
        seg, cls = result["segmentation"], result["classifier"]
        metrics = {"seg_threshold": seg["threshold"], "seed_threshold": seg["seed_threshold"], "test_dice": seg["mean_dice"],
                   "skipped": len(result["skipped_cases"])}
        if seg.get("extent"):
            metrics.update(test_fpv_ml_negatives=seg["extent"]["mean_fpv_ml_negatives"], test_fnv_ml=seg["extent"]["mean_fnv_ml"])
        if cls:
            metrics.update(cls_threshold=cls["threshold"], cls_auroc=cls["auroc"], specificity=cls["specificity"])
        registry.update_step(run, "calibrate", metrics=metrics)

    table = Table(title=f"Segmentation threshold — ensemble Dice on {seg['num_positives']} test positives")
    for col in ("fold", "val threshold", "ensemble Dice @ val thr", "fold alone: best thr", "fold alone: Dice"):
        table.add_column(col, justify="right")
    for f in seg["folds"]:
        vt = f.get("val_threshold")
        table.add_row(f["fold"], "-" if vt is None else f"{vt:.2f}", f"{f.get('ensemble_dice_at_val_threshold', float('nan')):.4f}",
                      f"{f['test_best_threshold']:.2f}", f"{f['test_dice_alone']:.4f}")
    seeded = ""
    if seg.get("extent"):
        plain = seg["extent"]["plain_on_input_grid"]
        table.add_row("ensemble, plain threshold", "", "", f"{plain['threshold']:.2f}", f"{plain['mean_dice']:.4f}")
        e = seg["extent"]
        table.add_row("ensemble, PET extent: best Dice", "", "", f"{e['best_threshold']:.2f}",
                      f"{e['best_dice']:.4f} ± {e['dice_standard_error']:.4f}")
        rule = "best" if e["threshold_prior"] is None else f"nearest {e['threshold_prior']:.2f} within 1 SE"
        fpv = "not measured" if e["mean_fpv_ml_negatives"] is None else f"{e['mean_fpv_ml_negatives']:.2f}"
        seeded = (f", PET extent, {rule} (FPV {fpv} / FNV {e['mean_fnv_ml']:.2f} mL"
                  f"{'' if e['budget_met'] else ', over the budget at every threshold'})")
    elif seg["seed_threshold"] > 0:  # the plain choice beside the seeded one
        plain = seg["without_seed"]
        table.add_row("ensemble, no seed", "", "", f"{plain['threshold']:.2f}", f"{plain['mean_dice']:.4f}")
        seeded = f", seed {seg['seed_threshold']:.2f}"
    table.add_row(f"[bold]ensemble{seeded}[/]", "", "", f"[bold]{seg['threshold']:.2f}[/]", f"[bold]{seg['mean_dice']:.4f}[/]")
    console.print(table)
    if cls:
        t2 = Table(title=f"Classifier gate ({gate_rule_text(cls)}, on the test set)")
        for col in ("threshold", "AUROC", "specificity", "negatives skipping segmentation"):
            t2.add_column(col, justify="right")
        t2.add_row(f"{cls['threshold']:.4f}", f"{cls['auroc']:.4f}", f"{cls['specificity']:.4f}",
                   f"{cls['negatives_skipping_segmentation']}/{cls['negatives']}")
        console.print(t2)
    console.print(f"[green]wrote[/] {run_dir / 'thresholds.json'}, calibration_dice.png" + (", calibration_roc.png" if cls else ""))
    if result["skipped_cases"]:
        from petctl.errors import EXIT_SKIPPED

        console.print(f"[yellow]calibrated without {len(result['skipped_cases'])} test case(s)[/], each named above")
        raise typer.Exit(EXIT_SKIPPED)


def _prior(text: str) -> float | str | None:
    """--threshold-prior: "preset", "none" or a number in (0, 1)."""
    value = text.strip().lower()
    if value in ("preset", "none"):
        return None if value == "none" else "preset"
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not 0.0 < number < 1.0:
        from petctl.errors import PetctlError

        raise PetctlError(f"--threshold-prior: expected 'preset', 'none' or a number in (0, 1), got {text!r}")
    return number

"""autoPET metrics of a folder of predicted masks against the ground truth: Dice, FPV and FNV.

Files are matched by case id ({case}.nii.gz or .nii); GT_DIR may be an nnU-Net labelsTs or
labelsTr folder. Per case, as the official autoPET II script computes them: Dice (positives only),
false-positive volume (mL of predicted 18-connected components touching no lesion voxel) and
false-negative volume (mL of lesions touching no predicted voxel). The summary gives mean Dice
and FNV over positive cases and mean FPV over all and over negative cases, each group mean with a
95 % percentile-bootstrap interval over the cases (2000 resamples, positives and negatives drawn
apart; `interval` in --json): with a few dozen scans, how far another draw could move it.
A third table gives the lesion-wise detection by lesion volume (< 1.5, 1.5–5, 5–20, ≥ 20 mL): how
many ground-truth lesions each bin holds and how many a predicted voxel touches (`lesion_detection`
in --json), which shows what the means hide: which lesions are missed.

Exit status: 0 when every case was scored, 3 when some were not (a missing, misaligned or
non-0/1 prediction, or a prediction without ground truth; each named on its own line), 2 on a
usage error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from petctl.errors import EXIT_SKIPPED


def _number(value: float, digits: int) -> str:
    return "–" if math.isnan(value) else f"{value:.{digits}f}"


def evaluate(
    gt_dir: Annotated[Path, typer.Argument(help="Ground-truth label folder ({case}.nii.gz), e.g. an nnU-Net labelsTs.", show_default=False)],
    pred_dir: Annotated[Path, typer.Argument(help="Predicted mask folder ({case}.nii.gz, 0/1 on the ground-truth grid).", show_default=False)],
    csv: Annotated[Optional[Path], typer.Option("--csv", help="Also write the per-case metrics to this CSV (case,dice,fpv_ml,fnv_ml).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary and per-case metrics as JSON instead of tables.")] = False,
) -> None:
    from rich.table import Table

    from petctl.console import console, progress, warn_line
    from petctl.engine.evaluate import bootstrap_intervals, detection_by_size, evaluate_folders, interval_suffix, write_csv

    with progress() as bar:
        task = bar.add_task("evaluate", total=None)
        result = evaluate_folders(gt_dir, pred_dir, on_case=lambda case, total: bar.update(task, total=total, advance=1))
    for case, reason in result.problems.items():
        warn_line(f"{case}: {reason}")
    if csv is not None:
        write_csv(result.cases, csv)

    ci = bootstrap_intervals(result.cases)
    if json_out:
        typer.echo(json.dumps({**result.to_json(), "interval": ci.to_json()}, indent=2))
    else:
        cases = Table(title=f"autoPET metrics per case ({pred_dir})")
        for column in ("case", "dice", "fpv_ml", "fnv_ml"):
            cases.add_column(column, justify="left" if column == "case" else "right")
        for case, m in result.cases.items():
            cases.add_row(case, _number(m.dice, 4), _number(m.fpv_ml, 3), _number(m.fnv_ml, 3))
        s = result.summary
        summary = Table(title="Summary")
        summary.add_column("metric")
        summary.add_column("value", justify="right")
        for name, value in (
            ("cases scored", str(s.num_cases)),
            ("positive / negative", f"{s.num_positive} / {s.num_negative}"),
            ("not scored (problems)", str(len(result.problems))),
            ("mean Dice (positives)", _number(s.mean_dice, 4) + interval_suffix(ci.mean_dice, 4)),
            ("mean FPV mL (all cases)", _number(s.mean_fpv_ml, 3)),
            ("mean FPV mL (negatives)", _number(s.mean_fpv_ml_negative, 3) + interval_suffix(ci.mean_fpv_ml_negative, 3)),
            ("mean FNV mL (positives)", _number(s.mean_fnv_ml, 3) + interval_suffix(ci.mean_fnv_ml, 3)),
            ("(in brackets)", f"{ci.level:.0%} bootstrap interval over cases"),
        ):
            summary.add_row(name, value)
        detection = Table(title="Lesion detection by volume (a lesion is detected when a predicted voxel touches it)")
        for column in ("lesion volume", "lesions", "detected", "sensitivity"):
            detection.add_column(column, justify="left" if column == "lesion volume" else "right")
        for b in detection_by_size(result.lesions):
            detection.add_row(b.label, str(b.lesions), str(b.detected), _number(100 * b.sensitivity, 0) + (" %" if b.lesions else ""))
        console.print(cases)
        console.print(summary)
        console.print(detection)
        if csv is not None:
            console.print(f"[green]wrote[/] {csv}")
    if result.problems:
        raise typer.Exit(EXIT_SKIPPED)

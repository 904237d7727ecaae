"""Predict lesion masks: NIfTI in, NIfTI mask out in the input's own geometry.

INPUT is an nnU-Net folder (imagesTs, else imagesTr), an AutoPET-layout folder, or one CT file
CASE_0000.nii.gz (its PET CASE_0001 beside it). The MIP classifier gates each scan first (predicted
healthy → an empty mask, no segmentation); otherwise the fold ensemble and the calibrated threshold
(and component seed, when calibrated with one).
Writes OUTPUT/{case}.nii.gz (uint8) and OUTPUT/predictions.json. `--processes N` splits the cases
over N local worker processes. Exit status 3 when some cases were skipped (each named).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from petctl.errors import EXIT_SKIPPED


def predict(
    input_path: Annotated[Path, typer.Argument(metavar="INPUT", help="nnU-Net or AutoPET folder, or a CASE_0000.nii.gz CT file.")],
    output: Annotated[Path, typer.Argument(metavar="OUTPUT", help="Output folder for {case}.nii.gz masks.")],
    run: Annotated[str, typer.Option("--run", help="A calibrated run (or its -merged retrain).")],
    no_gate: Annotated[bool, typer.Option("--no-gate", help="Segment every scan (skip the classifier gate).")] = False,
    tta: Annotated[Optional[bool], typer.Option("--tta/--no-tta", help="Flip test-time augmentation (3 extra passes per fold). Default: as the run was calibrated (`calibrate --tta`), since its threshold was chosen on those probabilities.", show_default=False)] = None,
    save_probabilities: Annotated[Optional[str], typer.Option("--save-probabilities", help="Also write {case}_prob.nii.gz: float32 or uint8 (×255; a quarter of the size).")] = None,
    preview: Annotated[bool, typer.Option("--preview", help="Write {case}_preview.png (PET MIP with the mask).")] = False,
    processes: Annotated[int, typer.Option("--processes", min=1, help="Worker processes that split the cases (each on its own GPU when there are enough, else sharing the CPU's cores); one predictions.json. Under a launcher that sets RANK/WORLD_SIZE, leave it at 1: each rank takes its share.")] = 1,
    home: Annotated[Optional[Path], typer.Option("--home", help="petctl home (default $PETCTL_HOME or ./cache).")] = None,
) -> None:
    from rich.table import Table

    from petctl.console import console, progress, warn_line
    from petctl.engine.predict import PredictOptions, input_cases, launch_id, predict as run_predict, predict_processes, rank_share, write_summary
    from petctl.engine.registry import Registry, check_name, step_context
    from petctl.errors import PetctlError
    from petctl.home import resolve_home

    check_name(run, "run")
    home_path = resolve_home(home)
    registry = Registry(home_path)
    registry.run(run)
    options = PredictOptions(gate=not no_gate, tta=tta, save_probabilities=save_probabilities, preview=preview)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1 and processes > 1:
        raise PetctlError(f"--processes {processes} under a launcher's WORLD_SIZE={world_size}: use one or the other")
    total = rank_share(len(input_cases(input_path)), rank, world_size)
    # the pid too: two launches (array tasks) in the same second must not share one registry step
    step = f"predict-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}" + (f"-rank{rank}" if world_size > 1 else "")
    with progress() as bar, step_context(registry, run, step, kind="predict",
                                         config={"input": str(input_path), "output": str(output), "processes": processes,
                                                 "rank": rank, "world_size": world_size, **options.__dict__}):
        task = bar.add_task("predict", total=total)
        if world_size > 1:
            result = run_predict(home_path / "runs" / run, input_path, output, options, rank=rank, world_size=world_size,
                                 on_case=lambda c: bar.advance(task), on_skip=lambda c, r: warn_line(f"{c}: {r}"))
        else:
            result = predict_processes(home_path / "runs" / run, input_path, output, options, processes,
                                       on_case=lambda c: bar.advance(task), on_skip=lambda c, r: warn_line(f"{c}: {r}"))
        write_summary(output, result, rank=rank, world_size=world_size, launch=launch_id())
        gated = sum(1 for r in result.written.values() if r.get("gated"))
        seconds = [r["seconds"] for r in result.written.values()]
        registry.update_step(run, step, metrics={"cases": len(result.written), "gated": gated, "skipped": len(result.skipped),
                                                 "mean_seconds_per_case": round(sum(seconds) / max(len(seconds), 1), 3)})
    table = Table(title=f"predict → {output}")
    for col in ("case", "gate score", "gated", "lesion voxels", "seconds"):
        table.add_column(col, justify="right")
    for case, r in sorted(result.written.items()):
        score = r.get("cls_score")
        table.add_row(case, "-" if score is None else f"{score:.3f}", "yes" if r["gated"] else "no", str(r["lesion_voxels"]), f"{r['seconds']:.2f}")
    console.print(table)
    if result.skipped:
        raise typer.Exit(EXIT_SKIPPED)

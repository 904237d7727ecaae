"""Prepare a cohort: fingerprint, patient-grouped splits, and a Zarr store made for patch reads.

Exit status: 0 when every case was prepared, 3 when some cases were skipped (each is named on its
own line with the reason; all other cases are still prepared completely), 2 on a usage error.
Re-running resumes: finished cases are kept, incomplete ones are redone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from petctl.errors import EXIT_SKIPPED, PetctlError


def _spacing(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise PetctlError(f"--spacing must look like 2.04,2.04,3 (got {text!r})") from None
    if len(values) != 3:
        raise PetctlError(f"--spacing needs three values (got {text!r})")
    return values  # type: ignore[return-value]


def percentile_pair(text: str, option: str = "--clip") -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise PetctlError(f"{option} must look like 5,95 (got {text!r})") from None
    return lo, hi


def prepare(
    data: Annotated[Path, typer.Argument(help="Cohort folder: nnU-Net raw layout (imagesTr/labelsTr) or AutoPET layout.")],
    store: Annotated[Path, typer.Option("--store", help="Output store folder (created).")],
    spacing: Annotated[str, typer.Option("--spacing", help="Target spacing x,y,z in mm.")] = "2.04,2.04,3",
    workers: Annotated[int, typer.Option("--workers", help="Parallel worker processes.")] = 1,
    folds: Annotated[int, typer.Option("--folds", help="Number of cross-validation folds.")] = 5,
    test_fraction: Annotated[float, typer.Option("--test-fraction", help="Fraction of cases held out as the test set.")] = 0.2,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed for splits and coordinate samples.")] = 0,
    metadata: Annotated[Optional[Path], typer.Option("--metadata", help="CSV: case,patient,diagnosis or AutoPET's Subject ID,diagnosis.")] = None,
    clip: Annotated[str, typer.Option("--clip", help="Clip percentiles low,high of the training foreground (the method: 5,95; nnU-Net: 0.5,99.5).")] = "5,95",
    pet_clip: Annotated[Optional[str], typer.Option("--pet-clip", help="PET's own clip percentiles low,high (default: --clip); 0,99.5 keeps faint lesions above the floor.")] = None,
    hot_background: Annotated[float, typer.Option("--hot-background", help="Share of background patch centres in bright non-lesion tissue, each bright structure whose peak reaches half-way from the lesions' PET p5 to their mean equally often (0: the paper's uniform body sampling).")] = 0.0,
    pet_wide: Annotated[bool, typer.Option("--pet-wide", help="A third channel beside the clipped PET: log(1 + SUV) up to the body's p99.9, for faint and very hot lesions the clip flattens.")] = False,
    run: Annotated[Optional[str], typer.Option("--run", help="Registry run name (default: the store folder's name).")] = None,
    home: Annotated[Optional[Path], typer.Option("--home", help="petctl home (default $PETCTL_HOME or ./cache).")] = None,
) -> None:
    from petctl.console import console, progress, warn_line
    from petctl.engine.prepare import PrepareConfig, run as run_prepare
    from petctl.engine.registry import Registry, step_context
    from petctl.home import resolve_home

    cfg = PrepareConfig(
        data=str(data), store=str(store), spacing=_spacing(spacing), workers=workers, num_folds=folds,
        test_fraction=test_fraction, seed=seed, metadata=str(metadata) if metadata else None, clip_percentiles=percentile_pair(clip),
        pet_clip_percentiles=percentile_pair(pet_clip, "--pet-clip") if pet_clip else None, hot_background=hot_background,
        pet_wide=pet_wide,
    )
    registry = Registry(resolve_home(home))
    run_name = run or store.resolve().name
    with progress() as bar, step_context(registry, run_name, "prepare", kind="prepare", config=cfg.to_json()):
        tasks: dict[str, int] = {}

        def on_progress(phase: str, case: str, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task({"scan": "scan + validate", "write": "resample + write"}[phase], total=total)
            bar.advance(tasks[phase])

        result = run_prepare(cfg, progress=on_progress, on_skip=lambda c, r: warn_line(f"{c}: {r}"))
        registry.update_step(
            run_name, "prepare",
            metrics={"cases": len(result.prepared) + len(result.reused), "skipped": len(result.skipped), "seconds": round(result.seconds, 2)},
        )
    splits = result.splits or {}
    console.print(
        f"[green]prepared[/] {len(result.prepared)} case(s), reused {len(result.reused)}, skipped {len(result.skipped)} "
        f"→ {store} (test {len(splits.get('test', []))}, {len(splits.get('seg_folds', []))} folds) in {result.seconds:.1f}s"
    )
    if result.skipped:
        raise typer.Exit(EXIT_SKIPPED)

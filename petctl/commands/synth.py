"""Write a synthetic AutoPET-like PET/CT cohort (the embedded default cohort).

Whole-body CT (HU) and PET (SUV) studies with physiological uptake (brain, heart, kidneys,
bladder, sometimes brown fat or bowel) and, in about half the patients, FDG-avid lesions with
their labels. Same seed, same voxels. OUT must be empty, new, or an earlier synth output (finished or interrupted: it is cleared first).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer


def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the cohort into.", show_default=False)],
    cases: Annotated[int, typer.Option("--cases", min=1, help="Number of training studies.")] = 24,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Random seed; the same seed writes the same voxels.")] = 0,
    layout: Annotated[
        Literal["nnunet", "autopet"],
        typer.Option(
            "--layout",
            help="nnunet: imagesTr/labelsTr + dataset.json; autopet: PETCT_*/<study>/{CTres,SUV,SEG}.nii.gz.",
        ),
    ] = "nnunet",
    test_cases: Annotated[
        int,
        typer.Option(
            "--test-cases", min=0, help="Extra held-out studies of new patients in imagesTs/labelsTs (nnunet layout)."
        ),
    ] = 0,
    scale: Annotated[
        float,
        typer.Option(
            "--scale", min=0.25, max=4.0, help="Voxels per axis relative to the default (~100x100x150 at ~4.5 mm)."
        ),
    ] = 1.0,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Worker processes (the voxels do not depend on it).")] = 1,
) -> None:
    from petctl.console import console, progress
    from petctl.engine.synth import make_cohort

    bar = progress()
    task = bar.add_task("synth", total=cases + test_cases)

    def advance(_case: str) -> None:
        # Started on the first finished case, so a refused OUT prints one clean error line.
        bar.start()
        bar.advance(task)

    try:
        summary = make_cohort(out, cases, seed, layout=layout, scale=scale, num_test_cases=test_cases, on_case=advance,
                              workers=workers)
    finally:
        if bar.live.is_started:
            bar.stop()
    held_out = f" + {len(summary.test_case_ids)} test" if summary.test_case_ids else ""
    console.print(
        f"[bold green]synth[/] {len(summary.case_ids)} cases{held_out} ({summary.num_positive} positive) "
        f"from {summary.num_patients} patients, {summary.layout} layout → {summary.out}",
        highlight=False,
        soft_wrap=True,
    )

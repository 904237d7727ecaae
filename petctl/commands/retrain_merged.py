"""Retrain the segmentation and classifier folds with the test set merged into training.

Uses the same configuration as the parent run's folds and keeps its calibrated thresholds
(thresholds.json is copied); the result is a new registry run (default RUN-merged) linked to its
parent, usable by `petctl predict --run RUN-merged`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Optional

import typer

from petctl.errors import PetctlError


def retrain_merged(
    run: Annotated[str, typer.Option("--run", help="The calibrated parent run.")],
    new_run: Annotated[Optional[str], typer.Option("--new-run", help="Name of the merged run (default RUN-merged).")] = None,
    processes: Annotated[int, typer.Option("--processes", help="Processes per fold.")] = 1,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Stop each fold after this many steps (smoke runs).")] = None,
    home: Annotated[Optional[Path], typer.Option("--home", help="petctl home (default $PETCTL_HOME or ./cache).")] = None,
) -> None:
    from petctl.commands.train import summary_table
    from petctl.console import console, error_line
    from petctl.engine.config import TrainConfig
    from petctl.engine.folds import FoldLaunch, fold_names, train_folds
    from petctl.engine.registry import Registry
    from petctl.home import resolve_home

    home_path = resolve_home(home)
    registry = Registry(home_path)
    parent = registry.run(run)
    parent_dir = home_path / "runs" / run
    if not (parent_dir / "thresholds.json").exists():
        raise PetctlError(f"run {run!r} has no thresholds.json; run `petctl calibrate --run {run}` first")
    merged_run = new_run or f"{run}-merged"
    store = Path(parent.config.get("store") or "")
    if not (store / "splits.json").exists():
        raise PetctlError(f"run {run!r} does not name a prepared store")
    splits = json.loads((store / "splits.json").read_text())
    worst = 0
    for task in ("seg", "cls"):
        configs = sorted((parent_dir / task).glob("fold*/train_config.json"))
        if not configs:
            if task == "seg":
                raise PetctlError(f"run {run!r} has no trained segmentation folds")
            continue
        cfg = TrainConfig.from_json(json.loads(configs[0].read_text()))
        folds = list(range(len(splits[f"merged_{task}_folds"])))
        code = train_folds(cfg, store, task, folds, run=merged_run, home=home_path, merged=True,
                           launch=FoldLaunch(processes=processes, mixed_precision=cfg.mixed_precision, max_steps=max_steps),
                           say=console.print, warn=error_line, run_config={"store": str(store), "parent": run}, parent=run)
        summary_table(home_path / "runs" / merged_run / f"{task}-merged", fold_names(task, folds, cfg), task)
        worst = max(worst, code)
        if code:
            break
    shutil.copy2(parent_dir / "thresholds.json", home_path / "runs" / merged_run / "thresholds.json")
    console.print(f"[green]merged run[/] {merged_run} (parent {run}) keeps the calibrated thresholds")
    if worst:
        raise typer.Exit(worst)

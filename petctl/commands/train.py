"""Train segmentation or MIP-classifier folds: one `accelerate launch` process tree per fold.

Each fold (× projection for --task cls) is a registry step (`train-seg-fold<K>`,
`train-cls-fold<K>-<axis>`) with per-cycle metrics; checkpoints, metrics.json and progress.png land
in HOME/runs/RUN/seg/fold<K>/ or HOME/runs/RUN/cls/fold<K>-<axis>/. Re-running the same command resumes each fold
from its last checkpoint. Exit status 75 when a fold was stopped by SIGTERM/SIGUSR1 (checkpoint
saved; re-run to resume).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from petctl.errors import PetctlError


def _folds(text: str, num_folds: int) -> list[int]:
    if text == "all":
        return list(range(num_folds))
    try:
        folds = [int(v) for v in text.split(",")]
    except ValueError:
        raise PetctlError(f"--fold must be a number, a comma list, or 'all' (got {text!r})") from None
    bad = [f for f in folds if not 0 <= f < num_folds]
    if bad:
        raise PetctlError(f"--fold {bad[0]} does not exist (the store has {num_folds} folds)")
    return folds


def train(
    store: Annotated[Path, typer.Option("--store", help="Prepared store (from `petctl prepare`).")],
    task: Annotated[str, typer.Option("--task", help="seg (segmentation) or cls (MIP classifier).")] = "seg",
    fold: Annotated[str, typer.Option("--fold", help="Fold number, comma list, or 'all'.")] = "all",
    preset: Annotated[str, typer.Option("--preset", help="autopet-paper, cpu-small or cpu-tiny.")] = "cpu-small",
    processes: Annotated[int, typer.Option("--processes", help="Processes per fold in total (GPUs, or CPU gloo ranks).")] = 1,
    nodes: Annotated[int, typer.Option("--nodes", help="Machines per fold: run this command on each, with its own --machine-rank and the same --main-address and --main-port (`petctl slurm` writes that for you).")] = 1,
    machine_rank: Annotated[int, typer.Option("--machine-rank", help="With --nodes: this machine's rank, 0 … nodes-1 (0 hosts the main process).")] = 0,
    main_address: Annotated[Optional[str], typer.Option("--main-address", help="With --nodes: the address of the machine of rank 0.")] = None,
    main_port: Annotated[Optional[int], typer.Option("--main-port", help="The main process's port (default: a free one; with --nodes: required, the same on every machine).")] = None,
    mixed_precision: Annotated[str, typer.Option("--mixed-precision", help="no or bf16.")] = "no",
    run: Annotated[str, typer.Option("--run", help="Registry run name.")] = "default",
    merged: Annotated[bool, typer.Option("--merged", help="Use the merged folds (test set folded in).")] = False,
    pretrained: Annotated[Optional[Path], typer.Option("--pretrained", help="Local weights to start from (never downloaded): with --task seg a Swin-UNETR checkpoint (BTCV layout); with --task cls a timm state dict of the preset's classifier model (e.g. its ImageNet weights), the first conv summed to the MIP's one channel and the head replaced.")] = None,
    cycles: Annotated[Optional[int], typer.Option("--cycles", help="Override the preset's number of cycles (of the --task).")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Override the preset's epochs per cycle (of the --task).")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Stop after this many steps (smoke runs).")] = None,
    hard_lesion_gain: Annotated[Optional[float], typer.Option(
        "--hard-lesion-gain", help="Hard-example mining: weight a lesion in lesion-centred draws by 1 + GAIN × the share of it "
                                   "the net missed so far (0: off; default: the preset's).")] = None,
    lesion_dim: Annotated[Optional[float], typer.Option(
        "--lesion-dim", help="Lesion dimming: the probability that a patch's lesions are made fainter (their uptake above the "
                             "tissue around them × U(0.5, 1); 0: off; default: the preset's).")] = None,
    projections: Annotated[Optional[str], typer.Option(
        "--projections", help="With --task cls: the MIP projections, comma-separated, a model each: x,y (the paper's) or xy "
                              "(one model on both views of each scan); default: the preset's (x,y).")] = None,
    home: Annotated[Optional[Path], typer.Option("--home", help="petctl home (default $PETCTL_HOME or ./cache).")] = None,
) -> None:
    from petctl.console import console, error_line
    from petctl.engine.config import preset as get_preset, with_overrides
    from petctl.engine.folds import FoldLaunch, fold_names, train_folds
    from petctl.home import resolve_home

    if task not in ("seg", "cls"):
        raise PetctlError(f"--task must be seg or cls (got {task!r})")
    if pretrained is not None and not pretrained.is_file():
        raise PetctlError(f"--pretrained {pretrained}: no such file")
    splits_path = store / "splits.json"
    if not splits_path.exists():
        raise PetctlError(f"{store}: no splits.json; run `petctl prepare` first")
    splits = json.loads(splits_path.read_text())
    folds = _folds(fold, len(splits[f"{'merged_' if merged else ''}{task}_folds"]))
    cfg = with_overrides(get_preset(preset), task=task, cycles=cycles, epochs=epochs, mixed_precision=mixed_precision,
                         pretrained=str(pretrained) if pretrained else None, hard_lesion_gain=hard_lesion_gain, lesion_dim=lesion_dim,
                         projections=tuple(p.strip() for p in projections.split(",")) if projections else None)
    home_path = resolve_home(home)
    if nodes < 1 or processes < 1:
        raise PetctlError(f"--nodes and --processes must be at least 1 (got {nodes}, {processes})")
    if nodes > 1 and (main_address is None or main_port is None):
        raise PetctlError(f"--nodes {nodes}: run this command on every machine with its own --machine-rank (0 … {nodes - 1}) "
                          "and the same --main-address (the rank-0 machine) and --main-port")
    if processes % nodes:  # accelerate starts processes // nodes on each machine: the rest would silently not run
        raise PetctlError(f"--processes {processes} must be a multiple of --nodes {nodes} (the same number of processes on every machine)")
    if not 0 <= machine_rank < nodes:
        raise PetctlError(f"--machine-rank must be 0 … {nodes - 1} for --nodes {nodes} (got {machine_rank})")
    launch = FoldLaunch(processes=processes, nodes=nodes, machine_rank=machine_rank, main_address=main_address, port=main_port,
                        mixed_precision=mixed_precision, max_steps=max_steps)
    worst = train_folds(cfg, store, task, folds, run=run, home=home_path, merged=merged, launch=launch,
                        say=console.print, warn=error_line, run_config={"store": str(store.resolve()), "preset": preset})
    family = f"{task}{'-merged' if merged else ''}"
    summary_table(home_path / "runs" / run / family, fold_names(task, folds, cfg), task)
    if worst:
        raise typer.Exit(worst)


def summary_table(family_dir: Path, names: list[str], task: str) -> None:
    """The per-fold table (the paper's Table 1 for segmentation) from each fold's metrics.json."""
    from rich.table import Table

    from petctl.console import console

    if task == "seg":
        table = Table(title="Segmentation folds (the paper's Table 1)")
        cols = (("best cycle", "cycle", "{}"), ("top-K AUROC", "top_k_auroc", "{:.4f}"), ("best threshold", "best_threshold", "{:.2f}"),
                ("Dice @ threshold", "dice_at_best", "{:.4f}"))
    else:
        table = Table(title="MIP classifier folds")
        cols = (("best cycle", "cycle", "{}"), ("AUROC", "auroc", "{:.4f}"))
    table.add_column("fold", justify="right")
    for header, _, _ in cols:
        table.add_column(header, justify="right")
    for name in names:
        path = family_dir / name / "metrics.json"
        best = json.loads(path.read_text()).get("best") if path.exists() else None
        table.add_row(name, *[(fmt.format(best[key]) if best and best.get(key) is not None else "-") for _, key, fmt in cols])
    console.print(table)

"""Train segmentation or MIP-classifier folds: one `accelerate launch` process tree per fold.

Each fold (× projection for --task cls) is a registry step (`train-seg-fold<K>`,
`train-cls-fold<K>-<axis>`) with per-cycle metrics; checkpoints, metrics.json and progress.png land
in HOME/runs/RUN/seg/fold<K>/ or HOME/runs/RUN/cls/fold<K>-<axis>/. Re-running the same command resumes each fold
from its last checkpoint. Exit status 75 when a fold was stopped by SIGTERM/SIGUSR1 (checkpoint
saved; re-run to resume).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from petctl.errors import PetctlError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    nodes: Annotated[int, typer.Option("--nodes", help="Machines per fold (multi-node; see `petctl slurm`).")] = 1,
    mixed_precision: Annotated[str, typer.Option("--mixed-precision", help="no or bf16.")] = "no",
    run: Annotated[str, typer.Option("--run", help="Registry run name.")] = "default",
    merged: Annotated[bool, typer.Option("--merged", help="Use the merged folds (test set folded in).")] = False,
    pretrained: Annotated[Optional[Path], typer.Option("--pretrained", help="Local Swin-UNETR checkpoint (BTCV layout).")] = None,
    cycles: Annotated[Optional[int], typer.Option("--cycles", help="Override the preset's number of cycles.")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Override the preset's epochs per cycle.")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Stop after this many steps (smoke runs).")] = None,
    home: Annotated[Optional[Path], typer.Option("--home", help="petctl home (default $PETCTL_HOME or ./cache).")] = None,
) -> None:
    from petctl.console import console, error_line
    from petctl.engine.config import preset as get_preset
    from petctl.engine.launch import launch_command
    from petctl.engine.loop import EXIT_PREEMPTED
    from petctl.engine.registry import Registry, check_name
    from petctl.home import resolve_home

    if task not in ("seg", "cls"):
        raise PetctlError(f"--task must be seg or cls (got {task!r})")
    check_name(run, "run")
    splits_path = store / "splits.json"
    if not splits_path.exists():
        raise PetctlError(f"{store}: no splits.json; run `petctl prepare` first")
    splits = json.loads(splits_path.read_text())
    folds = _folds(fold, len(splits[f"{'merged_' if merged else ''}{task}_folds"]))
    cfg = get_preset(preset)
    overrides = {k: v for k, v in {"num_cycles": cycles, "epochs_per_cycle": epochs, "mixed_precision": mixed_precision,
                                    "pretrained": str(pretrained) if pretrained else None}.items() if v is not None}
    cfg = dataclasses.replace(cfg, **overrides)
    home_path = resolve_home(home)
    registry = Registry(home_path)
    registry.create_run(run, kind="train", config={"store": str(store.resolve()), "preset": preset})
    run_dir = home_path / "runs" / run
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") or not _has_cuda()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if cpu and processes > 1:
        env["ACCELERATE_USE_CPU"] = "true"
    family = f"{task}{'-merged' if merged else ''}"
    jobs = [(k, None) for k in folds] if task == "seg" else [(k, axis) for k in folds for axis in cfg.cls_projections]
    worst = 0
    for k, axis in jobs:
        name = f"fold{k}" + (f"-{axis}" if axis else "")
        out = run_dir / family / name
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(cfg.to_json(), indent=2))
        args = ["--config", str(out / "train_config.json"), "--store", str(store.resolve()), "--fold", str(k), "--task", task,
                "--out", str(out), "--run", run, "--home", str(home_path.resolve())]
        if axis:
            args += ["--projection", axis]
        if merged:
            args.append("--merged")
        if max_steps is not None:
            args += ["--max-steps", str(max_steps)]
        cmd = launch_command(processes=processes, nodes=nodes, port=_free_port(), mixed_precision=mixed_precision, cpu=cpu, module_args=args)
        console.print(f"[bold]{task} {name}[/]: {processes} process(es) × {nodes} node(s), preset {cfg.preset}")
        code = _run_forwarding_signals(cmd, env)
        step_name = f"train-{task}{'-merged' if merged else ''}-fold{k}" + (f"-{axis}" if axis else "")
        record = registry.step(run, step_name)
        if record is not None and record.status == "pending" and "stopped by signal" in (record.message or ""):
            code = EXIT_PREEMPTED  # the launcher may have died of the signal; the fold checkpointed
        worst = max(worst, code)
        if code == EXIT_PREEMPTED:
            error_line(f"{task} {name}: stopped by signal after saving its checkpoint; re-run the same command to resume")
            break
        if code != 0:
            error_line(f"{task} {name}: training exited with status {code}")
    summary_table(run_dir / family, [f"fold{k}" + (f"-{a}" if a else "") for k, a in jobs], task)
    if worst:
        raise typer.Exit(worst)


def _run_forwarding_signals(cmd: list[str], env: dict[str, str]) -> int:
    """Run the launcher; SIGTERM/SIGUSR1 sent to `petctl train` reach the training processes."""
    import signal

    # Own process group: accelerate's launcher does not pass signals on, so they go to the group
    # (the training processes checkpoint and exit; the launcher itself may die of the signal).
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def forward(signum: int, frame: object) -> None:
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        code = proc.wait()
        # the launcher can die of a signal while its training processes still write their checkpoint
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.2)
        return code if code >= 0 else 128 - code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _has_cuda() -> bool:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
        return out.returncode == 0 and "GPU" in out.stdout
    except (OSError, subprocess.TimeoutExpired):
        return False


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

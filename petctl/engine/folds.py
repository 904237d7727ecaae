"""Run a set of training folds, one `accelerate launch` process tree each (used by train,
retrain-merged and demo).

The launcher runs in its own process group: SIGTERM/SIGUSR1 sent to petctl are passed to the
whole group (accelerate's launcher does not pass them on), the training processes save `last`
and exit, and the outcome is read back from the registry step, since the launcher itself may die
of the signal.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from petctl.engine.config import TrainConfig


@dataclass(frozen=True)
class FoldLaunch:
    """How each fold's process tree is started."""

    processes: int = 1
    nodes: int = 1
    machine_rank: int | str = 0
    main_address: str | None = None
    port: int | None = None
    mixed_precision: str = "no"
    max_steps: int | None = None


def fold_names(task: str, folds: list[int], cfg: TrainConfig) -> list[str]:
    return [f"fold{k}" for k in folds] if task == "seg" else [f"fold{k}-{a}" for k in folds for a in cfg.cls_projections]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_cuda() -> bool:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
        return out.returncode == 0 and "GPU" in out.stdout
    except (OSError, subprocess.TimeoutExpired):
        return False


def train_folds(cfg: TrainConfig, store: Path, task: str, folds: list[int], *, run: str, home: Path, merged: bool = False,
                launch: FoldLaunch = FoldLaunch(), say: Callable[[str], Any] = print, warn: Callable[[str], Any] = print,
                run_config: dict[str, Any] | None = None, parent: str | None = None) -> int:
    """Train the folds one after another; returns the worst exit status (75 = stopped by a signal)."""
    from petctl.engine.launch import entry_args, launch_command
    from petctl.engine.loop import EXIT_PREEMPTED
    from petctl.engine.registry import Registry, check_name

    check_name(run, "run")
    registry = Registry(home)
    registry.create_run(run, kind="train", config=run_config or {"store": str(Path(store).resolve())}, parent=parent)
    run_dir = Path(home) / "runs" / run
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") or not has_cuda()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if cpu and (launch.processes > 1 or launch.nodes > 1):
        env["ACCELERATE_USE_CPU"] = "true"
    family = f"{task}{'-merged' if merged else ''}"
    jobs = [(k, None) for k in folds] if task == "seg" else [(k, axis) for k in folds for axis in cfg.cls_projections]
    worst = 0
    for (k, axis), name in zip(jobs, fold_names(task, folds, cfg)):
        out = run_dir / family / name
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(cfg.to_json(), indent=2))
        args = entry_args(config=str(out / "train_config.json"), store=str(Path(store).resolve()), fold=str(k), task=task,
                          out=str(out), run=run, home=str(Path(home).resolve()), projection=axis, merged=merged,
                          max_steps=launch.max_steps)
        cmd = launch_command(processes=launch.processes, nodes=launch.nodes, machine_rank=launch.machine_rank,
                             main_address=launch.main_address, port=launch.port or free_port(),
                             mixed_precision=launch.mixed_precision, cpu=cpu, module_args=args, quiet=True)
        say(f"[bold]{task} {name}[/]: {launch.processes} process(es) × {launch.nodes} node(s), preset {cfg.preset}")
        code = run_forwarding_signals(cmd, env)
        record = registry.step(run, f"train-{family}-{name}")
        if record is not None and record.status == "pending" and "stopped by signal" in (record.message or ""):
            code = EXIT_PREEMPTED  # the launcher may have died of the signal; the fold checkpointed
        worst = max(worst, code)
        if code == EXIT_PREEMPTED:
            warn(f"{task} {name}: stopped by signal after saving its checkpoint; re-run the same command to resume")
            break
        if code != 0:
            warn(f"{task} {name}: training exited with status {code}")
    return worst


def run_forwarding_signals(cmd: list[str], env: dict[str, str]) -> int:
    """Run the launcher in its own process group; SIGTERM/SIGUSR1 to us go to the whole group."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def forward(signum: int, frame: object) -> None:
        # Always SIGTERM: torchrun's agent (multi-process launches) dies of an unhandled USR1 and
        # orphans its ranks, while it passes SIGTERM on to them; the ranks treat both alike.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
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

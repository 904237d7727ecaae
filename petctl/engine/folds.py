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
from typing import Any, Callable, Sequence

from petctl.engine.config import TrainConfig
from petctl.errors import PetctlError


ELASTIC_SHUTDOWN_S = 110
"""Seconds torchrun gives its ranks after a TERM before it kills them: SLURM's USR1 comes 120 s
before the time limit (the sbatch scripts' `--signal=B:USR1@120`), and a rank may be in the middle of
a whole-body validation case when it arrives."""


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
    concurrent: int = 1
    """Fold process trees run at the same time (CPU: one core each; GPUs: the visible GPUs are
    dealt out among them). Only for single-node launches."""
    threads: int | None = None
    """CPU threads per process (None: one on CPU, see `launch_command`); a lone classifier job may
    take every core."""


def fold_names(task: str, folds: list[int], cfg: TrainConfig) -> list[str]:
    return [f"fold{k}" for k in folds] if task == "seg" else [f"fold{k}-{a}" for k in folds for a in cfg.cls_projections]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port(launch: FoldLaunch, index: int) -> int:
    """The main process port of the `index`-th job: a free one, or the given one — shifted by the
    job's index when several jobs run at once, so two folds never bind the same port."""
    if launch.port is None:
        return free_port()
    return launch.port + index if launch.concurrent > 1 else launch.port


def has_cuda() -> bool:
    return gpu_count() > 0


DEADLINE_ENV = "PETCTL_TRAIN_DEADLINE"
"""The environment variable a fold reads its training deadline from (`train_folds(deadline=...)`)."""


def train_folds(cfg: TrainConfig, store: Path, task: str | Sequence[str], folds: list[int], *, run: str, home: Path,
                merged: bool = False, launch: FoldLaunch = FoldLaunch(), say: Callable[[str], Any] = print,
                warn: Callable[[str], Any] = print, run_config: dict[str, Any] | None = None, parent: str | None = None,
                deadline: float | None = None) -> int:
    """Train the folds of one task (or of several: `("seg", "cls")`), `launch.concurrent` at a time.

    `deadline` (wall-clock `time.time()`) reaches each segmentation fold's loop (`LoopConfig.deadline`)
    through the environment's PETCTL_TRAIN_DEADLINE, which a caller may also set itself: the demo's
    time budget.

    Returns the worst exit status (75 = stopped by a signal). Jobs are started in order (the
    segmentation folds, the longest, first); after a signal no further job is started.
    """
    from petctl.engine.launch import entry_args, launch_command
    from petctl.engine.loop import EXIT_PREEMPTED
    from petctl.engine.registry import Registry, check_name

    check_name(run, "run")
    if launch.concurrent < 1:
        raise PetctlError("concurrent folds must be at least 1")
    if launch.concurrent > 1 and launch.nodes > 1:
        raise PetctlError("concurrent folds are for single-node launches (use one SLURM array task per fold instead)")
    registry = Registry(home)
    registry.create_run(run, kind="train", config=run_config or {"store": str(Path(store).resolve())}, parent=parent)
    run_dir = Path(home) / "runs" / run
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") or not has_cuda()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # torchrun's agent, TERMed with the launcher's group, SIGKILLs the ranks after this many seconds
    # (its default 30): a rank saving `last` after a long validation needs longer
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(ELASTIC_SHUTDOWN_S))
    if deadline is not None:
        env[DEADLINE_ENV] = repr(float(deadline))
    if cpu and (launch.processes > 1 or launch.nodes > 1):
        env["ACCELERATE_USE_CPU"] = "true"
    slot_env = _slot_environments(launch.concurrent, cpu, env)
    jobs: list[_Job] = []
    for t in ([task] if isinstance(task, str) else list(task)):
        family = f"{t}{'-merged' if merged else ''}"
        pairs = [(k, None) for k in folds] if t == "seg" else [(k, axis) for k in folds for axis in cfg.cls_projections]
        for (k, axis), name in zip(pairs, fold_names(t, folds, cfg)):
            out = run_dir / family / name
            out.mkdir(parents=True, exist_ok=True)
            (out / "train_config.json").write_text(json.dumps(cfg.to_json(), indent=2))
            args = entry_args(config=str(out / "train_config.json"), store=str(Path(store).resolve()), fold=str(k), task=t,
                              out=str(out), run=run, home=str(Path(home).resolve()), projection=axis, merged=merged,
                              max_steps=launch.max_steps)
            cmd = launch_command(processes=launch.processes, nodes=launch.nodes, machine_rank=launch.machine_rank,
                                 main_address=launch.main_address, port=_port(launch, len(jobs)),
                                 mixed_precision=launch.mixed_precision, cpu=cpu, module_args=args, quiet=True,
                                 threads=launch.threads)
            jobs.append(_Job(label=f"{t} {name}", step=f"train-{family}-{name}", cmd=cmd))

    attempt_before: dict[str, tuple[int, str | None] | None] = {}

    def attempt(step: str) -> tuple[int, str | None] | None:
        record = registry.step(run, step)
        return None if record is None else (record.attempts, record.started)

    def finished(job: _Job, code: int) -> int:
        record = registry.step(run, job.step)
        # only this launch's own attempt counts: a fold stopped by an earlier launch's signal that now
        # fails before it starts keeps that older message, and must not read as preempted again
        this_attempt = record is not None and attempt(job.step) != attempt_before.get(job.step)
        if this_attempt and record.status == "pending" and "stopped by signal" in (record.message or ""):
            code = EXIT_PREEMPTED  # the launcher may have died of the signal; the fold checkpointed
        if code == EXIT_PREEMPTED:
            warn(f"{job.label}: stopped by signal after saving its checkpoint; re-run the same command to resume")
        elif code != 0:
            warn(f"{job.label}: training exited with status {code}")
        return code

    def started(job: _Job, slot: int) -> None:
        attempt_before[job.step] = attempt(job.step)
        where = f" (slot {slot + 1}/{launch.concurrent})" if launch.concurrent > 1 else ""
        say(f"[bold]{job.label}[/]: {launch.processes} process(es) × {launch.nodes} node(s), preset {cfg.preset}{where}")

    return run_pool(jobs, slot_env, started=started, finished=finished, stop_code=EXIT_PREEMPTED)


@dataclass(frozen=True)
class _Job:
    label: str
    step: str
    cmd: list[str]


def _slot_environments(concurrent: int, cpu: bool, env: dict[str, str]) -> list[dict[str, str]]:
    """One environment per concurrent slot: on GPUs each slot sees its own share of the GPUs."""
    if cpu or concurrent == 1:
        return [dict(env) for _ in range(concurrent)]
    visible = env.get("CUDA_VISIBLE_DEVICES")
    gpus = [g for g in visible.split(",") if g.strip()] if visible else [str(i) for i in range(gpu_count())]
    if len(gpus) < concurrent:
        raise PetctlError(f"{concurrent} concurrent folds need at least as many GPUs (found {len(gpus)})")
    share = len(gpus) // concurrent
    return [{**env, "CUDA_VISIBLE_DEVICES": ",".join(gpus[i * share : (i + 1) * share])} for i in range(concurrent)]


def gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
        return sum(line.startswith("GPU") for line in out.stdout.splitlines()) if out.returncode == 0 else 0
    except (OSError, subprocess.TimeoutExpired):
        return 0


def run_pool(jobs: list[_Job], slot_env: list[dict[str, str]], *, started: Callable[[_Job, int], Any],
             finished: Callable[[_Job, int], int], stop_code: int) -> int:
    """Run jobs, len(slot_env) at a time, each launcher in its own process group.

    SIGTERM/SIGUSR1 to us — and Ctrl-C (SIGINT), which the launchers' own sessions would not see —
    go to every running group as SIGTERM (each fold checkpoints and stops), and no further job
    starts. A job whose status is `stop_code` also stops new starts. Should the pool itself fail,
    the running groups are stopped the same way before the error goes on, never left orphaned.
    Returns the worst status.
    """
    pending = list(jobs)
    running: dict[int, tuple[subprocess.Popen, _Job]] = {}
    stopping = False
    worst = 0

    def forward(signum: int, frame: object) -> None:
        # Always SIGTERM: torchrun's agent (multi-process launches) dies of an unhandled USR1 and
        # orphans its ranks, while it passes SIGTERM on to them; the ranks treat both alike.
        nonlocal stopping
        stopping = True
        for proc, _ in list(running.values()):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        while running or (pending and not stopping):
            for slot in range(len(slot_env)):
                if slot not in running and pending and not stopping:
                    job = pending.pop(0)
                    started(job, slot)
                    running[slot] = (subprocess.Popen(job.cmd, env=slot_env[slot], start_new_session=True), job)
            done = [slot for slot, (proc, _) in running.items() if proc.poll() is not None]
            if not done:
                time.sleep(0.2)
                continue
            for slot in done:
                proc, job = running.pop(slot)
                code = _wait_group(proc)
                code = finished(job, code)
                worst = max(worst, code)
                if code == stop_code:
                    stopping = True
        return worst
    except BaseException:
        forward(signal.SIGTERM, None)
        for proc, _ in list(running.values()):
            _wait_group(proc)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_group(proc: subprocess.Popen) -> int:
    """The launcher's status, once its whole process group is gone (the launcher can die of a
    signal while its training processes still write their checkpoint)."""
    code = proc.wait()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            break
        time.sleep(0.2)
    return code if code >= 0 else 128 - code

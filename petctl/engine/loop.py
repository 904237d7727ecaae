"""The cyclic training loop shared by segmentation and classifier folds.

A `Task` supplies the model, the batches, the loss and the per-cycle validation; this module owns
everything else once: NAdam with the cyclical cosine schedule (C cycles × E epochs, restarting each
cycle), accelerate (DDP, bf16, gradient accumulation), `best`/`last` checkpoints with exact
position, resume, SIGTERM/SIGUSR1 handling (every rank stops at the same step, `last` is saved,
exit status `EXIT_PREEMPTED`), the registry step, `metrics.json` and `progress.png`.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch

from petctl.engine.figures import save_figure
from petctl.errors import PetctlError

EXIT_PREEMPTED = 75
"""Stopped by SIGTERM/SIGUSR1 after saving a checkpoint; re-run (or requeue) to resume."""
CHECKPOINT_VERSION = 1


class Task(Protocol):
    """What the loop needs from a segmentation or classifier fold. Optional hooks, used when a task
    has them: `end_epoch(accelerator) -> dict` (after each epoch, on every rank; its numbers join the
    epoch's record), `sampler_state()` / `load_sampler_state(state)` (kept in checkpoints)."""

    model: torch.nn.Module
    steps_per_epoch: int

    def batches(self, epoch: int) -> Iterator[Any]: ...

    def loss(self, model: torch.nn.Module, batch: Any, generator: torch.Generator, device: torch.device) -> torch.Tensor: ...

    def validate(self, model: torch.nn.Module, accelerator: Any, should_stop: Callable[[], bool] | None = None) -> dict[str, Any] | None:
        """Returns at least {"selection": float (higher is better; nan allowed)} plus summary numbers.
        `model` is the bare module (not DDP's wrapper, whose first forward after training would
        broadcast buffers: a collective that a rank without validation cases never joins).
        `should_stop`, when given, is a collective every rank calls the same number of times (once per
        round of cases); validation returns None as soon as it says True (a preemption signal)."""
        ...


@dataclass(frozen=True)
class LoopConfig:
    num_cycles: int
    epochs_per_cycle: int
    lr: float
    lr_min_ratio: float = 0.0
    weight_decay: float = 0.0
    grad_accum: int = 1
    seed: int = 0
    max_steps: int | None = None
    batch_size: int = 1
    selection_name: str = "top_k_auroc"
    deadline: float | None = None
    """Wall-clock time (`time.time()`) by which the last cycle's training steps should be done (the
    demo's time budget). Every `DEADLINE_CHECK` steps, after the first `DEADLINE_WARMUP` of a run
    (slower: imports, first reads), the loop projects its end at the pace it has run since then;
    when that lies past the deadline it cuts the last cycle short (`CyclicCosineFactor.retime`: the
    cosine runs on to its minimum over the steps left), every rank to the same step, never below
    `deadline_min_share` of the planned steps, and gives steps back, up to the plan, when the pace
    picks up. None: the planned steps."""
    deadline_min_share: float = 0.8


@dataclass
class Position:
    cycle: int = 0
    epoch: int = 0  # epoch within the cycle
    step_in_epoch: int = 0
    global_step: int = 0


@dataclass
class StepRef:
    """Where the loop reports: a registry step (main rank only), or nothing."""

    registry: Any = None
    run: str | None = None
    step: str | None = None
    extra_config: dict[str, Any] = field(default_factory=dict)


def augment_seed(seed: int, rank: int, epoch: int, step: int) -> int:
    """The seed of one training step's augmentation draws on one rank: a function of where the step
    is, not of the draws before it, so a run resumed mid-epoch (from any rank's checkpoint) draws what
    the uninterrupted run would have, with nothing to store; SeedSequence mixes the four numbers."""
    return int(np.random.SeedSequence([seed, rank, epoch, step]).generate_state(1, np.uint64)[0])


# -- checkpoints -----------------------------------------------------------------------------
def save_checkpoint(folder: Path, *, model_state: dict, optimizer_state: dict | None, scheduler_state: dict | None,
                    position: Position, config: dict[str, Any], metric: float | None, extra: dict | None = None,
                    scaler_state: dict | None = None) -> None:
    """Write weights + training state + JSON sidecar into `folder` atomically (temp dir, rename).

    With `optimizer_state=None` and `scheduler_state=None` no training_state.pt is written: the best
    checkpoint is for inference only (resume reads `last`), and the optimizer's moments would triple
    its size on disk. `scaler_state`: fp16's loss scaler (its scale and growth tracker), which a
    resume would otherwise restart at 65536 and lose steps to overflow finding its level again."""
    from petctl.engine.registry import code_version

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _save_tensors(model_state, tmp / "model.pt")
        if optimizer_state is not None or scheduler_state is not None:
            _save_tensors({"optimizer": optimizer_state, "scheduler": scheduler_state, "rng_torch": torch.get_rng_state(),
                           "scaler": scaler_state}, tmp / "training_state.pt")
        meta = {
            "version": CHECKPOINT_VERSION,
            "config": config,
            "position": position.__dict__,
            "metric": metric,
            "code_version": code_version(),
            "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(extra or {}),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        for p in tmp.iterdir():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
        # copies a killed save left behind (other pids): the new checkpoint is complete, so they go
        for stale in [*folder.parent.glob(f".{folder.name}.tmp-*"), *folder.parent.glob(f".{folder.name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise PetctlError(f"{folder}: no space left on device while saving the checkpoint; free space and re-run "
                              "(the previous checkpoint is kept)") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_tensors(obj: Any, path: Path) -> None:
    """torch.save through memory, then a plain write: a full disk raises OSError(ENOSPC) rather than
    torch's opaque "unexpected pos" error."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    with open(path, "wb") as fh:
        fh.write(buf.getbuffer())


def find_checkpoint(folder: Path) -> Path | None:
    """The checkpoint folder to resume from; falls back to a `.old` copy left by a killed save."""
    folder = Path(folder)
    if (folder / "meta.json").exists():
        return folder
    for old in sorted(folder.parent.glob(f".{folder.name}.old-*")):
        if (old / "meta.json").exists():
            return old
    return None


def load_checkpoint(folder: Path) -> tuple[dict, dict, dict]:
    """(model_state, training_state, meta) with weights_only loading (no code runs)."""
    try:
        model_state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
        state_path = folder / "training_state.pt"
        state = torch.load(state_path, map_location="cpu", weights_only=True) if state_path.exists() else {}
        meta = json.loads((folder / "meta.json").read_text())
    except Exception as exc:
        raise PetctlError(f"{folder}: checkpoint cannot be loaded safely ({str(exc).splitlines()[0][:160]})") from None
    return model_state, state, meta


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer (to compare ranks)."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# -- the loop --------------------------------------------------------------------------------
def run_cycles(task: Task, cfg: LoopConfig, out_dir: Path, accelerator: Any, report: StepRef, stop: Any,
               config_json: dict[str, Any], label: str) -> int:
    """Train `task` for cfg.num_cycles cycles; returns 0, or EXIT_PREEMPTED after a signal."""
    from petctl.engine import distributed as dist
    from petctl.engine.schedule import make_scheduler

    is_main = accelerator.is_main_process
    model = task.model
    optimizer = torch.optim.NAdam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches_per_cycle = task.steps_per_epoch * cfg.epochs_per_cycle
    if batches_per_cycle % cfg.grad_accum:
        # accelerate steps the optimizer every grad_accum batches counted over the whole run: a cycle of
        # another length would end mid-accumulation and the next cycle's updates fall off its schedule
        raise PetctlError(f"{label}: grad_accum {cfg.grad_accum} does not divide a cycle's {batches_per_cycle} batches "
                          f"({task.steps_per_epoch} a rank's epoch × {cfg.epochs_per_cycle} epochs); choose a divisor")
    steps_per_cycle = max(1, batches_per_cycle // cfg.grad_accum)
    scheduler = make_scheduler(optimizer, steps_per_cycle, cfg.num_cycles, lr_min_ratio=cfg.lr_min_ratio)
    # what the saved position and scheduler mean: a resume under other numbers would run another schedule
    # (the optimizer's own numbers too: its state dict would bring back the old ones silently)
    schedule = {"steps_per_epoch": task.steps_per_epoch, "num_cycles": cfg.num_cycles, "epochs_per_cycle": cfg.epochs_per_cycle,
                "grad_accum": cfg.grad_accum, "num_processes": accelerator.num_processes, "lr": cfg.lr,
                "weight_decay": cfg.weight_decay, "lr_min_ratio": cfg.lr_min_ratio}
    position = Position()
    history: list[dict[str, Any]] = []
    epochs: list[dict[str, Any]] = []  # one record per finished epoch: the training curve between validations
    best_metric = -math.inf
    ckpt_dir = out_dir / "checkpoints"
    resume = find_checkpoint(ckpt_dir / "last")
    if resume is not None:
        model_state, state, meta = load_checkpoint(resume)
        _check_resumable(meta.get("schedule"), schedule, resume, label)  # before any state is loaded
        try:
            model.load_state_dict(model_state)
        except RuntimeError as exc:  # another architecture, size or channel count: not this fold's net
            first = str(exc).strip().splitlines()[-1].strip() if str(exc).strip() else type(exc).__name__
            raise PetctlError(f"{label}: cannot resume from {resume}: its network differs from this config's ({first[:160]}); "
                              f"re-run with its settings, or remove {resume.parent} to start the fold over") from None
        if state.get("optimizer"):
            optimizer.load_state_dict(state["optimizer"])
        if state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        if state.get("rng_torch") is not None:
            torch.set_rng_state(state["rng_torch"])
        if state.get("scaler") and getattr(accelerator, "scaler", None) is not None:
            accelerator.scaler.load_state_dict(state["scaler"])  # fp16: the loss scale reached, not 65536 again
        position = Position(**meta["position"])
        accelerator.step = position.global_step  # accelerate's accumulation counter: updates stay on the cycle's steps
        history = meta.get("history", [])
        epochs = meta.get("epochs", [])
        best_metric = meta.get("best_metric") if meta.get("best_metric") is not None else -math.inf
        if hasattr(task, "load_sampler_state"):
            task.load_sampler_state(meta.get("sampler_state"))
        accelerator.print(f"{label}: resuming at cycle {position.cycle + 1}, epoch {position.epoch + 1}, step {position.global_step}")
    # channels-last 1×1×1 kernels: their gradients come back contiguous, which DDP's buckets see as a
    # layout mismatch: it copies those few values each step and warns on every rank
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    model, optimizer = accelerator.prepare(model, optimizer)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.log_with:  # TensorBoard through accelerate's trackers, when installed
        accelerator.init_trackers(label.replace(" ", "_"), config={k: v for k, v in config_json.items() if isinstance(v, (int, float, str, bool))})

    def checkpoint(name: str, metric: float | None) -> None:
        accelerator.wait_for_everyone()
        # every rank's weights digest: DDP must keep them identical, and the sidecar proves it
        digests = dist.gather_objects(accelerator, [weights_digest(accelerator.unwrap_model(model))])
        if is_main:
            resumable = name == "last"  # `best` is read by inference only: weights + sidecar
            save_checkpoint(ckpt_dir / name, model_state=accelerator.unwrap_model(model).state_dict(),
                            optimizer_state=optimizer.state_dict() if resumable else None,
                            scheduler_state=scheduler.state_dict() if resumable else None,
                            position=position, config=config_json, metric=metric,
                            scaler_state=accelerator.scaler.state_dict() if resumable and getattr(accelerator, "scaler", None) is not None else None,
                            extra={"history": history, "epochs": epochs, "best_metric": best_metric if best_metric > -math.inf else None,
                                   "rank_weight_digests": digests, "num_processes": accelerator.num_processes, "schedule": schedule,
                                   "sampler_state": task.sampler_state() if hasattr(task, "sampler_state") else None})
        accelerator.wait_for_everyone()

    def preempted(where: str) -> int:
        checkpoint("last", None)
        if report.registry is not None:
            report.registry.update_step(report.run, report.step, status="pending",
                                        message=f"stopped by signal at step {position.global_step}{where}; re-run to resume")
        accelerator.print(f"{label}: stopped by signal at step {position.global_step}{where}; checkpoint saved")
        return EXIT_PREEMPTED

    factor = scheduler.lr_lambdas[0]  # a CyclicCosineFactor: where the (possibly cut) schedule ends

    def stop_at() -> float:  # the loop step a deadline's cut ends training at (grad_accum 1: loop steps = optimizer steps)
        return factor.total_steps if factor.cut is not None else math.inf

    def stop_here() -> int | None:
        """After a step: a signal on any rank saves `last` and stops; so does reaching --max-steps."""
        if dist.any_rank(accelerator, stop.signal is not None):
            return preempted("")
        if cfg.max_steps is not None and position.global_step >= cfg.max_steps:
            checkpoint("last", None)
            _record_done(report, history, cfg, position, max_steps=cfg.max_steps)  # else it stays "running"
            return 0
        return None

    planned_steps = cfg.num_cycles * cfg.epochs_per_cycle * task.steps_per_epoch
    if cfg.deadline is not None and cfg.grad_accum != 1:
        raise PetctlError("a training deadline needs one batch per optimizer step (grad_accum 1)")
    model.train()
    t_start = time.perf_counter()
    t_steps = 0.0  # seconds spent in training steps in this run (validation and checkpoints left out)
    t_paced = 0.0  # of them, after the run's first DEADLINE_WARMUP steps: the deadline's pace
    steps_this_run = 0
    if cfg.max_steps is not None and position.global_step >= cfg.max_steps and position.cycle < cfg.num_cycles:
        _record_done(report, history, cfg, position, max_steps=cfg.max_steps)  # a re-run with the same --max-steps: none more
        return 0
    while position.cycle < cfg.num_cycles:
        losses: list[float] = []
        t_cycle = time.perf_counter()
        while position.epoch < cfg.epochs_per_cycle and position.global_step < stop_at():
            epoch_index = position.cycle * cfg.epochs_per_cycle + position.epoch
            gen = torch.Generator(device="cpu")
            batches = task.batches(epoch_index)
            for _ in range(position.step_in_epoch):  # mid-epoch resume: same data order, skip what was done
                next(batches)
            epoch_start = len(losses)  # a resumed epoch's record covers the steps run since the resume
            while position.step_in_epoch < task.steps_per_epoch and position.global_step < stop_at():
                t_step = time.perf_counter()
                batch = next(batches)
                gen.manual_seed(augment_seed(cfg.seed, accelerator.process_index, epoch_index, position.step_in_epoch))
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        loss = task.loss(model, batch, gen, accelerator.device)
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if accelerator.sync_gradients:
                        scheduler.step()
                losses.append(float(loss.detach()))
                position.step_in_epoch += 1
                position.global_step += 1
                steps_this_run += 1
                t_steps += time.perf_counter() - t_step
                if steps_this_run > DEADLINE_WARMUP:
                    t_paced += time.perf_counter() - t_step
                if accelerator.log_with:
                    accelerator.log({"train/loss": losses[-1], "train/lr": scheduler.get_last_lr()[0]}, step=position.global_step)
                if position.global_step % 10 == 0:
                    rate = steps_this_run * cfg.batch_size * accelerator.num_processes / max(time.perf_counter() - t_start, 1e-9)
                    accelerator.print(f"{label} cycle {position.cycle + 1}/{cfg.num_cycles} epoch {position.epoch + 1}/{cfg.epochs_per_cycle} "
                                      f"step {position.global_step}/{factor.total_steps} loss {np.mean(losses[-10:]):.4f} "
                                      f"lr {scheduler.get_last_lr()[0]:.2e} {rate:.1f} samples/s")
                # at an epoch's last step the epoch's record comes first (a stop there would lose it)
                if position.step_in_epoch < task.steps_per_epoch and (code := stop_here()) is not None:
                    return code
                if (cfg.deadline is not None and position.cycle == cfg.num_cycles - 1
                        and steps_this_run >= DEADLINE_WARMUP + DEADLINE_CHECK and position.global_step % DEADLINE_CHECK == 0):
                    end = deadline_end(cfg, position.global_step, t_paced / (steps_this_run - DEADLINE_WARMUP), planned_steps)
                    end = min(dist.gather_objects(accelerator, [end]))  # every rank at the same step
                    if end != factor.total_steps and position.global_step < factor.total_steps:
                        if factor.cut is None:
                            accelerator.print(f"{label}: past the deadline at this pace; the last cycle ends at step {end} "
                                              f"of {factor.total_steps}")
                        factor.retime(position.global_step, end)
            epoch_losses = losses[epoch_start:]
            sampler_summary = task.end_epoch(accelerator) if hasattr(task, "end_epoch") else {}
            epochs.append({"epoch": epoch_index + 1, "cycle": position.cycle + 1, "global_step": position.global_step,
                           "train_loss": dist.mean_over_ranks(accelerator, float(np.mean(epoch_losses)) if epoch_losses else float("nan"), len(epoch_losses)),
                           "lr": float(scheduler.get_last_lr()[0]), "steps": len(epoch_losses), **sampler_summary})
            position.epoch += 1
            position.step_in_epoch = 0
            if (code := stop_here()) is not None:
                return code
        # the bare module (see Task.validate); a signal during validation (minutes for the paper's
        # preset) saves `last` with this cycle's training done, so a resume validates it at once
        val = task.validate(accelerator.unwrap_model(model), accelerator,
                            should_stop=lambda: dist.any_rank(accelerator, stop.signal is not None))
        if val is None:
            return preempted(f" (validating cycle {position.cycle + 1})")
        if losses:
            train_loss = dist.mean_over_ranks(accelerator, float(np.mean(losses)), len(losses))
        else:  # resumed after this cycle's training: its epochs' records hold the loss
            done = [e for e in epochs if e["cycle"] == position.cycle + 1 and e["steps"]]
            train_loss = (float(np.average([e["train_loss"] for e in done], weights=[e["steps"] for e in done]))
                          if done else float("nan"))
        selection = float(val.get("selection", float("nan")))
        record = {"cycle": position.cycle + 1, "epoch": (position.cycle + 1) * cfg.epochs_per_cycle,
                  "global_step": position.global_step, "train_loss": train_loss,
                  "lr_end": float(scheduler.get_last_lr()[0]), "seconds": round(time.perf_counter() - t_cycle, 2),
                  "step_seconds": round(t_steps / steps_this_run, 4) if steps_this_run else None, **val}
        if factor.cut is not None and position.cycle == cfg.num_cycles - 1:
            record["deadline_cut"] = {"planned_steps": planned_steps, "steps": factor.total_steps}
        history.append(record)
        improved = not math.isnan(selection) and selection > best_metric
        if improved:
            best_metric = selection
        position.cycle += 1
        position.epoch = 0
        if is_main:  # before `last`: a kill between the two must not leave a finished run without its last cycle's metrics
            write_metrics(out_dir, history, config_json, cfg.selection_name, epochs)
        if improved:
            checkpoint("best", best_metric)
        checkpoint("last", selection)
        if accelerator.log_with:
            accelerator.log({f"val/{k}": v for k, v in val.items() if isinstance(v, (int, float))}, step=position.global_step)
        if is_main:
            accelerator.print(f"{label} cycle {record['cycle']}: loss {train_loss:.4f} {cfg.selection_name} {selection:.4f}"
                              f"{' (best)' if improved else ''}")
            if report.registry is not None:
                report.registry.update_step(report.run, report.step, metrics={
                    "cycle": record["cycle"], "train_loss": train_loss, cfg.selection_name: selection,
                    f"best_{cfg.selection_name}": best_metric, **{k: v for k, v in val.items() if isinstance(v, (int, float)) and k != "selection"}})
    _record_done(report, history, cfg, position)
    return 0


DEADLINE_CHECK = 20
"""Steps between a deadline's checks (each gathers one number from every rank)."""
DEADLINE_WARMUP = 50
"""A run's first steps, left out of the deadline's pace: fresh demo seed 6262's folds projected
their end from their first 20 (imports, first reads) past a deadline they then met at 0.98× the
probe's time a step, and cut 1-7 % of their steps for nothing."""


def deadline_end(cfg: LoopConfig, step: int, step_s: float, planned_steps: int) -> int:
    """The step the last cycle should end at to meet `cfg.deadline` at `step_s` a step from `step` on:
    the planned end when that fits, else the steps that fit, never below `deadline_min_share` of
    `planned_steps`, never before `step + 1`."""
    assert cfg.deadline is not None
    left = cfg.deadline - time.time()
    if step_s <= 0 or (planned_steps - step) * step_s <= left:
        return planned_steps
    fit = step + int(max(0.0, left) / step_s)
    return min(planned_steps, max(fit, math.ceil(cfg.deadline_min_share * planned_steps), step + 1))


def _check_resumable(saved: dict[str, Any] | None, now: dict[str, Any], path: Path, label: str) -> None:
    """PetctlError when `last` was trained under another schedule (steps per epoch, cycles, epochs,
    accumulation, processes): its position and LR schedule would not mean the same steps."""
    if not saved:  # a checkpoint from before the schedule was recorded
        return
    changed = [f"{k} {saved[k]} → {now[k]}" for k in now if k in saved and saved[k] != now[k]]
    if changed:
        raise PetctlError(f"{label}: cannot resume from {path}: it was trained under another schedule ({', '.join(changed)}); "
                          f"re-run with its settings, or remove {path.parent} to start the fold over")


def _record_done(report: StepRef, history: list[dict[str, Any]], cfg: LoopConfig, position: Position, **more: Any) -> None:
    """Mark the registry step done with the best cycle's numbers (main rank only)."""
    if report.registry is None:
        return
    best = best_record(history)
    report.registry.finish_step(report.run, report.step, metrics={
        "best_cycle": best.get("cycle"), cfg.selection_name: best.get("selection"), "steps": position.global_step, **more,
        **{k: v for k, v in best.items() if isinstance(v, (int, float)) and k not in ("cycle", "epoch", "selection", "global_step", "seconds", "lr_end")}})


def best_record(history: list[dict[str, Any]]) -> dict[str, Any]:
    valid = [h for h in history if not math.isnan(h.get("selection", float("nan")))]
    return max(valid, key=lambda h: h["selection"]) if valid else (history[-1] if history else {})


def write_metrics(out_dir: Path, history: list[dict[str, Any]], config_json: dict[str, Any], selection_name: str,
                  epochs: list[dict[str, Any]] | None = None) -> None:
    """`metrics.json` (the cycles' validation records and the per-epoch training curve) and `progress.png`."""
    from petctl.engine.store import write_json_atomic

    best = best_record(history)
    write_json_atomic(out_dir / "metrics.json", {"version": 1, "selection": selection_name, "config": config_json,
                                                 "best": {k: v for k, v in best.items() if not isinstance(v, list)} or None,
                                                 "cycles": history, "epochs": epochs or []})
    try:
        plot_progress(out_dir / "progress.png", history, selection_name, epochs or [])
    except Exception as exc:  # a plotting problem must never stop training
        print(f"progress.png not drawn: {exc}")


def training_curve(history: list[dict[str, Any]], epochs: list[dict[str, Any]]) -> dict[str, Any]:
    """What a fold's plots draw, on one axis: `x`, `loss` and `lr` per epoch, `at` = each cycle's
    validation epoch (its last) and `unit` "epoch"; for metrics.json written before per-epoch curves
    (cycle records only) the same series per cycle, with `unit` "cycle"."""
    if epochs:
        return {"x": [e["epoch"] for e in epochs], "loss": [e["train_loss"] for e in epochs], "lr": [e["lr"] for e in epochs],
                "at": [h.get("epoch", h["cycle"]) for h in history], "unit": "epoch"}
    at = [h["cycle"] for h in history]
    return {"x": at, "loss": [h["train_loss"] for h in history], "lr": [h["lr_end"] for h in history], "at": at, "unit": "cycle"}


def plot_progress(path: Path, history: list[dict[str, Any]], selection_name: str, epochs: list[dict[str, Any]] = ()) -> None:
    """One fold's training: loss and learning rate per epoch (per cycle for runs logged before
    per-epoch curves), validation at each cycle's end, on the same axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = training_curve(history, list(epochs))
    unit, at = curve["unit"], curve["at"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    axes[0].plot(curve["x"], curve["loss"], ".-")
    axes[0].set(title=f"train loss ({unit} mean)", xlabel=unit)
    axes[1].plot(at, [h["selection"] for h in history], "o-", label=selection_name)
    if any("dice_at_best" in h for h in history):
        axes[1].plot(at, [h.get("dice_at_best", float("nan")) for h in history], "s-", label="Dice @ best threshold")
    axes[1].set(title="validation (each cycle's end)", xlabel=unit, ylim=(0, 1), xlim=(0.5, max([1, *curve["x"], *at]) + 0.5))
    axes[1].legend(loc="lower right")
    axes[2].plot(curve["x"], curve["lr"], ".-")
    axes[2].set(title=f"learning rate ({unit} end)", xlabel=unit, yscale="log")
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def fit_task(build_task, cfg: LoopConfig, out_dir: Path, *, mixed_precision: str, timeout_s: int,
             run: str | None, home: Path | None, step: str, kind: str, config_json: dict[str, Any], label: str) -> int:
    """Create the accelerator and registry step, build the task, run the cycles, tear down."""
    from petctl.engine import distributed as dist

    out_dir = Path(out_dir)
    accelerator = dist.make_accelerator(mixed_precision, cfg.grad_accum, timeout_s, str(out_dir / "logs"))
    report = StepRef()
    if accelerator.is_main_process and run:
        from petctl.engine.registry import Registry
        from petctl.home import resolve_home

        report = StepRef(Registry(resolve_home(home)), run, step)
        report.registry.start_step(run, step, kind=kind, config={**config_json, "processes": accelerator.num_processes})
    torch.manual_seed(cfg.seed + 1000 * accelerator.process_index)
    stop = dist.StopFlag().install()
    try:
        task = build_task(accelerator)
        status = run_cycles(task, cfg, out_dir, accelerator, report, stop, config_json, label)
        del task
    except BaseException as exc:
        if report.registry is not None:
            report.registry.fail_step(run, step, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
        raise
    finally:
        stop.restore()
    dist.teardown(accelerator)
    return status

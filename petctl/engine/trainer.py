"""Segmentation fold training: the loop run inside each `accelerate launch` process.

`fit(cfg, store, fold, out_dir, ...)` trains one fold: patches from the Zarr store (sharded by
rank), batched augmentation on the device, BCE (or Dice / Dice+CE) on one sigmoid output, NAdam with
a cyclical cosine schedule (C cycles × E epochs, restarting each cycle), and after each cycle a
sliding-window validation (gaussian blending) of the fold's validation cases, sharded across ranks
and gathered, scored by top-K AUROC and a Dice threshold sweep. `best` (by mean top-K AUROC) and
`last` checkpoints are kept. SIGTERM/SIGUSR1 make every rank stop at the next step, save `last`
with the exact position, and exit with `EXIT_PREEMPTED`; re-running resumes from there.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from petctl.engine.config import TrainConfig
from petctl.errors import PetctlError

EXIT_PREEMPTED = 75
"""Stopped by SIGTERM/SIGUSR1 after saving a checkpoint; re-run (or requeue) to resume."""
CHECKPOINT_VERSION = 1


@dataclass
class Position:
    cycle: int = 0
    epoch: int = 0  # epoch within the cycle
    step_in_epoch: int = 0
    global_step: int = 0


# -- checkpoints -----------------------------------------------------------------------------
def save_checkpoint(folder: Path, *, model_state: dict, optimizer_state: dict | None, scheduler_state: dict | None,
                    position: Position, cfg: TrainConfig, metric: float | None, extra: dict | None = None) -> None:
    """Write weights + training state + JSON sidecar into `folder` atomically (temp dir, rename)."""
    from petctl.engine.registry import code_version

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        torch.save(model_state, tmp / "model.pt")
        state = {
            "optimizer": optimizer_state,
            "scheduler": scheduler_state,
            "rng_torch": torch.get_rng_state(),
            "rng_numpy": _np_state(),
        }
        torch.save(state, tmp / "training_state.pt")
        meta = {
            "version": CHECKPOINT_VERSION,
            "config": cfg.to_json(),
            "position": position.__dict__,
            "metric": metric,
            "code_version": code_version(),
            "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(extra or {}),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        for p in tmp.iterdir():
            fd = os.open(p, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _np_state() -> dict[str, Any]:
    st = np.random.get_state()
    return {"keys": torch.from_numpy(st[1].astype(np.int64)), "pos": int(st[2])}


def find_checkpoint(folder: Path) -> Path | None:
    """The checkpoint folder to resume from; falls back to a `.old` copy left by a killed save."""
    folder = Path(folder)
    if (folder / "meta.json").exists():
        return folder
    olds = sorted(folder.parent.glob(f".{folder.name}.old-*"))
    for old in olds:
        if (old / "meta.json").exists():
            return old
    return None


def load_checkpoint(folder: Path) -> tuple[dict, dict, dict]:
    """(model_state, training_state, meta) with weights_only loading (no code runs)."""
    try:
        model_state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
        state_path = folder / "training_state.pt"
        state = torch.load(state_path, map_location="cpu", weights_only=True) if state_path.exists() else {}
    except Exception as exc:
        raise PetctlError(f"{folder}: checkpoint cannot be loaded safely ({str(exc).splitlines()[0][:160]})") from None
    meta = json.loads((folder / "meta.json").read_text())
    return model_state, state, meta


# -- validation ------------------------------------------------------------------------------
def predict_volume(model: torch.nn.Module, image_cxyz: torch.Tensor, cfg: TrainConfig, device: torch.device) -> np.ndarray:
    """Sliding-window (gaussian) sigmoid probabilities for one stored volume, float32 (X, Y, Z)."""
    from monai.inferers import sliding_window_inference

    x = image_cxyz[None].to(device)
    with torch.no_grad():
        logits = sliding_window_inference(
            x, roi_size=cfg.patch_size, sw_batch_size=cfg.sw_batch_size, predictor=model,
            overlap=cfg.sw_overlap, mode="gaussian", padding_mode="constant",
        )
    return torch.sigmoid(logits.float())[0, 0].cpu().numpy()


def validate(model, store_root: Path, cases: list[str], cfg: TrainConfig, accelerator) -> dict[str, Any]:
    """Per-case top-K AUROC and Dice sweep over this rank's share of cases, gathered on all ranks."""
    from petctl.engine.distributed import gather_objects
    from petctl.engine.metrics import THRESHOLDS, dice_sweep, top_k_auroc
    from petctl.engine.store import CaseStore

    store = CaseStore(store_root)
    mine = cases[accelerator.process_index :: accelerator.num_processes]
    rows = []
    model.eval()
    for case in mine:
        stored = store.load(case)
        image = torch.from_numpy(stored.image.read_all()).float()
        label = stored.label.read_all()
        probs = predict_volume(model, image, cfg, accelerator.device)
        rows.append({"case": case, "top_k_auroc": float(top_k_auroc(label, probs)), "dice": dice_sweep(label, probs, THRESHOLDS).tolist()})
    model.train()
    rows = gather_objects(accelerator, rows)
    rows.sort(key=lambda r: r["case"])
    aurocs = [r["top_k_auroc"] for r in rows if not math.isnan(r["top_k_auroc"])]
    dice = np.nanmean(np.array([r["dice"] for r in rows], dtype=float), axis=0) if rows else np.full(len(THRESHOLDS), np.nan)
    from petctl.engine.metrics import best_threshold

    thr, best = best_threshold(dice, THRESHOLDS) if np.isfinite(dice).any() else (float("nan"), float("nan"))
    return {
        "top_k_auroc": float(np.mean(aurocs)) if aurocs else float("nan"),
        "best_threshold": float(thr),
        "dice_at_best": float(best),
        "dice_curve": [None if not np.isfinite(v) else float(v) for v in dice],
        "cases": [{"case": r["case"], "top_k_auroc": r["top_k_auroc"]} for r in rows],
    }


# -- the loop --------------------------------------------------------------------------------
def _loss_fn(name: str):
    if name == "bce":
        return torch.nn.BCEWithLogitsLoss()
    from monai.losses import DiceCELoss, DiceLoss

    return DiceLoss(sigmoid=True) if name == "dice" else DiceCELoss(sigmoid=True)


def read_fold(store_root: Path, fold: int, merged: bool = False) -> tuple[list[str], list[str]]:
    from petctl.engine.splits import Splits

    path = Path(store_root) / "splits.json"
    if not path.exists():
        raise PetctlError(f"{path}: missing; run `petctl prepare` first")
    splits = Splits.from_json(json.loads(path.read_text()))
    folds = splits.merged_seg_folds if merged else splits.seg_folds
    if not 0 <= fold < len(folds):
        raise PetctlError(f"fold {fold} does not exist (the store has {len(folds)} segmentation folds)")
    return list(folds[fold].train), list(folds[fold].val)


def fit(cfg: TrainConfig, store_root: Path, fold: int, out_dir: Path, *, run: str | None = None,
        home: Path | None = None, merged: bool = False, max_steps: int | None = None) -> int:
    """Train one fold in this process (one of `accelerate launch`'s); returns the exit status."""
    from petctl.engine import distributed as dist
    from petctl.engine.models import build_seg_model, load_pretrained_swin_unetr
    from petctl.engine.sampling import AugmentConfig, SegPatchDataset, augment_batch, make_loader
    from petctl.engine.schedule import make_scheduler

    out_dir = Path(out_dir)
    accelerator = dist.make_accelerator(cfg.mixed_precision, cfg.grad_accum, cfg.collective_timeout_s, str(out_dir / "logs"))
    is_main = accelerator.is_main_process
    registry = step = None
    if is_main and run:
        from petctl.engine.registry import Registry
        from petctl.home import resolve_home

        registry = Registry(resolve_home(home))
        step = f"train-seg{'-merged' if merged else ''}-fold{fold}"
        registry.start_step(run, step, kind="train-seg", config={**cfg.to_json(), "fold": fold, "store": str(store_root), "processes": accelerator.num_processes})
    stop = dist.StopFlag().install()
    try:
        status = _fit(cfg, Path(store_root), fold, out_dir, accelerator, registry, run, step, merged, max_steps, stop,
                      build_seg_model, load_pretrained_swin_unetr, SegPatchDataset, make_loader, augment_batch, AugmentConfig, make_scheduler)
    except BaseException as exc:
        if registry is not None:
            registry.fail_step(run, step, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
        raise
    finally:
        stop.restore()
    dist.teardown(accelerator)
    return status


def _fit(cfg, store_root, fold, out_dir, accelerator, registry, run, step, merged, max_steps, stop,
         build_seg_model, load_pretrained, SegPatchDataset, make_loader, augment_batch, AugmentConfig, make_scheduler) -> int:
    from petctl.engine import distributed as dist

    is_main = accelerator.is_main_process
    train_cases, val_cases = read_fold(store_root, fold, merged)
    if cfg.max_val_cases:
        val_cases = val_cases[: cfg.max_val_cases]
    torch.manual_seed(cfg.seed + 1000 * accelerator.process_index)
    np.random.seed(cfg.seed + accelerator.process_index)

    model = build_seg_model(cfg.arch, feature_size=cfg.feature_size, features=cfg.features, patch_size=cfg.patch_size)
    if cfg.pretrained and cfg.arch == "swin_unetr":
        load_pretrained(model, cfg.pretrained)
    optimizer = torch.optim.NAdam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    dataset = SegPatchDataset(store_root, train_cases, cfg.patch_size, cfg.patches_per_scan, lesion_prob=cfg.lesion_prob,
                              seed=cfg.seed, rank=accelerator.process_index, world_size=accelerator.num_processes)
    steps_per_epoch = max(1, dataset.patches_per_epoch_per_rank() // cfg.batch_size)
    steps_per_cycle = steps_per_epoch * cfg.epochs_per_cycle // cfg.grad_accum
    scheduler = make_scheduler(optimizer, max(1, steps_per_cycle), cfg.num_cycles, lr_min_ratio=cfg.lr_min_ratio)
    position = Position()
    history: list[dict[str, Any]] = []
    best_metric = -math.inf
    ckpt_dir = out_dir / "checkpoints"
    resume = find_checkpoint(ckpt_dir / "last")
    if resume is not None:
        model_state, state, meta = load_checkpoint(resume)
        model.load_state_dict(model_state)
        if state.get("optimizer"):
            optimizer.load_state_dict(state["optimizer"])
        if state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        position = Position(**meta["position"])
        history = meta.get("history", [])
        best_metric = meta.get("best_metric", -math.inf) or -math.inf
        if is_main:
            accelerator.print(f"resuming fold {fold} from cycle {position.cycle + 1}, epoch {position.epoch + 1}, step {position.global_step}")
    model, optimizer = accelerator.prepare(model, optimizer)
    loss_fn = _loss_fn(cfg.loss)
    aug_cfg = AugmentConfig(enabled=cfg.augment)
    loader = make_loader(dataset, cfg.batch_size, cfg.num_workers, pin_memory=accelerator.device.type == "cuda")
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps({**cfg.to_json(), "fold": fold, "train": train_cases, "val": val_cases}, indent=2))

    def checkpoint(name: str, metric: float | None) -> None:
        accelerator.wait_for_everyone()
        if is_main:
            save_checkpoint(ckpt_dir / name, model_state=accelerator.unwrap_model(model).state_dict(),
                            optimizer_state=optimizer.state_dict(), scheduler_state=scheduler.state_dict(),
                            position=position, cfg=cfg, metric=metric,
                            extra={"history": history, "best_metric": best_metric if best_metric > -math.inf else None, "fold": fold})
        accelerator.wait_for_everyone()

    total_steps = cfg.num_cycles * cfg.epochs_per_cycle * steps_per_epoch
    model.train()
    t_start = time.perf_counter()
    while position.cycle < cfg.num_cycles:
        losses: list[float] = []
        t_cycle = time.perf_counter()
        while position.epoch < cfg.epochs_per_cycle:
            dataset.set_epoch(position.cycle * cfg.epochs_per_cycle + position.epoch)
            gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 7919 + accelerator.process_index * 104729 + position.global_step)
            batches = iter(loader)
            for _ in range(position.step_in_epoch):  # mid-epoch resume: same data order, skip what was done
                next(batches)
            while position.step_in_epoch < steps_per_epoch:
                batch = next(batches)
                image = batch["image"].to(accelerator.device, non_blocking=True)
                label = batch["label"].to(accelerator.device, non_blocking=True)
                image, label = augment_batch(image, label, gen, aug_cfg)
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        loss = loss_fn(model(image), label)
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if accelerator.sync_gradients:
                        scheduler.step()
                losses.append(float(loss.detach()))
                position.step_in_epoch += 1
                position.global_step += 1
                if is_main and position.global_step % 10 == 0:
                    rate = position.global_step * cfg.batch_size * accelerator.num_processes / max(time.perf_counter() - t_start, 1e-9)
                    accelerator.print(f"fold {fold} cycle {position.cycle + 1}/{cfg.num_cycles} epoch {position.epoch + 1}/{cfg.epochs_per_cycle} "
                                      f"step {position.global_step}/{total_steps} loss {np.mean(losses[-10:]):.4f} lr {scheduler.get_last_lr()[0]:.2e} {rate:.1f} patches/s")
                if dist.any_rank(accelerator, stop.signal is not None):
                    checkpoint("last", None)
                    if registry is not None:
                        registry.update_step(run, step, status="pending", message=f"stopped by signal at step {position.global_step}; re-run to resume")
                    accelerator.print(f"stopped by signal at step {position.global_step}; checkpoint saved")
                    return EXIT_PREEMPTED
                if max_steps is not None and position.global_step >= max_steps:
                    checkpoint("last", None)
                    return 0
            position.epoch += 1
            position.step_in_epoch = 0
        # end of cycle: validate, select, checkpoint
        val = validate(model, store_root, val_cases, cfg, accelerator) if val_cases else {"top_k_auroc": float("nan"), "best_threshold": float("nan"), "dice_at_best": float("nan"), "dice_curve": [], "cases": []}
        train_loss = dist.mean_over_ranks(accelerator, float(np.mean(losses)) if losses else float("nan"), len(losses))
        record = {"cycle": position.cycle + 1, "global_step": position.global_step, "train_loss": train_loss,
                  "lr_end": float(scheduler.get_last_lr()[0]), "seconds": round(time.perf_counter() - t_cycle, 2), **val}
        history.append(record)
        improved = not math.isnan(val["top_k_auroc"]) and val["top_k_auroc"] > best_metric
        if improved:
            best_metric = val["top_k_auroc"]
        position.cycle += 1
        position.epoch = 0
        if improved:
            checkpoint("best", best_metric)
        checkpoint("last", val["top_k_auroc"])
        if is_main:
            _write_metrics(out_dir, fold, history, cfg)
            accelerator.print(f"fold {fold} cycle {record['cycle']}: loss {train_loss:.4f} top-K AUROC {val['top_k_auroc']:.4f} "
                              f"Dice {val['dice_at_best']:.4f} @ {val['best_threshold']:.2f}{' (best)' if improved else ''}")
            if registry is not None:
                registry.update_step(run, step, metrics={"cycle": record["cycle"], "train_loss": train_loss, "top_k_auroc": val["top_k_auroc"],
                                                         "best_top_k_auroc": best_metric, "dice": val["dice_at_best"], "threshold": val["best_threshold"]})
    if registry is not None:
        best = max((h for h in history if not math.isnan(h["top_k_auroc"])), key=lambda h: h["top_k_auroc"], default=history[-1] if history else {})
        registry.finish_step(run, step, metrics={"best_cycle": best.get("cycle"), "top_k_auroc": best.get("top_k_auroc"),
                                                 "threshold": best.get("best_threshold"), "dice": best.get("dice_at_best"),
                                                 "steps": position.global_step})
    return 0


def _write_metrics(out_dir: Path, fold: int, history: list[dict[str, Any]], cfg: TrainConfig) -> None:
    from petctl.engine.store import write_json_atomic

    valid = [h for h in history if not math.isnan(h["top_k_auroc"])]
    best = max(valid, key=lambda h: h["top_k_auroc"]) if valid else None
    write_json_atomic(out_dir / "metrics.json", {"version": 1, "fold": fold, "preset": cfg.preset,
                                                 "best": {k: best[k] for k in ("cycle", "top_k_auroc", "best_threshold", "dice_at_best")} if best else None,
                                                 "cycles": history})
    try:
        plot_progress(out_dir / "progress.png", history)
    except Exception:  # a plotting problem must never stop training
        pass


def plot_progress(path: Path, history: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cycles = [h["cycle"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    axes[0].plot(cycles, [h["train_loss"] for h in history], "o-")
    axes[0].set(title="train loss", xlabel="cycle")
    axes[1].plot(cycles, [h["top_k_auroc"] for h in history], "o-", label="top-K AUROC")
    axes[1].plot(cycles, [h["dice_at_best"] for h in history], "s-", label="Dice @ best thr")
    axes[1].set(title="validation", xlabel="cycle", ylim=(0, 1))
    axes[1].legend(loc="lower right")
    axes[2].plot(cycles, [h["lr_end"] for h in history], "o-")
    axes[2].set(title="learning rate (cycle end)", xlabel="cycle", yscale="log")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)

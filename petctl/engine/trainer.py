"""Segmentation folds: the `Task` that `loop.run_cycles` trains, and `fit` (its typed entry point).

Patches come from the Zarr store (sharded by rank), are augmented in batches on the device, and
train one sigmoid output with BCE (or Dice / Dice+CE). After each cycle the fold's validation cases
are predicted by sliding window (gaussian blending), sharded across ranks and gathered, and scored
by top-K AUROC (selection) and a Dice threshold sweep (the per-fold best threshold).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from petctl.engine.config import POSITION_CHANNELS, TrainConfig
from petctl.engine.loop import LoopConfig, fit_task
from petctl.errors import PetctlError


def read_fold(store_root: Path, fold: int, *, task: str = "seg", merged: bool = False) -> tuple[list[str], list[str]]:
    """(train, val) case ids of a fold from STORE/splits.json."""
    from petctl.engine.splits import Splits

    path = Path(store_root) / "splits.json"
    if not path.exists():
        raise PetctlError(f"{path}: missing; run `petctl prepare` first")
    splits = Splits.from_json(json.loads(path.read_text()))
    name = f"{'merged_' if merged else ''}{task}_folds"
    folds = getattr(splits, name)
    if not 0 <= fold < len(folds):
        raise PetctlError(f"fold {fold} does not exist (the store has {len(folds)} {task} folds)")
    return list(folds[fold].train), list(folds[fold].val)


def predict_volume(model: torch.nn.Module, image_cxyz: torch.Tensor, cfg: TrainConfig, device: torch.device) -> np.ndarray:
    """Sliding-window (gaussian) sigmoid probabilities for one stored volume, float32 (X, Y, Z)."""
    from monai.inferers import sliding_window_inference

    from petctl.engine.position import pad_to_patch, position_grid, unpad

    shape = tuple(int(n) for n in image_cxyz.shape[1:])
    x, before = pad_to_patch(image_cxyz[None].to(device), cfg.patch_size)  # positions run on past ±1, as in training
    if cfg.position_channels:
        x = torch.cat([x, position_grid(shape, tuple(-b for b in before), tuple(x.shape[2:]))[None].to(x)], 1)
    with torch.no_grad():
        logits = sliding_window_inference(
            x, roi_size=cfg.patch_size, sw_batch_size=cfg.sw_batch_size, predictor=model,
            overlap=cfg.sw_overlap, mode="gaussian", padding_mode="constant",
        )
    logits = unpad(logits, before, shape)
    return torch.sigmoid(logits.float())[0, 0].cpu().numpy()


def seg_augment(cfg: TrainConfig, fingerprint: dict[str, Any] | None = None) -> Any:
    """A segmentation fold's `AugmentConfig`: lesion dimming (`cfg.lesion_dim`) acts on the PET
    channels, the clipped PET (channel 1) and the wide PET (2) when the store has it, and keeps a
    dimmed lesion's contrast floor in SUV by the store's PET normalization (`fingerprint`)."""
    from petctl.engine.sampling import AugmentConfig

    image_channels = cfg.in_channels - (POSITION_CHANNELS if cfg.position_channels else 0)
    pet = (fingerprint or {}).get("pet") or {}
    suv = (float(pet["mean"]), float(pet["std"])) if "mean" in pet and "std" in pet else None
    return AugmentConfig(enabled=cfg.augment, p_lesion_dim=cfg.lesion_dim, lesion_dim_channels=(1, 2) if image_channels >= 3 else (1,),
                         lesion_dim_suv=suv)


class SegTask:
    """One segmentation fold: model, patch batches, loss and validation."""

    def __init__(self, cfg: TrainConfig, store_root: Path, train_cases: list[str], val_cases: list[str], accelerator: Any) -> None:
        from petctl.engine.models import build_seg_model, channels_last, init_output_prior, load_pretrained_swin_unetr
        from petctl.engine.sampling import SegPatchDataset, make_loader
        from petctl.engine.store import read_json

        self.cfg, self.store_root, self.val_cases = cfg, Path(store_root), val_cases
        self.model = build_seg_model(cfg.arch, in_channels=cfg.in_channels, feature_size=cfg.feature_size, features=cfg.features,
                                     patch_size=cfg.patch_size)
        if cfg.output_prior:
            init_output_prior(self.model, cfg.output_prior)
        if cfg.pretrained:
            if cfg.arch != "swin_unetr":
                raise PetctlError("--pretrained loads Swin-UNETR (BTCV layout) weights; the preset's arch is " + cfg.arch)
            report = load_pretrained_swin_unetr(self.model, cfg.pretrained)
            accelerator.print(f"pretrained: {report}")
        channels_last(self.model, cfg.channels_last)
        self.dataset = SegPatchDataset(str(store_root), train_cases, cfg.patch_size, cfg.patches_per_scan, lesion_prob=cfg.lesion_prob,
                                       seed=cfg.seed, rank=accelerator.process_index, world_size=accelerator.num_processes,
                                       lesion_size_power=cfg.lesion_size_power, hard_lesion_gain=cfg.hard_lesion_gain)
        self._hard_records: list[tuple[str, int, float]] = []  # (case, component, recall) of this epoch's lesion patches
        self.loader = make_loader(self.dataset, cfg.batch_size, cfg.num_workers, pin_memory=accelerator.device.type == "cuda")
        # exact batches per epoch (each loader worker ends on its own partial batch); equal on all ranks
        self.steps_per_epoch = self.dataset.batches_per_epoch_per_rank(cfg.batch_size, cfg.num_workers)
        self.augment = seg_augment(cfg, read_json(self.store_root / "fingerprint.json") if cfg.lesion_dim > 0 else None)
        self.loss_fn = _loss_fn(cfg.loss)

    def batches(self, epoch: int) -> Iterator[Any]:
        self.dataset.set_epoch(epoch)
        yield from self.loader

    def loss(self, model: torch.nn.Module, batch: Any, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        from petctl.engine.models import as_channels_last
        from petctl.engine.sampling import augment_batch

        image = batch["image"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True)
        image, label = augment_batch(image, label, generator, self.augment)
        if self.cfg.position_channels:  # after augmentation: a flipped patch still says where it was read
            from petctl.engine.position import batch_positions

            image = torch.cat([image, batch_positions(batch["shape"], batch["start"], image.shape[2:]).to(image)], 1)
        logits = model(as_channels_last(image, self.cfg.channels_last))
        if self.cfg.hard_lesion_gain > 0:
            self._record_recall(batch, logits, label)
        return self.loss_fn(logits, label)

    def _record_recall(self, batch: Any, logits: torch.Tensor, label: torch.Tensor) -> None:
        """Per lesion-centred patch: the share of its (augmented) lesion voxels the net scores > 0.5,
        credited to the centred component (every lesion voxel in the patch counts, the neighbours' too)."""
        with torch.no_grad():
            positive = label > 0.5
            hits = ((logits.detach() > 0) & positive).flatten(1).sum(1)
            totals = positive.flatten(1).sum(1)
        components = batch["component"].tolist()
        for case, component, hit, total in zip(batch["case"], components, hits.tolist(), totals.tolist()):
            if component >= 0 and total > 0:
                self._hard_records.append((case, int(component), hit / total))

    def end_epoch(self, accelerator: Any) -> dict[str, Any]:
        """After each epoch: every rank folds all ranks' lesion-patch recalls into its sampler's miss
        rates (hard-example mining); returns the epoch's summary numbers for the training record.
        The rates travel in checkpoints; an epoch resumed mid-way counts only the patches after the resume."""
        if self.cfg.hard_lesion_gain <= 0:
            return {}
        from petctl.engine.distributed import gather_objects

        records = sorted(gather_objects(accelerator, self._hard_records))
        self._hard_records = []
        self.dataset.update_hardness(records)
        state = self.dataset.hardness_state() or {}
        rates = np.concatenate([np.asarray(v, dtype=float) for v in state.values()]) if state else np.zeros(0)
        return {"lesion_patch_recall": float(np.mean([r for _, _, r in records])) if records else float("nan"),
                "hard_lesions": int((rates > 0.5).sum())}

    def sampler_state(self) -> dict[str, Any] | None:
        return self.dataset.hardness_state()

    def load_sampler_state(self, state: dict[str, Any] | None) -> None:
        self.dataset.load_hardness_state(state)

    def validate(self, model: torch.nn.Module, accelerator: Any, should_stop: Callable[[], bool] | None = None) -> dict[str, Any] | None:
        from petctl.engine.distributed import gather_objects
        from petctl.engine.metrics import THRESHOLDS, best_threshold, dice_sweep, top_k_auroc
        from petctl.engine.store import CaseStore

        cases = self.val_cases[: self.cfg.max_val_cases] if self.cfg.max_val_cases else self.val_cases
        store = CaseStore(self.store_root)
        rows = []
        mine = cases[accelerator.process_index :: accelerator.num_processes]
        rounds = -(-len(cases) // accelerator.num_processes)  # the same count on every rank (should_stop is a collective)
        model.eval()
        try:
            for i in range(rounds):
                if should_stop is not None and should_stop():
                    return None
                if i >= len(mine):
                    continue
                stored = store.load(mine[i])
                image = torch.from_numpy(stored.image.read_all()).float()
                label = stored.label.read_all()
                probs = predict_volume(model, image, self.cfg, accelerator.device)
                rows.append({"case": mine[i], "top_k_auroc": float(top_k_auroc(label, probs)),
                             "dice": dice_sweep(label, probs, THRESHOLDS).tolist()})
        finally:
            model.train()
        rows = sorted(gather_objects(accelerator, rows), key=lambda r: r["case"])
        aurocs = [r["top_k_auroc"] for r in rows if not math.isnan(r["top_k_auroc"])]
        curve = np.nanmean(np.array([r["dice"] for r in rows], dtype=float), axis=0) if rows else np.full(len(THRESHOLDS), np.nan)
        thr, best = best_threshold(curve, THRESHOLDS) if np.isfinite(curve).any() else (float("nan"), float("nan"))
        mean_auroc = float(np.mean(aurocs)) if aurocs else float("nan")
        return {
            "selection": mean_auroc,
            "top_k_auroc": mean_auroc,
            "best_threshold": float(thr),
            "dice_at_best": float(best),
            "dice_curve": [None if not np.isfinite(v) else float(v) for v in curve],
            "val_cases": [{"case": r["case"], "top_k_auroc": r["top_k_auroc"]} for r in rows],
        }


def store_channels(store_root: Path) -> int:
    """The image channels a store's plan writes (2, or 3 with `prepare --pet-wide`)."""
    from petctl.engine.prepare import channel_names
    from petctl.engine.store import read_json

    return len(channel_names(read_json(Path(store_root) / "fingerprint.json")))


def train_deadline() -> float | None:
    """The training deadline `train_folds` passed down (PETCTL_TRAIN_DEADLINE), or None."""
    from petctl.engine.folds import DEADLINE_ENV

    text = os.environ.get(DEADLINE_ENV, "").strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise PetctlError(f"{DEADLINE_ENV}={text!r}: expected a time in seconds since the epoch") from None


def _loss_fn(name: str):
    if name == "bce":
        return torch.nn.BCEWithLogitsLoss()
    from monai.losses import DiceCELoss, DiceLoss

    return DiceLoss(sigmoid=True) if name == "dice" else DiceCELoss(sigmoid=True)


def fit(cfg: TrainConfig, store_root: Path, fold: int, out_dir: Path, *, run: str | None = None,
        home: Path | None = None, merged: bool = False, max_steps: int | None = None) -> int:
    """Train one segmentation fold in this process (one of `accelerate launch`'s); returns the exit status."""
    train_cases, val_cases = read_fold(store_root, fold, task="seg", merged=merged)
    cfg = cfg.with_image_channels(store_channels(store_root))
    loop = LoopConfig(num_cycles=cfg.num_cycles, epochs_per_cycle=cfg.epochs_per_cycle, lr=cfg.lr, lr_min_ratio=cfg.lr_min_ratio,
                      weight_decay=cfg.weight_decay, grad_accum=cfg.grad_accum, seed=cfg.seed, max_steps=max_steps,
                      batch_size=cfg.batch_size, selection_name="top_k_auroc", deadline=train_deadline())
    config_json = {**cfg.to_json(), "task": "seg", "fold": fold, "merged": merged, "store": str(store_root), "train": train_cases, "val": val_cases}
    return fit_task(lambda acc: SegTask(cfg, store_root, train_cases, val_cases, acc), loop, out_dir,
                    mixed_precision=cfg.mixed_precision, timeout_s=cfg.collective_timeout_s, run=run, home=home,
                    step=f"train-seg{'-merged' if merged else ''}-fold{fold}", kind="train-seg", config_json=config_json,
                    label=f"seg fold {fold}")

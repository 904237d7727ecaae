"""MIP classifier folds: a timm image model scores PET maximum-intensity projections (1 logit).

One model per fold and projection: an axis (x, y; z optional), or several axes ("xy") that one
model learns from together — each batch then holds `cls_batch_size` views, every view of
`cls_batch_size // views` scans, and a scan's score is the mean of its views' probabilities. Each
training view's PET volume is augmented in 3-D first (flips, zoom, rotation, intensity — the same
batched augmentation as segmentation; each view its own draw), then projected and resized, so the
projection sees a physically plausible view. Selection per cycle is the AUROC over the fold's
validation scans (positives and negatives).
With `cls_head="lesion_map"` the lesion masks are moved by the same augmentation and projected
too, and a lesion-map head learns where each MIP's lesions are as well as whether there are any.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from petctl.engine.config import TrainConfig
from petctl.engine.loop import LoopConfig, fit_task
from petctl.errors import PetctlError


def case_labels(store_root: Path) -> dict[str, bool]:
    """case → positive (label not empty), from the store manifest."""
    path = Path(store_root) / "manifest.json"
    if not path.exists():
        raise PetctlError(f"{path}: missing; run `petctl prepare` first")
    return {c: bool(e["positive"]) for c, e in json.loads(path.read_text())["cases"].items()}


def pet_mip(store: Any, case: str, axis: str, size: tuple[int, int], device: torch.device,
            augment: Any = None, generator: torch.Generator | None = None,
            with_label: bool = False, shrink: str = "max") -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(1, H, W) MIP of a stored case's PET channel, optionally 3-D augmented before projecting.

    With `with_label`, returns (PET MIP, label MIP): the lesion mask moved by the same augmentation
    and projected along the same axis (1 where a ray crosses a lesion), resized alike.
    """
    from petctl.engine.mip import mip_batch, resize_mip
    from petctl.engine.sampling import augment_batch

    stored = store.load(case)
    pet = torch.from_numpy(stored.image.read_all()[1]).float().to(device)[None, None]
    shape = (1, 1 if with_label else 0) + pet.shape[2:]
    label = torch.from_numpy(stored.label.read_all()).float().to(device).reshape(shape) if with_label else pet.new_zeros(shape)
    if augment is not None and augment.enabled:
        # Resample around the volume's floor, not 0: zero padding is brighter than air and the
        # body's clipped background (z < 0), and the maximum projection would show every rotated
        # corner as a bright wedge that no unaugmented scan has.
        floor = pet.amin()
        pet, label = augment_batch(pet - floor, label, generator, augment)
        pet = pet + floor
    image = resize_mip(mip_batch(pet[:, 0], axis), size, shrink)[0]
    if not with_label:
        return image
    return image, resize_mip(mip_batch(label[:, 0], axis), size, shrink)[0]


def lesion_map_target(label_mips_b1hw: torch.Tensor, map_size: tuple[int, int]) -> torch.Tensor:
    """Per map pixel 1 where any resized label-MIP pixel under it is ≥ 0.5 (a lesion projects there)."""
    return (torch.nn.functional.adaptive_max_pool2d(label_mips_b1hw, map_size) >= 0.5).to(label_mips_b1hw.dtype)


def build_classifier_for(cfg: TrainConfig, pretrained: bool = False) -> torch.nn.Module:
    """The classifier network a config describes (1 input channel: the PET MIP)."""
    from petctl.engine.models import build_classifier, channels_last

    model = build_classifier(cfg.cls_model, in_chans=1, img_size=cfg.cls_img_size,
                             pretrained_path=cfg.cls_pretrained if pretrained else None, head=cfg.cls_head)
    return channels_last(model, cfg.channels_last)


class ClsTask:
    """One classifier fold × projection: model, MIP batches, BCE loss, AUROC validation."""

    def __init__(self, cfg: TrainConfig, store_root: Path, axis: str, train_cases: list[str], val_cases: list[str], accelerator: Any) -> None:
        from petctl.engine.sampling import AugmentConfig
        from petctl.engine.store import CaseStore

        from petctl.engine.mip import projection_views

        self.cfg, self.axis, self.val_cases = cfg, axis, val_cases
        self.views = projection_views(axis)
        self.cases_per_batch = max(1, cfg.cls_batch_size // len(self.views))
        self.train_cases = train_cases
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.labels = case_labels(store_root)
        self.store = CaseStore(store_root)
        self.model = build_classifier_for(cfg, pretrained=True)
        self.augment = AugmentConfig(enabled=cfg.augment, flip_axes=(0,))
        per_rank = math.ceil(len(train_cases) / self.world)
        self.steps_per_epoch = max(1, math.ceil(per_rank / self.cases_per_batch))
        self.loss_fn = torch.nn.BCEWithLogitsLoss()

    def batches(self, epoch: int) -> Iterator[list[str]]:
        from petctl.engine.sampling import epoch_cases

        while True:
            mine = epoch_cases(self.train_cases, epoch, self.cfg.seed, self.world)[self.rank :: self.world]
            for i in range(0, len(mine), self.cases_per_batch):
                yield mine[i : i + self.cases_per_batch]

    def loss(self, model: torch.nn.Module, batch: list[str], generator: torch.Generator, device: torch.device) -> torch.Tensor:
        from petctl.engine.models import as_channels_last

        with_map = self.cfg.cls_head == "lesion_map"
        views = [pet_mip(self.store, c, axis, self.cfg.cls_img_size, device, self.augment, generator, with_label=with_map,
                         shrink=self.cfg.cls_mip_shrink) for c in batch for axis in self.views]
        images = as_channels_last(torch.stack([v[0] for v in views] if with_map else views), self.cfg.channels_last)
        target = torch.tensor([[1.0 if self.labels[c] else 0.0] for c in batch for _ in self.views], device=device)
        if not with_map:
            return self.loss_fn(model(images), target)
        logits, lesion_map = model(images, with_map=True)
        map_target = lesion_map_target(torch.stack([v[1] for v in views]), tuple(lesion_map.shape[-2:]))
        return self.loss_fn(logits, target) + self.cfg.cls_map_weight * self.loss_fn(lesion_map.float(), map_target)

    def validate(self, model: torch.nn.Module, accelerator: Any, should_stop: Callable[[], bool] | None = None) -> dict[str, Any] | None:
        """The fold's validation AUROC (MIPs score in milliseconds: `should_stop` is not consulted)."""
        from petctl.engine.distributed import gather_objects
        from petctl.engine.metrics import auroc

        rows = []
        model.eval()
        with torch.no_grad():
            for case in self.val_cases[self.rank :: self.world]:
                images = torch.stack([pet_mip(self.store, case, axis, self.cfg.cls_img_size, accelerator.device,
                                              shrink=self.cfg.cls_mip_shrink) for axis in self.views])
                score = float(torch.sigmoid(model(images).float()).mean())  # the mean of the views' probabilities
                rows.append({"case": case, "score": score, "positive": self.labels[case]})
        model.train()
        rows = sorted(gather_objects(accelerator, rows), key=lambda r: r["case"])
        labels = np.array([r["positive"] for r in rows], bool)
        scores = np.array([r["score"] for r in rows], float)
        value = float(auroc(labels, scores)) if rows else float("nan")
        return {"selection": value, "auroc": value, "val_scores": rows}


def fit_cls(cfg: TrainConfig, store_root: Path, fold: int, axis: str, out_dir: Path, *, run: str | None = None,
            home: Path | None = None, merged: bool = False, max_steps: int | None = None) -> int:
    """Train one classifier fold for one projection (an axis, or several: "xy") in this process;
    returns the exit status."""
    from petctl.engine.mip import projection_views
    from petctl.engine.trainer import read_fold

    try:
        projection_views(axis)
    except ValueError as exc:
        raise PetctlError(str(exc)) from None
    train_cases, val_cases = read_fold(store_root, fold, task="cls", merged=merged)
    loop = LoopConfig(num_cycles=cfg.cls_num_cycles, epochs_per_cycle=cfg.cls_epochs_per_cycle, lr=cfg.cls_lr,
                      lr_min_ratio=cfg.lr_min_ratio, weight_decay=cfg.weight_decay, grad_accum=cfg.grad_accum, seed=cfg.seed,
                      max_steps=max_steps, batch_size=cfg.cls_batch_size, selection_name="auroc")
    config_json = {**cfg.to_json(), "task": "cls", "fold": fold, "projection": axis, "merged": merged, "store": str(store_root),
                   "train": train_cases, "val": val_cases}
    return fit_task(lambda acc: ClsTask(cfg, store_root, axis, train_cases, val_cases, acc), loop, out_dir,
                    mixed_precision=cfg.mixed_precision, timeout_s=cfg.collective_timeout_s, run=run, home=home,
                    step=f"train-cls{'-merged' if merged else ''}-fold{fold}-{axis}", kind="train-cls", config_json=config_json,
                    label=f"cls fold {fold} {axis}")

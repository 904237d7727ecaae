"""The trained models of a run, loaded for inference: segmentation folds and MIP classifiers.

`RunModels.load(run_dir)` finds each fold's `best` checkpoint (its `last` when the fold never
validated; segmentation and classifier × projection, the classifiers only when `need_cls`), rebuilds each network from the config saved beside it, and loads the weights with
`weights_only=True`. `seg_probs` averages the folds' sigmoid probabilities by sliding window
(gaussian blending, optional flip TTA, stitching on the CPU when asked); `cls_score` averages the
classifiers' probabilities over folds and projections. Used by calibrate and predict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from petctl.engine.config import TrainConfig
from petctl.errors import PetctlError


@dataclass
class LoadedModel:
    name: str
    fold: int
    cfg: TrainConfig
    model: torch.nn.Module
    axis: str | None = None
    val_threshold: float | None = None


def _check_fold_is_current(fold_dir: Path, family: str, config: dict) -> None:
    """PetctlError when a fold was trained on other cases than its fold of the store's splits now
    lists: a store prepared again with other splits, or a fold left from a run with more folds
    (`fold4` after a re-plan to 3), would otherwise join the ensemble unseen (and may have trained
    on today's test scans)."""
    from petctl.engine.trainer import read_fold

    if "train" not in config or "val" not in config or not (Path(config["store"]) / "splits.json").exists():
        return  # a checkpoint that does not record its cases, or a store without splits: nothing to compare
    try:
        now = read_fold(Path(config["store"]), int(config["fold"]), task=family, merged=bool(config.get("merged")))
    except PetctlError:
        now = None
    if now is None or (sorted(now[0]), sorted(now[1])) != (sorted(config["train"]), sorted(config["val"])):
        raise PetctlError(f"{fold_dir}: trained on other cases than {family} fold {config['fold']} of {config['store']}/splits.json "
                          "lists now (the store prepared again, or a fold left from a run with more folds); retrain it or remove it")


@dataclass
class RunModels:
    run_dir: Path
    seg: list[LoadedModel] = field(default_factory=list)
    cls: list[LoadedModel] = field(default_factory=list)
    store: Path | None = None
    device: torch.device = torch.device("cpu")

    @classmethod
    def load(cls, run_dir: Path, *, device: torch.device | None = None, need_cls: bool = True) -> "RunModels":
        """Load every fold's best checkpoint (`seg/` and `cls/`, or `seg-merged/` and `cls-merged/` when present).
        `need_cls=False` (no gate) leaves the classifier folds alone: they are neither loaded nor checked.
        The store is the segmentation folds'."""
        from petctl.engine.classifier import build_classifier_for
        from petctl.engine.loop import find_checkpoint, load_checkpoint
        from petctl.engine.models import build_seg_model, channels_last

        run_dir = Path(run_dir)
        device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        out = cls(run_dir=run_dir, device=device)
        for family in ("seg", "cls") if need_cls else ("seg",):
            folder = run_dir / f"{family}-merged" if (run_dir / f"{family}-merged").is_dir() else run_dir / family
            if not folder.is_dir():
                continue
            for fold_dir in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("fold")):
                ckpt = find_checkpoint(fold_dir / "checkpoints" / "best") or find_checkpoint(fold_dir / "checkpoints" / "last")
                if ckpt is None:
                    raise PetctlError(f"{fold_dir}: no checkpoint; train this fold first")
                state, _, meta = load_checkpoint(ckpt)
                config = meta["config"]
                _check_fold_is_current(fold_dir, family, config)
                cfg = TrainConfig.from_json(config)
                if family == "seg":
                    model = build_seg_model(cfg.arch, in_channels=cfg.in_channels, feature_size=cfg.feature_size,
                                            features=cfg.features, patch_size=cfg.patch_size)
                    channels_last(model, cfg.channels_last)
                else:
                    model = build_classifier_for(cfg)
                model.load_state_dict(state)
                model.to(device).eval()
                metrics_path = fold_dir / "metrics.json"
                best = json.loads(metrics_path.read_text()).get("best") if metrics_path.exists() else None
                entry = LoadedModel(fold_dir.name, int(config["fold"]), cfg, model, config.get("projection"),
                                    (best or {}).get("best_threshold"))
                (out.seg if family == "seg" else out.cls).append(entry)
                if family == "seg":
                    out.store = Path(config["store"])
        if not out.seg:
            raise PetctlError(f"{run_dir}: no trained segmentation folds; run `petctl train --task seg` first")
        if need_cls and not out.cls:
            raise PetctlError(f"{run_dir}: no trained classifier folds; run `petctl train --task cls` first (or use --no-gate)")
        sets = sorted({",".join(m.cfg.cls_projections) for m in out.cls})
        if len(sets) > 1:  # e.g. fold0-x and fold0-y left beside a retrained fold0-xy: the gate would average both designs
            names = ", ".join(m.name for m in out.cls)
            raise PetctlError(f"{run_dir}: classifier folds trained with different projections ({' and '.join(sets)}: {names}); "
                              f"remove the folders of the ones not wanted")
        return out

    def seg_probs(self, image_cxyz: torch.Tensor, *, models: list[LoadedModel] | None = None, tta: bool = False,
                  stitch_on_cpu: bool = False) -> np.ndarray:
        """Mean sigmoid probability (X, Y, Z) float32 over the given (default: all) folds."""
        return np.mean(self.fold_probs(image_cxyz, models=models, tta=tta, stitch_on_cpu=stitch_on_cpu), axis=0, dtype=np.float32)

    def fold_probs(self, image_cxyz: torch.Tensor, *, models: list[LoadedModel] | None = None, tta: bool = False,
                   stitch_on_cpu: bool = False) -> list[np.ndarray]:
        """Each fold's sigmoid probability (X, Y, Z) float32 (its mean over the flips with `tta`).

        On the CPU the folds run side by side, as many at a time as torch has threads, which they
        share out: two folds of cpu-small on two cores, one thread each, segmented a scan ~1.2× faster
        than one after another on two threads (2026-11-30). Each fold's result is the same either way."""
        from concurrent.futures import ThreadPoolExecutor

        from petctl.engine.config import POSITION_CHANNELS
        from petctl.engine.models import torch_threads
        from petctl.engine.position import pad_to_patch, position_grid, unpad

        models = models or self.seg
        for m in models:  # a store re-prepared with(out) --pet-wide after training: one line, not a conv shape error
            image_channels = m.cfg.in_channels - (POSITION_CHANNELS if m.cfg.position_channels else 0)
            if image_cxyz.shape[0] != image_channels:
                raise PetctlError(f"{self.run_dir}: seg {m.name} takes {image_channels} image channels but the image has "
                                  f"{image_cxyz.shape[0]}; the store was prepared with another plan (--pet-wide) than it was trained on")
        x = image_cxyz[None].to(self.device)
        shape = tuple(int(n) for n in image_cxyz.shape[1:])
        grids: dict[tuple, torch.Tensor] = {}  # one position grid per padding (folds of one patch size share it)
        flips = [()] + ([(2,), (3,), (4,)] if tta else [])

        def one_fold(m: LoadedModel) -> np.ndarray:
            from monai.inferers import sliding_window_inference

            total: torch.Tensor | None = None
            with torch.no_grad():
                for flip in flips:
                    inp, before = pad_to_patch(torch.flip(x, flip) if flip else x, m.cfg.patch_size)
                    if m.cfg.position_channels:  # unflipped, as training appends them after augmentation
                        key = (before, tuple(inp.shape[2:]))
                        if key not in grids:
                            grids[key] = position_grid(shape, tuple(-b for b in before), key[1])[None].to(self.device)
                        inp = torch.cat([inp, grids[key]], 1)
                    logits = sliding_window_inference(
                        inp, roi_size=m.cfg.patch_size, sw_batch_size=m.cfg.sw_batch_size, predictor=m.model,
                        overlap=m.cfg.sw_overlap, mode="gaussian", padding_mode="constant",
                        sw_device=self.device, device=torch.device("cpu") if stitch_on_cpu else self.device,
                    )
                    logits = unpad(logits, before, shape)
                    probs = torch.sigmoid(logits.float())
                    probs = torch.flip(probs, flip) if flip else probs
                    total = probs if total is None else total + probs
            assert total is not None
            return (total / len(flips))[0, 0].cpu().numpy()

        threads = torch.get_num_threads()
        side_by_side = min(len(models), threads) if self.device.type == "cpu" else 1
        if side_by_side < 2:
            return [one_fold(m) for m in models]
        with torch_threads(threads // side_by_side), ThreadPoolExecutor(side_by_side) as pool:  # each fold on its share
            return list(pool.map(one_fold, models))

    def cls_score(self, pet_xyz: torch.Tensor) -> float:
        """Mean classifier probability over folds × projections for one PET volume (stored grid); a
        model of several views ("xy") counts once, with the mean of its views' probabilities."""
        from petctl.engine.mip import mip_batch, projection_views, resize_mip

        pet = pet_xyz.float().to(self.device)[None]
        scores = []
        with torch.no_grad():
            for m in self.cls:
                images = torch.cat([resize_mip(mip_batch(pet, axis), m.cfg.cls_img_size, m.cfg.cls_mip_shrink)
                                    for axis in projection_views(m.axis or "y")])
                scores.append(float(torch.sigmoid(m.model(images).float()).mean()))
        return float(np.mean(scores))


def read_thresholds(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "thresholds.json"
    if not path.exists():
        raise PetctlError(f"{path}: missing; run `petctl calibrate --run {Path(run_dir).name}` first")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PetctlError(f"{path}: cannot be read ({exc}); run `petctl calibrate --run {Path(run_dir).name}` again") from None
    if not isinstance(data, dict) or data.get("version") != 1 or "segmentation" not in data:
        raise PetctlError(f"{path}: unsupported or malformed thresholds file")
    return data

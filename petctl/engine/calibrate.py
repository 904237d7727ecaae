"""`petctl calibrate`: the ensemble's thresholds, chosen on the held-out test set.

Segmentation: the fold ensemble (mean of sigmoid probabilities) predicts the test positives on the
stored grid; the threshold maximizing the mean per-case Dice over a 0.01 grid is chosen (with
`component_seed`, jointly with a component seed — hysteresis: a connected component of
`p >= threshold` is kept only when it holds a voxel `p >= seed`; seed 0 keeps all).
Each fold's own best validation threshold (the paper's Table 1) is recorded with the ensemble's
Dice at it. Classifier: the ensemble (folds × projections, mean probability) scores the test
positives and negatives; the threshold is the highest value that still keeps sensitivity 1.0.
Writes `thresholds.json` (versioned) and two PNGs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from petctl.errors import PetctlError

THRESHOLDS_VERSION = 1


def calibrate(run_dir: Path, *, on_case: Callable[[str], None] | None = None, gate: bool = True,
              component_seed: bool = False) -> dict[str, Any]:
    """Compute and write `run_dir/thresholds.json`; returns its payload.

    `component_seed` adds the seed grid to the search (off by default: the paper's plain threshold).
    """
    from petctl.engine.ensemble import RunModels
    from petctl.engine.metrics import (
        SEED_THRESHOLDS,
        THRESHOLDS,
        auroc,
        best_seeded_threshold,
        best_threshold,
        classifier_threshold,
        dice_sweep,
        seeded_dice_grid,
        specificity_at,
    )
    from petctl.engine.store import CaseStore, write_json_atomic

    t0 = time.perf_counter()
    models = RunModels.load(run_dir, need_cls=gate)
    assert models.store is not None
    store = CaseStore(models.store)
    manifest = json.loads((models.store / "manifest.json").read_text())["cases"]
    splits = json.loads((models.store / "splits.json").read_text())
    test = [c for c in splits["test"] if c in manifest]
    positives = [c for c in test if manifest[c]["positive"]]
    if not positives:
        raise PetctlError(f"{models.store}: the test set has no positive case to calibrate the segmentation threshold on")

    seeds = SEED_THRESHOLDS if component_seed else SEED_THRESHOLDS[:1]  # [0.0]: every component kept
    per_case: dict[str, dict[str, Any]] = {}
    ensemble_tables, fold_curves = [], {m.name: [] for m in models.seg}
    for case in test:
        stored = store.load(case)
        image = torch.from_numpy(stored.image.read_all()).float()
        row: dict[str, Any] = {"positive": bool(manifest[case]["positive"])}
        if gate and models.cls:
            row["cls_score"] = models.cls_score(image[1])
        if row["positive"]:
            label = stored.label.read_all()
            fold_probs = [models.seg_probs(image, models=[m]) for m in models.seg]
            ensemble = np.mean(fold_probs, axis=0)
            table = seeded_dice_grid(label, ensemble, THRESHOLDS, seeds)
            ensemble_tables.append(table)
            for m, p in zip(models.seg, fold_probs):
                fold_curves[m.name].append(dice_sweep(label, p, THRESHOLDS))
            row["dice_table"] = table
        per_case[case] = row
        if on_case:
            on_case(case)

    mean_table = np.nanmean(np.array(ensemble_tables), axis=0)
    mean_curve = mean_table[:, 0]  # seed 0: every component kept (the paper's plain threshold)
    seg_thr, seed_thr, seg_dice = best_seeded_threshold(mean_table, THRESHOLDS, seeds)
    seed_col = int(np.argmin(np.abs(seeds - seed_thr)))
    plain_thr, plain_dice = best_threshold(mean_curve, THRESHOLDS)
    folds = []
    for m in models.seg:
        own = np.nanmean(np.array(fold_curves[m.name]), axis=0)
        ft, fd = best_threshold(own, THRESHOLDS)
        entry = {"fold": m.name, "val_threshold": m.val_threshold, "test_best_threshold": ft, "test_dice_alone": fd}
        if m.val_threshold is not None:
            idx = int(np.argmin(np.abs(THRESHOLDS - m.val_threshold)))
            entry["ensemble_dice_at_val_threshold"] = float(mean_curve[idx])
        folds.append(entry)
    for row in per_case.values():
        if "dice_table" in row:
            row["dice_at_threshold"] = float(row.pop("dice_table")[int(np.argmin(np.abs(THRESHOLDS - seg_thr))), seed_col])

    payload: dict[str, Any] = {
        "version": THRESHOLDS_VERSION,
        "run": Path(run_dir).name,
        "store": str(models.store),
        "test_cases": test,
        "segmentation": {
            "threshold": float(seg_thr), "seed_threshold": float(seed_thr), "mean_dice": float(seg_dice),
            "num_positives": len(positives), "without_seed": {"threshold": plain_thr, "mean_dice": plain_dice},
            "thresholds": THRESHOLDS.tolist(), "mean_dice_curve": [None if not np.isfinite(v) else float(v) for v in mean_curve],
            "seed_thresholds": seeds.tolist(),
            "best_dice_per_seed": [None if np.isnan(col).all() else float(np.nanmax(col)) for col in mean_table.T],
            "mean_dice_curve_at_seed": [None if not np.isfinite(v) else float(v) for v in mean_table[:, seed_col]],
            "folds": folds,
        },
        "classifier": None,
        "cases": per_case,
    }
    if gate and models.cls:
        labels = np.array([per_case[c]["positive"] for c in test], bool)
        scores = np.array([per_case[c]["cls_score"] for c in test], float)
        thr = classifier_threshold(labels, scores)
        negatives = int((~labels).sum())
        gated = int(((scores < thr) & ~labels).sum())
        payload["classifier"] = {
            "threshold": float(thr), "auroc": float(auroc(labels, scores)),
            "specificity": float(specificity_at(labels, scores, thr)) if negatives else float("nan"),
            "negatives": negatives, "negatives_skipping_segmentation": gated, "positives": int(labels.sum()),
            "models": [m.name for m in models.cls],
        }
    payload["seconds"] = round(time.perf_counter() - t0, 2)
    write_json_atomic(Path(run_dir) / "thresholds.json", payload)
    plot_calibration(Path(run_dir), payload, fold_curves, THRESHOLDS)
    return payload


def plot_calibration(run_dir: Path, payload: dict[str, Any], fold_curves: dict[str, list[np.ndarray]], thresholds: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seg = payload["segmentation"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curves in fold_curves.items():
        ax.plot(thresholds, np.nanmean(np.array(curves), axis=0), lw=1, alpha=0.6, label=name)
    ax.plot(thresholds, [np.nan if v is None else v for v in seg["mean_dice_curve"]], "k-", lw=2.5, label="ensemble")
    seed = seg.get("seed_threshold") or 0.0
    if seed > 0:
        ax.plot(thresholds, [np.nan if v is None else v for v in seg["mean_dice_curve_at_seed"]], "r--", lw=2,
                label=f"ensemble, components seeded at {seed:.2f}")
    ax.plot([seg["threshold"]], [seg["mean_dice"]], "r*", ms=14,
            label=f"chosen {seg['threshold']:.2f}{f' / seed {seed:.2f}' if seed > 0 else ''} (Dice {seg['mean_dice']:.3f})")
    ax.set(xlabel="threshold", ylabel="mean Dice over test positives", title="Segmentation threshold", ylim=(0, 1))
    ax.legend(fontsize=7, loc="lower center")
    fig.tight_layout()
    fig.savefig(run_dir / "calibration_dice.png", dpi=100)
    plt.close(fig)
    cls = payload.get("classifier")
    if cls:
        from sklearn.metrics import roc_curve

        cases = payload["cases"]
        labels = np.array([cases[c]["positive"] for c in payload["test_cases"]], int)
        scores = np.array([cases[c]["cls_score"] for c in payload["test_cases"]], float)
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        if 0 < labels.sum() < len(labels):
            fpr, tpr, _ = roc_curve(labels, scores)
            ax.plot(fpr, tpr, "b-", lw=2, label=f"AUROC {cls['auroc']:.3f}")
            ax.plot([1 - cls["specificity"]], [1.0], "r*", ms=14, label=f"threshold {cls['threshold']:.3f}")
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        ax.set(xlabel="1 − specificity", ylabel="sensitivity", title="MIP classifier gate")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(run_dir / "calibration_roc.png", dpi=100)
        plt.close(fig)

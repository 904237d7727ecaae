"""The demo's report: report.md plus the pictures a person would rather look at.

- training_curves.png: per fold, the train loss per epoch and the validation top-K AUROC / Dice at
  each cycle's end; the classifiers' train loss and validation AUROC below;
- calibration_dice.png / calibration_roc.png (copied from the run);
- test_cases.png: coronal PET MIPs of test cases, ground truth and prediction side by side;
- lesion_detection.png: the held-out lesions' detection rate per volume bin.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from petctl.engine.figures import save_figure


def _fold_metrics(folder: Path) -> dict[str, dict[str, Any]]:
    out = {}
    if folder.is_dir():
        for path in sorted(folder.glob("fold*/metrics.json")):
            out[path.parent.name] = json.loads(path.read_text())
    return out


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _span(bounds: tuple[float, float] | None, digits: int = 3) -> str:
    from petctl.engine.evaluate import interval_text

    return interval_text(bounds, digits) or "–"


def plot_training(path: Path, seg: dict[str, dict[str, Any]], cls: dict[str, dict[str, Any]]) -> None:
    """Per fold: the training loss per epoch (per cycle for runs logged before per-epoch curves) and
    the validation metrics at each cycle's end, on one epoch axis; segmentation above, classifier below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from petctl.engine.loop import training_curve

    fig, axes = plt.subplots(2, 2, figsize=(12, 7))
    for row, (task, folds) in enumerate((("segmentation", seg), ("MIP classifier", cls))):
        loss_ax, val_ax = axes[row]
        last, units = 1.0, set()
        for k, (name, m) in enumerate(folds.items()):
            color = f"C{k % 10}"
            cycles = m.get("cycles", [])
            curve = training_curve(cycles, m.get("epochs", []))
            at = curve["at"]
            units.add(curve["unit"])
            loss_ax.plot(curve["x"], curve["loss"], ".-", color=color, label=name)
            last = max([last, *curve["x"], *at])
            if row == 0:
                val_ax.plot(at, [c.get("top_k_auroc") for c in cycles], "o-", color=color, label=f"{name} top-K AUROC")
                val_ax.plot(at, [c.get("dice_at_best") for c in cycles], "s--", color=color, label=f"{name} Dice")
            else:
                val_ax.plot(at, [c.get("auroc") for c in cycles], "o-", color=color, label=f"{name} AUROC")
        unit = " or ".join(sorted(units, reverse=True)) or "epoch"  # "epoch or cycle": folds trained before per-epoch curves
        loss_ax.set(title=f"{task}: train loss (mean per {unit})", xlabel=unit)
        val_ax.set(title=f"{task}: validation (each cycle's end)", xlabel=unit, ylim=(0, 1.02), xlim=(0.5, last + 0.5))
        for ax in (loss_ax, val_ax):
            if ax.has_data():
                ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def plot_test_cases(path: Path, data: Path, predictions: Path, cases: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib

    from petctl.engine.geometry import spacing_of, to_canonical
    from petctl.engine.mip import mip

    fig, axes = plt.subplots(2, len(cases), figsize=(2.6 * len(cases), 7.5), squeeze=False)
    for j, case in enumerate(cases):
        pet = nib.load(str(data / "imagesTs" / f"{case}_0001.nii.gz"))
        pet_c, canon = to_canonical(np.asarray(pet.dataobj, np.float32), pet.affine)
        sx, _, sz = spacing_of(canon)
        img = mip(pet_c, "y")
        for i, (label, folder) in enumerate((("ground truth", data / "labelsTs"), ("prediction", predictions))):
            ax = axes[i, j]
            ax.imshow(img, cmap="gray_r", vmin=0, vmax=np.percentile(img, 99.5), aspect=sz / sx)
            file = folder / f"{case}.nii.gz"
            if file.exists():
                m = mip(to_canonical(np.asarray(nib.load(str(file)).dataobj), pet.affine)[0], "y")
                ax.imshow(np.ma.masked_where(m == 0, m), cmap="autumn", alpha=0.65, aspect=sz / sx)
            ax.set_title(f"{case}\n{label}", fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def plot_lesion_detection(path: Path, bins: list[Any]) -> None:
    """Bars of the lesion-wise sensitivity per volume bin (`evaluate.detection_by_size`), each with its counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    x = np.arange(len(bins))
    heights = [0.0 if math.isnan(b.sensitivity) else b.sensitivity for b in bins]
    ax.bar(x, heights, color=["0.7" if not b.lesions else "C3" if h < 0.5 else "C0" for b, h in zip(bins, heights)])  # grey: no lesion
    for i, b in enumerate(bins):
        ax.text(i, heights[i] + 0.02, f"{b.detected}/{b.lesions}", ha="center", fontsize=9)
    ax.set(xticks=x, xticklabels=[b.label for b in bins], ylim=(0, 1.12), ylabel="lesions detected",
           title="held-out lesions detected, by lesion volume")
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def _folds_text(cfg: Any) -> str:
    trained = getattr(cfg, "train_folds", None)
    text = f"{cfg.folds} folds" if trained is None or trained >= cfg.folds else f"{trained} of {cfg.folds} folds trained"
    processes = getattr(cfg, "processes", None)
    return text + (f", each segmentation fold on {processes} processes (DDP)" if processes and processes > 1 else "")


def _budget_lines(budget: dict[str, Any] | None) -> list[str]:
    from petctl.engine.budget import describe_plan, describe_replan

    if not budget:
        return []
    lines = [describe_plan(budget)] + ([describe_replan(budget)] if budget.get("cls_replan") else [])
    return [" ".join(line[0].upper() + line[1:] + "." for line in lines), ""]


def write_report(out: Path, *, run_dir: Path, predict_run_dir: Path, data: Path, cfg: Any, thresholds: dict[str, Any],
                 evaluation: Any, timings: dict[str, float], train_cfg: Any, budget: dict[str, Any] | None = None) -> dict[str, Any]:
    from petctl.engine.registry import write_text_atomic

    out = Path(out)
    for name in ("test_cases.png", "lesion_detection.png"):  # drawn below only when there is a held-out evaluation
        (out / name).unlink(missing_ok=True)
    seg, cls = _fold_metrics(run_dir / "seg"), _fold_metrics(run_dir / "cls")
    plot_training(out / "training_curves.png", seg, cls)
    for name in ("calibration_dice.png", "calibration_roc.png"):
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, out / name)
        else:  # not drawn for this run (no classifier): an earlier demo's picture in OUT would not describe it
            (out / name).unlink(missing_ok=True)
    s_thr, c_thr = thresholds["segmentation"], thresholds.get("classifier") or {}
    seg_row = "| segmentation (flip TTA; " if thresholds.get("tta") else "| segmentation ("  # calibrated (and predicted) on flip averages
    lines = [
        "# petctl demo report", "",
        f"Preset `{train_cfg.preset}` ({train_cfg.arch}, patch {train_cfg.patch_size}, {train_cfg.num_cycles}×{train_cfg.epochs_per_cycle} cycles, "
        f"spacing {train_cfg.spacing} mm), {_folds_text(cfg)}, seed {cfg.seed}, data `{data}`.", "",
        *_budget_lines(budget),
        "## Thresholds (calibrated on the held-out test split of the training cohort)", "",
        "| what | threshold | quality |", "| --- | --- | --- |",
        f"{seg_row}ensemble, max mean Dice) | {s_thr['threshold']:.2f} | Dice {s_thr['mean_dice']:.3f} on {s_thr['num_positives']} positives |",
    ]
    if s_thr.get("extent"):
        ext = s_thr["extent"]
        plain = ext["plain_on_input_grid"]
        grid = " on its own grid (nearest-exact to the input grid)" if ext.get("resample") == "nearest" else ""
        lines[-1] = (f"{seg_row}ensemble detects at it{grid}; each component redrawn at its PET {ext['fraction']:.0%} isocontour) | "
                     f"{s_thr['threshold']:.2f} | Dice {s_thr['mean_dice']:.3f} on {s_thr['num_positives']} positives (input grid); "
                     f"{_test_fpv_text(ext)}, FNV {ext['mean_fnv_ml']:.2f} mL"
                     f"{'' if ext['budget_met'] else ' (no threshold within the budget)'}{_rule_text(ext)} |")
        lines.append(f"| the paper's plain threshold, for comparison | {plain['threshold']:.2f} | Dice {plain['mean_dice']:.3f} (input grid) |")
        if s_thr.get("urine_veto"):
            v = s_thr["urine_veto"]
            lines.append(f"| urine veto (a component ≥ {v['fraction']:.0%} in CT water, {v['water_hu'][0]:g}..{v['water_hu'][1]:g} HU, "
                         f"regions ≥ {v['min_ml']:g} mL, is dropped) | – | applied before the scores above |")
    elif s_thr.get("seed_threshold"):
        plain = s_thr["without_seed"]
        lines.append(f"| component seed (a component must reach it) | {s_thr['seed_threshold']:.2f} | without it: Dice {plain['mean_dice']:.3f} "
                     f"at {plain['threshold']:.2f} |")
    if c_thr:
        from petctl.engine.calibrate import gate_rule_text

        lines.append(f"| classifier gate ({gate_rule_text(c_thr)}) | {c_thr['threshold']:.4f} | AUROC {c_thr['auroc']:.3f}, specificity "
                     f"{c_thr['specificity']:.3f}, {c_thr['negatives_skipping_segmentation']}/{c_thr['negatives']} negatives skip segmentation |")
    lines += ["", "## Segmentation folds (the paper's Table 1)", "", "| fold | best cycle | top-K AUROC | best threshold | Dice @ threshold |",
              "| --- | --- | --- | --- | --- |"]
    for name, m in seg.items():
        b = m.get("best") or {}
        lines.append(f"| {name} | {_fmt(b.get('cycle'))} | {_fmt(b.get('top_k_auroc'), 4)} | {_fmt(b.get('best_threshold'), 2)} | {_fmt(b.get('dice_at_best'), 4)} |")
    lines += ["", "## Classifier folds", "", "| fold | best cycle | AUROC |", "| --- | --- | --- |"]
    for name, m in cls.items():
        b = m.get("best") or {}
        lines.append(f"| {name} | {_fmt(b.get('cycle'))} | {_fmt(b.get('auroc'), 4)} |")
    summary: dict[str, Any] = {"thresholds": {"segmentation": s_thr["threshold"], "seed": s_thr.get("seed_threshold"),
                                              "pet_extent": bool(s_thr.get("extent")),
                                              "urine_veto": bool(s_thr.get("urine_veto")),
                                              "segmentation_prior": (s_thr.get("extent") or {}).get("threshold_prior"),
                                              "segmentation_best": (s_thr.get("extent") or {}).get("best_threshold"),
                                              "classifier": c_thr.get("threshold")},
                               "calibration": {"test_dice": s_thr["mean_dice"], "classifier_auroc": c_thr.get("auroc")}}
    if evaluation is not None:
        s = evaluation.summary
        pred_info = json.loads((out / "predictions" / "predictions.json").read_text())["written"]
        labels = [evaluation.cases[c].is_positive for c in evaluation.cases]
        scores = [pred_info.get(c, {}).get("cls_score", float("nan")) for c in evaluation.cases]
        from petctl.engine.metrics import auroc

        from petctl.engine.evaluate import bootstrap_intervals

        scored = all(np.isfinite(scores))
        test_auroc = float(auroc(np.array(labels, bool), np.array(scores, float))) if scored else float("nan")
        ci = bootstrap_intervals(evaluation.cases, dict(zip(evaluation.cases, scores)) if scored else None)
        summary["test"] = {"mean_dice": s.mean_dice, "mean_fpv_ml_negatives": s.mean_fpv_ml_negative, "mean_fpv_ml": s.mean_fpv_ml,
                           "mean_fnv_ml": s.mean_fnv_ml, "classifier_auroc": test_auroc, "num_positive": s.num_positive,
                           "num_negative": s.num_negative, "gated": sum(bool(r.get("gated")) for r in pred_info.values()),
                           "interval": ci.to_json(), "problems": evaluation.problems}
        lines += ["", "## Held-out test cases (imagesTs, new patients)", "",
                  f"{s.num_positive} positives and {s.num_negative} negatives; the second row gives {ci.level:.0%} bootstrap intervals "
                  f"over the cases ({ci.resamples} resamples, positives and negatives drawn apart): how far another draw of as "
                  "many scans could move each mean.", "",
                  "| | mean Dice (positives) | mean FPV mL (negatives) | mean FPV mL (all) | mean FNV mL (positives) | classifier AUROC | gated |",
                  "| --- | --- | --- | --- | --- | --- | --- |",
                  f"| value | {_fmt(s.mean_dice)} | {_fmt(s.mean_fpv_ml_negative)} | {_fmt(s.mean_fpv_ml)} | {_fmt(s.mean_fnv_ml)} | {_fmt(test_auroc)} | "
                  f"{summary['test']['gated']}/{s.num_cases} |",
                  f"| {ci.level:.0%} interval | {_span(ci.mean_dice)} | {_span(ci.mean_fpv_ml_negative, 2)} | – | {_span(ci.mean_fnv_ml, 2)} | "
                  f"{_span(ci.classifier_auroc)} | |"]
        from petctl.engine.evaluate import detection_by_size

        bins = detection_by_size(evaluation.lesions)
        summary["test"]["lesion_detection"] = [b.to_json() for b in bins]
        lines += ["", "Lesion detection by lesion volume (a ground-truth lesion is detected when a predicted voxel touches it; "
                  "a gated scan's lesions are all missed):", "", "| lesion volume | " + " | ".join(b.label for b in bins) + " |",
                  "| --- |" + " --- |" * len(bins),
                  "| detected / lesions | " + " | ".join(f"{b.detected}/{b.lesions}" for b in bins) + " |",
                  "| sensitivity | " + " | ".join(_fmt(b.sensitivity, 2) for b in bins) + " |", ""]
        plot_lesion_detection(out / "lesion_detection.png", bins)
        lines += ["| case | Dice | FPV mL | FNV mL | gate score | gated |", "| --- | --- | --- | --- | --- | --- |"]
        for case, m in evaluation.cases.items():
            r = pred_info.get(case, {})
            lines.append(f"| {case} | {_fmt(m.dice)} | {_fmt(m.fpv_ml)} | {_fmt(m.fnv_ml)} | {_fmt(r.get('cls_score'))} | {'yes' if r.get('gated') else 'no'} |")
        shown = sorted(evaluation.cases, key=lambda c: (not evaluation.cases[c].is_positive, c))[:6]
        if shown:
            plot_test_cases(out / "test_cases.png", data, out / "predictions", shown)
    lines += ["", "## Timings", "", "| stage | seconds |", "| --- | --- |"] + [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    pictures = [("training curves", "training_curves.png"), ("calibration", "calibration_dice.png"),
                ("classifier ROC", "calibration_roc.png"), ("test cases", "test_cases.png")]
    if evaluation is not None:
        pictures.append(("lesion detection by volume", "lesion_detection.png"))
    lines += ["", "## Pictures", ""] + [f"![{title}]({name})\n" for title, name in pictures if (out / name).exists()]
    write_text_atomic(out / "report.md", "\n".join(lines))
    return summary


def _test_fpv_text(ext: dict[str, Any]) -> str:
    """The test split's mean FPV over negatives, or why there is none (calibrate's `negatives=False`)."""
    if ext.get("mean_fpv_ml_negatives") is None:
        return "FPV on negatives not measured (calibrate segmented no test negative)"
    return f"mean FPV {ext['mean_fpv_ml_negatives']:.2f} mL on negatives"


def _rule_text(ext: dict[str, Any]) -> str:
    """How the PET-extent threshold was chosen (older thresholds.json files have no rule)."""
    if ext.get("threshold_prior") is None or ext.get("best_threshold") is None:
        return ""
    return (f"; the best Dice {ext['best_dice']:.3f} ± {ext['dice_standard_error']:.3f} (1 SE) was at {ext['best_threshold']:.2f}, "
            f"the threshold nearest the prior {ext['threshold_prior']:.2f} within 1 SE is taken")

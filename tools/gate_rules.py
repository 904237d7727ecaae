"""What other classifier-gate rules would have given on a finished demo's held-out scans.

The demo's own gated predict records every held-out scan's classifier score (predictions.json);
this tool predicts the same scans once more with `--no-gate` (into OUT/predictions-nogate, kept for
the next call), evaluates those masks, and then applies each rule's threshold to them: a scan under
the threshold takes an empty mask (a positive: Dice 0 and its whole lesion volume missed; a
negative: no false positive), exactly what predict's gate writes. Each rule sees only what
calibrate sees: the test split's scores (thresholds.json), its positives, and which of them the
segmentation found. Prints, per rule, the threshold, the held-out scans it stops (healthy /
positive) and the held-out mean Dice, FPV and FNV; with several demos, the totals over them.

    python tools/gate_rules.py /tmp/d-13111:/tmp/home-13111/runs/demo ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from petctl.engine.calibrate import detected_gate_threshold
from petctl.engine.evaluate import affine_voxel_ml, evaluate_folders
from petctl.engine.metrics import classifier_threshold


def rules(cases: dict[str, dict]) -> dict[str, float]:
    """Each rule's threshold from calibrate's test-split records (`thresholds.json` cases)."""
    rows = list(cases.values())
    pos = np.array([r["positive"] for r in rows], bool)
    scores = np.array([r["cls_score"] for r in rows], float)
    detected = detected_gate_threshold(cases, 1.0)  # calibrate's own rule, at margin 1
    p = detected[0] if detected else classifier_threshold(pos, scores)
    healthy_max = float(scores[~pos].max()) if (~pos).any() else 0.0
    return {
        "paper (all positives)": classifier_threshold(pos, scores),
        "detected x 0.5 (demo)": 0.5 * p,
        "detected x 0.25": 0.25 * p,
        # the split's healthy scans all under half the lowest positive: the gate just above them
        "min(0.5 p, healthy max)": min(0.5 * p, healthy_max),
        # separated: half-way between the highest healthy score and the lowest positive
        "mid(h, p) if h < p": 0.5 * (healthy_max + p) if healthy_max < p else 0.5 * p,
        "no gate": 0.0,
    }


def held_out(demo: Path, run_dir: Path) -> tuple[dict[str, float], dict[str, dict]]:
    """Scores (gated predict's records) and per-case no-gate metrics with each positive's lesion mL."""
    from petctl.engine.predict import PredictOptions, predict, write_summary

    data = demo / "raw"
    records = json.loads((demo / "predictions" / "predictions.json").read_text())["written"]
    scores = {c: float(r["cls_score"]) for c, r in records.items()}
    nogate = demo / "predictions-nogate"
    if not (nogate / "predictions.json").exists():
        result = predict(run_dir, data, nogate, PredictOptions(gate=False))
        write_summary(nogate, result)
    evaluation = evaluate_folders(data / "labelsTs", nogate)
    if evaluation.problems:
        raise SystemExit(f"{demo}: {evaluation.problems}")
    rows = {}
    for case, m in evaluation.cases.items():
        label = nib.load(next((data / "labelsTs").glob(f"{case}.nii*")))
        gt_ml = float(np.count_nonzero(np.asarray(label.dataobj))) * affine_voxel_ml(label.affine)
        rows[case] = {"positive": gt_ml > 0, "dice": m.dice, "fpv": m.fpv_ml, "fnv": m.fnv_ml, "gt_ml": gt_ml}
    return scores, rows


def apply(threshold: float, scores: dict[str, float], rows: dict[str, dict]) -> dict[str, float]:
    dice, fpv, fnv, stopped_h, stopped_p = [], [], [], 0, 0
    for case, r in rows.items():
        stop = scores[case] < threshold
        if r["positive"]:
            stopped_p += stop
            dice.append(0.0 if stop else r["dice"])
            fnv.append(r["gt_ml"] if stop else r["fnv"])
        else:
            stopped_h += stop
            fpv.append(0.0 if stop else r["fpv"])
    return {"dice": float(np.mean(dice)), "fpv": float(np.mean(fpv)), "fnv": float(np.mean(fnv)),
            "stopped_healthy": stopped_h, "stopped_positive": stopped_p, "healthy": len(fpv)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demos", nargs="+", help="DEMO_OUT:RUN_DIR pairs")
    args = parser.parse_args()
    totals: dict[str, list[dict]] = {}
    for pair in args.demos:
        demo, run_dir = (Path(p) for p in pair.split(":"))
        cal = json.loads((run_dir / "thresholds.json").read_text())
        scores, rows = held_out(demo, run_dir)
        print(f"== {demo.name}: calibrated gate {cal['classifier']['threshold']:.3f}")
        for name, thr in rules(cal["cases"]).items():
            r = apply(thr, scores, rows)
            totals.setdefault(name, []).append(r)
            met = r["dice"] >= 0.75 and r["fpv"] <= 5 and r["fnv"] <= 5
            print(f"  {name:26s} thr {thr:.3f}  stops {r['stopped_healthy']:2d}/{r['healthy']} healthy, "
                  f"{r['stopped_positive']} positive  Dice {r['dice']:.3f}  FPV {r['fpv']:.2f}  FNV {r['fnv']:.2f}"
                  f"  {'met' if met else 'MISSED'}")
    if len(args.demos) > 1:
        print("== over all")
        for name, rs in totals.items():
            met = sum(r["dice"] >= 0.75 and r["fpv"] <= 5 and r["fnv"] <= 5 for r in rs)
            print(f"  {name:26s} Dice {np.mean([r['dice'] for r in rs]):.3f}  FPV {np.mean([r['fpv'] for r in rs]):.2f}  "
                  f"FNV {np.mean([r['fnv'] for r in rs]):.2f}  positives stopped {sum(r['stopped_positive'] for r in rs)}  "
                  f"healthy stopped {sum(r['stopped_healthy'] for r in rs)}/{sum(r['healthy'] for r in rs)}  "
                  f"three seg targets met {met}/{len(rs)}")


if __name__ == "__main__":
    main()

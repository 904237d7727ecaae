"""Why a finished demo missed the lesions it missed whole: the gate, the threshold, or the mask's rules.

For every held-out positive, the ground truth's lesions (18-connected components) of at least
--min-ml are matched against the demo's gated masks (OUT/predictions). Each lesion with no predicted
voxel is then looked at in an ungated prediction of its scan with the ensemble's probabilities saved
(OUT/predictions-missed, kept for the next call): the probability's peak inside the lesion and the
share of its voxels at or above the calibrated threshold say whether the networks saw it; whether the
ungated mask covers it says whether the gate stopped the scan; probabilities over the threshold with
no mask there mean the PET extent, the component seed or the urine veto removed it (the record's
`urine_vetoed_voxels` tells the veto apart). Prints one line per missed lesion:

    case  lesion  mL  SUVpeak  SUVmean  CT-HU(median)  gated  p_max  share>=thr  ungated-mask  vetoed-voxels  cause

    python tools/missed_lesions.py /tmp/d-13511:/tmp/home-13511/runs/demo --min-ml 5
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import cc3d
import nibabel as nib
import numpy as np

from petctl.engine.cohort import discover, nifti_path
from petctl.engine.evaluate import CONNECTIVITY, affine_voxel_ml


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _prediction(folder: Path, case: str) -> Path:
    path = nifti_path(folder / case)
    if path is None:
        raise SystemExit(f"{folder}: no {case}.nii(.gz)")
    return path


def missed(demo: Path, min_ml: float) -> list[dict]:
    """The lesions of at least `min_ml` that the gated masks do not touch, with their PET and CT."""
    gated = demo / "predictions"
    records = json.loads((gated / "predictions.json").read_text())["written"]
    out = []
    for src in discover(demo / "raw", split="Ts", with_metadata=False):
        if src.label is None:
            continue
        case = src.case
        label_img = nib.load(str(src.label))
        label = np.asarray(label_img.dataobj) > 0
        if not label.any():
            continue
        ml = affine_voxel_ml(label_img.affine)
        pred = _load(_prediction(gated, case)) > 0
        comps = cc3d.connected_components(label.astype(np.uint8), connectivity=CONNECTIVITY)
        pet = ct = None
        for lesion in range(1, int(comps.max()) + 1):
            voxels = comps == lesion
            volume = float(voxels.sum()) * ml
            if volume < min_ml or (pred & voxels).any():
                continue
            if pet is None:
                pet, ct = (_load(p).astype(np.float32) for p in (src.pet, src.ct))
            out.append({"case": case, "lesion": lesion, "ml": volume, "voxels": voxels, "source": src,
                        "suv_peak": float(pet[voxels].max()), "suv_mean": float(pet[voxels].mean()),
                        "ct_hu": float(np.median(ct[voxels])), "gated": bool(records[case].get("gated")),
                        "cls_score": records[case].get("cls_score")})
    return out


def probe(demo: Path, run_dir: Path, lesions: list[dict]) -> None:
    """Adds each lesion's probability peak, share over the threshold, and ungated mask cover."""
    from petctl.engine.predict import PredictOptions, predict, write_summary

    threshold = float(json.loads((run_dir / "thresholds.json").read_text())["segmentation"]["threshold"])
    folder = demo / "predictions-missed"
    cases = sorted({m["case"] for m in lesions})
    todo = [c for c in cases if not (folder / f"{c}_prob.nii.gz").exists()]
    if todo:
        with tempfile.TemporaryDirectory() as tmp:
            images = Path(tmp) / "imagesTs"
            images.mkdir()
            sources = {m["case"]: m["source"] for m in lesions}
            for case in todo:
                for path in (sources[case].ct, sources[case].pet):
                    (images / path.name).symlink_to(path.resolve())
            result = predict(run_dir, images, folder, PredictOptions(gate=False, save_probabilities="float32"))
            if result.skipped:
                raise SystemExit(f"predict skipped {result.skipped}")
            old = json.loads((folder / "predictions.json").read_text())["written"] if (folder / "predictions.json").exists() else {}
            result.written = {**old, **result.written}
            write_summary(folder, result)
    records = json.loads((folder / "predictions.json").read_text())["written"]
    for m in lesions:
        probs = _load(folder / f"{m['case']}_prob.nii.gz")
        mask = _load(_prediction(folder, m["case"])) > 0
        inside = probs[m["voxels"]]
        m.update(threshold=threshold, p_max=float(inside.max()), share=float((inside >= threshold).mean()),
                 ungated=float((mask & m["voxels"]).sum() / m["voxels"].sum()),
                 vetoed=int(records[m["case"]].get("urine_vetoed_voxels", 0)))
        if m["ungated"] > 0:
            m["cause"] = "gate" if m["gated"] else "?"
        elif m["share"] == 0:
            m["cause"] = "networks (all under the threshold)"
        else:
            m["cause"] = "urine veto" if m["vetoed"] else "extent / seed rule"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demos", nargs="+", help="DEMO_OUT:RUN_DIR (the demo's --out and HOME/runs/demo)")
    parser.add_argument("--min-ml", type=float, default=5.0, help="the smallest lesion looked at (mL)")
    args = parser.parse_args()
    for spec in args.demos:
        demo, run_dir = (Path(p) for p in spec.split(":", 1))
        lesions = missed(demo, args.min_ml)
        print(f"{demo}: {len(lesions)} lesion(s) of >= {args.min_ml:g} mL missed whole")
        if not lesions:
            continue
        probe(demo, run_dir, lesions)
        print("case          lesion     mL  SUVpk  SUVmn  CT-HU  gated  p_max  >=thr  ungated  vetoed  cause")
        for m in lesions:
            print(f"{m['case']:<13} {m['lesion']:>6} {m['ml']:>6.1f} {m['suv_peak']:>6.1f} {m['suv_mean']:>6.1f} {m['ct_hu']:>6.0f} "
                  f"{'yes' if m['gated'] else 'no':>6} {m['p_max']:>6.3f} {m['share']:>6.2f} {m['ungated']:>8.2f} {m['vetoed']:>7}  {m['cause']}"
                  f"  (threshold {m['threshold']:.2f})")


if __name__ == "__main__":
    main()

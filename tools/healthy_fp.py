"""Which phantom tissue each false-positive component of a demo's held-out scans lies in.

A false-positive component is one that touches no lesion voxel (in a healthy scan: every one).
Renders each held-out study of `petctl demo --seed S` again, in memory, with its tissue
codes (`synth._render_study(with_tissue=True)`, stored like the PET, flips included) and reads the
masks of a predictions folder: by default the `--no-gate` masks `tools/gate_rules.py` leaves in
DEMO_OUT/predictions-nogate, so scans the gate stopped are seen too. Prints per scan its gate score
and each such component: mL, the tissue most of its voxels lie in, that tissue's mean SUV in the scan
and the component's peak SUV; then the false-positive mL by tissue, healthy and positive scans apart. A development tool: it reaches into `petctl.engine.synth`'s private
planner and renderer, and assumes the demo's default `--cases 192 --test-cases 32`.

    python tools/healthy_fp.py 13111 /tmp/d-13111
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import cc3d
import nibabel as nib
import numpy as np

import petctl.engine.synth as synth
from petctl.engine.evaluate import CONNECTIVITY, affine_voxel_ml

TISSUES = ("air", "fat", "soft tissue", "lung", "liver", "spleen", "cancellous bone", "cortical bone", "brain",
           "myocardium", "blood", "kidney", "bladder", "bowel", "brown fat")
assert len(TISSUES) == synth.BROWN_FAT + 1 and TISSUES[synth.BOWEL] == "bowel", "synth's tissue codes changed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("seed", type=int)
    parser.add_argument("demo", type=Path, help="the demo's --out folder")
    parser.add_argument("--masks", default="predictions-nogate", help="predictions folder inside DEMO (default: %(default)s)")
    parser.add_argument("--cases", type=int, default=192)
    parser.add_argument("--test-cases", type=int, default=32)
    args = parser.parse_args()
    if not (args.demo / args.masks).is_dir():
        raise SystemExit(f"{args.demo / args.masks}: no such folder (run tools/gate_rules.py on the demo first, or give --masks)")
    train = synth._plan(args.seed, synth._TRAIN, args.cases, 0, 0)
    held_out = synth._plan(args.seed, synth._TEST, args.test_cases, args.cases, len({s.patient for s in train}))
    scores = {c: r.get("cls_score") for c, r in
              json.loads((args.demo / "predictions" / "predictions.json").read_text())["written"].items()}
    volumes: dict[bool, Counter[str]] = {False: Counter(), True: Counter()}
    for study in held_out:
        mask = np.asarray(nib.load(args.demo / args.masks / f"{study.case}.nii.gz").dataobj) > 0
        if not mask.any():
            continue
        images, _ = synth._render_study(args.seed, study, 1.0, True, with_tissue=True)
        (tissue, affine), (pet, _), (label, _) = images["tissue"], images["pet"], images["label"]
        positive = study.diagnosis != synth.NEGATIVE
        if tissue.shape != mask.shape:
            raise SystemExit(f"{study.case}: the mask's shape {mask.shape} is not the PET's {tissue.shape} (other --cases?)")
        voxel_ml = affine_voxel_ml(affine)
        components = cc3d.connected_components(mask, connectivity=CONNECTIVITY)
        parts = []
        for i in range(1, int(components.max()) + 1):
            component = components == i
            if (label[component] > 0).any():
                continue
            codes, counts = np.unique(tissue[component], return_counts=True)
            code = int(codes[np.argmax(counts)])
            volumes[positive][TISSUES[code]] += component.sum() * voxel_ml
            parts.append(f"{component.sum() * voxel_ml:.1f} mL {TISSUES[code]} (its SUV {pet[tissue == code].mean():.1f}, "
                         f"peak {pet[component].max():.1f})")
        if not parts:
            continue
        score = scores.get(study.case)
        print(f"{study.case} ({'positive' if positive else 'healthy'}) gate score {'-' if score is None else f'{score:.3f}'}: " + "; ".join(parts))
    for positive, name in ((False, "healthy"), (True, "positive")):
        print(f"false-positive mL by tissue, {name} scans: "
              + (", ".join(f"{t} {ml:.1f}" for t, ml in volumes[positive].most_common()) or "none"))


if __name__ == "__main__":
    main()

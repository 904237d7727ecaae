"""How much of each bladder and of each lesion the urine veto's water region covers, on synthesized CTs.

Renders held-out studies of a synthetic cohort in memory (no files), with the phantom's own tissue
map for the bladder, puts the CT on the PET grid as predict does, and reports per veto variant: the
bladders with under half their volume in the region (the veto keeps such a false positive) and the
lesions with half or more in it, each lesion as drawn or grown by a voxel (the veto would drop a
true lesion). A development tool: it reaches into `petctl.engine.synth`'s private renderer.

    python tools/veto_on_synth.py --seed 9101 --studies 24
"""

from __future__ import annotations

import argparse

import cc3d
import numpy as np
from scipy import ndimage

import petctl.engine.synth as synth
from petctl.engine.nifti import resample_onto
from petctl.engine.urine import UrineVeto, water_region

VARIANTS = {
    "1.5 mm Gaussian (before the median)": UrineVeto(median=False),
    "3 mm Gaussian": UrineVeto(median=False, smooth_mm=3.0),
    "3-voxel medians + 1.5 mm Gaussian (the default)": UrineVeto(),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=9101)
    parser.add_argument("--studies", type=int, default=24)
    args = parser.parse_args()

    tissues: list[np.ndarray] = []
    tissue_map = synth.tissue_map

    def first_tissue_map(body, grid):  # the PET grid's map comes first in _render_study
        tissues.append(tissue_map(body, grid))
        return tissues[-1]

    synth.tissue_map = first_tissue_map
    synth._flip = lambda data, grid, axes: (data, grid.affine())  # storage flips do not change the anatomy
    bladder_share = {name: [] for name in VARIANTS}
    lesion_share = {name: [] for name in VARIANTS}
    for study in synth._plan(args.seed, 1, args.studies, 0, 0):
        tissues.clear()
        images, _ = synth._render_study(args.seed, study, 1.0, True)
        (ct, ct_affine), (pet, pet_affine), (label, _) = images["ct"], images["pet"], images["label"]
        bladder = tissues[0] == synth.BLADDER
        spacing = np.abs(np.diag(pet_affine)[:3])
        ct = ct.astype(np.float32)
        if ct.shape != pet.shape:
            ct = resample_onto(study.case, ct, ct_affine, pet.shape, pet_affine)
        components = cc3d.connected_components(label.astype(np.uint8), connectivity=26)
        lesions = [components == i for i in range(1, int(components.max()) + 1)]
        for name, veto in VARIANTS.items():
            region = water_region(ct, spacing, veto)
            if bladder.any():
                bladder_share[name].append(float(region[bladder].mean()))
            lesion_share[name] += [max(float(region[m].mean()), float(region[ndimage.binary_dilation(m)].mean()))
                                   for m in lesions]
        print(f"{study.case}: spacing {np.round(spacing, 2).tolist()}, bladder "
              + ", ".join(f"{bladder_share[n][-1]:.2f}" for n in VARIANTS), flush=True)
    for name in VARIANTS:
        b, les = np.array(bladder_share[name]), np.array(lesion_share[name])
        print(f"{name}: bladders under half in the region {int((b < 0.5).sum())} of {len(b)} (mean share {b.mean():.2f}); "
              f"lesions half or more in it {int((les >= 0.5).sum())} of {len(les)} (largest share {les.max():.2f})")


if __name__ == "__main__":
    main()

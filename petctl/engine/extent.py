"""Lesion extent from the PET: each detected component is redrawn at its background-adapted half maximum.

The network finds lesions; where a lesion ends is read off the PET, as nuclear medicine measures a
metabolic tumour volume (the background-corrected 50 % isocontour, "A50"). For each connected
component of `probs >= threshold`:

- peak = the component's SUV peak (95th percentile of its voxels; its maximum when it has ≤ 20);
- background = the median SUV of a shell `SHELL` voxels away from it (outside the lesion);
- level = background + `fraction` · (peak − background);
- the component becomes the connected region of `PET >= level` that touches it, inside the
  component dilated by `grow` voxels (so a lesion beside the bladder cannot flood into it).

A component with no contrast (peak ≤ background) is kept as the network drew it. Why: on the
synthetic cohort the ensemble finds most lesions but marks only their cores above the calibrated
threshold (large lesions at 0.3 of their volume); the PET edge gives the rest.
Runs on the SUV PET of the input grid (unclipped: the prepared 5-95 % clip would raise the
background of every lesion to the training set's p5).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from petctl.engine.urine import FRACTION as URINE_FRACTION
from petctl.errors import PetctlError

FRACTION = 0.5
GROW_VOXELS = 3
SHELL = (4, 6)
"""Background shell: voxels between these two dilations of the component."""
REFINE_THRESHOLDS: np.ndarray = np.round(np.arange(0.30, 0.951, 0.05), 2)
"""Detection thresholds `calibrate` tries with the PET extent (each try relabels, so a coarser grid)."""
_CUBE = np.ones((3, 3, 3), bool)


def pet_extent_mask(pet: np.ndarray, probs: np.ndarray, threshold: float, *, fraction: float = FRACTION,
                    grow: int = GROW_VOXELS, shell: tuple[int, int] = SHELL) -> np.ndarray:
    """Boolean mask: every component of `probs >= threshold` redrawn at its PET level (module doc)."""
    import cc3d

    if pet.shape != probs.shape:
        raise ValueError(f"PET {pet.shape} and probabilities {probs.shape} differ in shape")
    # scipy's dilation by 0 iterations runs until nothing changes (the whole box): an edited
    # thresholds.json with such a shell would redraw every lesion over its whole neighbourhood
    if not (0 < int(shell[0]) < int(shell[1]) and int(grow) >= 0 and 0.0 < float(fraction) <= 1.0):
        raise PetctlError(f"PET extent: needs 0 < shell[0] < shell[1], grow ≥ 0 and fraction in (0, 1] "
                          f"(got shell {tuple(shell)}, grow {grow}, fraction {fraction})")
    detected = np.asarray(probs) >= threshold
    out = np.zeros(detected.shape, bool)
    if not detected.any():
        return out
    components = cc3d.connected_components(detected.view(np.uint8), connectivity=26)
    pad = max(shell[1], grow) + 1
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None:
            continue
        box = tuple(slice(max(s.start - pad, 0), min(s.stop + pad, n)) for s, n in zip(box, detected.shape))
        comp = components[box] == index
        suv = pet[box]
        near = ndimage.binary_dilation(comp, iterations=shell[0])  # 6-connected steps: a diamond, not a box
        ring = ndimage.binary_dilation(near, iterations=shell[1] - shell[0]) & ~near
        inside = suv[comp]
        peak = float(np.percentile(inside, 95)) if inside.size > 20 else float(inside.max())
        background = float(np.median(suv[ring])) if ring.any() else float(suv.min())
        if peak <= background:
            out[box] |= comp
            continue
        allowed = (suv >= background + fraction * (peak - background))
        allowed &= ndimage.binary_dilation(comp, iterations=grow) if grow > 0 else comp
        regions, _ = ndimage.label(allowed, structure=_CUBE)
        touched = np.unique(regions[comp])
        touched = touched[touched > 0]
        out[box] |= np.isin(regions, touched) if touched.size else comp
    return out


def extent_curves(labels: np.ndarray, pet: np.ndarray, probs: np.ndarray, voxel_ml: float,
                  thresholds: np.ndarray = REFINE_THRESHOLDS, *, urine: np.ndarray | None = None,
                  urine_fraction: float = URINE_FRACTION, **kw: float) -> np.ndarray:
    """autoPET (Dice, FPV mL, FNV mL) of `pet_extent_mask` at every threshold: shape (len(thresholds), 3).

    Dice is nan when the volume has no lesion (a negative scan: its FPV is what it costs). With
    `urine` (`urine.water_region`) each mask first loses its components mostly in it, as predict does.
    """
    from petctl.engine.evaluate import case_metrics
    from petctl.engine.urine import drop_urine_components

    out = np.empty((len(thresholds), 3))
    gt = np.asarray(labels) > 0
    for i, t in enumerate(thresholds):
        mask = pet_extent_mask(pet, probs, float(t), **kw)
        if urine is not None:
            mask = drop_urine_components(mask, urine, urine_fraction)
        m = case_metrics(gt, mask, voxel_ml)
        out[i] = (m.dice if gt.any() else np.nan, m.fpv_ml, m.fnv_ml)
    return out

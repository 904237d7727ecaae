"""The urine veto: predicted components that lie mostly in urine are dropped.

FDG is excreted in the urine, so the bladder (and at times the renal pelvis) is as bright on the PET
as the hottest lesions; the clipped PET saturates both. The CT tells them apart: urine is water
(0–20 HU), lesions are soft tissue (30–60 HU) or bone. The veto finds urine on the CT of the input
grid — voxels whose CT, median-filtered (3 voxels along each axis in turn) and smoothed over
`SMOOTH_MM`, lies in `WATER_HU`; opened with a ball of
`OPEN_MM` so the thin partial-volume shells between fat and soft tissue (which pass through water
density) fall away; connected regions of at least `MIN_ML` kept — and drops every connected
component of the predicted mask of which at least `FRACTION` lies in that region. Whole components,
not voxels: a lesion beside the bladder keeps its own voxels, and a component that is only partly in
water (a lesion with partial volume against fat) stays.

`calibrate --urine-veto` chooses the threshold with the veto applied and records it in
thresholds.json (`urine_veto`); predict then applies it the same way. Measured offline, re-scoring
the masks of 36 finished demos: on the ten fresh seeds 3030–3939 held-out mean Dice 0.815 → 0.829
and FPV on the negatives 2.68 → 1.34 mL, on the 26 older demos 0.626 → 0.649 and 1.70 → 0.63 mL;
FNV unchanged and no positive's Dice lower on any. Smoothing over 3 mm instead of 1.5 dropped
three small lesions in fat (2–3 mL, whose partial volume reads as water on the PET grid) on two of
the older demos (README, the demo section).

The median is for the CT's noise on the PET grid (3–4.5 mm voxels, where 1.5 mm is under half a
voxel): on fresh seed 5353 a healthy scan's 65 mL bladder kept only 23 % of itself in the region
(the noise pushed urine out of the water range) and stayed. A median removes noise and keeps edges,
where a wider Gaussian blurs small lesions in fat into water. On the CTs of 104 synthesized studies
(seeds 9101 and 9202, `tools/veto_on_synth.py`; the bladder and the lesions from the phantom, each
lesion as drawn and grown a voxel) the bladders with under half their volume in the region went
10 → 0 (mean share 0.72 → 0.81), the lesions with half or more 0 → 0 of 186 (the largest share
0.30 → 0.28); a 3 mm Gaussian instead also caught every bladder but put 55 % of a 0.9 mL lesion in
water. Three 3-voxel medians along the axes (`median3`, ~0.04 s a scan) give the counts of scipy's
3×3×3 cube, which took ~1 s a scan (20 s more on 5656's calibrate). A thresholds.json calibrated
before the median keeps its veto as it was (`median` false).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from petctl.errors import PetctlError

WATER_HU = (-30.0, 20.0)
SMOOTH_MM = 1.5
OPEN_MM = 4.0
MIN_ML = 5.0
FRACTION = 0.5


@dataclass(frozen=True)
class UrineVeto:
    """The veto's settings, as thresholds.json records them."""

    water_hu: tuple[float, float] = WATER_HU
    smooth_mm: float = SMOOTH_MM
    open_mm: float = OPEN_MM
    min_ml: float = MIN_ML
    fraction: float = FRACTION
    median: bool = True
    """A 3-voxel median along each axis in turn before the smoothing (`median3`)."""
    whole_voxel_ball: bool = False
    """True: the opening's ball reaches at least one voxel along every axis. False (the default, and
    what every calibration so far used): an axis coarser than `open_mm` keeps only the centre voxel,
    so on the synthetic cohort's 4.2-5 mm slices the opening does not act along z. Measured on seed
    11911's demo, re-calibrated and predicted with True: one 33-voxel false positive beside the
    bladder kept that False had vetoed (held-out Dice 0.9024 → 0.9008), nothing else changed; the
    veto's settings were chosen with False, so it stays the default."""

    def __post_init__(self) -> None:
        lo, hi = self.water_hu
        if not lo < hi:
            raise PetctlError(f"urine veto: the water range must run low to high (got {self.water_hu})")
        if self.smooth_mm < 0 or self.open_mm < 0 or self.min_ml < 0:
            raise PetctlError("urine veto: smoothing, opening and minimum volume must be ≥ 0")
        if not 0.0 < self.fraction <= 1.0:
            raise PetctlError(f"urine veto: fraction must be within (0, 1] (got {self.fraction})")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "water_hu": list(self.water_hu)}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> "UrineVeto | None":
        if not d:
            return None
        return cls(water_hu=(float(d["water_hu"][0]), float(d["water_hu"][1])), smooth_mm=float(d["smooth_mm"]),
                   open_mm=float(d["open_mm"]), min_ml=float(d["min_ml"]), fraction=float(d["fraction"]),
                   median=bool(d.get("median", False)),  # recorded before the median: none
                   whole_voxel_ball=bool(d.get("whole_voxel_ball", False)))  # recorded since it: before, the default ball


def _ball(radius_mm: float, spacing: Sequence[float], whole_voxel: bool = False) -> np.ndarray:
    """A boolean ellipsoid of `radius_mm` on a grid of `spacing`. `whole_voxel`: an axis coarser than
    the radius gets a semi-axis of one voxel (the neighbours either side); without it such an axis
    keeps only the centre voxel (the ball of calibrations before `UrineVeto.whole_voxel_ball`)."""
    radii = [max(1, int(round(radius_mm / s))) for s in spacing]
    reach = [max(radius_mm, s) if whole_voxel else radius_mm for s in spacing]
    axes = np.meshgrid(*[np.arange(-r, r + 1) * s / q for r, s, q in zip(radii, spacing, reach)], indexing="ij")
    return sum(a**2 for a in axes) <= 1.0


def median3(volume: np.ndarray) -> np.ndarray:
    """A 3-voxel median along each axis in turn (the edge voxels keep their value, as scipy's
    `median_filter` with its reflecting border gives): median(a, b, c) = max(min(a, b), min(max(a, b), c))."""
    out = np.array(volume, copy=True)
    for axis in range(out.ndim):
        v = np.moveaxis(out, axis, 0)
        lo, mid, hi = v[:-2], v[1:-1], v[2:]  # the right side is evaluated whole before it is stored
        v[1:-1] = np.maximum(np.minimum(lo, mid), np.minimum(np.maximum(lo, mid), hi))
    return out


def water_region(ct_hu: np.ndarray, spacing: Sequence[float], veto: UrineVeto = UrineVeto()) -> np.ndarray:
    """Boolean mask of the large connected water-density regions of a CT (HU) on a grid of `spacing` mm."""
    spacing = [float(s) for s in spacing]
    ct = np.asarray(ct_hu, np.float32)
    if veto.median:
        ct = median3(ct)
    if veto.smooth_mm > 0:
        ct = ndimage.gaussian_filter(ct, [veto.smooth_mm / s for s in spacing])
    region = (ct >= veto.water_hu[0]) & (ct <= veto.water_hu[1])
    if veto.open_mm > 0 and region.any():
        region = ndimage.binary_opening(region, _ball(veto.open_mm, spacing, veto.whole_voxel_ball))
    labels, n = ndimage.label(region)
    if n == 0:
        return region
    volume_ml = np.bincount(labels.ravel(), minlength=n + 1) * float(np.prod(spacing)) / 1000.0
    keep = volume_ml >= veto.min_ml
    keep[0] = False
    return keep[labels]


def drop_urine_components(mask: np.ndarray, region: np.ndarray, fraction: float = FRACTION) -> np.ndarray:
    """`mask` (boolean) without its 26-connected components of which ≥ `fraction` lies in `region`."""
    import cc3d

    mask = np.asarray(mask, bool)
    if mask.shape != region.shape:
        raise ValueError(f"mask {mask.shape} and urine region {region.shape} differ in shape")
    if not mask.any() or not region.any():
        return mask
    # every component lies inside the mask's bounding box: label that box, not the whole volume
    # (calibrate runs this per threshold on each input-grid scan)
    box = tuple(slice(int(np.flatnonzero(a)[0]), int(np.flatnonzero(a)[-1]) + 1)
                for a in (mask.any(axis=tuple(j for j in range(mask.ndim) if j != i)) for i in range(mask.ndim)))
    sub = mask[box]
    components = cc3d.connected_components(np.ascontiguousarray(sub).view(np.uint8), connectivity=26)
    n = int(components.max())
    size = np.bincount(components.ravel(), minlength=n + 1)
    in_urine = np.bincount(components.ravel(), weights=np.asarray(region[box], float).ravel(), minlength=n + 1)
    drop = in_urine >= fraction * np.maximum(size, 1)
    drop[0] = False
    out = mask.copy()
    out[box] = sub & ~drop[components]
    return out


def veto_mask(mask: np.ndarray, ct_hu: np.ndarray, spacing: Sequence[float], veto: UrineVeto) -> np.ndarray:
    """`mask` after the veto (the CT region is only computed when the mask has a voxel)."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        return mask
    return drop_urine_components(mask, water_region(ct_hu, spacing, veto), veto.fraction)

"""Voxel geometry of a case: canonical orientation, foreground crop, resampling, and the way back.

`plan_geometry` records everything needed to map a stored (prepared) volume back onto the input's
own grid exactly: the original shape and affine, the axis permutation/flips to canonical RAS order,
the crop box, and the stored shape and spacing. `to_stored` and `to_original` apply it forwards and
backwards; with the target spacing equal to the native spacing the round trip is exact.

Resampling uses the half-voxel ("extents aligned") convention: n input voxels of spacing s map to
m = round(n·s/t) output voxels whose effective spacing n·s/m covers the same physical extent —
the convention of torch's `interpolate(align_corners=False)`, used here because it is fast and
multi-threaded. Images are trilinear; labels are interpolated as floats and thresholded at 0.5.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from petctl.errors import PetctlError


@dataclass(frozen=True)
class CaseGeometry:
    """How a stored case relates to the file it came from."""

    original_shape: tuple[int, int, int]
    original_affine: tuple[tuple[float, ...], ...]
    orientation: tuple[tuple[int, int], ...]
    """nibabel orientation: for each original axis, (canonical axis, +1 or -1)."""
    canonical_shape: tuple[int, int, int]
    crop_lo: tuple[int, int, int]
    crop_hi: tuple[int, int, int]
    stored_shape: tuple[int, int, int]
    stored_spacing: tuple[float, float, float]
    stored_affine: tuple[tuple[float, ...], ...]

    @property
    def crop_shape(self) -> tuple[int, int, int]:
        return tuple(h - l for l, h in zip(self.crop_lo, self.crop_hi))  # type: ignore[return-value]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "CaseGeometry":
        return cls(
            original_shape=tuple(d["original_shape"]),
            original_affine=tuple(tuple(r) for r in d["original_affine"]),
            orientation=tuple(tuple(int(v) for v in r) for r in d["orientation"]),
            canonical_shape=tuple(d["canonical_shape"]),
            crop_lo=tuple(d["crop_lo"]),
            crop_hi=tuple(d["crop_hi"]),
            stored_shape=tuple(d["stored_shape"]),
            stored_spacing=tuple(d["stored_spacing"]),
            stored_affine=tuple(tuple(r) for r in d["stored_affine"]),
        )


def _ornt(affine: np.ndarray) -> np.ndarray:
    import nibabel as nib

    return nib.orientations.io_orientation(affine)


def to_canonical(volume: np.ndarray, affine: np.ndarray, *, contiguous: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip voxel axes to the closest RAS order (exact: no interpolation).

    `contiguous=False` returns a strided view instead of a copy (a whole-body volume is gigabytes).
    """
    import nibabel as nib

    ornt = _ornt(affine)
    data = nib.orientations.apply_orientation(volume, ornt)
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, volume.shape)
    return (np.ascontiguousarray(data) if contiguous else data), new_affine


def from_canonical(volume: np.ndarray, geometry: CaseGeometry) -> np.ndarray:
    """Undo `to_canonical`: back to the original file's voxel order."""
    import nibabel as nib

    ornt = np.array(geometry.orientation, dtype=float)
    back = nib.orientations.ornt_transform(np.c_[np.arange(3), np.ones(3)], ornt)
    return np.ascontiguousarray(nib.orientations.apply_orientation(volume, back))


def foreground_box(mask: np.ndarray, margin: int = 2) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Bounding box [lo, hi) of a mask, widened by `margin` voxels; the whole volume if empty."""
    if not mask.any():
        return (0, 0, 0), tuple(int(s) for s in mask.shape)  # type: ignore[return-value]
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        lo.append(max(0, int(idx[0]) - margin))
        hi.append(min(mask.shape[axis], int(idx[-1]) + 1 + margin))
    return tuple(lo), tuple(hi)  # type: ignore[return-value]


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(v) for v in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0)))  # type: ignore[return-value]


def plan_geometry(
    original_shape: Sequence[int],
    original_affine: np.ndarray,
    canonical_mask: np.ndarray,
    target_spacing: Sequence[float],
    margin: int = 2,
) -> CaseGeometry:
    """Decide crop and stored grid from the canonical foreground mask."""
    import nibabel as nib

    ornt = _ornt(original_affine)
    canon_affine = original_affine @ nib.orientations.inv_ornt_aff(ornt, tuple(original_shape))
    lo, hi = foreground_box(canonical_mask, margin)
    n = np.array(hi) - np.array(lo)
    spacing = np.array(spacing_of(canon_affine))
    m = np.maximum(1, np.round(n * spacing / np.asarray(target_spacing, float))).astype(int)
    scale = n / m
    step = np.diag(np.r_[scale, 1.0])
    step[:3, 3] = np.array(lo) + 0.5 * scale - 0.5
    stored_affine = canon_affine @ step
    return CaseGeometry(
        original_shape=tuple(int(s) for s in original_shape),  # type: ignore[arg-type]
        original_affine=tuple(tuple(float(v) for v in r) for r in original_affine),
        orientation=tuple((int(a), int(f)) for a, f in ornt),
        canonical_shape=tuple(int(s) for s in canonical_mask.shape),  # type: ignore[arg-type]
        crop_lo=tuple(int(v) for v in lo),  # type: ignore[arg-type]
        crop_hi=tuple(int(v) for v in hi),  # type: ignore[arg-type]
        stored_shape=tuple(int(v) for v in m),  # type: ignore[arg-type]
        stored_spacing=tuple(float(v) for v in n * spacing / m),  # type: ignore[arg-type]
        stored_affine=tuple(tuple(float(v) for v in r) for r in stored_affine),
    )


RESAMPLE_MODES = ("linear", "nearest")
"""How `to_original` maps probabilities to the input grid: trilinear, or nearest-exact (every input
voxel takes the stored voxel it lies in, so a peak keeps its value)."""


def check_resample(mode: str, source: str | None = None) -> None:
    """One line when `mode` is not in RESAMPLE_MODES, led by `source` (the option or file it came from)."""
    if mode not in RESAMPLE_MODES:
        where = f"{source}: " if source else ""
        raise PetctlError(f"{where}probability resampling must be one of {', '.join(RESAMPLE_MODES)} (got {mode!r})")


def resize(volume_cxyz: np.ndarray, shape: Sequence[int], mode: str = "linear") -> np.ndarray:
    """Trilinear (half-voxel convention) resize of a channel-first float volume; `mode="nearest"`:
    nearest-exact (the same half-voxel convention, each output voxel the input voxel it lies in)."""
    import torch
    import torch.nn.functional as F

    check_resample(mode)
    shape = tuple(int(s) for s in shape)
    if tuple(volume_cxyz.shape[1:]) == shape:
        return np.asarray(volume_cxyz, dtype=np.float32)
    x = torch.from_numpy(np.ascontiguousarray(volume_cxyz, dtype=np.float32))[None]
    with torch.no_grad():
        if mode == "nearest":
            y = F.interpolate(x, size=shape, mode="nearest-exact")
        else:
            y = F.interpolate(x, size=shape, mode="trilinear", align_corners=False)
    return y[0].numpy()


def to_stored(canonical_cxyz: np.ndarray, geometry: CaseGeometry) -> np.ndarray:
    """Crop and resample canonical channel-first volumes onto the stored grid."""
    lo, hi = geometry.crop_lo, geometry.crop_hi
    cropped = canonical_cxyz[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    return resize(cropped, geometry.stored_shape)


def label_to_stored(canonical_label: np.ndarray, geometry: CaseGeometry) -> np.ndarray:
    return (to_stored(canonical_label[None].astype(np.float32), geometry)[0] >= 0.5).astype(np.uint8)


def to_original(stored_xyz: np.ndarray, geometry: CaseGeometry, fill: float = 0.0, mode: str = "linear") -> np.ndarray:
    """Map a stored-grid float volume (e.g. probabilities) back onto the original file's grid
    (`mode`: trilinear, or nearest-exact, which keeps each stored voxel's value; `RESAMPLE_MODES`)."""
    crop = resize(np.asarray(stored_xyz, np.float32)[None], geometry.crop_shape, mode)[0]
    canonical = np.full(geometry.canonical_shape, fill, dtype=np.float32)
    lo, hi = geometry.crop_lo, geometry.crop_hi
    canonical[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = crop
    return from_canonical(canonical, geometry)

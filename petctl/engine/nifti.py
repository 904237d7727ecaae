"""Load and validate one case's NIfTI files; every problem becomes a `CaseError` naming the case.

Checks: files present and readable (truncated gzip, empty or non-NIfTI files), 3-D (a trailing
singleton 4th axis is squeezed, true 4-D refused), finite voxels, an affine that is invertible,
a label on exactly the PET grid holding only 0/1 (float 0.0/1.0 accepted), and CT/PET fields of
view that overlap enough to resample the CT onto the PET grid. The size is estimated from the
header before any voxel is read, so a volume too large for memory is refused up front.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from petctl.engine.cohort import CaseSource
from petctl.errors import CaseError

MAX_VOXELS = 1024**3 // 2
"""Refuse volumes above this many voxels (a 512×512×2048 volume) before reading them."""


@dataclass(frozen=True)
class LoadedCase:
    """One case on the PET grid, in the file's own voxel order (not yet reoriented)."""

    case: str
    ct: np.ndarray  # float32, HU, on the PET grid
    pet: np.ndarray  # float32, SUV
    label: np.ndarray | None  # uint8 0/1, on the PET grid
    affine: np.ndarray  # 4×4, the PET's voxel → world (RAS mm)
    ct_resampled: bool


def _load(case: str, role: str, path: Path | None, max_voxels: int, warn: bool = True):
    import nibabel as nib

    if path is None or not Path(path).exists():
        raise CaseError(case, f"missing {role} file ({path})")
    if Path(path).stat().st_size == 0:
        raise CaseError(case, f"{role} file is empty ({Path(path).name})")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for non-NIfTI input
        raise CaseError(case, f"{role} is not a readable NIfTI file ({Path(path).name}: {_short(exc)})") from None
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise CaseError(case, f"{role} must be a 3-D volume, got shape {tuple(img.shape)}")
    if int(np.prod(shape)) > max_voxels:
        raise CaseError(case, f"{role} has {int(np.prod(shape)):,} voxels, above the limit of {max_voxels:,}")
    try:
        data = np.asanyarray(img.dataobj).reshape(shape)
    except Exception as exc:
        raise CaseError(case, f"{role} voxel data cannot be read ({Path(path).name}: {_short(exc)})") from None
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise CaseError(case, f"{role} has a degenerate affine")
    qcode, scode = int(img.header["qform_code"]), int(img.header["sform_code"])
    if warn and qcode > 0 and scode > 0 and not np.allclose(img.get_qform(), img.get_sform(), atol=1e-3):
        # nibabel prefers the sform; say which one was used rather than guess silently
        import logging

        logging.getLogger(__name__).warning("%s: %s qform and sform differ; using the sform", case, role)
    return data, affine


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def load_case(src: CaseSource, *, need_label: bool = True, max_voxels: int = MAX_VOXELS, warn: bool = True) -> LoadedCase:
    """Read and validate a case; CT is resampled (trilinear) onto the PET grid when grids differ.
    `need_label=False`: the label is not read at all (predict: a ground truth beside the images is
    none of its business). `warn=False`: no warning for what an earlier read of the same case has
    reported already."""
    pet, pet_affine = _load(src.case, "PET", src.pet, max_voxels, warn)
    ct, ct_affine = _load(src.case, "CT", src.ct, max_voxels, warn)
    pet = np.asarray(pet, dtype=np.float32)
    ct = np.asarray(ct, dtype=np.float32)
    for role, arr in (("PET", pet), ("CT", ct)):
        if not np.all(np.isfinite(arr)):
            raise CaseError(src.case, f"{role} has {int((~np.isfinite(arr)).sum())} NaN/inf voxels")
    resampled = False
    if ct.shape != pet.shape or not np.allclose(ct_affine, pet_affine, atol=1e-3):
        ct = resample_onto(src.case, ct, ct_affine, pet.shape, pet_affine)
        resampled = True
    check_suv(src.case, pet, ct)
    label = None
    if need_label and src.label is not None and Path(src.label).exists():
        lab, lab_affine = _load(src.case, "label", src.label, max_voxels, warn)
        if lab.shape != pet.shape:
            raise CaseError(src.case, f"label grid {lab.shape} differs from the PET grid {pet.shape}")
        if not np.allclose(lab_affine, pet_affine, atol=1e-3):
            raise CaseError(src.case, "label affine differs from the PET affine")
        label = as_binary_label(src.case, lab)
    elif need_label:
        raise CaseError(src.case, f"missing label file ({src.label})")
    return LoadedCase(src.case, ct, pet, label, pet_affine, resampled)


BODY_SUV_MEDIAN_MAX = 50.0
"""The body's median PET above which a scan is taken for activity (Bq/mL), not SUV: soft tissue sits
at SUV ~0.3-3, while in Bq/mL it is in the thousands."""


def check_suv(case: str, pet: np.ndarray, ct: np.ndarray) -> None:
    """CaseError when the PET is not in SUV (the AutoPET folder's PET.nii.gz, not its SUV.nii.gz):
    everything downstream (the fingerprint's bins, the clip, the extent's SUV isocontour) assumes SUV."""
    step = max(1, round((pet.size / 2_000_000) ** (1 / 3)))  # a strided sample (views): ~2 M voxels are plenty for a median
    every = (slice(None, None, step),) * 3
    body = pet[every][ct[every] > -500.0]
    if body.size == 0:
        return
    median = float(np.median(body))
    if median > BODY_SUV_MEDIAN_MAX:
        raise CaseError(case, f"PET does not look like SUV (the body's median is {median:.4g}; soft tissue is ~0.3-3 SUV): "
                              "convert activity (Bq/mL) to SUV first")


def as_binary_label(case: str, lab: np.ndarray) -> np.ndarray:
    """0/1 labels (any numeric dtype; 0.0/1.0 floats accepted) as uint8, else a CaseError."""
    values = np.unique(lab)
    bad = values[(values != 0) & (values != 1)]
    if bad.size:
        shown = ", ".join(f"{v:g}" for v in bad[:5])
        raise CaseError(case, f"label holds values other than 0/1 ({shown})")
    return (lab == 1).astype(np.uint8)


def resample_onto(case: str, data: np.ndarray, affine: np.ndarray, shape: tuple[int, ...], target_affine: np.ndarray) -> np.ndarray:
    """Trilinear resampling of `data` onto another grid, -1024 (air) outside; refuses poor overlap."""
    vox2vox = np.linalg.inv(affine) @ target_affine
    corners = np.array([[i, j, k, 1] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)], float)
    src = (vox2vox @ corners.T).T[:, :3]
    lo, hi = src.min(0), src.max(0)
    inside = np.clip(np.minimum(hi, np.array(data.shape) - 1) - np.maximum(lo, 0), 0, None)
    frac = float(np.prod(inside / np.maximum(hi - lo, 1e-6)))
    if frac < 0.5:
        raise CaseError(case, f"CT and PET fields of view overlap only {frac:.0%}; cannot match their grids")
    return _affine_resample(data, vox2vox, tuple(int(v) for v in shape), fill=-1024.0)


def _affine_resample(data: np.ndarray, vox2vox: np.ndarray, shape: tuple[int, int, int], fill: float) -> np.ndarray:
    """Trilinear sampling of `data` at vox2vox @ (i, j, k) for every output voxel (torch grid_sample).

    grid_sample works in normalized coordinates with the axes reversed ((D, H, W) → (x, y, z));
    with align_corners=True, index i of an axis of n voxels sits at 2i/(n-1) - 1.
    """
    import torch
    import torch.nn.functional as F

    def normalize(n: tuple[int, ...]) -> np.ndarray:
        # voxel index (a0, a1, a2, 1) → normalized (x=a2, y=a1, z=a0, 1)
        m = np.zeros((4, 4))
        for out_axis, in_axis in enumerate((2, 1, 0)):
            size = max(n[in_axis] - 1, 1)
            m[out_axis, in_axis] = 2.0 / size
            m[out_axis, 3] = -1.0
        m[3, 3] = 1.0
        return m

    theta = normalize(data.shape) @ vox2vox @ np.linalg.inv(normalize(shape))
    src = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32) - fill)[None, None]  # zeros outside → fill
    with torch.no_grad():
        grid = F.affine_grid(torch.from_numpy(theta[:3]).float()[None], [1, 1, *shape], align_corners=True)
        out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0, 0].numpy() + np.float32(fill)

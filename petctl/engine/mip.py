"""Maximum-intensity projections (MIPs) of canonical volumes, the input of the lesion classifier.

Volumes are in the store's canonical RAS voxel order (X, Y, Z): x runs from the patient's left to
right, y from posterior to anterior, z from feet to head. Each MIP comes out as an image a person
reads the usual way (row 0 at the top), with no flip of the column axis:

- "y" (coronal, looking along y):   shape (Z, X), img[r, c] = max_y vol[c, y, Z-1-r]  (head at the top)
- "x" (sagittal, looking along x):  shape (Z, Y), img[r, c] = max_x vol[x, c, Z-1-r]  (head at the top)
- "z" (axial, looking along z):     shape (Y, X), img[r, c] = max_z vol[c, Y-1-r, z]  (anterior at the top)

Functions are pure and take numpy arrays or torch tensors (on any device) and return the same kind.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

Array = TypeVar("Array", np.ndarray, torch.Tensor)

AXES = ("x", "y", "z")
_PROJECTED_DIM = {"x": -3, "y": -2, "z": -1}


def projection_views(spec: str) -> tuple[str, ...]:
    """The axes of a classifier's projection spec: "x", "y", "z", or several of them ("xy"), which
    one model learns and scores together (each scan's views averaged). ValueError otherwise."""
    views = tuple(str(spec))
    if not views or any(v not in AXES for v in views) or len(set(views)) != len(views):
        raise ValueError(f"a projection is one or more distinct axes of x, y, z, such as y or xy (got {spec!r})")
    return views


def check_projections(specs: "tuple[str, ...] | list[str]") -> None:
    """ValueError unless `specs` is at least one projection spec (`projection_views`), all distinct."""
    for spec in specs:
        projection_views(spec)
    if not specs or len(set(specs)) != len(specs):
        raise ValueError(f"projections must be distinct, and at least one (got {','.join(specs) or 'none'})")


def _project(volumes: Array, axis: str) -> Array:
    """MIP over the last three dims (..., X, Y, Z) → (..., rows, cols) in the module's layout."""
    if axis not in _PROJECTED_DIM:
        raise ValueError(f"MIP axis must be one of {', '.join(AXES)} (got {axis!r})")
    xp = torch if isinstance(volumes, torch.Tensor) else np
    projected = xp.amax(volumes, _PROJECTED_DIM[axis])  # (..., a, b) with a before b in (X, Y, Z)
    image = xp.swapaxes(projected, -1, -2)  # rows: the later axis (z, or y for axial)
    return xp.flip(image, (-2,))  # its high end (head / anterior) at row 0


def mip(volume_xyz: Array, axis: str) -> Array:
    """The 2-D MIP of one (X, Y, Z) volume along `axis`; layout in the module docstring."""
    if volume_xyz.ndim != 3:
        raise ValueError(f"mip needs an (X, Y, Z) volume (got shape {tuple(volume_xyz.shape)})")
    image = _project(volume_xyz, axis)
    return np.ascontiguousarray(image) if isinstance(image, np.ndarray) else image.contiguous()


def mip_batch(volumes_bxyz: torch.Tensor, axis: str) -> torch.Tensor:
    """MIPs of a batch (B, X, Y, Z) as (B, 1, H, W), each equal to `mip` of its volume."""
    if volumes_bxyz.ndim != 4:
        raise ValueError(f"mip_batch needs (B, X, Y, Z) volumes (got shape {tuple(volumes_bxyz.shape)})")
    return _project(volumes_bxyz, axis).unsqueeze(1).contiguous()


def resize_mip(img_b1hw: torch.Tensor, size: tuple[int, int] = (352, 224), shrink: str = "max") -> torch.Tensor:
    """Resize (B, 1, H, W) MIPs to the classifier's (H, W) size.

    `shrink="max"`: along an axis that shrinks, each output pixel first takes the maximum of the
    pixels it covers (a MIP of the MIP: bilinear sampling alone would skip a one-slice hot spot or
    lesion between its samples, or keep a fraction of it); then bilinear (align_corners=False) to the
    exact size. `shrink="bilinear"`: bilinear alone (`TrainConfig.cls_mip_shrink` of classifiers
    trained before the maximum). An enlarged axis is plain bilinear either way. Integer inputs are
    converted to float32; float inputs keep their dtype.
    """
    if img_b1hw.ndim != 4:
        raise ValueError(f"resize_mip needs (B, 1, H, W) images (got shape {tuple(img_b1hw.shape)})")
    if not img_b1hw.is_floating_point():
        img_b1hw = img_b1hw.float()
    if tuple(img_b1hw.shape[-2:]) == tuple(size):
        return img_b1hw
    if shrink not in ("max", "bilinear"):
        raise ValueError(f"resize_mip: shrink must be max or bilinear (got {shrink!r})")
    pooled = tuple(min(have, want) for have, want in zip(img_b1hw.shape[-2:], size))
    if shrink == "max" and pooled != tuple(img_b1hw.shape[-2:]):
        img_b1hw = F.adaptive_max_pool2d(img_b1hw, pooled)
        if pooled == tuple(size):
            return img_b1hw
    return F.interpolate(img_b1hw, size=tuple(size), mode="bilinear", align_corners=False)

"""Position channels: where in the body a voxel lies, as three extra inputs of the segmentation net.

A 32³ patch at 4×4×6 mm sees 13 cm of the body and nothing of where that is, and the CPU nets took
bright physiology (kidneys, bowel, the bladder rim) for lesions. With `TrainConfig.position_channels`
the net also gets, per voxel, its position in the stored volume — which prepare cropped to the body
(the CT foreground), in canonical orientation — scaled per axis so the volume's outer faces are ±1 (the first
and last voxel centres lie half a voxel inside, at ∓(1 − 1/n))
(x: left → right, y: posterior → anterior, z: feet → head; outside the volume the ramp runs on past
±1). Training appends them to each patch after augmentation, from where the patch was read, so a
flipped or rotated patch still says where it came from; inference appends them to the whole volume
(and, unflipped, to each flipped copy for TTA).
"""

from __future__ import annotations

from typing import Sequence

import torch

from petctl.engine.config import POSITION_CHANNELS

__all__ = ["POSITION_CHANNELS", "batch_positions", "pad_to_patch", "position_grid", "unpad", "with_positions"]


def position_grid(volume_shape: Sequence[int], start: Sequence[int] = (0, 0, 0), size: Sequence[int] | None = None) -> torch.Tensor:
    """(3, *size) float32: the positions of the box [start, start + size) of a volume of `volume_shape`."""
    size = tuple(volume_shape) if size is None else tuple(size)
    if len(volume_shape) != 3 or len(start) != 3 or len(size) != 3 or min(int(n) for n in volume_shape) < 1:
        raise ValueError(f"position_grid needs three positive sizes (got volume {tuple(volume_shape)}, box {tuple(start)}+{size})")
    axes = [(2.0 * (torch.arange(int(s0), int(s0) + int(n), dtype=torch.float32) + 0.5) / float(total) - 1.0)
            for s0, n, total in zip(start, size, volume_shape)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def batch_positions(volume_shapes: torch.Tensor, starts: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, 3, *size): `position_grid` of each patch of a batch (`volume_shapes`, `starts`: (B, 3) integers)."""
    return torch.stack([position_grid(tuple(int(v) for v in shape), tuple(int(v) for v in start), size)
                        for shape, start in zip(volume_shapes, starts)])


def with_positions(image_cxyz: torch.Tensor) -> torch.Tensor:
    """A whole stored volume (C, X, Y, Z) with its three position channels appended."""
    return torch.cat([image_cxyz, position_grid(image_cxyz.shape[1:]).to(image_cxyz.device, image_cxyz.dtype)], 0)


def pad_to_patch(x_bcxyz: torch.Tensor, patch_size: Sequence[int]) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Zero-pad a (B, C, X, Y, Z) volume to at least `patch_size` along each axis, split as MONAI's
    sliding window splits it (the odd voxel after); returns the padded volume and the padding before
    each axis. Sliding-window inference pads a thin volume itself, but with zeros in every channel,
    where training's patches (read past the volume's edge: zeros in the image) have position ramps
    running on past ±1: padding here first lets `position_grid(shape, -before, padded)` give them."""
    shape = tuple(int(n) for n in x_bcxyz.shape[2:])
    extra = [max(int(p) - n, 0) for n, p in zip(shape, patch_size)]
    before = tuple(e // 2 for e in extra)
    if not any(extra):
        return x_bcxyz, (0, 0, 0)
    pad: list[int] = []
    for b, e in reversed(list(zip(before, extra))):  # F.pad lists the last axis first
        pad += [b, e - b]
    return torch.nn.functional.pad(x_bcxyz, pad), before  # type: ignore[return-value]


def unpad(t: torch.Tensor, before: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """The (..., X, Y, Z) box of `shape` at offset `before`: what `pad_to_patch` padded, cut back."""
    return t[..., before[0]:before[0] + shape[0], before[1]:before[1] + shape[1], before[2]:before[2] + shape[2]]

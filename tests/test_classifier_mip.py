"""The classifier's MIP input: 3-D augmentation before projecting must not invent bright borders."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from petctl.engine.classifier import lesion_map_target, pet_mip
from petctl.engine.sampling import AugmentConfig


class _Store:
    def __init__(self, volume: np.ndarray, label: np.ndarray | None = None) -> None:
        self.volume, self.label = volume, label

    def load(self, case: str):
        return SimpleNamespace(image=SimpleNamespace(read_all=lambda: self.volume), label=SimpleNamespace(read_all=lambda: self.label))


def test_rotated_corners_stay_at_the_floor_not_zero():
    # z-normalized PET: the clipped body background sits below 0, a hot blob in the middle
    pet = np.full((40, 30, 60), -1.5, np.float32)
    pet[15:25, 10:20, 25:35] = 2.0
    volume = np.stack([np.zeros_like(pet), pet])
    aug = AugmentConfig(p_affine=1.0, max_rotation_deg=30.0, zoom_range=(0.8, 0.8), p_intensity=0.0, flip_axes=(0,))
    for seed in range(5):
        image = pet_mip(_Store(volume), "c", "y", (64, 48), torch.device("cpu"), aug, torch.Generator().manual_seed(seed))
        assert float(image.min()) >= -1.5 - 1e-5
        # zoomed out and rotated: the borders are padding, and padding looks like background
        border = torch.cat([image[0, 0], image[0, -1], image[0, :, 0], image[0, :, -1]])
        assert torch.allclose(border, torch.full_like(border, -1.5), atol=1e-4), seed
        assert float(image.max()) > 1.0  # the blob is still there


def test_the_label_mip_moves_with_the_pet_and_marks_the_lesion_cells():
    # a hot lesion off-centre; whatever the flip/rotation, the projected mask sits on the bright spot
    pet = np.full((40, 30, 60), -1.5, np.float32)
    label = np.zeros(pet.shape, np.uint8)
    pet[4:10, 10:16, 40:48] = 2.0
    label[4:10, 10:16, 40:48] = 1
    volume = np.stack([np.zeros_like(pet), pet])
    aug = AugmentConfig(p_affine=1.0, max_rotation_deg=20.0, zoom_range=(0.9, 1.1), p_intensity=0.0, p_flip=0.5, flip_axes=(0,))
    seen_sides = set()
    for seed in range(6):
        image, mask = pet_mip(_Store(volume, label), "c", "y", (64, 48), torch.device("cpu"), aug,
                              torch.Generator().manual_seed(seed), with_label=True)
        assert mask.shape == image.shape == (1, 64, 48)
        inside = mask[0] >= 0.5
        assert inside.sum() > 4
        assert float(image[0][inside].mean()) > 1.0 > float(image[0][~inside].mean())
        seen_sides.add(bool(inside.nonzero()[:, 1].float().mean() > 24))
        target = lesion_map_target(mask[None], (8, 6))
        assert target.shape == (1, 1, 8, 6) and 1 <= int(target.sum()) <= 6  # a 7×9 px spot spans at most 2×3 cells of 8×8
    assert seen_sides == {True, False}  # the flip moved lesion and mask together, to both sides
    empty = lesion_map_target(torch.zeros(2, 1, 64, 48), (8, 6))
    assert empty.shape == (2, 1, 8, 6) and not empty.any()

"""The classifier's MIP input: 3-D augmentation before projecting must not invent bright borders."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from petctl.engine.classifier import pet_mip
from petctl.engine.sampling import AugmentConfig


class _Store:
    def __init__(self, volume: np.ndarray) -> None:
        self.volume = volume

    def load(self, case: str):
        return SimpleNamespace(image=SimpleNamespace(read_all=lambda: self.volume))


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

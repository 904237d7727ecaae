"""Position channels: the ramps themselves, the patches' positions, and inference appending them unflipped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from petctl.engine.config import cpu_tiny, preset
from petctl.engine.ensemble import LoadedModel, RunModels
from petctl.engine.position import POSITION_CHANNELS, batch_positions, position_grid, with_positions
from petctl.engine.sampling import SegPatchDataset
from petctl.engine.trainer import predict_volume
from petctl.errors import PetctlError


@pytest.mark.parametrize("shape", [(1, 1, 1), (4, 5, 6), (7, 2, 3)])
def test_grid_runs_over_voxel_centres_from_minus_to_plus_one(shape):
    grid = position_grid(shape)
    assert grid.dtype == torch.float32 and tuple(grid.shape) == (POSITION_CHANNELS, *shape)
    for axis, n in enumerate(shape):
        ramp = grid[axis].movedim(axis, 0).reshape(n, -1)
        assert torch.allclose(ramp, ramp[:, :1].expand_as(ramp))  # constant across the other two axes
        assert torch.allclose(ramp[:, 0], torch.linspace(-1 + 1 / n, 1 - 1 / n, n), atol=1e-6)
        assert torch.allclose(ramp[:, 0], -ramp[:, 0].flip(0), atol=1e-6)  # symmetric about the centre


def test_a_box_is_its_slice_of_the_volume_and_runs_on_outside():
    full = position_grid((10, 8, 6))
    assert torch.equal(position_grid((10, 8, 6), (2, 3, 1), (4, 4, 4)), full[:, 2:6, 3:7, 1:5])
    outside = position_grid((10, 8, 6), (-2, 6, 0), (4, 4, 6))
    assert outside[0, 0, 0, 0] < -1 and outside[1, 0, -1, 0] > 1
    assert torch.allclose(outside[0, 2:, 0, 0], full[0, :2, 0, 0])


def test_batch_positions_follow_each_patch():
    shapes = torch.tensor([[10, 8, 6], [20, 20, 20]])
    starts = torch.tensor([[0, 0, 0], [5, -3, 16]])
    got = batch_positions(shapes, starts, (4, 4, 4))
    assert tuple(got.shape) == (2, 3, 4, 4, 4)
    assert torch.equal(got[1], position_grid((20, 20, 20), (5, -3, 16), (4, 4, 4)))
    assert not torch.equal(got[0], got[1])


@pytest.mark.parametrize("name, image_channels, expected", [("cpu-small", 2, 5), ("cpu-tiny", 3, 6), ("autopet-paper", 2, 2)])
def test_the_recorded_inputs_count_the_position_channels(name, image_channels, expected):
    assert preset(name).with_image_channels(image_channels).in_channels == expected


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="three positive sizes"):
        position_grid((4, 0, 4))
    with pytest.raises(ValueError, match="three positive sizes"):
        position_grid((4, 4))


def test_patches_carry_where_they_were_read(store: Path):
    cases = sorted(json.loads((store / "manifest.json").read_text())["cases"])[:2]
    ds = SegPatchDataset(str(store), cases, (16, 16, 16), patches_per_scan=3)
    from petctl.engine.store import CaseStore

    case_store = CaseStore(str(store))
    for item in ds:
        stored = case_store.load(item["case"])
        assert tuple(item["shape"].tolist()) == tuple(stored.shape)
        image, _ = case_store.read_patch(item["case"], tuple(item["start"].tolist()), (16, 16, 16))
        assert np.array_equal(image, item["image"].numpy())  # start is the box the patch came from


class _EchoX(torch.nn.Module):
    """A 'net' whose logit is its input's x-position channel (the first one after the image's two)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 2:3] * 4.0


def _models(tmp_path: Path) -> RunModels:
    """One echo 'fold' with position channels over a two-channel image."""
    from dataclasses import replace

    cfg = replace(cpu_tiny(), position_channels=True, patch_size=(16, 16, 16), sw_overlap=0.5).with_image_channels(2)
    return RunModels(run_dir=tmp_path, seg=[LoadedModel("fold0", 0, cfg, _EchoX())])


def test_inference_appends_positions_unflipped_under_tta(tmp_path: Path):
    models = _models(tmp_path)
    image = torch.zeros(2, 24, 20, 18)
    ramp = torch.sigmoid(4.0 * position_grid((24, 20, 18))[0]).numpy()
    plain = models.seg_probs(image)
    np.testing.assert_allclose(plain, ramp, atol=1e-5)
    np.testing.assert_allclose(predict_volume(models.seg[0].model, image, models.seg[0].cfg, torch.device("cpu")), plain, atol=1e-6)
    # the x flip sees the true positions, so un-flipping its output mirrors the ramp: (3 σ(p) + σ(−p)) / 4
    np.testing.assert_allclose(models.seg_probs(image, tta=True), (3 * ramp + ramp[::-1]) / 4, atol=1e-5)


def test_a_volume_thinner_than_the_patch_gets_the_positions_training_gave_its_margin(tmp_path: Path):
    """A stored volume of 10 voxels in x under 16³ patches: the sliding window pads it, and the net
    must see x-ramps running on past ±1 there (training reads such a box past the edge), not zeros."""
    models = _models(tmp_path)
    image = torch.zeros(2, 10, 20, 7)  # x and z thinner than the patch, y not
    ramp = torch.sigmoid(4.0 * position_grid((10, 20, 7))[0]).numpy()
    for probs in (models.seg_probs(image), predict_volume(models.seg[0].model, image, models.seg[0].cfg, torch.device("cpu"))):
        assert probs.shape == (10, 20, 7)
        np.testing.assert_allclose(probs, ramp, atol=1e-5)  # the volume's own positions, not the padding's
    np.testing.assert_allclose(models.seg_probs(image, tta=True), (3 * ramp + ramp[::-1]) / 4, atol=1e-5)

    class _Seen(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.x = x[:, 2].detach().clone()
            return x[:, :1]

    class _EchoImage(torch.nn.Module):  # the image's first channel: any misplaced crop on any axis shows
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :1]

    image = torch.randn(2, 9, 20, 7)  # x, z thinner than the patch, odd padding on both
    models.seg[0] = LoadedModel("fold0", 0, models.seg[0].cfg, _EchoImage())
    for tta in (False, True):
        np.testing.assert_allclose(models.seg_probs(image, tta=tta), torch.sigmoid(image[0]).numpy(), atol=1e-6)
    image = torch.zeros(2, 10, 20, 7)
    seen = _Seen()
    models.seg[0] = LoadedModel("fold0", 0, models.seg[0].cfg, seen)
    models.seg_probs(image)
    # the window of x: 3 voxels of padding before the 10, 3 after, the ramp unbroken across them
    expected = position_grid((10, 20, 7), (-3, 0, -4), (16, 16, 16))[0]
    assert tuple(seen.x.shape[1:]) == (16, 16, 16)
    assert any(torch.allclose(w, expected) for w in seen.x)


def test_inference_checks_image_channels_without_the_positions(tmp_path: Path):
    models = _models(tmp_path)
    with pytest.raises(PetctlError, match="takes 2 image channels but the image has 5"):
        models.seg_probs(with_positions(torch.zeros(2, 16, 16, 16)))


class _Spy(torch.nn.Module):
    """A 'net' that keeps the batch it was given and answers with its first channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x.detach().clone()
        return x[:, :1]


def test_training_appends_positions_after_augmentation():
    from dataclasses import replace

    from petctl.engine.sampling import AugmentConfig
    from petctl.engine.trainer import SegTask

    task = SegTask.__new__(SegTask)  # the loss step alone: no store, model or loader needed
    task.cfg = replace(cpu_tiny(), position_channels=True, channels_last=False)
    task.augment = AugmentConfig(p_flip=1.0, p_affine=0.0, p_intensity=0.0)  # every sample flipped on every axis
    task.loss_fn = torch.nn.BCEWithLogitsLoss()
    image = torch.arange(2 * 2 * 6 * 5 * 4, dtype=torch.float32).reshape(2, 2, 6, 5, 4)
    batch = {"image": image, "label": torch.zeros(2, 1, 6, 5, 4),
             "shape": torch.tensor([[20, 18, 16], [12, 10, 8]]), "start": torch.tensor([[3, 0, 7], [-2, 4, 1]])}
    spy = _Spy()
    task.loss(spy, batch, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert tuple(spy.seen.shape) == (2, 2 + POSITION_CHANNELS, 6, 5, 4)
    assert torch.equal(spy.seen[:, :2], image.flip(2, 3, 4))  # the image was augmented...
    # ...and the positions were appended afterwards, unflipped: each patch says where it was read
    assert torch.equal(spy.seen[:, 2:], batch_positions(batch["shape"], batch["start"], (6, 5, 4)))


def test_folds_run_side_by_side_on_the_cpu_with_each_folds_own_result(tmp_path: Path):
    """Three small BasicUNet folds on two threads: two at a time, one thread each; each fold's output
    is the one it gives alone, the ensemble is their mean, and the caller's thread count comes back."""
    from petctl.engine.models import build_seg_model

    cfg = cpu_tiny().with_image_channels(2)  # 32³ windows
    seg = []
    for fold in range(3):
        torch.manual_seed(fold)
        net = build_seg_model(cfg.arch, in_channels=cfg.in_channels, features=cfg.features, patch_size=cfg.patch_size).eval()
        seg.append(LoadedModel(f"fold{fold}", fold, cfg, net))
    models = RunModels(run_dir=tmp_path, seg=seg)
    image = torch.randn(2, 40, 36, 34, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        together = models.fold_probs(image)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)  # one fold at a time
        alone = [models.fold_probs(image, models=[m])[0] for m in seg]
    finally:
        torch.set_num_threads(threads)
    assert len(together) == 3 and len({float(p.mean()) for p in together}) == 3  # three different nets
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(models.seg_probs(image), np.mean(together, axis=0), atol=1e-6)

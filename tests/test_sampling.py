"""Patch sampling (centres, sharding, workers) and batched augmentation."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from petctl.engine.sampling import (
    AugmentConfig,
    SegPatchDataset,
    _affine_grid,
    _affine_theta,
    augment_batch,
    dim_lesions,
    epoch_cases,
    make_loader,
    patch_centre,
    patch_start,
)
from petctl.engine.store import CaseStore
from petctl.errors import PetctlError

SHAPE = (40, 30, 50)
LESIONS = np.array([[0, 5, 5, 5], [0, 6, 5, 5], [1, 20, 10, 30]], dtype=np.int32)
BODY = np.array([[10, 10, 10], [11, 12, 13]], dtype=np.int32)
PATCH = (16, 16, 16)


def _draw(lesion_coords, body_coords, p, n=3000, seed=0):
    rng = np.random.default_rng(seed)
    return [(c, component >= 0) for c, component in (patch_centre(SHAPE, lesion_coords, body_coords, p, rng) for _ in range(n))]


# -- patch centres -----------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.0, 1 / 3, 2 / 3, 1.0])
def test_lesion_centred_fraction(p):
    draws = _draw(LESIONS, BODY, p)
    fraction = np.mean([lesion for _, lesion in draws])
    assert abs(fraction - p) <= 0.04
    if p in (0.0, 1.0):
        assert fraction == p
    lesion_rows = {tuple(r) for r in LESIONS[:, 1:].tolist()}
    body_rows = {tuple(r) for r in BODY.tolist()}
    for centre, lesion in draws:
        assert tuple(centre.tolist()) in (lesion_rows if lesion else body_rows)


def test_negative_case_is_never_lesion_centred():
    draws = _draw(np.zeros((0, 4), np.int32), BODY, 1.0, n=500)
    assert not any(lesion for _, lesion in draws)
    assert {tuple(c.tolist()) for c, _ in draws} == {tuple(r) for r in BODY.tolist()}


def test_no_body_samples_falls_back_to_the_whole_volume():
    centres = np.array([c for c, _ in _draw(np.zeros((0, 4), np.int32), np.zeros((0, 3), np.int32), 0.5, n=2000)])
    assert (centres >= 0).all() and (centres < np.array(SHAPE)).all()
    # spread over the whole volume, not stuck at a corner
    assert (centres.min(0) <= 2).all() and (centres.max(0) >= np.array(SHAPE) - 3).all()


def test_components_are_chosen_uniformly_whatever_their_size():
    big = np.c_[np.zeros(500), np.random.default_rng(1).integers(0, 30, (500, 3))]
    tiny = np.array([[7, 39, 29, 49]])  # component ids need not be contiguous
    coords = np.concatenate([big, tiny]).astype(np.int32)
    draws = _draw(coords, BODY, 1.0, n=4000)
    tiny_share = np.mean([tuple(c.tolist()) == (39, 29, 49) for c, _ in draws])
    assert abs(tiny_share - 0.5) <= 0.04


def test_patch_start_without_and_with_jitter():
    assert patch_start(np.array([10, 0, 99]), (16, 16, 17)) == (2, -8, 91)
    rng = np.random.default_rng(0)
    centre = np.array([50, 50, 50])
    starts = np.array([patch_start(centre, (96, 96, 96), 0.25, rng) for _ in range(2000)])
    offsets = starts - (centre - 48)
    assert offsets.min() == -24 and offsets.max() == 24
    assert ((centre >= starts) & (centre < starts + 96)).all()  # the centre voxel stays in the patch
    with pytest.raises(ValueError):
        patch_start(centre, (8, 8, 8), 0.25)
    # at the docstring's limit, 0.5, an even size could shift the centre one voxel out of the patch
    for size in ((32, 33, 2), (1, 2, 3)):
        starts = np.array([patch_start(centre, size, 0.5, rng) for _ in range(2000)])
        assert ((centre >= starts) & (centre < starts + np.array(size))).all(), size
    starts = np.array([patch_start(centre, (32, 32, 32), 0.5, rng) for _ in range(2000)])
    assert (starts - (centre - 16)).min() == -15 and (starts - (centre - 16)).max() == 16  # the whole reach that keeps it


@pytest.mark.parametrize("num_cases,world", [(6, 2), (7, 2), (3, 4), (1, 1)])
def test_epoch_order_is_a_padded_permutation(num_cases, world):
    cases = [f"c{i}" for i in range(num_cases)]
    order = epoch_cases(cases, epoch=3, seed=5, world_size=world)
    assert order == epoch_cases(cases, epoch=3, seed=5, world_size=world)
    assert len(order) == math.ceil(num_cases / world) * world
    assert sorted(order[:num_cases]) == cases  # a permutation, then repeats from its start
    assert order[num_cases:] == (order[:num_cases] * world)[: len(order) - num_cases]


# -- patches at the border ---------------------------------------------------------------------
def test_component_weights_set_the_share_of_each_component():
    big = np.c_[np.zeros(64), np.random.default_rng(1).integers(0, 30, (64, 3))]
    tiny = np.array([[2, 39, 29, 49]])
    coords = np.concatenate([big, tiny]).astype(np.int32)
    weights = np.array([3.0, 100.0, 1.0])  # indexed by component id; id 1 has no samples in this case
    rng = np.random.default_rng(0)
    draws = [patch_centre(SHAPE, coords, BODY, 1.0, rng, weights) for _ in range(4000)]
    tiny_share = np.mean([tuple(c.tolist()) == (39, 29, 49) for c, _ in draws])
    # the component returned is the one the centre was drawn from (the tiny lesion is component 2)
    assert all((component == 2) == (tuple(c.tolist()) == (39, 29, 49)) and component in (0, 2) for c, component in draws)
    assert abs(tiny_share - 0.25) <= 0.03
    # all weights equal: the same shares as uniform (the stream differs, the distribution does not)
    rng = np.random.default_rng(0)
    even = [patch_centre(SHAPE, coords, BODY, 1.0, rng, np.ones(3)) for _ in range(4000)]
    assert abs(np.mean([tuple(c.tolist()) == (39, 29, 49) for c, _ in even]) - 0.5) <= 0.04


def test_dataset_weights_components_by_voxel_count_to_the_power(tmp_path: Path):
    rng = np.random.default_rng(3)
    image = rng.standard_normal((2, *SHAPE)).astype(np.float16)
    label = np.zeros(SHAPE, np.uint8)
    label[2:10, 2:10, 2:10] = 1  # component 0: 512 voxels (first in scan order)
    label[30, 20, 40] = 1  # component 1: one voxel
    lesion = np.array([[0, 5, 5, 5], [0, 6, 6, 6], [1, 30, 20, 40]], np.int32)
    CaseStore(tmp_path).save("two", image, label, lesion, np.array([[0, 0, 0]]), {})
    stored = CaseStore(tmp_path).load("two")
    for power, expected in ((0.5, [512**0.5, 1.0]), (1.0, [512.0, 1.0])):
        ds = SegPatchDataset(str(tmp_path), ["two"], PATCH, patches_per_scan=400, lesion_prob=1.0, lesion_size_power=power)
        np.testing.assert_allclose(ds.component_weights("two", stored), expected)
        items = list(ds)
        single = np.mean([float(it["label"].sum()) == 1.0 for it in items])  # patches around the one-voxel lesion
        assert abs(single - 1 / (1 + expected[0])) <= 0.03
    uniform = SegPatchDataset(str(tmp_path), ["two"], PATCH, patches_per_scan=1)
    assert uniform.lesion_size_power == 0.0 and not uniform._component_weights
    # a store whose lesion samples do not match its label's components is refused, naming the case
    CaseStore(tmp_path).save("odd", image, label, lesion[:2], np.array([[0, 0, 0]]), {})
    with pytest.raises(PetctlError, match="odd: the stored label has 2 lesion components"):
        list(SegPatchDataset(str(tmp_path), ["odd"], PATCH, patches_per_scan=1, lesion_size_power=1.0))


def _two_lesion_store(root: Path) -> None:
    rng = np.random.default_rng(3)
    image = rng.standard_normal((2, *SHAPE)).astype(np.float16)
    label = np.zeros(SHAPE, np.uint8)
    label[2:10, 2:10, 2:10] = 1  # component 0 (first in scan order)
    label[28:32, 18:22, 38:42] = 1  # component 1
    lesion = np.array([[0, 5, 5, 5], [0, 6, 6, 6], [1, 30, 20, 40]], np.int32)
    CaseStore(root).save("two", image, label, lesion, np.array([[0, 0, 0]]), {})
    CaseStore(root).save("none", image, np.zeros(SHAPE, np.uint8), np.zeros((0, 4), np.int32), np.array([[0, 0, 0]]), {})


def test_hard_lesions_are_drawn_in_proportion_to_their_miss_rate(tmp_path: Path):
    _two_lesion_store(tmp_path)
    ds = SegPatchDataset(str(tmp_path), ["two", "none"], PATCH, patches_per_scan=600, lesion_prob=1.0, hard_lesion_gain=3.0)
    np.testing.assert_array_equal(ds.hardness("two"), [0.0, 0.0])
    assert ds.hardness("none").size == 0

    def share_of_second() -> float:
        items = [it for it in ds if it["case"] == "two"]
        assert all(it["component"] in (0, 1) and it["lesion"] for it in items)
        return float(np.mean([it["component"] == 1 for it in items]))

    assert abs(share_of_second() - 0.5) <= 0.06  # nothing missed yet: uniform
    # the net found component 0 and missed component 1, twice: h = 0.5·0.5 + 0.5·1 = 0.75 for it
    ds.update_hardness([("two", 0, 1.0), ("two", 1, 0.0), ("two", 1, 0.0), ("none", 0, 0.0), ("two", 5, 0.0), ("elsewhere", 0, 0.0)])
    np.testing.assert_allclose(ds.hardness("two"), [0.0, 0.75])
    expected = (1 + 3 * 0.75) / (1 + 1 + 3 * 0.75)
    assert abs(share_of_second() - expected) <= 0.06
    np.testing.assert_allclose(ds.sampling_weights("two", CaseStore(tmp_path).load("two")), [1.0, 3.25])
    # the state round-trips (a resumed fold samples as the interrupted one would have)
    again = SegPatchDataset(str(tmp_path), ["two", "none"], PATCH, patches_per_scan=1, hard_lesion_gain=3.0)
    again.load_hardness_state(ds.hardness_state())
    np.testing.assert_allclose(again.hardness("two"), [0.0, 0.75])
    # with the sampling off nothing is tracked, and the draws stay the uniform stream
    off = SegPatchDataset(str(tmp_path), ["two"], PATCH, patches_per_scan=5, lesion_prob=1.0)
    off.update_hardness([("two", 1, 0.0)])
    assert off.hardness_state() is None and off.sampling_weights("two", CaseStore(tmp_path).load("two")) is None
    with pytest.raises(PetctlError, match="hard-example sampling is off"):
        off.hardness("two")


def test_hard_lesion_rates_reach_persistent_loader_workers(tmp_path: Path):
    _two_lesion_store(tmp_path)
    ds = SegPatchDataset(str(tmp_path), ["two"], PATCH, patches_per_scan=400, lesion_prob=1.0, hard_lesion_gain=9.0)
    loader = make_loader(ds, batch_size=50, num_workers=1, pin_memory=False)
    first = torch.cat([b["component"] for b in loader]).float().mean().item()
    ds.update_hardness([("two", 1, 0.0)] * 20)  # in the main process, between epochs
    ds.set_epoch(1)
    second = torch.cat([b["component"] for b in loader]).float().mean().item()
    assert abs(first - 0.5) <= 0.07
    assert abs(second - 10 / 11) <= 0.05


@pytest.fixture()
def tiny_store(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    image = rng.standard_normal((2, *SHAPE)).astype(np.float16)
    label = np.zeros(SHAPE, np.uint8)
    label[3:8, 2:6, 1:5] = 1
    lesion = np.c_[np.zeros(4), [[3, 2, 1], [7, 5, 4], [5, 3, 2], [4, 4, 4]]].astype(np.int32)
    CaseStore(tmp_path).save("edge", image, label, lesion, np.array([[0, 0, 0]]), {})
    return tmp_path, image, label


@pytest.mark.parametrize("centre", [(0, 0, 0), (39, 29, 49), (39, 0, 25), (20, 15, 25)])
def test_border_patch_is_zero_padded_crop(tiny_store, centre):
    root, image, label = tiny_store
    start = patch_start(np.array(centre), PATCH)
    img, lab = CaseStore(root).read_patch("edge", start, PATCH)
    pad = [(p, p) for p in PATCH]
    full_img = np.pad(image, [(0, 0), *pad])
    full_lab = np.pad(label, pad)
    box = tuple(slice(s + p, s + p + n) for s, p, n in zip(start, PATCH, PATCH))
    assert np.array_equal(img, full_img[(slice(None), *box)])
    assert np.array_equal(lab, full_lab[box])
    assert img[(slice(None), *(np.array(centre) - start))].tolist() == image[(slice(None), *centre)].tolist()


def test_dataset_lesion_patches_contain_the_lesion(tiny_store):
    root, _, _ = tiny_store
    ds = SegPatchDataset(str(root), ["edge"], PATCH, patches_per_scan=50, lesion_prob=1.0, jitter=0.25)
    items = list(ds)
    assert all(it["lesion"] for it in items)
    assert all(it["label"].sum() > 0 for it in items)


# -- the dataset on a prepared store -----------------------------------------------------------
def _cases(store: Path) -> list[str]:
    return sorted(json.loads((store / "manifest.json").read_text())["cases"])


def _key(item: dict) -> tuple[str, int]:
    return item["case"], hash(item["image"].numpy().tobytes())


def test_items_have_the_documented_shapes_and_types(store: Path):
    ds = SegPatchDataset(str(store), _cases(store)[:3], PATCH, patches_per_scan=4)
    items = list(ds)
    assert len(items) == ds.patches_per_epoch_per_rank() == 12
    assert [it["case"] for it in items[::4]] == [c for _, c in ds.rank_cases()]
    for it in items:
        assert it["image"].dtype == torch.float32 and tuple(it["image"].shape) == (2, *PATCH)
        assert it["label"].dtype == torch.float32 and tuple(it["label"].shape) == (1, *PATCH)
        assert set(it["label"].unique().tolist()) <= {0.0, 1.0}
        assert isinstance(it["case"], str) and isinstance(it["lesion"], bool)
        assert it["start"].dtype == it["shape"].dtype == torch.int64 and tuple(it["start"].shape) == tuple(it["shape"].shape) == (3,)


def test_same_seed_same_patches_other_seed_or_epoch_other_patches(store: Path):
    cases = _cases(store)[:4]
    a = [_key(it) for it in SegPatchDataset(str(store), cases, PATCH, 3, seed=1)]
    b = [_key(it) for it in SegPatchDataset(str(store), cases, PATCH, 3, seed=1)]
    c = [_key(it) for it in SegPatchDataset(str(store), cases, PATCH, 3, seed=2)]
    later = SegPatchDataset(str(store), cases, PATCH, 3, seed=1)
    later.set_epoch(1)
    assert a == b
    assert a != c and a != [_key(it) for it in later]


@pytest.mark.parametrize("num_cases", [6, 7])
def test_ranks_split_cases_evenly(store: Path, num_cases: int):
    cases = _cases(store)[:num_cases]
    ranks = [SegPatchDataset(str(store), cases, PATCH, 2, rank=r, world_size=2) for r in range(2)]
    seen = [[it["case"] for it in ds] for ds in ranks]
    assert len(seen[0]) == len(seen[1]) == ranks[0].patches_per_epoch_per_rank() == math.ceil(num_cases / 2) * 2
    if num_cases % 2 == 0:
        assert set(seen[0]).isdisjoint(seen[1])
    assert set(seen[0]) | set(seen[1]) == set(cases)
    # no patch is drawn twice, even for the case repeated to pad the epoch
    keys = [_key(it) for ds in ranks for it in ds]
    assert len(set(keys)) == len(keys)


def test_workers_split_cases_and_follow_set_epoch(store: Path):
    cases = _cases(store)[:5]
    ds = SegPatchDataset(str(store), cases, PATCH, 3, seed=4)
    expected = {}
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        expected[epoch] = Counter(_key(it) for it in ds)
    ds.set_epoch(0)
    loader = make_loader(ds, batch_size=2, num_workers=2, pin_memory=False)
    for epoch in (0, 1):
        ds.set_epoch(epoch)  # persistent workers must see this
        batches = list(loader)
        got = Counter((case, hash(img.numpy().tobytes())) for b in batches for case, img in zip(b["case"], b["image"]))
        assert got == expected[epoch]
        assert len(batches) == ds.batches_per_epoch_per_rank(batch_size=2, num_workers=2)
    assert expected[0] != expected[1]


@pytest.mark.parametrize(
    "kwargs",
    [{"cases": []}, {"patch_size": (16, 16)}, {"patches_per_scan": 0}, {"lesion_prob": 1.5}, {"rank": 2, "world_size": 2}, {"jitter": 0.6},
     {"lesion_size_power": -1.0}, {"hard_lesion_gain": -1.0}, {"hard_momentum": 1.0}],
)
def test_bad_dataset_arguments_are_refused(kwargs):
    args = {"store_root": "x", "cases": ["a"], "patch_size": PATCH, "patches_per_scan": 1, **kwargs}
    with pytest.raises(PetctlError):
        SegPatchDataset(**args)


# -- augmentation ------------------------------------------------------------------------------
def _batch(batch=6, shape=(20, 18, 16), seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    label = torch.zeros(batch, 1, *shape)
    for b in range(batch):  # an off-centre, asymmetric blob so flips and rotations show
        x, y, z = (int(v) for v in torch.randint(3, 8, (3,), generator=g))
        label[b, 0, x : x + 6, y : y + 4, z : z + 3] = 1
    image = torch.cat([label.clone(), torch.randn(batch, 1, *shape, generator=g)], dim=1)
    return image, label


def test_augmentation_shapes_binary_label_and_alignment():
    image, label = _batch()
    cfg = AugmentConfig(p_affine=1.0, p_intensity=0.0)
    out_img, out_lab = augment_batch(image, label, torch.Generator().manual_seed(1), cfg)
    assert out_img.shape == image.shape and out_lab.shape == label.shape and out_img.dtype == image.dtype
    assert set(out_lab.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(out_img[:, :1] >= 0.5, out_lab.bool())  # channel 0 was the label
    assert not torch.equal(out_lab, label)  # something moved
    assert out_lab.sum() > 0.5 * label.sum()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_augmentation_keeps_the_dtype(dtype):
    image, label = _batch(batch=3)
    out_img, out_lab = augment_batch(image.to(dtype), label.to(dtype), torch.Generator().manual_seed(2), AugmentConfig(p_affine=1.0))
    reference, _ = augment_batch(image, label, torch.Generator().manual_seed(2), AugmentConfig(p_affine=1.0))
    assert out_img.dtype == out_lab.dtype == dtype
    assert torch.allclose(out_img.float(), reference, atol=0.05)
    assert set(out_lab.unique().tolist()) <= {0.0, 1.0}


def test_flip_only_is_exact_and_aligned():
    image, label = _batch()
    cfg = AugmentConfig(p_flip=1.0, p_affine=0.0, p_intensity=0.0)
    out_img, out_lab = augment_batch(image, label, torch.Generator().manual_seed(0), cfg)
    assert torch.equal(out_img, image.flip([2, 3, 4])) and torch.equal(out_lab, label.flip([2, 3, 4]))


def test_identity_when_disabled_or_nothing_drawn():
    image, label = _batch()
    for cfg in (AugmentConfig(enabled=False), AugmentConfig(p_flip=0, p_affine=0, p_intensity=0)):
        out_img, out_lab = augment_batch(image, label, torch.Generator().manual_seed(0), cfg)
        assert torch.equal(out_img, image) and torch.equal(out_lab, label)
    # rotation 0 and zoom 1 through grid_sample is the identity up to rounding
    cfg = AugmentConfig(p_flip=0, p_affine=1.0, p_intensity=0, max_rotation_deg=0.0, zoom_range=(1.0, 1.0))
    out_img, out_lab = augment_batch(image, label, torch.Generator().manual_seed(0), cfg)
    assert torch.allclose(out_img, image, atol=1e-5) and torch.equal(out_lab, label)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_quarter_turn_is_a_voxel_rotation(axis):
    image, _ = _batch(batch=1, shape=(12, 12, 12))
    angles = torch.zeros(1, 3, dtype=torch.float64)
    angles[0, axis] = math.pi / 2
    theta = _affine_theta(angles, torch.ones(1, dtype=torch.float64), torch.ones(1, 3, dtype=torch.float64), (12, 12, 12)).float()
    grid = _affine_grid(theta, (12, 12, 12))
    moved = torch.nn.functional.grid_sample(image, grid, align_corners=True)
    plane = [d for d in (2, 3, 4) if d != 2 + axis]
    turned = [image.rot90(k, plane) for k in (1, -1)]
    assert any(torch.allclose(moved, t, atol=1e-4) for t in turned)


@pytest.mark.filterwarnings("ignore:Since version 1.3.0, affine_grid")
@pytest.mark.parametrize("spatial", [(7, 5, 9), (1, 4, 6)])
def test_broadcast_grid_equals_affine_grid(spatial):
    theta = torch.randn(3, 3, 4, generator=torch.Generator().manual_seed(0))
    reference = torch.nn.functional.affine_grid(theta, [3, 1, *spatial], align_corners=True)
    assert torch.allclose(_affine_grid(theta, spatial), reference, atol=1e-6)


def test_flips_folded_into_the_resampling_are_exact():
    image, label = _batch(shape=(10, 12, 14))
    signs = torch.tensor([[-1.0, 1.0, -1.0]], dtype=torch.float64)
    theta = _affine_theta(torch.zeros(1, 3, dtype=torch.float64), torch.ones(1, dtype=torch.float64), signs, (10, 12, 14))
    moved = torch.nn.functional.grid_sample(image[:1], _affine_grid(theta.float(), (10, 12, 14)), align_corners=True)
    assert torch.allclose(moved, image[:1].flip([2, 4]), atol=1e-5)


def test_intensity_change_is_bounded():
    image = torch.ones(64, 2, 4, 4, 4)
    label = torch.zeros(64, 1, 4, 4, 4)
    cfg = AugmentConfig(p_flip=0, p_affine=0, p_intensity=1.0, intensity_scale=0.1, intensity_shift=0.1)
    out, out_lab = augment_batch(image, label, torch.Generator().manual_seed(0), cfg)
    per_channel = out.flatten(2)
    assert torch.equal(per_channel.amin(2), per_channel.amax(2))  # one scale/shift per sample and channel
    values = per_channel[:, :, 0]
    assert values.min() >= 0.8 - 1e-6 and values.max() <= 1.2 + 1e-6
    assert values.std() > 0.02 and not torch.equal(values[:, 0], values[:, 1])
    assert torch.equal(out_lab, label)


def test_augmentation_is_reproducible_from_the_generator():
    image, label = _batch()
    cfg = AugmentConfig()
    a = augment_batch(image, label, torch.Generator().manual_seed(7), cfg)
    b = augment_batch(image, label, torch.Generator().manual_seed(7), cfg)
    c = augment_batch(image, label, torch.Generator().manual_seed(8), cfg)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert torch.equal(image, _batch()[0])  # inputs untouched


def _blurred_lesion_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two samples of CT + PET on 24³: a lesion cube (uptake 4 over tissue 1, blurred past its label
    like a scanner's) in sample 0 and, in sample 1, no lesion but a bright organ."""
    from scipy import ndimage

    label = torch.zeros(2, 1, 24, 24, 24)
    label[0, 0, 9:15, 9:15, 9:15] = 1
    pet = np.ones((2, 24, 24, 24), np.float32)
    pet[0, 9:15, 9:15, 9:15] = 4.0
    pet[1, 2:8, 2:8, 2:8] = 6.0
    pet = np.stack([ndimage.gaussian_filter(p, 0.7) for p in pet])
    image = torch.stack([torch.full((2, 24, 24, 24), -0.3), torch.from_numpy(pet)], 1)
    return image, label


@pytest.mark.parametrize("factor", [0.5, 0.8])
def test_dimmed_lesions_lose_that_share_of_their_uptake_over_the_tissue_around_them(factor):
    image, label = _blurred_lesion_batch()
    out = dim_lesions(image, label, [factor, factor], (1,))
    before, after = image[0, 1] - 1.0, out[0, 1] - 1.0  # uptake over the tissue (1)
    inside = label[0, 0] > 0
    assert torch.allclose(after[inside], factor * before[inside], atol=1e-5)
    # the blur's halo (just outside the label) dims with it, so no bright rim is left behind
    halo = torch.zeros_like(inside)
    halo[8, 9:15, 9:15] = True
    assert before[halo].min() > 0.3 and torch.allclose(after[halo], factor * before[halo], atol=1e-5)
    far = torch.ones_like(inside)
    far[5:19, 5:19, 5:19] = False
    assert torch.equal(out[0, 1][far], image[0, 1][far])  # tissue away from the lesion untouched
    assert torch.equal(out[1], image[1]) and torch.equal(out[:, 0], image[:, 0])  # no lesion; CT untouched
    assert torch.equal(image, _blurred_lesion_batch()[0])  # the input is not written


def test_dimming_measures_the_tissue_around_each_sample_and_skips_what_it_cannot():
    image, label = _blurred_lesion_batch()
    image[0, 1] += 2.0  # the same lesion in brighter tissue (3): its excess is still 3
    out = dim_lesions(image, label, [0.5, None], (1,))
    assert abs(float(out[0, 1, 12, 12, 12]) - (3.0 + 0.5 * (float(image[0, 1, 12, 12, 12]) - 3.0))) < 1e-4
    full = torch.ones(1, 1, 8, 8, 8)  # a lesion that fills the patch: no tissue to measure
    fixed = torch.rand(1, 2, 8, 8, 8)
    assert torch.equal(dim_lesions(fixed, full, [0.5], (1,)), fixed)
    assert dim_lesions(image, label, [None, None], (1,)) is image and dim_lesions(image, label, [1.0, 1.0], (1,)) is image


def test_a_dimmed_lesion_keeps_its_contrast_floor_over_bright_tissue_in_suv():
    mean, std = 6.6, 3.2  # a store's PET normalization: z = (SUV - mean) / std
    z = lambda suv: (suv - mean) / std  # noqa: E731
    label = torch.zeros(3, 1, 24, 24, 24)
    label[:, 0, 9:15, 9:15, 9:15] = 1
    tissue = torch.tensor([2.2, 0.9, 2.2]).reshape(3, 1, 1, 1)  # liver, soft tissue, liver
    peak = torch.tensor([4.0, 4.0, 3.0]).reshape(3, 1, 1, 1)
    pet = torch.where(label[:, 0] > 0, peak, tissue)
    image = torch.stack([torch.zeros_like(pet), z(pet)], 1)
    out = dim_lesions(image, label, [0.5, 0.5, 0.5], (1,), contrast=(1.5, (mean, std)))
    suv = out[:, 1, 12, 12, 12] * std + mean
    # in the liver the lesion stops at 1.5 × 2.2 = 3.3 (not 3.1); in soft tissue it takes the whole
    # factor (0.9 + 0.5 × 3.1); a liver lesion already under the floor (3.0) is left as it is
    assert suv.tolist() == pytest.approx([3.3, 2.45, 3.0], abs=1e-4)
    assert torch.equal(out[2], image[2])
    assert torch.allclose(dim_lesions(image, label, [0.5] * 3, (1,))[:, 1, 12, 12, 12] * std + mean,
                          torch.tensor([3.1, 2.45, 2.6]), atol=1e-4)  # without the floor


def test_augmentation_dims_lesions_with_its_probability_and_keeps_the_stream_without_it():
    image, label = _blurred_lesion_batch()
    image, label = image.repeat(32, 1, 1, 1, 1), label.repeat(32, 1, 1, 1, 1)
    still = dict(p_flip=0.0, p_affine=0.0, p_intensity=0.0)
    out, out_lab = augment_batch(image, label, torch.Generator().manual_seed(3), AugmentConfig(p_lesion_dim=0.5, **still))
    assert torch.equal(out_lab, label)
    peak = out[0::2, 1, 12, 12, 12] - 1.0
    ref = float(image[0, 1, 12, 12, 12]) - 1.0
    dimmed = peak < ref - 1e-6
    assert 4 <= int(dimmed.sum()) <= 28  # about half of the 32 lesion samples
    assert bool((peak[dimmed] >= 0.5 * ref - 1e-5).all())  # by a factor in [0.5, 1)
    assert torch.equal(out[1::2], image[1::2])  # the samples without a lesion
    # dimming draws after the flips, rotations and intensities: with it on, a sample it leaves alone
    # (no lesion) gets exactly the augmentation it gets with dimming off
    off = augment_batch(image, label, torch.Generator().manual_seed(4), AugmentConfig())
    on = augment_batch(image, label, torch.Generator().manual_seed(4), AugmentConfig(p_lesion_dim=0.5))
    assert not torch.equal(off[0][1::2], image[1::2])  # the other augmentations did act
    assert torch.equal(off[0][1::2], on[0][1::2]) and torch.equal(off[1], on[1])
    assert not torch.equal(off[0][0::2], on[0][0::2])  # and the lesion samples were dimmed


@pytest.mark.parametrize("change", [{"p_lesion_dim": 1.5}, {"lesion_dim_min": -0.1}, {"lesion_dim_contrast": 0.9}])
def test_bad_lesion_dimming_is_refused(change):
    with pytest.raises(PetctlError, match="lesion dimming"):
        dataclasses.replace(AugmentConfig(), **change)


@pytest.mark.parametrize("change", [{"p_flip": 1.2}, {"zoom_range": (1.2, 0.9)}, {"zoom_range": (0.0, 1.0)}, {"intensity_scale": 1.0}, {"max_rotation_deg": -1.0}])
def test_bad_augment_config_is_refused(change):
    with pytest.raises(PetctlError):
        dataclasses.replace(AugmentConfig(), **change)


def test_flips_only_along_the_allowed_axes():
    from petctl.engine.sampling import AugmentConfig, augment_batch

    image = torch.arange(2 * 1 * 4 * 5 * 6, dtype=torch.float32).reshape(2, 1, 4, 5, 6)
    label = (image > 100).float()
    cfg = AugmentConfig(p_flip=1.0, flip_axes=(0,), p_affine=0.0, p_intensity=0.0)
    out, lab = augment_batch(image, label, torch.Generator().manual_seed(0), cfg)
    assert torch.equal(out, image.flip(2)) and torch.equal(lab, label.flip(2))
    with pytest.raises(PetctlError, match="flip axes"):
        AugmentConfig(flip_axes=(3,))

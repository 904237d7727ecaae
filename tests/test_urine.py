"""The urine veto (petctl.engine.urine): the CT's water regions and the components dropped in them."""

from __future__ import annotations

import numpy as np
import pytest

from petctl.engine.urine import UrineVeto, drop_urine_components, median3, veto_mask, water_region
from petctl.errors import PetctlError

SPACING = (4.0, 4.0, 6.0)


def _ball(shape, centre, radius_mm, spacing=SPACING) -> np.ndarray:
    grids = np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in zip(shape, centre, spacing)], indexing="ij")
    return sum(g**2 for g in grids) <= radius_mm**2


@pytest.fixture
def body() -> dict[str, np.ndarray]:
    """A CT (HU) of soft tissue in fat, with a bladder (water, ~65 mL), a soft-tissue lesion beside it,
    a small water cyst (~1 mL) and a lesion in fat (its rim passes through water density)."""
    rng = np.random.default_rng(0)
    shape = (48, 48, 32)
    ct = np.full(shape, -100.0, np.float32)
    ct[6:42, 6:42, 3:29] = 42.0
    bladder = _ball(shape, (20, 24, 16), 25.0)
    lesion = _ball(shape, (33, 24, 16), 10.0)  # 13 voxels (52 mm) from the bladder's centre, clear of it
    cyst = _ball(shape, (12, 12, 8), 6.0)
    fat_lesion = _ball(shape, (3, 24, 16), 6.0) & (ct < 0)
    ct[bladder] = 8.0
    ct[cyst] = 5.0
    ct[fat_lesion] = 42.0
    ct += rng.normal(0, 10, shape).astype(np.float32)
    return {"ct": ct, "bladder": bladder, "lesion": lesion, "cyst": cyst, "fat_lesion": fat_lesion}


def test_water_region_is_the_bladder_not_the_cyst_or_partial_volume(body):
    region = water_region(body["ct"], SPACING)
    bladder = body["bladder"]
    assert region[bladder].mean() > 0.8  # most of the bladder (its rim blurs into soft tissue)
    assert not region[body["cyst"]].any()  # ~1 mL: below the 5 mL minimum
    assert not region[body["lesion"]].any() and not region[body["fat_lesion"]].any()
    assert (region & ~bladder).sum() < 0.1 * bladder.sum()  # no shells between fat and soft tissue
    # the minimum kept the cyst out, and the median, which erases anything under ~2 voxels across, does too
    assert water_region(body["ct"], SPACING, UrineVeto(min_ml=0.1, median=False))[body["cyst"]].any()
    assert not water_region(body["ct"], SPACING, UrineVeto(min_ml=0.1))[body["cyst"]].any()


@pytest.mark.parametrize("shape", [(7, 5, 9), (3, 1, 4), (2, 6, 3)])
def test_median3_is_scipys_median_along_each_axis_in_turn(shape):
    from scipy import ndimage

    volume = np.random.default_rng(1).integers(-200, 200, shape).astype(np.float32)
    expected = volume
    for axis in range(3):
        expected = ndimage.median_filter(expected, size=tuple(3 if a == axis else 1 for a in range(3)))
    before = volume.copy()
    assert np.array_equal(median3(volume), expected)
    assert np.array_equal(median3(np.asfortranarray(volume)), expected)
    assert np.array_equal(volume, before)  # the input is left alone
    assert median3(volume).dtype == np.float32


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_median_finds_a_bladder_in_the_noise_of_a_coarse_grid(seed):
    """Fresh seed 5353's miss: on a PET grid of ~4 mm voxels the 1.5 mm smoothing is under half a voxel,
    and noise (σ 16 HU) pushes urine at 12 HU out of the water range all over the bladder. The median
    puts most of it back; a small lesion in fat (its rim through water density) stays out."""
    from scipy import ndimage

    spacing = (3.8, 3.8, 4.3)
    shape = (40, 40, 32)
    ct = np.full(shape, -100.0, np.float32)
    ct[5:35, 5:35, 3:29] = 42.0
    bladder = _ball(shape, (18, 20, 16), 25.0, spacing)
    fat_lesion = _ball(shape, (2, 20, 16), 8.0, spacing) & (ct < 0)
    ct[bladder], ct[fat_lesion] = 12.0, 42.0
    ct = ndimage.gaussian_filter(ct, 0.5) + np.random.default_rng(seed).normal(0, 16, shape).astype(np.float32)
    plain = water_region(ct, spacing, UrineVeto(median=False))
    region = water_region(ct, spacing)
    assert plain[bladder].mean() < 0.45 and region[bladder].mean() > 0.55
    mask = bladder | fat_lesion  # the nets' bladder false positive and a true lesion
    assert np.array_equal(veto_mask(mask, ct, spacing, UrineVeto(median=False)), mask)  # the bladder stayed
    assert np.array_equal(veto_mask(mask, ct, spacing, UrineVeto()), fat_lesion)


def test_components_mostly_in_urine_are_dropped_and_lesions_kept(body):
    region = water_region(body["ct"], SPACING)
    bladder_fp = body["bladder"] & _ball(body["ct"].shape, (20, 24, 16), 18.0)  # the nets' bladder false positive
    mask = bladder_fp | body["lesion"] | body["fat_lesion"]
    kept = drop_urine_components(mask, region)
    assert np.array_equal(kept, body["lesion"] | body["fat_lesion"])
    # a lesion joined to the bladder's rim by a bridge: one component, partly in urine, stays whole
    bridge = np.zeros_like(mask)
    bridge[24:31, 22:27, 14:19] = True
    straddle = body["lesion"] | bridge
    assert 0.1 < region[straddle].mean() < 0.5
    assert np.array_equal(drop_urine_components(straddle, region), straddle)
    assert not drop_urine_components(straddle, region, fraction=0.01).any()
    assert np.array_equal(veto_mask(mask, body["ct"], SPACING, UrineVeto()), kept)
    assert not veto_mask(np.zeros_like(mask), body["ct"], SPACING, UrineVeto()).any()


@pytest.mark.parametrize("seed", range(3))
def test_the_veto_labels_the_masks_box_and_drops_what_the_whole_volume_would(seed):
    """Components are labelled inside the mask's bounding box only (faster per threshold); the result
    equals labelling the whole volume, on random masks and regions of odd shapes and orders."""
    import cc3d

    rng = np.random.default_rng(seed)
    for _ in range(40):
        shape = tuple(int(n) for n in rng.integers(1, 24, 3))
        mask = rng.random(shape) > rng.uniform(0.5, 0.99)
        region = rng.random(shape) > rng.uniform(0.2, 0.9)
        components = cc3d.connected_components(mask.view(np.uint8), connectivity=26)
        size = np.bincount(components.ravel())
        inside = np.bincount(components.ravel(), weights=region.ravel(), minlength=size.size)
        drop = inside >= 0.5 * np.maximum(size, 1)
        drop[0] = False
        expected = mask & ~drop[components]
        before = mask.copy()
        for order in (mask, np.asfortranarray(mask)):
            kept = drop_urine_components(order, region, 0.5)
            assert kept.shape == shape and (kept == expected).all()
        assert (mask == before).all()  # the input is left alone


def test_calibration_scores_the_masks_after_the_veto(body):
    from petctl.engine.extent import extent_curves

    pet = np.full(body["ct"].shape, 1.0, np.float32)
    pet[body["bladder"]] = 15.0
    pet[body["lesion"]] = 12.0
    probs = np.where(body["bladder"] | body["lesion"], 0.9, 0.0).astype(np.float32)
    label = body["lesion"].astype(np.uint8)
    thresholds = np.array([0.5])
    plain = extent_curves(label, pet, probs, 0.096, thresholds)
    vetoed = extent_curves(label, pet, probs, 0.096, thresholds, urine=water_region(body["ct"], SPACING))
    assert plain[0, 1] > 10 and vetoed[0, 1] < 1.0  # the bladder's false-positive volume (mL) gone
    assert vetoed[0, 0] > 0.95 and plain[0, 0] < vetoed[0, 0]


def test_settings_round_trip_and_refusals():
    veto = UrineVeto()
    assert UrineVeto.from_json(veto.to_json()) == veto and UrineVeto.from_json(None) is None
    legacy = {k: v for k, v in veto.to_json().items() if k not in ("median", "whole_voxel_ball")}  # a thresholds.json from before both
    assert UrineVeto.from_json(legacy) == UrineVeto(median=False, whole_voxel_ball=False)
    for bad in ({"water_hu": (20.0, -30.0)}, {"fraction": 0.0}, {"min_ml": -1.0}):
        with pytest.raises(PetctlError, match="urine veto"):
            UrineVeto(**bad)
    with pytest.raises(ValueError, match="differ in shape"):
        drop_urine_components(np.ones((2, 2, 2), bool), np.ones((3, 2, 2), bool))


def test_the_whole_voxel_ball_reaches_a_voxel_along_an_axis_coarser_than_its_radius():
    """4 mm ball on 4.2 mm slices: the default ball keeps only the centre voxel along such an axis, so
    a sheet of water one slice thick survives its opening; `whole_voxel_ball` opens it away."""
    from petctl.engine.urine import _ball

    assert _ball(4.0, (4.2, 4.2, 4.6), whole_voxel=False).sum() == 1  # the default ball there: no opening at all
    ball = _ball(4.0, (4.2, 4.2, 4.6), whole_voxel=True)
    assert ball.shape == (3, 3, 3) and ball[1, 1, :].all() and ball[:, 1, 1].all() and not ball[0, 0, 0]
    for spacing in ((4.0, 4.0, 4.0), (3.0, 3.0, 3.0), (2.0, 2.0, 3.0), (1.5, 1.5, 2.5)):  # no axis coarser: the same ball
        assert np.array_equal(_ball(4.0, spacing, whole_voxel=True), _ball(4.0, spacing)), spacing
    spacing = (4.2, 4.2, 4.6)
    ct = np.full((40, 40, 30), -100.0, np.float32)
    ct[5:35, 5:35, 15] = 0.0  # one slice of water, ~17 mL
    ct[10:30, 10:30, 3:10] = 0.0  # a bladder, ~57 mL
    new = water_region(ct, spacing, UrineVeto(smooth_mm=0.0, median=False, whole_voxel_ball=True))
    old = water_region(ct, spacing, UrineVeto(smooth_mm=0.0, median=False))  # the default: the ball calibrations used
    assert old[:, :, 15].any() and not new[:, :, 15].any()  # the sheet falls away only with the whole-voxel ball
    assert new[11:29, 11:29, 4:9].all()  # the bladder stays (less its box's edge lines, which no ball reaches)

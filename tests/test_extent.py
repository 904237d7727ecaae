"""The PET extent: detected components redrawn at their background-corrected half maximum."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from petctl.engine.evaluate import case_metrics
from petctl.engine.extent import REFINE_THRESHOLDS, extent_curves, pet_extent_mask


def _ball(shape: tuple[int, int, int], centre: tuple[float, float, float], radius: float) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float32)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def _scene(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A blurred uniform lesion (SUV 6 on 1.5) and probabilities that mark only its core."""
    rng = np.random.default_rng(seed)
    shape = (48, 48, 40)
    lesion = _ball(shape, (20, 22, 18), 6.0)
    pet = np.where(lesion, 6.0, 1.5).astype(np.float32)
    pet = ndimage.gaussian_filter(pet, 1.0) + rng.normal(0, 0.05, shape).astype(np.float32)
    probs = np.where(_ball(shape, (20, 22, 18), 4.0), 0.9, 0.05).astype(np.float32)
    return lesion, pet, probs


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_a_core_detection_is_redrawn_to_the_lesion_edge():
    lesion, pet, probs = _scene()
    core = probs >= 0.5
    assert _dice(core, lesion) < 0.5  # the network's core alone
    mask = pet_extent_mask(pet, probs, 0.5)
    assert _dice(mask, lesion) > 0.9
    assert mask[core].all()


def test_growth_stays_within_the_grow_radius_beside_a_hot_organ():
    lesion, pet, probs = _scene()
    organ = np.zeros_like(lesion)
    organ[27:45, 5:40, 5:35] = True  # a bladder-hot block touching the lesion
    pet = np.where(organ & ~lesion, 9.0, pet).astype(np.float32)
    mask = pet_extent_mask(pet, probs, 0.5, grow=3)
    reach = ndimage.binary_dilation(probs >= 0.5, iterations=3)
    assert not (mask & ~reach).any()
    assert (mask & organ & ~lesion).sum() < 0.05 * organ.sum()


def test_no_contrast_keeps_the_component_and_nothing_detected_is_empty():
    _, _, probs = _scene()
    flat = np.full(probs.shape, 2.0, np.float32)
    assert np.array_equal(pet_extent_mask(flat, probs, 0.5), probs >= 0.5)
    assert not pet_extent_mask(flat, probs, 0.95).any()


def test_two_lesions_each_get_their_own_level():
    shape = (60, 40, 40)
    faint, hot = _ball(shape, (15, 20, 20), 5.0), _ball(shape, (45, 20, 20), 5.0)
    pet = ndimage.gaussian_filter(np.where(faint, 3.0, np.where(hot, 15.0, 1.0)).astype(np.float32), 1.0)
    probs = (_ball(shape, (15, 20, 20), 2.5) | _ball(shape, (45, 20, 20), 2.5)).astype(np.float32)
    mask = pet_extent_mask(pet, probs, 0.5)
    assert _dice(mask & faint, faint) > 0.85 and _dice(mask & hot, hot) > 0.85  # one global level would lose the faint one


def test_curves_are_the_autopet_metrics_of_the_per_threshold_masks():
    lesion, pet, probs = _scene(1)
    probs = ndimage.gaussian_filter(probs, 1.5)
    probs[30:34, 30:34, 30:34] = 0.8  # a false positive at the lower thresholds
    table = extent_curves(lesion, pet, probs, 0.064)
    assert table.shape == (len(REFINE_THRESHOLDS), 3)
    for t, row in zip(REFINE_THRESHOLDS[::4], table[::4]):
        m = case_metrics(lesion, pet_extent_mask(pet, probs, float(t)), 0.064)
        assert tuple(row) == pytest.approx((m.dice, m.fpv_ml, m.fnv_ml))
    assert table[0, 1] > 0 and table[-1, 2] == pytest.approx(lesion.sum() * 0.064)  # nothing reaches 0.95: all missed
    negative = extent_curves(np.zeros_like(lesion), pet, probs, 0.064)
    assert np.isnan(negative[:, 0]).all() and (negative[:, 2] == 0).all()
    assert negative[0, 1] == pytest.approx(pet_extent_mask(pet, probs, float(REFINE_THRESHOLDS[0])).sum() * 0.064)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        pet_extent_mask(np.zeros((4, 4, 4), np.float32), np.zeros((4, 4, 5), np.float32), 0.5)


def test_best_within_budget_prefers_dice_inside_the_budget():
    from petctl.engine.calibrate import best_within_budget

    t = np.array([0.5, 0.6, 0.7, 0.8])
    dice = np.array([0.80, 0.85, 0.82, 0.70])
    fpv = np.array([9.0, 6.0, 3.0, 1.0])
    fnv = np.array([1.0, 1.0, 2.0, 7.0])
    assert best_within_budget(t, dice, fpv, fnv, 5.0) == (0.7, 0.82, True)
    assert best_within_budget(t, dice, fpv, fnv, float("inf")) == (0.6, 0.85, True)
    assert best_within_budget(t, dice, fpv, fnv, 0.5) == (0.6, 0.85, False)  # none within: the best Dice
    assert best_within_budget(t, np.array([0.8, 0.8, np.nan, 0.1]), fpv, fnv, 10.0) == (0.5, 0.8, True)  # ties: lower


def test_one_standard_error_rule_takes_the_prior_when_the_test_split_cannot_tell():
    from petctl.engine.calibrate import choose_extent_threshold

    t = np.array([0.6, 0.7, 0.75, 0.8])
    zeros = np.zeros(4)
    # 4 positives whose Dice is noisy: best 0.6 (mean 0.70, SE 0.1); 0.75 is 0.05 worse, inside the band
    noisy = np.array([[0.9, 0.85, 0.8, 0.5], [0.5, 0.5, 0.5, 0.5], [0.9, 0.85, 0.8, 0.6], [0.5, 0.5, 0.5, 0.4]])
    picked = choose_extent_threshold(t, noisy, zeros, zeros, prior=0.75)
    assert picked["best_threshold"] == 0.6 and picked["best_dice"] == pytest.approx(0.7)
    assert picked["dice_standard_error"] == pytest.approx(np.std(noisy[:, 0], ddof=1) / 2)
    assert picked["threshold"] == 0.75 and picked["mean_dice"] == pytest.approx(0.65)
    assert choose_extent_threshold(t, noisy, zeros, zeros, prior=None)["threshold"] == 0.6  # no prior: the best
    # 400 positives with the same means: the band narrows to the best, the prior no longer decides
    many = np.repeat(noisy, 100, axis=0)
    assert choose_extent_threshold(t, many, zeros, zeros, prior=0.75)["threshold"] == 0.6
    # a prior outside the band: the band's threshold nearest it (0.8 is 0.1 + worse, 0.7 is in)
    far = noisy.copy()
    far[:, 2:] -= 0.3
    assert choose_extent_threshold(t, far, zeros, zeros, prior=0.8)["threshold"] == 0.7
    # the budget first: 0.6 and 0.7 leave too much false-positive volume, so 0.75 is the best left
    fpv = np.array([9.0, 6.0, 1.0, 1.0])
    budgeted = choose_extent_threshold(t, noisy, fpv, zeros, budget_ml=5.0, prior=0.6)
    assert budgeted["best_threshold"] == 0.75 and budgeted["threshold"] == 0.75 and budgeted["budget_met"]


def test_settings_that_would_flood_the_neighbourhood_are_refused():
    """scipy dilates by 0 iterations until nothing changes: a shell of (0, 6) from an edited
    thresholds.json would make the 'ring' everything; refused in one line instead."""
    from petctl.errors import PetctlError

    pet = np.ones((12, 12, 12), np.float32)
    probs = np.zeros_like(pet)
    probs[6, 6, 6] = 1.0
    for bad in ({"shell": (0, 6)}, {"shell": (4, 4)}, {"grow": -1}, {"fraction": 0.0}, {"fraction": 1.5}):
        with pytest.raises(PetctlError, match="PET extent: needs 0 < shell"):
            pet_extent_mask(pet, probs, 0.5, **bad)
    assert pet_extent_mask(pet, probs, 0.5, grow=0).sum() == 1

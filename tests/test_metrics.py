"""Metrics against their definitions: sklearn on naively built subsets, per-threshold loops, hand cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from petctl.engine.metrics import (
    SEED_THRESHOLDS,
    THRESHOLDS,
    auroc,
    best_seeded_threshold,
    best_threshold,
    classifier_threshold,
    dice,
    dice_sweep,
    seeded_dice_grid,
    seeded_mask,
    specificity_at,
    top_k_auroc,
)


def naive_top_k_subset(labels: np.ndarray, probs: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The 2n subset by the definition: a full sort of the background, ties broken at random."""
    lesion = labels.ravel() > 0
    flat = probs.ravel()
    background = np.flatnonzero(~lesion)
    background = background[rng.permutation(background.size)]
    background = background[np.argsort(-flat[background].astype(np.float64), kind="stable")]
    keep = np.concatenate([np.flatnonzero(lesion), background[: int(lesion.sum())]])
    return lesion[keep].astype(int), flat[keep].astype(np.float64)


def random_volume(seed: int, shape: tuple[int, ...] = (6, 9, 11), quantize: int | None = None,
                  dtype: type = np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Sparse lesions whose scores run higher than the background's, optionally rounded to create ties."""
    rng = np.random.default_rng(seed)
    lesion_fraction = rng.uniform(0.005, 0.2)
    labels = (rng.random(shape) < lesion_fraction).astype(np.uint8)
    labels.flat[rng.integers(labels.size)] = 1
    probs = rng.beta(1.0, 4.0, size=shape)
    probs[labels > 0] = rng.beta(3.0, 2.0, size=int((labels > 0).sum()))
    if quantize is not None:
        probs = np.round(probs, quantize)
    return labels, probs.astype(dtype)


@pytest.mark.parametrize("seed", range(25))
@pytest.mark.parametrize("quantize", [None, 2, 1])
def test_top_k_auroc_matches_sklearn_on_the_naive_subset(seed: int, quantize: int | None) -> None:
    labels, probs = random_volume(seed, quantize=quantize)
    rng = np.random.default_rng(1000 + seed)
    expected = roc_auc_score(*naive_top_k_subset(labels, probs, rng))
    assert top_k_auroc(labels, probs) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_top_k_auroc_accepts_dtypes_and_shapes(dtype: type) -> None:
    labels, probs = random_volume(7, dtype=dtype)
    expected = roc_auc_score(*naive_top_k_subset(labels, probs, np.random.default_rng(0)))
    assert top_k_auroc(labels, probs) == pytest.approx(expected, rel=1e-12)
    assert top_k_auroc(labels.astype(bool).ravel(), probs.ravel()) == top_k_auroc(labels * 3, probs)


@pytest.mark.parametrize("seed", range(5))
def test_top_k_auroc_does_not_depend_on_which_tied_background_is_taken(seed: int) -> None:
    # Background scores are 0.5 at every voxel beyond the few above it, so the boundary sits in a tie.
    rng = np.random.default_rng(seed)
    labels = np.zeros(400, dtype=int)
    labels[:20] = 1
    probs = np.full(400, 0.5)
    probs[:20] = rng.choice([0.3, 0.5, 0.7], size=20)
    probs[20:27] = 0.9
    ours = top_k_auroc(labels, probs)
    choices = {roc_auc_score(*naive_top_k_subset(labels, probs, np.random.default_rng(s))) for s in range(10)}
    assert len(choices) == 1
    assert ours == pytest.approx(choices.pop(), rel=1e-12)


def test_top_k_auroc_hand_case_differs_from_the_full_auroc() -> None:
    labels = np.array([1, 1, 0, 0, 0, 0])
    probs = np.array([0.9, 0.2, 0.8, 0.1, 0.1, 0.1])
    # Kept background: 0.8 and one 0.1. Pairs won: 0.9>0.8, 0.9>0.1, 0.2>0.1 → 3 of 4.
    assert top_k_auroc(labels, probs) == 0.75
    assert auroc(labels, probs) == 7 / 8


@pytest.mark.parametrize("seed", range(4))
def test_top_k_auroc_one_lesion_voxel(seed: int) -> None:
    rng = np.random.default_rng(seed)
    probs = rng.random(50)
    labels = np.zeros(50, dtype=int)
    labels[seed] = 1
    # One lesion against the single highest background score: 1, 0.5 or 0.
    top_background = np.delete(probs, seed).max()
    expected = 1.0 if probs[seed] > top_background else (0.5 if probs[seed] == top_background else 0.0)
    assert top_k_auroc(labels, probs) == expected


@pytest.mark.parametrize("seed", range(4))
def test_top_k_auroc_all_lesion_but_one_uses_every_background_voxel(seed: int) -> None:
    rng = np.random.default_rng(seed)
    probs = np.round(rng.random(30), 1)
    labels = np.ones(30, dtype=int)
    labels[3] = 0
    assert top_k_auroc(labels, probs) == pytest.approx(roc_auc_score(labels, probs), rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_top_k_auroc_fewer_background_than_lesion(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = (rng.random(40) < 0.7).astype(int)
    probs = np.round(rng.random(40), 1)
    assert (labels == 0).sum() < (labels == 1).sum()
    assert top_k_auroc(labels, probs) == pytest.approx(roc_auc_score(labels, probs), rel=1e-12)


@pytest.mark.parametrize("labels", [np.zeros((3, 4, 5)), np.ones((3, 4, 5))], ids=["no-lesion", "all-lesion"])
def test_top_k_auroc_is_nan_without_one_class(labels: np.ndarray) -> None:
    assert math.isnan(top_k_auroc(labels, np.random.default_rng(0).random(labels.shape)))


def test_top_k_auroc_rejects_mismatched_sizes_and_nan() -> None:
    with pytest.raises(ValueError, match="elements"):
        top_k_auroc(np.ones(4), np.ones(5))
    with pytest.raises(ValueError, match="NaN"):
        top_k_auroc(np.array([1, 0, 0]), np.array([0.5, np.nan, 0.1]))


def large_sparse_volume(seed: int, dtype: type = np.float32, quantize: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A volume over 2¹⁷ voxels (so `top_k_auroc` samples) with ~0.3 % lesion, as in training."""
    rng = np.random.default_rng(seed)
    shape = (64, 48, 48 + seed % 5)
    labels = (rng.random(shape) < 0.003).astype(np.uint8)
    probs = 0.6 * rng.random(shape) ** 8
    probs[labels > 0] = rng.beta(4.0, 2.0, size=int(labels.sum()))
    if quantize is not None:
        probs = np.round(probs, quantize)
    return labels, probs.astype(dtype)


def partition_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the size of every array `np.partition` is called on from here on."""
    sizes: list[int] = []
    real = np.partition

    def spy(a: np.ndarray, kth: int, *args: object, **kwargs: object) -> np.ndarray:
        sizes.append(np.asarray(a).size)
        return real(a, kth, *args, **kwargs)

    monkeypatch.setattr(np, "partition", spy)
    return sizes


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("dtype", "quantize"), [(np.float32, None), (np.float32, 4), (np.float16, None), (np.float64, 2)])
def test_top_k_auroc_prefilter_is_exact_on_large_sparse_volumes(seed: int, dtype: type, quantize: int | None,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    labels, probs = large_sparse_volume(seed, dtype, quantize)
    expected = roc_auc_score(*naive_top_k_subset(labels, probs, np.random.default_rng(seed)))
    sizes = partition_sizes(monkeypatch)
    assert top_k_auroc(labels, probs) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # the prefilter ran: the last partition was over a few survivors, not the whole background
    assert sizes[-1] < (labels == 0).sum() // 10


def test_top_k_auroc_falls_back_to_the_full_background_when_the_sample_misleads(monkeypatch: pytest.MonkeyPatch) -> None:
    # 2¹⁸ voxels: the sample sees every fourth (stride 2¹⁸ // 2¹⁶). Sampled background scores spread over
    # [0, 1); the others sit at 0.5, below the sample's estimate, so fewer than n background voxels pass
    # the prefilter and the n highest must come from the full background.
    rng = np.random.default_rng(3)
    size = 1 << 18
    probs = np.full(size, 0.5)
    probs[::4] = rng.random(size // 4)
    labels = np.zeros(size, dtype=int)
    labels[1::97][:2000] = 1
    probs[labels > 0] = rng.random(2000)
    expected = roc_auc_score(*naive_top_k_subset(labels, probs, np.random.default_rng(0)))
    sizes = partition_sizes(monkeypatch)
    assert top_k_auroc(labels, probs) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert sizes[-1] == (labels == 0).sum()


def test_top_k_auroc_raises_on_nan_the_sample_does_not_see() -> None:
    labels, probs = large_sparse_volume(0)
    background = np.flatnonzero(labels.ravel() == 0)
    probs.flat[background[background % 2 == 1][100]] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        top_k_auroc(labels, probs)


@pytest.mark.parametrize("seed", range(15))
@pytest.mark.parametrize("quantize", [None, 1, 0])
def test_auroc_matches_sklearn(seed: int, quantize: int | None) -> None:
    labels, probs = random_volume(seed, shape=(200,), quantize=quantize)
    assert auroc(labels, probs) == pytest.approx(roc_auc_score(labels, probs), rel=1e-12, abs=1e-12)


def test_auroc_all_tied_is_one_half_and_empty_class_is_nan() -> None:
    assert auroc(np.array([1, 0, 1, 0]), np.full(4, 0.3)) == 0.5
    assert math.isnan(auroc(np.zeros(5), np.arange(5.0)))
    assert math.isnan(auroc(np.ones(5), np.arange(5.0)))


@pytest.mark.parametrize(
    ("pred", "gt", "expected"),
    [
        ([1, 1, 0, 0], [1, 0, 1, 0], 0.5),
        ([1, 1, 0, 0], [1, 1, 0, 0], 1.0),
        ([0, 0, 0, 0], [0, 1, 0, 0], 0.0),
        ([1, 0, 0, 0], [0, 0, 0, 0], math.nan),
        ([0, 0, 0, 0], [0, 0, 0, 0], math.nan),
    ],
)
def test_dice_hand_cases(pred: list[int], gt: list[int], expected: float) -> None:
    got = dice(np.array(pred, dtype=bool), np.array(gt))
    assert (math.isnan(got) and math.isnan(expected)) or got == expected


def naive_dice_sweep(labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    return np.array([dice(probs >= t, labels) for t in thresholds])


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("on_grid", [False, True])
def test_dice_sweep_equals_the_per_threshold_loop(seed: int, dtype: type, on_grid: bool) -> None:
    labels, probs = random_volume(seed, dtype=dtype)
    if on_grid:
        # Many voxels exactly on grid values, plus the extremes 0 and 1.
        rng = np.random.default_rng(seed)
        on = rng.random(probs.shape) < 0.6
        probs[on] = rng.choice(np.concatenate([THRESHOLDS, [0.0, 1.0]]), size=int(on.sum())).astype(dtype)
    np.testing.assert_array_equal(dice_sweep(labels, probs), naive_dice_sweep(labels, probs, THRESHOLDS))


def test_dice_sweep_custom_unsorted_grid_keeps_its_order() -> None:
    labels, probs = random_volume(3, quantize=2)
    grid = np.array([0.7, 0.1, 0.5, 0.3, 0.5, 0.0, 1.0])
    np.testing.assert_array_equal(dice_sweep(labels, probs, grid), naive_dice_sweep(labels, probs, grid))


def test_dice_sweep_without_lesion_is_all_nan() -> None:
    assert np.isnan(dice_sweep(np.zeros(20), np.linspace(0, 1, 20))).all()


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ([0.9, 0.1, 0.1, 0.1], (0.2, 0.9)),  # the highest Dice wins, however far from 0.5
        ([0.1, 0.8, 0.5, 0.8], (0.4, 0.8)),  # 0.4 and 0.8 tie; 0.4 is nearer 0.5
        ([0.1, 0.5, 0.8, 0.8], (0.6, 0.8)),  # 0.6 and 0.8 tie; 0.6 is nearer 0.5
        ([0.6, 0.1, 0.1, 0.6], (0.2, 0.6)),  # 0.2 and 0.8 tie, equally far from 0.5 → the lower
        ([np.nan, 0.3, 0.1, np.nan], (0.4, 0.3)),  # nan ignored
    ],
)
def test_best_threshold_breaks_ties_towards_one_half(scores: list[float], expected: tuple[float, float]) -> None:
    assert best_threshold(np.array(scores), np.array([0.2, 0.4, 0.6, 0.8])) == expected


def test_best_threshold_mirrored_grid_points_tie_to_the_lower() -> None:
    # 0.04 and 0.96 are not bit-for-bit equally far from 0.5 in binary floating point.
    scores = np.zeros(THRESHOLDS.size)
    scores[[3, 95]] = 0.7
    assert best_threshold(scores, THRESHOLDS) == (0.04, 0.7)


def test_best_threshold_rejects_all_nan_and_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="finite"):
        best_threshold(np.full(3, np.nan), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="thresholds"):
        best_threshold(np.zeros(3), THRESHOLDS)


def test_classifier_threshold_with_a_negative_tied_to_the_lowest_positive() -> None:
    labels = np.array([1, 0, 1, 0, 0])
    scores = np.array([0.3, 0.3, 0.7, 0.1, 0.2], dtype=np.float32)
    threshold = classifier_threshold(labels, scores)
    assert threshold == np.float32(0.3)
    assert (scores[labels == 1] >= threshold).all()
    # The tied negative is predicted positive: 2 of the 3 negatives are below the threshold.
    assert specificity_at(labels, scores, threshold) == pytest.approx(2 / 3)


@pytest.mark.parametrize("seed", range(10))
def test_classifier_threshold_is_the_highest_with_full_sensitivity(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = (rng.random(60) < 0.4).astype(int)
    labels[0] = 1
    scores = np.round(rng.random(60), 1)
    threshold = classifier_threshold(labels, scores)
    assert (scores[labels == 1] >= threshold).all()
    higher = np.unique(scores[scores > threshold])
    if higher.size:
        assert not (scores[labels == 1] >= higher[0]).all()
    expected_specificity = np.mean(scores[labels == 0] < threshold)
    assert specificity_at(labels, scores, threshold) == pytest.approx(expected_specificity)


@pytest.mark.parametrize("margin", [1.0, 0.5, 0.25])
def test_classifier_threshold_margin_scales_the_lowest_positive(margin: float) -> None:
    labels = np.array([1, 0, 1, 0, 1, 0])
    scores = np.array([0.4, 0.3, 0.9, 0.1, 0.6, 0.15])
    threshold = classifier_threshold(labels, scores, margin)
    assert threshold == pytest.approx(0.4 * margin)
    # Every positive passes; the lower the margin, the fewer negatives it stops.
    assert (scores[labels == 1] >= threshold).all()
    assert specificity_at(labels, scores, threshold) == pytest.approx(np.mean(scores[labels == 0] < threshold))


@pytest.mark.parametrize("margin", [0.0, -0.5, 1.01, float("nan")])
def test_classifier_threshold_refuses_a_margin_outside_zero_one(margin: float) -> None:
    with pytest.raises(ValueError, match="margin"):
        classifier_threshold(np.array([1, 0]), np.array([0.6, 0.2]), margin)


def test_classifier_threshold_without_positives_raises_and_specificity_without_negatives_is_nan() -> None:
    with pytest.raises(ValueError, match="no positive"):
        classifier_threshold(np.zeros(4), np.arange(4.0))
    assert math.isnan(specificity_at(np.ones(4), np.arange(4.0), 1.0))


def _blobs() -> tuple[np.ndarray, np.ndarray]:
    """A lesion (rim 0.55, core 0.95), a faint false blob above the rim (0.6), a confident false blob (0.97)."""
    probs = np.zeros((20, 20, 20), np.float32)
    labels = np.zeros(probs.shape, np.uint8)
    labels[2:6, 2:6, 2:6] = 1
    probs[2:6, 2:6, 2:6] = 0.55
    probs[3:5, 3:5, 3:5] = 0.95
    probs[10:14, 10:14, 10:14] = 0.6  # no plain threshold keeps the whole lesion without it
    probs[16:18, 16:18, 16:18] = 0.97  # no seed drops it without dropping the lesion too
    return labels, probs


def test_seeded_mask_drops_components_without_a_seed_voxel() -> None:
    labels, probs = _blobs()
    assert seeded_mask(probs, 0.5, 0.0).sum() == 64 + 64 + 8
    kept = seeded_mask(probs, 0.5, 0.7)
    assert kept.sum() == 64 + 8 and kept[2:6, 2:6, 2:6].all() and not kept[10:14, 10:14, 10:14].any()
    assert seeded_mask(probs, 0.5, 0.98).sum() == 0
    assert seeded_mask(probs, 0.8, 0.5).sum() == 8 + 8  # a seed below the threshold keeps every component


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_seeded_dice_grid_equals_the_per_pair_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = (rng.random((24, 20, 16)) > 0.97).astype(np.uint8)
    labels[4:9, 4:9, 4:9] = 1
    probs = np.clip(rng.normal(0.3, 0.2, labels.shape) + 0.4 * labels, 0, 1).astype(np.float32)
    thresholds, seeds = np.array([0.3, 0.5, 0.62, 0.8]), np.array([0.0, 0.5, 0.7, 0.9])
    table = seeded_dice_grid(labels, probs, thresholds, seeds)
    for i, t in enumerate(thresholds):
        for j, s in enumerate(seeds):
            assert table[i, j] == pytest.approx(dice(seeded_mask(probs, t, s), labels), abs=1e-12), (t, s)
    assert np.allclose(table[:, 0], dice_sweep(labels, probs, thresholds))  # seed 0 is the plain threshold


def test_seeded_dice_grid_and_the_choice_on_hand_blobs() -> None:
    labels, probs = _blobs()
    table = seeded_dice_grid(labels, probs, THRESHOLDS, SEED_THRESHOLDS)
    assert table.shape == (THRESHOLDS.size, SEED_THRESHOLDS.size)
    t, s, d = best_seeded_threshold(table, THRESHOLDS, SEED_THRESHOLDS)
    # plain: at most Dice 128/200 (t <= 0.55 keeps all three blobs); a seed in (0.6, 0.95] drops the faint blob
    assert table[:, 0].max() == pytest.approx(128 / 200)
    assert (t, s) == (0.5, 0.65) and d == pytest.approx(128 / 136) and d == pytest.approx(np.nanmax(table))
    assert np.isnan(seeded_dice_grid(np.zeros_like(labels), probs, THRESHOLDS, SEED_THRESHOLDS)).all()


def test_best_seeded_threshold_prefers_no_seed_on_a_tie_and_checks_shapes() -> None:
    table = np.full((3, 3), 0.5)
    assert best_seeded_threshold(table, np.array([0.4, 0.5, 0.6]), np.array([0.0, 0.6, 0.8]))[1] == 0.0
    table[1, 2] = 0.7
    assert best_seeded_threshold(table, np.array([0.4, 0.5, 0.6]), np.array([0.0, 0.6, 0.8])) == (0.5, 0.8, 0.7)
    with pytest.raises(ValueError, match="shape"):
        best_seeded_threshold(table, np.array([0.4, 0.5]), np.array([0.0, 0.6, 0.8]))
    with pytest.raises(ValueError, match="no finite"):
        best_seeded_threshold(np.full((3, 3), np.nan), np.array([0.4, 0.5, 0.6]), np.array([0.0, 0.6, 0.8]))

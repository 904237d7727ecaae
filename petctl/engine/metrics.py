"""Segmentation and classification metrics: pure array math (numpy; cc3d for components), arrays in, floats out.

Owns the model-selection metric of the paper (`top_k_auroc`: all n lesion voxels against the n
highest-scored background voxels), a tie-exact rank AUROC, Dice and its one-pass sweep over a
threshold grid, hysteresis masks (components kept only when they reach a seed) with their Dice over
a threshold × seed grid, the choice of the best segmentation threshold, and the classifier's
sensitivity-1 threshold with its specificity. Every function takes any array shape (it is
flattened), reads labels as `labels > 0`, and does no I/O and no collective communication:
callers gather arrays first, then call these.
"""

from __future__ import annotations

import math

import numpy as np

THRESHOLDS: np.ndarray = np.round(np.arange(0.01, 1.0, 0.01), 2)
"""The default segmentation threshold grid: 0.01, 0.02, ..., 0.99."""

SEED_THRESHOLDS: np.ndarray = np.round(np.concatenate([[0.0], np.arange(0.5, 0.91, 0.05)]), 2)
"""The component seed grid: 0 (off: every component kept), 0.50, 0.55, ..., 0.90.

It stops at 0.90: on a demo cohort a seed of 0.95, chosen on 14 calibration positives, dropped true
lesions on the unseen cases (Dice 0.574, false-negative volume 4.9 mL, against 0.621 and 3.0 at 0.90)."""

SEED_CONNECTIVITY = 26


def _flat_pair(labels: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels as a flat boolean mask and values flattened, checking that their sizes agree."""
    mask = np.asarray(labels).reshape(-1) > 0
    flat = np.asarray(values).reshape(-1)
    if mask.size != flat.size:
        raise ValueError(f"labels have {mask.size} elements but the scores/prediction have {flat.size}")
    return mask, flat


def _twice_rank_sum(mask_sorted: np.ndarray, scores_sorted: np.ndarray) -> int:
    """Twice the sum of the average (1-based) ranks of the positives, as an exact integer.

    A tie group occupying sorted positions [start, end) shares the average rank
    (start + 1 + end) / 2, so twice that rank is the integer start + end + 1.
    """
    num = scores_sorted.size
    is_start = np.empty(num, dtype=bool)
    is_start[0] = True
    np.not_equal(scores_sorted[1:], scores_sorted[:-1], out=is_start[1:])
    starts = np.flatnonzero(is_start)
    ends = np.append(starts[1:], num)
    positives_per_group = np.add.reduceat(mask_sorted.astype(np.int64), starts)
    return int(np.dot(positives_per_group, starts + ends + 1))


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the Mann–Whitney U statistic; tied scores count one half.

    nan when either class is empty. Raises ValueError on NaN scores (they have no rank).
    """
    mask, flat = _flat_pair(labels, scores)
    num_pos = int(np.count_nonzero(mask))
    num_neg = mask.size - num_pos
    if num_pos == 0 or num_neg == 0:
        return math.nan
    if np.isnan(flat).any():
        raise ValueError("scores contain NaN")
    order = np.argsort(flat)
    # Exact integer arithmetic up to the final division: 2U = 2·R_pos − n_pos·(n_pos + 1).
    twice_u = _twice_rank_sum(mask[order], flat[order]) - num_pos * (num_pos + 1)
    return twice_u / (2 * num_pos * num_neg)


_SAMPLE_SIZE = 1 << 16
"""Voxels in the strided sample `top_k_auroc` estimates its prefilter threshold from."""


def _top_background(flat: np.ndarray, mask: np.ndarray, num_lesion: int) -> np.ndarray:
    """The multiset of the `num_lesion` highest background scores (`flat[~mask]`), any order.

    A strided sample of about 65 k voxels estimates a threshold t a little below the n-th highest
    background score; one vectorized pass keeps the background voxels with scores not below t
    (NaN included: `~(flat < t)`), and only those few are partitioned. When fewer than n pass, the
    estimate was too high and the full background is partitioned instead, so the result is always
    exact; only the cost depends on the sample. Small volumes and large lesion fractions go
    straight to the full partition, where the prefilter would save nothing.
    """
    num_background = mask.size - num_lesion
    stride = max(1, flat.size // _SAMPLE_SIZE)
    if stride > 1:
        sample = flat[::stride][~mask[::stride]]
        # the sample's expected count above the n-th highest background score, with a margin of
        # ~4 standard deviations (binomial), so a second pass is rarely needed
        expected = num_lesion / num_background * sample.size
        take = int(math.ceil(1.5 * expected + 4.0 * math.sqrt(expected) + 8.0))
        if take < sample.size // 4:
            t = np.partition(sample, sample.size - take)[sample.size - take]
            candidates = flat[~((flat < t) | mask)]
            if candidates.size >= num_lesion:
                return np.partition(candidates, candidates.size - num_lesion)[candidates.size - num_lesion:]
    kth = num_background - num_lesion
    return np.partition(flat[~mask], kth)[kth:]


def top_k_auroc(labels: np.ndarray, probs: np.ndarray) -> float:
    """AUROC of all n lesion voxels against the n highest-scored background voxels.

    n is the number of lesion voxels (labels > 0). Background voxels tied at the selection
    boundary share one score, so which of them are taken does not change the result: only the
    multiset of the n largest background scores matters, and that is what is selected
    (`_top_background`: a threshold estimated on a sample prefilters the background in one
    vectorized pass, then an O(m) `np.partition` of the m survivors; values only, the indices are
    never needed), then `auroc` sorts just the 2n kept scores. Fewer than n background voxels:
    all of them are used. nan when there is no lesion or no background voxel.
    """
    mask, flat = _flat_pair(labels, probs)
    num_lesion = int(np.count_nonzero(mask))
    num_background = mask.size - num_lesion
    if num_lesion == 0 or num_background == 0:
        return math.nan
    lesion_scores = flat[mask]
    background_scores = _top_background(flat, mask, num_lesion) if num_background > num_lesion else flat[~mask]
    kept_scores = np.concatenate([lesion_scores, background_scores])
    kept_labels = np.zeros(kept_scores.size, dtype=bool)
    kept_labels[:num_lesion] = True
    return auroc(kept_labels, kept_scores)


def _dice_from_counts(tp: np.ndarray | int, num_pred: np.ndarray | int, num_gt: int) -> np.ndarray | float:
    """2·TP / (|pred| + |gt|); nan when the ground truth is empty (autoPET: Dice only for positives)."""
    if num_gt == 0:
        return np.full(np.shape(tp), np.nan) if np.ndim(tp) else math.nan
    return 2.0 * np.asarray(tp, dtype=np.float64) / (np.asarray(num_pred, dtype=np.float64) + num_gt)


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Binary Dice of `pred > 0` against `gt > 0`; nan when `gt` is empty (autoPET convention)."""
    gt_mask, pred_flat = _flat_pair(gt, pred)
    pred_mask = pred_flat > 0
    tp = int(np.count_nonzero(pred_mask & gt_mask))
    return float(_dice_from_counts(tp, int(np.count_nonzero(pred_mask)), int(np.count_nonzero(gt_mask))))


def dice_sweep(labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray = THRESHOLDS) -> np.ndarray:
    """Dice of `probs >= t` against `labels > 0` for every t in `thresholds`, in one pass.

    Each voxel is placed once (binary search into the sorted grid) at the number of thresholds
    it reaches; two bincounts (lesion, background) and a reverse cumulative sum then give TP and
    |pred| at every threshold. The comparison is numpy's own `probs >= t` (both promoted to
    their common dtype), so the result equals the per-threshold loop exactly. All nan when the
    volume has no lesion.
    """
    mask, flat = _flat_pair(labels, probs)
    grid = np.asarray(thresholds).reshape(-1)
    if grid.size == 0:
        raise ValueError("thresholds is empty")
    if np.isnan(grid).any():
        raise ValueError("thresholds contain NaN")
    if np.isnan(flat).any():
        raise ValueError("probabilities contain NaN")
    order = np.argsort(grid, kind="stable")
    sorted_grid = grid[order]
    num_thresholds = sorted_grid.size
    # levels[v] = how many thresholds voxel v reaches (t <= p); probs >= sorted_grid[i] iff levels > i.
    common = np.result_type(flat.dtype, sorted_grid.dtype)
    levels = np.searchsorted(sorted_grid.astype(common, copy=False), flat.astype(common, copy=False), side="right")
    counts = np.bincount(levels + mask * (num_thresholds + 1), minlength=2 * (num_thresholds + 1))
    background_hist, lesion_hist = counts[: num_thresholds + 1], counts[num_thresholds + 1 :]
    # reached[i] = count with level > i = sum of hist[i + 1:].
    lesion_reached = np.cumsum(lesion_hist[::-1])[::-1][1:]
    pred_reached = lesion_reached + np.cumsum(background_hist[::-1])[::-1][1:]
    sorted_dice = _dice_from_counts(lesion_reached, pred_reached, int(np.count_nonzero(mask)))
    result = np.empty(num_thresholds, dtype=np.float64)
    result[order] = sorted_dice
    return result


def seeded_mask(probs: np.ndarray, threshold: float, seed_threshold: float) -> np.ndarray:
    """`probs >= threshold`, keeping only the connected components that reach `seed_threshold`.

    Hysteresis thresholding: a component grows down to the lower threshold but must hold one
    voxel at or above the seed to stay. A seed at or below the threshold keeps every component.
    """
    import cc3d

    mask = np.asarray(probs) >= threshold
    if seed_threshold <= threshold or not mask.any():
        return mask
    components = cc3d.connected_components(mask.view(np.uint8), connectivity=SEED_CONNECTIVITY)
    keep = np.unique(components[np.asarray(probs) >= seed_threshold])
    lookup = np.zeros(int(components.max()) + 1, dtype=bool)
    lookup[keep[keep > 0]] = True
    return lookup[components]


def seeded_dice_grid(labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray = THRESHOLDS,
                     seeds: np.ndarray = SEED_THRESHOLDS) -> np.ndarray:
    """Dice of `seeded_mask(probs, t, s)` for every (t, s): shape (len(thresholds), len(seeds)).

    One connected-component labelling per threshold; each component's size, lesion overlap and
    peak probability then give every seed's Dice by sums, without relabelling. All nan when the
    volume has no lesion.
    """
    import cc3d

    gt = np.asarray(labels) > 0
    values = np.asarray(probs)
    if gt.shape != values.shape:
        raise ValueError(f"labels have shape {gt.shape} but the probabilities {values.shape}")
    grid, seed_grid = np.asarray(thresholds, np.float64).reshape(-1), np.asarray(seeds, np.float64).reshape(-1)
    num_gt = int(np.count_nonzero(gt))
    out = np.full((grid.size, seed_grid.size), np.nan)
    if num_gt == 0:
        return out
    plain = dice_sweep(gt, values, grid)  # a seed at or below the threshold keeps every component
    for i, t in enumerate(grid):
        out[i, :] = plain[i]
        if not (seed_grid > t).any():
            continue  # no labelling needed (seed grid [0]: the plain threshold, at dice_sweep's cost)
        mask = values >= t
        components, num = cc3d.connected_components(mask.view(np.uint8), connectivity=SEED_CONNECTIVITY, return_N=True)
        flat = components.reshape(-1)
        size = np.bincount(flat, minlength=num + 1)[1:]
        hits = np.bincount(flat[gt.reshape(-1)], minlength=num + 1)[1:]
        peak = np.zeros(num + 1, dtype=np.float64)
        inside = flat > 0
        np.maximum.at(peak, flat[inside], values.reshape(-1)[inside])
        peak = peak[1:]
        for j, s in enumerate(seed_grid):
            if s > t:
                keep = peak >= s
                out[i, j] = _dice_from_counts(int(hits[keep].sum()), int(size[keep].sum()), num_gt)
    return out


def best_threshold(mean_dice_per_threshold: np.ndarray, thresholds: np.ndarray = THRESHOLDS) -> tuple[float, float]:
    """The threshold with the highest Dice, and that Dice; nan entries are ignored.

    Ties (exactly equal Dice) go to the threshold closest to 0.5, the neutral cut of a
    sigmoid output; a remaining tie (equidistant on both sides) goes to the lower threshold.
    Raises ValueError when every Dice is nan or the lengths differ.
    """
    scores = np.asarray(mean_dice_per_threshold, dtype=np.float64).reshape(-1)
    grid = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if scores.size != grid.size:
        raise ValueError(f"{scores.size} Dice values for {grid.size} thresholds")
    if scores.size == 0 or np.isnan(scores).all():
        raise ValueError("no finite Dice value to choose a threshold from")
    best = np.nanmax(scores)
    candidates = np.flatnonzero(scores == best)
    # Rounded so that grid points mirrored about 0.5 (0.04 and 0.96) are equally close despite
    # binary floating point; lexsort's last key is the primary one.
    distance = np.round(np.abs(grid[candidates] - 0.5), 9)
    pick = candidates[np.lexsort((grid[candidates], distance))[0]]
    return float(grid[pick]), float(best)


def best_seeded_threshold(mean_dice: np.ndarray, thresholds: np.ndarray = THRESHOLDS,
                          seeds: np.ndarray = SEED_THRESHOLDS) -> tuple[float, float, float]:
    """(threshold, seed, Dice) with the highest mean Dice over a `seeded_dice_grid` table.

    Within a seed, ties follow `best_threshold`; across seeds an equal Dice goes to the lower
    seed (0, off, first): post-processing has to earn its place.
    """
    table = np.asarray(mean_dice, dtype=np.float64)
    if table.shape != (np.size(thresholds), np.size(seeds)):
        raise ValueError(f"a Dice table of shape {table.shape} for {np.size(thresholds)} thresholds × {np.size(seeds)} seeds")
    best: tuple[float, float, float] | None = None
    for j, s in enumerate(np.asarray(seeds, np.float64).reshape(-1)):
        if np.isnan(table[:, j]).all():
            continue
        t, d = best_threshold(table[:, j], thresholds)
        if best is None or d > best[2]:
            best = (t, float(s), d)
    if best is None:
        raise ValueError("no finite Dice value to choose a threshold from")
    return best


def classifier_threshold(labels: np.ndarray, scores: np.ndarray, margin: float = 1.0) -> float:
    """`margin` × the highest threshold keeping sensitivity 1.0 under `score >= threshold` (the lowest
    positive score). margin 1 is the paper's rule; below 1 the gate leaves room for a new positive
    that scores under every calibration positive (with ~15 of them, each new one does about 1 time in 16).

    Negatives tied with the threshold are predicted positive too (they satisfy `>=`); that is what
    `specificity_at` counts. Raises ValueError when there is no positive, a positive score is NaN or
    `margin` is outside (0, 1].
    """
    if not 0.0 < margin <= 1.0:
        raise ValueError(f"the gate margin must be within (0, 1] (got {margin})")
    mask, flat = _flat_pair(labels, scores)
    positive_scores = flat[mask]
    if positive_scores.size == 0:
        raise ValueError("no positive case: the sensitivity-1 threshold is undefined")
    if np.isnan(positive_scores).any():
        raise ValueError("a positive case has a NaN score")
    return float(positive_scores.min()) * margin


def specificity_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    """Fraction of negatives not predicted positive (`score >= threshold`); nan when there is no negative."""
    mask, flat = _flat_pair(labels, scores)
    negative_scores = flat[~mask]
    if negative_scores.size == 0:
        return math.nan
    num_false_positive = int(np.count_nonzero(negative_scores >= threshold))
    return (negative_scores.size - num_false_positive) / negative_scores.size

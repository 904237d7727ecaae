"""The autoPET challenge metrics per case and over a folder of predictions.

Owns the per-case definitions of the official autoPET II evaluation script (`compute_metrics`,
connected components by `cc3d` at connectivity 18): Dice on the foreground (nan when the ground
truth is empty), false-positive volume (mL of predicted components that touch no ground-truth
voxel) and false-negative volume (mL of ground-truth components that touch no predicted voxel).
`case_metrics` labels each mask once, inside the bounding box of both masks' voxels, and counts
every component's size and overlap with two bincounts; `case_metrics_loop` is the official script's per-component loop, kept as the reference
that tests and the benchmark compare against. Both are pure (arrays in, numbers out), as is
`bootstrap_intervals` (the summary's means, and a classifier's AUROC, with percentile-bootstrap
intervals over the cases), `case_lesions` (each ground-truth lesion's volume and whether the
prediction touches it: the FNV's components one by one; `case_scores` gives both from one labelling) and `detection_by_size` (the lesion-wise
sensitivity per volume bin, which shows what the case means hide: which lesions are missed). The I/O
layer below them (`evaluate_folders`, `write_csv`) matches ground-truth and prediction files by
case id, reads them with nibabel, and reports — rather than scores — a case whose prediction is
missing, misaligned or not a 0/1 mask.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from petctl.engine.metrics import dice
from petctl.errors import CaseError, PetctlError

CONNECTIVITY = 18
"""Voxels sharing a face or an edge are connected, sharing only a corner are not (autoPET)."""
NIFTI_ENDINGS = (".nii.gz", ".nii")
AFFINE_TOLERANCE_MM = 1e-3
"""Ground truth and prediction grids count as the same when their affines agree this closely."""
LESION_BINS_ML = (1.5, 5.0, 20.0)
"""Edges (mL) of the lesion-wise detection's volume bins: < 1.5, 1.5–5, 5–20 and ≥ 20 mL."""


@dataclass(frozen=True)
class CaseMetrics:
    """One case's autoPET metrics."""

    dice: float
    """Foreground Dice; nan when the ground truth is empty (a negative case)."""
    fpv_ml: float
    """Volume of the predicted components that touch no ground-truth voxel, in mL."""
    fnv_ml: float
    """Volume of the ground-truth components that touch no predicted voxel, in mL."""

    @property
    def is_positive(self) -> bool:
        """Whether the ground truth holds a lesion (Dice is defined exactly then)."""
        return not math.isnan(self.dice)


@dataclass(frozen=True)
class Summary:
    """The challenge's aggregate view of the scored cases; a mean over no case is nan."""

    num_cases: int
    num_positive: int
    num_negative: int
    mean_dice: float
    """Over positive cases."""
    mean_fpv_ml: float
    """Over all cases."""
    mean_fpv_ml_negative: float
    """Over negative cases (every predicted voxel there is a false positive)."""
    mean_fnv_ml: float
    """Over positive cases."""


@dataclass(frozen=True)
class Lesion:
    """One ground-truth lesion (an 18-connected component of the label)."""

    volume_ml: float
    detected: bool
    """Whether any predicted voxel touches it (a lesion that is not detected is all false-negative volume)."""


@dataclass(frozen=True)
class SizeBin:
    """The ground-truth lesions of one volume bin [low_ml, high_ml), and how many were detected."""

    low_ml: float
    high_ml: float
    lesions: int
    detected: int

    @property
    def sensitivity(self) -> float:
        """Detected / lesions; nan for an empty bin."""
        return self.detected / self.lesions if self.lesions else math.nan

    @property
    def label(self) -> str:
        if self.low_ml <= 0:
            return f"< {self.high_ml:g} mL"
        return f"≥ {self.low_ml:g} mL" if math.isinf(self.high_ml) else f"{self.low_ml:g}–{self.high_ml:g} mL"

    def to_json(self) -> dict[str, Any]:
        return _json_floats({"bin": self.label, "low_ml": self.low_ml, "high_ml": None if math.isinf(self.high_ml) else self.high_ml,
                             "lesions": self.lesions, "detected": self.detected, "sensitivity": self.sensitivity})


@dataclass(frozen=True)
class EvaluationResult:
    """Scored cases (sorted by case id), the cases that could not be scored, and the summary."""

    cases: dict[str, CaseMetrics]
    problems: dict[str, str]
    """Case id → why it was not scored (missing, misaligned or unreadable prediction, ...)."""
    summary: Summary
    lesions: dict[str, tuple[Lesion, ...]] = field(default_factory=dict)
    """Scored case → its ground-truth lesions (`case_lesions`)."""

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types; nan becomes null."""
        return {
            "summary": _json_floats(asdict(self.summary)),
            "cases": {case: _json_floats(asdict(m)) for case, m in self.cases.items()},
            "problems": dict(self.problems),
            "lesion_detection": [b.to_json() for b in detection_by_size(self.lesions)],
        }


def _json_floats(record: dict[str, Any]) -> dict[str, Any]:
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}


# ---------------------------------------------------------------------------------------------
# Pure metrics


def _foregrounds(gt: np.ndarray, pred: np.ndarray, voxel_ml: float) -> tuple[np.ndarray, np.ndarray]:
    """`gt > 0` and `pred > 0` as boolean masks, after checking shapes and the voxel volume."""
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth has shape {gt.shape} but the prediction has {pred.shape}")
    if not (math.isfinite(voxel_ml) and voxel_ml > 0):
        raise ValueError(f"voxel volume must be a positive number of mL, got {voxel_ml!r}")
    return gt > 0, pred > 0


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """18-connected component ids (1..N, background 0, C order) and N."""
    import cc3d

    # cc3d labels a uint8 image about twice as fast as a bool one (which it would convert)
    foreground = np.ascontiguousarray(mask).view(np.uint8)
    labels, num = cc3d.connected_components(foreground, connectivity=CONNECTIVITY, return_N=True)
    return labels, int(num)


def _foreground_box(shape: tuple[int, ...], *voxel_sets: np.ndarray) -> tuple[tuple[slice, ...], list[np.ndarray]]:
    """The bounding box of the given flat voxel indices, and each set's flat indices inside that box.

    Components never leave the box of all foreground voxels, so labelling inside it gives the
    same components as labelling the whole volume, for a fraction of the cost on a whole-body
    scan (where the lesions and the body fill a small part of the field of view).
    """
    coords = [np.unravel_index(voxels, shape) for voxels in voxel_sets]
    lo = [min(int(c[axis].min()) for c in coords if c[axis].size) for axis in range(len(shape))]
    hi = [max(int(c[axis].max()) for c in coords if c[axis].size) + 1 for axis in range(len(shape))]
    box_shape = tuple(h - l for l, h in zip(lo, hi))
    local = [np.ravel_multi_index(tuple(a - l for a, l in zip(c, lo)), box_shape) for c in coords]
    return tuple(slice(l, h) for l, h in zip(lo, hi)), local


def _component_counts(mask: np.ndarray, own: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each of `mask`'s components' size and its overlap with the other mask, in voxels (component 1..N).

    `own` and `other` are the flat indices of this mask's and the other mask's voxels. After one
    labelling, counting component ids over this mask's voxels gives every component's size, over
    the other mask's voxels its overlap: the bincounts over all voxels of the definition, without
    the background.
    """
    labels, num = _components(mask)
    labels_flat = labels.ravel()
    sizes = np.bincount(labels_flat[own], minlength=num + 1)
    overlaps = np.bincount(labels_flat[other], minlength=num + 1)
    return sizes[1:], overlaps[1:]


def _untouched_voxels(mask: np.ndarray, own: np.ndarray, other: np.ndarray) -> int:
    """Voxels of `mask`'s components that share no voxel with the other mask (`_component_counts`)."""
    sizes, overlaps = _component_counts(mask, own, other)
    return int(sizes[overlaps == 0].sum())


def _from_counts(dice_score: float, false_pos_voxels: int, false_neg_voxels: int, voxel_ml: float) -> CaseMetrics:
    return CaseMetrics(float(dice_score), false_pos_voxels * float(voxel_ml), false_neg_voxels * float(voxel_ml))


def case_scores(gt: np.ndarray, pred: np.ndarray, voxel_ml: float) -> tuple[CaseMetrics, tuple[Lesion, ...]]:
    """`case_metrics` and `case_lesions` of one case from one labelling of each mask."""
    gt_mask, pred_mask = _foregrounds(gt, pred, voxel_ml)
    gt_voxels, pred_voxels = np.flatnonzero(gt_mask), np.flatnonzero(pred_mask)
    if gt_voxels.size == 0 and pred_voxels.size == 0:
        return _from_counts(math.nan, 0, 0, voxel_ml), ()
    box, (gt_local, pred_local) = _foreground_box(gt_mask.shape, gt_voxels, pred_voxels)
    false_pos = _untouched_voxels(pred_mask[box], own=pred_local, other=gt_local)
    if gt_voxels.size == 0:
        return _from_counts(math.nan, false_pos, 0, voxel_ml), ()
    sizes, overlaps = _component_counts(gt_mask[box], own=gt_local, other=pred_local)
    true_pos = int(np.count_nonzero(gt_mask.ravel()[pred_voxels]))
    dice_score = 2.0 * true_pos / (gt_voxels.size + pred_voxels.size)
    lesions = tuple(Lesion(int(n) * float(voxel_ml), bool(o)) for n, o in zip(sizes, overlaps))
    return _from_counts(dice_score, false_pos, int(sizes[overlaps == 0].sum()), voxel_ml), lesions


def case_metrics(gt: np.ndarray, pred: np.ndarray, voxel_ml: float) -> CaseMetrics:
    """autoPET Dice, FPV and FNV of `pred > 0` against `gt > 0` (3-D arrays of one shape).

    Each mask is labelled once, inside the bounding box of both masks' voxels; sizes and
    overlaps of all components then come from two bincounts each, so the cost does not grow with
    the number of components. `voxel_ml` is one voxel's volume in mL. Raises ValueError on
    differing shapes or a voxel volume that is not positive.
    """
    return case_scores(gt, pred, voxel_ml)[0]


def case_lesions(gt: np.ndarray, pred: np.ndarray, voxel_ml: float) -> tuple[Lesion, ...]:
    """Each ground-truth lesion (18-connected component, in `case_metrics`' labelling order) with its
    volume in mL and whether a predicted voxel touches it. The undetected lesions' volumes add up
    to `case_metrics`' FNV; a negative case has none."""
    return case_scores(gt, pred, voxel_ml)[1]


def detection_by_size(lesions: Mapping[str, Iterable[Lesion]], edges: Iterable[float] = LESION_BINS_ML) -> list[SizeBin]:
    """The lesion-wise detection per volume bin (edges in mL, increasing): lesions and detected ones."""
    cuts = [float(e) for e in edges]
    if any(b <= a for a, b in zip(cuts, cuts[1:])) or any(e <= 0 for e in cuts):
        raise ValueError(f"lesion volume bin edges must be positive and increasing (got {cuts})")
    bounds = list(zip([0.0, *cuts], [*cuts, math.inf]))
    counts = [[0, 0] for _ in bounds]
    for found in lesions.values():
        for lesion in found:
            k = int(np.searchsorted(cuts, lesion.volume_ml, side="right"))
            counts[k][0] += 1
            counts[k][1] += int(lesion.detected)
    return [SizeBin(lo, hi, n, d) for (lo, hi), (n, d) in zip(bounds, counts)]


def case_metrics_loop(gt: np.ndarray, pred: np.ndarray, voxel_ml: float) -> CaseMetrics:
    """The official script's algorithm: one full-volume pass per connected component.

    For every component k: mask = labels == k; it is a false positive (negative) when
    (mask · other).sum() == 0, and then adds mask.sum() voxels. Same values as `case_metrics`;
    kept as the reference for tests and the benchmark.
    """
    gt_mask, pred_mask = _foregrounds(gt, pred, voxel_ml)

    def untouched_voxels(mask: np.ndarray, other: np.ndarray) -> int:
        labels, num = _components(mask)
        voxels = 0
        for k in range(1, num + 1):
            component = labels == k
            if (component * other).sum() == 0:
                voxels += int(component.sum())
        return voxels

    false_pos = untouched_voxels(pred_mask, gt_mask)
    false_neg = untouched_voxels(gt_mask, pred_mask)
    return _from_counts(dice(pred_mask, gt_mask), false_pos, false_neg, voxel_ml)


def voxel_volume_ml(zooms: Iterable[float]) -> float:
    """Volume of one voxel in mL from its three sizes in mm (the affine's column norms, or pixdim[1:4])."""
    spacing = [abs(float(z)) for z in list(zooms)[:3]]
    if len(spacing) != 3:
        raise ValueError(f"need three voxel sizes, got {spacing}")
    return math.prod(spacing) / 1000.0


def affine_voxel_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in mL from a NIfTI affine: the product of its column lengths (the voxel
    sizes) on an orthogonal grid, rotated or flipped, and |det| of its 3×3 part on a sheared one,
    where the product overstates it."""
    from petctl.engine.geometry import spacing_of

    m = np.asarray(affine, float)[:3, :3]
    gram = m.T @ m
    if np.abs(gram - np.diag(np.diag(gram))).max() <= 1e-6 * float(np.diag(gram).max()):
        return voxel_volume_ml(spacing_of(affine))
    return abs(float(np.linalg.det(m))) / 1000.0


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def summarize(cases: Mapping[str, CaseMetrics]) -> Summary:
    """Mean Dice and FNV over positives, mean FPV over all cases and over negatives, and counts."""
    positives = [m for m in cases.values() if m.is_positive]
    negatives = [m for m in cases.values() if not m.is_positive]
    return Summary(
        num_cases=len(cases),
        num_positive=len(positives),
        num_negative=len(negatives),
        mean_dice=_mean([m.dice for m in positives]),
        mean_fpv_ml=_mean([m.fpv_ml for m in cases.values()]),
        mean_fpv_ml_negative=_mean([m.fpv_ml for m in negatives]),
        mean_fnv_ml=_mean([m.fnv_ml for m in positives]),
    )


@dataclass(frozen=True)
class Intervals:
    """Percentile-bootstrap intervals of the summary's means (and of a classifier's AUROC), over
    cases: how far another draw of as many held-out scans would move them. (nan, nan) where a
    group is empty (the AUROC needs both)."""

    level: float
    resamples: int
    mean_dice: tuple[float, float]
    mean_fpv_ml_negative: tuple[float, float]
    mean_fnv_ml: tuple[float, float]
    classifier_auroc: tuple[float, float] | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types; nan becomes null."""
        return {k: [None if math.isnan(x) else x for x in v] if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def interval_text(bounds: Iterable[float | None] | None, digits: int) -> str | None:
    """An interval as "lo–hi" (from `Intervals` or its JSON), or None when it has no finite bounds."""
    values = list(bounds) if bounds is not None else []
    if len(values) != 2 or any(v is None or math.isnan(v) for v in values):
        return None
    return f"{values[0]:.{digits}f}–{values[1]:.{digits}f}"


def interval_suffix(bounds: Iterable[float | None] | None, digits: int) -> str:
    """' (lo–hi)' to follow a value in a table cell; empty when the interval has no finite bounds."""
    text = interval_text(bounds, digits)
    return f" ({text})" if text else ""


def _resample_counts(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    """(resamples, n): how often each of n cases is drawn in each resample of n with replacement."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64) if n else np.zeros((resamples, 0))


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    if values.size == 0 or np.isnan(values).all():
        return (math.nan, math.nan)
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return (float(lo), float(hi))


def bootstrap_intervals(cases: Mapping[str, CaseMetrics], scores: Mapping[str, float] | None = None, *,
                        level: float = 0.95, resamples: int = 2000, seed: int = 0) -> Intervals:
    """Stratified percentile-bootstrap intervals over cases: positives are drawn again from the
    positives (mean Dice, mean FNV), negatives from the negatives (mean FPV), each resample keeping
    both counts, as the summary's means are per group. With `scores` (case → classifier score) the
    AUROC of each resample too: a positive-by-negative win matrix (ties count one half) weighed by
    how often each case was drawn, so every resample costs two small matrix products.
    Deterministic for a seed; raises ValueError for a level outside (0, 1) or fewer than 2 resamples."""
    if not 0 < level < 1 or resamples < 2:
        raise ValueError(f"need 0 < level < 1 and at least 2 resamples (got {level}, {resamples})")
    names = sorted(cases)
    pos = [c for c in names if cases[c].is_positive]
    neg = [c for c in names if not cases[c].is_positive]
    rng = np.random.default_rng(seed)
    w_pos, w_neg = _resample_counts(rng, len(pos), resamples), _resample_counts(rng, len(neg), resamples)

    def means(weights: np.ndarray, values: list[float]) -> np.ndarray:
        return weights @ np.asarray(values, np.float64) / len(values) if values else np.full(resamples, math.nan)

    auc = None
    if scores is not None:
        missing = [c for c in names if c not in scores or not np.isfinite(scores[c])]
        if missing:
            raise ValueError(f"no finite classifier score for {', '.join(missing)}")
        if pos and neg:
            sp, sn = np.array([scores[c] for c in pos])[:, None], np.array([scores[c] for c in neg])[None, :]
            wins = (sp > sn) + 0.5 * (sp == sn)
            auc = _percentiles(((w_pos @ wins) * w_neg).sum(1) / (len(pos) * len(neg)), level)
        else:
            auc = (math.nan, math.nan)
    return Intervals(
        level=level,
        resamples=resamples,
        mean_dice=_percentiles(means(w_pos, [cases[c].dice for c in pos]), level),
        mean_fpv_ml_negative=_percentiles(means(w_neg, [cases[c].fpv_ml for c in neg]), level),
        mean_fnv_ml=_percentiles(means(w_pos, [cases[c].fnv_ml for c in pos]), level),
        classifier_auroc=auc,
    )


# ---------------------------------------------------------------------------------------------
# Files


PROBABILITY_SUFFIX = "_prob"
"""`predict --save-probabilities` writes `{case}_prob.nii.gz` beside `{case}.nii.gz`."""


def label_files(folder: Path, *, predictions: bool = False) -> tuple[dict[str, Path], dict[str, str]]:
    """Case id → `{case}.nii.gz` / `{case}.nii` in `folder` (other files are ignored), and the cases
    that cannot be read as one file (case id → reason: both endings present). With `predictions`,
    a `{case}_prob` file beside `{case}`'s mask is predict's probability map, not a case."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PetctlError(f"folder not found: {folder}")
    found: dict[str, Path] = {}
    twice: dict[str, str] = {}
    for path in sorted(folder.iterdir()):
        ending = next((e for e in NIFTI_ENDINGS if path.name.endswith(e)), None)
        if ending is None or path.name.startswith(".") or not path.is_file():
            continue
        case = path.name[: -len(ending)]
        if case in found:
            twice[case] = f"two files in {folder} ({found[case].name}, {path.name}); keep one"
        found[case] = path
    if predictions:
        for case in [c for c in found if c.endswith(PROBABILITY_SUFFIX) and c[: -len(PROBABILITY_SUFFIX)] in found]:
            del found[case]
            twice.pop(case, None)
    for case in twice:
        del found[case]
    return found, twice


def _skipped_by_predict(pred_dir: Path) -> dict[str, str]:
    """Case → reason for the cases the last `petctl predict` into `pred_dir` skipped (its predictions.json)."""
    import json

    try:
        skipped = json.loads((pred_dir / "predictions.json").read_text(encoding="utf-8")).get("skipped", {})
    except (OSError, ValueError, AttributeError):  # none (not petctl's predictions) or not ours to read
        return {}
    return {str(c): str(r) for c, r in skipped.items()} if isinstance(skipped, dict) else {}


def read_label(case: str, role: str, path: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """A 0/1 mask (uint8), its affine and its voxel volume in mL; CaseError naming `role` otherwise."""
    from petctl.engine.geometry import spacing_of
    from petctl.engine.nifti import MAX_VOXELS, _load, as_binary_label

    data, affine = _load(case, role, path, MAX_VOXELS)
    try:
        mask = as_binary_label(case, data)
    except CaseError as exc:
        raise CaseError(case, f"{role}: {exc.reason}") from None
    # the voxel sizes of the affine every other stage uses (calibrate, predict): they equal the
    # header's pixdim on a well-formed file, and a pixdim of 0 (nibabel reads it as 1) cannot shrink the volumes
    return mask, affine, affine_voxel_ml(affine)


def _misalignment(gt_mask: np.ndarray, gt_affine: np.ndarray, pred_mask: np.ndarray, pred_affine: np.ndarray) -> str | None:
    if pred_mask.shape != gt_mask.shape:
        return f"prediction grid {pred_mask.shape} differs from the ground-truth grid {gt_mask.shape}"
    if not np.allclose(pred_affine, gt_affine, rtol=0.0, atol=AFFINE_TOLERANCE_MM):
        worst = float(np.abs(pred_affine - gt_affine).max())
        return f"prediction affine differs from the ground-truth affine (by up to {worst:.3g} mm)"
    return None


def evaluate_folders(
    gt_dir: Path, pred_dir: Path, on_case: Callable[[str, int], None] | None = None
) -> EvaluationResult:
    """Score every ground-truth case against the prediction of the same case id.

    A missing, unreadable, misaligned (shape or affine) or non-0/1 prediction or ground truth is
    recorded in `problems` and not scored; so are a prediction without a ground truth and a case
    with both a `.nii` and a `.nii.gz` file, and a mask of a case that the last predict into
    `pred_dir` skipped (predictions.json). predict's `{case}_prob` maps are not cases. The voxel
    volume comes from the ground truth's affine. `on_case(case, total)` is called after each case.
    Raises PetctlError when a folder is missing or the ground-truth folder holds no label file.
    """
    (gt_files, gt_twice), (pred_files, pred_twice) = label_files(Path(gt_dir)), label_files(Path(pred_dir), predictions=True)
    if not gt_files and not gt_twice:
        hint = next((f" (did you mean {Path(gt_dir) / d}?)" for d in ("labelsTs", "labelsTr") if (Path(gt_dir) / d).is_dir()), "")
        raise PetctlError(f"no label files ({', '.join(NIFTI_ENDINGS)}) in {gt_dir}{hint}")
    cases: dict[str, CaseMetrics] = {}
    lesions: dict[str, tuple[Lesion, ...]] = {}
    problems: dict[str, str] = {case: f"ground truth: {reason}" for case, reason in gt_twice.items()}
    problems.update({case: f"prediction: {reason}" for case, reason in pred_twice.items() if case not in gt_files and case not in gt_twice})
    skipped = _skipped_by_predict(Path(pred_dir))
    for case, gt_path in gt_files.items():
        pred_path = pred_files.get(case)
        try:
            if case in pred_twice:
                raise CaseError(case, f"prediction: {pred_twice[case]}")
            if case in skipped and pred_path is not None:  # a mask left by an earlier predict, not by the last
                raise CaseError(case, f"the last predict into {pred_dir} skipped this case ({skipped[case]}); "
                                      f"{pred_path.name} is older")
            if pred_path is None:
                raise CaseError(case, f"no prediction (expected {Path(pred_dir) / (case + '.nii.gz')})")
            gt_mask, gt_affine, voxel_ml = read_label(case, "ground truth", gt_path)
            pred_mask, pred_affine, _ = read_label(case, "prediction", pred_path)
            reason = _misalignment(gt_mask, gt_affine, pred_mask, pred_affine)
            if reason:
                raise CaseError(case, reason)
            cases[case], lesions[case] = case_scores(gt_mask, pred_mask, voxel_ml)
        except CaseError as exc:
            problems[case] = exc.reason
        if on_case is not None:
            on_case(case, len(gt_files))
    for case in sorted(set(pred_files) - set(gt_files) - set(gt_twice)):
        problems[case] = f"prediction {pred_files[case].name} has no ground truth in {gt_dir}"
    return EvaluationResult(cases, dict(sorted(problems.items())), summarize(cases), lesions)


def write_csv(cases: Mapping[str, CaseMetrics], path: Path) -> None:
    """One row per scored case: `case,dice,fpv_ml,fnv_ml` (nan written as `nan`)."""
    import io

    from petctl.engine.registry import write_text_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["case", "dice", "fpv_ml", "fnv_ml"])
    for case, m in cases.items():
        writer.writerow([case, repr(float(m.dice)), repr(float(m.fpv_ml)), repr(float(m.fnv_ml))])
    write_text_atomic(path, table.getvalue())  # a reader never sees half a table

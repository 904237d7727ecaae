"""Patient-grouped splits stratified by lesion presence: the held-out test set and the K-fold sets.

`make_splits` is pure (no I/O): cases in, `Splits` out. A patient never straddles test and train,
nor train and val of any fold. The test set is a seeded per-stratum draw of whole patients;
the folds come from sklearn's `StratifiedGroupKFold`. Four fold sets are made: segmentation
folds over the training cases with lesions, classifier folds over all training cases, and the
same two over training + test for the merged retrain. `Splits.to_json`/`from_json` are the
typed reader and writer of `splits.json`.
"""

from __future__ import annotations

import warnings as _warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from petctl.errors import PetctlError

SPLITS_VERSION = 1


@dataclass(frozen=True)
class SplitCase:
    """One study: its case id, the patient it belongs to, and whether it has lesions."""

    case: str
    patient: str
    positive: bool


@dataclass(frozen=True)
class Fold:
    """One fold: the cases to train on and the cases to validate on (both sorted)."""

    train: list[str]
    val: list[str]

    def to_json(self) -> dict[str, list[str]]:
        return {"train": list(self.train), "val": list(self.val)}


@dataclass(frozen=True)
class Splits:
    """The test set and the four fold sets, plus what had to be adapted to a small cohort."""

    seed: int
    num_folds: int
    """The number of folds asked for; a fold set may have fewer (see `warnings`)."""
    test: list[str]
    seg_folds: list[Fold]
    """Folds over the training cases with lesions (segmentation models train on these)."""
    cls_folds: list[Fold]
    """Folds over all training cases, stratified by lesion presence (classifiers train on these)."""
    merged_seg_folds: list[Fold]
    """As `seg_folds`, over training + test (the merged retrain)."""
    merged_cls_folds: list[Fold]
    """As `cls_folds`, over training + test."""
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": SPLITS_VERSION,
            "seed": self.seed,
            "num_folds": self.num_folds,
            "test": list(self.test),
            **{name: [f.to_json() for f in getattr(self, name)] for name in _FOLD_SETS},
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_json(cls, data: Any) -> Splits:
        """Read `splits.json` content; `PetctlError` names the first malformed field."""
        if not isinstance(data, Mapping):
            raise PetctlError(f"splits: expected a JSON object, got {type(data).__name__}")
        if data.get("version") != SPLITS_VERSION:
            raise PetctlError(f"splits: unsupported version {data.get('version')!r} (expected {SPLITS_VERSION})")
        for key in ("seed", "num_folds"):
            if not isinstance(data.get(key), int) or isinstance(data.get(key), bool):
                raise PetctlError(f"splits: {key!r} should be an integer, got {data.get(key)!r}")
        folds = {name: _folds_from_json(data.get(name), name) for name in _FOLD_SETS}
        return cls(
            seed=data["seed"],
            num_folds=data["num_folds"],
            test=_strings(data.get("test"), "test"),
            warnings=_strings(data.get("warnings", []), "warnings"),
            **folds,
        )


_FOLD_SETS = ("seg_folds", "cls_folds", "merged_seg_folds", "merged_cls_folds")


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PetctlError(f"splits: {where} should be a list of strings")
    return list(value)


def _folds_from_json(value: Any, name: str) -> list[Fold]:
    if not isinstance(value, list):
        raise PetctlError(f"splits: {name} should be a list of folds")
    folds = []
    for i, fold in enumerate(value):
        if not isinstance(fold, Mapping):
            raise PetctlError(f"splits: {name}[{i}] should be an object with train and val")
        folds.append(Fold(train=_strings(fold.get("train"), f"{name}[{i}].train"),
                          val=_strings(fold.get("val"), f"{name}[{i}].val")))
    return folds


def make_splits(
    cases: Sequence[SplitCase], *, num_folds: int = 5, test_fraction: float = 0.2, seed: int = 0,
) -> Splits:
    """Split `cases` into a held-out test set and four K-fold sets, grouped by patient.

    The test set holds about `test_fraction` of the cases, drawn per stratum (patients with
    lesions, patients without), with at least one patient from each stratum that can spare one:
    two patients with lesions stay for the segmentation folds, one without for the classifier's.
    Fold sets get fewer than `num_folds` folds when there are fewer patients (said in `warnings`).
    `PetctlError` when fewer than 2 patients with lesions are left for the segmentation folds.
    """
    _check(cases, num_folds, test_fraction)
    notes: list[str] = []
    rng = np.random.default_rng(seed)
    test_patients = _draw_test_patients(cases, test_fraction, rng)
    train_cases = [c for c in cases if c.patient not in test_patients]
    test = sorted(c.case for c in cases if c.patient in test_patients)
    with_lesions = {c.patient for c in cases if c.positive}
    if test_fraction > 0 and len(with_lesions) == 2:
        notes.append("only 2 patients with lesions: both stay for the segmentation folds, so the test set has no positive "
                     "(calibrate needs one)")
    if not any(not c.positive for c in cases):
        notes.append("the cohort has no negative cases: classifier folds have one class")

    def fold_set(subset: Sequence[SplitCase], what: str, *, positives_only: bool) -> list[Fold]:
        if positives_only:
            subset = [c for c in subset if c.positive]
            if len({c.patient for c in subset}) < 2:
                raise PetctlError(
                    f"{what}: need at least 2 patients with lesions, found {len({c.patient for c in subset})} "
                    f"(the cohort has {len({c.patient for c in cases if c.positive})}, some go to the test set)"
                )
        return _grouped_folds(subset, num_folds, seed, what, notes)

    return Splits(
        seed=seed,
        num_folds=num_folds,
        test=test,
        seg_folds=fold_set(train_cases, "seg folds", positives_only=True),
        cls_folds=fold_set(train_cases, "cls folds", positives_only=False),
        merged_seg_folds=fold_set(cases, "merged seg folds", positives_only=True),
        merged_cls_folds=fold_set(cases, "merged cls folds", positives_only=False),
        warnings=notes,
    )


def _check(cases: Sequence[SplitCase], num_folds: int, test_fraction: float) -> None:
    if not cases:
        raise PetctlError("no cases to split")
    if num_folds < 2:
        raise PetctlError(f"num_folds must be at least 2, got {num_folds}")
    if not 0.0 <= test_fraction < 1.0:
        raise PetctlError(f"test_fraction must be in [0, 1), got {test_fraction}")
    seen: set[str] = set()
    for c in cases:
        if c.case in seen:
            raise PetctlError(f"case {c.case!r} is listed twice")
        seen.add(c.case)


def _draw_test_patients(cases: Sequence[SplitCase], test_fraction: float, rng: np.random.Generator) -> set[str]:
    """Whole patients for the test set, drawn separately from each stratum (with lesions, without).

    In each stratum, patients are visited in a seeded order and taken while that brings the
    stratum's test case count closer to `test_fraction` of its cases. A stratum gives at least one
    patient when it can keep enough for training: two with lesions (the segmentation folds need
    two), one without.
    """
    if test_fraction == 0.0:
        return set()
    sizes: dict[str, int] = {}
    positive: dict[str, bool] = {}
    for c in cases:
        sizes[c.patient] = sizes.get(c.patient, 0) + 1
        positive[c.patient] = positive.get(c.patient, False) or c.positive
    chosen: set[str] = set()
    for stratum in (True, False):
        patients = sorted(p for p in sizes if positive[p] is stratum)
        keep = 2 if stratum else 1
        if len(patients) < keep + 1:
            continue
        order = [patients[i] for i in rng.permutation(len(patients))]
        target = test_fraction * sum(sizes[p] for p in patients)
        taken, count = [order[0]], sizes[order[0]]
        for p in order[1:]:
            if len(taken) == len(patients) - keep:
                break
            if abs(count + sizes[p] - target) < abs(count - target):
                taken.append(p)
                count += sizes[p]
        chosen.update(taken)
    return chosen


def _grouped_folds(
    subset: Sequence[SplitCase], num_folds: int, seed: int, what: str, notes: list[str],
) -> list[Fold]:
    """`StratifiedGroupKFold` over `subset` (patients as groups, lesion/no lesion as classes)."""
    from sklearn.model_selection import StratifiedGroupKFold

    ordered = sorted(subset, key=lambda c: c.case)
    names = np.array([c.case for c in ordered])
    labels = np.array([int(c.positive) for c in ordered])
    groups = np.array([c.patient for c in ordered])
    num_groups = len(set(groups.tolist()))
    # sklearn also refuses more folds than the largest class has cases.
    largest_class = int(np.bincount(labels).max())
    k = min(num_folds, num_groups, largest_class)
    if k < num_folds:
        notes.append(f"{what}: {num_groups} patients, {len(ordered)} cases allow only {k} of {num_folds} folds")
    if k < 2:
        raise PetctlError(f"{what}: need at least 2 patients, found {num_groups}")
    for label, name in ((1, "with lesions"), (0, "without lesions")):
        label_groups = len(set(groups[labels == label].tolist()))
        if 0 < label_groups < k:
            notes.append(f"{what}: only {label_groups} patients {name} for {k} folds; some folds validate on none")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore", UserWarning)  # "least populated class" is said in notes above
        folds = [
            Fold(train=sorted(names[tr].tolist()), val=sorted(names[va].tolist()))
            for tr, va in splitter.split(names, labels, groups)
        ]
    non_empty = [f for f in folds if f.val]
    if len(non_empty) < len(folds):
        notes.append(f"{what}: {len(folds) - len(non_empty)} folds came out empty and were dropped")
    return non_empty

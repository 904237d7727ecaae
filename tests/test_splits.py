"""Patient-grouped, stratified splits: grouping, stratification, leakage, determinism, JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from petctl.engine.splits import Fold, SplitCase, Splits, make_splits
from petctl.errors import PetctlError

FOLD_SETS = ("seg_folds", "cls_folds", "merged_seg_folds", "merged_cls_folds")


def cohort(num_pos: int, num_neg: int, *, studies: int = 1, mixed: int = 0, seed: int = 0) -> list[SplitCase]:
    """`num_pos` patients with lesions, `num_neg` without, each with 1..`studies` studies.

    `mixed` of the positive patients also get one study without lesions.
    """
    rng = np.random.default_rng(seed)
    cases = []
    for p in range(num_pos + num_neg):
        positive = p < num_pos
        for s in range(int(rng.integers(1, studies + 1))):
            cases.append(SplitCase(f"case{p:03d}_{s}", f"pat{p:03d}", positive))
        if positive and p < mixed:
            cases.append(SplitCase(f"case{p:03d}_neg", f"pat{p:03d}", False))
    return cases


COHORTS = {
    "balanced": cohort(20, 20),
    "multi-study": cohort(15, 12, studies=3, seed=1),
    "mixed-patients": cohort(12, 10, studies=2, mixed=5, seed=2),
    "imbalanced": cohort(30, 6, studies=2, seed=3),
}


def _patient(cases: list[SplitCase]) -> dict[str, str]:
    return {c.case: c.patient for c in cases}


def _positive(cases: list[SplitCase]) -> dict[str, bool]:
    return {c.case: c.positive for c in cases}


@pytest.fixture(params=sorted(COHORTS), name="cases")
def _cases(request: pytest.FixtureRequest) -> list[SplitCase]:
    return COHORTS[request.param]


@pytest.mark.parametrize("seed", [0, 7])
def test_no_patient_in_two_places(cases: list[SplitCase], seed: int) -> None:
    splits = make_splits(cases, seed=seed)
    patient = _patient(cases)
    test_patients = {patient[c] for c in splits.test}
    for name in FOLD_SETS:
        for fold in getattr(splits, name):
            train_p, val_p = {patient[c] for c in fold.train}, {patient[c] for c in fold.val}
            assert not train_p & val_p, name
            if not name.startswith("merged"):
                assert not (train_p | val_p) & test_patients, name


def test_no_test_leakage_and_exact_cover(cases: list[SplitCase]) -> None:
    splits = make_splits(cases, seed=3)
    everything = sorted(c.case for c in cases)
    positives = sorted(c.case for c in cases if c.positive)
    test = set(splits.test)
    train = [c for c in everything if c not in test]
    expected = {
        "cls_folds": train,
        "seg_folds": [c for c in positives if c not in test],
        "merged_cls_folds": everything,
        "merged_seg_folds": positives,
    }
    for name, members in expected.items():
        folds = getattr(splits, name)
        vals = [c for fold in folds for c in fold.val]
        assert sorted(vals) == members, name  # each case validated exactly once
        for fold in folds:
            assert sorted(fold.train + fold.val) == members, name
            assert fold.train == sorted(fold.train) and fold.val == sorted(fold.val)
            if not name.startswith("merged"):
                assert not test & (set(fold.train) | set(fold.val)), name
    assert splits.test == sorted(splits.test)
    assert len(splits.seg_folds) == len(splits.cls_folds) == 5


def test_test_set_size_and_both_classes(cases: list[SplitCase]) -> None:
    splits = make_splits(cases, test_fraction=0.2, seed=0)
    positive = _positive(cases)
    assert any(positive[c] for c in splits.test)
    assert any(not positive[c] for c in splits.test)
    assert abs(len(splits.test) - 0.2 * len(cases)) <= 0.1 * len(cases) + 1


@pytest.mark.parametrize("seed", range(5))
def test_cls_folds_stratified(seed: int) -> None:
    cases = COHORTS["balanced"]
    splits = make_splits(cases, seed=seed)
    positive = _positive(cases)
    for fold in splits.cls_folds + splits.merged_cls_folds:
        labels = {positive[c] for c in fold.val}
        assert labels == {True, False}
        num_pos = sum(positive[c] for c in fold.val)
        assert 1 <= num_pos <= len(fold.val) - 1


def test_deterministic_per_seed() -> None:
    cases = COHORTS["multi-study"]
    assert make_splits(cases, seed=11) == make_splits(list(reversed(cases)), seed=11)
    a, b = make_splits(cases, seed=11), make_splits(cases, seed=12)
    assert a.test != b.test or a.cls_folds != b.cls_folds


def test_one_case_per_fold() -> None:
    cases = [SplitCase(f"c{i}", f"p{i}", True) for i in range(5)]
    splits = make_splits(cases, num_folds=5, test_fraction=0.0)
    assert splits.test == []
    assert [len(f.val) for f in splits.seg_folds] == [1] * 5
    assert sorted(c for f in splits.seg_folds for c in f.val) == [f"c{i}" for i in range(5)]
    assert splits.merged_seg_folds == splits.seg_folds


def test_fewer_patients_than_folds_reduces_folds_with_warning() -> None:
    # 3 patients with lesions (one to test), 3 without; 5 folds asked.
    cases = cohort(3, 3, studies=2, seed=4)
    splits = make_splits(cases, num_folds=5, seed=0)
    assert len(splits.seg_folds) == 2
    assert 2 <= len(splits.cls_folds) < 5
    assert any(w.startswith("seg folds:") for w in splits.warnings)
    assert any(w.startswith("cls folds:") for w in splits.warnings)
    for name in FOLD_SETS:
        assert all(f.val and f.train for f in getattr(splits, name)), name


def test_all_positive_cohort() -> None:
    cases = cohort(12, 0, studies=2, seed=5)
    splits = make_splits(cases, seed=0)
    assert splits.test and len(splits.seg_folds) == 5
    assert [f.val for f in splits.seg_folds] == [f.val for f in splits.cls_folds]
    assert any("no negative cases" in w for w in splits.warnings)


def test_too_few_positive_patients_refused() -> None:
    with pytest.raises(PetctlError, match="at least 2 patients with lesions"):
        make_splits(cohort(1, 10), seed=0)


def test_two_positive_patients_both_stay_for_the_segmentation_folds() -> None:
    """With 2 patients with lesions, drawing one for the test set would leave the segmentation folds
    one (which they refuse): both stay, the negatives still give the test set its share, and a
    warning says the test set has no positive."""
    cases = cohort(2, 10, seed=3)
    splits = make_splits(cases, seed=0)
    positive = {c.case for c in cases if c.positive}
    assert splits.test and not positive & set(splits.test)
    assert {c for f in splits.seg_folds for c in f.val} == positive and len(splits.seg_folds) == 2
    assert any("only 2 patients with lesions" in w for w in splits.warnings)
    three = make_splits(cohort(3, 10, seed=3), seed=0)  # 3: one can go to the test set
    assert any(c.positive and c.case in three.test for c in cohort(3, 10, seed=3))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"num_folds": 1}, "num_folds"), ({"test_fraction": 1.0}, "test_fraction"), ({"test_fraction": -0.1}, "test_fraction")],
)
def test_bad_arguments_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(PetctlError, match=message):
        make_splits(COHORTS["balanced"], **kwargs)


def test_duplicate_and_empty_refused() -> None:
    with pytest.raises(PetctlError, match="twice"):
        make_splits([SplitCase("a", "p", True), SplitCase("a", "q", True)])
    with pytest.raises(PetctlError, match="no cases"):
        make_splits([])


def test_json_round_trip() -> None:
    splits = make_splits(cohort(3, 3, studies=2, seed=4), seed=2)
    data = json.loads(json.dumps(splits.to_json()))
    assert data["version"] == 1 and data["seed"] == 2 and data["num_folds"] == 5
    assert set(data) >= {"test", *FOLD_SETS}
    assert Splits.from_json(data) == splits


def _malformed(change: str) -> dict[str, object]:
    data = make_splits(COHORTS["balanced"], seed=0).to_json()
    if change == "version":
        data["version"] = 2
    elif change == "seed":
        data["seed"] = "0"
    elif change == "test":
        data["test"] = [1, 2]
    elif change == "missing":
        del data["cls_folds"]
    elif change == "fold":
        data["seg_folds"][0] = ["a"]
    elif change == "val":
        data["merged_seg_folds"][1]["val"] = "case000_0"
    return data


@pytest.mark.parametrize("change", ["version", "seed", "test", "missing", "fold", "val"])
def test_malformed_json_refused(change: str) -> None:
    with pytest.raises(PetctlError):
        Splits.from_json(_malformed(change))
    with pytest.raises(PetctlError):
        Splits.from_json([])


def test_fold_is_frozen() -> None:
    fold = Fold(train=["a"], val=["b"])
    with pytest.raises(AttributeError):
        fold.val = []  # type: ignore[misc]

"""autoPET metrics against their definitions: hand cases, 18- vs 26-neighbours, the loop, folders, CLI."""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from petctl.engine.evaluate import (
    CaseMetrics,
    Lesion,
    SizeBin,
    bootstrap_intervals,
    case_lesions,
    detection_by_size,
    interval_suffix,
    interval_text,
    case_metrics,
    case_metrics_loop,
    evaluate_folders,
    summarize,
    voxel_volume_ml,
    write_csv,
)
from petctl.errors import PetctlError

IMPLEMENTATIONS = [case_metrics, case_metrics_loop]
NEIGHBOURS = [d for d in itertools.product((-1, 0, 1), repeat=3) if d != (0, 0, 0)]


def same(a: CaseMetrics, b: CaseMetrics) -> bool:
    """Equal metrics, nan equal to nan (volumes are exact integer counts times the voxel volume)."""
    return all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip((a.dice, a.fpv_ml, a.fnv_ml), (b.dice, b.fpv_ml, b.fnv_ml)))


def reference_metrics(gt: np.ndarray, pred: np.ndarray, voxel_ml: float) -> CaseMetrics:
    """The definition with an independent labeller: scipy with the 18-neighbourhood (faces + edges)."""
    structure = ndimage.generate_binary_structure(3, 2)
    g, p = gt > 0, pred > 0

    def untouched(mask: np.ndarray, other: np.ndarray) -> int:
        labels, num = ndimage.label(mask, structure=structure)
        return sum(int((labels == k).sum()) for k in range(1, num + 1) if not (other & (labels == k)).any())

    d = math.nan if not g.any() else 2.0 * (g & p).sum() / (g.sum() + p.sum())
    return CaseMetrics(float(d), untouched(p, g) * voxel_ml, untouched(g, p) * voxel_ml)


def ball(shape: tuple[int, int, int], centre: tuple[int, int, int], radius: float) -> np.ndarray:
    zz, yy, xx = np.indices(shape)
    return (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= radius**2


# ---------------------------------------------------------------------------------------------
# Hand cases

SHAPE = (8, 9, 10)
LESION = ball(SHAPE, (4, 4, 4), 2.0)  # 33 voxels
FAR = ball(SHAPE, (1, 1, 8), 1.0)  # 7 voxels, not touching LESION


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    ("gt", "pred", "expected"),
    [
        pytest.param(np.zeros(SHAPE), np.zeros(SHAPE), CaseMetrics(math.nan, 0.0, 0.0), id="both-empty"),
        pytest.param(np.zeros(SHAPE), FAR, CaseMetrics(math.nan, 7 * 0.5, 0.0), id="empty-gt"),
        pytest.param(LESION, np.zeros(SHAPE), CaseMetrics(0.0, 0.0, 33 * 0.5), id="empty-prediction"),
        pytest.param(LESION, LESION, CaseMetrics(1.0, 0.0, 0.0), id="perfect"),
        pytest.param(LESION, FAR, CaseMetrics(0.0, 7 * 0.5, 33 * 0.5), id="disjoint"),
        pytest.param(LESION | FAR, LESION, CaseMetrics(2 * 33 / (40 + 33), 0.0, 7 * 0.5), id="missed-lesion"),
        pytest.param(LESION, LESION | FAR, CaseMetrics(2 * 33 / (40 + 33), 7 * 0.5, 0.0), id="extra-blob"),
    ],
)
def test_hand_cases(impl, gt: np.ndarray, pred: np.ndarray, expected: CaseMetrics) -> None:
    result = impl(gt, pred, 0.5)
    assert same(result, expected), result
    assert result.is_positive == bool(np.any(gt))


def test_partial_overlap_is_not_a_false_positive_or_negative() -> None:
    """One voxel of overlap makes a whole component a hit, however large the rest (autoPET)."""
    gt = np.zeros(SHAPE, np.uint8)
    gt[2:6, 2:6, 2:4] = 1
    pred = np.zeros(SHAPE, np.uint8)
    pred[5:8, 5:9, 3:9] = 1  # shares voxels (5, 5, 3) only
    result = case_metrics(gt, pred, 1.0)
    assert result.fpv_ml == 0.0 and result.fnv_ml == 0.0
    assert result.dice == pytest.approx(2 * 1 / (gt.sum() + pred.sum()))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("role", ["prediction", "ground truth"])
@pytest.mark.parametrize("offset", NEIGHBOURS, ids=lambda d: "".join("-0+"[v + 1] for v in d))
def test_corner_neighbours_are_separate_components(impl, role: str, offset: tuple[int, int, int]) -> None:
    """A voxel touching the shared lesion only at a corner is its own 18-component; at a face or edge it is not."""
    shared = np.zeros((5, 5, 5), np.uint8)
    shared[2, 2, 2] = 1
    extra = shared.copy()
    extra[tuple(2 + d for d in offset)] = 1
    is_corner = sum(map(abs, offset)) == 3
    if role == "prediction":
        result = impl(shared, extra, 2.0)
        assert result.fpv_ml == (2.0 if is_corner else 0.0)
        assert result.fnv_ml == 0.0
    else:
        result = impl(extra, shared, 2.0)
        assert result.fnv_ml == (2.0 if is_corner else 0.0)
        assert result.fpv_ml == 0.0
    assert result.dice == pytest.approx(2 / 3)


def test_corner_chain_of_false_positives() -> None:
    """A diagonal chain of corner-touching voxels next to a lesion: all false positives but the one on it."""
    gt = np.zeros((6, 6, 6), np.uint8)
    gt[0, 0, 0] = 1
    pred = np.zeros_like(gt)
    for i in range(6):
        pred[i, i, i] = 1
    assert case_metrics(gt, pred, 1.0).fpv_ml == 5.0
    pred[1, 1, 0] = 1  # links (0,0,0) and (1,1,1) through edges: one more voxel, both now hit
    assert case_metrics(gt, pred, 1.0).fpv_ml == 4.0


def random_masks(seed: int, shape: tuple[int, int, int] = (10, 11, 12)) -> tuple[np.ndarray, np.ndarray]:
    """Sparse noise (many corner/edge contacts) or smoothed blobs, with correlated predictions."""
    rng = np.random.default_rng(seed)
    if seed % 2:
        gt = rng.random(shape) < rng.uniform(0.02, 0.25)
        pred = np.where(rng.random(shape) < 0.6, gt, rng.random(shape) < rng.uniform(0.02, 0.25))
    else:
        gt = ndimage.gaussian_filter(rng.random(shape), 1.0) > rng.uniform(0.52, 0.6)
        pred = ndimage.gaussian_filter(rng.random(shape), 1.0) > rng.uniform(0.52, 0.6)
        pred |= ndimage.binary_erosion(gt) if rng.random() < 0.5 else False
    return gt.astype(np.uint8), pred.astype(rng.choice([np.uint8, np.float32, bool]))


@pytest.mark.parametrize("seed", range(60))
def test_fast_equals_loop_and_definition_on_random_masks(seed: int) -> None:
    gt, pred = random_masks(seed)
    voxel_ml = float(np.random.default_rng(seed).uniform(0.001, 0.05))
    fast = case_metrics(gt, pred, voxel_ml)
    assert same(fast, case_metrics_loop(gt, pred, voxel_ml))
    expected = reference_metrics(gt, pred, voxel_ml)
    assert fast.dice == pytest.approx(expected.dice, nan_ok=True)
    assert fast.fpv_ml == pytest.approx(expected.fpv_ml) and fast.fnv_ml == pytest.approx(expected.fnv_ml)


@pytest.mark.parametrize("seed", range(30))
def test_each_lesion_against_an_independent_labelling_and_the_fnv(seed: int) -> None:
    gt, pred = random_masks(seed)
    voxel_ml = float(np.random.default_rng(seed).uniform(0.001, 0.05))
    lesions = case_lesions(gt, pred, voxel_ml)
    labels, num = ndimage.label(gt > 0, structure=ndimage.generate_binary_structure(3, 2))
    expected = sorted((int((labels == k).sum()), bool((pred[labels == k] > 0).any())) for k in range(1, num + 1))
    assert sorted((round(x.volume_ml / voxel_ml), x.detected) for x in lesions) == expected
    # the lesions nothing touches are the false-negative volume, component for component
    missed = sum(x.volume_ml for x in lesions if not x.detected)
    assert missed == pytest.approx(case_metrics(gt, pred, voxel_ml).fnv_ml, abs=1e-12)
    assert case_lesions(np.zeros_like(gt), pred, voxel_ml) == ()


def test_detection_by_size_counts_each_lesion_in_its_bin() -> None:
    lesions = {"a": (Lesion(0.75, False), Lesion(1.5, True), Lesion(4.99, True)),  # 1.5 opens the second bin
               "b": (Lesion(20.0, True), Lesion(90.0, False), Lesion(1.49, True)), "neg": ()}
    bins = detection_by_size(lesions)
    assert [(b.label, b.lesions, b.detected) for b in bins] == [("< 1.5 mL", 2, 1), ("1.5–5 mL", 2, 2), ("5–20 mL", 0, 0),
                                                                 ("≥ 20 mL", 2, 1)]
    assert [b.sensitivity for b in bins if b.lesions] == [0.5, 1.0, 0.5] and math.isnan(bins[2].sensitivity)
    assert bins[2].to_json() == {"bin": "5–20 mL", "low_ml": 5.0, "high_ml": 20.0, "lesions": 0, "detected": 0, "sensitivity": None}
    assert bins[3].to_json()["high_ml"] is None and SizeBin(0.0, 2.0, 1, 1).label == "< 2 mL"
    assert [b.lesions for b in detection_by_size(lesions, edges=(1.0,))] == [1, 5]
    for edges in ((5.0, 1.5), (0.0, 1.0), (1.0, 1.0)):
        with pytest.raises(ValueError, match="increasing"):
            detection_by_size(lesions, edges)
    assert [b.lesions for b in detection_by_size({})] == [0, 0, 0, 0]


@pytest.mark.parametrize("seed", range(12))
def test_small_masks_in_a_large_volume(seed: int) -> None:
    """Labelling inside the foreground box: the same metrics wherever the masks sit, edges included."""
    gt, pred = random_masks(seed, shape=(5, 6, 7))
    rng = np.random.default_rng(seed)
    big_gt, big_pred = np.zeros((16, 17, 18), np.uint8), np.zeros((16, 17, 18), np.uint8)
    corner = [int(rng.choice([0, rng.integers(0, b - s), b - s])) for b, s in zip(big_gt.shape, gt.shape)]
    box = tuple(slice(c, c + s) for c, s in zip(corner, gt.shape))
    big_gt[box], big_pred[box] = gt, pred
    if seed % 3 == 0:
        big_pred[box] = 0
        big_pred[-1, -1, -1] = 1  # a lone false positive in the far corner stretches the box
    expected = case_metrics_loop(big_gt, big_pred, 0.01)
    assert same(case_metrics(big_gt, big_pred, 0.01), expected)
    if seed % 3:
        assert same(expected, case_metrics_loop(gt, pred, 0.01))


def test_fortran_order_input_from_nibabel() -> None:
    gt, pred = random_masks(3)
    assert same(case_metrics(np.asfortranarray(gt), np.asfortranarray(pred), 1.0), case_metrics(gt, pred, 1.0))


@pytest.mark.parametrize(("gt_shape", "voxel_ml"), [((4, 4, 5), 1.0), ((4, 4, 4), 0.0), ((4, 4, 4), math.nan)])
def test_bad_input_raises(gt_shape: tuple[int, int, int], voxel_ml: float) -> None:
    with pytest.raises(ValueError):
        case_metrics(np.zeros(gt_shape), np.zeros((4, 4, 4)), voxel_ml)


@pytest.mark.parametrize(
    ("zooms", "expected"),
    [((1.0, 1.0, 1.0), 0.001), ((2.0364, 2.0364, 3.0), 2.0364 * 2.0364 * 3.0 / 1000), ((4.0, -2.0, 3.0, 1.5), 0.024)],
)
def test_voxel_volume_ml(zooms: tuple[float, ...], expected: float) -> None:
    assert voxel_volume_ml(zooms) == pytest.approx(expected, rel=1e-12)


def test_summary_means() -> None:
    cases = {
        "p1": CaseMetrics(0.8, 1.0, 2.0),
        "p2": CaseMetrics(0.4, 3.0, 0.0),
        "n1": CaseMetrics(math.nan, 5.0, 0.0),
    }
    s = summarize(cases)
    assert (s.num_cases, s.num_positive, s.num_negative) == (3, 2, 1)
    assert s.mean_dice == pytest.approx(0.6) and s.mean_fnv_ml == pytest.approx(1.0)
    assert s.mean_fpv_ml == pytest.approx(3.0) and s.mean_fpv_ml_negative == pytest.approx(5.0)
    assert math.isnan(summarize({"p": CaseMetrics(1.0, 0.0, 0.0)}).mean_fpv_ml_negative)


# ---------------------------------------------------------------------------------------------
# Folders, CSV and the command

ZOOMS = (2.0, 2.5, 3.0)  # 0.015 mL per voxel
VOXEL_ML = 0.015


def write(path: Path, data: np.ndarray, zooms: tuple[float, float, float] = ZOOMS, shift: float = 0.0) -> None:
    affine = np.diag([*zooms, 1.0])
    affine[0, 3] = shift
    nib.Nifti1Image(np.asarray(data), affine).to_filename(str(path))


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """labelsTs with five cases; predictions: good, perfect, missing, misaligned grid/affine, 0/1/2, stray."""
    gt_dir, pred_dir = tmp_path / "labelsTs", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    lesion = (LESION | FAR).astype(np.uint8)
    for case in ("pos", "perfect", "missing", "grid", "moved", "values"):
        write(gt_dir / f"{case}.nii.gz", lesion)
    write(gt_dir / "neg.nii", np.zeros(SHAPE, np.uint8))
    write(pred_dir / "pos.nii.gz", LESION.astype(np.uint8))  # misses FAR (7 voxels)
    write(pred_dir / "perfect.nii.gz", lesion.astype(np.float32))
    write(pred_dir / "neg.nii.gz", FAR.astype(np.uint8))
    write(pred_dir / "grid.nii.gz", lesion[:, :, :-1])
    write(pred_dir / "moved.nii.gz", lesion, shift=2.0)
    write(pred_dir / "values.nii.gz", lesion * 2)
    write(pred_dir / "stray.nii.gz", lesion)
    (pred_dir / "plans.json").write_text("{}")  # nnU-Net writes these beside its predictions
    write(pred_dir / "pos_prob.nii.gz", LESION.astype(np.float32) * 0.9)  # predict --save-probabilities: not a case
    # a case with both endings in one folder (which one is meant?): in the ground truth, in the predictions
    for path in ("labelsTs/labelsTs2.nii", "labelsTs/labelsTs2.nii.gz", "pred/labelsTs2.nii.gz",
                 "pred/pred2.nii", "pred/pred2.nii.gz", "labelsTs/pred2.nii.gz"):
        write(tmp_path / path, lesion)
    return gt_dir, pred_dir


def test_evaluate_folders_scores_good_cases_and_reports_the_rest(folders: tuple[Path, Path]) -> None:
    result = evaluate_folders(*folders)
    assert list(result.cases) == ["neg", "perfect", "pos"]
    assert same(result.cases["pos"], CaseMetrics(2 * 33 / 73, 0.0, 7 * VOXEL_ML))
    assert same(result.cases["perfect"], CaseMetrics(1.0, 0.0, 0.0))
    assert same(result.cases["neg"], CaseMetrics(math.nan, 7 * VOXEL_ML, 0.0))
    assert set(result.problems) == {"missing", "grid", "moved", "values", "stray", "labelsTs2", "pred2"}
    assert result.problems["labelsTs2"].startswith("ground truth: two files") and "keep one" in result.problems["labelsTs2"]
    assert result.problems["pred2"].startswith("prediction: two files")
    assert "no prediction" in result.problems["missing"]
    assert "grid" in result.problems["grid"] and "affine" in result.problems["moved"]
    assert "0/1" in result.problems["values"] and "prediction" in result.problems["values"]
    assert "no ground truth" in result.problems["stray"]
    assert result.summary.num_cases == 3 and result.summary.mean_fpv_ml_negative == pytest.approx(7 * VOXEL_ML)
    payload = json.loads(json.dumps(result.to_json(), allow_nan=False))
    assert payload["cases"]["neg"]["dice"] is None
    # pos: LESION found, FAR (7 voxels) missed; perfect: both found; neg: none
    assert {c: sorted(v, key=lambda x: x.volume_ml) for c, v in result.lesions.items()} == {
        "pos": [Lesion(7 * VOXEL_ML, False), Lesion(33 * VOXEL_ML, True)],
        "perfect": [Lesion(7 * VOXEL_ML, True), Lesion(33 * VOXEL_ML, True)], "neg": []}
    assert payload["lesion_detection"][0] == {"bin": "< 1.5 mL", "low_ml": 0.0, "high_ml": 1.5, "lesions": 4, "detected": 3,
                                              "sensitivity": 0.75}


def test_an_older_mask_of_a_case_the_last_predict_skipped_is_not_scored(folders: tuple[Path, Path]) -> None:
    gt_dir, pred_dir = folders
    (pred_dir / "predictions.json").write_text(json.dumps(
        {"written": {"perfect": {}}, "skipped": {"pos": "PET is not a readable NIfTI", "missing": "CT missing"}}))
    result = evaluate_folders(gt_dir, pred_dir)
    assert "pos" not in result.cases and "perfect" in result.cases
    assert result.problems["pos"] == (f"the last predict into {pred_dir} skipped this case (PET is not a readable NIfTI); "
                                      "pos.nii.gz is older")
    assert "no prediction" in result.problems["missing"]  # no mask at all: said as before
    (pred_dir / "predictions.json").write_text("not json")  # not petctl's: scored as any folder
    assert "pos" in evaluate_folders(gt_dir, pred_dir).cases


def test_voxel_volume_comes_from_the_affine_not_a_zero_pixdim(tmp_path: Path) -> None:
    """A header whose pixdim is 0 (nibabel reads it as 1 mm) beside a 2 × 2.5 × 3 mm sform."""
    import struct

    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    for folder, data in ((gt_dir, LESION | FAR), (pred_dir, LESION)):
        path = folder / "case.nii"
        write(path, data.astype(np.uint8))
        with path.open("r+b") as f:
            f.seek(80)  # pixdim[1:4] of the NIfTI-1 header
            f.write(struct.pack("<3f", 0.0, 0.0, 0.0))
    assert nib.load(str(gt_dir / "case.nii")).header.get_zooms() == (1.0, 1.0, 1.0)
    result = evaluate_folders(gt_dir, pred_dir)
    assert same(result.cases["case"], CaseMetrics(2 * 33 / 73, 0.0, 7 * VOXEL_ML))


def test_evaluate_folders_usage_errors(tmp_path: Path) -> None:
    (tmp_path / "raw" / "labelsTs").mkdir(parents=True)
    with pytest.raises(PetctlError, match="not found"):
        evaluate_folders(tmp_path / "nope", tmp_path / "raw")
    with pytest.raises(PetctlError, match="did you mean"):
        evaluate_folders(tmp_path / "raw", tmp_path / "raw")


def test_write_csv_columns(tmp_path: Path) -> None:
    path = tmp_path / "out" / "metrics.csv"
    write_csv({"a": CaseMetrics(0.5, 1.25, 0.0), "b": CaseMetrics(math.nan, 0.1, 0.0)}, path)
    rows = list(csv.reader(path.open()))
    assert rows == [["case", "dice", "fpv_ml", "fnv_ml"], ["a", "0.5", "1.25", "0.0"], ["b", "nan", "0.1", "0.0"]]


def invoke(*args: str):
    from petctl.cli import app

    return CliRunner().invoke(app, ["evaluate", *args], env={"COLUMNS": "200"})


def test_cli_reports_problems_and_exits_3(folders: tuple[Path, Path], tmp_path: Path) -> None:
    gt_dir, pred_dir = folders
    result = invoke(str(gt_dir), str(pred_dir), "--csv", str(tmp_path / "m.csv"))
    assert result.exit_code == 3, result.output
    out = result.output
    for text in ("missing: no prediction", "grid: prediction grid", "moved: prediction affine", "stray: prediction",
                 "Summary", "mean Dice (positives)", "0.9041", "–", f"{7 * VOXEL_ML:.3f}",
                 # two positives (Dice 0.9041 and 1): a quarter of the resamples draw the first twice
                 "0.9521 (0.9041–1.0000)", "95% bootstrap interval over cases",
                 "Lesion detection by volume", "75 %"):
        assert text in out, text
    rows = list(csv.DictReader((tmp_path / "m.csv").open()))
    assert [r["case"] for r in rows] == ["neg", "perfect", "pos"] and rows[0]["dice"] == "nan"


def test_cli_all_scored_json_exits_0(folders: tuple[Path, Path]) -> None:
    gt_dir, pred_dir = folders
    for case in ("missing", "grid", "moved", "values", "stray", "labelsTs2", "pred2"):
        for path in (*gt_dir.glob(f"{case}.nii*"), *pred_dir.glob(f"{case}.nii*")):
            path.unlink()
    result = invoke(str(gt_dir), str(pred_dir), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["problems"] == {} and data["summary"]["num_cases"] == 3
    assert data["cases"]["perfect"] == {"dice": 1.0, "fpv_ml": 0.0, "fnv_ml": 0.0}
    assert data["summary"]["mean_fnv_ml"] == pytest.approx(7 * VOXEL_ML / 2)
    assert data["interval"]["level"] == 0.95 and data["interval"]["mean_dice"] == [pytest.approx(2 * 33 / 73), 1.0]
    assert data["interval"]["mean_fpv_ml_negative"] == [pytest.approx(7 * VOXEL_ML)] * 2  # one negative: no spread
    assert data["interval"]["classifier_auroc"] is None


def test_cli_missing_folder_is_a_usage_error(tmp_path: Path) -> None:
    result = invoke(str(tmp_path / "nope"), str(tmp_path))
    assert result.exit_code == 2
    assert "folder not found" in result.output and "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------
# Bootstrap intervals


def _cohort(rng: np.random.Generator, num_pos: int, num_neg: int) -> tuple[dict[str, CaseMetrics], dict[str, float]]:
    cases, scores = {}, {}
    for i in range(num_pos):
        cases[f"p{i:03d}"] = CaseMetrics(float(rng.uniform(0.3, 1.0)), float(rng.exponential(2.0)), float(rng.exponential(1.0)))
        scores[f"p{i:03d}"] = float(np.round(rng.uniform(0.2, 1.0), 1))  # rounded: ties across the classes
    for i in range(num_neg):
        cases[f"n{i:03d}"] = CaseMetrics(math.nan, float(rng.exponential(1.5)), 0.0)
        scores[f"n{i:03d}"] = float(np.round(rng.uniform(0.0, 0.7), 1))
    return cases, scores


def test_bootstrap_intervals_equal_the_resamples_spelled_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """The vectorized means and AUROCs equal each resample's cases listed one by one and scored
    with scikit-learn; every resample keeps the number of positives and of negatives."""
    from sklearn.metrics import roc_auc_score

    import petctl.engine.evaluate as ev

    cases, scores = _cohort(np.random.default_rng(3), 9, 7)
    drawn: list[np.ndarray] = []
    real = ev._resample_counts
    monkeypatch.setattr(ev, "_resample_counts", lambda rng, n, k: drawn.append(real(rng, n, k)) or drawn[-1])
    ci = bootstrap_intervals(cases, scores, resamples=300, seed=5)
    w_pos, w_neg = drawn
    assert (w_pos.sum(1) == 9).all() and (w_neg.sum(1) == 7).all()
    pos = sorted(c for c in cases if cases[c].is_positive)
    neg = sorted(c for c in cases if not cases[c].is_positive)
    dice, fpv, fnv, auc = [], [], [], []
    for wp, wn in zip(w_pos, w_neg):
        p = [c for c, k in zip(pos, wp) for _ in range(int(k))]
        n = [c for c, k in zip(neg, wn) for _ in range(int(k))]
        dice.append(np.mean([cases[c].dice for c in p]))
        fnv.append(np.mean([cases[c].fnv_ml for c in p]))
        fpv.append(np.mean([cases[c].fpv_ml for c in n]))
        auc.append(roc_auc_score([1] * len(p) + [0] * len(n), [scores[c] for c in p + n]))
    for got, values in ((ci.mean_dice, dice), (ci.mean_fnv_ml, fnv), (ci.mean_fpv_ml_negative, fpv), (ci.classifier_auroc, auc)):
        assert got == pytest.approx(tuple(np.percentile(values, [2.5, 97.5])), abs=1e-12)
    assert ci.level == 0.95 and ci.resamples == 300
    assert ci == bootstrap_intervals(cases, scores, resamples=300, seed=5)  # deterministic for a seed
    assert ci != bootstrap_intervals(cases, scores, resamples=300, seed=6)


def test_bootstrap_intervals_hold_the_estimate_and_narrow_with_more_cases() -> None:
    rng = np.random.default_rng(11)
    widths = []
    for n in (8, 32, 128):
        cases, scores = _cohort(rng, n, n)
        s = summarize(cases)
        ci = bootstrap_intervals(cases, scores)
        assert ci.mean_dice[0] <= s.mean_dice <= ci.mean_dice[1]
        assert ci.mean_fnv_ml[0] <= s.mean_fnv_ml <= ci.mean_fnv_ml[1]
        assert ci.mean_fpv_ml_negative[0] <= s.mean_fpv_ml_negative <= ci.mean_fpv_ml_negative[1]
        assert 0 <= ci.classifier_auroc[0] <= ci.classifier_auroc[1] <= 1
        widths.append(ci.mean_dice[1] - ci.mean_dice[0])
    assert widths[0] > 1.5 * widths[1] > 2.25 * widths[2]  # about halves as the cases quadruple


def test_bootstrap_intervals_edge_cases() -> None:
    same_dice = {f"p{i}": CaseMetrics(0.8, 0.0, 1.0) for i in range(5)}
    ci = bootstrap_intervals(same_dice, {c: 0.9 for c in same_dice})
    assert ci.mean_dice == (0.8, 0.8) and ci.mean_fnv_ml == (1.0, 1.0)
    assert all(math.isnan(b) for b in ci.mean_fpv_ml_negative + ci.classifier_auroc)  # no negative
    assert ci.to_json()["classifier_auroc"] == [None, None] and bootstrap_intervals(same_dice).classifier_auroc is None
    apart = {**same_dice, "n0": CaseMetrics(math.nan, 2.0, 0.0), "n1": CaseMetrics(math.nan, 0.0, 0.0)}
    scores = {**{c: 0.9 for c in same_dice}, "n0": 0.1, "n1": 0.9}
    lo, hi = bootstrap_intervals(apart, scores).classifier_auroc
    assert (lo, hi) == (0.5, 1.0)  # n1 ties every positive: 0.5 when drawn twice, 1.0 when n0 is
    with pytest.raises(ValueError, match="n1"):
        bootstrap_intervals(apart, {**scores, "n1": float("nan")})
    with pytest.raises(ValueError, match="level"):
        bootstrap_intervals(apart, level=1.0)
    assert interval_text((0.5, 0.75), 2) == "0.50–0.75" and interval_suffix([0.5, 0.75], 3) == " (0.500–0.750)"
    assert interval_text([None, None], 2) is None and interval_text((math.nan, 1.0), 2) is None and interval_suffix(None, 2) == ""
    empty = bootstrap_intervals({})
    assert all(math.isnan(b) for b in empty.mean_dice + empty.mean_fpv_ml_negative + empty.mean_fnv_ml)


def test_a_sheared_grid_s_voxel_volume_is_its_determinant():
    """The product of the affine's column lengths overstates a sheared voxel (here by 11.8 %), and
    with it every FPV, FNV and lesion volume; |det| does not."""
    import numpy as np

    from petctl.engine.evaluate import affine_voxel_ml, voxel_volume_ml
    from petctl.engine.geometry import spacing_of

    sheared = np.array([[2.0, 1.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    assert affine_voxel_ml(sheared) == pytest.approx(0.008)
    assert voxel_volume_ml(spacing_of(sheared)) == pytest.approx(0.00894, abs=1e-5)
    flipped = np.diag([-4.0, 4.0, 6.0, 1.0])
    assert affine_voxel_ml(flipped) == pytest.approx(voxel_volume_ml(spacing_of(flipped))) == pytest.approx(0.096)

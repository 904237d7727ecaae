"""calibrate → predict → retrain-merged on a tiny trained run: geometry, gate, thresholds, safety."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest


def _petctl(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PETCTL_HOME": str(home), "HF_HOME": str(home / "hf"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "petctl", *args], env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def trained(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A calibrated run: every seg fold and cls fold × projection trained for a few steps."""
    home = tmp_path_factory.mktemp("inference") / "home"
    _petctl(home, "train", "--store", str(store), "--fold", "all", "--preset", "cpu-tiny", "--run", "r", "--max-steps", "4")
    _petctl(home, "train", "--store", str(store), "--task", "cls", "--fold", "all", "--preset", "cpu-tiny", "--run", "r", "--max-steps", "2")
    result = _petctl(home, "calibrate", "--run", "r")  # the default: thresholds for PET-extent masks
    assert "Classifier gate" in result.stdout and "extent" in result.stdout  # rich may wrap "PET extent"
    yield home
    shutil.rmtree(home, ignore_errors=True)  # the module's copied runs: gone once its tests have run


def test_thresholds_json_and_pictures(trained: Path, store: Path):
    run_dir = trained / "runs/r"
    t = json.loads((run_dir / "thresholds.json").read_text())
    splits = json.loads((store / "splits.json").read_text())
    manifest = json.loads((store / "manifest.json").read_text())["cases"]
    assert t["version"] == 1 and t["test_cases"] == splits["test"]
    assert 0.01 <= t["segmentation"]["threshold"] <= 0.99
    assert t["segmentation"]["num_positives"] == sum(manifest[c]["positive"] for c in splits["test"])
    seg = t["segmentation"]
    ext = seg["extent"]  # the chosen threshold: nearest the preset's prior within 1 SE of the PET extent's best Dice (input grid)
    i = ext["thresholds"].index(seg["threshold"])
    curve = [-np.inf if d is None else d for d in ext["mean_dice_curve"]]
    assert ext["volume_budget_ml"] is None and ext["budget_met"] is True  # no budget by default
    assert ext["best_dice"] == pytest.approx(max(curve)) and curve[ext["thresholds"].index(ext["best_threshold"])] == ext["best_dice"]
    assert ext["threshold_prior"] == 0.75 and ext["rule"] == "one_standard_error_toward_prior"  # cpu-tiny inherits cpu-small's
    band = [t for t, d in zip(ext["thresholds"], curve) if d >= ext["best_dice"] - ext["dice_standard_error"]]
    assert seg["threshold"] in band and abs(seg["threshold"] - 0.75) == pytest.approx(min(abs(t - 0.75) for t in band))
    assert seg["mean_dice"] == pytest.approx(curve[i])
    assert ext["mean_fpv_ml_negatives"] == ext["mean_fpv_ml_negatives_curve"][i] and ext["mean_fnv_ml"] == ext["mean_fnv_ml_curve"][i]
    assert ext["fraction"] == 0.5 and seg["seed_threshold"] == 0.0
    negatives = [r for r in t["cases"].values() if not r["positive"]]
    assert np.mean([r.get("fpv_ml_at_threshold", 0.0) for r in negatives]) == pytest.approx(ext["mean_fpv_ml_negatives"])
    assert 0.0 <= ext["plain_on_input_grid"]["mean_dice"] <= 1.0
    dice_at = [r["dice_at_threshold"] for r in t["cases"].values() if r["positive"]]
    assert np.mean(dice_at) == pytest.approx(seg["mean_dice"])
    cls = t["classifier"]
    scores = {c: r["cls_score"] for c, r in t["cases"].items()}
    positives = [c for c in splits["test"] if manifest[c]["positive"]]
    assert cls["threshold"] == pytest.approx(min(scores[c] for c in positives))  # sensitivity 1.0, highest such
    assert cls["margin"] == 1.0 and cls["lowest_positive_score"] == pytest.approx(cls["threshold"])  # the paper's rule by default
    assert (run_dir / "calibration_dice.png").stat().st_size > 1000
    assert (run_dir / "calibration_roc.png").stat().st_size > 1000
    step = json.loads((run_dir / "steps/calibrate.json").read_text())
    assert step["status"] == "done" and "seg_threshold" in step["metrics"]


def _copy_run(home: Path, src: str, dst: str) -> Path:
    shutil.copytree(home / "runs" / src, home / "runs" / dst)
    (home / "runs" / dst / "run.json").write_text((home / "runs" / src / "run.json").read_text().replace(f'"run": "{src}"', f'"run": "{dst}"'))
    return home / "runs" / dst


def _store_with_test(store: Path, folder: Path, test: list[str]) -> Path:
    """A copy of the store whose test split is `test`."""
    shutil.copytree(store, folder)
    splits = json.loads((folder / "splits.json").read_text())
    (folder / "splits.json").write_text(json.dumps({**splits, "test": test}))
    return folder


def _models_on(monkeypatch: pytest.MonkeyPatch, store_of) -> None:
    """`RunModels.load` hands out the run's models pointed at the store `store_of()` names."""
    from petctl.engine.ensemble import RunModels

    real = RunModels.load

    def load(*args, **kwargs):
        models = real(*args, **kwargs)
        models.store = store_of()
        return models

    monkeypatch.setattr(RunModels, "load", staticmethod(load))


def test_component_seed_calibrates_without_the_pet_extent(trained: Path):
    run_dir = _copy_run(trained, "r", "seeded")
    result = _petctl(trained, "calibrate", "--run", "seeded", "--component-seed", check=False)
    assert result.returncode == 2 and "alternatives" in result.stdout + result.stderr
    _petctl(trained, "calibrate", "--run", "seeded", "--no-pet-extent", "--component-seed")
    seg = json.loads((run_dir / "thresholds.json").read_text())["segmentation"]
    assert seg["extent"] is None
    curve = [v for v in seg["mean_dice_curve"] if v is not None]  # seed 0: the plain threshold
    assert max(curve) == pytest.approx(seg["without_seed"]["mean_dice"]) and seg["mean_dice"] >= max(curve)
    assert seg["seed_threshold"] in seg["seed_thresholds"] and max(seg["best_dice_per_seed"]) == pytest.approx(seg["mean_dice"])
    at_seed = [v for v in seg["mean_dice_curve_at_seed"] if v is not None]
    assert max(at_seed) == pytest.approx(seg["mean_dice"])


def test_gate_margin_scales_the_classifier_threshold(trained: Path):
    run_dir = _copy_run(trained, "r", "margin")
    paper = json.loads((run_dir / "thresholds.json").read_text())["classifier"]
    result = _petctl(trained, "calibrate", "--run", "margin", "--gate-margin", "0.5")
    t = json.loads((run_dir / "thresholds.json").read_text())
    cls = t["classifier"]
    assert cls["margin"] == 0.5 and cls["lowest_positive_score"] == pytest.approx(paper["threshold"])
    assert cls["threshold"] == pytest.approx(0.5 * paper["threshold"])
    negatives = [r["cls_score"] for r in t["cases"].values() if not r["positive"]]
    assert cls["negatives_skipping_segmentation"] == sum(s < cls["threshold"] for s in negatives)
    assert f"0.5 × the lowest test positive's score {paper['threshold']:.4f}" in " ".join(result.stdout.split())
    step = json.loads((run_dir / "steps/calibrate.json").read_text())
    assert step["config"]["gate_margin"] == 0.5
    for bad in ("0", "1.5"):
        result = _petctl(trained, "calibrate", "--run", "margin", "--gate-margin", bad, check=False)
        assert result.returncode == 2 and "--gate-margin" in result.stdout + result.stderr
    result = _petctl(trained, "calibrate", "--run", "margin", "--gate-positives", "found", check=False)
    assert result.returncode == 2 and "--gate-positives: expected one of all, detected" in " ".join((result.stdout + result.stderr).split())
    assert json.loads((run_dir / "thresholds.json").read_text()) == t  # a refused margin leaves the calibration as it was


def test_gate_over_detected_positives_ignores_a_positive_the_segmentation_misses(trained: Path, store: Path, tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch):
    """calibrate(gate_positives="detected") with the ensemble and the classifier replaced by known
    answers: one positive's lesions are "found" (probability 1 on them), the other's are not, and the
    missed one scores lowest. The gate then rises to half the found positive's score, stops the
    negatives below it (their false positives count 0, the would-be volume kept beside), and the
    written FPV agrees with the cases; the paper's rule on the same answers stays at the missed one."""
    from petctl.engine import calibrate as cal
    from petctl.engine.ensemble import RunModels
    from petctl.engine.store import CaseStore

    run_dir = _copy_run(trained, "r", "detected")
    splits = json.loads((store / "splits.json").read_text())
    manifest = json.loads((store / "manifest.json").read_text())["cases"]
    for positive in (True, False):  # a positive and a negative more in the test split (it has one of each)
        splits["test"].append(next(c for c in sorted(manifest) if manifest[c]["positive"] == positive and c not in splits["test"]))
    copy = _store_with_test(store, tmp_path / "s", splits["test"])
    _models_on(monkeypatch, lambda: copy)
    positives = sorted(c for c in splits["test"] if manifest[c]["positive"])
    negatives = sorted(c for c in splits["test"] if not manifest[c]["positive"])
    assert len(positives) == 2 and len(negatives) == 2, splits["test"]
    found, missed = positives[0], positives[1]
    score = {missed: 0.10, **{c: 0.80 for c in positives if c != missed}}
    score.update({negatives[0]: 0.30, negatives[1]: 0.45, **{c: 0.05 for c in negatives[2:]}})
    last: dict[str, object] = {}
    real_load = CaseStore.load

    def load(self, case):  # remember which case the next model call is about
        stored = real_load(self, case)
        last["case"], last["stored"] = case, stored
        return stored

    def fold_probs(self, image, *, models=None, tta=False, stitch_on_cpu=False):
        case = last["case"]
        if case in positives and case != missed:
            return [last["stored"].label.read_all().astype(np.float32)] * len(models or self.seg)
        probs = np.zeros(tuple(image.shape[1:]), np.float32)
        if case in negatives[:2]:  # a bright false positive in the two negatives the gates disagree on
            probs[tuple(slice(n // 2 - 2, n // 2 + 2) for n in probs.shape)] = 1.0
        return [probs] * len(models or self.seg)

    monkeypatch.setattr(CaseStore, "load", load)
    monkeypatch.setattr(RunModels, "fold_probs", fold_probs)
    monkeypatch.setattr(RunModels, "cls_score", lambda self, pet: score[last["case"]])
    paper = cal.calibrate(run_dir, gate_margin=0.5)["classifier"]
    assert paper["threshold"] == pytest.approx(0.05) and paper["gate_positives"] == "all"
    t = cal.calibrate(run_dir, gate_margin=0.5, gate_positives="detected")
    cls, cases = t["classifier"], t["cases"]
    assert cases[found]["dice_at_threshold"] > 0.5 and cases[missed]["dice_at_threshold"] == 0.0
    assert cls["gate_positive_score"] == pytest.approx(0.80) and cls["threshold"] == pytest.approx(0.40)
    assert cls["lowest_positive_score"] == pytest.approx(0.10)
    assert cls["positives_left_out"] == 1 and cls["positives_below_threshold"] == 1
    assert cls["negatives_skipping_segmentation"] == len(negatives) - 1
    stopped, passed = cases[negatives[0]], cases[negatives[1]]
    assert stopped["fpv_ml_at_threshold"] == 0.0 and stopped["fpv_ml_without_gate"] > 0
    assert passed["fpv_ml_at_threshold"] > 0 and "fpv_ml_without_gate" not in passed
    ext = t["segmentation"]["extent"]
    fpv = [cases[c].get("fpv_ml_at_threshold", 0.0) for c in negatives]
    assert ext["mean_fpv_ml_negatives"] == pytest.approx(np.mean(fpv))
    assert cal.gate_rule_text(cls) == "0.5 × the lowest detected test positive's score 0.8000"
    from petctl.errors import PetctlError

    with pytest.raises(PetctlError, match="--gate-positives"):
        cal.calibrate(run_dir, gate_positives="some")

    # without the test negatives (the demo's): none is segmented, and every choice stays as it was
    segmented: list[str] = []
    counted = fold_probs

    def fold_probs_noted(self, image, **kw):
        segmented.append(last["case"])
        return counted(self, image, **kw)

    monkeypatch.setattr(RunModels, "fold_probs", fold_probs_noted)
    lean = cal.calibrate(run_dir, gate_margin=0.5, gate_positives="detected", negatives=False)
    assert sorted(segmented) == positives
    assert lean["segmentation"]["threshold"] == t["segmentation"]["threshold"] and lean["classifier"] == t["classifier"]
    lean_ext = lean["segmentation"]["extent"]
    assert lean_ext["mean_fpv_ml_negatives"] is None and lean_ext["mean_fpv_ml_negatives_curve"] is None
    assert lean_ext["negatives_segmented"] is False and ext["negatives_segmented"] is True
    assert lean_ext["mean_dice_curve"] == ext["mean_dice_curve"] and lean_ext["budget_met"] is True
    assert all("fpv_ml_at_threshold" not in lean["cases"][c] for c in negatives)
    assert (run_dir / "calibration_dice.png").stat().st_size > 1000
    with pytest.raises(PetctlError, match="volume budget"):
        cal.calibrate(run_dir, negatives=False, volume_budget_ml=5.0)


def test_calibrate_leaves_out_an_unreadable_test_case_by_name(trained: Path, store: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch):
    """One test negative whose stored arrays cannot be read (the classifier's pass) and one test
    positive whose NIfTI cannot be read (the segmentation's pass): each is named once through
    on_skip and left out, and the thresholds are those of a test split without the two cases; the
    command prints each on its own line and exits 3. With every positive unreadable: one error
    line, and the thresholds written before stay as they were."""
    from typer.testing import CliRunner

    from petctl.cli import app
    from petctl.engine import calibrate as cal
    from petctl.engine import nifti
    from petctl.engine.store import CaseStore
    from petctl.errors import CaseError, PetctlError

    run_dir = _copy_run(trained, "r", "unreadable")
    manifest = json.loads((store / "manifest.json").read_text())["cases"]
    splits = json.loads((store / "splits.json").read_text())
    extra = [next(c for c in sorted(manifest) if manifest[c]["positive"] == p and c not in splits["test"]) for p in (True, False)]
    bad_positive, bad_negative = extra
    stores = {name: _store_with_test(store, tmp_path / name, test) for name, test in (("with", splits["test"] + extra),
                                                                                   ("without", splits["test"]))}
    which = {"store": stores["with"]}
    _models_on(monkeypatch, lambda: which["store"])
    real_store_load, real_load_case = CaseStore.load, nifti.load_case

    def store_load(self, case):
        if case == bad_negative:
            raise OSError(f"[Errno 5] Input/output error: '{case}.zarr/image/c/0/0/0'")
        return real_store_load(self, case)

    def load_case(src, **kw):
        if src.case == bad_positive:
            raise CaseError(src.case, "PET: not a gzip file")
        return real_load_case(src, **kw)

    monkeypatch.setattr(CaseStore, "load", store_load)
    monkeypatch.setattr(nifti, "load_case", load_case)
    said: list[tuple[str, str]] = []
    t = cal.calibrate(run_dir, gate_margin=0.5, on_skip=lambda c, r: said.append((c, r)))
    assert said == [(bad_negative, f"OSError: [Errno 5] Input/output error: '{bad_negative}.zarr/image/c/0/0/0'"),
                    (bad_positive, "PET: not a gzip file")]
    assert t["skipped_cases"] == dict(said) and t["test_cases"] == splits["test"] and sorted(t["cases"]) == sorted(splits["test"])
    which["store"] = stores["without"]
    plain = cal.calibrate(run_dir, gate_margin=0.5)
    assert plain["skipped_cases"] == {}
    for key in ("threshold", "mean_dice", "num_positives", "mean_dice_curve"):
        assert t["segmentation"][key] == plain["segmentation"][key], key
    assert t["segmentation"]["extent"]["mean_fpv_ml_negatives"] == pytest.approx(plain["segmentation"]["extent"]["mean_fpv_ml_negatives"])
    for key in ("threshold", "auroc", "positives", "negatives"):
        assert t["classifier"][key] == plain["classifier"][key], key

    which["store"] = stores["with"]
    result = CliRunner().invoke(app, ["calibrate", "--run", "unreadable", "--gate-margin", "0.5"],
                                env={"PETCTL_HOME": str(trained), "COLUMNS": "200"})
    assert result.exit_code == 3, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("skipped:")]
    assert lines == [f"skipped: {bad_negative}: OSError: [Errno 5] Input/output error: '{bad_negative}.zarr/image/c/0/0/0'",
                     f"skipped: {bad_positive}: PET: not a gzip file"], result.output
    step = json.loads((run_dir / "steps/calibrate.json").read_text())
    assert step["metrics"]["skipped"] == 2 and step["status"] == "done"
    written = (run_dir / "thresholds.json").read_text()

    positives = [c for c in splits["test"] + extra if manifest[c]["positive"]]
    monkeypatch.setattr(nifti, "load_case", lambda src, **kw: (_ for _ in ()).throw(CaseError(src.case, "PET: truncated")))
    with pytest.raises(PetctlError, match=f"no test positive left to calibrate on \\({len(positives) + 1} test case"):
        cal.calibrate(run_dir, gate_margin=0.5, negatives=False)  # the negatives' NIfTI files not read: the positives and the bad one
    assert (run_dir / "thresholds.json").read_text() == written


def test_no_gate_leaves_the_classifier_folds_alone(trained: Path):
    """Without the gate the classifier folds are neither loaded nor checked: a classifier fold that
    never checkpointed stops only a gated load, and the store comes from the segmentation folds."""
    from petctl.engine.ensemble import RunModels
    from petctl.errors import PetctlError

    run_dir = _copy_run(trained, "r", "cls-unfinished")
    (run_dir / "cls" / "fold7-x").mkdir()  # a classifier fold killed before its first checkpoint
    with pytest.raises(PetctlError, match="fold7-x: no checkpoint"):
        RunModels.load(run_dir, need_cls=True)
    models = RunModels.load(run_dir, need_cls=False)
    assert models.cls == [] and models.seg and models.store == RunModels.load(trained / "runs/r").store
    _petctl(trained, "calibrate", "--run", "cls-unfinished", "--no-gate")
    t = json.loads((run_dir / "thresholds.json").read_text())
    assert t["classifier"] is None
    assert not (run_dir / "calibration_roc.png").exists()  # the copied run's ROC (with the gate) no longer describes it


def test_calibrate_refuses_pet_extent_options_without_the_pet_extent(trained: Path):
    from petctl.engine import calibrate as cal
    from petctl.errors import PetctlError

    run_dir = _copy_run(trained, "r", "plain-options")
    before = (run_dir / "thresholds.json").read_text()
    for kw, name in (({"volume_budget_ml": 5.0}, "--volume-budget-ml"), ({"resample": "nearest"}, "--resample nearest"),
                     ({"threshold_prior": None}, "--threshold-prior"), ({"negatives": False}, "--no-negatives")):
        with pytest.raises(PetctlError, match=f"^{name} belongs to the PET extent's threshold choice"):
            cal.calibrate(run_dir, pet_extent=False, **kw)
    assert (run_dir / "thresholds.json").read_text() == before


def test_a_test_split_without_negatives_measures_no_false_positive_volume(trained: Path, store: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch):
    """No test negative (or none left): the FPV over negatives is not measured (None, not 0.00 mL),
    a volume budget is refused, and a NaN classifier score is that case's own line."""
    from petctl.engine import calibrate as cal
    from petctl.engine.ensemble import RunModels
    from petctl.errors import PetctlError

    run_dir = _copy_run(trained, "r", "no-negatives")
    manifest = json.loads((store / "manifest.json").read_text())["cases"]
    splits = json.loads((store / "splits.json").read_text())
    splits["test"] = [c for c in splits["test"] if manifest[c]["positive"]]
    copy = _store_with_test(store, tmp_path / "s", splits["test"])
    _models_on(monkeypatch, lambda: copy)
    t = cal.calibrate(run_dir, gate=False)
    ext = t["segmentation"]["extent"]
    assert ext["mean_fpv_ml_negatives"] is None and ext["mean_fpv_ml_negatives_curve"] is None and ext["negatives_segmented"] is False
    with pytest.raises(PetctlError, match="the test split has none$"):
        cal.calibrate(run_dir, gate=False, volume_budget_ml=5.0)
    # a NaN classifier score: that case is skipped by name; with it the only positive, nothing is left
    monkeypatch.setattr(RunModels, "cls_score", lambda self, pet: float("nan"))
    said: list[tuple[str, str]] = []
    with pytest.raises(PetctlError, match="no test positive left"):
        cal.calibrate(run_dir, on_skip=lambda c, r: said.append((c, r)))
    assert said and all("the classifier scored it nan" in r for _, r in said)
    assert [c for c, _ in said] == splits["test"]


def test_gate_rule_text_says_when_the_detected_gate_fell_back_to_every_positive():
    from petctl.engine.calibrate import gate_rule_text

    base = {"margin": 0.5, "lowest_positive_score": 0.2, "gate_positive_score": 0.2, "gate_positives": "detected"}
    assert gate_rule_text({**base, "gate_fell_back_to_all": True}) == "0.5 × the lowest test positive's score 0.2000"
    assert gate_rule_text({**base, "gate_positive_score": 0.4}) == "0.5 × the lowest detected test positive's score 0.4000"


def test_a_corrupt_thresholds_file_is_one_line(tmp_path: Path):
    from petctl.engine.ensemble import read_thresholds
    from petctl.errors import PetctlError

    (tmp_path / "thresholds.json").write_text('{"version": 1, "segmen')
    with pytest.raises(PetctlError, match="thresholds.json: cannot be read .*run `petctl calibrate --run"):
        read_thresholds(tmp_path)


def test_detected_gate_threshold_counts_only_found_positives():
    from petctl.engine.calibrate import detected_gate_threshold

    cases = {"a": {"positive": True, "cls_score": 0.2, "dice_at_threshold": 0.0},
             "b": {"positive": True, "cls_score": 0.6, "dice_at_threshold": 0.7},
             "c": {"positive": True, "cls_score": 0.9, "dice_at_threshold": 0.9},
             "n": {"positive": False, "cls_score": 0.4}}
    assert detected_gate_threshold(cases, 0.5) == (pytest.approx(0.3), 0.6, 1)
    assert detected_gate_threshold(cases, 1.0)[0] == pytest.approx(0.6)
    for c in "bc":
        cases[c]["dice_at_threshold"] = 0.0
    assert detected_gate_threshold(cases, 0.5) is None  # nothing found: the paper's rule stands


def test_calibrate_names_a_missing_cohort(trained: Path, store: Path, tmp_path: Path):
    from petctl.engine.calibrate import _sources
    from petctl.errors import PetctlError

    moved = tmp_path / "store"
    moved.mkdir()
    prep = json.loads((store / "prepare.json").read_text())
    prep["config"]["data"] = str(tmp_path / "gone")
    (moved / "prepare.json").write_text(json.dumps(prep))
    with pytest.raises(PetctlError, match="--no-pet-extent"):
        _sources(moved, ["x"])


def test_predict_masks_keep_the_input_geometry(trained: Path, cohort: Path, tmp_path: Path):
    data = tmp_path / "in"
    (data / "imagesTs").mkdir(parents=True)
    cases = sorted(p.name[: -len(".nii.gz")] for p in (cohort / "labelsTr").iterdir())
    flipped = [c for c in cases if np.any(np.diag(nib.load(str(cohort / "labelsTr" / f"{c}.nii.gz")).affine)[:3] < 0)]
    own_ct = [c for c in cases if nib.load(str(cohort / "imagesTr" / f"{c}_0000.nii.gz")).shape
              != nib.load(str(cohort / "imagesTr" / f"{c}_0001.nii.gz")).shape]
    chosen = sorted(set(flipped[:2] + own_ct[:1] + cases[:1]))
    assert flipped and own_ct
    for c in chosen:
        for ch in ("0000", "0001"):
            shutil.copy(cohort / "imagesTr" / f"{c}_{ch}.nii.gz", data / "imagesTs")
    before = {p.name: p.read_bytes() for p in (data / "imagesTs").iterdir()}
    out = tmp_path / "out"
    _petctl(trained, "predict", str(data), str(out), "--run", "r", "--no-gate", "--save-probabilities", "uint8", "--preview")
    for c in chosen:
        ref = nib.load(str(cohort / "labelsTr" / f"{c}.nii.gz"))
        pred = nib.load(str(out / f"{c}.nii.gz"))
        assert pred.shape == ref.shape
        assert np.allclose(pred.affine, ref.affine, atol=1e-4)
        assert nib.aff2axcodes(pred.affine) == nib.aff2axcodes(ref.affine)
        assert pred.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}
        prob = np.asarray(nib.load(str(out / f"{c}_prob.nii.gz")).dataobj)
        assert prob.dtype == np.uint8 and prob.max() <= 255
        assert (out / f"{c}_preview.png").stat().st_size > 1000
    assert {p.name: p.read_bytes() for p in (data / "imagesTs").iterdir()} == before  # inputs untouched
    summary = json.loads((out / "predictions.json").read_text())
    assert set(summary["written"]) == set(chosen) and not summary["skipped"]


def test_gate_writes_empty_masks_without_segmenting(trained: Path, cohort: Path, tmp_path: Path):
    gated_run = trained / "runs/g"
    shutil.copytree(trained / "runs/r", gated_run)
    (gated_run / "run.json").write_text((gated_run / "run.json").read_text().replace('"run": "r"', '"run": "g"'))
    t = json.loads((gated_run / "thresholds.json").read_text())
    t["classifier"]["threshold"] = 1.01  # every scan looks healthy
    (gated_run / "thresholds.json").write_text(json.dumps(t))
    case = sorted((cohort / "imagesTr").glob("*_0000.nii.gz"))[0]
    out = tmp_path / "out"
    result = _petctl(trained, "predict", str(case), str(out), "--run", "g")
    name = case.name[: -len("_0000.nii.gz")]
    mask = nib.load(str(out / f"{name}.nii.gz"))
    assert not np.asarray(mask.dataobj).any()
    assert mask.shape == nib.load(str(case.with_name(f"{name}_0001.nii.gz"))).shape
    record = json.loads((out / "predictions.json").read_text())["written"][name]
    assert record["gated"] is True and record["cls_score"] < 1.01
    assert "yes" in result.stdout


def test_predict_applies_the_component_seed(trained: Path, cohort: Path, tmp_path: Path):
    case = sorted((cohort / "imagesTr").glob("*_0000.nii.gz"))[0]
    name = case.name[: -len("_0000.nii.gz")]
    voxels = {}
    for run, seed in (("s0", 0.0), ("s1", 1.0)):  # no probability reaches 1.0 after a few steps: every component goes
        t = json.loads((_copy_run(trained, "r", run) / "thresholds.json").read_text())
        t["segmentation"].update(threshold=0.01, seed_threshold=seed, extent=None)
        (trained / "runs" / run / "thresholds.json").write_text(json.dumps(t))
        _petctl(trained, "predict", str(case), str(tmp_path / run), "--run", run, "--no-gate", "--save-probabilities", "float32")
        prob = np.asarray(nib.load(str(tmp_path / run / f"{name}_prob.nii.gz")).dataobj, np.float32)
        assert prob.max() < 1.0
        voxels[run] = int(np.asarray(nib.load(str(tmp_path / run / f"{name}.nii.gz")).dataobj).sum())
    assert voxels["s0"] > 0 and voxels["s1"] == 0, voxels


def test_predict_draws_the_pet_extent_on_the_input_grid(trained: Path, cohort: Path, tmp_path: Path):
    from petctl.engine.extent import pet_extent_mask

    case = sorted((cohort / "imagesTr").glob("*_0000.nii.gz"))[0]
    name = case.name[: -len("_0000.nii.gz")]
    run_dir = _copy_run(trained, "r", "ext")
    _petctl(trained, "predict", str(case), str(tmp_path / "probe"), "--run", "ext", "--no-gate", "--save-probabilities", "float32")
    prob = np.asarray(nib.load(str(tmp_path / "probe" / f"{name}_prob.nii.gz")).dataobj, np.float32)
    t = json.loads((run_dir / "thresholds.json").read_text())
    threshold = float(np.quantile(prob, 0.999))  # a few hundred voxels detected, whatever the tiny net learnt
    t["segmentation"]["threshold"] = threshold
    (run_dir / "thresholds.json").write_text(json.dumps(t))
    _petctl(trained, "predict", str(case), str(tmp_path / "out"), "--run", "ext", "--no-gate")
    mask = np.asarray(nib.load(str(tmp_path / "out" / f"{name}.nii.gz")).dataobj).astype(bool)
    pet = np.asarray(nib.load(str(case.with_name(f"{name}_0001.nii.gz"))).dataobj, np.float32)
    expected = pet_extent_mask(pet, prob, threshold)
    assert expected.any() and not np.array_equal(expected, prob >= threshold)  # the extent changed the plain mask
    assert np.array_equal(mask, expected)


def test_urine_veto_is_calibrated_recorded_and_applied_by_predict(trained: Path, cohort: Path, tmp_path: Path):
    """calibrate --urine-veto records the veto's settings; predict drops the components the recorded
    veto finds in urine (`urine.veto_mask` on the input grid's CT), and a veto whose water range
    spans every CT number drops them all."""
    from petctl.engine.extent import pet_extent_mask
    from petctl.engine.geometry import spacing_of
    from petctl.engine.nifti import load_case
    from petctl.engine.predict import input_cases
    from petctl.engine.urine import UrineVeto, veto_mask

    run_dir = _copy_run(trained, "r", "urine")
    result = _petctl(trained, "calibrate", "--run", "urine", "--no-pet-extent", "--urine-veto", check=False)
    assert result.returncode == 2 and "--urine-veto" in result.stdout + result.stderr
    _petctl(trained, "calibrate", "--run", "urine", "--urine-veto")
    t = json.loads((run_dir / "thresholds.json").read_text())
    assert UrineVeto.from_json(t["segmentation"]["urine_veto"]) == UrineVeto()
    case = sorted((cohort / "imagesTr").glob("*_0000.nii.gz"))[0]
    name = case.name[: -len("_0000.nii.gz")]
    _petctl(trained, "predict", str(case), str(tmp_path / "probe"), "--run", "urine", "--no-gate", "--save-probabilities", "float32")
    prob = np.asarray(nib.load(str(tmp_path / "probe" / f"{name}_prob.nii.gz")).dataobj, np.float32)
    threshold = float(np.quantile(prob, 0.999))
    t["segmentation"]["threshold"] = threshold
    loaded = load_case(input_cases(case)[0], need_label=False)  # the CT on the PET grid, as predict reads it
    pet, ct = loaded.pet, loaded.ct
    detected = pet_extent_mask(pet, prob, threshold)
    for veto, expect_empty in ((UrineVeto(), False), (UrineVeto(water_hu=(-2000.0, 5000.0), min_ml=0.0), True)):
        t["segmentation"]["urine_veto"] = veto.to_json()
        (run_dir / "thresholds.json").write_text(json.dumps(t))
        out = tmp_path / f"out-{expect_empty}"
        _petctl(trained, "predict", str(case), str(out), "--run", "urine", "--no-gate")
        mask = np.asarray(nib.load(str(out / f"{name}.nii.gz")).dataobj).astype(bool)
        assert np.array_equal(mask, veto_mask(detected, ct, spacing_of(loaded.affine), veto))
        assert detected.any() and (not mask.any()) == expect_empty
        record = json.loads((out / "predictions.json").read_text())["written"][name]
        assert record["urine_vetoed_voxels"] == int(detected.sum() - mask.sum())


def test_predict_processes_split_the_cases_and_merge_one_summary(trained: Path, cohort: Path, tmp_path: Path):
    """--processes 2: two spawned workers take every other case; the masks and probabilities match one
    process's, a bad case is still one named line, and predictions.json and the registry hold one
    record of the whole cohort."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for ct in sorted((cohort / "imagesTr").glob("*_0000.nii.gz"))[:3]:
        name = ct.name[: -len("_0000.nii.gz")]
        for channel in ("0000", "0001"):
            shutil.copy(ct.with_name(f"{name}_{channel}.nii.gz"), inputs)
    (inputs / "broken_0000.nii.gz").write_bytes(b"not a nifti")
    (inputs / "broken_0001.nii.gz").write_bytes(b"not a nifti")
    one = _petctl(trained, "predict", str(inputs), str(tmp_path / "one"), "--run", "r", "--no-gate", "--save-probabilities", "float32",
                  check=False)
    two = _petctl(trained, "predict", str(inputs), str(tmp_path / "two"), "--run", "r", "--no-gate", "--save-probabilities", "float32",
                  "--processes", "2", check=False)
    assert one.returncode == two.returncode == 3, two.stdout[-2000:] + two.stderr[-2000:]
    assert "broken" in two.stdout + two.stderr
    summaries = [json.loads((tmp_path / d / "predictions.json").read_text()) for d in ("one", "two")]
    assert list(summaries[1]["written"]) == list(summaries[0]["written"]) and len(summaries[1]["written"]) == 3
    assert list(summaries[1]["skipped"]) == ["broken"]
    for case in summaries[0]["written"]:
        a, b = (np.asarray(nib.load(str(tmp_path / d / f"{case}_prob.nii.gz")).dataobj) for d in ("one", "two"))
        assert np.allclose(a, b, atol=1e-5)
        assert np.array_equal(*(np.asarray(nib.load(str(tmp_path / d / f"{case}.nii.gz")).dataobj) for d in ("one", "two")))
    status = subprocess.run([sys.executable, "-m", "petctl", "status", "--json"], capture_output=True, text=True,
                            env={**os.environ, "PETCTL_HOME": str(trained)})
    steps = [s for r in json.loads(status.stdout)["runs"] if r["run"] == "r" for s in r["steps"] if s["step"].startswith("predict-")]
    assert any(s["config"].get("processes") == 2 and s["metrics"]["cases"] == 3 for s in steps), steps


def test_launched_ranks_merge_their_summaries(tmp_path: Path):
    """Ranks from a launcher write their own summaries and merge them, whichever finishes last."""
    from petctl.engine.predict import PredictResult, write_summary

    write_summary(tmp_path, PredictResult(written={"b": {"gated": False}}, skipped={}), rank=1, world_size=2)
    assert list(json.loads((tmp_path / "predictions.json").read_text())["written"]) == ["b"]
    write_summary(tmp_path, PredictResult(written={"a": {"gated": True}}, skipped={"c": "bad"}), rank=0, world_size=2)
    merged = json.loads((tmp_path / "predictions.json").read_text())
    assert list(merged["written"]) == ["a", "b"] and merged["skipped"] == {"c": "bad"} and merged["ranks_merged"] == 2
    # a second launch into the same folder whose rank 1 died: rank 1's old file is not merged
    write_summary(tmp_path, PredictResult(written={"a": {"gated": False}}, skipped={}), rank=0, world_size=2, launch="torchrun:2")
    merged = json.loads((tmp_path / "predictions.json").read_text())
    assert list(merged["written"]) == ["a"] and merged["ranks_merged"] == 1 and not merged["skipped"]


def test_launch_id_comes_from_torchrun_then_slurm(monkeypatch: pytest.MonkeyPatch):
    from petctl.engine.predict import launch_id

    for name in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_STEP_ID"):
        monkeypatch.delenv(name, raising=False)
    assert launch_id() is None
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_STEP_ID", "3")
    assert launch_id() == "slurm:77.3"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    assert launch_id() == "torchrun:abc"


def test_bad_case_is_named_and_others_go_on(trained: Path, cohort: Path, tmp_path: Path):
    data = tmp_path / "in"
    data.mkdir()
    good = sorted((cohort / "imagesTr").glob("*_0000.nii.gz"))[0]
    name = good.name[: -len("_0000.nii.gz")]
    for ch in ("0000", "0001"):
        shutil.copy(good.with_name(f"{name}_{ch}.nii.gz"), data)
    shutil.copy(good, data / "broken_0000.nii.gz")
    (data / "broken_0001.nii.gz").write_bytes(b"not a nifti")
    shutil.copy(good, data / "bad id_0000.nii.gz")
    shutil.copy(good.with_name(f"{name}_0001.nii.gz"), data / "bad id_0001.nii.gz")
    result = _petctl(trained, "predict", str(data), str(tmp_path / "out"), "--run", "r", "--no-gate", check=False)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "broken: PET is not a readable NIfTI" in result.stderr.replace("\n", " ")
    assert "bad id" in result.stderr and "refused" in result.stderr
    assert (tmp_path / "out" / f"{name}.nii.gz").exists()
    assert "Traceback" not in result.stderr


def test_retrain_merged_keeps_thresholds_and_links_parent(trained: Path, store: Path):
    _petctl(trained, "retrain-merged", "--run", "r", "--max-steps", "2")
    merged = trained / "runs/r-merged"
    run = json.loads((merged / "run.json").read_text())
    assert run["parent"] == "r"
    assert json.loads((merged / "thresholds.json").read_text()) == json.loads((trained / "runs/r/thresholds.json").read_text())
    splits = json.loads((store / "splits.json").read_text())
    for k in range(len(splits["merged_seg_folds"])):
        cfg = json.loads((merged / f"seg-merged/fold{k}/checkpoints/last/meta.json").read_text())["config"]
        assert cfg["merged"] is True and set(splits["test"]) & (set(cfg["train"]) | set(cfg["val"]))
    assert (merged / "cls-merged").is_dir()


def test_nearest_resampling_is_calibrated_and_predict_follows_it(trained: Path, cohort: Path, tmp_path: Path):
    """`calibrate --resample nearest` records the resampling in the extent; predict then maps the
    probabilities to the input grid the same way: every value it writes is one of the stored grid's."""
    run_dir = _copy_run(trained, "r", "nearest")
    assert json.loads((trained / "runs/r/thresholds.json").read_text())["segmentation"]["extent"]["resample"] == "linear"
    _petctl(trained, "calibrate", "--run", "nearest", "--resample", "nearest", "--no-gate")
    t = json.loads((run_dir / "thresholds.json").read_text())
    assert t["segmentation"]["extent"]["resample"] == "nearest"
    assert json.loads((run_dir / "steps/calibrate.json").read_text())["config"]["resample"] == "nearest"
    case = sorted((cohort / "imagesTr").glob("*_0000.nii.gz"))[0]
    name = case.name[: -len("_0000.nii.gz")]
    probs, stored_voxels = {}, 0
    for run in ("r", "nearest"):
        out = tmp_path / run
        _petctl(trained, "predict", str(case), str(out), "--run", run, "--no-gate", "--save-probabilities", "float32")
        probs[run] = np.asarray(nib.load(str(out / f"{name}_prob.nii.gz")).dataobj, np.float32)
        stored_voxels = int(np.prod(json.loads((out / "predictions.json").read_text())["written"][name]["stored_shape"]))
    assert probs["r"].shape == probs["nearest"].shape and not np.array_equal(probs["r"], probs["nearest"])
    # nearest-exact writes stored values only (and 0 outside the crop), never a blend of them
    assert len(np.unique(probs["nearest"])) <= stored_voxels + 1
    bad = _petctl(trained, "calibrate", "--run", "nearest", "--resample", "cubic", check=False)
    assert bad.returncode != 0 and "--resample: probability resampling must be one of linear, nearest (got 'cubic')" in bad.stdout + bad.stderr
    # a thresholds file with an unknown resampling stops predict before any case, in one line naming the file
    t["segmentation"]["extent"]["resample"] = "cubic"
    (run_dir / "thresholds.json").write_text(json.dumps(t))
    bad = _petctl(trained, "predict", str(case), str(tmp_path / "bad"), "--run", "nearest", "--no-gate", check=False)
    lines = [line for line in (bad.stdout + bad.stderr).splitlines() if "resampling must be one of" in line]
    assert bad.returncode != 0 and len(lines) == 1 and "thresholds.json" in lines[0]
    assert not list((tmp_path / "bad").glob("*.nii.gz"))


def test_tta_is_calibrated_and_predict_follows_the_calibration(trained: Path, cohort: Path, tmp_path: Path):
    """`calibrate --tta` chooses the threshold on flip-averaged probabilities and records it;
    predict then flips by default (its threshold means the same thing), `--no-tta` overrides."""
    run_dir = _copy_run(trained, "r", "flip")
    assert json.loads((trained / "runs/r/thresholds.json").read_text())["tta"] is False
    _petctl(trained, "calibrate", "--run", "flip", "--tta", "--no-gate")
    t = json.loads((run_dir / "thresholds.json").read_text())
    assert t["tta"] is True and t["classifier"] is None
    assert json.loads((run_dir / "steps/calibrate.json").read_text())["config"]["tta"] is True
    case = sorted((cohort / "imagesTr").glob("*_0000.nii.gz"))[0]
    name = case.name[: -len("_0000.nii.gz")]
    probs = {}
    for label, extra in (("default", ()), ("off", ("--no-tta",))):
        out = tmp_path / label
        _petctl(trained, "predict", str(case), str(out), "--run", "flip", "--save-probabilities", "float32", *extra)
        probs[label] = np.asarray(nib.load(str(out / f"{name}_prob.nii.gz")).dataobj, np.float32)
        assert json.loads((out / "predictions.json").read_text())["written"][name]["tta"] is (label == "default")
    assert probs["default"].shape == probs["off"].shape
    assert not np.allclose(probs["default"], probs["off"])  # the flips were averaged in

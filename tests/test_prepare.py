"""prepare end to end on a small synthetic cohort: manifest, splits, bad inputs, crash safety."""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from petctl.engine.prepare import PrepareConfig, run
from petctl.engine.store import CaseStore
COARSE = (6.0, 6.0, 8.0)


def test_manifest_splits_and_store(store: Path, cohort: Path):
    manifest = json.loads((store / "manifest.json").read_text())
    splits = json.loads((store / "splits.json").read_text())
    fp = json.loads((store / "fingerprint.json").read_text())
    cases = manifest["cases"]
    assert len(cases) == 10 and manifest["version"] == 1
    for entry in cases.values():
        assert {"shape", "spacing", "positive", "patient", "lesion_volume_ml", "stored_shape"} <= set(entry)
        assert entry["positive"] == (entry["lesion_volume_ml"] > 0)
    # fingerprint from training cases only
    assert set(fp["cases"]).isdisjoint(splits["test"])
    assert set(fp["cases"]) | set(splits["test"]) == set(cases)
    # seg folds over training positives only; test has both classes
    positives = {c for c, e in cases.items() if e["positive"]}
    for fold in splits["seg_folds"]:
        assert set(fold["train"]) | set(fold["val"]) <= positives - set(splits["test"])
    assert any(cases[c]["positive"] for c in splits["test"]) and any(not cases[c]["positive"] for c in splits["test"])
    s = CaseStore(store)
    assert s.list() == sorted(cases)
    for case in cases:
        stored = s.load(case)
        assert stored.shape == tuple(cases[case]["stored_shape"])
        if cases[case]["positive"]:
            assert len(stored.lesion_coords) > 0
            comp, xyz = stored.lesion_coords[:, 0], stored.lesion_coords[:, 1:]
            lab = stored.label.read_all()
            assert lab[tuple(xyz.T)].all()  # every sampled coordinate is a lesion voxel
        # normalized image: z-scores, clipped
        img = stored.image.read_all().astype(np.float32)
        assert np.isfinite(img).all() and abs(float(img[1].mean())) < 5


def test_stored_label_maps_back_onto_the_original_grid(store: Path, cohort: Path):
    from petctl.engine.geometry import CaseGeometry, to_original

    s = CaseStore(store)
    manifest = json.loads((store / "manifest.json").read_text())
    flipped = 0
    for case, entry in manifest["cases"].items():
        if not entry["positive"]:
            continue
        stored = s.load(case)
        geometry = CaseGeometry.from_json(stored.attrs["geometry"])
        ref = nib.load(str(cohort / "labelsTr" / f"{case}.nii.gz"))
        flipped += int(np.any(np.diag(ref.affine)[:3] < 0))
        back = to_original(stored.label.read_all().astype(np.float32), geometry) >= 0.5
        gt = np.asarray(ref.dataobj) > 0
        assert back.shape == gt.shape
        dice = 2 * (back & gt).sum() / (back.sum() + gt.sum())
        assert dice > 0.6, (case, dice)  # coarse 6×6×8 mm test spacing
    assert flipped >= 0


def test_native_spacing_round_trip_is_exact(cohort: Path, tmp_path: Path):
    """With the target spacing equal to the native one, the stored label maps back exactly."""
    from petctl.engine.geometry import CaseGeometry, spacing_of, to_canonical, to_original

    case = next(p.name[: -len(".nii.gz")] for p in sorted((cohort / "labelsTr").iterdir()) if np.any(np.asarray(nib.load(str(p)).dataobj)))
    ref = nib.load(str(cohort / "labelsTr" / f"{case}.nii.gz"))
    _, canon = to_canonical(np.zeros((1, 1, 1)), ref.affine)
    result = run(PrepareConfig(data=str(cohort), store=str(tmp_path / "s"), spacing=spacing_of(canon), num_folds=2, test_fraction=0.25))
    stored = CaseStore(tmp_path / "s").load(case)
    back = to_original(stored.label.read_all().astype(np.float32), CaseGeometry.from_json(stored.attrs["geometry"])) >= 0.5
    assert np.array_equal(back, np.asarray(ref.dataobj) > 0)
    assert result.skipped == {}


def _bad_cohort(cohort: Path, root: Path) -> dict[str, str]:
    """Copy the cohort and break one case per kind of bad input; returns case → expected reason."""
    shutil.copytree(cohort, root)
    img, lab = root / "imagesTr", root / "labelsTr"
    cases = sorted(p.name[: -len(".nii.gz")] for p in lab.iterdir())
    for case in cases:  # good copies (their own patients) so enough cases survive for splits
        for ch in ("0000", "0001"):
            shutil.copy(img / f"{case}_{ch}.nii.gz", img / f"copy_{case}_{ch}.nii.gz")
        shutil.copy(lab / f"{case}.nii.gz", lab / f"copy_{case}.nii.gz")
    expected: dict[str, str] = {}

    def pick(reason: str) -> str:
        case = cases[len(expected)]
        expected[case] = reason
        return case

    c = pick("cannot be read")  # truncated gzip
    raw = (img / f"{c}_0001.nii.gz").read_bytes()
    (img / f"{c}_0001.nii.gz").write_bytes(raw[: len(raw) // 2])
    c = pick("missing PET")
    (img / f"{c}_0001.nii.gz").unlink()
    c = pick("empty")
    (img / f"{c}_0000.nii.gz").write_bytes(b"")
    c = pick("NaN")
    pet = nib.load(str(img / f"{c}_0001.nii.gz"))
    data = np.asarray(pet.dataobj, np.float32).copy()
    data[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(data, pet.affine), str(img / f"{c}_0001.nii.gz"))
    c = pick("3-D volume")
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), pet.affine), str(img / f"{c}_0001.nii.gz"))
    c = pick("label grid")
    lab_img = nib.load(str(lab / f"{c}.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(lab_img.dataobj)[:-2], lab_img.affine), str(lab / f"{c}.nii.gz"))
    c = pick("values other than 0/1")
    lab_img = nib.load(str(lab / f"{c}.nii.gz"))
    bad = np.asarray(lab_img.dataobj).astype(np.uint8).copy()
    bad[1, 1, 1] = 2
    nib.save(nib.Nifti1Image(bad, lab_img.affine), str(lab / f"{c}.nii.gz"))
    c = pick("overlap")
    ct = nib.load(str(img / f"{c}_0000.nii.gz"))
    moved = ct.affine.copy()
    moved[:3, 3] += 5000.0
    nib.save(nib.Nifti1Image(np.asarray(ct.dataobj), moved), str(img / f"{c}_0000.nii.gz"))
    c = pick("not a readable NIfTI")  # a text file named .nii.gz
    (img / f"{c}_0000.nii.gz").write_text("this is not an image\n")
    c = pick("does not look like SUV")  # activity in Bq/mL (AutoPET's PET.nii.gz, not its SUV.nii.gz)
    pet = nib.load(str(img / f"{c}_0001.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(pet.dataobj, np.float32) * 5000.0, pet.affine), str(img / f"{c}_0001.nii.gz"))
    return expected


def test_bad_inputs_are_named_and_the_rest_is_prepared(cohort: Path, tmp_path: Path, home: Path):
    from typer.testing import CliRunner

    from petctl.cli import app

    data = tmp_path / "bad"
    expected = _bad_cohort(cohort, data)
    out = tmp_path / "store"
    result = CliRunner().invoke(app, ["prepare", str(data), "--store", str(out), "--spacing", "6,6,8", "--folds", "2"])
    text = result.output
    assert result.exit_code == 3, text
    assert "Traceback" not in text
    for case, reason in expected.items():
        line = next((l for l in text.splitlines() if case in l), "")
        assert reason in line, (case, reason, text)
    manifest = json.loads((out / "manifest.json").read_text())
    good = set(json.loads((out / "manifest.json").read_text())["cases"])
    assert good.isdisjoint(expected) and len(good) == 10
    assert set(manifest["skipped"]) == set(expected)
    assert CaseStore(out).list() == sorted(good)
    assert not [p for p in (out / "cases").iterdir() if p.name.startswith(".")]


def test_float_labels_accepted_and_half_refused(tmp_path: Path):
    from petctl.engine.nifti import as_binary_label
    from petctl.errors import CaseError

    assert as_binary_label("c", np.array([0.0, 1.0, 1.0])).tolist() == [0, 1, 1]
    with pytest.raises(CaseError, match="0.5"):
        as_binary_label("c", np.array([0.0, 0.5]))


def test_killed_prepare_leaves_no_incomplete_case_and_resumes(cohort: Path, tmp_path: Path):
    out = tmp_path / "store"
    env = {**os.environ, "PETCTL_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "petctl", "prepare", str(cohort), "--store", str(out), "--spacing", "6,6,8", "--folds", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    cases_dir = out / "cases"
    while time.time() < deadline:
        if cases_dir.is_dir() and any(p.name.startswith(".tmp-") for p in cases_dir.iterdir()) and CaseStore(out).list():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    s = CaseStore(out)
    listed = s.list()
    assert 0 < len(listed) < 10
    for case in listed:  # every visible case is complete and readable
        stored = s.load(case)
        stored.image.read_all()
        stored.label.read_all()
    assert not (out / "manifest.json").exists()
    # re-run: resumes, keeps the finished cases, and completes the store
    result = run(PrepareConfig(data=str(cohort), store=str(out), spacing=COARSE, num_folds=2))
    assert set(result.reused) == set(listed)
    assert len(result.reused) + len(result.prepared) == 10
    assert not [p for p in cases_dir.iterdir() if p.name.startswith(".")]


def test_resumed_store_is_identical(cohort: Path, store: Path, tmp_path: Path):
    """A store prepared twice from scratch holds byte-identical arrays (determinism per seed)."""
    other = tmp_path / "again"
    run(PrepareConfig(data=str(cohort), store=str(other), spacing=COARSE, num_folds=2, test_fraction=0.25))
    a, b = CaseStore(store), CaseStore(other)
    assert json.loads((store / "splits.json").read_text()) == json.loads((other / "splits.json").read_text())
    for case in a.list():
        assert np.array_equal(a.load(case).image.read_all(), b.load(case).image.read_all())
        assert np.array_equal(a.load(case).lesion_coords, b.load(case).lesion_coords)


def test_hot_structures_are_drawn_equally_often_whatever_their_size():
    """A large bright structure (the brain) does not crowd out a small one (the bladder); specks
    below HOT_MIN_VOXELS are left out; every draw lies inside the mask."""
    from petctl.engine.prepare import HOT_MIN_VOXELS, sample_hot_structures

    hot = np.zeros((60, 40, 50), bool)
    hot[5:35, 5:35, 5:35] = True  # 27,000 voxels
    hot[45:48, 10:13, 40:43] = True  # 27 voxels: the smallest structure still sampled on its own
    hot[55, 35, 45] = True  # a speck
    picks = sample_hot_structures(hot, 4000, np.random.default_rng(0))
    assert picks.shape == (4000, 3) and picks.dtype == np.int32 and hot[tuple(picks.T)].all()
    small = (picks[:, 0] >= 45) & (picks[:, 0] < 48)
    assert 0.45 < small.mean() < 0.55  # uniform voxels would give 27 / 27,028 = 0.1 %
    assert not (picks[:, 0] == 55).any() and HOT_MIN_VOXELS == 27
    assert len(np.unique(picks[small], axis=0)) == 27  # the whole small structure is covered
    only_specks = np.zeros((10, 10, 10), bool)
    only_specks[1, 1, 1] = only_specks[8, 8, 8] = True
    assert only_specks[tuple(sample_hot_structures(only_specks, 10, np.random.default_rng(1)).T)].all()
    # with uptake given: a large structure that stays faint (peak below `peak`) is not a hard negative
    pet = np.where(hot, -1.0, -2.0).astype(np.float32)
    pet[45:48, 10:13, 40:43] = 1.5
    bright = sample_hot_structures(hot, 500, np.random.default_rng(2), pet=pet, peak=0.0)
    assert ((bright[:, 0] >= 45) & (bright[:, 0] < 48)).all()
    faint = sample_hot_structures(hot, 500, np.random.default_rng(2), pet=np.full(hot.shape, -1.0, np.float32), peak=0.0)
    assert len(faint) == 500 and hot[tuple(faint.T)].all()  # none bright enough: every component may be drawn
    assert sample_hot_structures(np.zeros((4, 4, 4), bool), 10, np.random.default_rng(0)).shape == (0, 3)


def test_mid_uptake_structures_are_hard_negatives_and_the_faintest_are_not(monkeypatch):
    """`background_coords`' peak rule, in SUV: lesions' p5 2.6 and mean 6.4 (seed 13111's cohort).
    A structure peaking just above HOT_PEAK of the way (a low-uptake kidney's hot core, bowel) is drawn
    as often as a brain-like one; one peaking just under it is not; at HOT_PEAK 1 (the rule until
    2026-12-07: the lesions' mean) the mid-uptake one is not drawn either."""
    import petctl.engine.prepare as prep

    fp = {"pet": {"percentiles": {"5": 2.6}, "mean": 6.4, "std": 3.0}}
    reach = 2.6 + prep.HOT_PEAK * (6.4 - 2.6)  # 4.5 SUV at HOT_PEAK 0.5
    suv = np.full((40, 40, 40), 1.0, np.float32)
    suv[2:10, 2:10, 2:10] = 9.0  # brain-like: above the lesions' mean
    suv[15:21, 15:21, 15:21] = reach - 0.5
    suv[17, 17, 17] = reach + 0.3  # mid uptake: its peak passes the rule
    suv[28:34, 28:34, 28:34] = reach - 0.3  # bright (above p5) but under the rule everywhere
    pet_norm = (suv - 6.4) / 3.0
    body = np.ones(suv.shape, bool)
    cfg = PrepareConfig(data="cohort", store="store", body_samples=600, hot_background=1.0)

    def picks_in(lo, hi):
        picks = prep.background_coords(pet_norm, None, body, fp, cfg, np.random.default_rng(0))
        assert len(picks) == 600
        return ((picks >= lo) & (picks < hi)).all(axis=1).mean()

    assert 0.4 < picks_in(2, 10) < 0.6 and 0.4 < picks_in(15, 21) < 0.6, "two structures, drawn alike"
    assert picks_in(28, 34) == 0, "a structure that never reaches the rule is no hard negative"
    monkeypatch.setattr(prep, "HOT_PEAK", 1.0)
    assert picks_in(2, 10) == 1.0, "at the lesions' mean only the brain-like structure counts"


def test_hot_background_centres_half_the_background_patches_in_bright_non_lesion_tissue(cohort: Path, tmp_path: Path):
    from scipy import ndimage

    from petctl.engine.prepare import HOT_MARGIN

    store = tmp_path / "hot"
    cfg = PrepareConfig(data=str(cohort), store=str(store), spacing=COARSE, num_folds=2, seed=0, body_samples=512, hot_background=0.5)
    run(cfg)
    fp = json.loads((store / "fingerprint.json").read_text())
    floor = (fp["pet"]["percentiles"]["5"] - fp["pet"]["mean"]) / fp["pet"]["std"] + HOT_MARGIN + 0.01  # + float16 storage
    s = CaseStore(store)
    shares = []
    for case in s.list():
        stored = s.load(case)
        pet = stored.image.read_all()[1].astype(np.float32)
        near_lesion = ndimage.binary_dilation(stored.label.read_all() > 0, iterations=2)
        xyz = tuple(stored.body_coords.T)
        hot = (pet[xyz] > floor) & ~near_lesion[xyz]
        body_share = float(((pet > floor) & ~near_lesion).mean())
        shares.append((hot.mean(), body_share))
        assert len(stored.body_coords) == 512
    # every case has physiological uptake: about half the centres are hot, far more than the body's share
    assert all(h >= 0.45 for h, _ in shares) and all(h > 2 * b for h, b in shares), shares
    with pytest.raises(Exception, match="hot-background"):
        PrepareConfig(data=str(cohort), store=str(store), hot_background=1.5)


def test_rerun_prepares_again_what_changed_its_inputs_and_reuses_the_rest(cohort: Path, tmp_path: Path):
    """An edited label, and new metadata grouping two scans under one patient, are seen on a rerun:
    those cases are scanned and written again and the patient's scans end up on one side of every split."""
    data = tmp_path / "raw"
    shutil.copytree(cohort, data)
    out = tmp_path / "store"
    cfg = PrepareConfig(data=str(data), store=str(out), spacing=COARSE, num_folds=2, test_fraction=0.25)
    first = run(cfg)
    assert len(first.prepared) == 10 and not first.reused
    assert set(run(cfg).reused) == set(first.prepared)  # nothing changed: everything reused

    splits = json.loads((out / "splits.json").read_text())
    positive = {c: e["positive"] for c, e in json.loads((out / "manifest.json").read_text())["cases"].items()}
    test_case, train_case = next(c for c in splits["test"] if positive[c]), splits["seg_folds"][0]["train"][0]
    # a test positive's label redrawn (still positive, so the splits hold): the fingerprint (and so the
    # plan) cannot see it, the inputs can
    label_path = data / "labelsTr" / f"{test_case}.nii.gz"
    img = nib.load(str(label_path))
    edited = np.zeros(img.shape, np.uint8)
    edited[tuple(slice(s // 2 - 2, s // 2 + 2) for s in img.shape)] = 1
    nib.Nifti1Image(edited, img.affine, img.header).to_filename(str(label_path))
    again = run(cfg)
    assert again.prepared == [test_case] and len(again.reused) == 9
    manifest = json.loads((out / "manifest.json").read_text())["cases"]
    assert manifest[test_case]["lesion_volume_ml"] == pytest.approx(64 * float(np.prod(img.header.get_zooms()[:3])) / 1000)

    # new metadata: the test case's scan belongs to a training case's patient
    with (data / "metadata.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    patient = {r["case"]: r["patient"] for r in rows}
    for r in rows:
        if r["case"] == test_case:
            r["patient"] = patient[train_case]
    with (data / "metadata.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    run(cfg)
    manifest = json.loads((out / "manifest.json").read_text())["cases"]
    assert manifest[test_case]["patient"] == manifest[train_case]["patient"] == patient[train_case]
    splits = json.loads((out / "splits.json").read_text())
    assert (test_case in splits["test"]) == (train_case in splits["test"])  # one patient: one side


def test_a_case_that_cannot_be_written_leaves_the_splits(cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import petctl.engine.prepare as prep
    from petctl.errors import CaseError

    real = prep.write_case
    victim = sorted(p.name[: -len(".nii.gz")] for p in (cohort / "labelsTr").iterdir())[0]

    def failing(src, *args):
        if src.case == victim:
            raise CaseError(src.case, "resampling ran out of memory")
        return real(src, *args)

    monkeypatch.setattr(prep, "write_case", failing)
    out = tmp_path / "store"
    result = run(PrepareConfig(data=str(cohort), store=str(out), spacing=COARSE, num_folds=2, test_fraction=0.25))
    assert result.skipped == {victim: "resampling ran out of memory"}
    splits = json.loads((out / "splits.json").read_text())
    listed = set(splits["test"]) | {c for key in ("seg_folds", "cls_folds", "merged_seg_folds", "merged_cls_folds")
                                    for f in splits[key] for p in f.values() for c in p}
    assert victim not in listed and len(listed) == 9
    assert f"{victim}: not written (resampling ran out of memory); left out of the splits" in splits["warnings"]
    assert victim not in json.loads((out / "manifest.json").read_text())["cases"]


def test_a_worker_that_dies_skips_only_its_own_case():
    """The pool a killed worker breaks fails every case in it; each is retried alone, so only the
    case that kills its worker again is skipped, by name (`exec` stands in for a case's work)."""
    from petctl.engine.prepare import _map
    from petctl.errors import CaseError

    work = {"a": ("x = 1",), "dies": ("import os; os._exit(9)",), "b": ("x = 2",), "c": ("x = 3",)}
    results = dict(_map(exec, list(work.values()), list(work), workers=2))
    assert set(results) == set(work)
    assert results["a"] is None and results["b"] is None and results["c"] is None
    assert isinstance(results["dies"], CaseError) and "worker process died" in results["dies"].reason


def test_a_second_prepare_on_a_store_being_written_is_refused(cohort: Path, tmp_path: Path):
    import fcntl

    from petctl.errors import PetctlError

    out = tmp_path / "store"
    out.mkdir()
    with open(out / ".prepare.lock", "a+") as held:  # the first prepare, still running
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on node7\n")
        held.flush()
        with pytest.raises(PetctlError, match=r"another petctl prepare is writing this store \(pid 4242 on node7\)"):
            run(PrepareConfig(data=str(cohort), store=str(out), spacing=COARSE, num_folds=2, test_fraction=0.25))
    assert not (out / "manifest.json").exists() and not (out / ".parts").exists()


def test_cases_the_metadata_does_not_list_are_named(cohort: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    from petctl.engine.cohort import discover

    rows = (cohort / "metadata.csv").read_text().splitlines()
    meta = tmp_path / "meta.csv"
    meta.write_text("\n".join(rows[:1] + rows[3:]) + "\n")  # the first two cases' rows dropped
    dropped = [r.split(",")[0] for r in rows[1:3]]
    with caplog.at_level("WARNING", logger="petctl.engine.cohort"):
        cases = discover(cohort, meta)
    assert len(cases) == 10
    assert f"2 of 10 cases have no row (each taken as its own patient): {', '.join(sorted(dropped))}" in caplog.text
    assert {c.case: c.patient for c in cases if c.case in dropped} == {c: c for c in dropped}
    caplog.clear()
    with caplog.at_level("WARNING", logger="petctl.engine.cohort"):
        discover(cohort)  # its own metadata.csv lists every case
    assert "have no row" not in caplog.text

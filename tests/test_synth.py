"""The embedded synthetic cohort: determinism, layouts, dtypes, metadata, anatomy, lesions, CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from petctl.engine.synth import NEGATIVE, CohortSummary, make_cohort
from petctl.errors import PetctlError

NUM_CASES = 8
NUM_TEST = 2
SCALE = 0.5


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CohortSummary]:
    out = tmp_path_factory.mktemp("synth") / "raw"
    seen: list[str] = []
    summary = make_cohort(out, NUM_CASES, seed=0, scale=SCALE, num_test_cases=NUM_TEST, on_case=seen.append)
    assert seen == [*summary.case_ids, *summary.test_case_ids]
    return out, summary


def _records(out: Path) -> list[dict]:
    return json.loads((out / "synth.json").read_text())["cases"]


def _array(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def _canonical(path: Path) -> np.ndarray:
    return np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj)


def _extent(img: nib.Nifti1Image) -> np.ndarray:
    """Physical bounding box (mm) of the field of view, voxel edges included."""
    corners = np.array(
        [
            [i, j, k]
            for i in (-0.5, img.shape[0] - 0.5)
            for j in (-0.5, img.shape[1] - 0.5)
            for k in (-0.5, img.shape[2] - 0.5)
        ]
    )
    mm = nib.affines.apply_affine(img.affine, corners)
    return np.stack([mm.min(0), mm.max(0)])


def test_nnunet_layout_and_dtypes(raw: tuple[Path, CohortSummary]) -> None:
    out, summary = raw
    assert summary.case_ids == tuple(f"synth_{i:04d}" for i in range(NUM_CASES))
    assert summary.test_case_ids == tuple(f"synth_{i:04d}" for i in range(NUM_CASES, NUM_CASES + NUM_TEST))
    for split, ids in (("Tr", summary.case_ids), ("Ts", summary.test_case_ids)):
        assert sorted(p.name for p in (out / f"labels{split}").iterdir()) == [f"{c}.nii.gz" for c in ids]
        for case in ids:
            ct = nib.load(out / f"images{split}/{case}_0000.nii.gz")
            pet = nib.load(out / f"images{split}/{case}_0001.nii.gz")
            label = nib.load(out / f"labels{split}/{case}.nii.gz")
            assert (
                ct.get_data_dtype() == np.int16
                and pet.get_data_dtype() == np.float32
                and label.get_data_dtype() == np.uint8
            )
            assert label.shape == pet.shape and np.allclose(label.affine, pet.affine)
            assert set(np.unique(_array(label.get_filename()))) <= {0, 1}
            assert (
                np.allclose(pet.get_qform(), pet.get_sform())
                and int(pet.header["qform_code"]) == int(pet.header["sform_code"]) == 1
            )
            assert np.linalg.norm(pet.affine[:3, 3]) > 100  # a scanner origin, not zero
            zooms = pet.header.get_zooms()
            assert len(set(np.round(zooms, 3))) > 1, "spacing should be anisotropic"
            ct_hu = _array(ct.get_filename())
            # Air all around the body in-plane, so cropping to the CT foreground has work to do.
            assert ct_hu.min() >= -1024 and np.median(ct_hu[0]) < -950 and np.median(ct_hu[-1]) < -950
            assert ct_hu.max() > 500  # bone
            assert _array(pet.get_filename()).min() >= 0


def test_dataset_json_and_metadata(raw: tuple[Path, CohortSummary]) -> None:
    out, summary = raw
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "CT", "1": "PET"}
    assert dataset["labels"] == {"background": 0, "lesion": 1}
    assert dataset["numTraining"] == NUM_CASES and dataset["file_ending"] == ".nii.gz"
    with (out / "metadata.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["case", "patient", "diagnosis"]
    assert [r["case"] for r in rows] == [*summary.case_ids, *summary.test_case_ids]
    assert all(r["patient"].startswith("PAT_") and len(r["patient"]) == 7 for r in rows)
    assert {r["diagnosis"] for r in rows} <= {NEGATIVE, "LYMPHOMA", "MELANOMA", "LUNG_CANCER"}
    train_patients = {r["patient"] for r in rows[:NUM_CASES]}
    assert len(train_patients) == summary.num_patients
    assert not train_patients & {r["patient"] for r in rows[NUM_CASES:]}, "test cases must be new patients"


def test_determinism_and_independence(raw: tuple[Path, CohortSummary], tmp_path: Path) -> None:
    out, _ = raw
    seen: list[str] = []
    again = make_cohort(tmp_path / "again", 3, seed=0, scale=SCALE, workers=2, on_case=seen.append)  # workers change nothing
    assert seen == list(again.case_ids)
    assert json.loads((tmp_path / "again" / "synth.json").read_text())["cases"] == json.loads((out / "synth.json").read_text())["cases"][:3]
    other = make_cohort(tmp_path / "other", 3, seed=1, scale=SCALE)
    for case in again.case_ids:
        for rel in (f"imagesTr/{case}_0000.nii.gz", f"imagesTr/{case}_0001.nii.gz", f"labelsTr/{case}.nii.gz"):
            # Same seed: the same voxels, even though the first cohort had more cases.
            assert np.array_equal(_array(out / rel), _array(tmp_path / "again" / rel)), rel
            assert (out / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes()
        pet = f"imagesTr/{case}_0001.nii.gz"
        a, b = _array(out / pet), _array(tmp_path / "other" / pet)
        assert a.shape != b.shape or not np.array_equal(a, b)
    assert other.case_ids == again.case_ids


def test_fewer_held_out_cases_are_a_prefix_of_more(raw: tuple[Path, CohortSummary], tmp_path: Path) -> None:
    """The demo's held-out set can grow without changing the scans it had: the first test cases
    (ids, patients, voxels) do not depend on how many follow them."""
    out, summary = raw
    fewer = make_cohort(tmp_path / "fewer", NUM_CASES, seed=0, scale=SCALE, num_test_cases=1)
    assert fewer.test_case_ids == summary.test_case_ids[:1]
    first = summary.test_case_ids[0]
    for rel in (f"imagesTs/{first}_0000.nii.gz", f"imagesTs/{first}_0001.nii.gz", f"labelsTs/{first}.nii.gz"):
        assert (out / rel).read_bytes() == (tmp_path / "fewer" / rel).read_bytes(), rel
    records = {r["case"]: r for r in _records(out)}
    assert [r for r in _records(tmp_path / "fewer") if r["split"] == "test"] == [records[first]]


def test_about_half_positive_and_patients_with_several_studies(tmp_path: Path) -> None:
    summary = make_cohort(tmp_path / "c", 24, seed=5, scale=0.25)
    records = _records(tmp_path / "c")
    assert 0.3 <= summary.num_positive / 24 <= 0.7
    by_patient: dict[str, set[str]] = {}
    for r in records:
        by_patient.setdefault(r["patient"], set()).add(r["diagnosis"])
        label = _array(tmp_path / "c" / r["files"]["label"])
        if r["diagnosis"] == NEGATIVE:
            assert r["num_lesions"] == 0 and not label.any()
        else:
            assert 1 <= r["num_lesions"] <= 6 and label.any()
    assert summary.num_patients == len(by_patient) < 24
    assert all(len(diagnoses) == 1 for diagnoses in by_patient.values()), "diagnosis is per patient"
    assert max(sum(r["patient"] == p for r in records) for p in by_patient) >= 2


def test_physiological_uptake_is_not_lesion(raw: tuple[Path, CohortSummary]) -> None:
    out, _ = raw
    negatives = [r for r in _records(out) if r["diagnosis"] == NEGATIVE and r["split"] == "train"]
    assert negatives
    for r in negatives:
        pet = _canonical(out / r["files"]["pet"])
        assert not _array(out / r["files"]["label"]).any()
        profile = pet.max(axis=(0, 1))
        top, bottom = profile[int(0.75 * pet.shape[2]) :], profile[: int(0.3 * pet.shape[2])]
        assert top.max() > 5, "brain uptake near the top"
        assert bottom.max() > 6, "bladder uptake low in the body"
        body = _canonical(out / r["files"]["ct"]) > -500 if r["files"]["ct"] else None
        if body is not None and body.shape == pet.shape:
            assert 0.4 < np.median(pet[body]) < 1.5, "body background SUV"


def test_lesions_are_labelled_compact_and_brighter_than_surroundings(raw: tuple[Path, CohortSummary]) -> None:
    out, _ = raw
    positives = [r for r in _records(out) if r["diagnosis"] != NEGATIVE]
    assert positives
    for r in positives:
        pet, label = _array(out / r["files"]["pet"]), _array(out / r["files"]["label"]) > 0
        components, num = ndimage.label(label)
        assert num == r["num_lesions"]
        for i in range(1, num + 1):
            lesion = components == i
            shell = ndimage.binary_dilation(lesion, iterations=2) & ~lesion
            assert lesion.sum() >= 10
            assert pet[lesion].mean() > 1.3 * pet[shell].mean()


def test_storage_orientation_varies_but_body_is_head_up(raw: tuple[Path, CohortSummary]) -> None:
    out, _ = raw
    flipped = 0
    for r in _records(out):
        pet_img = nib.load(out / r["files"]["pet"])
        flipped += bool((np.diag(pet_img.affine)[:3] < 0).any())
        assert nib.aff2axcodes(pet_img.affine) == nib.aff2axcodes(nib.load(out / r["files"]["ct"]).affine)
        ct = _canonical(out / r["files"]["ct"])
        area = (ct > -500).sum(axis=(0, 1)).astype(float)
        rows = np.flatnonzero(area)
        top = area[rows[-1] - len(rows) // 8 : rows[-1] + 1]
        middle = area[rows[0] + len(rows) * 3 // 8 : rows[0] + len(rows) * 5 // 8]
        assert rows[-1] < ct.shape[2] - 1, "air above the head"
        assert top.mean() < 0.6 * middle.mean(), f"{r['case']}: the head should be at high z"
        pet = _canonical(out / r["files"]["pet"])
        assert pet[..., pet.shape[2] * 3 // 4 :].max() > 5  # brain after reorientation, too
    assert flipped >= 1


def test_some_ct_is_on_its_own_grid_with_the_same_extent(raw: tuple[Path, CohortSummary]) -> None:
    out, _ = raw
    differing = 0
    for r in _records(out):
        ct, pet = nib.load(out / r["files"]["ct"]), nib.load(out / r["files"]["pet"])
        if ct.shape != pet.shape:
            differing += 1
            assert np.prod(ct.header.get_zooms()) < np.prod(pet.header.get_zooms())
        assert np.allclose(_extent(ct), _extent(pet), atol=1e-3)
    assert differing >= 1


def test_autopet_layout(tmp_path: Path) -> None:
    out = tmp_path / "autopet"
    summary = make_cohort(out, 6, seed=2, layout="autopet", scale=0.35)
    with (out / "Metadata.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["Subject ID", "Study UID", "diagnosis"] and len(rows) == 6
    for row in rows:
        study = out / row["Subject ID"] / row["Study UID"]
        assert row["Subject ID"].startswith("PETCT_") and len(row["Subject ID"]) == 16
        assert sorted(p.name for p in study.iterdir()) == ["CTres.nii.gz", "SEG.nii.gz", "SUV.nii.gz"]
        ct, suv, seg = (nib.load(study / n) for n in ("CTres.nii.gz", "SUV.nii.gz", "SEG.nii.gz"))
        assert ct.shape == suv.shape == seg.shape and np.allclose(ct.affine, suv.affine)
        assert (ct.get_data_dtype(), suv.get_data_dtype(), seg.get_data_dtype()) == (np.int16, np.float32, np.uint8)
        assert _array(seg.get_filename()).any() == (row["diagnosis"] != NEGATIVE)
    patients = [p for p in out.iterdir() if p.is_dir()]
    assert len(patients) == summary.num_patients
    assert max(len(list(p.iterdir())) for p in patients) >= 2, "a patient with several studies"


def test_out_must_be_empty_or_an_earlier_synth_output(tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(PetctlError, match="not empty"):
        make_cohort(busy, 2, scale=0.25)
    out = tmp_path / "redo"
    make_cohort(out, 3, scale=0.25)
    (out / "keep.txt").write_text("user file")
    make_cohort(out, 2, scale=0.25)
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["synth_0000.nii.gz", "synth_0001.nii.gz"]
    assert (out / "keep.txt").exists()
    with pytest.raises(PetctlError):
        make_cohort(tmp_path / "x", 2, layout="dicom")


def test_an_interrupted_run_is_cleared_and_redone_by_the_next(tmp_path: Path) -> None:
    from petctl.engine.synth import cohort_complete

    out = tmp_path / "cut"

    def stop_after_two(case: str) -> None:
        if case == "synth_0001":
            raise KeyboardInterrupt  # Ctrl-C (or a kill) after two studies are on disk

    with pytest.raises(KeyboardInterrupt):
        make_cohort(out, 4, scale=0.25, on_case=stop_after_two)
    assert len(list((out / "labelsTr").iterdir())) >= 2
    assert json.loads((out / "synth.json").read_text())["complete"] is False
    assert not cohort_complete(out)  # the demo synthesizes again instead of preparing half a cohort
    (out / "keep.txt").write_text("user file")
    again = make_cohort(out, 3, scale=0.25)  # no --fresh needed: the marker says the files are synth's
    assert cohort_complete(out) and json.loads((out / "synth.json").read_text())["num_cases"] == 3
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in again.case_ids]
    assert (out / "keep.txt").exists()
    # A marker of the first format (written only at a run's end, without "complete") is a finished run.
    marker = json.loads((out / "synth.json").read_text())
    del marker["complete"]
    (out / "synth.json").write_text(json.dumps({**marker, "version": 1}))
    assert cohort_complete(out)
    (out / "synth.json").write_text("{not json")
    assert not cohort_complete(out)


def test_cli_synth(tmp_path: Path) -> None:
    from petctl.cli import app

    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["synth", str(out), "--cases", "4", "--scale", "0.4"])
    assert result.exit_code == 0, result.output
    assert "4 cases" in result.output and "positive" in result.output and "patients" in result.output
    assert len(list((out / "labelsTr").iterdir())) == 4
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "data.nii.gz").write_bytes(b"")
    refused = CliRunner().invoke(app, ["synth", str(tmp_path / "busy"), "--cases", "1"])
    assert refused.exit_code == 2
    assert refused.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'busy'}: OUT exists and is not empty (and is not an earlier `petctl synth` output)"
    ]


def test_tissue_map_is_stored_like_the_pet_and_changes_nothing_else() -> None:
    """`_render_study(with_tissue=True)` (the tools' way to ask which tissue a prediction lies in): the
    tissue codes lie on the PET's stored grid, flips included, and the other arrays stay as they were."""
    import petctl.engine.synth as synth

    flipped = 0
    for study in synth._plan(0, synth._TRAIN, NUM_CASES, 0, 0):
        plain, _ = synth._render_study(0, study, SCALE, True)
        images, _ = synth._render_study(0, study, SCALE, True, with_tissue=True)
        for key in ("ct", "pet", "label"):
            assert np.array_equal(plain[key][0], images[key][0]) and np.array_equal(plain[key][1], images[key][1])
        (tissue, tissue_affine), (pet, pet_affine), (label, _) = images["tissue"], images["pet"], images["label"]
        assert tissue.shape == pet.shape and np.array_equal(tissue_affine, pet_affine)
        flipped += bool((np.diag(pet_affine)[:3] < 0).any())
        brain, fat = tissue == synth.BRAIN, tissue == synth.FAT
        assert brain.any() and fat.any()
        assert pet[brain].mean() > 4 * pet[fat].mean(), f"{study.case}: the brain's codes should lie on its uptake"
        assert not (label > 0)[tissue == synth.AIR].any(), f"{study.case}: a lesion outside the body"
    assert flipped >= 1, "no stored flip among the studies: the test would not check the flip"

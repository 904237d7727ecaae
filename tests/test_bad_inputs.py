"""Hostile and unusual inputs for prepare and predict, and the security promises around them.

One cohort holds the odd cases next to ordinary ones: float 0/1 labels, a float label with 0.5,
a 15° oblique affine, mismatched qform/sform, 0.8×0.8×8 mm voxels, case ids that try to leave the
output folder, and a header that claims a volume too large for memory. It lives in a non-ASCII
folder with a space, reached through a symlink, with `imagesTr` itself a symlink, and is prepared
through the CLI under umask 027. Each bad case must be one line naming it; every other case is
prepared. Predict gets the same treatment with a run of random-weight networks (no training
needed), plus outputs that would leave the output folder or overwrite an input.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from petctl.engine.store import CaseStore

COARSE = (6.0, 6.0, 8.0)
UMASK = 0o027
REFUSED_ID = "case id holds characters that are not allowed in a file name"


def _load(path: Path) -> nib.Nifti1Image:
    return nib.load(str(path))


def _save(data: np.ndarray, affine: np.ndarray, path: Path, dtype: type | None = None, qform: np.ndarray | None = None) -> None:
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype) if dtype else np.asarray(data), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine if qform is None else qform, code=1)
    nib.save(img, str(path))


def _rotation(degrees: float) -> np.ndarray:
    """A world rotation about an axis that is not a coordinate axis (a truly oblique grid)."""
    axis = np.array([1.0, 2.0, 3.0]) / math.sqrt(14.0)
    a = math.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    r = np.eye(4)
    r[:3, :3] = np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k
    return r


def _huge_header_nifti(path: Path, affine: np.ndarray) -> None:
    """A .nii.gz whose header claims 2048³ float32 voxels (32 GiB) but holds 1 KiB of data."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((2048, 2048, 2048))
    hdr.set_data_dtype(np.float32)
    hdr.set_qform(affine, code=1)
    hdr.set_sform(affine, code=1)
    hdr["vox_offset"] = 352
    with gzip.open(path, "wb") as fh:
        fh.write(hdr.binaryblock + b"\0" * 4 + b"\0" * 1024)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The odd cohort, prepared through the CLI under umask 027 at the coarse test spacing."""
    from typer.testing import CliRunner

    from petctl.cli import app
    from petctl.engine.synth import make_cohort

    root = tmp_path_factory.mktemp("hostile")
    src = root / "src"
    make_cohort(src, num_cases=8, seed=21, scale=0.5)
    data = root / "données patient" / "raw"
    images = root / "images réelles"
    shutil.copytree(src / "imagesTr", images)
    data.mkdir(parents=True)
    (data / "imagesTr").symlink_to(images, target_is_directory=True)  # a symlinked folder inside the cohort
    shutil.copytree(src / "labelsTr", data / "labelsTr")
    shutil.copy(src / "metadata.csv", data / "metadata.csv")
    img, lab = images, data / "labelsTr"

    def ch(case: str, c: int) -> Path:
        return img / f"{case}_{c:04d}.nii.gz"

    cases = sorted(p.name[: -len(".nii.gz")] for p in lab.iterdir())
    lesion = {c: int(np.asarray(_load(lab / f"{c}.nii.gz").dataobj).sum()) for c in cases}
    biggest = max(cases, key=lesion.get)
    same_grid = [c for c in cases if lesion[c] and _load(ch(c, 0)).shape == _load(ch(c, 1)).shape
                 and np.allclose(_load(ch(c, 0)).affine, _load(ch(c, 1)).affine)]
    assert same_grid, "the synthetic cohort should hold a positive case with CT and PET on one grid"

    def derive(new: str, base: str, *, affine=None, label=None, label_dtype=None, pet_qform=None) -> None:
        """Copy case `base` as `new`, optionally changing the affines (same change for every file) or the label."""
        for c in (0, 1):
            im = _load(ch(base, c))
            aff = affine(im.affine) if affine else im.affine
            _save(np.asarray(im.dataobj), aff, ch(new, c), dtype=im.get_data_dtype().type,
                  qform=pet_qform(aff) if (pet_qform and c == 1) else None)
        lb = _load(lab / f"{base}.nii.gz")
        values = np.asarray(lb.dataobj) if label is None else label(np.asarray(lb.dataobj))
        _save(values, affine(lb.affine) if affine else lb.affine, lab / f"{new}.nii.gz", dtype=label_dtype)

    def with_half(label: np.ndarray) -> np.ndarray:
        out = label.astype(np.float32)
        out[tuple(np.argwhere(label)[0])] = 0.5
        return out

    rotate = _rotation(15.0)
    aniso = lambda a: a @ np.diag([0.8 / nib.affines.voxel_sizes(a)[0], 0.8 / nib.affines.voxel_sizes(a)[1],  # noqa: E731
                                   8.0 / nib.affines.voxel_sizes(a)[2], 1.0])
    derive("float01", biggest, label_dtype=np.float32)
    derive("floathalf", biggest, label=with_half)
    derive("oblique", biggest, affine=lambda a: rotate @ a)
    derive("qsform", biggest, pet_qform=lambda a: a + np.r_[np.zeros((3, 4)), [[0, 0, 0, 0]]] + np.c_[np.zeros((4, 3)), [10, 0, 0, 0]])
    derive("aniso", same_grid[0], affine=aniso)
    derive("..x", biggest)
    derive("bad id", biggest)
    derive("huge", same_grid[0])
    _huge_header_nifti(ch("huge", 1), _load(ch(same_grid[0], 1)).affine)

    link = root / "lien vers données"
    link.symlink_to(root / "données patient", target_is_directory=True)
    out = root / "sortie é" / "store"
    home = root / "home"
    collect = _Collect()
    logging.getLogger("petctl.engine.nifti").addHandler(collect)
    old_umask = os.umask(UMASK)
    old_home = os.environ.get("PETCTL_HOME")
    os.environ["PETCTL_HOME"] = str(home)
    try:
        result = CliRunner().invoke(app, ["prepare", str(link / "raw"), "--store", str(out), "--spacing", "6,6,8", "--folds", "2"])
    finally:
        os.umask(old_umask)
        logging.getLogger("petctl.engine.nifti").removeHandler(collect)
        if old_home is None:
            os.environ.pop("PETCTL_HOME")
        else:
            os.environ["PETCTL_HOME"] = old_home
    return {"root": root, "data": link / "raw", "src": src, "store": out, "home": home, "result": result, "warnings": collect.lines,
            "biggest": biggest, "aniso_base": same_grid[0], "rotate": rotate}


# -- prepare -----------------------------------------------------------------------------------------
EXPECTED_SKIPS = {
    "floathalf": "label holds values other than 0/1 (0.5)",
    "..x": REFUSED_ID,
    "bad id": REFUSED_ID,
    "huge": "PET has 8,589,934,592 voxels, above the limit of",
}


def test_each_bad_case_is_one_line_and_the_rest_is_prepared(hostile: dict):
    result, store = hostile["result"], hostile["store"]
    text = result.output
    assert result.exit_code == 3, text
    assert "Traceback" not in text
    for case, reason in EXPECTED_SKIPS.items():
        lines = [l for l in text.splitlines() if l.startswith(f"skipped: {case}: ")]
        assert len(lines) == 1 and reason in lines[0], (case, text)
    manifest = json.loads((store / "manifest.json").read_text())
    assert set(manifest["skipped"]) == set(EXPECTED_SKIPS)
    prepared = set(manifest["cases"])
    assert {"float01", "oblique", "qsform", "aniso"} <= prepared and len(prepared) == 8 + 4
    assert CaseStore(store).list() == sorted(prepared)
    # nothing was written for a refused id, inside or outside the store
    root = hostile["root"]
    assert not list(root.rglob("*x.zarr")) and not (store.parent / "x.zarr").exists()


def test_paths_with_spaces_non_ascii_and_symlinks_are_recorded_as_given(hostile: dict):
    prep = json.loads((hostile["store"] / "prepare.json").read_text())["config"]
    assert prep["data"] == str(hostile["data"]) and "données" in prep["data"] and prep["store"] == str(hostile["store"])
    assert Path(prep["data"]).parent.is_symlink() and (Path(prep["data"]) / "imagesTr").is_symlink()


def test_float_zero_one_labels_are_accepted_exactly(hostile: dict):
    s = CaseStore(hostile["store"])
    twin = hostile["biggest"]
    assert s.load("float01").label.read_all().tobytes() == s.load(twin).label.read_all().tobytes()
    assert s.load("float01").label.read_all().sum() > 0


def test_oblique_affine_is_prepared_and_maps_back_exactly(hostile: dict):
    """15° about an oblique axis: the canonical grid stays oblique, resampling runs along the voxel
    axes, and the recorded geometry maps the stored label back onto the original grid."""
    from petctl.engine.geometry import CaseGeometry, to_original

    s = CaseStore(hostile["store"])
    stored = s.load("oblique")
    geometry = CaseGeometry.from_json(stored.attrs["geometry"])
    ref = _load(hostile["data"] / "labelsTr" / "oblique.nii.gz")
    assert np.allclose(np.array(geometry.original_affine), ref.affine)
    axes = np.array(geometry.stored_affine)[:3, :3]
    assert np.abs(axes - np.diag(np.diag(axes))).max() > 0.5  # the stored grid is still oblique (mm off the axes)
    back = to_original(stored.label.read_all().astype(np.float32), geometry) >= 0.5
    truth = np.asarray(ref.dataobj) > 0
    assert back.shape == truth.shape
    assert _dice(back, truth) > 0.9
    # the rotation changed nothing but the world placement: the stored arrays equal the unrotated twin's
    twin = s.load(hostile["biggest"])
    assert stored.label.read_all().tobytes() == twin.label.read_all().tobytes()


def test_mismatched_qform_and_sform_uses_the_sform_with_a_warning(hostile: dict):
    from petctl.engine.geometry import CaseGeometry

    warnings = [w for w in hostile["warnings"] if w.startswith("qsform:")]  # once, by the scan pass
    assert warnings == ["qsform: PET qform and sform differ; using the sform"], hostile["warnings"]
    assert not [w for w in hostile["warnings"] if not w.startswith("qsform:")]
    pet = _load(hostile["data"] / "imagesTr" / "qsform_0001.nii.gz")
    assert not np.allclose(pet.get_qform(), pet.get_sform())
    geometry = CaseGeometry.from_json(CaseStore(hostile["store"]).load("qsform").attrs["geometry"])
    assert np.allclose(np.array(geometry.original_affine), pet.get_sform())


def test_very_anisotropic_voxels_are_prepared_and_map_back(hostile: dict):
    from petctl.engine.geometry import CaseGeometry, to_original

    stored = CaseStore(hostile["store"]).load("aniso")
    geometry = CaseGeometry.from_json(stored.attrs["geometry"])
    assert np.allclose(nib.affines.voxel_sizes(np.array(geometry.original_affine)), [0.8, 0.8, 8.0])
    assert np.allclose(geometry.stored_spacing, COARSE, rtol=0.2)
    assert geometry.stored_shape[2] > 5 * geometry.stored_shape[0]  # 8 mm slices → ~6 mm, 0.8 mm pixels → ~6 mm
    twin = CaseGeometry.from_json(CaseStore(hostile["store"]).load(hostile["aniso_base"]).attrs["geometry"])
    assert (geometry.crop_lo, geometry.crop_hi) == (twin.crop_lo, twin.crop_hi)  # same voxels are body, whatever their size
    back = to_original(stored.label.read_all().astype(np.float32), geometry)
    assert back.shape == _load(hostile["data"] / "labelsTr" / "aniso.nii.gz").shape


def test_a_volume_too_large_is_refused_from_its_header_without_reading_data(tmp_path: Path):
    """The header claims 32 GiB; the file holds 1 KiB. Reading the data would fail differently."""
    from petctl.engine.cohort import CaseSource
    from petctl.engine.nifti import load_case
    from petctl.errors import CaseError

    _huge_header_nifti(tmp_path / "big.nii.gz", np.diag([2.0, 2.0, 3.0, 1.0]))
    src = CaseSource("big", tmp_path / "big.nii.gz", tmp_path / "big.nii.gz", None, "big", None)
    with pytest.raises(CaseError, match=r"PET has 8,589,934,592 voxels, above the limit of 536,870,912"):
        load_case(src, need_label=False)
    assert (tmp_path / "big.nii.gz").stat().st_size < 4096


def test_files_created_by_prepare_respect_the_umask(hostile: dict):
    """Run under umask 027: files 0640, folders 0750 — nothing group-writable or world-accessible."""
    for root, at_least in ((hostile["store"], 50), (hostile["home"], 4)):
        entries = [root, *root.rglob("*")]
        assert len(entries) >= at_least
        modes = {p: p.stat().st_mode & 0o777 for p in entries}
        wrong = {str(p): oct(m) for p, m in modes.items() if m != (0o750 if p.is_dir() else 0o640)}
        assert not wrong, wrong


def test_checkpoint_files_respect_the_umask(tmp_path: Path):
    import torch

    from petctl.engine.loop import Position, save_checkpoint

    old = os.umask(UMASK)
    try:
        save_checkpoint(tmp_path / "run" / "checkpoints" / "last", model_state={"w": torch.ones(3)}, optimizer_state={"state": {}},
                        scheduler_state=None, position=Position(), config={}, metric=None)
    finally:
        os.umask(old)
    entries = [tmp_path / "run", *(tmp_path / "run").rglob("*")]
    assert len(entries) == 6  # run, checkpoints, last, model.pt, training_state.pt, meta.json
    assert {str(p): oct(p.stat().st_mode & 0o777) for p in entries} == {str(p): oct(0o750 if p.is_dir() else 0o640) for p in entries}


# -- predict -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def random_run(hostile: dict) -> Path:
    """A run of one random-weight cpu-tiny segmentation fold on the hostile store, no classifier gate."""
    from petctl.engine.config import cpu_tiny
    from petctl.engine.loop import Position, save_checkpoint
    from petctl.engine.models import build_seg_model

    cfg = cpu_tiny().with_image_channels(2)
    run_dir = hostile["root"] / "home" / "runs" / "random"
    model = build_seg_model(cfg.arch, in_channels=cfg.in_channels, feature_size=cfg.feature_size, features=cfg.features,
                            patch_size=cfg.patch_size)
    save_checkpoint(run_dir / "seg" / "fold0" / "checkpoints" / "best", model_state=model.state_dict(), optimizer_state=None,
                    scheduler_state=None, position=Position(), config={**cfg.to_json(), "fold": 0, "store": str(hostile["store"])},
                    metric=None)
    (run_dir / "thresholds.json").write_text(json.dumps({"version": 1, "segmentation": {"threshold": 0.5}}))
    return run_dir


def test_predict_names_each_bad_case_and_keeps_odd_geometries(hostile: dict, random_run: Path, tmp_path: Path):
    from petctl.engine.predict import PredictOptions, predict

    data = tmp_path / "entrée é"
    data.mkdir()
    images = hostile["data"] / "imagesTr"
    for case in ("oblique", "qsform", "aniso", "..x", "huge"):
        for c in ("0000", "0001"):
            shutil.copy(images / f"{case}_{c}.nii.gz", data)
    link = tmp_path / "lien"
    link.symlink_to(data, target_is_directory=True)
    out = tmp_path / "sortie é"
    skipped: list[str] = []
    old = os.umask(UMASK)
    try:
        result = predict(random_run, link, out, PredictOptions(gate=False, save_probabilities="uint8"),
                         on_skip=lambda c, r: skipped.append(f"{c}: {r}"))
    finally:
        os.umask(old)
    assert set(result.written) == {"oblique", "qsform", "aniso"}, result.skipped
    assert set(result.skipped) == {"..x", "huge"} and len(skipped) == 2
    assert "would leave the output folder" in result.skipped["..x"]
    assert "voxels, above the limit" in result.skipped["huge"]
    for case in result.written:
        pet = _load(data / f"{case}_0001.nii.gz")
        mask = _load(out / f"{case}.nii.gz")
        assert mask.shape == pet.shape and np.allclose(mask.affine, pet.affine, atol=1e-5)
        assert np.allclose(mask.get_sform(), pet.get_sform(), atol=1e-5)
        assert np.allclose(mask.get_qform(), pet.get_qform(), atol=1e-5)  # each form as the PET has it ("qsform": they differ)
    for p in [out, *out.iterdir()]:
        assert p.stat().st_mode & 0o777 == (0o750 if p.is_dir() else 0o640), p
    assert not list(tmp_path.glob("*x.nii.gz")) and not (out.parent / "x.nii.gz").exists()


def test_predict_never_overwrites_an_input_nor_writes_through_a_symlink(hostile: dict, random_run: Path, tmp_path: Path):
    """Output folder = input folder, where case `a_0000`'s mask would be case `a`'s CT; and a
    planted symlink `b.nii.gz` that points outside the output folder."""
    from petctl.engine.predict import predict

    images = hostile["data"] / "imagesTr"
    folder = tmp_path / "in"
    folder.mkdir()
    for case, name in (("oblique", "a"), ("qsform", "a_0000"), ("oblique", "b")):
        for c in ("0000", "0001"):
            shutil.copy(images / f"{case}_{c}.nii.gz", folder / f"{name}_{c}.nii.gz")
    victim = tmp_path / "victim.nii.gz"
    victim.write_bytes(b"precious")
    (folder / "b.nii.gz").symlink_to(victim)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.is_symlink()}
    share = predict(random_run, folder, folder, rank=1, world_size=2)  # a_0000 alone: its mask is rank 0's case a's CT
    assert not share.written and "would overwrite an input file" in share.skipped["a_0000"]
    result = predict(random_run, folder, folder)
    assert set(result.written) == {"a"}
    assert "would overwrite an input file" in result.skipped["a_0000"]
    assert "leaves the output folder" in result.skipped["b"]
    assert victim.read_bytes() == b"precious"
    after = {name: (folder / name).read_bytes() for name in before}
    assert after == before  # every input byte-identical
    assert _load(folder / "a.nii.gz").shape == _load(folder / "a_0001.nii.gz").shape


def test_predict_into_the_labels_folder_never_replaces_a_label(hostile: dict, random_run: Path, tmp_path: Path):
    """`predict DS DS/labelsTs`: every mask would be a ground-truth file; each case is refused by name."""
    from petctl.engine.predict import predict

    source = hostile["data"]
    data = tmp_path / "ds"
    (data / "imagesTs").mkdir(parents=True)
    (data / "labelsTs").mkdir()
    for case in ("oblique", "aniso"):
        for c in ("0000", "0001"):
            shutil.copy(source / "imagesTr" / f"{case}_{c}.nii.gz", data / "imagesTs")
        shutil.copy(source / "labelsTr" / f"{case}.nii.gz", data / "labelsTs")
    before = {p.name: p.read_bytes() for p in (data / "labelsTs").iterdir()}
    result = predict(random_run, data, data / "labelsTs")
    assert not result.written and set(result.skipped) == {"oblique", "aniso"}
    assert all("would overwrite an input file" in r for r in result.skipped.values()), result.skipped
    assert {p.name: p.read_bytes() for p in (data / "labelsTs").iterdir()} == before


# -- security ------------------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_malicious_pretrained_checkpoint_through_the_cli_is_refused(hostile: dict, tmp_path: Path):
    """`petctl train --pretrained evil.pt`: one clear line, no code run, the registry step failed."""
    import torch

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": _Payload(marker)}}, evil)
    env = {**os.environ, "PETCTL_HOME": str(tmp_path / "home"), "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "petctl", "train", "--store", str(hostile["store"]), "--fold", "0",
                             "--preset", "autopet-paper", "--pretrained", str(evil), "--run", "p", "--max-steps", "1"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    lines = [l for l in result.stderr.splitlines() if "refused by weights_only loading" in l]
    assert len(lines) == 1 and lines[0].startswith("error:") and "evil.pt" in lines[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not marker.exists()
    step = json.loads((tmp_path / "home/runs/p/steps/train-seg-fold0.json").read_text())
    assert step["status"] == "failed" and "refused by weights_only loading" in step["message"]


def test_a_fold_trained_on_other_cases_than_the_splits_list_is_refused(hostile: dict, tmp_path: Path):
    """A fold left from a run with more folds, or a store prepared again with other splits: one line, not a silent ensemble member."""
    from petctl.engine.config import cpu_tiny
    from petctl.engine.ensemble import RunModels
    from petctl.engine.loop import Position, save_checkpoint
    from petctl.engine.models import build_seg_model
    from petctl.engine.trainer import read_fold
    from petctl.errors import PetctlError

    cfg = cpu_tiny().with_image_channels(2)
    model = build_seg_model(cfg.arch, in_channels=cfg.in_channels, feature_size=cfg.feature_size, features=cfg.features,
                            patch_size=cfg.patch_size)
    train, val = read_fold(hostile["store"], 0)
    for fold, cases in ((0, (train, val)), (7, (train, val)), (1, (train, val))):  # fold 1 holds other cases than fold 0
        run_dir = tmp_path / f"run{fold}"
        save_checkpoint(run_dir / "seg" / f"fold{fold}" / "checkpoints" / "best", model_state=model.state_dict(), optimizer_state=None,
                        scheduler_state=None, position=Position(),
                        config={**cfg.to_json(), "fold": fold, "store": str(hostile["store"]), "train": cases[0], "val": cases[1]},
                        metric=None)
        if fold == 0:
            assert [m.name for m in RunModels.load(run_dir, need_cls=False, device=torch_cpu()).seg] == ["fold0"]
        else:
            with pytest.raises(PetctlError, match=rf"fold{fold}: trained on other cases than seg fold {fold} of .*retrain it or remove it"):
                RunModels.load(run_dir, need_cls=False, device=torch_cpu())


def torch_cpu():
    import torch

    return torch.device("cpu")


def test_a_skipped_case_is_one_line_saying_why_without_its_own_name_twice():
    """calibrate and predict share `case_reason`: the case's line is `case: reason`, whatever raised."""
    from petctl.errors import CaseError, PetctlError, case_reason

    assert case_reason("c1", CaseError("c1", "PET and CT grids differ")) == "PET and CT grids differ"
    assert case_reason("c1", PetctlError("c1: store shard missing")) == "store shard missing"
    assert case_reason("c1", PetctlError("store shard missing")) == "store shard missing"
    # not petctl's own error: the type says what broke; a multi-line message stays one line
    assert case_reason("c1", ValueError("bad header\n  at byte 348\n")) == "ValueError: bad header at byte 348"
    assert case_reason("c1", MemoryError()) == "MemoryError"
    long = case_reason("c1", RuntimeError("x" * 1000))
    assert len(long) == 300 and long.endswith("…") and long.startswith("RuntimeError: xxx")
    assert "\n" not in case_reason("c1", OSError("a\nb"))


def test_predict_reads_no_ground_truth_and_takes_a_bare_folder_as_it_is(hostile: dict, random_run: Path, tmp_path: Path):
    """A labelsTs beside imagesTs is not read (a label of values 0/1/2 or on another grid costs no
    prediction); in a bare folder each CASE_0000 is one case whatever its suffix, the PET is found
    under either suffix, and stray files (`.part`, a backup) are not cases."""
    from petctl.engine.predict import PredictOptions, input_cases, predict

    images = hostile["data"] / "imagesTr"
    ds = tmp_path / "ds"
    (ds / "imagesTs").mkdir(parents=True)
    (ds / "labelsTs").mkdir()
    for c in ("0000", "0001"):
        shutil.copy(images / f"oblique_{c}.nii.gz", ds / "imagesTs" / f"o_{c}.nii.gz")
    pet = _load(ds / "imagesTs" / "o_0001.nii.gz")
    _save(np.full(pet.shape, 2, np.uint8), pet.affine, ds / "labelsTs" / "o.nii.gz")  # not a 0/1 label
    (ds / "results.csv").write_text("model,dice\nbest,0.8\n")  # not metadata: predict reads no CSV
    result = predict(random_run, ds, tmp_path / "out", PredictOptions(gate=False))
    assert set(result.written) == {"o"} and not result.skipped

    bare = tmp_path / "bare"
    bare.mkdir()
    for case, name, (ct_end, pet_end) in (("oblique", "a", (".nii", ".nii")), ("qsform", "b", (".nii", ".nii.gz"))):
        for c, end in (("0000", ct_end), ("0001", pet_end)):
            nib.save(_load(images / f"{case}_{c}.nii.gz"), str(bare / f"{name}_{c}{end}"))
    shutil.copy(images / "oblique_0000.nii.gz", bare / "a_0000.nii.gz")  # a second copy of a's CT
    (bare / "c_0000.nii.gz.part").write_bytes(b"half a download")
    (bare / "notes.txt").write_text("x")
    found = input_cases(bare)
    assert [c.case for c in found] == ["a", "b"]
    assert found[0].ct.name == "a_0000.nii.gz" and found[1].pet.name == "b_0001.nii.gz"
    one = input_cases(bare / "b_0000.nii")
    assert one[0].pet == bare / "b_0001.nii.gz"


def test_a_mask_does_not_carry_the_pets_display_window_nor_a_qform_it_never_had(hostile: dict, random_run: Path, tmp_path: Path):
    from petctl.engine.predict import PredictOptions, predict

    images = hostile["data"] / "imagesTr"
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(images / "oblique_0000.nii.gz", folder / "x_0000.nii.gz")
    pet = _load(images / "oblique_0001.nii.gz")
    img = nib.Nifti1Image(np.asarray(pet.dataobj, np.float32), pet.affine)
    img.set_sform(pet.affine, code=1)
    img.set_qform(None, code=0)  # the scanner wrote no qform
    img.header["cal_min"], img.header["cal_max"], img.header["descrip"] = 0, 20, b"SUV"
    nib.save(img, str(folder / "x_0001.nii.gz"))
    result = predict(random_run, folder, tmp_path / "out", PredictOptions(gate=False, save_probabilities="float32"))
    assert set(result.written) == {"x"}
    for name, what in (("x.nii.gz", b"petctl mask"), ("x_prob.nii.gz", b"petctl probability")):
        mask = _load(tmp_path / "out" / name)
        assert float(mask.header["cal_max"]) == 0 and mask.header["descrip"].tobytes().rstrip(b"\0") == what
        assert int(mask.header["qform_code"]) == 0 and int(mask.header["sform_code"]) == 1
        assert np.allclose(mask.affine, pet.affine, atol=1e-5)


def test_autopet_studies_are_one_case_each_and_a_stray_csv_is_not_metadata(hostile: dict, tmp_path: Path, caplog):
    """A study's SUV.nii.gz beside SUV.nii and SUV.nii.gz.bak is one case (not three of one id); two
    folders whose names clean to the same id keep the first and name the second; a lone CSV of other
    columns is not the cohort's metadata, and a metadata CSV that is not UTF-8 is one line."""
    from petctl.engine.cohort import discover
    from petctl.errors import PetctlError

    images = hostile["data"] / "imagesTr"
    root = tmp_path / "autopet"
    for patient, study in (("PETCT_1", "study 1"), ("PETCT_1", "study_1"), ("PETCT_2", "s")):
        folder = root / patient / study
        folder.mkdir(parents=True)
        shutil.copy(images / "oblique_0000.nii.gz", folder / "CTres.nii.gz")
        shutil.copy(images / "oblique_0001.nii.gz", folder / "SUV.nii.gz")
    shutil.copy(images / "oblique_0001.nii.gz", root / "PETCT_2" / "s" / "SUV.nii.gz.bak")
    nib.save(_load(images / "oblique_0001.nii.gz"), str(root / "PETCT_2" / "s" / "SUV.nii"))
    (root / "results.csv").write_text("model,dice\nbest,0.8\n")
    with caplog.at_level(logging.WARNING):
        cases = discover(root)
    assert [c.case for c in cases] == ["PETCT_1_study_1", "PETCT_2_s"]
    assert cases[0].pet.parent.name == "study 1" and cases[1].pet.name == "SUV.nii.gz"
    assert any("case id PETCT_1_study_1 is taken by" in r.getMessage() and "left out" in r.getMessage() for r in caplog.records)
    (root / "results.csv").unlink()
    (root / "Metadata.csv").write_bytes("Subject ID,diagnosis\nPETCT_1,Lymphom K\xf6ln\n".encode("latin-1"))
    with pytest.raises(PetctlError, match=r"Metadata.csv: metadata CSV is not UTF-8 \(byte \d+\); save it as UTF-8"):
        discover(root)


def test_a_lone_metadata_csv_in_another_encoding_is_one_line_not_ignored(tmp_path: Path):
    """Found beside the data, a metadata CSV that is not UTF-8 is reported, not silently dropped
    (which would lose the patient grouping of the splits)."""
    from petctl.engine.cohort import discover
    from petctl.errors import PetctlError

    images = tmp_path / "ds" / "imagesTr"
    images.mkdir(parents=True)
    (tmp_path / "ds" / "clinical.csv").write_bytes("case,patient,diagnosis\nc1,P1,Lymphom K\xf6ln\n".encode("latin-1"))
    with pytest.raises(PetctlError, match=r"clinical.csv: metadata CSV is not UTF-8"):
        discover(tmp_path / "ds")


def test_classifier_folds_of_two_projection_designs_are_not_averaged(hostile: dict, random_run: Path, tmp_path: Path):
    """fold0-x and fold0-y left beside a retrained fold0-xy: the gate would average both designs."""
    from dataclasses import replace

    from petctl.engine.classifier import build_classifier_for
    from petctl.engine.config import cpu_tiny
    from petctl.engine.ensemble import RunModels
    from petctl.engine.loop import Position, save_checkpoint
    from petctl.errors import PetctlError

    run = tmp_path / "run"
    shutil.copytree(random_run, run)
    for name, projections, axis in (("fold0-x", ("x", "y"), "x"), ("fold0-y", ("x", "y"), "y"), ("fold0-xy", ("xy",), "xy")):
        cfg = replace(cpu_tiny(), cls_projections=projections)
        save_checkpoint(run / "cls" / name / "checkpoints" / "best", model_state=build_classifier_for(cfg).state_dict(),
                        optimizer_state=None, scheduler_state=None, position=Position(), metric=None,
                        config={**cfg.to_json(), "fold": 0, "projection": axis, "store": str(hostile["store"])})
        if name == "fold0-y":
            assert len(RunModels.load(run).cls) == 2  # one design: fine
    with pytest.raises(PetctlError, match=r"classifier folds trained with different projections \(x,y and xy"):
        RunModels.load(run)
    shutil.rmtree(run / "cls" / "fold0-x")
    shutil.rmtree(run / "cls" / "fold0-y")
    assert [m.axis for m in RunModels.load(run).cls] == ["xy"]

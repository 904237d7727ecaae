"""`prepare --pet-wide`: the third channel (log SUV over [0, lesions' p99.5]) through store, training and predict."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from petctl.engine.position import POSITION_CHANNELS

COARSE = (6.0, 6.0, 8.0)  # conftest's store spacing


def test_the_wide_channel_keeps_what_the_clip_flattens():
    from petctl.engine.prepare import normalize, pet_wide

    suv = np.array([-0.5, 0.0, 0.7, 2.0, 3.3, 14.0, 20.0, 45.0], np.float32)
    wide = pet_wide(suv, ceiling=20.0)
    assert wide.dtype == np.float32
    assert wide[0] == wide[1] == pytest.approx(-1.0) and wide[-2] == wide[-1] == pytest.approx(1.0)
    assert np.all(np.diff(wide[1:-1]) > 0)  # strictly increasing on [0, ceiling]
    assert wide[4] == pytest.approx(2 * np.log1p(3.3) / np.log1p(20.0) - 1)

    fp = {"ct": {"clip": [-100.0, 200.0], "mean": 40.0, "std": 80.0}, "pet": {"clip": [2.5, 12.0], "mean": 6.0, "std": 3.0}}
    image = np.stack([np.linspace(-300, 300, 8, dtype=np.float32), suv])[:, :, None, None]
    plain = normalize(image.copy(), fp)
    both = normalize(image.copy(), {**fp, "pet_wide": {"transform": "log1p", "ceiling": 20.0}})
    assert plain.shape == (2, 8, 1, 1) and both.shape == (3, 8, 1, 1)
    np.testing.assert_array_equal(both[:2], plain)
    np.testing.assert_allclose(both[2, :, 0, 0], wide, rtol=1e-6)
    # the clipped PET channel cannot tell background (0.7) from a faint lesion (2.0) nor a hot one (14) from 45; the wide one can
    assert plain[1, 2, 0, 0] == plain[1, 3, 0, 0] and plain[1, 5, 0, 0] == plain[1, 7, 0, 0]
    assert both[2, 3, 0, 0] - both[2, 2, 0, 0] > 0.1 and both[2, 7, 0, 0] > both[2, 5, 0, 0]


@pytest.fixture(scope="module")
def wide_store(cohort: Path, store: Path, tmp_path_factory: pytest.TempPathFactory):
    from petctl.engine.prepare import PrepareConfig, run

    out = tmp_path_factory.mktemp("wide") / "s"
    result = run(PrepareConfig(data=str(cohort), store=str(out), spacing=COARSE, num_folds=2, test_fraction=0.25, pet_wide=True))
    assert not result.skipped, result.skipped
    yield out
    shutil.rmtree(out.parent, ignore_errors=True)


def test_prepare_writes_three_channels_under_its_own_plan(wide_store: Path, store: Path):
    from petctl.engine.store import CaseStore

    fp, fp_plain = (json.loads((s / "fingerprint.json").read_text()) for s in (wide_store, store))
    assert fp["pet_wide"]["transform"] == "log1p" and fp["pet_wide"]["ceiling"] >= fp["pet"]["percentiles"]["99.5"]
    assert "pet_wide" not in fp_plain and fp["plan"] != fp_plain["plan"]
    case = CaseStore(wide_store).list()[0]
    wide, plain = (CaseStore(s).load(case).image.read_all().astype(np.float32) for s in (wide_store, store))
    assert wide.shape == (3, *plain.shape[1:])
    np.testing.assert_array_equal(wide[:2], plain)
    assert wide[2].min() >= -1.0 and wide[2].max() <= 1.0 and wide[2].std() > 0.05


def test_a_fold_on_a_wide_store_has_three_inputs_and_predicts(wide_store: Path, cohort: Path, tmp_path: Path):
    from petctl.engine.predict import PredictOptions, predict

    home = tmp_path / "home"
    env = {**os.environ, "PETCTL_HOME": str(home), "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "petctl", "train", "--store", str(wide_store), "--fold", "0", "--preset", "cpu-tiny",
           "--run", "w", "--max-steps", "2"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = home / "runs" / "w"
    meta = json.loads((run_dir / "seg/fold0/checkpoints/last/meta.json").read_text())
    assert meta["config"]["in_channels"] == 3 + (POSITION_CHANNELS if meta["config"]["position_channels"] else 0)
    (run_dir / "thresholds.json").write_text(json.dumps({"version": 1, "segmentation": {"threshold": 0.5}}))
    data = tmp_path / "in"
    data.mkdir()
    case = sorted(p.name[: -len("_0000.nii.gz")] for p in (cohort / "imagesTr").glob("*_0000.nii.gz"))[0]
    for c in ("0000", "0001"):
        shutil.copy(cohort / "imagesTr" / f"{case}_{c}.nii.gz", data)
    from petctl.engine.ensemble import RunModels
    from petctl.errors import PetctlError

    with pytest.raises(PetctlError, match="takes 3 image channels but the image has 2"):
        RunModels.load(run_dir, need_cls=False).seg_probs(torch.zeros(2, 16, 16, 16))
    out = tmp_path / "out"
    written = predict(run_dir, data, out, PredictOptions(gate=False)).written
    assert list(written) == [case]
    mask, pet = nib.load(str(out / f"{case}.nii.gz")), nib.load(str(data / f"{case}_0001.nii.gz"))
    assert mask.shape == pet.shape and np.allclose(mask.affine, pet.affine)

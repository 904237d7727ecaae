"""`petctl demo` end to end (tiny preset): every stage runs and the report is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_demo_runs_every_stage_and_writes_the_report(tmp_path: Path):
    env = {**os.environ, "PETCTL_HOME": str(tmp_path / "home"), "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "demo"
    import timm
    import torch

    weights = tmp_path / "test_resnet_in1k.pth"  # the classifier starts from local timm weights the test makes
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), weights)
    cmd = [sys.executable, "-m", "petctl", "demo", "--preset", "cpu-tiny", "--cases", "10", "--test-cases", "3", "--folds", "3",
           "--test-fraction", "0.2", "--tta", "--hard-lesion-gain", "2", "--lesion-dim", "0.25", "--cls-pretrained", str(weights),
           "--out", str(out), "--fresh"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["timings_s"]) >= {"data", "prepare", "train", "calibrate", "predict", "evaluate", "report"}
    assert summary["thresholds"]["seed"] == 0.0 and summary["thresholds"]["pet_extent"] is True  # calibrate's default
    assert "PET 50% isocontour" in (out / "report.md").read_text()
    # the demo detects on the nets' own grid: calibrate recorded nearest-exact resampling, the report says so
    assert json.loads((tmp_path / "home/runs/demo/thresholds.json").read_text())["segmentation"]["extent"]["resample"] == "nearest"
    assert "ensemble detects at it on its own grid" in (out / "report.md").read_text()
    assert summary["thresholds"]["urine_veto"] is True and "urine veto (a component ≥ 50% in CT water" in (out / "report.md").read_text()
    assert summary["thresholds"]["segmentation_prior"] == 0.75  # cpu-tiny inherits cpu-small's prior
    assert "nearest the prior 0.75 within 1 SE" in (out / "report.md").read_text()
    # calibrate segmented the test positives only (the demo's default): no FPV curve, said so
    thresholds = json.loads((tmp_path / "home" / "runs" / "demo" / "thresholds.json").read_text())
    assert thresholds["segmentation"]["extent"]["negatives_segmented"] is False
    assert thresholds["segmentation"]["extent"]["mean_fpv_ml_negatives"] is None
    assert "FPV on negatives not measured (calibrate segmented no test negative)" in (out / "report.md").read_text()
    test = summary["test"]
    assert test["num_positive"] + test["num_negative"] == 3 and not test["problems"]
    report = (out / "report.md").read_text()
    for heading in ("## Thresholds", "## Segmentation folds", "## Classifier folds", "## Held-out test cases", "## Timings"):
        assert heading in report
    # the held-out means with their bootstrap intervals over the cases, in the report and summary.json
    interval = test["interval"]
    assert interval["level"] == 0.95 and interval["resamples"] == 2000 and "| 95% interval |" in report
    if test["num_positive"]:
        lo, hi = interval["mean_dice"]
        assert lo <= test["mean_dice"] <= hi
    assert "bootstrap" in result.stdout  # the summary table's caption says what the brackets hold
    # the held-out lesions' detection by volume: every ground-truth lesion counted once, in the report and summary.json
    detection = test["lesion_detection"]
    assert [b["bin"] for b in detection] == ["< 1.5 mL", "1.5–5 mL", "5–20 mL", "≥ 20 mL"]
    assert sum(b["lesions"] for b in detection) >= test["num_positive"] and "| detected / lesions |" in report
    assert "lesions found <1.5/1.5–5/5–20/≥20 mL" in result.stdout  # a row of the terminal's summary table, on one line
    for png in ("training_curves.png", "calibration_dice.png", "calibration_roc.png", "test_cases.png", "lesion_detection.png"):
        assert (out / png).stat().st_size > 2000, png
    test_ids = sorted(p.name for p in (out / "raw" / "labelsTs").glob("*.nii.gz"))
    assert len(test_ids) == 3 and sorted(p.name for p in (out / "predictions").glob("*.nii.gz")) == test_ids
    status = subprocess.run([sys.executable, "-m", "petctl", "status", "--json"], env=env, capture_output=True, text=True)
    steps = {s["step"]: s["status"] for r in json.loads(status.stdout)["runs"] for s in r["steps"]}
    for step in ("synth", "prepare", "train-seg-fold0", "train-cls-fold0-x", "train-cls-fold0-y", "calibrate",
                 "predict-demo", "evaluate-demo"):
        assert steps.get(step) == "done", (step, steps)
    # a 3-fold split of which only the first fold is trained (the default), on every core: one DDP
    # process per core with the preset's batch shared among them
    assert len(json.loads((out / "store" / "splits.json").read_text())["seg_folds"]) == 3
    assert not any("fold1" in s or "fold2" in s for s in steps), steps
    processes = min(2, max(1, os.cpu_count() or 1))  # the cores, down to a divisor of cpu-tiny's batch of 2
    assert "1 of 3 folds trained" + (f", each segmentation fold on {processes} processes (DDP)" if processes > 1 else ",") in report
    seg_meta = json.loads((tmp_path / "home" / "runs" / "demo" / "seg" / "fold0" / "checkpoints" / "last" / "meta.json").read_text())
    assert seg_meta["num_processes"] == processes and seg_meta["config"]["batch_size"] == 2 // processes
    assert len(seg_meta["rank_weight_digests"]) == processes and len(set(seg_meta["rank_weight_digests"])) == 1
    # the time budget (20 min by default) probed this machine and planned the epochs the folds trained
    budget = summary["budget"]
    assert budget["budget_min"] == 20 and budget["step_s"] > 0 and (budget["seg_epochs"], budget["cls_epochs"]) == (1, 1)
    assert json.loads((out / "budget.json").read_text()) == budget and "Time budget 20 min: " in report and "the preset's epochs fit" in report
    # the segmentation folds ran first, then the classifier was replanned at their pace (1 of 1 epoch: kept)
    assert budget["cls_replan"]["planned_cls_epochs"] == 1 and budget["cls_replan"]["pace"] > 0
    assert "Classifier replanned after the segmentation folds" in report and "1 of 1 epochs (kept)" in report
    # --tta: calibrated on flip-averaged probabilities, recorded, and predict followed it
    home_run = tmp_path / "home" / "runs" / "demo"
    assert json.loads((home_run / "thresholds.json").read_text())["tta"] is True
    assert "segmentation (flip TTA; " in report
    written = json.loads((out / "predictions" / "predictions.json").read_text())["written"].values()
    assert all(r["tta"] is True for r in written)
    assert all("urine_vetoed_voxels" in r for r in written if not r["gated"])  # the demo's default veto, applied by predict
    # a re-run in the same OUT resumes the same demo only: another seed is refused at once, in one line
    again = subprocess.run([c for c in cmd if c != "--fresh"] + ["--seed", "5"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "holds a demo started with seed=0, and this run asks seed=5" in again.stderr, again.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text()) == summary  # nothing of the finished demo touched
    # --hard-lesion-gain reached the segmentation folds (and not the classifier's own sampling)
    fold_meta = json.loads((home_run / "seg" / "fold0" / "checkpoints" / "last" / "meta.json").read_text())
    assert fold_meta["config"]["hard_lesion_gain"] == 2.0 and fold_meta["sampler_state"]
    assert fold_meta["config"]["lesion_dim"] == 0.25  # and --lesion-dim
    assert fold_meta["config"]["cls_pretrained"] == str(weights)  # --cls-pretrained, in the one config every fold reads
    cls_meta = json.loads((home_run / "cls" / "fold0-x" / "checkpoints" / "last" / "meta.json").read_text())
    assert cls_meta["config"]["cls_pretrained"] == str(weights) and cls_meta["config"]["pretrained"] is None


def test_demo_config_rejects_more_trained_folds_than_the_split_has():
    from petctl.engine.demo import DemoConfig
    from petctl.errors import PetctlError

    assert DemoConfig(folds=5).train_folds == 1
    assert DemoConfig(folds=5, train_folds=None).train_folds is None
    with pytest.raises(PetctlError, match="train-folds"):
        DemoConfig(folds=3, train_folds=4)


def test_report_first_line_names_the_trained_folds_and_a_segmentation_folds_processes():
    from types import SimpleNamespace

    from petctl.engine.demo import DemoConfig
    from petctl.engine.report import _folds_text

    assert _folds_text(DemoConfig(folds=5, train_folds=None)) == "5 folds"
    assert _folds_text(DemoConfig(folds=5)) == "1 of 5 folds trained"  # processes not resolved yet: no claim
    assert _folds_text(DemoConfig(folds=5, processes=1)) == "1 of 5 folds trained"  # one process is no DDP
    assert _folds_text(DemoConfig(folds=5, train_folds=2, processes=2)) == "2 of 5 folds trained, each segmentation fold on 2 processes (DDP)"
    assert _folds_text(SimpleNamespace(folds=3)) == "3 folds"  # a config without these fields (read with getattr)


def test_demo_config_takes_half_the_detected_positives_gate_and_refuses_bad_gate_settings():
    from petctl.engine.demo import DemoConfig
    from petctl.errors import PetctlError

    assert DemoConfig().gate_margin == 0.5 and DemoConfig().pet_clip == (0.0, 95.0)
    assert DemoConfig().gate_positives == "detected" and DemoConfig().urine_veto is True
    for bad in (0.0, 1.2):
        with pytest.raises(PetctlError, match="--gate-margin"):
            DemoConfig(gate_margin=bad)
    with pytest.raises(PetctlError, match="--gate-positives: expected one of all, detected"):
        DemoConfig(gate_positives="found")
    assert DemoConfig().prob_resample == "nearest"
    with pytest.raises(PetctlError, match="--prob-resample: probability resampling must be one of linear, nearest"):
        DemoConfig(prob_resample="cubic")


def test_training_curves_plot_per_epoch_and_read_metrics_from_before_per_epoch_curves(tmp_path: Path):
    import numpy as np

    from petctl.engine.loop import plot_progress, training_curve
    from petctl.engine.report import plot_training

    # a 2-cycle × 3-epoch fold as written now, and one written before per-epoch curves (cycles only)
    epochs = [{"epoch": k, "cycle": (k - 1) // 3 + 1, "global_step": 10 * k, "train_loss": 1.0 / k, "lr": 1e-3 / k, "steps": 10}
              for k in range(1, 7)]
    now = {"cycles": [{"cycle": c, "epoch": 3 * c, "train_loss": 0.5, "lr_end": 1e-4, "selection": 0.8, "top_k_auroc": 0.8,
                       "dice_at_best": 0.6} for c in (1, 2)], "epochs": epochs}
    old = {"cycles": [{"cycle": c, "train_loss": 0.5, "lr_end": 1e-4, "selection": 0.7, "top_k_auroc": 0.7} for c in (1, 2)]}
    curve = training_curve(now["cycles"], epochs)
    assert curve["unit"] == "epoch" and curve["x"] == list(range(1, 7)) and curve["at"] == [3, 6]
    assert curve["loss"] == [e["train_loss"] for e in epochs] and curve["lr"] == [e["lr"] for e in epochs]
    curve = training_curve(old["cycles"], [])  # nothing logged per epoch: the cycles' own numbers
    assert curve == {"x": [1, 2], "loss": [0.5, 0.5], "lr": [1e-4, 1e-4], "at": [1, 2], "unit": "cycle"}
    cls = {"fold0-x": {"cycles": [{"cycle": 1, "epoch": 6, "train_loss": 0.4, "auroc": 0.9}], "epochs": epochs}}
    plot_training(tmp_path / "curves.png", {"fold0": now, "fold1": old}, cls)
    plot_progress(tmp_path / "progress.png", now["cycles"], "top_k_auroc", epochs)
    plot_progress(tmp_path / "progress_old.png", old["cycles"], "top_k_auroc")
    import matplotlib.image as mpimg

    for name in ("curves.png", "progress.png", "progress_old.png"):
        img = mpimg.imread(tmp_path / name)
        assert img.shape[0] > 200 and float(np.std(img)) > 0.01  # drawn, not blank


def test_a_rerun_resumes_only_the_same_demo(tmp_path: Path):
    """demo.json in OUT keeps the options the results depend on: a re-run with another seed, cohort
    size or budget is refused before any work (not minutes later by its folds); --workers may change.
    A run of the home that belongs to another OUT is refused too."""
    from dataclasses import replace

    from petctl.engine.demo import DEMO_OPTIONS, DemoConfig, _check_resume, _result_options
    from petctl.engine.registry import Registry
    from petctl.errors import PetctlError

    out = tmp_path / "out"
    out.mkdir()
    cfg = DemoConfig(out=str(out))
    registry = Registry(tmp_path / "home")
    _check_resume(cfg, registry)  # a first run: nothing to compare
    (out / DEMO_OPTIONS).write_text(json.dumps(_result_options(cfg)))
    _check_resume(replace(cfg, workers=7, fresh=False), registry)
    for change, text in ((dict(seed=7), "seed=0, and this run asks seed=7"), (dict(cases=50), "cases=192, and this run asks cases=50"),
                         (dict(budget_min=40), "budget_min=20"), (dict(pet_clip=(5.0, 95.0)), "pet_clip=[0.0, 95.0]")):
        with pytest.raises(PetctlError, match="add --fresh to start over") as err:
            _check_resume(replace(cfg, **change), registry)
        assert text in str(err.value)
    registry.create_run("demo", kind="demo", config={"store": str((tmp_path / "other" / "store").resolve())})
    with pytest.raises(PetctlError, match=f"run 'demo' belongs to another demo \\(its store {tmp_path / 'other' / 'store'}\\)"):
        _check_resume(cfg, registry)
    _check_resume(replace(cfg, out=str(tmp_path / "out2"), run="mine"), registry)  # another OUT with its own run


def test_fresh_deletes_only_an_empty_folder_or_an_earlier_demo(tmp_path: Path):
    from petctl.engine.demo import DemoConfig, _check_fresh_out
    from petctl.errors import PetctlError

    home = tmp_path / "home"
    _check_fresh_out(DemoConfig(out=str(tmp_path / "new")), home)  # not there yet
    (tmp_path / "empty").mkdir()
    _check_fresh_out(DemoConfig(out=str(tmp_path / "empty")), home)
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    with pytest.raises(PetctlError, match="is not an earlier demo's folder"):
        _check_fresh_out(DemoConfig(out=str(project)), home)
    (project / "report.md").write_text("# petctl demo report")
    _check_fresh_out(DemoConfig(out=str(project)), home)  # an earlier demo's OUT
    with pytest.raises(PetctlError, match="holds --data"):
        _check_fresh_out(DemoConfig(out=str(project), data=str(project / "raw")), home)
    with pytest.raises(PetctlError, match="holds the petctl home"):
        _check_fresh_out(DemoConfig(out=str(tmp_path)), home)
    assert (project / "notes.txt").exists()


def test_demo_processes_divide_the_preset_s_batch(monkeypatch: pytest.MonkeyPatch):
    from petctl.engine import folds
    from petctl.engine.demo import DemoConfig, demo_launches
    from petctl.errors import PetctlError

    monkeypatch.setattr(folds, "gpu_count", lambda: 0)
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    three = demo_launches(DemoConfig(), 1, 4)  # 3 cores, a batch of 4: 2 processes of 2 patches, not 3 of 1
    assert (three.seg.processes, three.seg_batch) == (2, 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert (demo_launches(DemoConfig(), 1, 4).seg.processes, demo_launches(DemoConfig(), 1, 4).seg_batch) == (4, 1)
    with pytest.raises(PetctlError, match="--processes 3: .* batch of 4 patches, so they must divide it"):
        demo_launches(DemoConfig(processes=3), 1, 4)


def test_summary_json_has_no_nan():
    from petctl.engine.registry import json_safe

    assert json.dumps(json_safe({"auroc": float("nan"), "x": [1.0, float("inf")], "n": 3}), allow_nan=False) == \
        '{"auroc": null, "x": [1.0, null], "n": 3}'

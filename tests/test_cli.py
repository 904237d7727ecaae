"""The CLI as a user meets it: help, version, exit codes, and synth → prepare → status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from petctl.cli import app

VERBS = ("synth", "prepare", "train", "calibrate", "retrain-merged", "predict", "evaluate", "status", "slurm", "demo")


def test_help_lists_every_verb_quickly():
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "petctl", "--help"], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - t0
    assert result.returncode == 0
    for verb in VERBS:
        assert verb in result.stdout
    # no torch on the help path (the timing itself is not asserted: shared machines are noisy)
    probe = subprocess.run([sys.executable, "-c", "import sys, petctl.cli; print('torch' in sys.modules)"], capture_output=True, text=True)
    assert probe.stdout.strip() == "False", probe.stderr
    assert elapsed < 60


def test_version_and_usage_error_exit_codes(tmp_path: Path):
    v = subprocess.run([sys.executable, "-m", "petctl", "--version"], capture_output=True, text=True)
    assert v.returncode == 0 and v.stdout.startswith("petctl ")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    r = subprocess.run([sys.executable, "-m", "petctl", "synth", str(busy)], capture_output=True, text=True)
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "petctl", "prepare", str(tmp_path / "nope"), "--store", str(tmp_path / "s")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not a folder" in r.stderr
    r = subprocess.run([sys.executable, "-m", "petctl", "calibrate"], capture_output=True, text=True)  # a required option missing
    assert r.returncode == 2 and "Missing" in r.stderr + r.stdout and "Traceback" not in r.stderr, r.stderr


def test_a_negative_seed_is_a_usage_error(tmp_path: Path):
    runner = CliRunner()
    for verb in (["synth", str(tmp_path / "raw")], ["demo", "--out", str(tmp_path / "d")], ["prepare", str(tmp_path), "--store", str(tmp_path / "s")]):
        r = runner.invoke(app, [*verb, "--seed", "-1"])
        assert r.exit_code == 2 and "--seed" in r.output, (verb, r.output)
    assert not (tmp_path / "raw").exists() and not (tmp_path / "d").exists()


def test_synth_prepare_status_chain(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PETCTL_HOME", str(tmp_path / "home"))
    runner = CliRunner()
    raw, store = tmp_path / "raw", tmp_path / "store"
    r = runner.invoke(app, ["synth", str(raw), "--cases", "8", "--seed", "4", "--scale", "0.5"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["prepare", str(raw), "--store", str(store), "--spacing", "6,6,8", "--folds", "2", "--run", "chain"])
    assert r.exit_code == 0, r.output
    assert len(json.loads((store / "manifest.json").read_text())["cases"]) == 8
    r = runner.invoke(app, ["status"])
    assert r.exit_code == 0 and "chain" in r.output and "prepare" in r.output and "done" in r.output
    r = runner.invoke(app, ["status", "--json"])
    data = json.loads(r.output)
    step = data["runs"][0]["steps"][0]
    assert step["step"] == "prepare" and step["status"] == "done" and step["metrics"]["cases"] == 8


def test_prepare_reads_the_autopet_layout(tmp_path: Path):
    from petctl.engine.cohort import discover
    from petctl.engine.prepare import PrepareConfig, run
    from petctl.engine.synth import make_cohort

    raw = tmp_path / "autopet"
    make_cohort(raw, num_cases=8, seed=2, layout="autopet", scale=0.5)
    sources = discover(raw)
    assert len(sources) == 8 and all(s.ct.name.startswith("CTres") for s in sources)
    patients = {s.patient for s in sources}
    assert len(patients) < 8  # several studies of one patient are grouped by the metadata CSV
    result = run(PrepareConfig(data=str(raw), store=str(tmp_path / "s"), spacing=(6.0, 6.0, 8.0), num_folds=2))
    assert not result.skipped and len(result.prepared) == 8
    splits = json.loads((tmp_path / "s" / "splits.json").read_text())
    by_patient = {s.case: s.patient for s in sources}
    test_patients = {by_patient[c] for c in splits["test"]}
    for fold in splits["cls_folds"]:
        assert not test_patients & {by_patient[c] for c in fold["train"] + fold["val"]}


def test_calibrate_rejects_a_bad_threshold_prior_before_touching_the_run(tmp_path: Path):
    from petctl.commands.calibrate import _prior

    assert _prior("preset") == "preset" and _prior(" None ") is None and _prior("0.7") == 0.7
    env = {**os.environ, "PETCTL_HOME": str(tmp_path / "home")}
    for bad in ("1.5", "high", "0"):
        r = subprocess.run([sys.executable, "-m", "petctl", "calibrate", "--run", "r", "--threshold-prior", bad], env=env,
                           capture_output=True, text=True)
        assert r.returncode == 2 and "--threshold-prior" in r.stderr and "Traceback" not in r.stderr, r.stderr

"""Shared fixtures: a small synthetic cohort and its prepared store, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

COARSE = (6.0, 6.0, 8.0)


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from petctl.engine.synth import make_cohort

    out = tmp_path_factory.mktemp("cohort") / "raw"
    make_cohort(out, num_cases=10, seed=11, scale=0.6)
    return out


@pytest.fixture(scope="session")
def store(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from petctl.engine.prepare import PrepareConfig, run

    out = tmp_path_factory.mktemp("store") / "s"
    result = run(PrepareConfig(data=str(cohort), store=str(out), spacing=COARSE, num_folds=2, test_fraction=0.25))
    assert not result.skipped, result.skipped
    return out


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "home"
    monkeypatch.setenv("PETCTL_HOME", str(h))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return h

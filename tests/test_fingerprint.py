"""The streamed (histogram) fingerprint equals the in-memory one within a bin."""

from __future__ import annotations

import numpy as np
import pytest

from petctl.engine.fingerprint import Histogram, case_histograms, in_memory, summarize


def _volumes(seed: int, n: int = 4):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ct = np.round(rng.normal(40, 150, (24, 24, 24))).astype(np.float32)
        pet = rng.gamma(2.0, 1.7, (24, 24, 24)).astype(np.float32)
        label = (rng.random((24, 24, 24)) > 0.8).astype(np.uint8)
        out.append((ct, pet, label))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streamed_equals_in_memory(seed):
    vols = _volumes(seed)
    fp = summarize((case_histograms(*v) for v in vols), [(1, 1, 1)] * 4, [(24, 24, 24)] * 4, list("abcd"))
    ref = in_memory(vols)
    for name, tol in (("ct", 1.0), ("pet", 0.01)):
        for q in ("0.5", "5", "95", "99.5"):
            assert fp[name]["percentiles"][q] == pytest.approx(ref[name][q], abs=tol)
        assert fp[name]["mean"] == pytest.approx(ref[name]["mean"], abs=tol)
        assert fp[name]["std"] == pytest.approx(ref[name]["std"], abs=tol)
    assert fp["foreground"] == "label"


def test_order_of_parts_does_not_matter():
    vols = _volumes(5)
    a = summarize((case_histograms(*v) for v in vols), [], [], [])
    b = summarize((case_histograms(*v) for v in reversed(vols)), [], [], [])
    assert a["ct"] == b["ct"] and a["pet"] == b["pet"]


def test_falls_back_to_body_when_no_lesion():
    ct = np.full((10, 10, 10), -1000.0, np.float32)
    ct[2:8, 2:8, 2:8] = 50
    pet = np.ones_like(ct)
    fp = summarize([case_histograms(ct, pet, np.zeros(ct.shape, np.uint8))], [], [], ["a"])
    assert fp["foreground"] == "body" and fp["ct"]["percentiles"]["5"] == pytest.approx(50, abs=1)


def test_outliers_land_in_edge_bins():
    h = Histogram.of("pet", np.array([-1e6, 1e6, 1.0]))
    assert h.total == 3 and h.counts[0] == 1 and h.counts[-1] == 1


def test_pet_gets_its_own_clip_percentiles_when_asked():
    vols = _volumes(3)
    fp = summarize((case_histograms(*v) for v in vols), [], [], [], clip=(5, 95), pet_clip=(0, 99.5))
    ct = np.concatenate([v[0][v[2] > 0] for v in vols])
    pet = np.concatenate([v[1][v[2] > 0] for v in vols])
    assert fp["ct"]["clip"] == pytest.approx([np.percentile(ct, 5), np.percentile(ct, 95)], abs=1.0)
    assert fp["pet"]["clip"] == pytest.approx([pet.min(), np.percentile(pet, 99.5)], abs=0.01)
    assert fp["pet"]["clip_percentiles"] == [0, 99.5]
    clipped = np.clip(pet, *fp["pet"]["clip"])
    assert fp["pet"]["mean"] == pytest.approx(clipped.mean(), abs=0.01)
    same = summarize((case_histograms(*v) for v in vols), [], [], [], clip=(5, 95))
    assert same["pet"]["clip_percentiles"] == [5, 95]


def test_prepare_refuses_a_bad_pet_clip(tmp_path):
    from petctl.engine.prepare import PrepareConfig
    from petctl.errors import PetctlError

    with pytest.raises(PetctlError, match="--pet-clip"):
        PrepareConfig(data=str(tmp_path), store=str(tmp_path / "s"), pet_clip_percentiles=(50, 10))

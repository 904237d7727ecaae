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

"""Geometry round trips: stored case → original grid, flipped axes included."""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest

from petctl.engine.geometry import (
    CaseGeometry,
    foreground_box,
    label_to_stored,
    plan_geometry,
    spacing_of,
    to_canonical,
    to_original,
)


def _volume(flips: tuple[int, int, int], perm: tuple[int, int, int] = (0, 1, 2)):
    rng = np.random.default_rng(sum(flips) + 7)
    shape = (36, 44, 52)
    label = np.zeros(shape, np.uint8)
    label[8:19, 12:30, 20:47] = 1
    label[rng.integers(5, 30), rng.integers(5, 38), rng.integers(5, 46)] = 1  # a one-voxel lesion
    ct = np.full(shape, -1000.0, np.float32)
    ct[3:33, 4:40, 2:50] = 40.0
    affine = np.zeros((4, 4))
    for i, (ax, f) in enumerate(zip(perm, flips)):
        affine[ax, i] = f * (2.5 + 0.5 * i)
    affine[:3, 3] = [-50.0, 20.0, 300.0]
    affine[3, 3] = 1
    return ct, label, affine


CASES = [(f, p) for f in itertools.product((1, -1), repeat=3) for p in [(0, 1, 2), (1, 0, 2)]]


@pytest.mark.parametrize("flips,perm", CASES)
def test_round_trip_at_native_spacing_is_exact(flips, perm):
    ct, label, affine = _volume(flips, perm)
    ct_c, canon = to_canonical(ct, affine)
    lab_c, _ = to_canonical(label, affine)
    assert nib.aff2axcodes(canon) == ("R", "A", "S")
    geometry = plan_geometry(label.shape, affine, ct_c > -500, spacing_of(canon))
    stored = label_to_stored(lab_c, geometry)
    back = to_original(stored.astype(np.float32), geometry) >= 0.5
    assert back.shape == label.shape
    assert np.array_equal(back, label.astype(bool))


@pytest.mark.parametrize("flips", [(1, 1, 1), (-1, 1, -1)])
def test_round_trip_after_resampling_keeps_geometry_and_overlap(flips):
    ct, label, affine = _volume(flips)
    ct_c, canon = to_canonical(ct, affine)
    lab_c, _ = to_canonical(label, affine)
    geometry = plan_geometry(label.shape, affine, ct_c > -500, (2.04, 2.04, 3.0))
    stored = label_to_stored(lab_c, geometry)
    back = to_original(stored.astype(np.float32), geometry) >= 0.5
    dice = 2 * (back & (label > 0)).sum() / (back.sum() + label.sum())
    assert back.shape == label.shape and dice > 0.97
    # the stored affine maps stored voxel centres onto the world positions of the canonical crop
    st = np.array(geometry.stored_affine)
    world0 = st @ np.r_[-0.5, -0.5, -0.5, 1]  # corner of the first stored voxel
    lo = np.array(geometry.crop_lo) - 0.5
    assert np.allclose(world0, canon @ np.r_[lo, 1])
    assert np.allclose(spacing_of(st), geometry.stored_spacing)


@pytest.mark.parametrize("flips", [(1, 1, 1), (-1, 1, -1)])
def test_nearest_resampling_keeps_a_lone_peak_that_trilinear_lowers(flips):
    """Probabilities back on a finer input grid: trilinear averages a one-voxel peak with its
    neighbours (so a lesion's core can fall under the threshold); nearest-exact gives each input
    voxel the value of the stored voxel it lies in, so every stored value is kept, peaks included."""
    from petctl.errors import PetctlError

    ct, label, affine = _volume(flips)
    ct_c, canon = to_canonical(ct, affine)
    geometry = plan_geometry(label.shape, affine, ct_c > -500, (4.0, 4.5, 6.0))  # coarser than the input in every axis
    rng = np.random.default_rng(0)
    probs = rng.uniform(0.0, 0.5, geometry.stored_shape).astype(np.float32)
    peak = tuple(s // 2 for s in geometry.stored_shape)
    probs[peak] = 0.8
    linear, nearest = to_original(probs, geometry), to_original(probs, geometry, mode="nearest")
    assert linear.shape == nearest.shape == label.shape
    assert float(nearest.max()) == pytest.approx(0.8) and float(linear.max()) < 0.75
    inside = nearest[nearest > 0]  # the crop: only stored values, each stored voxel seen (upsampling)
    assert np.isin(inside, probs).all() and len(np.unique(inside)) == len(np.unique(probs))
    assert (nearest >= 0.75).sum() >= 1 and (linear >= 0.75).sum() == 0
    with pytest.raises(PetctlError, match="resampling must be one of linear, nearest"):
        to_original(probs, geometry, mode="cubic")


def test_geometry_json_round_trip():
    ct, label, affine = _volume((-1, 1, 1))
    ct_c, _ = to_canonical(ct, affine)
    g = plan_geometry(label.shape, affine, ct_c > -500, (3.0, 3.0, 3.0))
    assert CaseGeometry.from_json(g.to_json()) == g


@pytest.mark.parametrize(
    "mask,margin,expected",
    [
        (np.zeros((4, 5, 6), bool), 2, ((0, 0, 0), (4, 5, 6))),
        (np.ones((4, 5, 6), bool), 2, ((0, 0, 0), (4, 5, 6))),
    ],
)
def test_foreground_box_edges(mask, margin, expected):
    assert foreground_box(mask, margin) == expected


def test_foreground_box_margin_clipped():
    m = np.zeros((10, 10, 10), bool)
    m[1, 5, 8] = True
    assert foreground_box(m, 2) == ((0, 3, 6), (4, 8, 10))

"""The embedded synthetic cohort: AutoPET-like whole-body PET/CT studies with honest lesion labels.

Each study is an analytic phantom in physical millimetres (canonical RAS: +x patient right,
+y anterior, +z head): a body with fat, muscle, lungs, liver, spleen, bones and brain, plus the
physiological PET uptake that is *not* lesion (brain, myocardium, kidneys, bladder, and in some
studies brown fat or bowel). Positive patients carry 1-6 irregular FDG-avid lesions in plausible
sites; the label is the lesion shape on the PET grid before the PET is blurred and made noisy.
Because the phantom is analytic it can be sampled on any grid, so studies vary like real data:
anisotropic spacing, nonzero origins, flipped storage axes, and sometimes a CT on its own finer
grid. Randomness is keyed by (seed, split, patient or case index), so a case does not depend on
how many cases are generated. `make_cohort` writes the nnU-Net raw or the AutoPET folder layout
and a `synth.json` marker that lets a later run overwrite the folder.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from petctl.errors import PetctlError

LAYOUTS = ("nnunet", "autopet")
DIAGNOSES = ("LYMPHOMA", "MELANOMA", "LUNG_CANCER")
NEGATIVE = "NEGATIVE"
MARKER = "synth.json"
MARKER_FORMAT = "petctl-synth"
MARKER_VERSION = 2
"""2: the marker is written when a run starts, with `"complete": false`, and again at its end with
`"complete": true`, so an interrupted run's OUT is recognised (and cleared) by the next one."""

_TRAIN, _TEST = 0, 1
_OUTPUT_NAMES = ("imagesTr", "labelsTr", "imagesTs", "labelsTs", "dataset.json", "metadata.csv", "Metadata.csv", MARKER)

# Tissue codes of the phantom; the physiological-uptake organs are the ones lesions must avoid.
AIR, FAT, SOFT, LUNG, LIVER, SPLEEN, CANCELLOUS, CORTICAL, BRAIN, MYOCARDIUM, BLOOD, KIDNEY, BLADDER, BOWEL, BROWN_FAT = range(15)  # fmt: skip
_PHYSIOLOGICAL = (BRAIN, MYOCARDIUM, BLOOD, KIDNEY, BLADDER, BOWEL, BROWN_FAT)
# Per tissue: mean CT number (HU), and the range a study's mean SUV is drawn from (FDG uptake in
# heart, kidneys, bladder and brown fat varies a lot between scans).
_TISSUE_TABLE = {
    AIR: (-1000, (0.02, 0.02)),
    FAT: (-100, (0.25, 0.35)),
    SOFT: (42, (0.6, 1.0)),
    LUNG: (-850, (0.3, 0.4)),
    LIVER: (60, (2.0, 2.5)),
    SPLEEN: (50, (1.6, 2.1)),
    CANCELLOUS: (380, (0.9, 1.3)),
    CORTICAL: (850, (0.4, 0.6)),
    BRAIN: (35, (6.0, 10.0)),
    MYOCARDIUM: (45, (2.0, 8.0)),
    BLOOD: (40, (1.4, 2.0)),
    KIDNEY: (32, (4.0, 8.0)),
    BLADDER: (8, (8.0, 20.0)),
    BOWEL: (25, (3.0, 6.0)),
    BROWN_FAT: (-75, (3.0, 8.0)),
}
_SITES = {  # lesion site weights per diagnosis
    "LYMPHOMA": {"neck": 0.25, "axilla": 0.2, "mediastinum": 0.25, "abdomen": 0.2, "groin": 0.1},
    "MELANOMA": {
        "subcutaneous": 0.25,
        "lung": 0.2,
        "liver": 0.2,
        "axilla": 0.1,
        "groin": 0.1,
        "bone": 0.1,
        "neck": 0.05,
    },
    "LUNG_CANCER": {"lung": 0.45, "mediastinum": 0.25, "bone": 0.15, "liver": 0.1, "neck": 0.05},
}
# Lymph-node regions: (s range along the body from head top, |x| range and y range as fractions of
# the local torso semi-axes, mirrored left/right).
_NODE_REGIONS = {
    "neck": ((0.19, 0.25), (0.25, 0.6), (-0.3, 0.3)),
    "axilla": ((0.28, 0.34), (0.6, 0.8), (-0.2, 0.3)),
    "mediastinum": ((0.30, 0.41), (0.0, 0.12), (-0.1, 0.35)),
    "abdomen": ((0.58, 0.74), (0.0, 0.22), (-0.3, 0.1)),
    "groin": ((0.84, 0.90), (0.35, 0.6), (0.1, 0.5)),
}


@dataclass(frozen=True)
class CohortSummary:
    """What `make_cohort` wrote."""

    out: Path
    case_ids: tuple[str, ...]
    """Training cases (studies), in generation order."""
    num_positive: int
    """Training cases with at least one lesion."""
    num_patients: int
    """Distinct training patients."""
    layout: str
    test_case_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Grid:
    """A voxel grid in canonical RAS millimetres: voxel (i, j, k) sits at origin + (i, j, k) * spacing."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Coordinates along x, y, z, shaped to broadcast over the volume."""
        x, y, z = (
            np.float32(o) + np.float32(s) * np.arange(n, dtype=np.float32)
            for n, s, o in zip(self.shape, self.spacing, self.origin)
        )
        return x[:, None, None], y[None, :, None], z[None, None, :]

    def affine(self) -> np.ndarray:
        aff = np.diag([*self.spacing, 1.0])
        aff[:3, 3] = self.origin
        return aff

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[tuple[slice, ...], tuple[np.ndarray, ...]] | None:
        """Index slices and local coordinates of the voxels inside the mm box [lo, hi]; None if empty."""
        slices, coords = [], []
        for ax, (n, s, o) in enumerate(zip(self.shape, self.spacing, self.origin)):
            a, b = max(int(np.ceil((lo[ax] - o) / s)), 0), min(int(np.floor((hi[ax] - o) / s)) + 1, n)
            if a >= b:
                return None
            slices.append(slice(a, b))
            c = (o + s * np.arange(a, b)).astype(np.float32)
            coords.append(c.reshape([-1 if i == ax else 1 for i in range(3)]))
        return tuple(slices), tuple(coords)


@dataclass(frozen=True)
class Body:
    """One study's anatomy in mm (canonical frame); `s` runs from head top (0) to the FOV bottom (1)."""

    z_top: float
    length: float
    k: float
    """Body size relative to the template adult."""
    width: float
    depth: float
    y_back: float
    fat: float
    head: tuple[float, float]
    bladder: tuple[float, float, float]
    brown_fat: tuple[tuple[float, float, float, float], ...]
    """(s, |x| fraction, y fraction, radius mm) of each symmetric pair."""
    bowel: tuple[tuple[float, float, float], ...]
    """Points (s, x fraction, y fraction) of the bowel centre line; empty when no bowel uptake."""

    def z(self, s: float) -> float:
        return self.z_top - s * self.length

    def profile(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Torso semi-axes (a along x, b along y) and centre y at body position `s`."""
        w, d = self.width / 2, self.depth / 2
        knots = [0.15, 0.25, 0.29, 0.50, 0.76, 0.88]
        a = np.interp(s, knots, [0.35 * w, 0.35 * w, w, 0.95 * w, w, w])
        b = np.interp(s, knots, [0.5 * d, 0.5 * d, 0.95 * d, d, 0.92 * d, 0.9 * d])
        return a, b, self.y_back + b

    def at(self, s: float, x_frac: float, y_frac: float) -> np.ndarray:
        """The point at body position `s`, offset by fractions of the local torso semi-axes."""
        a, b, cy = (float(v) for v in self.profile(np.array(s)))
        return np.array([x_frac * a, cy + y_frac * b, self.z(s)])


@dataclass(frozen=True)
class Lesion:
    """An irregular lesion: a union of rotated ellipsoid blobs whose surface is bumped by sinusoids."""

    blobs: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]
    """(centre mm, semi-axes mm, 3x3 rotation) per blob."""
    bumps: np.ndarray
    """(n, 5): direction (3), frequency, phase of each surface bump."""
    suv: float
    hu: float

    def extent(self) -> tuple[np.ndarray, np.ndarray]:
        reach = [c - 1.3 * ax.max() for c, ax, _ in self.blobs], [c + 1.3 * ax.max() for c, ax, _ in self.blobs]
        return np.min(reach[0], axis=0), np.max(reach[1], axis=0)

    def mask(self, grid: Grid) -> tuple[tuple[slice, ...], np.ndarray] | None:
        """The lesion voxels inside its bounding box of `grid`."""
        found = grid.box(*self.extent())
        if found is None:
            return None
        slices, (x, y, z) = found
        centre = self.blobs[0][0]
        rel = [x - centre[0], y - centre[1], z - centre[2]]
        norm = np.sqrt(rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2) + 1e-3
        bump = 1.0 + sum(
            0.12 * np.sin(f * (d[0] * rel[0] + d[1] * rel[1] + d[2] * rel[2]) / norm + p) for *d, f, p in self.bumps
        )
        dist = None
        for c, ax, rot in self.blobs:
            local = [x - c[0], y - c[1], z - c[2]]
            q = sum(
                ((rot[0, i] * local[0] + rot[1, i] * local[1] + rot[2, i] * local[2]) / ax[i]) ** 2 for i in range(3)
            )
            dist = q if dist is None else np.minimum(dist, q)
        return slices, dist <= bump**2


@dataclass(frozen=True)
class _Study:
    case: str
    patient: str
    patient_index: int
    patient_key: str
    diagnosis: str
    split: int
    index: int
    study_number: int


@dataclass(frozen=True)
class _Patient:
    """What a patient's studies share: scan length and body build."""

    scan_length: float
    width: float
    depth_ratio: float
    fat: float
    head: tuple[float, float]


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key])


def _one_in(seed: int, stream: int, split: int, index: int, period: int) -> bool:
    """Exactly one index in each block of `period` is chosen, so small cohorts still get one."""
    return int(_rng(seed, stream, split, index // period).integers(period)) == index % period


def _plan(seed: int, split: int, num_cases: int, first_case: int, first_patient: int) -> list[_Study]:
    """Assign cases to patients: one patient in five has two studies; half the patients are positive."""
    studies: list[_Study] = []
    p = 0
    while len(studies) < num_cases:
        rng = _rng(seed, 1, split, p)
        num_studies = 2 if _one_in(seed, 2, split, p, 5) else 1
        positive = _one_in(seed, 3, split, p, 2)
        diagnosis = str(rng.choice(DIAGNOSES)) if positive else NEGATIVE
        key = rng.bytes(5).hex()
        for n in range(min(num_studies, num_cases - len(studies))):
            i = len(studies)
            studies.append(
                _Study(f"synth_{first_case + i:04d}", f"PAT_{first_patient + p:03d}", p, key, diagnosis, split, i, n)
            )
        p += 1
    return studies


def _patient(seed: int, split: int, index: int) -> _Patient:
    rng = _rng(seed, 9, split, index)
    return _Patient(
        scan_length=rng.uniform(620, 800),
        width=rng.uniform(310, 370),
        depth_ratio=rng.uniform(0.6, 0.74),
        fat=rng.uniform(6, 22),
        head=(rng.uniform(68, 78), rng.uniform(85, 98)),
    )


def _acquisition(rng: np.random.Generator, patient: _Patient, scale: float, more_margin: bool) -> Grid:
    """The PET grid of one study: about 80-110 voxels in-plane at 3-4.5 mm, 4.2-5 mm slices."""
    scan_length = patient.scan_length * rng.uniform(0.98, 1.02)
    nz = max(int(round(scan_length / rng.uniform(4.2, 5.0) * scale)), 16)
    fill = rng.uniform(0.52, 0.64) if more_margin else rng.uniform(0.66, 0.82)
    fov = patient.width * (scan_length - 25) / 800 / fill
    nxy = max(int(np.ceil(fov / float(np.clip(fov / rng.integers(80, 111), 3.0, 4.5)) * scale)), 16)
    sx, sz = fov / nxy, scan_length / nz
    origin = (
        -fov / 2 + sx / 2 + rng.uniform(-10, 10),
        -fov / 2 + sx / 2 + rng.uniform(-10, 10),
        -rng.uniform(600, 1300),
    )
    return Grid((nxy, nxy, nz), (sx, sx, sz), origin)


def _body(rng: np.random.Generator, patient: _Patient, grid: Grid) -> Body:
    fov_y = grid.shape[1] * grid.spacing[1]
    z_hi = grid.origin[2] + (grid.shape[2] - 0.5) * grid.spacing[2]
    z_lo = grid.origin[2] - 0.5 * grid.spacing[2]
    z_top = z_hi - rng.uniform(10, 40)
    k = (z_top - z_lo) / 800
    width = patient.width * k * rng.uniform(0.97, 1.03)
    depth = width * patient.depth_ratio
    y_back = grid.origin[1] - grid.spacing[1] / 2 + (fov_y - depth) * rng.uniform(0.3, 0.45)
    brown = (
        tuple(
            (rng.uniform(0.2, 0.3), rng.uniform(0.3, 0.55), rng.uniform(-0.2, 0.3), rng.uniform(5, 9))
            for _ in range(rng.integers(2, 5))
        )
        if rng.random() < 0.3
        else ()
    )
    bowel: tuple[tuple[float, float, float], ...] = ()
    if rng.random() < 0.3:
        t = np.linspace(0, 1, 80)
        f, ph = rng.uniform(1.5, 3.5, 3), rng.uniform(0, 2 * np.pi, 3)
        bowel = tuple(
            zip(
                0.64 + 0.13 * t + 0.02 * np.sin(2 * np.pi * f[0] * t + ph[0]),
                0.45 * np.sin(2 * np.pi * f[1] * t + ph[1]),
                0.1 + 0.35 * np.sin(2 * np.pi * f[2] * t + ph[2]),
            )
        )
    return Body(
        z_top=z_top,
        length=z_top - z_lo,
        k=k,
        width=width,
        depth=depth,
        y_back=y_back,
        fat=patient.fat * k,
        head=(patient.head[0] * k, patient.head[1] * k),
        bladder=tuple(rng.uniform(28, 48, 3) * k),
        brown_fat=brown,
        bowel=bowel,
    )


def _ellipsoid(
    tissue: np.ndarray, grid: Grid, centre: np.ndarray, radii: np.ndarray, code: int, where: np.ndarray | None = None
) -> None:
    """Paint an axis-aligned ellipsoid; `where` (same shape as tissue) restricts it."""
    found = grid.box(centre - radii, centre + radii)
    if found is None:
        return
    sl, (x, y, z) = found
    inside = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + (
        (z - centre[2]) / radii[2]
    ) ** 2 <= 1
    if where is not None:
        inside &= where[sl]
    tissue[sl][inside] = code


def tissue_map(body: Body, grid: Grid) -> np.ndarray:
    """The tissue code of every voxel of `grid` (uint8, canonical orientation)."""
    x, y, z = grid.axes()
    s = (body.z_top - z) / body.length
    a, b, cy = body.profile(s)
    k = body.k
    tissue = np.full(grid.shape, AIR, np.uint8)
    # Torso from the neck down, then two thighs below the crotch.
    legs = s > 0.88
    r_torso = np.where(s >= 0.15, (x / a) ** 2 + ((y - cy) / b) ** 2, 9.0)
    r_leg = ((np.abs(x) - 0.52 * a) / (0.46 * a)) ** 2 + ((y - cy) / b) ** 2
    r = np.where(legs, r_leg, r_torso).astype(np.float32)
    fat = body.fat * np.where(s < 0.27, 0.4, 1.0)
    r_in = np.where(
        legs,
        ((np.abs(x) - 0.52 * a) / (0.46 * a - fat)) ** 2 + ((y - cy) / (b - fat)) ** 2,
        (x / (a - fat)) ** 2 + ((y - cy) / (b - fat)) ** 2,
    )
    tissue[r <= 1] = FAT
    tissue[(r_in <= 1) & (r <= 1)] = SOFT
    hz = 0.1 * body.length
    head_c = np.array([0.0, body.y_back + body.head[1] + 5 * k, body.z(0.1)])
    _ellipsoid(tissue, grid, head_c, np.array([*body.head, hz]), SOFT)
    brain_c = head_c + [0, 0, 0.15 * hz]
    brain_r = np.array([body.head[0] - 11 * k, body.head[1] - 11 * k, 0.78 * hz])
    _ellipsoid(tissue, grid, brain_c, brain_r + 7 * k, CORTICAL)
    _ellipsoid(tissue, grid, brain_c, brain_r, BRAIN)
    # Lungs widen from apex to base; heart, liver and spleen then override them.
    thorax = (s > 0.265) & (s < 0.5)
    taper = np.sqrt(np.clip((s - 0.265) / 0.235, 0, 1))
    for side in (-1, 1):
        rl = ((x - side * 0.45 * a) / (0.36 * a * taper + 1e-3)) ** 2 + (
            (y - cy - 0.08 * b) / (0.62 * b * taper + 1e-3)
        ) ** 2
        tissue[(rl <= 1) & thorax] = LUNG
    a_t = float(body.profile(np.array(0.45))[0])
    heart_c, heart_r = (
        body.at(0.44, -0.12, 0.15),
        np.array([0.3 * a_t, 0.38 * a_t * body.depth / body.width, 0.06 * body.length]),
    )
    _ellipsoid(tissue, grid, heart_c, heart_r, MYOCARDIUM)
    _ellipsoid(tissue, grid, heart_c, heart_r - 10 * k, BLOOD)
    a_a, b_a, _ = body.profile(np.array(0.53))
    inner = tissue != AIR
    _ellipsoid(
        tissue, grid, body.at(0.53, 0.33, 0.05), np.array([0.5 * a_a, 0.62 * b_a, 0.075 * body.length]), LIVER, inner
    )
    _ellipsoid(
        tissue, grid, body.at(0.54, -0.55, -0.3), np.array([0.16 * a_a, 0.25 * b_a, 0.04 * body.length]), SPLEEN, inner
    )
    for side in (-1, 1):
        _ellipsoid(
            tissue, grid, body.at(0.61, side * 0.36, -0.45), np.array([25 * k, 22 * k, 0.055 * body.length]), KIDNEY
        )
    _ellipsoid(tissue, grid, body.at(0.84, 0.0, 0.25), np.array(body.bladder), BLADDER)
    # Bones: vertebrae (with discs) from neck to sacrum, rib cage, hip bones, femurs.
    y_spine = body.y_back + 0.28 * body.depth
    spine = (s > 0.17) & (s < 0.82) & ((x**2 + (y - y_spine) ** 2) <= (np.where(s < 0.27, 11, 17) * k) ** 2)
    disc = ((body.z_top - z) % (30 * k)) < 6 * k
    tissue[spine & ~disc] = CANCELLOUS
    tissue[spine & disc] = SOFT
    ribs = (
        (s > 0.27)
        & (s < 0.52)
        & (r_in > 0.78)
        & (r_in < 0.88)
        & (((body.z_top - z) % (24 * k)) < 10 * k)
        & (np.abs(x) > 0.1 * a)
    )
    tissue[ribs & ((tissue == SOFT) | (tissue == LUNG))] = CORTICAL
    hips = (s > 0.74) & (s < 0.88) & (r_in > 0.5) & (r_in < 0.62) & (np.abs(x) > 0.3 * a) & (y < cy + 0.2 * b)
    tissue[hips & (tissue == SOFT)] = CANCELLOUS
    femurs = legs & (((np.abs(x) - 0.52 * a) ** 2 + (y - cy) ** 2) <= (14 * k) ** 2)
    tissue[femurs] = CORTICAL
    soft = tissue == SOFT
    for s_bf, xf, yf, rad in body.brown_fat:
        for side in (-1, 1):
            _ellipsoid(tissue, grid, body.at(s_bf, side * xf, yf), np.full(3, rad * k), BROWN_FAT, soft)
    gut = (tissue == SOFT) | (tissue == FAT)
    for s_bw, xf, yf in body.bowel:
        _ellipsoid(tissue, grid, body.at(s_bw, xf, yf), np.full(3, 8 * k), BOWEL, gut)
    return tissue


def _place_lesions(
    rng: np.random.Generator, body: Body, grid: Grid, tissue: np.ndarray, diagnosis: str, pet_base: np.ndarray
) -> list[Lesion]:
    """1-6 lesions inside the body, clear of physiological uptake and of each other."""
    voxel_mm3 = float(np.prod(grid.spacing))
    r_min = (14 * voxel_mm3 * 3 / (4 * np.pi)) ** (1 / 3)
    taken = np.zeros(grid.shape, bool)
    sites, weights = zip(*_SITES[diagnosis].items())
    lesions: list[Lesion] = []
    target = int(rng.integers(1, 7))
    for attempt in range(2000):
        if len(lesions) == target or (attempt >= 60 * target and lesions):
            break
        site = str(rng.choice(sites, p=np.array(weights) / sum(weights)))
        radius = max(float(np.exp(rng.uniform(np.log(4), np.log(25)))), r_min)
        centre = _site_centre(rng, site, body, grid, tissue)
        if centre is None:
            continue
        lesion = _lesion(rng, centre, radius, site, grid, pet_base)
        found = lesion.mask(grid)
        if found is None:
            continue
        sl, inside = found
        if inside.sum() < 10 or not _clear(tissue, taken, sl, inside, grid.spacing):
            continue
        lesions.append(lesion)
        taken[sl] |= inside
    if not lesions:
        raise RuntimeError("could not place a lesion in a positive study")
    return lesions


def _clear(
    tissue: np.ndarray, taken: np.ndarray, sl: tuple[slice, ...], inside: np.ndarray, spacing: tuple[float, ...]
) -> bool:
    """Lesion voxels lie >= 8 mm from physiological uptake, >= 3 mm inside the skin, and clear of
    other lesions by 2.5 voxels (so each stays its own connected component after blurring)."""
    apart = 2.5 * max(spacing)
    pad = [int(np.ceil(max(8.0, apart) / s)) + 1 for s in spacing]
    big = tuple(slice(max(s.start - p, 0), min(s.stop + p, n)) for s, p, n in zip(sl, pad, tissue.shape))
    local = tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(sl, big))
    near = tissue[big]
    for mask, mm in ((np.isin(near, _PHYSIOLOGICAL), 8.0), (near == AIR, 3.0), (taken[big], apart)):
        if mask.any() and np.any(ndimage.distance_transform_edt(~mask, sampling=spacing)[local][inside] < mm):
            return False
    return True


def _site_centre(rng: np.random.Generator, site: str, body: Body, grid: Grid, tissue: np.ndarray) -> np.ndarray | None:
    """A lesion centre: in a lymph-node region, or at a random lung, liver, bone or fat voxel."""
    if site in _NODE_REGIONS:
        (s0, s1), (x0, x1), (y0, y1) = _NODE_REGIONS[site]
        return body.at(rng.uniform(s0, s1), rng.choice([-1, 1]) * rng.uniform(x0, x1), rng.uniform(y0, y1))
    code = {"lung": LUNG, "liver": LIVER, "bone": CANCELLOUS, "subcutaneous": FAT}[site]
    candidates = np.flatnonzero(tissue == code)
    if candidates.size == 0:
        return None
    idx = np.unravel_index(int(rng.choice(candidates)), grid.shape)
    return (
        np.array([o + s * i for o, s, i in zip(grid.origin, grid.spacing, idx)])
        + rng.uniform(-0.5, 0.5, 3) * grid.spacing
    )


def _lesion(
    rng: np.random.Generator, centre: np.ndarray, radius: float, site: str, grid: Grid, pet_base: np.ndarray
) -> Lesion:
    """An irregular lesion of about `radius` mm whose SUV clears the tissue it sits in."""

    def rotation() -> np.ndarray:
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        return q

    blobs = [(centre, radius * rng.uniform(0.75, 1.25, 3), rotation())]
    for _ in range(int(rng.integers(0, 4))):
        direction = rng.normal(size=3)
        offset = direction / np.linalg.norm(direction) * radius * rng.uniform(0.3, 0.8)
        blobs.append((centre + offset, radius * rng.uniform(0.4, 0.7, 3), rotation()))
    dirs = rng.normal(size=(3, 3))
    bumps = np.column_stack(
        [dirs / np.linalg.norm(dirs, axis=1, keepdims=True), rng.uniform(2, 6, 3), rng.uniform(0, 2 * np.pi, 3)]
    )
    idx = tuple(
        int(np.clip(round((c - o) / s), 0, n - 1)) for c, o, s, n in zip(centre, grid.origin, grid.spacing, grid.shape)
    )
    background = float(pet_base[idx])
    suv = max(float(np.exp(rng.uniform(np.log(3), np.log(15)))), 1.5 * background + 1.0)
    hu = {"lung": 30.0, "liver": 38.0, "bone": float(rng.choice([150.0, 900.0]))}.get(site, 42.0)
    return Lesion(tuple(blobs), bumps, suv, hu)


def _uptake(rng: np.random.Generator) -> np.ndarray:
    """Mean SUV per tissue code for one study."""
    return np.array([rng.uniform(*_TISSUE_TABLE[code][1]) for code in range(len(_TISSUE_TABLE))], np.float32)


def _attenuation(rng: np.random.Generator) -> np.ndarray:
    """Mean HU per tissue code for one study; air stays at -1000 so the body can be cropped."""
    hu = np.array([_TISSUE_TABLE[code][0] for code in range(len(_TISSUE_TABLE))], np.float32)
    return hu + rng.uniform(-8, 8, len(hu)).astype(np.float32) * (np.arange(len(hu)) != AIR)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    return noise / max(float(noise.std()), 1e-6)


def _render_pet(
    rng: np.random.Generator, tissue: np.ndarray, suv: np.ndarray, lesions: list[Lesion], grid: Grid
) -> np.ndarray:
    act = suv[tissue] * (1 + 0.08 * _smooth_noise(rng, tissue.shape, 4.0))
    for lesion in lesions:
        sl, inside = lesion.mask(grid)
        act[sl][inside] = lesion.suv * rng.uniform(0.85, 1.15, int(inside.sum()))
    fwhm = rng.uniform(5, 7)
    act = ndimage.gaussian_filter(act, [fwhm / 2.355 / s for s in grid.spacing])
    # Poisson-like: the noise standard deviation grows with the square root of the activity.
    act = act + np.sqrt(np.clip(act, 0, None) * rng.uniform(0.01, 0.03)) * _smooth_noise(rng, tissue.shape, 0.8)
    # Scanners store SUV on a fixed step; quantizing also lets gzip shrink the float32 volume.
    return (np.rint(np.clip(act, 0, None) * 1024) / 1024).astype(np.float32)


def _render_ct(
    rng: np.random.Generator, tissue: np.ndarray, hu_table: np.ndarray, lesions: list[Lesion], grid: Grid
) -> np.ndarray:
    hu = hu_table[tissue]
    lung = tissue == LUNG
    hu[lung] += rng.normal(0, 40, int(lung.sum())).astype(np.float32)  # vessels and septa, after the blur below
    for lesion in lesions:
        sl, inside = lesion.mask(grid)
        hu[sl][inside] = lesion.hu
    hu = ndimage.gaussian_filter(hu, 0.5) + rng.normal(0, rng.uniform(8, 20), tissue.shape).astype(np.float32)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def _flip(data: np.ndarray, grid: Grid, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Store `data` with `axes` reversed (e.g. LPS instead of RAS); the affine keeps the physical body."""
    affine = grid.affine()
    for ax in axes:
        data = np.flip(data, ax)
        flip = np.eye(4)
        flip[ax, ax], flip[ax, 3] = -1, grid.shape[ax] - 1
        affine = affine @ flip
    return np.ascontiguousarray(data), affine


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def _render_study(
    seed: int, study: _Study, scale: float, allow_ct_grid: bool, with_tissue: bool = False
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:
    """CT, PET and label arrays (with affines) of one study, and its number of lesions. `with_tissue`
    adds the PET grid's tissue codes ("tissue", stored like the PET), for tools that ask which tissue a
    prediction lies in; the other arrays do not change."""
    rng = _rng(seed, 4, study.split, study.index)
    patient = _patient(seed, study.split, study.patient_index)
    grid = _acquisition(rng, patient, scale, _one_in(seed, 5, study.split, study.index, 4))
    body = _body(rng, patient, grid)
    tissue = tissue_map(body, grid)
    suv = _uptake(rng)
    lesions = (
        _place_lesions(rng, body, grid, tissue, study.diagnosis, suv[tissue]) if study.diagnosis != NEGATIVE else []
    )
    label = np.zeros(grid.shape, np.uint8)
    for lesion in lesions:
        sl, inside = lesion.mask(grid)
        label[sl][inside] = 1
    pet = _render_pet(rng, tissue, suv, lesions, grid)
    ct_grid = grid
    if allow_ct_grid and _one_in(seed, 6, study.split, study.index, 6):
        fov = [n * s for n, s in zip(grid.shape, grid.spacing)]
        finer = rng.uniform(0.6, 0.8)
        n_ct = [int(round(n / finer)) for n in grid.shape[:2]] + [grid.shape[2]]
        sp_ct = [f / n for f, n in zip(fov, n_ct)]
        ct_grid = Grid(
            tuple(n_ct), tuple(sp_ct), tuple(o - s / 2 + c / 2 for o, s, c in zip(grid.origin, grid.spacing, sp_ct))
        )
    ct_tissue = tissue if ct_grid is grid else tissue_map(body, ct_grid)
    ct = _render_ct(rng, ct_tissue, _attenuation(rng), lesions, ct_grid)
    flips: tuple[int, ...] = ()
    if _one_in(seed, 7, study.split, study.index, 4):
        flips = (
            (0, 1)
            if rng.random() < 0.5
            else tuple(sorted(rng.choice(3, size=int(rng.integers(1, 3)), replace=False).tolist()))
        )
    images = {"ct": _flip(ct, ct_grid, flips), "pet": _flip(pet, grid, flips), "label": _flip(label, grid, flips)}
    if with_tissue:
        images["tissue"] = _flip(tissue, grid, flips)
    return images, len(lesions)


def _study_folder(seed: int, study: _Study) -> str:
    rng = _rng(seed, 8, study.split, study.patient_index)
    year, month, day = int(rng.integers(2002, 2019)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
    year += study.study_number  # follow-up studies come later
    return (
        f"{month:02d}-{day:02d}-{year}-NA-PET-CT_Ganzkoerper-{int(rng.integers(10000, 99999)) + study.study_number:05d}"
    )


def read_marker(out: Path) -> dict | None:
    """The `synth.json` of an earlier synth run in `out` (finished or not), or None."""
    try:
        marker = json.loads((Path(out) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT else None


def cohort_complete(out: Path) -> bool:
    """True when `out` holds a synth run that finished (a version-1 marker was only written at the end)."""
    marker = read_marker(out)
    return marker is not None and marker.get("complete", True) is True


def _prepare_out(out: Path) -> None:
    """Create `out`, or clear the outputs of an earlier synth run there, finished or interrupted;
    refuse anything else."""
    if out.exists() and not out.is_dir():
        raise PetctlError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if read_marker(out) is None:
            raise PetctlError(f"{out}: OUT exists and is not empty (and is not an earlier `petctl synth` output)")
        for entry in out.iterdir():
            if entry.name in _OUTPUT_NAMES or (entry.is_dir() and entry.name.startswith("PETCT_")):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    out.mkdir(parents=True, exist_ok=True)


def make_cohort(
    out: Path,
    num_cases: int = 24,
    seed: int = 0,
    *,
    layout: str = "nnunet",
    scale: float = 1.0,
    num_test_cases: int = 0,
    on_case: Callable[[str], None] | None = None,
    workers: int = 1,
) -> CohortSummary:
    """Write `num_cases` training studies (and `num_test_cases` held-out studies of new patients).

    `layout` is "nnunet" (imagesTr/labelsTr, dataset.json, metadata.csv; a test split goes to
    imagesTs/labelsTs) or "autopet" (PETCT_<hash>/<study>/{CTres,SUV,SEG}.nii.gz and Metadata.csv).
    metadata.csv lists the test cases too (they are new patients). `scale` multiplies the voxels per
    axis. `on_case(case_id)` is called after each study. `synth.json` records every case's files,
    patient, diagnosis and lesion count. `workers` > 1 renders studies in that many processes (each
    study has its own random stream, so the voxels do not depend on it).
    Raises PetctlError for bad arguments or an `out` that holds something else.
    """
    if layout not in LAYOUTS:
        raise PetctlError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    if num_cases < 1 or num_test_cases < 0:
        raise PetctlError("need at least one case and a non-negative number of test cases")
    if not 0.25 <= scale <= 4.0:
        raise PetctlError(f"scale must be between 0.25 and 4, not {scale}")
    if layout == "autopet" and num_test_cases:
        raise PetctlError("a held-out test split is written in the nnunet layout only")
    from petctl.engine.registry import write_json_atomic

    out = Path(out)
    _prepare_out(out)
    # Marks OUT as this run's before any volume is written: an interrupted run is cleared by the next.
    started = {"format": MARKER_FORMAT, "version": MARKER_VERSION, "complete": False, "seed": seed, "layout": layout,
               "scale": scale, "num_cases": num_cases, "num_test_cases": num_test_cases}
    write_json_atomic(out / MARKER, started)
    train = _plan(seed, _TRAIN, num_cases, 0, 0)
    num_patients = len({s.patient for s in train})
    test = _plan(seed, _TEST, num_test_cases, num_cases, num_patients) if num_test_cases else []
    records = []
    studies = train + test
    if workers > 1 and len(studies) > 1:
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(min(workers, len(studies)))
        outcomes = pool.map(_write_study, [(out, seed, study, scale, layout) for study in studies])
    else:
        pool = None
        outcomes = (_write_study((out, seed, study, scale, layout)) for study in studies)
    try:
        for study, (files, num_lesions) in zip(studies, outcomes):
            records.append(
                {
                    "case": study.case,
                    "patient": study.patient,
                    "diagnosis": study.diagnosis,
                    "split": "test" if study.split else "train",
                    "num_lesions": num_lesions,
                    "files": files,
                }
            )
            if on_case is not None:
                on_case(study.case)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    _write_metadata(out, layout, train + test, records)
    marker = {
        "format": MARKER_FORMAT,
        "version": MARKER_VERSION,
        "complete": True,
        "seed": seed,
        "layout": layout,
        "scale": scale,
        "num_cases": num_cases,
        "num_test_cases": num_test_cases,
        "cases": records,
    }
    write_json_atomic(out / MARKER, marker)
    return CohortSummary(
        out=out,
        case_ids=tuple(s.case for s in train),
        num_positive=sum(1 for s in train if s.diagnosis != NEGATIVE),
        num_patients=num_patients,
        layout=layout,
        test_case_ids=tuple(s.case for s in test),
    )


def _write_study(job: tuple[Path, int, "_Study", float, str]) -> tuple[dict[str, str], int]:
    """Render one study and write its three volumes; returns (files, number of lesions)."""
    out, seed, study, scale, layout = job
    images, num_lesions = _render_study(seed, study, scale, layout == "nnunet")
    if layout == "nnunet":
        tag = "Tr" if study.split == _TRAIN else "Ts"
        files = {
            "ct": f"images{tag}/{study.case}_0000.nii.gz",
            "pet": f"images{tag}/{study.case}_0001.nii.gz",
            "label": f"labels{tag}/{study.case}.nii.gz",
        }
    else:
        folder = f"PETCT_{study.patient_key}/{_study_folder(seed, study)}"
        files = {"ct": f"{folder}/CTres.nii.gz", "pet": f"{folder}/SUV.nii.gz", "label": f"{folder}/SEG.nii.gz"}
    for kind, rel in files.items():
        _save(*images[kind], out / rel)
    return files, num_lesions


def _write_metadata(out: Path, layout: str, studies: list[_Study], records: list[dict]) -> None:
    if layout == "nnunet":
        dataset = {
            "name": "petctl synthetic AutoPET-like cohort",
            "channel_names": {"0": "CT", "1": "PET"},
            "labels": {"background": 0, "lesion": 1},
            "numTraining": sum(1 for s in studies if s.split == _TRAIN),
            "file_ending": ".nii.gz",
        }
        (out / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
        with (out / "metadata.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["case", "patient", "diagnosis"])
            writer.writerows([s.case, s.patient, s.diagnosis] for s in studies)
    else:
        with (out / "Metadata.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["Subject ID", "Study UID", "diagnosis"])
            for s, rec in zip(studies, records):
                writer.writerow([f"PETCT_{s.patient_key}", rec["files"]["pet"].split("/")[1], s.diagnosis])

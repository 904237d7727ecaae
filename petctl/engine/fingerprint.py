"""The dataset fingerprint: training-set intensity statistics and spacing, streamed.

Intensities are collected over foreground voxels — the lesion label, as nnU-Net does for CT — into
fixed-bin histograms (CT: 1 HU bins centred on integers; PET: 0.005 SUV bins), so memory stays the same whatever the
cohort size and per-case parts can be summed in any order. From the summed histogram come the
percentiles (0.5, 5, 95, 99.5) and the mean/std of the values clipped to [p5, p95], which prepare
uses to clip and z-normalize. When the training set has no lesion voxels at all, the body (CT above
-500 HU) is the foreground instead. The fingerprint is computed from training cases only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from petctl.errors import PetctlError

PERCENTILES = (0.5, 5.0, 95.0, 99.5)
CLIP = (5.0, 95.0)
_BINS = {"ct": (-2048.5, 4095.5, 1.0), "pet": (-10.0, 150.0, 0.005)}
BODY_HU = -500.0
FINGERPRINT_VERSION = 1


@dataclass(frozen=True)
class Histogram:
    """Counts over fixed bins [lo, hi) of width `step`; outliers land in the edge bins."""

    modality: str
    counts: np.ndarray

    @classmethod
    def empty(cls, modality: str) -> "Histogram":
        lo, hi, step = _BINS[modality]
        return cls(modality, np.zeros(int(round((hi - lo) / step)), dtype=np.int64))

    @classmethod
    def of(cls, modality: str, values: np.ndarray) -> "Histogram":
        lo, hi, step = _BINS[modality]
        n = int(round((hi - lo) / step))
        idx = np.clip(np.floor((np.asarray(values, np.float64) - lo) / step), 0, n - 1).astype(np.int64)
        return cls(modality, np.bincount(idx, minlength=n).astype(np.int64))

    def __add__(self, other: "Histogram") -> "Histogram":
        return Histogram(self.modality, self.counts + other.counts)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def _centres(self) -> np.ndarray:
        lo, _, step = _BINS[self.modality]
        return lo + step * (np.arange(self.counts.size) + 0.5)

    def percentile(self, q: float) -> float:
        """Linear-interpolated percentile (numpy's default definition, to within one bin)."""
        if self.total == 0:
            raise PetctlError(f"{self.modality}: no foreground voxels to compute a fingerprint from")
        lo, _, step = _BINS[self.modality]
        cum = np.cumsum(self.counts)

        def order_statistic(k: int) -> float:
            # the k-th smallest value (0-based), placed evenly inside its bin
            b = int(np.searchsorted(cum, k, side="right"))
            below = int(cum[b - 1]) if b > 0 else 0
            return float(lo + step * (b + (k - below + 0.5) / self.counts[b]))

        rank = q / 100.0 * (self.total - 1)
        k = int(np.floor(rank))
        lower = order_statistic(k)
        upper = order_statistic(min(k + 1, self.total - 1))
        return lower + (rank - k) * (upper - lower)

    def clipped_mean_std(self, lo_val: float, hi_val: float) -> tuple[float, float]:
        centres = np.clip(self._centres(), lo_val, hi_val)
        w = self.counts / max(self.total, 1)
        mean = float((w * centres).sum())
        std = float(np.sqrt(max((w * (centres - mean) ** 2).sum(), 0.0)))
        return mean, std


def case_histograms(ct: np.ndarray, pet: np.ndarray, label: np.ndarray | None) -> dict[str, Histogram]:
    """One case's contribution: histograms over lesion voxels and over the body (fallback)."""
    body = ct > BODY_HU
    lesion = label > 0 if label is not None else np.zeros(ct.shape, bool)
    return {
        "ct": Histogram.of("ct", ct[lesion]),
        "pet": Histogram.of("pet", pet[lesion]),
        "ct_body": Histogram.of("ct", ct[body]),
        "pet_body": Histogram.of("pet", pet[body]),
    }


def _modality_stats(hist: Histogram, clip: tuple[float, float] = CLIP) -> dict[str, Any]:
    pct = {f"{q:g}": hist.percentile(q) for q in sorted({*PERCENTILES, *clip})}
    lo, hi = hist.percentile(clip[0]), hist.percentile(clip[1])
    mean, std = hist.clipped_mean_std(lo, hi)
    return {"percentiles": pct, "clip_percentiles": list(clip), "clip": [lo, hi], "mean": mean, "std": max(std, 1e-6), "num_voxels": hist.total}


def summarize(
    parts: Iterable[dict[str, Histogram]],
    spacings: Sequence[Sequence[float]],
    shapes: Sequence[Sequence[int]],
    cases: Sequence[str],
    clip: tuple[float, float] = CLIP,
    pet_clip: tuple[float, float] | None = None,
    pet_wide: bool = False,
) -> dict[str, Any]:
    """Sum per-case histograms (streamed) into the fingerprint JSON payload (clip: percentiles;
    pet_clip: PET's own, default the same; pet_wide: plan the wide PET channel, whose ceiling is
    the higher of the lesions' p99.5 and the body's p99.9 — brain and bladder — so that a very hot
    lesion and the bladder do not both saturate)."""
    total = {k: Histogram.empty(k.split("_")[0]) for k in ("ct", "pet", "ct_body", "pet_body")}
    for part in parts:
        for k in total:
            total[k] = total[k] + part[k]
    foreground = "label" if total["ct"].total > 0 else "body"
    ct, pet = (total["ct"], total["pet"]) if foreground == "label" else (total["ct_body"], total["pet_body"])
    wide = {}
    if pet_wide:
        ceiling = max(pet.percentile(99.5), total["pet_body"].percentile(99.9) if total["pet_body"].total else 0.0)
        wide = {"pet_wide": {"transform": "log1p", "ceiling": float(ceiling)}}
    return {
        **wide,
        "version": FINGERPRINT_VERSION,
        "foreground": foreground,
        "num_cases": len(cases),
        "cases": sorted(cases),
        "ct": _modality_stats(ct, clip),
        "pet": _modality_stats(pet, pet_clip or clip),
        "crop_threshold_hu": total["ct_body"].percentile(5.0) if total["ct_body"].total else BODY_HU,
        "median_spacing": [float(v) for v in np.median(np.asarray(spacings, float), axis=0)] if len(spacings) else None,
        "median_shape": [int(v) for v in np.median(np.asarray(shapes, float), axis=0)] if len(shapes) else None,
    }


def in_memory(volumes: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray | None]]) -> dict[str, dict[str, float]]:
    """Reference implementation with np.percentile over all foreground voxels (tests only)."""
    ct = np.concatenate([c[l > 0] for c, _, l in volumes if l is not None])
    pet = np.concatenate([p[l > 0] for _, p, l in volumes if l is not None])
    out = {}
    for name, v in (("ct", ct), ("pet", pet)):
        pct = {f"{q:g}": float(np.percentile(v, q)) for q in PERCENTILES}
        clipped = np.clip(v, pct["5"], pct["95"])
        out[name] = {**pct, "mean": float(clipped.mean()), "std": float(clipped.std())}
    return out


def check(fp: dict[str, Any]) -> dict[str, Any]:
    """Validate a fingerprint read from disk."""
    if fp.get("version") != FINGERPRINT_VERSION or "ct" not in fp or "pet" not in fp:
        raise PetctlError(f"fingerprint.json: unsupported or malformed (version {fp.get('version')!r})")
    return fp

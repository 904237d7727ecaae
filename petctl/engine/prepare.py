"""`petctl prepare`: cohort on disk → fingerprint, grouped splits and a Zarr store of cases.

Three passes, each resumable:
1. *scan* every case (full validation; per-case histograms saved under `STORE/.parts/`), so bad
   cases are named early and the fingerprint can be streamed without holding voxels;
2. *splits* (patient-grouped, stratified) and the *fingerprint* from the training cases only;
3. *write* each case: canonical orientation, crop to the CT foreground, resample, clip, z-normalize,
   lesion/body coordinate samples, atomic write to the store.
A case is skipped with one line naming it and the reason; all others are still prepared. Cases
already complete for the same plan (same fingerprint and settings) are not redone.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from petctl.engine.cohort import NEGATIVE, CaseSource, discover, is_valid_case_id
from petctl.engine.store import LESION_CONNECTIVITY, CaseStore, read_json, write_json_atomic
from petctl.errors import CaseError, PetctlError

MANIFEST_VERSION = 1
PREPARE_VERSION = 1
"""Bumped when the stored case format or preprocessing changes (invalidates finished cases)."""


@dataclass(frozen=True)
class PrepareConfig:
    """Everything `prepare` needs; written to `STORE/prepare.json`."""

    data: str
    """Cohort folder (nnU-Net raw layout or AutoPET layout)."""
    store: str
    """Output store folder."""
    spacing: tuple[float, float, float] = (2.04, 2.04, 3.0)
    """Target voxel spacing in mm (x, y, z after canonical RAS orientation)."""
    workers: int = 1
    """Parallel worker processes."""
    num_folds: int = 5
    test_fraction: float = 0.2
    seed: int = 0
    metadata: str | None = None
    """CSV with case,patient,diagnosis (or AutoPET's Subject ID/diagnosis); found beside the data if omitted."""
    lesion_samples_per_component: int = 64
    """Bounded sample of voxel coordinates per lesion component (small lesions are not drowned)."""
    body_samples: int = 4096
    hot_background: float = 0.0
    """Share of the background patch centres drawn from bright non-lesion voxels (PET at least the
    lesions' 5th percentile SUV, at least 2 voxels from a lesion: brain, heart, kidneys, bladder,
    bowel…) instead of uniformly from the body. 0 is the paper's uniform sampling; physiological
    uptake is where a PET segmenter's false positives come from (hard-negative sampling)."""
    crop_margin: int = 2
    clip_percentiles: tuple[float, float] = (5.0, 95.0)
    """Training-foreground percentiles each channel is clipped to before z-normalization (the
    method's 5–95 %; nnU-Net uses 0.5–99.5, which keeps faint, small lesions above the floor)."""
    pet_clip_percentiles: tuple[float, float] | None = None
    """PET's own clip percentiles (None: `clip_percentiles`). The lesion-foreground p5 is a PET
    floor above most of the body, so a faint lesion there is clipped to the same value as the
    tissue around it; 0,99.5 keeps it."""
    pet_wide: bool = False
    """Store a third channel beside the clipped PET: log(1 + SUV) over [0, ceiling], scaled to
    [-1, 1] (`PET_WIDE`; ceiling: the higher of the lesions' p99.5 and the body's p99.9). The
    clipped channel flattens everything under the lesions' p5 and over their p95, so a faint
    lesion in soft tissue and a very hot one look like the tissue around them and like the
    bladder; the wide channel keeps both contrasts. Off by default (the
    paper; in the demo it traded Dice for missed volume, README)."""

    def __post_init__(self) -> None:
        if len(self.spacing) != 3 or any(not (0.1 <= s <= 50) for s in self.spacing):
            raise PetctlError(f"--spacing must be three values in mm between 0.1 and 50, got {self.spacing}")
        if self.workers < 1:
            raise PetctlError("--workers must be at least 1")
        if self.num_folds < 2:
            raise PetctlError("--folds must be at least 2")
        for name, pair in (("--clip", self.clip_percentiles), ("--pet-clip", self.pet_clip_percentiles)):
            if pair is not None and not 0.0 <= pair[0] < pair[1] <= 100.0:
                raise PetctlError(f"{name} must be two percentiles 0 ≤ low < high ≤ 100 (got {pair})")
        if not 0.0 <= self.hot_background <= 1.0:
            raise PetctlError(f"--hot-background must be within [0, 1] (got {self.hot_background})")
        if not 0.0 < self.test_fraction < 0.9:
            raise PetctlError("--test-fraction must be in (0, 0.9)")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PrepareResult:
    store: Path
    prepared: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    splits: dict[str, Any] | None = None
    fingerprint: dict[str, Any] | None = None
    seconds: float = 0.0


Progress = Callable[[str, str, int], None]
"""progress(phase, case, total): called once per case and phase ('scan' or 'write')."""


# -- pass 1: scan ------------------------------------------------------------------------------
def scan_case(src: CaseSource, parts_dir: str) -> dict[str, Any]:
    """Validate a case and save its fingerprint histograms; returns its summary."""
    from petctl.engine.fingerprint import case_histograms
    from petctl.engine.geometry import spacing_of, to_canonical
    from petctl.engine.nifti import load_case

    loaded = load_case(src)
    label = loaded.label
    hist = case_histograms(loaded.ct, loaded.pet, label)
    tmp = Path(parts_dir) / f".{src.case}.npz.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **{k: h.counts for k, h in hist.items()})
        os.replace(tmp, Path(parts_dir) / f"{src.case}.npz")
    except BaseException:  # a full disk must not leave a partial part file taking space
        tmp.unlink(missing_ok=True)
        raise
    # shape and spacing both in the canonical (RAS) axis order, from a view that holds no voxels
    canon, canon_affine = to_canonical(np.broadcast_to(np.uint8(0), loaded.pet.shape), loaded.affine, contiguous=False)
    voxel_ml = float(abs(np.linalg.det(loaded.affine[:3, :3]))) / 1000.0
    lesion_voxels = int(label.sum()) if label is not None else 0
    return {
        "case": src.case,
        "patient": src.patient,
        "diagnosis": src.diagnosis,
        "positive": lesion_voxels > 0,
        "spacing": list(spacing_of(canon_affine)),
        "shape": [int(s) for s in canon.shape],
        "lesion_volume_ml": lesion_voxels * voxel_ml,
        "ct_resampled": loaded.ct_resampled,
    }


def input_signature(src: CaseSource) -> dict[str, Any]:
    """What a case's stored data was made from: each input file (its real path, size and mtime) and
    the metadata's patient and diagnosis. A rerun scans and writes a case again when this changes
    (an edited label, new metadata grouping two scans under one patient, another cohort in the store)."""
    sig: dict[str, Any] = {"patient": src.patient, "diagnosis": src.diagnosis}
    for role in ("ct", "pet", "label"):
        path = getattr(src, role)
        if path is None:
            sig[role] = None
            continue
        try:
            st = os.stat(path)
            sig[role] = [str(Path(path).resolve()), int(st.st_size), int(st.st_mtime_ns)]
        except OSError:  # unreadable: the scan says why; never equal to a readable file's signature
            sig[role] = [str(path), None, None]
    return sig


# -- pass 3: write -----------------------------------------------------------------------------
def write_case(src: CaseSource, fingerprint: dict[str, Any], cfg: PrepareConfig, plan_id: str, summary: dict[str, Any]) -> dict[str, Any]:
    """Preprocess one case into the store; returns its manifest entry."""
    import cc3d

    from petctl.engine.nifti import load_case

    loaded = load_case(src, warn=False)  # the scan pass has reported this case's warnings
    image, label, geometry, body = preprocess(loaded, fingerprint, cfg.spacing, cfg.crop_margin)

    rng = np.random.default_rng(_case_seed(cfg.seed, src.case))
    components, num_components = cc3d.connected_components(label, connectivity=LESION_CONNECTIVITY, return_N=True)
    lesion_coords = sample_lesion_coords(components, num_components, cfg.lesion_samples_per_component, rng)
    body_idx = background_coords(image[1], label, body, fingerprint, cfg, rng)
    entry = {
        **{k: v for k, v in summary.items() if k != "inputs"},
        "stored_shape": list(geometry.stored_shape),
        "stored_spacing": list(geometry.stored_spacing),
        "num_components": int(num_components),
        "stored_lesion_voxels": int(label.sum()),
    }
    attrs = {"petctl": {"version": PREPARE_VERSION, "plan": plan_id, "inputs": summary.get("inputs")}, "case": entry,
             "geometry": geometry.to_json()}
    CaseStore(cfg.store).save(src.case, image, label, lesion_coords, body_idx, attrs)
    return entry


def preprocess(loaded: Any, fingerprint: dict[str, Any], spacing: Sequence[float], margin: int) -> tuple[np.ndarray, np.ndarray | None, Any, np.ndarray]:
    """Exactly prepare's preprocessing of one loaded case (also used by predict).

    Returns (normalized image (C, X, Y, Z) float32 — C = 2, or 3 with the wide PET —, stored label
    or None, CaseGeometry, body mask).
    """
    from petctl.engine.geometry import label_to_stored, plan_geometry, to_canonical, to_stored

    # one channel at a time, through views: only one channel's crop is ever copied (predict's peak memory)
    ct_c, _ = to_canonical(loaded.ct, loaded.affine, contiguous=False)
    pet_c, _ = to_canonical(loaded.pet, loaded.affine, contiguous=False)
    geometry = plan_geometry(loaded.pet.shape, loaded.affine, ct_c > fingerprint["crop_threshold_hu"], spacing, margin)
    image = np.concatenate([to_stored(ct_c[None], geometry), to_stored(pet_c[None], geometry)])
    label = None
    if loaded.label is not None:
        lab_c, _ = to_canonical(loaded.label, loaded.affine)
        label = label_to_stored(lab_c, geometry)
    body = image[0] > fingerprint["crop_threshold_hu"]
    return normalize(image, fingerprint), label, geometry, body


CHANNELS = ("ct", "pet")
PET_WIDE = "pet_wide"
"""The optional third channel (`PrepareConfig.pet_wide`): log(1 + SUV) on [0, ceiling] scaled to [-1, 1]."""


def channel_names(fingerprint: dict[str, Any]) -> tuple[str, ...]:
    """The stored image's channels for a store's fingerprint: CT, PET clipped, and the wide PET when planned."""
    return (*CHANNELS, PET_WIDE) if PET_WIDE in fingerprint else CHANNELS


def pet_wide(pet_suv: np.ndarray, ceiling: float) -> np.ndarray:
    """log(1 + SUV) over [0, ceiling], scaled to [-1, 1] (float32)."""
    ceiling = max(float(ceiling), 1e-3)
    out = np.clip(np.asarray(pet_suv, dtype=np.float32), 0.0, np.float32(ceiling))
    np.log1p(out, out=out)
    out *= np.float32(2.0 / np.log1p(ceiling))
    out -= np.float32(1.0)
    return out


def normalize(image_cxyz: np.ndarray, fingerprint: dict[str, Any]) -> np.ndarray:
    """Clip each channel to its training [p5, p95] and z-normalize with the clipped mean/std (in
    place); with a `pet_wide` plan, the wide PET channel is appended (a new array)."""
    out = np.asarray(image_cxyz, dtype=np.float32)
    wide = pet_wide(out[1], fingerprint[PET_WIDE]["ceiling"]) if PET_WIDE in fingerprint else None
    for c, name in enumerate(CHANNELS):
        stats = fingerprint[name]
        lo, hi = (np.float32(v) for v in stats["clip"])
        np.clip(out[c], lo, hi, out=out[c])
        out[c] -= np.float32(stats["mean"])
        out[c] /= np.float32(stats["std"])
    return out if wide is None else np.concatenate([out, wide[None]])


HOT_MARGIN = 0.05
"""z units above the lesions' PET p5 that count as bright (hot-background sampling)."""
HOT_PEAK = 0.5
"""How far a bright structure's peak must reach for it to be a hard negative of its own, as a share of
the way from the lesions' PET p5 to their mean (1: the mean, as until 2026-12-07). At 1 the mid-uptake
tissue the nets marked in held-out scans — kidneys at SUV 3.6, bowel and brown fat peaking at 4–7
(`tools/healthy_fp.py`) — fell under the mean of 6.4 and was left to the uniform body draws."""
HOT_RULE = f"structures-peak{HOT_PEAK:g}-of-p5-to-mean"
"""The rule's name in the plan's hash (prepared stores of another rule are prepared again)."""


def background_coords(pet_norm: np.ndarray, label: np.ndarray | None, body: np.ndarray, fingerprint: dict[str, Any],
                      cfg: PrepareConfig, rng: np.random.Generator) -> np.ndarray:
    """The case's background patch centres: `cfg.body_samples` body voxels, of which a share
    `cfg.hot_background` (when the case has such voxels) lie in bright non-lesion tissue, each
    bright structure whose peak reaches HOT_PEAK equally often (`sample_hot_structures`)."""
    if cfg.hot_background <= 0:
        return sample_body_coords(body, cfg.body_samples, rng)
    from scipy import ndimage

    stats = fingerprint["pet"]
    # strictly above the lesions' p5 (with a margin): with the method's clip that p5 is the clip floor
    # itself, which most of the body is clipped to
    floor = (float(stats["percentiles"]["5"]) - float(stats["mean"])) / float(stats["std"]) + HOT_MARGIN
    hot = body & (pet_norm > np.float32(floor))
    if label is not None and label.any():
        hot &= ~ndimage.binary_dilation(label > 0, iterations=2)
    # a structure counts when its peak reaches HOT_PEAK of the way from the lesions' p5 to their mean
    # (the mean is z = 0 after normalization)
    peak = (1.0 - HOT_PEAK) * (float(stats["percentiles"]["5"]) - float(stats["mean"])) / float(stats["std"])
    hot_idx = sample_hot_structures(hot, int(round(cfg.body_samples * cfg.hot_background)), rng, pet=pet_norm, peak=peak)
    rest = sample_body_coords(body, cfg.body_samples - len(hot_idx), rng)
    return np.concatenate([rest, hot_idx]).astype(np.int32)


HOT_MIN_VOXELS = 27
"""Bright structures smaller than this (noise specks at the threshold) are not sampled on their own."""


def sample_hot_structures(hot: np.ndarray, count: int, rng: np.random.Generator, *, pet: np.ndarray | None = None,
                          peak: float | None = None) -> np.ndarray:
    """`count` voxels (x, y, z) of `hot`, each bright structure drawn equally often, then a voxel
    uniformly inside it: a small bladder or kidney is a hard negative as often as the large brain
    (uniform voxels gave the bladder ~1 in 8). A structure is a 26-connected component of at least
    HOT_MIN_VOXELS whose `pet` maximum reaches `peak` (`background_coords`: HOT_PEAK of the way up
    to the lesions' mean uptake; it could pass for a lesion), so the faint specks just above the
    threshold do not dilute the draws; when no component qualifies, all components are drawn."""
    import cc3d
    from scipy import ndimage

    if count <= 0 or not hot.any():
        return np.zeros((0, 3), np.int32)
    components, n = cc3d.connected_components(hot, connectivity=26, return_N=True)
    coords = np.argwhere(components > 0)
    ids = components[tuple(coords.T)]
    sizes = np.bincount(ids, minlength=n + 1)
    qualifies = sizes >= HOT_MIN_VOXELS
    if pet is not None and peak is not None:
        peaks = np.full(n + 1, -np.inf)
        peaks[1:] = ndimage.maximum(pet, components, np.arange(1, n + 1))
        qualifies &= peaks >= peak
    qualifies[0] = False
    kept = np.flatnonzero(qualifies)
    if kept.size == 0:  # nothing bright enough: draw among all components
        kept = np.flatnonzero(sizes[1:]) + 1
    order = np.argsort(ids, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)])[:-1]  # first position of each id in `order`
    chosen = rng.choice(kept, size=count)
    offsets = (rng.random(count) * sizes[chosen]).astype(np.int64)
    return coords[order[starts[chosen] + offsets]].astype(np.int32)


def sample_body_coords(body: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Up to `count` body voxels (x, y, z), drawn uniformly without listing the whole mask."""
    flat = body.ravel()
    total = int(flat.sum()) if flat.size <= 4 * count else None
    if total is not None and total <= count:
        return np.argwhere(body).astype(np.int32)
    picked = np.zeros(0, dtype=np.int64)
    for _ in range(20):  # rejection sampling: the body fills a good share of the cropped volume
        draw = rng.integers(0, flat.size, size=4 * count)
        picked = np.unique(np.concatenate([picked, draw[flat[draw]]]))
        if len(picked) >= count:
            break
    else:
        idx = np.flatnonzero(flat)
        picked = idx if len(idx) <= count else idx[rng.choice(len(idx), count, replace=False)]
    picked = np.sort(rng.permutation(picked)[:count])
    return np.stack(np.unravel_index(picked, body.shape), axis=1).astype(np.int32)


def sample_lesion_coords(components: np.ndarray, num_components: int, per_component: int, rng: np.random.Generator) -> np.ndarray:
    """(component, x, y, z) rows: up to `per_component` voxels of each lesion component."""
    if num_components == 0:
        return np.zeros((0, 4), dtype=np.int32)
    idx = np.flatnonzero(components)
    comp = components.ravel()[idx]
    order = np.argsort(comp, kind="stable")
    idx, comp = idx[order], comp[order]
    starts = np.searchsorted(comp, np.arange(1, num_components + 1))
    ends = np.r_[starts[1:], len(comp)]
    rows = []
    for k, (a, b) in enumerate(zip(starts, ends)):
        take = idx[a:b] if b - a <= per_component else idx[a + np.sort(rng.choice(b - a, per_component, replace=False))]
        xyz = np.stack(np.unravel_index(take, components.shape), axis=1)
        rows.append(np.c_[np.full(len(take), k), xyz])
    return np.concatenate(rows).astype(np.int32)


def _case_seed(seed: int, case: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{case}".encode()).digest()[:8], "little")


# -- orchestration -----------------------------------------------------------------------------
def run(cfg: PrepareConfig, progress: Progress | None = None, on_skip: Callable[[str, str], None] | None = None) -> PrepareResult:
    """Prepare a cohort; bad cases are reported via `on_skip` and in the result, never raised.
    One prepare at a time per store: a second one while the first runs is refused (PetctlError)."""
    import fcntl

    root = Path(cfg.store)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".prepare.lock", "a+") as lock:  # flock: released by the kernel if this process dies
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip() or "another process"
            raise PetctlError(f"{root}: another petctl prepare is writing this store ({owner}); wait for it to finish") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        return _run(cfg, progress, on_skip)


def _run(cfg: PrepareConfig, progress: Progress | None, on_skip: Callable[[str, str], None] | None) -> PrepareResult:
    import time

    from petctl.engine import fingerprint as fpmod
    from petctl.engine.splits import SplitCase, make_splits

    t0 = time.perf_counter()
    store = CaseStore(cfg.store)
    root = Path(cfg.store)
    store.remove_stale_temporaries()  # safe: no other prepare holds this store
    parts = root / ".parts"
    parts.mkdir(exist_ok=True)
    result = PrepareResult(store=root)

    def skip(case: str, reason: str) -> None:
        result.skipped[case] = reason
        if on_skip:
            on_skip(case, reason)

    sources = []
    for src in discover(Path(cfg.data), Path(cfg.metadata) if cfg.metadata else None):
        if not is_valid_case_id(src.case):
            skip(src.case, "case id holds characters that are not allowed in a file name")
        else:
            sources.append(src)
    if not sources:
        raise PetctlError(f"{cfg.data}: no cases found")

    # pass 1: scan (reusing summaries of a previous run when the part file is there)
    scans_path = root / ".parts" / "scans.json"
    scans: dict[str, Any] = read_json(scans_path) if scans_path.exists() else {}
    signatures = {s.case: input_signature(s) for s in sources}
    todo = [s for s in sources
            if s.case not in scans or scans[s.case].get("inputs") != signatures[s.case] or not (parts / f"{s.case}.npz").exists()]
    for s in sources:
        if s not in todo and progress:
            progress("scan", s.case, len(sources))
    for case, value in _map(scan_case, [(s, str(parts)) for s in todo], [s.case for s in todo], cfg.workers):
        if isinstance(value, CaseError):
            skip(case, value.reason)
        else:
            scans[case] = {**value, "inputs": signatures[case]}
            write_json_atomic(scans_path, scans)
        if progress:
            progress("scan", case, len(sources))
    good = [s for s in sources if s.case in scans and s.case not in result.skipped]
    if not good:
        raise PetctlError(f"{cfg.data}: no usable case (all {len(sources)} skipped)")

    # pass 2: splits and fingerprint (training cases only)
    for s in good:
        diag = scans[s.case]["diagnosis"]
        if diag is not None and (diag == NEGATIVE) == scans[s.case]["positive"]:
            import logging

            logging.getLogger(__name__).warning("%s: metadata says %s but the label disagrees; the label wins", s.case, diag)
    split_cases = [SplitCase(s.case, scans[s.case]["patient"], bool(scans[s.case]["positive"])) for s in good]
    splits = make_splits(split_cases, num_folds=cfg.num_folds, test_fraction=cfg.test_fraction, seed=cfg.seed).to_json()
    test = set(splits["test"])
    train = [s.case for s in good if s.case not in test]
    fingerprint = fpmod.summarize(
        (_load_part(parts / f"{c}.npz") for c in train),
        [scans[c]["spacing"] for c in train],
        [scans[c]["shape"] for c in train],
        train,
        clip=tuple(cfg.clip_percentiles),
        pet_clip=tuple(cfg.pet_clip_percentiles) if cfg.pet_clip_percentiles else None,
        pet_wide=cfg.pet_wide,  # the plan's hash covers it through the fingerprint
    )
    plan_id = hashlib.sha256(
        json.dumps({"fp": fingerprint, "spacing": cfg.spacing, "seed": cfg.seed, "v": PREPARE_VERSION,
                    "n": cfg.lesion_samples_per_component, "b": cfg.body_samples, "m": cfg.crop_margin, "c": list(cfg.clip_percentiles),
                    **({"pc": list(cfg.pet_clip_percentiles)} if cfg.pet_clip_percentiles else {}),
                    **({"hb": cfg.hot_background, "hbs": HOT_RULE} if cfg.hot_background else {})}, sort_keys=True).encode()
    ).hexdigest()[:16]
    write_json_atomic(root / "fingerprint.json", {**fingerprint, "plan": plan_id})
    write_json_atomic(root / "splits.json", splits)
    write_json_atomic(root / "prepare.json", {"version": PREPARE_VERSION, "config": cfg.to_json(), "plan": plan_id})

    # pass 3: write cases (skipping those already complete for this plan)
    entries: dict[str, Any] = {}
    todo = []
    for s in good:
        done = _stored_entry(store, s.case, plan_id, scans[s.case]["inputs"])
        if done is not None:
            entries[s.case] = done
            result.reused.append(s.case)
            if progress:
                progress("write", s.case, len(good))
        else:
            todo.append(s)
    args = [(s, fingerprint, cfg, plan_id, scans[s.case]) for s in todo]
    for case, value in _map(write_case, args, [s.case for s in todo], cfg.workers):
        if isinstance(value, CaseError):
            skip(case, value.reason)
        else:
            entries[case] = value
            result.prepared.append(case)
        if progress:
            progress("write", case, len(good))

    # a case that scanned but could not be written leaves the splits (training would read it)
    unwritten = {s.case: result.skipped[s.case] for s in todo if s.case in result.skipped}
    if unwritten:
        splits = _without_cases(splits, unwritten)
        write_json_atomic(root / "splits.json", splits)

    # stale cases from an earlier cohort are not listed; the manifest is the source of truth
    manifest = {
        "version": MANIFEST_VERSION,
        "plan": plan_id,
        "spacing": list(cfg.spacing),
        "channels": list(channel_names(fingerprint)),
        "layout": "image float16 (C, X, Y, Z) RAS; label uint8 (X, Y, Z)",
        "cases": {c: entries[c] for c in sorted(entries)},
        "skipped": dict(sorted(result.skipped.items())),
    }
    write_json_atomic(root / "manifest.json", manifest)
    result.splits, result.fingerprint = splits, fingerprint
    result.seconds = time.perf_counter() - t0
    return result


def _without_cases(splits: dict[str, Any], gone: dict[str, str]) -> dict[str, Any]:
    """`splits` (as in splits.json) with the cases of `gone` (case → reason) taken out of the test set
    and every fold, each named in `warnings`."""
    from petctl.engine.splits import _FOLD_SETS

    out = dict(splits)
    out["test"] = [c for c in splits["test"] if c not in gone]
    for key in _FOLD_SETS:
        out[key] = [{part: [c for c in cases if c not in gone] for part, cases in fold.items()} for fold in splits[key]]
    out["warnings"] = [*splits.get("warnings", []), *(f"{c}: not written ({r}); left out of the splits" for c, r in sorted(gone.items()))]
    return out


def _stored_entry(store: CaseStore, case: str, plan_id: str, inputs: dict[str, Any]) -> dict[str, Any] | None:
    if not store.has(case):
        return None
    try:
        attrs = read_json(store.case_path(case) / "zarr.json").get("attributes", {})
    except PetctlError:
        return None
    meta = attrs.get("petctl", {})
    if meta.get("plan") != plan_id or meta.get("version") != PREPARE_VERSION or meta.get("inputs") != inputs:
        return None
    return attrs.get("case")


def _load_part(path: Path) -> dict[str, Any]:
    from petctl.engine.fingerprint import Histogram

    with np.load(path) as z:
        return {k: Histogram(k.split("_")[0], z[k]) for k in z.files}


def _map(fn: Callable[..., Any], args: Sequence[tuple[Any, ...]], names: Sequence[str], workers: int) -> Iterable[tuple[str, Any]]:
    """Run fn over args (in worker processes when workers > 1), yielding (name, result|CaseError)."""
    if workers <= 1 or len(args) <= 1:
        for name, a in zip(names, args):
            yield name, _call(fn, name, a)
        return
    import multiprocessing as mp
    from concurrent.futures.process import BrokenProcessPool

    # A worker killed outright (the kernel's OOM killer, a crash in native code) breaks the pool and
    # fails every case still in it. Those are retried in a fresh pool, and what breaks that one too
    # one case per single-worker pool, so only a case that kills its worker on its own is skipped, by name.
    pending = list(zip(names, args))
    rounds = ("pool", "pool", "alone")
    for attempt, how in enumerate(rounds):
        if not pending:
            return
        groups = [pending] if how == "pool" else [[item] for item in pending]
        pool_size = workers if how == "pool" else 1
        pending = []
        for group in groups:
            with ProcessPoolExecutor(max_workers=min(pool_size, len(group)), mp_context=mp.get_context("spawn"),
                                     initializer=_worker_init) as pool:
                futures = {pool.submit(_call, fn, name, a): (name, a) for name, a in group}
                for fut in as_completed(futures):
                    name, a = futures[fut]
                    try:
                        value = fut.result()
                    except BrokenProcessPool:
                        if attempt < len(rounds) - 1:
                            pending.append((name, a))
                            continue
                        value = CaseError(name, "its worker process died (killed for memory?); the other cases went on")
                    yield name, value


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def _call(fn: Callable[..., Any], name: str, args: tuple[Any, ...]) -> Any:
    try:
        return fn(*args)
    except CaseError as exc:
        return exc
    except MemoryError:
        return CaseError(name, "out of memory while processing this case")
    except OSError as exc:
        import errno

        if exc.errno == errno.ENOSPC:
            raise PetctlError(f"{name}: no space left on device while writing; free space and re-run (finished cases are kept)") from None
        return CaseError(name, f"I/O error: {exc.strerror or exc}")
    except Exception as exc:  # a reader bug must not stop the cohort; the message names it
        return CaseError(name, f"unexpected {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")

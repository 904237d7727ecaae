"""Benchmark: random 96³ training patches, ready for the network, from petctl's store vs the usual ways.

Every approach reads the same cases in the same run and produces what a training step consumes: a
float32 torch tensor (2, 96, 96, 96) (CT, PET, z-normalized with the store's fingerprint) and the
label patch. Patches are lesion-centred with probability 2/3 (a lesion component uniformly, then
one of its voxels), otherwise centred on a body voxel, and zero-padded at the borders.

- `zarr` (ours): `CaseStore.read_patch` + `torch.from_numpy(img).float()`;
- `monai`: the usual uncached MONAI pipeline from the .nii.gz files, 12 patches per scan load;
- `persistent`: the same with MONAI's PersistentDataset caching all before the random crop (warm);
- `nnunet`: nnU-Net v2's `nnUNetDatasetBlosc2` holding the store's arrays as float32/int8, with
  nnU-Net's own chunk/block choice for a 96³ patch, read with `load_case` + `crop_and_pad_nd` as
  its data loader does (one `load_case` per patch);
- `memmap`: uncompressed float32/uint8 `.npy` files opened with mmap_mode='r', sliced and copied.

zarr, nnunet and memmap read the same sequence of patch boxes (fixed seed); the first few patches
are checked to be equal across them. Everything runs single-threaded (torch, OpenMP/BLAS, Blosc),
and the fast approaches take turns in rounds. All files are freshly written and so in the page
cache: this measures the CPU cost of a patch, not the disk, and rates are patches per CPU-second
of this process (what one idle core gives; wall clock is shown too, but on a shared machine it
mostly measures the neighbours). By default a small synthetic cohort is made and prepared in a
temp folder.

    .venv/bin/python bench/patch_sampling.py --quick
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (must pin threads before numpy/torch load)

_common.pin_threads()

import argparse  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402

try:
    import petctl  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import Approach, Measure, disk_bytes, not_run, print_table, ratio, run_interleaved  # noqa: E402

PATCH = (96, 96, 96)
P_LESION = 2 / 3
PATCHES_PER_LOAD = 12
SPACING = (2.04, 2.04, 3.0)
SEED = 0
MIN_SYNTH_CASES = 7
"""`prepare` needs ≥2 patients with lesions left after the test split; seed 0 reaches that at 7 cases."""
ROUNDS = 4
"""Approaches take turns in this many slices of their work (fair under load from other processes)."""
TARGETS = {"monai": 20.0, "persistent": 2.0, "nnunet": 1.0, "memmap": 0.5}

Box = tuple[str, tuple[int, int, int]]


@dataclass(frozen=True)
class BenchConfig:
    """What to measure and on how much data."""

    num_cases: int
    """Cases every approach reads (the first ones of the store)."""
    num_patches: int
    """Patches timed for zarr, nnunet and memmap (same boxes for all three)."""
    monai_loads: int
    """Scan loads timed for the uncached MONAI pipeline (12 patches each)."""
    persistent_loads: int
    """Scan loads timed for the warm PersistentDataset."""
    data: Path | None
    store: Path | None


# -- patch centres (pure) ------------------------------------------------------------------------
def patch_centre(lesion_coords: np.ndarray, body_coords: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator, p_lesion: float = P_LESION) -> np.ndarray:
    """Centre voxel of one training patch: with p_lesion a lesion voxel (component chosen
    uniformly, so small lesions are not drowned by big ones), else a body voxel."""
    if len(lesion_coords) and rng.random() < p_lesion:
        components = np.unique(lesion_coords[:, 0])
        rows = lesion_coords[lesion_coords[:, 0] == components[rng.integers(len(components))], 1:]
        return rows[rng.integers(len(rows))]
    if len(body_coords):
        return body_coords[rng.integers(len(body_coords))]
    return np.asarray(shape) // 2


def patch_boxes(cases: dict[str, tuple[np.ndarray, np.ndarray, tuple[int, ...]]], num: int, seed: int) -> list[Box]:
    """`num` (case, start_xyz) boxes of size PATCH: a case uniformly, then its patch centre."""
    rng = np.random.default_rng(seed)
    names = sorted(cases)
    boxes = []
    for _ in range(num):
        case = names[rng.integers(len(names))]
        centre = patch_centre(*cases[case], rng)
        boxes.append((case, tuple(int(c) - p // 2 for c, p in zip(centre, PATCH))))
    return boxes


def crop_zero_padded(arr: np.ndarray, start: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
    """Copy of arr[..., start:start+size] over the last len(size) axes; 0 outside the array."""
    lead = arr.shape[: arr.ndim - len(size)]
    out = np.zeros(lead + tuple(size), dtype=arr.dtype)
    spatial = arr.shape[arr.ndim - len(size):]
    lo = [max(0, s) for s in start]
    hi = [min(d, s + n) for d, s, n in zip(spatial, start, size)]
    if all(h > l for l, h in zip(lo, hi)):
        src = (Ellipsis, *(slice(l, h) for l, h in zip(lo, hi)))
        dst = (Ellipsis, *(slice(l - s, h - s) for l, h, s in zip(lo, hi, start)))
        out[dst] = arr[src]
    return out


# -- data ----------------------------------------------------------------------------------------
def ensure_store(cfg: BenchConfig, work: Path, say: Callable[[str], None]) -> Path:
    """The prepared store to benchmark: given, or prepared here from given or synthetic data."""
    from petctl.engine.prepare import PrepareConfig, run
    from petctl.engine.synth import make_cohort

    if cfg.store is not None:
        return cfg.store
    data = cfg.data
    if data is None:
        data = work / "raw"
        num = max(cfg.num_cases, MIN_SYNTH_CASES)
        t0 = time.perf_counter()
        make_cohort(data, num, SEED)
        say(f"synthesized {num} cases in {time.perf_counter() - t0:.1f}s")
    store = work / "store"
    t0 = time.perf_counter()
    result = run(PrepareConfig(data=str(data), store=str(store), spacing=SPACING))
    say(f"prepared {len(result.prepared)} cases in {time.perf_counter() - t0:.1f}s" + (f" ({len(result.skipped)} skipped)" if result.skipped else ""))
    return store


def nifti_sources(store: Path, cases: list[str]) -> dict[str, dict[str, str]] | None:
    """{case: {ct, pet, label}} .nii.gz paths of the store's cohort, or None if it is not there."""
    from petctl.engine.cohort import discover
    from petctl.engine.store import read_json

    try:
        data = Path(read_json(store / "prepare.json")["config"]["data"])
        found = {s.case: s for s in discover(data)}
    except Exception:
        return None
    if not all(c in found and found[c].label is not None for c in cases):
        return None
    return {c: {"ct": str(found[c].ct), "pet": str(found[c].pet), "label": str(found[c].label)} for c in cases}


def export_npy(store: Any, cases: list[str], out: Path) -> Path:
    """The store's arrays as uncompressed float32 image / uint8 label `.npy` files."""
    out.mkdir()
    for case in cases:
        stored = store.load(case)
        np.save(out / f"{case}.npy", stored.image.read_all().astype(np.float32))
        np.save(out / f"{case}_seg.npy", stored.label.read_all())
    return out


def export_nnunet(npy_dir: Path, store: Any, cases: list[str], out: Path) -> Path:
    """The same arrays in nnU-Net v2's Blosc2 format, as its preprocessor writes them: image
    float32 (2, X, Y, Z), seg int8 (1, X, Y, Z), chunks/blocks from `comp_blosc2_params` for the
    patch size, and a properties pickle with foreground locations."""
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

    out.mkdir()
    for case in cases:
        image = np.load(npy_dir / f"{case}.npy")
        seg = np.load(npy_dir / f"{case}_seg.npy")[None].astype(np.int8)
        block, chunk = comp_blosc2_params(image.shape, PATCH, image.itemsize)
        block_seg, chunk_seg = comp_blosc2_params(seg.shape, PATCH, seg.itemsize)
        fg = store.load(case).lesion_coords[:, 1:].astype(np.int64)
        properties = {
            "shape_before_cropping": image.shape[1:],
            "shape_after_cropping_and_before_resampling": image.shape[1:],
            "spacing": SPACING,
            "class_locations": {1: np.c_[np.zeros(len(fg), dtype=np.int64), fg]},
        }
        nnUNetDatasetBlosc2.save_case(image, seg, properties, str(out / case), chunks=chunk, blocks=block, chunks_seg=chunk_seg, blocks_seg=block_seg)
    return out


def nnunet_missing() -> str | None:
    """Why nnU-Net's dataset class cannot be used here, or None when it can."""
    try:
        import blosc2
        from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd  # noqa: F401
        from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2  # noqa: F401
    except ImportError as exc:
        return f"nnunetv2 is not importable ({exc}); install the bench extra: pip install -e '.[bench]'"
    blosc2.set_nthreads(1)
    return None


# -- approaches ----------------------------------------------------------------------------------
def zarr_approach(store: Any, boxes: list[Box], case_paths: list[Path]) -> Approach:
    import torch

    for case in {c for c, _ in boxes}:  # opened once per training process, not per patch
        store.load(case)

    def step(box: Box) -> int:
        img, lab = store.read_patch(box[0], box[1], PATCH)
        torch.from_numpy(img).float(), torch.from_numpy(lab)
        return 1

    return Approach("zarr", step, boxes, disk_bytes(case_paths), "CaseStore.read_patch, float16→float32")


def nnunet_approach(nnunet_dir: Path, boxes: list[Box], cases: list[str]) -> Approach:
    import torch
    from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    dataset = nnUNetDatasetBlosc2(str(nnunet_dir), identifiers=list(cases))

    def step(box: Box) -> int:  # nnUNetDataLoader.generate_train_batch, for one sample
        data, seg, _, _ = dataset.load_case(box[0])
        bbox = [[s, s + p] for s, p in zip(box[1], PATCH)]
        torch.from_numpy(crop_and_pad_nd(data, bbox, 0)).float()
        torch.from_numpy(crop_and_pad_nd(seg, bbox, -1, cast_cropped_to=np.int16)).to(torch.int16)
        return 1

    files = [nnunet_dir / f"{c}{suffix}" for c in cases for suffix in (".b2nd", "_seg.b2nd", ".pkl")]
    return Approach("nnunet", step, boxes, disk_bytes(files), "nnUNetDatasetBlosc2.load_case + crop_and_pad_nd")


def memmap_approach(npy_dir: Path, boxes: list[Box], cases: list[str]) -> Approach:
    import torch

    opened = {c: (np.load(npy_dir / f"{c}.npy", mmap_mode="r"), np.load(npy_dir / f"{c}_seg.npy", mmap_mode="r")) for c in cases}

    def step(box: Box) -> int:
        image, label = opened[box[0]]
        torch.from_numpy(crop_zero_padded(image, box[1], PATCH)), torch.from_numpy(crop_zero_padded(label, box[1], PATCH))
        return 1

    files = [npy_dir / f"{c}{suffix}" for c in cases for suffix in (".npy", "_seg.npy")]
    return Approach("memmap", step, boxes, disk_bytes(files), "np.load(mmap_mode='r'), slice + copy")


def monai_transforms(fingerprint: dict[str, Any], seed: int) -> Any:
    """The usual MONAI training pipeline for CT+PET, normalized like the store (same fingerprint)."""
    from monai.transforms import (
        Compose, ConcatItemsd, CropForegroundd, DeleteItemsd, EnsureChannelFirstd, LoadImaged,
        Orientationd, RandCropByPosNegLabeld, ResampleToMatchd, ScaleIntensityRanged, Spacingd, SpatialPadd,
    )

    keys = ["ct", "pet", "label"]
    threshold = float(fingerprint["crop_threshold_hu"])
    normalize = []
    for key in ("ct", "pet"):  # clip to [lo, hi], then (x - mean) / std, as one linear map
        (lo, hi), mean, std = fingerprint[key]["clip"], fingerprint[key]["mean"], fingerprint[key]["std"]
        normalize.append(ScaleIntensityRanged(keys=key, a_min=lo, a_max=hi, b_min=(lo - mean) / std, b_max=(hi - mean) / std, clip=True))
    pipeline = Compose([
        LoadImaged(keys=keys, reader="NibabelReader", image_only=True),
        EnsureChannelFirstd(keys=keys),
        # CT may sit on its own finer grid (as raw AutoPET CT does); a no-op where the grids agree
        ResampleToMatchd(keys="ct", key_dst="pet", mode="bilinear"),
        CropForegroundd(keys=keys, source_key="ct", select_fn=lambda x: x > threshold, allow_smaller=True),
        Orientationd(keys=keys, axcodes="RAS"),
        Spacingd(keys=keys, pixdim=SPACING, mode=("bilinear", "bilinear", "nearest")),
        *normalize,
        ConcatItemsd(keys=["ct", "pet"], name="image"),
        DeleteItemsd(keys=["ct", "pet"]),
        SpatialPadd(keys=["image", "label"], spatial_size=PATCH),
        RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=PATCH, pos=2, neg=1, num_samples=PATCHES_PER_LOAD),
    ])
    pipeline.set_random_state(seed=seed)
    return pipeline


def _to_tensors(samples: list[dict[str, Any]]) -> int:
    import torch

    for sample in samples:  # plain tensors, as the network gets them
        torch.as_tensor(sample["image"]).float(), torch.as_tensor(sample["label"])
    return len(samples)


def monai_approach(sources: dict[str, dict[str, str]], fingerprint: dict[str, Any], loads: int) -> Approach:
    from monai.data import Dataset

    items = list(sources.values())
    dataset = Dataset(items, transform=monai_transforms(fingerprint, SEED))
    files = [Path(p) for paths in items for p in paths.values()]
    return Approach("monai", lambda i: _to_tensors(dataset[i]), [i % len(items) for i in range(loads)], disk_bytes(files), "uncached, from .nii.gz")


def persistent_approach(sources: dict[str, dict[str, str]], fingerprint: dict[str, Any], loads: int, cache: Path) -> Approach:
    """PersistentDataset with its cache filled by one pass over the cases (that pass is not timed)."""
    from monai.data import PersistentDataset

    items = list(sources.values())
    dataset = PersistentDataset(items, transform=monai_transforms(fingerprint, SEED), cache_dir=cache)
    t0 = time.perf_counter()
    for i in range(len(items)):
        dataset[i]
    note = f"warm cache (filled in {time.perf_counter() - t0:.1f}s)"
    return Approach("persistent", lambda i: _to_tensors(dataset[i]), [i % len(items) for i in range(loads)], disk_bytes([cache]), note)


def check_same_patches(store: Any, nnunet_dir: Path, npy_dir: Path, boxes: list[Box]) -> None:
    """The three array readers must return the same voxels (nnU-Net pads its label with -1)."""
    from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    dataset = nnUNetDatasetBlosc2(str(nnunet_dir), identifiers=sorted({c for c, _ in boxes}))
    for case, start in boxes:
        img, lab = store.read_patch(case, start, PATCH)
        ref_img = crop_zero_padded(np.load(npy_dir / f"{case}.npy", mmap_mode="r"), start, PATCH)
        ref_lab = crop_zero_padded(np.load(npy_dir / f"{case}_seg.npy", mmap_mode="r"), start, PATCH)
        data, seg, _, _ = dataset.load_case(case)
        bbox = [[s, s + p] for s, p in zip(start, PATCH)]
        nn_img = crop_and_pad_nd(data, bbox, 0)
        nn_lab = np.maximum(crop_and_pad_nd(seg, bbox, -1)[0], 0)
        if not (np.array_equal(img.astype(np.float32), ref_img) and np.array_equal(lab, ref_lab)
                and np.array_equal(nn_img, ref_img) and np.array_equal(nn_lab, ref_lab)):
            raise SystemExit(f"patch mismatch between readers at {case} {start}: the benchmark would compare different data")


# -- main ----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> BenchConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 cases, 400 patches per approach, 2 MONAI scan loads (< 2 min on 2 cores)")
    parser.add_argument("--cases", type=int, help="cases every approach reads (default 8; 4 with --quick)")
    parser.add_argument("--patches", type=int, help="patches timed for zarr/nnunet/memmap (default 2000; 400 with --quick)")
    parser.add_argument("--monai-loads", type=int, help="scan loads timed for uncached MONAI (default 4; 2 with --quick)")
    parser.add_argument("--persistent-loads", type=int, help="scan loads timed for the warm PersistentDataset (default 64; 24 with --quick)")
    parser.add_argument("--data", type=Path, help="an nnU-Net raw cohort to prepare (default: a synthetic one)")
    parser.add_argument("--store", type=Path, help="an already prepared petctl store to reuse")
    a = parser.parse_args(argv)
    q = a.quick
    cfg = BenchConfig(
        num_cases=a.cases or (4 if q else 8),
        num_patches=a.patches or (400 if q else 2000),
        monai_loads=a.monai_loads or (2 if q else 4),
        persistent_loads=a.persistent_loads or (24 if q else 64),
        data=a.data,
        store=a.store,
    )
    if min(cfg.num_cases, cfg.num_patches, cfg.monai_loads, cfg.persistent_loads) < 1:
        parser.error("--cases, --patches and the load counts must be at least 1")
    return cfg


def measure(cfg: BenchConfig, work: Path, say: Callable[[str], None]) -> tuple[dict[str, Measure], int]:
    """Prepare the data every approach needs, then time them all; returns results and #cases."""
    from numcodecs import blosc

    from petctl.engine.store import CaseStore, iter_chunk_files, read_json

    blosc.set_nthreads(1)
    store_dir = ensure_store(cfg, work, say)
    store = CaseStore(store_dir)
    fingerprint = read_json(store_dir / "fingerprint.json")
    cases = store.list()[: cfg.num_cases]
    if not cases:
        raise SystemExit(f"{store_dir}: no prepared cases")
    say(f"store {store_dir}: benchmarking {len(cases)} cases ({', '.join(cases)})")
    opened = {c: store.load(c) for c in cases}
    boxes = patch_boxes({c: (s.lesion_coords, s.body_coords, s.shape) for c, s in opened.items()}, cfg.num_patches, SEED)
    npy_dir = export_npy(store, cases, work / "npy")
    case_files = [p for c in cases for p in iter_chunk_files(store.case_path(c))]
    approaches = [zarr_approach(store, boxes, case_files), memmap_approach(npy_dir, boxes, cases)]
    results: dict[str, Measure] = {}

    nnunet_why = nnunet_missing()
    if nnunet_why is None:
        nnunet_dir = export_nnunet(npy_dir, store, cases, work / "nnunet")
        check_same_patches(store, nnunet_dir, npy_dir, boxes[:8])
        say("checked: zarr, nnunet and memmap return identical voxels for the first 8 patches")
        approaches.append(nnunet_approach(nnunet_dir, boxes, cases))
    else:
        say(f"nnunet: NOT MEASURED: {nnunet_why}")
        results["nnunet"] = not_run("nnunet", 0, "not installed")

    sources = nifti_sources(store_dir, cases)
    if sources is None:
        why = "the store's source cohort (prepare.json → data) is not readable here"
        say(f"monai, persistent: NOT MEASURED: {why}")
        results["monai"] = not_run("monai", 0, "no .nii.gz inputs")
        results["persistent"] = not_run("persistent", 0, "no .nii.gz inputs")
    else:
        approaches.append(persistent_approach(sources, fingerprint, cfg.persistent_loads, work / "monai-cache"))

    results.update(run_interleaved(approaches, ROUNDS))
    if sources is not None:  # ~50× slower than the rest: a few scans, not interleaved
        results.update(run_interleaved([monai_approach(sources, fingerprint, cfg.monai_loads)], 1))
        for name, loads in (("monai", cfg.monai_loads), ("persistent", cfg.persistent_loads)):
            results[name].note += f", {results[name].cpu_seconds / loads:.2f} CPU s per scan load ({PATCHES_PER_LOAD} patches)"
    store.close()
    return results, len(cases)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    t_start = time.perf_counter()
    _common.pin_torch_threads()
    from rich.console import Console

    say = Console(width=160, markup=False, highlight=False).print
    say("single-threaded for fairness: torch.set_num_threads(1); OMP/OPENBLAS/MKL/NUMEXPR/BLOSC threads = 1")
    say("patches/s = patches per CPU-second of this process (single-threaded, files in page cache: the rate on an"
        " idle core); wall-clock seconds are shown beside it")
    warnings.filterwarnings("ignore", module="monai")
    with tempfile.TemporaryDirectory(prefix="petctl-bench-") as tmp:
        results, num_cases = measure(cfg, Path(tmp), say)

    ours = results["zarr"]
    print_table(f"random 96³ patches → float32 torch tensors ({num_cases} cases, 1 thread)", ours, [results[k] for k in TARGETS])
    ratios = {k: ratio(ours, results[k]) for k in TARGETS}
    for k, target in TARGETS.items():
        verdict = "n/a" if math.isnan(ratios[k]) else ("met" if ratios[k] >= target else "MISSED")
        say(f"target zarr/{k} ≥ {target:g}: {ratios[k]:.2f} → {verdict}")
    if results["nnunet"].disk_bytes:
        size = ours.disk_bytes / results["nnunet"].disk_bytes
        say(f"target store on disk ≤ nnU-Net's: {size:.2f}× → {'met' if size <= 1 else 'MISSED'}")
    say(f"total {time.perf_counter() - t_start:.0f}s")
    print("RESULT patch_sampling " + " ".join(f"ratio_vs_{k}={ratios[k]:.2f}" for k in TARGETS))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training-patch throughput of one loader worker: petctl's store + batched augmentation vs MONAI from NIfTI.

Paper preset: 96³ patches, 12 per scan, 2/3 lesion-centred, flips + rotation/zoom + intensity
augmentation, on a store prepared at 2.04×2.04×3 mm. Both pipelines run in this process on one
thread (torch.set_num_threads(1), num_workers=0), so the numbers are per CPU worker; rates are
patches per CPU-second, timed scan by scan in alternation (bench/_common.run_interleaved):

- petctl: `SegPatchDataset` (random patch reads from the Zarr store) → `augment_batch` on the CPU;
- MONAI: LoadImaged → EnsureChannelFirstd → CropForegroundd → Orientationd → Spacingd →
  clip/normalize (the store's fingerprint) → RandCropByPosNegLabeld(pos 2, neg 1, 12 samples) →
  RandFlipd ×3 / RandAffined / RandScaleIntensityd / RandShiftIntensityd, per patch.

Both read the same cases (those whose CT already lies on the PET grid, as MONAI stacks the two
files as channels). Without `--store`, a small synthetic cohort is made and prepared in a temp dir.
Last line: `RESULT loader_throughput patches_per_s_per_worker=X ratio_vs_monai=R`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Approach, disk_bytes, pin_threads, pin_torch_threads, print_table, ratio, run_interleaved  # noqa: E402

pin_threads()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402

PATCH = (96, 96, 96)
PATCHES_PER_SCAN = 12
LESION_PROB = 2 / 3
SPACING = (2.04, 2.04, 3.0)
BATCH = 4


def make_store(tmp: Path, num_cases: int) -> Path:
    from petctl.engine.prepare import PrepareConfig, run
    from petctl.engine.synth import make_cohort

    make_cohort(tmp / "raw", num_cases=num_cases, seed=11)
    run(PrepareConfig(data=str(tmp / "raw"), store=str(tmp / "store"), spacing=SPACING, num_folds=2, test_fraction=0.2))
    return tmp / "store"


def nifti_cases(store: Path) -> list[dict[str, object]]:
    """Cases of the store with their NIfTI files, keeping those whose CT is on the PET grid."""
    import nibabel as nib

    from petctl.engine.cohort import discover

    data = Path(json.loads((store / "prepare.json").read_text())["config"]["data"])
    prepared = set(json.loads((store / "manifest.json").read_text())["cases"])
    out = []
    for src in discover(data, None):
        if src.case not in prepared or src.label is None:
            continue
        ct, pet = nib.load(src.ct), nib.load(src.pet)
        if ct.shape == pet.shape and np.allclose(ct.affine, pet.affine, atol=1e-3):
            out.append({"case": src.case, "image": [str(src.ct), str(src.pet)], "label": str(src.label)})
    return out


def petctl_approach(store: Path, cases: list[str]) -> Approach:
    import torch

    from petctl.engine.sampling import AugmentConfig, SegPatchDataset, augment_batch, make_loader

    gen, cfg = torch.Generator().manual_seed(0), AugmentConfig()

    def step(case: str) -> int:
        ds = SegPatchDataset(str(store), [case], PATCH, PATCHES_PER_SCAN, lesion_prob=LESION_PROB, seed=0)
        count = 0
        for batch in make_loader(ds, batch_size=BATCH, num_workers=0, pin_memory=False):
            image, _ = augment_batch(batch["image"], batch["label"], gen, cfg)
            count += image.shape[0]
        return count

    files = [Path(store) / "cases" / f"{c}.zarr" for c in cases]
    return Approach("petctl store + batched aug", step, cases, disk_bytes(files), f"{len(cases)} scans, batch {BATCH}")


def monai_transform(fingerprint: dict):
    import torch
    from monai import transforms as mt

    thr = float(fingerprint["crop_threshold_hu"])
    clip = torch.tensor([fingerprint["ct"]["clip"], fingerprint["pet"]["clip"]], dtype=torch.float32)
    mean = torch.tensor([fingerprint["ct"]["mean"], fingerprint["pet"]["mean"]], dtype=torch.float32)
    std = torch.tensor([fingerprint["ct"]["std"], fingerprint["pet"]["std"]], dtype=torch.float32)

    def normalize(img):
        view = (-1,) + (1,) * (img.dim() - 1)
        return (torch.maximum(torch.minimum(img, clip[:, 1].reshape(view)), clip[:, 0].reshape(view)) - mean.reshape(view)) / std.reshape(view)

    keys = ["image", "label"]
    deg = math.radians(15)
    return mt.Compose(
        [
            mt.LoadImaged(keys=keys, image_only=True),
            mt.EnsureChannelFirstd(keys=keys),
            mt.CropForegroundd(keys=keys, source_key="image", select_fn=lambda x: x > thr, channel_indices=0, margin=2),
            mt.Orientationd(keys=keys, axcodes="RAS"),
            mt.Spacingd(keys=keys, pixdim=SPACING, mode=("bilinear", "nearest")),
            mt.Lambdad(keys="image", func=normalize),
            mt.RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=PATCH, pos=2, neg=1, num_samples=PATCHES_PER_SCAN),
            mt.RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
            mt.RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
            mt.RandFlipd(keys=keys, prob=0.5, spatial_axis=2),
            mt.RandAffined(keys=keys, prob=0.5, rotate_range=(deg, deg, deg), scale_range=(0.15, 0.15, 0.15),
                           mode=("bilinear", "nearest"), padding_mode="zeros"),
            mt.RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            mt.RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        ]
    ).set_random_state(seed=0)


def monai_approach(store: Path, items: list[dict[str, object]]) -> Approach:
    from monai.data import DataLoader, Dataset

    transform = monai_transform(json.loads((store / "fingerprint.json").read_text()))

    def step(item: dict[str, object]) -> int:
        return sum(batch["image"].shape[0] for batch in DataLoader(Dataset([item], transform), batch_size=BATCH, num_workers=0))

    files = [Path(p) for it in items for p in [*it["image"], it["label"]]]  # type: ignore[misc]
    return Approach("MONAI from NIfTI", step, items, disk_bytes(files), f"{len(items)} scans")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="a prepared store (default: synthesize one in a temp dir)")
    parser.add_argument("--quick", action="store_true", help="few scans (under 2 minutes)")
    parser.add_argument("--scans", type=int, help="scans per pipeline (default 3 with --quick, else 8)")
    args = parser.parse_args()
    pin_torch_threads()
    import warnings

    import torch

    # MONAI's deprecation notice and its "no foreground" notice on negative scans are expected
    warnings.filterwarnings("ignore", module=r"monai\.")

    torch.manual_seed(0)
    num_scans = args.scans or (3 if args.quick else 8)
    with tempfile.TemporaryDirectory(prefix="petctl-bench-") as tmp:
        store = args.store or make_store(Path(tmp), num_cases=6 if args.quick else 10)
        items = nifti_cases(store)[:num_scans]
        if not items:
            sys.exit(f"{store}: no case with its CT on the PET grid to compare on")
        approaches = [petctl_approach(store, [str(it["case"]) for it in items]), monai_approach(store, items)]
        measures = run_interleaved(approaches, rounds=len(items))
    ours, monai = (measures[a.name] for a in approaches)
    print_table("Training patches per second, one CPU worker (96³, 12 per scan, augmented)", ours, [monai])
    print(f"RESULT loader_throughput patches_per_s_per_worker={ours.rate:.2f} ratio_vs_monai={ratio(ours, monai):.2f}")


if __name__ == "__main__":
    main()

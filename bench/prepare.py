"""prepare's time per case against a MONAI transform chain doing the same steps on the same cases.

Both sides do, per case, on one thread: load CT, PET and label NIfTI; resample CT onto the PET
grid when their grids differ; reorient to RAS; crop to the CT foreground (above the fingerprint's
threshold); resample to 2.04×2.04×3 mm (trilinear images, nearest/threshold labels); clip to the
fingerprint's [p5, p95] and z-normalize; write the result (petctl: its Zarr store with lesion and
body coordinate samples; MONAI: an uncompressed .npy pair, which favours MONAI). The fingerprint
is computed once by petctl and shared. Rates are cases per CPU-second, alternating case by case.
Last line: `RESULT prepare ratio_vs_monai=R` (target ≥ 1.5).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Approach, disk_bytes, pin_threads, pin_torch_threads, print_table, ratio, run_interleaved  # noqa: E402

pin_threads()

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402

SPACING = (2.04, 2.04, 3.0)


def petctl_approach(data: Path, store: Path, cases: list[str]) -> Approach:
    from petctl.engine.cohort import discover
    from petctl.engine.prepare import PrepareConfig, write_case
    from petctl.engine.store import read_json

    sources = {s.case: s for s in discover(data)}
    fingerprint = read_json(store / "fingerprint.json")
    cfg = PrepareConfig(data=str(data), store=str(store.with_name("bench-store")), spacing=SPACING, num_folds=2)
    scans = read_json(store / ".parts" / "scans.json")

    def step(case: str) -> int:
        write_case(sources[case], fingerprint, cfg, "bench", scans[case])
        return 1

    return Approach("petctl prepare", step, cases, 0, "load → … → Zarr store (+coords)")


def monai_approach(data: Path, store: Path, cases: list[str], out: Path) -> Approach:
    import torch
    from monai import transforms as mt

    from petctl.engine.cohort import discover

    fp = json.loads((store / "fingerprint.json").read_text())
    thr = float(fp["crop_threshold_hu"])
    clip = torch.tensor([fp["ct"]["clip"], fp["pet"]["clip"]], dtype=torch.float32)
    mean = torch.tensor([fp["ct"]["mean"], fp["pet"]["mean"]], dtype=torch.float32)
    std = torch.tensor([fp["ct"]["std"], fp["pet"]["std"]], dtype=torch.float32)

    def normalize(img):
        view = (-1, 1, 1, 1)
        return (torch.clamp(img, clip[:, 0].reshape(view), clip[:, 1].reshape(view)) - mean.reshape(view)) / std.reshape(view)

    chain = mt.Compose([
        mt.LoadImaged(keys=["ct", "pet", "label"], image_only=False),
        mt.EnsureChannelFirstd(keys=["ct", "pet", "label"]),
        mt.ResampleToMatchd(keys="ct", key_dst="pet", mode="bilinear", padding_mode="border"),
        mt.ConcatItemsd(keys=["ct", "pet"], name="image"),
        mt.Orientationd(keys=["image", "label"], axcodes="RAS"),
        mt.CropForegroundd(keys=["image", "label"], source_key="image", select_fn=lambda x: x > thr, channel_indices=0, margin=2),
        mt.Spacingd(keys=["image", "label"], pixdim=SPACING, mode=("bilinear", "nearest")),
        mt.Lambdad(keys="image", func=normalize),
    ])
    sources = {s.case: s for s in discover(data)}
    out.mkdir(parents=True, exist_ok=True)

    def step(case: str) -> int:
        s = sources[case]
        d = chain({"ct": str(s.ct), "pet": str(s.pet), "label": str(s.label)})
        np.save(out / f"{case}_image.npy", np.asarray(d["image"], dtype=np.float32))
        np.save(out / f"{case}_label.npy", np.asarray(d["label"], dtype=np.uint8))
        return 1

    return Approach("MONAI chain", step, cases, 0, "LoadImaged → ResampleToMatchd → Orientationd → CropForegroundd → Spacingd → clip/z → .npy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 cases (about a minute)")
    parser.add_argument("--cases", type=int, default=10)
    args = parser.parse_args()
    pin_torch_threads()
    import warnings

    warnings.filterwarnings("ignore", module=r"monai\.")
    from petctl.engine.prepare import PrepareConfig, run
    from petctl.engine.synth import make_cohort

    num = 4 if args.quick else args.cases
    with tempfile.TemporaryDirectory(prefix="petctl-bench-prepare-") as tmp:
        tmp_path = Path(tmp)
        make_cohort(tmp_path / "raw", num_cases=max(num, 7), seed=21)
        store = tmp_path / "store"
        run(PrepareConfig(data=str(tmp_path / "raw"), store=str(store), spacing=SPACING, num_folds=2))  # fingerprint + scans
        cases = sorted(json.loads((store / "manifest.json").read_text())["cases"])[:num]
        ours = petctl_approach(tmp_path / "raw", store, cases)
        monai = monai_approach(tmp_path / "raw", store, cases, tmp_path / "monai")
        measures = run_interleaved([ours, monai], rounds=len(cases))
        m_ours, m_monai = measures[ours.name], measures[monai.name]
        m_ours.disk_bytes = disk_bytes([tmp_path / "bench-store"])
        m_monai.disk_bytes = disk_bytes([tmp_path / "monai"])
    print_table(f"Cases per CPU-second, one thread, {len(cases)} cases at {SPACING} mm", m_ours, [m_monai])
    r = ratio(m_ours, m_monai)
    print(f"target ≥ 1.5: {'met' if r >= 1.5 else 'MISSED'}")
    print(f"RESULT prepare ratio_vs_monai={r:.2f}")


if __name__ == "__main__":
    main()

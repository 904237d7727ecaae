"""Which demo seeds draw held-out positives whose lesions are all small, and how visible each lesion is.

Renders, in memory (no files), the held-out studies `petctl demo --seed S` synthesizes (its default
`--cases 192 --test-cases 32`: the held-out plan depends on the training plan's size) and measures
each positive's lesions on its label: volume (18-connected components, mL), peak SUV, and how far
the lesion's MIP rises above the rest of the scan on its own rays, along x and along y (negative:
brighter tissue on every ray through it). Prints a line per seed (positives, healthy scans, and
positives whose largest lesion is under --small mL) and, with --per-case, every positive.
A development tool: it reaches into `petctl.engine.synth`'s private planner and renderer.

    python tools/small_lesion_seeds.py 12011 12411 --per-case
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor

import cc3d
import numpy as np

import petctl.engine.synth as synth
from petctl.engine.evaluate import CONNECTIVITY, affine_voxel_ml


def held_out(seed: int, cases: int, test_cases: int) -> list:
    """The held-out studies of a demo cohort, as `synth.make_cohort` plans them."""
    train = synth._plan(seed, synth._TRAIN, cases, 0, 0)
    return synth._plan(seed, synth._TEST, test_cases, cases, len({s.patient for s in train}))


def describe(job: tuple[int, object]) -> dict:
    """One positive's lesions: mL, peak SUV, and the rise of its MIP over the rest of each ray (x, y)."""
    seed, study = job
    images, _ = synth._render_study(seed, study, 1.0, True)
    pet, affine = images["pet"]
    label = images["label"][0] > 0
    voxel_ml = affine_voxel_ml(affine)
    comps = cc3d.connected_components(label, connectivity=CONNECTIVITY)
    lesions = []
    for k in range(1, int(comps.max()) + 1):
        inside = comps == k
        rise = []
        for axis in (0, 1):  # the x and y MIPs
            rest = np.where(label, -np.inf, pet).max(axis=axis)
            own = np.where(inside, pet, -np.inf).max(axis=axis)
            rays = np.isfinite(own)
            rise.append(float((own[rays] - rest[rays]).max()))
        lesions.append({"ml": float(inside.sum() * voxel_ml), "peak": float(pet[inside].max()), "rise": rise})
    return {"seed": seed, "case": study.case, "lesions": lesions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("seeds", type=int, nargs="+")
    parser.add_argument("--cases", type=int, default=192, help="the demo's --cases")
    parser.add_argument("--test-cases", type=int, default=32, help="the demo's --test-cases")
    parser.add_argument("--small", type=float, default=1.5, help="a positive is small-lesion only below this largest lesion (mL)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--per-case", action="store_true", help="print every positive's lesions")
    args = parser.parse_args()
    jobs, healthy = [], {}
    for seed in args.seeds:
        studies = held_out(seed, args.cases, args.test_cases)
        jobs += [(seed, s) for s in studies if s.diagnosis != synth.NEGATIVE]
        healthy[seed] = sum(s.diagnosis == synth.NEGATIVE for s in studies)
    found: dict[int, list[dict]] = {seed: [] for seed in args.seeds}
    with ProcessPoolExecutor(args.workers) as pool:
        for row in pool.map(describe, jobs):
            found[row["seed"]].append(row)
    for seed in args.seeds:
        small = [p for p in found[seed] if max(lesion["ml"] for lesion in p["lesions"]) < args.small]
        print(f"seed {seed}: {len(found[seed])} positives, {healthy[seed]} healthy, {len(small)} small-lesion only "
              f"({', '.join(p['case'] for p in small) or 'none'})")
        if args.per_case:
            for p in found[seed]:
                parts = [f"{lesion['ml']:.2f} mL SUV {lesion['peak']:.1f} rise {lesion['rise'][0]:+.1f}/{lesion['rise'][1]:+.1f}"
                         for lesion in sorted(p["lesions"], key=lambda lesion: -lesion["ml"])]
                print(f"  {p['case']}: " + "; ".join(parts))


if __name__ == "__main__":
    main()

"""Benchmark: peak memory (RSS) of `petctl predict` on one whole-body scan, against the scan's size.

Synthesizes a 512×512×1000 whole-body phantom at 0.98×0.98×2 mm (legs, torso with lungs, spine,
liver and bladder, neck, head; a few hot lesions): CT int16 HU and PET float32 SUV, written as
.nii.gz like AutoPET's files. A run is built the way `bench/gate.py` builds one — the preset's
networks (cpu-small) with random weights, on a store prepared from a small synthetic cohort for its
fingerprint — with a thresholds.json without a classifier gate, so the whole segmentation path
runs. One segmentation fold by default: the folds' probabilities are summed into one array, so
memory does not grow with them, only time does (`--folds 5` for the method's ensemble).
`petctl predict` then runs in a fresh child process that reports its own VmHWM (peak RSS) from
/proc/self/status. A second child only imports petctl's predict path and loads the run's
networks: the fixed runtime baseline, printed for information.
Target: peak RSS < 4 × the float32 input volume (512·512·1000·4 B ≈ 1.05 GB).
Last line: `RESULT predict_memory peak_rss_over_input=R`. `--quick`: a 256×256×500 phantom on the
same spacing (a smaller body, one eighth of the voxels); the target is for the full volume, since
at that size the fixed runtime baseline (~0.95 GB) alone is ~7× the input.

    .venv/bin/python bench/predict_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TARGET = 4.0


def phantom(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(CT int16 HU, PET float32 SUV) of a smooth body-like phantom, RAS voxel order (z = feet → head)."""
    nx, ny, nz = shape
    rng = np.random.default_rng(seed)
    x = (np.arange(nx) - nx / 2 + 0.5)[:, None] / nx  # fractions of the field of view
    y = (np.arange(ny) - ny / 2 + 0.5)[None, :] / ny
    ct = np.full(shape, -1000, dtype=np.int16)
    pet = np.zeros(shape, dtype=np.float32)
    lesions = [(rng.uniform(-0.15, 0.15), rng.uniform(-0.08, 0.08), rng.uniform(0.5, 0.85), rng.uniform(0.01, 0.025))
               for _ in range(6)]
    for k in range(nz):
        t = (k + 0.5) / nz
        ell = lambda cx, cy, a, b: ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1  # noqa: E731
        if t < 0.45:  # legs
            r = 0.07 + 0.05 * t
            body = ell(-0.15, 0, r, r) | ell(0.15, 0, r, r)
        elif t < 0.85:  # torso
            body = ell(0, 0, 0.36, 0.22)
        elif t < 0.9:  # neck
            body = ell(0, 0, 0.07, 0.07)
        else:  # head
            body = ell(0, 0, 0.1, 0.12)
        ct_k = np.where(body, 40, -1000).astype(np.int16)
        pet_k = np.where(body, 1.0 + 0.1 * np.cos(20 * x + 13 * y), 0.02).astype(np.float32)
        if 0.45 <= t < 0.9:  # spine
            spine = ell(0, -0.15 if t < 0.85 else -0.03, 0.03, 0.03)
            ct_k[spine] = 700
        if 0.65 <= t < 0.83:  # lungs
            lungs = ell(-0.15, 0.02, 0.1, 0.13) | ell(0.15, 0.02, 0.1, 0.13)
            ct_k[lungs] = -800
            pet_k[lungs] = 0.4
        if 0.55 <= t < 0.65:  # liver
            pet_k[ell(-0.12, 0.03, 0.15, 0.12)] = 2.2
        if 0.46 <= t < 0.5:  # bladder
            pet_k[ell(0, 0.05, 0.05, 0.05)] = 12.0
        if t >= 0.9:  # brain
            pet_k[ell(0, 0, 0.08, 0.1)] = 8.0
        for cx, cy, cz, r in lesions:
            dz = (t - cz) * nz / nx  # in field-of-view fractions, as x and y
            if abs(dz) < r:
                rr = np.sqrt(r * r - dz * dz)
                pet_k[ell(cx, cy, rr, rr) & body] = 6.0
        ct[:, :, k] = ct_k
        pet[:, :, k] = pet_k
    return ct, pet


def write_case(folder: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> None:
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-s * (n - 1) / 2 for s, n in zip(spacing, shape)]
    ct, pet = phantom(shape)
    nib.save(nib.Nifti1Image(ct, affine), str(folder / "wholebody_0000.nii.gz"))
    del ct
    nib.save(nib.Nifti1Image(pet, affine), str(folder / "wholebody_0001.nii.gz"))


def build(work: Path, preset: str, num_folds: int) -> Path:
    """A store (for its fingerprint) and a run of random-weight networks without a gate; returns HOME."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gate import build_run

    from petctl.engine.config import preset as get_preset
    from petctl.engine.prepare import PrepareConfig, run as prepare
    from petctl.engine.registry import Registry
    from petctl.engine.synth import make_cohort

    make_cohort(work / "raw", num_cases=8, seed=5, scale=0.5)
    store = work / "store"
    prepare(PrepareConfig(data=str(work / "raw"), store=str(store), spacing=get_preset(preset).spacing, num_folds=2))
    home = work / "home"
    run_dir = build_run(home, store, preset, num_folds=num_folds)
    shutil.rmtree(run_dir / "cls")  # no gate: the classifiers are not needed
    (run_dir / "thresholds.json").write_text(json.dumps({"version": 1, "segmentation": {"threshold": 0.5}}))
    Registry(home).create_run(run_dir.name, kind="train", config={"store": str(store)})
    return home


_MEASURE = """
import sys
code = 0
try:
{body}
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
print("VMHWM", int(status["VmHWM"].split()[0]) * 1024, flush=True)
sys.exit(code)
"""


def child_peak_rss(body: str, env: dict[str, str]) -> tuple[int, float, str]:
    """(peak RSS bytes, seconds, output tail) of `body` run in a fresh child process.

    The child reports its own VmHWM (the high-water RSS of its address space, which exec made
    new). `ru_maxrss` of RUSAGE_CHILDREN is not used: Linux folds the parent's RSS at fork into it.
    """
    code = _MEASURE.format(body="\n".join("    " + line for line in body.strip().splitlines()))
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    marks = [line for line in done.stdout.splitlines() if line.startswith("VMHWM ")]
    if done.returncode != 0 or not marks:
        raise SystemExit(f"child failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return int(marks[-1].split()[1]), seconds, (done.stdout + done.stderr)[-1500:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 256×256×500 phantom (one eighth)")
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--folds", type=int, default=1, help="segmentation folds in the run (time grows with them, memory not)")
    args = parser.parse_args()
    shape = (256, 256, 500) if args.quick else (512, 512, 1000)
    spacing = (0.98, 0.98, 2.0)  # quick: a smaller body on the same grid spacing (sliding windows ∝ body volume)

    work = Path(tempfile.mkdtemp(prefix="petctl-bench-predmem-"))
    t0 = time.perf_counter()
    home = build(work, args.preset, args.folds)
    write_case(work / "in", shape, spacing)
    print(f"phantom {shape[0]}×{shape[1]}×{shape[2]} at {spacing[0]:.2f}×{spacing[1]:.2f}×{spacing[2]:.2f} mm, "
          f"{sum(p.stat().st_size for p in (work / 'in').iterdir()) / 1e6:.0f} MB on disk; set-up {time.perf_counter() - t0:.0f} s")

    env = {**os.environ, "PETCTL_HOME": str(home), "HF_HOME": str(work / "hf")}
    base_rss, _, _ = child_peak_rss(f"""
import petctl.engine.predict, petctl.engine.nifti
from pathlib import Path
from petctl.engine.ensemble import RunModels
RunModels.load(Path({str(home / 'runs' / 'bench')!r}), need_cls=False)
""", env)
    peak_rss, seconds, _ = child_peak_rss(f"""
from petctl.cli import main
sys.argv = ["petctl", "predict", "--run", "bench", "--no-gate", {str(work / 'in')!r}, {str(work / 'out')!r}]
main()
""", env)
    import nibabel as nib

    mask = nib.load(str(work / "out" / "wholebody.nii.gz"))
    assert mask.shape == shape, (mask.shape, shape)
    shutil.rmtree(work, ignore_errors=True)
    input_bytes = shape[0] * shape[1] * shape[2] * 4
    ratio = peak_rss / input_bytes
    print(f"float32 input volume   {input_bytes / 1e9:6.2f} GB")
    print(f"runtime baseline RSS   {base_rss / 1e9:6.2f} GB  (imports + {args.folds} fold(s)' networks, no volume)")
    print(f"predict peak RSS       {peak_rss / 1e9:6.2f} GB  in {seconds:.0f} s  "
          f"({(peak_rss - base_rss) / input_bytes:.2f}× the input above the baseline)")
    if args.quick:
        print(f"target peak < {TARGET:g}× input applies to the full 512×512×1000 volume; here the runtime baseline alone is "
              f"{base_rss / input_bytes:.1f}× the input")
    else:
        print(f"target peak < {TARGET:g}× input: {'met' if ratio < TARGET else 'MISSED'}")
    print(f"RESULT predict_memory peak_rss_over_input={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

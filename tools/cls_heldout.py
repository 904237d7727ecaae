"""Compare MIP classifier designs on a held-out set large enough to tell them apart.

A demo's 32 held-out scans give a classifier AUROC with a 95 % interval ~0.15 wide; this tool
scores classifier fold 0 on hundreds. Three steps, each resumable by hand:

    python tools/cls_heldout.py setup 12511 /tmp/x1 --test-cases 320   # synthesize + prepare as the demo does
    python tools/cls_heldout.py train /tmp/x1 base                      # the demo's classifier (cpu-small)
    python tools/cls_heldout.py train /tmp/x1 ep80 cls_epochs_per_cycle=80 cls_head=global
    python tools/cls_heldout.py score /tmp/x1 base ep80

`setup` writes the cohort (`--cases 192` training scans, the demo's), prepares its store with the
demo's settings and saves each held-out scan's PET as the store would hold it (predict's own
preprocessing). `train NAME [FIELD=VALUE ...]` trains fold 0 of every projection of cpu-small with
those `TrainConfig` fields replaced, one process per projection and one thread each, as the demo
runs them. `score` prints per design the AUROC over all held-out scans, over the first 32 (the
demo's own held-out scans for that seed), of the positives whose lesions are all under 1.5 mL
against the healthy scans, and of the other positives against them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np


def config(overrides: dict[str, str]):
    """cpu-small as the demo trains its classifier (its stretched epochs unless overridden), with `overrides`."""
    from petctl.engine.budget import stretched_epochs
    from petctl.engine.config import TrainConfig, preset
    from petctl.engine.demo import DemoConfig

    cfg = preset("cpu-small")
    cfg = replace(cfg, cls_epochs_per_cycle=stretched_epochs(cfg.cls_epochs_per_cycle, DemoConfig().stretch))
    kinds = {f.name: f.type for f in fields(TrainConfig)}
    for key, value in overrides.items():
        if key not in kinds:
            raise SystemExit(f"{key}: not a TrainConfig field")
        current = getattr(cfg, key)
        cfg = replace(cfg, **{key: tuple(value.split(",")) if isinstance(current, tuple) else type(current)(value)})
    return cfg


def setup(seed: int, root: Path, test_cases: int) -> None:
    from petctl.engine.cohort import discover
    from petctl.engine.demo import DemoConfig
    from petctl.engine.evaluate import affine_voxel_ml, case_lesions
    from petctl.engine.nifti import load_case
    from petctl.engine.prepare import PrepareConfig, preprocess, run as prepare
    from petctl.engine.store import read_json
    from petctl.engine.synth import make_cohort

    demo, t = DemoConfig(), time.time()
    make_cohort(root / "raw", num_cases=demo.cases, seed=seed, num_test_cases=test_cases, workers=demo.workers)
    prepare(PrepareConfig(data=str(root / "raw"), store=str(root / "store"), spacing=config({}).spacing, workers=demo.workers,
                          num_folds=demo.folds, seed=seed, test_fraction=demo.test_fraction, clip_percentiles=tuple(demo.clip),
                          pet_clip_percentiles=tuple(demo.pet_clip) if demo.pet_clip else None,
                          hot_background=demo.hot_background, pet_wide=demo.pet_wide))
    fingerprint = read_json(root / "store" / "fingerprint.json")
    prep = read_json(root / "store" / "prepare.json")["config"]
    (root / "heldout").mkdir(exist_ok=True)
    info = {}
    for src in discover(root / "raw", split="Ts"):
        loaded = load_case(src)
        label = np.asarray(loaded.label) > 0
        sizes = [round(lesion.volume_ml, 2) for lesion in case_lesions(label, np.zeros_like(label), affine_voxel_ml(loaded.affine))]
        image, *_ = preprocess(loaded, fingerprint, tuple(prep["spacing"]), int(prep.get("crop_margin", 2)))
        np.save(root / "heldout" / f"{src.case}.npy", image[1].astype(np.float32))
        info[src.case] = {"positive": bool(label.any()), "lesions_ml": sorted(sizes, reverse=True)}
    (root / "heldout.json").write_text(json.dumps(info))
    print(f"set up {root} in {time.time() - t:.0f} s: {len(info)} held-out scans")


def train(root: Path, name: str, overrides: dict[str, str]) -> None:
    cfg, t = config(overrides), time.time()
    procs = []
    for axis in cfg.cls_projections:
        code = ("import sys, torch; torch.set_num_threads(1); sys.path.insert(0, sys.argv[1]); import cls_heldout as tool; "
                "from pathlib import Path; from petctl.engine.classifier import fit_cls; import json; "
                "sys.exit(fit_cls(tool.config(json.loads(sys.argv[2])), Path(sys.argv[3]) / 'store', 0, sys.argv[4], "
                "Path(sys.argv[3]) / sys.argv[5] / f'fold0-{sys.argv[4]}'))")
        procs.append(subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).parent), json.dumps(overrides), str(root), axis, name],
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"{name}: training failed ({codes})")
    print(f"{name}: trained in {time.time() - t:.0f} s")


def score(root: Path, names: list[str]) -> None:
    import torch

    from petctl.engine.classifier import build_classifier_for
    from petctl.engine.config import TrainConfig
    from petctl.engine.ensemble import LoadedModel, RunModels
    from petctl.engine.loop import find_checkpoint, load_checkpoint
    from petctl.engine.metrics import auroc

    info = json.loads((root / "heldout.json").read_text())
    cases = sorted(info)
    positive = np.array([info[c]["positive"] for c in cases])
    small = np.array([info[c]["positive"] and info[c]["lesions_ml"][0] < 1.5 for c in cases])
    first = np.arange(len(cases)) < 32
    for name in names:
        models = []
        for fold_dir in sorted((root / name).iterdir()):
            state, _, meta = load_checkpoint(find_checkpoint(fold_dir / "checkpoints" / "best") or find_checkpoint(fold_dir / "checkpoints" / "last"))
            cfg = TrainConfig.from_json(meta["config"])
            model = build_classifier_for(cfg)
            model.load_state_dict(state)
            models.append(LoadedModel(fold_dir.name, 0, cfg, model.eval(), meta["config"]["projection"], None))
        gate = RunModels(run_dir=root / name, cls=models)  # scored as the demo's gate scores a scan
        s = np.array([gate.cls_score(torch.from_numpy(np.load(root / "heldout" / f"{case}.npy"))) for case in cases])
        hard, rest = small | ~positive, ~small
        print(f"{name}: all {auroc(positive, s):.3f} | first 32 {auroc(positive[first], s[first]):.3f} | "
              f"small-lesion positives vs healthy {auroc(positive[hard], s[hard]):.3f} ({small.sum()} / {(~positive).sum()}) | "
              f"others vs healthy {auroc(positive[rest], s[rest]):.3f}")
        (root / f"scores-{name}.json").write_text(json.dumps(dict(zip(cases, map(float, s)))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("setup")
    p.add_argument("seed", type=int)
    p.add_argument("root", type=Path)
    p.add_argument("--test-cases", type=int, default=320)
    p = sub.add_parser("train")
    p.add_argument("root", type=Path)
    p.add_argument("name")
    p.add_argument("overrides", nargs="*", help="TrainConfig FIELD=VALUE")
    p = sub.add_parser("score")
    p.add_argument("root", type=Path)
    p.add_argument("names", nargs="+")
    args = parser.parse_args()
    if args.cmd == "setup":
        setup(args.seed, args.root, args.test_cases)
    elif args.cmd == "train":
        train(args.root, args.name, dict(o.split("=", 1) for o in args.overrides))
    else:
        score(args.root, args.names)


if __name__ == "__main__":
    main()

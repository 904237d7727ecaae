"""Benchmark: predict time on negative (healthy) scans with the MIP classifier gate vs without.

Builds a run with the preset's networks (weights are random: timing does not depend on them) —
5 segmentation folds and 5 folds × 2 projections of classifiers, as the method uses — and a
thresholds file whose gate marks every scan healthy, then times `petctl.engine.predict.predict`
on the same negative scans with the gate and with `gate=False`, in the same run.
Last line: `RESULT gate speedup_on_negatives=R` (target ≥ 5).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def build_run(home: Path, store: Path, preset: str, num_folds: int) -> Path:
    import torch

    from petctl.engine.classifier import build_classifier_for
    from petctl.engine.config import preset as get_preset
    from petctl.engine.loop import Position, save_checkpoint
    from petctl.engine.models import build_seg_model

    cfg = get_preset(preset).with_image_channels(2)
    run_dir = home / "runs" / "bench"
    for k in range(num_folds):
        model = build_seg_model(cfg.arch, in_channels=cfg.in_channels, feature_size=cfg.feature_size, features=cfg.features,
                                patch_size=cfg.patch_size)
        save_checkpoint(run_dir / "seg" / f"fold{k}" / "checkpoints" / "best", model_state=model.state_dict(), optimizer_state=None,
                        scheduler_state=None, position=Position(), config={**cfg.to_json(), "fold": k, "store": str(store)}, metric=None)
        for axis in cfg.cls_projections:
            clf = build_classifier_for(cfg)
            save_checkpoint(run_dir / "cls" / f"fold{k}-{axis}" / "checkpoints" / "best", model_state=clf.state_dict(),
                            optimizer_state=None, scheduler_state=None, position=Position(),
                            config={**cfg.to_json(), "fold": k, "projection": axis, "store": str(store)}, metric=None)
    (run_dir / "thresholds.json").write_text(json.dumps({"version": 1, "segmentation": {"threshold": 0.5},
                                                        "classifier": {"threshold": 1.01}}))
    del torch
    return run_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 negative scans, cpu-small networks")
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--cases", type=int, default=6)
    args = parser.parse_args()
    num_cases = 3 if args.quick else args.cases

    from rich.console import Console

    from petctl.engine.predict import PredictOptions, predict
    from petctl.engine.prepare import PrepareConfig, run as prepare
    from petctl.engine.config import preset as get_preset
    from petctl.engine.synth import make_cohort

    console = Console()
    work = Path(tempfile.mkdtemp(prefix="petctl-bench-gate-"))
    raw = work / "raw"
    summary = make_cohort(raw, num_cases=max(12, 2 * num_cases), seed=5)
    meta = {row.split(",")[0]: row.split(",")[2] for row in (raw / "metadata.csv").read_text().splitlines()[1:]}
    negatives = [c for c in summary.case_ids if meta.get(c) == "NEGATIVE"][:num_cases]
    store = work / "store"
    prepare(PrepareConfig(data=str(raw), store=str(store), spacing=get_preset(args.preset).spacing, num_folds=2))
    run_dir = build_run(work / "home", store, args.preset, num_folds=5)
    data = work / "negatives"
    (data / "imagesTs").mkdir(parents=True)
    for c in negatives:
        for ch in ("0000", "0001"):
            (data / "imagesTs" / f"{c}_{ch}.nii.gz").write_bytes((raw / "imagesTr" / f"{c}_{ch}.nii.gz").read_bytes())

    times = {}
    for name, gate in (("gate", True), ("no gate", False), ("gate ", True)):
        t0 = time.perf_counter()
        result = predict(run_dir, data, work / f"out-{gate}", PredictOptions(gate=gate))
        times[name] = time.perf_counter() - t0
        assert not result.skipped, result.skipped
        gated = sum(r["gated"] for r in result.written.values())
        console.print(f"{name.strip():8s} {times[name]:7.2f} s for {len(negatives)} negative scans ({gated} gated)")
    with_gate = min(times["gate"], times["gate "])  # the first run also pays one-off start-up costs
    ratio = times["no gate"] / with_gate
    console.print(f"preset {args.preset}: 5 seg folds, 5×2 classifiers; target ≥ 5: {'met' if ratio >= 5 else 'MISSED'}")
    print(f"RESULT gate speedup_on_negatives={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

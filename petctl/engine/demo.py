"""`petctl demo`: the whole AutoPET-II method end to end on one machine, every stage for real.

synth (or --data) → prepare → segmentation folds and classifier folds (accelerate) → calibrate →
(retrain-merged) → gated ensemble predict of the held-out imagesTs → evaluate against labelsTs →
a report (report.md, PNGs) in OUT. Each stage is a registry step, visible in `petctl status`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

from petctl.errors import PetctlError


@dataclass(frozen=True)
class DemoConfig:
    out: str = "demo-out"
    """Folder for the cohort, the store, predictions and the report."""
    data: str | None = None
    """An nnU-Net raw cohort; default: synthesize one (the embedded default cohort)."""
    preset: str = "cpu-small"
    run: str = "demo"
    cases: int = 192
    """Synthetic training cases (imagesTr). The MIP classifier learns from whole scans, so it needs
    many: in a quick check its validation AUROC was 0.74–0.88 with 34 training scans per fold and
    0.97–0.99 with 85."""
    test_cases: int = 32
    """Synthetic held-out cases of new patients (imagesTs/labelsTs), predicted and evaluated. 32
    (about 16 positives and 16 healthy) rather than 16: with ~8 of each, one positive's Dice moved
    the mean by ~0.1 and one positive ranked below four healthy scans cost 0.06 AUROC, as much as
    the whole spread between seeds (README, "Quality on fresh seeds"). The cases are drawn per
    patient, so the first 16 are the same scans either way; predicting 16 more costs ~20 s."""
    seed: int = 0
    folds: int = 5
    """Cross-validation folds of the split (the paper's 5)."""
    train_folds: int | None = 1
    """How many of them (the first ones) are trained and ensembled; None: all. The CPU demo trains
    one, on every core (`processes`): in its ~20 minutes two folds side by side got 5 of the
    preset's 12 epochs each on 2026-11-30's slow 2-core machine, and one fold on both cores gets
    ~1.6× the steps of either (DDP over gloo: 12.6 patches/s against 7.4–8.0 per fold), while the
    classifier's projections then train in one round instead of two (README). Each net still learns
    from 4/5 of the training cases."""
    test_fraction: float = 0.15
    """prepare's held-out test split (calibration) of the training cases."""
    workers: int = 2
    clip: tuple[float, float] = (5.0, 95.0)
    """prepare's clip percentiles."""
    pet_clip: tuple[float, float] | None = (0.0, 95.0)
    """prepare's PET clip percentiles (None: `clip`, the paper's 5-95). Beyond the paper, the PET floor
    sits at the lesions' lowest uptake (their p0, ~1.2 SUV on the synthetic cohort) instead of their
    p5 (~2.5 SUV), so a faint lesion is not flattened into the clipped background: on four seeds'
    cohorts, paired with the paper's floor, the held-out mean Dice went 0.598 → 0.661 and FNV
    7.2 → 4.8 mL (README). The classifier's MIPs read the same clipped PET."""
    hot_background: float = 0.5
    """prepare's share of background patches centred in bright non-lesion tissue. Beyond the paper
    (uniform body patches, 0): with it off, the demo's nets called the bladder a lesion in almost
    every held-out scan, since uniform body patches seldom show it."""
    pet_wide: bool = False
    """prepare's wide PET channel (log(1 + SUV) beside the clipped PET; `PrepareConfig.pet_wide`).
    An option: on 7 seeds it found faint lesions (mean FNV 7.95 → 6.07 mL) but cost Dice
    (0.711 → 0.692) and added false positives (README)."""
    gate_margin: float = 0.5
    """calibrate's gate margin: the classifier gate's threshold is half the lowest test-split
    positive's score, not all of it (the paper). With ~15 calibration positives, each held-out positive
    scores below all of them about 1 time in 16, and the paper's gate then empties its mask. On 20
    finished demos' held-out scans (16 cohorts; README) half the threshold gave mean Dice / FPV / FNV
    0.686 / 1.88 / 5.95 against the paper's 0.642 / 1.32 / 6.52 and a third's 0.693 / 2.32 / 5.94: a third let
    healthy scans through on 3030 and 3333 (FPV 4.1 and 7.1 mL against 0.0 and 2.5) and saved one
    positive, on 2727, whose Dice missed the target either way."""
    gate_positives: str = "detected"
    """calibrate's gate counts only the test positives the segmentation finds ("all": the paper's).
    On 21 finished demos it stopped no held-out positive that half the lowest of all positives lets
    through, and cut the FPV on the two where a missed test positive had held the gate down (2424
    2.0 → 1.1 mL; fresh seed 3434 4.10 → 1.13 mL; README)."""
    urine_veto: bool = True
    """calibrate's urine veto (`petctl.engine.urine`): a predicted component lying mostly in large
    water-density regions of the CT (the bladder) is dropped, in calibration and prediction. The
    nets still marked the bladder in some scans. Re-scoring the masks of 36 finished demos offline:
    on the fresh seeds 3030–3939 mean Dice 0.815 → 0.829, FPV on negatives 2.68 → 1.34 mL; on 26
    older demos 0.626 → 0.649 and 1.70 → 0.63 mL; FNV unchanged, no positive lower (README)."""
    hard_lesion_gain: float | None = None
    """Segmentation training's hard-example mining per lesion (`TrainConfig.hard_lesion_gain`);
    None: the preset's."""
    lesion_dim: float | None = None
    """Segmentation training's lesion dimming (`TrainConfig.lesion_dim`); None: the preset's."""
    cls_projections: tuple[str, ...] | None = None
    """The classifier's projections (`TrainConfig.cls_projections`; None: the preset's x and y, a
    model each, as the paper). "xy" trains one model on both views of each scan (an option: on five
    cohorts its AUROC moved by no more than the noise, README)."""
    cls_pretrained: str | None = None
    """A local timm state dict the classifier folds start from (`TrainConfig.cls_pretrained`; for
    cpu-small the ImageNet weights of timm's resnet10t); None: from scratch, as the measured demos."""
    calibrate_negatives: bool = False
    """calibrate also segments the test split's negatives, for the FPV curve over them (`calibrate
    --negatives`). Off: without a volume budget that curve does not move the threshold, the held-out
    imagesTs negatives measure the FPV anyway, and on 2026-11-30's slow machine the test negatives
    were half of calibrate's ~100 s (README)."""
    prob_resample: str = "nearest"
    """calibrate's (and so predict's) resampling of the ensemble's probabilities to the input grid
    before components are detected: "nearest" (each input voxel keeps its stored voxel's value, so
    the components are those the net drew on its own grid) or "linear" (trilinear; `calibrate
    --resample`). Beyond the paper: on 4 fresh seeds (9797-10101) re-calibrated and predicted both
    ways, nearest found 202 of 239 held-out lesions against 185 (a 72 mL lesion whose 0.79 core
    trilinear averaged to 0.70, under 0.75, among them), FNV -1.43 mL and FPV +0.84 mL on average,
    Dice +0.004, and 2 of 4 seeds met all four targets against 1 (docs/demo-experiments.md)."""
    tta: bool = False
    """Calibrate and predict with flip test-time augmentation (`calibrate --tta`). An option: on 4
    seeds mean Dice +0.04 and FPV −0.3 mL, but calibrate and predict take 3–4× as long (2020's demo
    939 s against ~718 s), and on fresh seed 8787 the flips lost a faint 78 mL lesion whole (Dice
    0.773 → 0.638, FNV 1.70 → 12.10 mL; README)."""
    budget_min: float | None = 20.0
    """Minutes the whole demo may take on a CPU machine. After prepare a few training steps are timed
    (`petctl.engine.budget`); when the preset's epochs would end past 95 % of the budget (its headroom),
    the segmentation and classifier epochs are cut by a common share, to no fewer than 2/5 of the
    preset's, and the time whole segmentation epochs leave goes to the classifier. The segmentation
    folds' steps then get a deadline (cut short at the pace they run, to no fewer than 80 % of the
    planned steps) and the classifier is replanned at that pace. CPU machines differ ~2× per step
    (16½ against 31 minutes for the same demo). None or 0: the preset's epochs whatever the time;
    ignored on GPUs."""
    stretch: float = 1.25
    """With a budget, a machine fast enough for the preset trains up to this share of its segmentation
    and classifier epochs (cpu-small: 15 and 50 of 12 and 40) to use the budget rather than end
    minutes inside it (`budget.fit_epochs(max_share=)`); the folds' deadline still cuts them, to no
    fewer than 80 % of the planned steps (the preset's 12). 1: the preset's epochs at most."""
    processes: int | None = None
    """Processes per segmentation fold (DDP); default: on CPU the cores shared among the folds trained
    at once (one fold on 2 cores: 2, one thread each), on GPUs 1. The preset's batch is split among
    them (so they must divide it), and a step still learns from the preset's patches (cpu-small: 2 × 2 for its 4). Classifier
    folds run one process each, one per core or GPU at a time."""
    concurrent: int | None = None
    """Folds trained at the same time; default: as many as train, up to one per CPU core (CPU) or
    per GPU."""
    retrain_merged: bool = False
    fresh: bool = False
    """Delete OUT and the run first (otherwise a re-run resumes)."""

    def __post_init__(self) -> None:
        if self.cases < 8 or self.folds < 2:
            raise PetctlError("the demo needs at least 8 cases and 2 folds")
        if self.cls_projections is not None:
            from petctl.engine.mip import check_projections

            try:
                check_projections(self.cls_projections)
            except ValueError as exc:
                raise PetctlError(f"--cls-projections: {exc}") from None
        if self.budget_min is not None and self.budget_min < 0:
            raise PetctlError(f"--budget must be ≥ 0 minutes (got {self.budget_min})")
        if not 1 <= self.stretch <= 2:
            raise PetctlError(f"--stretch must be within 1..2 (got {self.stretch})")
        if self.processes is not None and self.processes < 1:
            raise PetctlError(f"--processes must be at least 1 (got {self.processes})")
        if self.train_folds is not None and not 1 <= self.train_folds <= self.folds:
            raise PetctlError(f"--train-folds must be within 1..{self.folds} (got {self.train_folds})")
        from petctl.engine.calibrate import check_gate_margin, check_gate_positives
        from petctl.engine.geometry import check_resample

        check_gate_margin(self.gate_margin)
        check_gate_positives(self.gate_positives)
        check_resample(self.prob_resample, source="--prob-resample")


def default_concurrency(processes: int = 1) -> int:
    """Folds at a time: one per GPU when there are GPUs, else one single-threaded fold per CPU core."""
    from petctl.engine.folds import gpu_count

    gpus = gpu_count()
    if gpus:
        return max(1, gpus // max(1, processes))
    return max(1, (os.cpu_count() or 1) // max(1, processes))


@dataclass(frozen=True)
class DemoLaunch:
    """How the demo starts its folds: the segmentation folds (`seg`, possibly several processes each,
    with `seg_batch` patches per process) and the classifier folds (`cls`, one process each)."""

    seg: Any
    cls: Any
    seg_batch: int

    @property
    def shared(self) -> bool:
        """Both tasks can share one queue of fold launches."""
        return self.seg == self.cls


CLS_THREAD_GAIN = 0.46
"""What a second thread adds to a lone classifier job on the CPU: one "xy" model on 2 threads
trained seed 11911's fold in 122 s, where its x and y models took ~89 s each on one thread
(2 × 89 / 122 = 1.46 times one thread's pace)."""


def demo_launches(cfg: DemoConfig, num_folds: int, batch_size: int, cls_jobs: int | None = None) -> DemoLaunch:
    """The demo's fold launches (`DemoConfig.processes`, `concurrent`) for `num_folds` trained folds of
    a preset whose step learns from `batch_size` patches. On CPU, fewer classifier jobs (`cls_jobs`:
    folds × projections) than cores share the cores out as threads (one "xy" model: both cores)."""
    from petctl.engine.folds import FoldLaunch, gpu_count

    units = gpu_count() or (os.cpu_count() or 1)  # GPUs, or single-threaded CPU processes
    concurrent = cfg.concurrent or max(1, min(num_folds, units // max(1, cfg.processes or 1)))
    if cfg.processes and batch_size % cfg.processes:
        raise PetctlError(f"--processes {cfg.processes}: a segmentation fold's processes share the preset's batch of "
                          f"{batch_size} patches, so they must divide it")
    # on CPU the cores a fold has, down to a divisor of the batch, so that a step learns from the preset's patches
    processes = cfg.processes or (1 if gpu_count() else max(p for p in range(1, max(1, units // concurrent) + 1) if batch_size % p == 0))
    seg_batch = batch_size // processes
    cls = FoldLaunch(processes=1, concurrent=cfg.concurrent or default_concurrency(1))
    if not gpu_count() and not cfg.concurrent and cls_jobs and cls_jobs < cls.concurrent:
        cls = FoldLaunch(processes=1, concurrent=cls_jobs, threads=max(1, units // cls_jobs))
    return DemoLaunch(seg=FoldLaunch(processes=processes, concurrent=concurrent), cls=cls, seg_batch=seg_batch)


def run_demo(cfg: DemoConfig, home: Path, say: Callable[[str], Any], warn: Callable[[str], Any],
             progress_factory: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Run every stage; returns the summary written to OUT/summary.json."""
    from petctl.engine.calibrate import calibrate
    from petctl.engine.classifier import case_labels
    from petctl.engine.config import preset as get_preset, with_overrides
    from petctl.engine.evaluate import evaluate_folders, write_csv
    from petctl.engine.folds import train_folds
    from petctl.engine.predict import PredictOptions, input_cases, predict, write_summary
    from petctl.engine.prepare import PrepareConfig, run as prepare
    from petctl.engine.registry import Registry, json_safe, step_context, write_text_atomic
    from petctl.engine.report import write_report
    from petctl.engine.synth import cohort_complete, make_cohort

    t_demo = time.perf_counter()
    out = Path(cfg.out)
    registry = Registry(home)
    if cfg.fresh:
        _check_fresh_out(cfg, Path(home))
        shutil.rmtree(out, ignore_errors=True)
        for run in (cfg.run, f"{cfg.run}-merged"):
            shutil.rmtree(Path(home) / "runs" / run, ignore_errors=True)
    _check_resume(cfg, registry)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / DEMO_OPTIONS).exists():
        write_text_atomic(out / DEMO_OPTIONS, json.dumps(_result_options(cfg), indent=2))
    train_cfg = with_overrides(get_preset(cfg.preset), hard_lesion_gain=cfg.hard_lesion_gain, lesion_dim=cfg.lesion_dim)
    train_cfg = with_overrides(train_cfg, task="cls", pretrained=cfg.cls_pretrained, projections=cfg.cls_projections)
    timings: dict[str, float] = {}
    registry.create_run(cfg.run, kind="demo", config={**asdict(cfg), "store": str((out / "store").resolve())})

    def stage(name: str) -> Any:
        say(f"[bold cyan]── {name}[/]")
        return time.perf_counter()

    # data
    t = stage("data")
    data = Path(cfg.data) if cfg.data else out / "raw"
    if cfg.data is None and not cohort_complete(data):  # none yet, or an interrupted one (make_cohort clears it)
        with step_context(registry, cfg.run, "synth", kind="synth", config={"cases": cfg.cases, "test_cases": cfg.test_cases, "seed": cfg.seed}):
            summary = make_cohort(data, num_cases=cfg.cases, seed=cfg.seed, num_test_cases=cfg.test_cases, workers=cfg.workers)
            say(f"synthesized {len(summary.case_ids)} training + {len(summary.test_case_ids)} test cases → {data}")
    timings["data"] = time.perf_counter() - t

    t = stage("prepare")
    store = out / "store"
    prep_cfg = PrepareConfig(data=str(data), store=str(store), spacing=train_cfg.spacing, workers=cfg.workers,
                             num_folds=cfg.folds, seed=cfg.seed, test_fraction=cfg.test_fraction, clip_percentiles=tuple(cfg.clip),
                             pet_clip_percentiles=tuple(cfg.pet_clip) if cfg.pet_clip else None,
                             hot_background=cfg.hot_background, pet_wide=cfg.pet_wide)
    with step_context(registry, cfg.run, "prepare", kind="prepare", config=prep_cfg.to_json()):
        result = prepare(prep_cfg, on_skip=lambda c, r: warn(f"{c}: {r}"))
        registry.update_step(cfg.run, "prepare", metrics={"cases": len(result.prepared) + len(result.reused), "skipped": len(result.skipped)})
    say(f"prepared {len(result.prepared) + len(result.reused)} cases at {train_cfg.spacing} mm; test {len(result.splits['test'])}")
    timings["prepare"] = time.perf_counter() - t

    folds = list(range(len(result.splits["seg_folds"])))[: cfg.train_folds]
    launches = demo_launches(cfg, len(folds), train_cfg.batch_size, cls_jobs=len(folds) * len(train_cfg.cls_projections))
    if launches.seg_batch != train_cfg.batch_size:  # the preset's patches a step, shared among a fold's processes
        train_cfg = replace(train_cfg, batch_size=launches.seg_batch)
    t = stage("train segmentation and classifier folds")  # the budget's probe counts as training time
    positive = case_labels(store)
    calibrated = [c for c in result.splits["test"] if cfg.calibrate_negatives or positive.get(c, True)]
    scans = len(calibrated) + (len(input_cases(data)) if (data / "imagesTs").is_dir() else 0)  # predict's own list
    train_cfg, budget = fit_budget(cfg, train_cfg, store, folds, launches, elapsed_s=t - t_demo, infer_scans=scans, say=say, warn=warn)
    run_config = {"store": str(store.resolve()), "preset": cfg.preset}
    # A budgeted demo replans the classifier once the segmentation folds have shown the machine's
    # pace (unless they were resumed, or retrain-merged follows). Otherwise both tasks share one
    # queue when they launch alike, so a classifier fold fills a core a segmentation fold leaves idle.
    # With one round of segmentation folds their steps also get a deadline (`LoopConfig.deadline`).
    replan = (budget is not None and not cfg.retrain_merged and "seg_steps_estimate_s" in budget
              and not _seg_started(Path(home) / "runs" / cfg.run))
    for tasks in ((("seg", "cls"),) if launches.shared and not replan else (("seg",), ("cls",))):
        deadline = None
        if replan and tasks == ("cls",):
            train_cfg, budget = replan_classifier(cfg, train_cfg, budget, seg_stage_s=time.perf_counter() - t_seg,
                                                  elapsed_s=time.perf_counter() - t_demo, say=say, home=Path(home))
        elif replan and budget["seg_rounds"] == 1:
            deadline = time.time() + seg_deadline(budget, elapsed_s=time.perf_counter() - t_demo)
        t_seg = time.perf_counter()
        code = train_folds(train_cfg, store, tasks, folds, run=cfg.run, home=home, launch=launches.cls if tasks == ("cls",) else launches.seg,
                           say=say, warn=warn, run_config=run_config, deadline=deadline)
        if code:
            raise PetctlError(f"training folds failed with status {code} (re-run `petctl demo` to resume)")
    timings["train"] = time.perf_counter() - t

    t = stage("calibrate")
    run_dir = Path(home) / "runs" / cfg.run
    with step_context(registry, cfg.run, "calibrate", kind="calibrate", config={"tta": cfg.tta, "gate_margin": cfg.gate_margin,
                                                                            "gate_positives": cfg.gate_positives, "urine_veto": cfg.urine_veto,
                                                                            "negatives": cfg.calibrate_negatives, "resample": cfg.prob_resample}):
        thresholds = calibrate(run_dir, tta=cfg.tta, gate_margin=cfg.gate_margin, gate_positives=cfg.gate_positives,
                               urine_veto=cfg.urine_veto, negatives=cfg.calibrate_negatives, resample=cfg.prob_resample,
                               on_skip=lambda c, r: warn(f"{c}: {r}"))
        seg, cls = thresholds["segmentation"], thresholds["classifier"]
        ext = seg.get("extent") or {}
        registry.update_step(cfg.run, "calibrate", metrics={"seg_threshold": seg["threshold"], "seed_threshold": seg["seed_threshold"],
                                                            "test_dice": seg["mean_dice"], "test_fpv_ml_negatives": ext.get("mean_fpv_ml_negatives"),
                                                            "test_fnv_ml": ext.get("mean_fnv_ml"),
                                                            "cls_threshold": cls["threshold"], "cls_auroc": cls["auroc"]})
    timings["calibrate"] = time.perf_counter() - t

    predict_run = cfg.run
    if cfg.retrain_merged:
        t = stage("retrain-merged")
        predict_run = f"{cfg.run}-merged"
        folds = list(range(len(result.splits["merged_seg_folds"])))[: cfg.train_folds]
        for tasks in ((("seg", "cls"),) if launches.shared else (("seg",), ("cls",))):
            code = train_folds(train_cfg, store, tasks, folds, run=predict_run, home=home, merged=True,
                               launch=launches.cls if tasks == ("cls",) else launches.seg, say=say, warn=warn,
                               run_config={"store": str(store.resolve()), "parent": cfg.run}, parent=cfg.run)
            if code:
                raise PetctlError(f"retraining merged folds failed with status {code}")
        shutil.copy2(run_dir / "thresholds.json", Path(home) / "runs" / predict_run / "thresholds.json")
        timings["retrain_merged"] = time.perf_counter() - t

    evaluation = None
    if (data / "imagesTs").is_dir():
        t = stage("predict (held-out imagesTs)")
        predictions = out / "predictions"
        step = "predict-demo"
        with step_context(registry, predict_run, step, kind="predict", config={"input": str(data), "output": str(predictions)}):
            pred = predict(Path(home) / "runs" / predict_run, data, predictions, PredictOptions(gate=True),
                           on_skip=lambda c, r: warn(f"{c}: {r}"))
            write_summary(predictions, pred)
            gated = sum(r["gated"] for r in pred.written.values())
            registry.update_step(predict_run, step, metrics={"cases": len(pred.written), "gated": gated, "skipped": len(pred.skipped)})
        timings["predict"] = time.perf_counter() - t
        if (data / "labelsTs").is_dir():
            t = stage("evaluate")
            with step_context(registry, predict_run, "evaluate-demo", kind="evaluate", config={}):
                evaluation = evaluate_folders(data / "labelsTs", predictions)
                write_csv(evaluation.cases, out / "metrics.csv")
                s = evaluation.summary
                registry.update_step(predict_run, "evaluate-demo", metrics={"dice": s.mean_dice, "fpv_ml_negatives": s.mean_fpv_ml_negative,
                                                                             "fnv_ml": s.mean_fnv_ml, "cases": s.num_cases})
            timings["evaluate"] = time.perf_counter() - t

    t = stage("report")
    summary = write_report(out, run_dir=run_dir, predict_run_dir=Path(home) / "runs" / predict_run, data=data,
                           cfg=replace(cfg, processes=launches.seg.processes), thresholds=thresholds,
                           evaluation=evaluation, timings=timings, train_cfg=train_cfg, budget=budget)
    timings["report"] = time.perf_counter() - t
    summary["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    if budget:
        summary["budget"] = budget
    write_text_atomic(out / "summary.json", json.dumps(json_safe(summary), indent=2, allow_nan=False))
    return summary


DEMO_OPTIONS = "demo.json"
"""In OUT: the options a demo's results depend on, written by its first run; a re-run (a resume)
must ask for the same ones (`_check_resume`)."""
_NOT_RESULTS = ("out", "fresh", "workers")  # options that do not change what the demo computes


def _result_options(cfg: DemoConfig) -> dict[str, Any]:
    return json.loads(json.dumps({k: v for k, v in asdict(cfg).items() if k not in _NOT_RESULTS}))


def _check_resume(cfg: DemoConfig, registry: Any) -> None:
    """A re-run resumes what OUT and the run hold, so it must be the same demo: refuse (one line, before
    any work) other options than OUT's first run took (another --seed would keep the old cohort and
    then refuse its folds minutes later), or a run that belongs to another OUT (its folds trained on
    another store)."""
    out = Path(cfg.out)
    path = out / DEMO_OPTIONS
    if path.exists():
        try:
            before = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise PetctlError(f"{path}: cannot be read ({exc}); re-run with --fresh to start over") from None
        now = _result_options(cfg)
        changed = [k for k in now if k in before and before[k] != now[k]]
        if changed:
            k = changed[0]
            raise PetctlError(f"{out} holds a demo started with {k}={before[k]!r}, and this run asks {k}={now[k]!r}: "
                              "re-run with its options to resume it, or add --fresh to start over (or choose another --out)")
    try:
        run = registry.run(cfg.run)
    except PetctlError:
        return  # no such run yet
    theirs = (run.config or {}).get("store")
    ours = str((out / "store").resolve())
    if theirs and theirs != ours:
        raise PetctlError(f"run {cfg.run!r} belongs to another demo (its store {theirs}): choose another --run, "
                          f"or add --fresh to replace it")


def _check_fresh_out(cfg: DemoConfig, home: Path) -> None:
    """--fresh deletes OUT: only an empty folder or an earlier demo's, and never one holding the data or the home."""
    out = Path(cfg.out).resolve()
    if not out.exists():
        return
    if not out.is_dir():
        raise PetctlError(f"{cfg.out}: not a folder")
    for name, inside in (("--data", Path(cfg.data).resolve() if cfg.data else None), ("the petctl home", Path(home).resolve())):
        if inside is not None and (inside == out or out in inside.parents):
            raise PetctlError(f"--fresh would delete {cfg.out}, which holds {name} ({inside}): choose another --out")
    marks = (DEMO_OPTIONS, "budget.json", "summary.json", "report.md", "store", "raw/synth.json")
    if any(out.iterdir()) and not any((out / m).exists() for m in marks):
        raise PetctlError(f"--fresh would delete {cfg.out}, which is not an earlier demo's folder (no {DEMO_OPTIONS}, "
                          "store/ or report.md in it): choose another --out")


def fit_budget(cfg: DemoConfig, train_cfg: Any, store: Path, folds: list[int], launches: DemoLaunch, *, elapsed_s: float,
               infer_scans: int, say: Callable[[str], Any], warn: Callable[[str], Any]) -> tuple[Any, dict[str, Any] | None]:
    """The preset with its epochs cut to `cfg.budget_min` on this machine (`petctl.engine.budget`), and
    the plan (None: no budget, or a GPU). `infer_scans`: the scans calibrate and predict may segment
    (the plan counts each with every fold of the ensemble).
    The plan is kept in OUT/budget.json, so a resumed demo trains what the interrupted one started."""
    from petctl.engine.budget import CLS_CORE_SHARE, DemoCost, core_cls_epochs, describe_plan, fit_epochs, probe_seg_step
    from petctl.engine.config import with_overrides
    from petctl.engine.folds import gpu_count
    from petctl.engine.sampling import batches_per_epoch
    from petctl.engine.trainer import read_fold

    if not cfg.budget_min or gpu_count():
        return train_cfg, None
    path = Path(cfg.out) / "budget.json"
    try:
        plan = json.loads(path.read_text()) if path.exists() else None
        needed = {"seg_epochs", "cls_epochs", "fits", "budget_min", "step_s", "estimate_s", "preset_seg_epochs", "preset_cls_epochs"}
        plan = plan if isinstance(plan, dict) and needed <= plan.keys() else None
    except (OSError, ValueError):
        plan = None  # unreadable: plan again
    if plan is None:
        infer_scans *= 4 if cfg.tta else 1  # flip TTA: each scan through each fold 4 times (counted whole: the passes dominate)
        seg_cfg = train_cfg.with_image_channels(3 if cfg.pet_wide else 2)
        train, val = read_fold(store, folds[0])
        trainings = 2 if cfg.retrain_merged else 1

        def rounds(runs: int, launch: Any) -> int:  # fold runs one after another, each training
            return trainings * -(-runs // max(1, launch.concurrent))

        seg, procs = launches.seg, max(1, launches.seg.processes)
        seg_rounds, cls_rounds = rounds(len(folds), seg), rounds(len(train_cfg.cls_projections) * len(folds), launches.cls)
        step_s = probe_seg_step(seg_cfg, concurrent=min(seg.concurrent, len(folds)) * procs)  # as the folds run

        def steps_per_epoch(num_train: int) -> int:
            return batches_per_epoch(num_train, procs, train_cfg.patches_per_scan, train_cfg.batch_size, train_cfg.num_workers)

        seg_steps = steps_per_epoch(len(train))
        if cfg.retrain_merged:  # the merged folds train on the test split too: the two trainings' mean epoch
            seg_steps = -(-(seg_steps + steps_per_epoch(len(read_fold(store, folds[0], merged=True)[0]))) // 2)
        # a classifier epoch of a several-view model ("xy") is that many views' work, on the threads its lone job has; the lesion-map head costs more
        views = max(len(p) for p in train_cfg.cls_projections)
        threads = min(views, launches.cls.threads or 1)
        head = DemoCost().lesion_map if train_cfg.cls_head == "lesion_map" else 1.0
        cost = replace(DemoCost(), cls_epoch=DemoCost().cls_epoch * head * views / (1.0 + CLS_THREAD_GAIN * (threads - 1)))
        fit = fit_epochs(budget_s=cfg.budget_min * 60, elapsed_s=elapsed_s, step_s=step_s, seg_epochs=train_cfg.epochs_per_cycle,
                         cls_epochs=train_cfg.cls_epochs_per_cycle, seg_steps_per_epoch=seg_steps,
                         num_val_cases=-(-len(val) // procs), seg_rounds=seg_rounds, cls_rounds=cls_rounds,
                         infer_scans=infer_scans * len(folds), batch_size=train_cfg.batch_size, seg_processes=procs,
                         max_share=cfg.stretch, cls_core_share=CLS_CORE_SHARE, cost=cost)
        plan = {"budget_min": cfg.budget_min, "step_s": round(step_s, 3), "estimate_s": round(fit.estimate_s, 1), "fits": fit.fits,
                "seg_epochs": fit.seg_epochs, "cls_epochs": fit.cls_epochs,
                "preset_seg_epochs": train_cfg.epochs_per_cycle, "preset_cls_epochs": train_cfg.cls_epochs_per_cycle,
                "max_cls_epochs": fit.max_cls_epochs, "core_cls_epochs": core_cls_epochs(train_cfg.cls_epochs_per_cycle, CLS_CORE_SHARE),
                # what replan_classifier needs: the segmentation stage's estimate and the cost model's inputs after it
                "seg_stage_estimate_s": round(fit.seg_stage_s, 1), "seg_steps_estimate_s": round(fit.seg_steps_s, 1),
                "unit_s": step_s * DemoCost().batch_size / train_cfg.batch_size, "seg_rounds": seg_rounds,
                "cls_rounds": cls_rounds, "infer_scans": infer_scans * len(folds), "seg_processes": procs,
                "cls_epoch_cost": round(cost.cls_epoch, 3)}
        from petctl.engine.registry import write_text_atomic

        write_text_atomic(path, json.dumps(plan, indent=2))
    seg, cls = plan["seg_epochs"], plan["cls_epochs"]
    (say if plan["fits"] else warn)(describe_plan(plan))
    train_cfg = with_overrides(with_overrides(train_cfg, epochs=seg), task="cls", epochs=cls)
    return train_cfg, plan


def _seg_started(run_dir: Path) -> bool:
    """Whether a segmentation fold of this run has a checkpoint already (a resumed demo)."""
    return any((run_dir / "seg").glob("*/checkpoints/last"))


def _low_cls(plan: dict[str, Any]) -> int:
    """The classifier's epochs at the common share of the plan's segmentation epochs (of its core
    epochs, `budget.CLS_CORE_SHARE`; a plan made before them scaled all of the preset's)."""
    from petctl.engine.budget import shared_cls_epochs

    core = plan.get("core_cls_epochs", plan["preset_cls_epochs"])
    return min(shared_cls_epochs(core, plan["seg_epochs"], plan["preset_seg_epochs"]), plan.get("max_cls_epochs", plan["preset_cls_epochs"]))


def seg_deadline(plan: dict[str, Any], *, elapsed_s: float) -> float:
    """Seconds from now by which the segmentation folds' steps should end (`budget.seg_deadline_s`)."""
    from petctl.engine.budget import seg_deadline_s

    return seg_deadline_s(budget_s=plan["budget_min"] * 60, elapsed_s=elapsed_s, seg_steps_s=plan["seg_steps_estimate_s"],
                          seg_stage_s=plan["seg_stage_estimate_s"], unit_s=plan["unit_s"], low=_low_cls(plan),
                          cls_rounds=plan["cls_rounds"], infer_scans=plan["infer_scans"])


def _fold_steps(run_dir: Path) -> tuple[float | None, int, int]:
    """(mean seconds a step, steps run, steps planned) over the run's segmentation folds' last cycles
    (`metrics.json`); (None, 0, 0) when none recorded its time a step."""
    seconds, run, planned = [], 0, 0
    for path in sorted((run_dir / "seg").glob("*/metrics.json")):
        try:
            cycle = json.loads(path.read_text())["cycles"][-1]
        except (OSError, ValueError, KeyError, IndexError):
            continue
        if cycle.get("step_seconds"):
            seconds.append(float(cycle["step_seconds"]))
            cut = cycle.get("deadline_cut") or {}
            run += int(cut.get("steps", cycle.get("global_step", 0)))
            planned += int(cut.get("planned_steps", cycle.get("global_step", 0)))
    return (sum(seconds) / len(seconds) if seconds else None), run, planned


def replan_classifier(cfg: DemoConfig, train_cfg: Any, plan: dict[str, Any], *, seg_stage_s: float, elapsed_s: float,
                      say: Callable[[str], Any], home: Path | None = None) -> tuple[Any, dict[str, Any]]:
    """The preset with the classifier epochs replanned now that the segmentation folds are done
    (`budget.replan_cls_epochs`: between the common share of the plan's segmentation epochs and the
    preset's), at the pace their steps ran against the probe's (their `metrics.json`; without it, their
    `seg_stage_s` against the plan's estimate of it), and the plan with the replan recorded
    (OUT/budget.json; a resumed demo keeps it)."""
    from petctl.engine.budget import DemoCost, describe_replan, replan_cls_epochs, seg_step_cost
    from petctl.engine.config import with_overrides

    if "cls_replan" not in plan:
        step_s, run, planned = _fold_steps(Path(home) / "runs" / cfg.run) if home is not None else (None, 0, 0)
        pace = (step_s / (plan["step_s"] * seg_step_cost(plan.get("seg_processes", 1))) if step_s and plan["step_s"] > 0
                else seg_stage_s / plan["seg_stage_estimate_s"])
        cls = replan_cls_epochs(budget_s=plan["budget_min"] * 60, elapsed_s=elapsed_s, pace=pace, unit_s=plan["unit_s"],
                                low=_low_cls(plan), high=plan.get("max_cls_epochs", plan["preset_cls_epochs"]), cls_rounds=plan["cls_rounds"],
                                infer_scans=plan["infer_scans"],
                                cost=replace(DemoCost(), cls_epoch=plan.get("cls_epoch_cost", DemoCost().cls_epoch)))
        replan = {"planned_cls_epochs": plan["cls_epochs"], "seg_stage_s": round(seg_stage_s, 1), "pace": round(pace, 3),
                  "elapsed_s": round(elapsed_s, 1)}
        if run < planned:
            replan.update(seg_steps_run=run, seg_steps_planned=planned)
        plan = {**plan, "cls_epochs": cls, "cls_replan": replan}
        from petctl.engine.registry import write_text_atomic

        write_text_atomic(Path(cfg.out) / "budget.json", json.dumps(plan, indent=2))
    say(describe_replan(plan))
    return with_overrides(train_cfg, task="cls", epochs=plan["cls_epochs"]), plan

"""`petctl calibrate`: the ensemble's thresholds, chosen on the held-out test set.

Segmentation: the fold ensemble (mean of sigmoid probabilities) predicts the test positives on the
stored grid; the threshold maximizing the mean per-case Dice over a 0.01 grid is chosen (with
`component_seed`, jointly with a component seed — hysteresis: a connected component of
`p >= threshold` is kept only when it holds a voxel `p >= seed`; seed 0 keeps all).
With `pet_extent` (the default) the threshold is chosen for what predict then does: each component
of `p >= threshold` redrawn at its PET half maximum (`extent.pet_extent_mask`), scored on each
case's own input grid against its NIfTI label (so the prepared cohort's files must still be
there). The rule is the one-standard-error rule toward the preset's threshold prior
(`choose_extent_threshold`): a test split of ~15 positives cannot tell thresholds apart whose mean
Dice differs by less than its standard error, so among those within one standard error of the best
the one nearest the prior is taken (without a prior: the best). An optional budget first keeps
only thresholds whose mean false-positive volume over the test negatives (the gate's first: a
gated negative costs 0) and mean false-negative volume over the test positives stay within it.
Without a budget that FPV curve over the test negatives is drawn for the reader only; `negatives=False`
(the demo's) skips segmenting them, half of calibrate's time (`petctl demo` measures the FPV on its
held-out imagesTs negatives instead).
The paper's plain threshold, on the input grid, is recorded beside it.
Each fold's own best validation threshold (the paper's Table 1) is recorded with the ensemble's
Dice at it. Classifier: the ensemble (folds × projections, mean probability) scores the test
positives and negatives; the threshold is the highest value that still keeps sensitivity 1.0 (the
paper), times `gate_margin` (1 by default; the demo takes half, README). With `gate_positives=
"detected"` (the demo's) the sensitivity counts only the test positives whose lesions the ensemble's
mask at the chosen threshold touches (Dice > 0): a positive the segmentation misses anyway keeps an
empty mask whether the gate stops it or not, so it need not hold the gate down for every healthy scan.
Writes `thresholds.json` (versioned) and two PNGs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from petctl.engine.figures import save_figure
from petctl.errors import PetctlError, case_reason

THRESHOLDS_VERSION = 1
VOLUME_BUDGET_ML = float("inf")
"""Default error-volume budget of the PET-extent threshold (mL): the mean false-positive volume over
the test negatives (gated ones count 0) and the mean false-negative volume over the test positives.
Off by default: on 11 demo seeds a 5 mL budget on the small test split moved the threshold away from
the held-out optimum more often than it kept error volumes down."""


def check_gate_margin(margin: float) -> None:
    """`--gate-margin` must be within (0, 1]: one line, before any work starts (calibrate, demo)."""
    if not 0.0 < margin <= 1.0:
        raise PetctlError(f"--gate-margin: expected a number in (0, 1], got {margin:g}")


GATE_POSITIVES = ("all", "detected")


def check_gate_positives(mode: str) -> None:
    """`--gate-positives` must be one of GATE_POSITIVES: one line, before any work starts."""
    if mode not in GATE_POSITIVES:
        raise PetctlError(f"--gate-positives: expected one of {', '.join(GATE_POSITIVES)}, got {mode!r}")


def gate_rule_text(cls: dict[str, Any]) -> str:
    """How the gate's threshold was chosen, for the report and calibrate's table."""
    margin = cls.get("margin", 1.0)
    detected = cls.get("gate_positives") == "detected"
    if margin == 1.0 and not detected:
        return "sensitivity 1.0"
    which = "detected " if detected and not cls.get("gate_fell_back_to_all") else ""
    score = cls.get("gate_positive_score", cls["lowest_positive_score"])
    return f"{margin:g} × the lowest {which}test positive's score {score:.4f}"


def detected_gate_threshold(per_case: dict[str, dict[str, Any]], margin: float) -> tuple[float, float, int] | None:
    """The gate over the test positives the segmentation finds (`dice_at_threshold` > 0):
    (threshold, the lowest such positive's score, how many positives were left out). None when no
    positive is found at all (the gate then counts every positive, as the paper does)."""
    from petctl.engine.metrics import classifier_threshold

    rows = list(per_case.values())
    found = np.array([r["positive"] and r.get("dice_at_threshold", 0.0) > 0.0 for r in rows], bool)
    if not found.any():
        return None
    scores = np.array([r["cls_score"] for r in rows], float)
    missed = sum(1 for r in rows if r["positive"]) - int(found.sum())
    return classifier_threshold(found, scores, margin), float(scores[found].min()), missed


def calibrate(run_dir: Path, *, on_case: Callable[[str], None] | None = None, gate: bool = True,
              component_seed: bool = False, pet_extent: bool = True, volume_budget_ml: float = VOLUME_BUDGET_ML,
              threshold_prior: float | str | None = "preset", tta: bool = False, gate_margin: float = 1.0,
              gate_positives: str = "all", urine_veto: bool = False, negatives: bool = True,
              resample: str = "linear", on_skip: Callable[[str, str], None] | None = None) -> dict[str, Any]:
    """Compute and write `run_dir/thresholds.json`; returns its payload.

    `pet_extent` chooses the threshold for PET-extent predictions (module doc): within one standard
    error of the best Dice (inside `volume_budget_ml` of mean FPV on test negatives and mean FNV on
    test positives, when any threshold is), the one nearest `threshold_prior` ("preset": the run's
    `extent_threshold_prior`; None: the best Dice). Without it the paper's plain threshold is chosen
    on the stored grid. `component_seed` (only without `pet_extent`) adds the seed grid to the search.
    `tta` averages each fold over flips as well (`RunModels.seg_probs`); the thresholds file records it
    and predict then flips too, so the threshold is applied to the probabilities it was chosen on.
    `gate_margin` in (0, 1] scales the classifier's sensitivity-1.0 threshold (`metrics.classifier_threshold`);
    `gate_positives="detected"` counts only the positives the segmentation finds (module doc). The
    negatives between the two gates are segmented (the segmentation threshold does not depend on
    them unless a volume budget is set, which then sees them) and count as stopped in what is written.
    `negatives=False` segments no test negative (no FPV curve: its entries are None); a volume budget
    needs them.
    `urine_veto` (only with `pet_extent`) drops the components that lie mostly in urine on the CT
    (`petctl.engine.urine`) before each case is scored; predict then drops them too.
    `resample` (with `pet_extent`): how the ensemble's probabilities reach the input grid before the
    components are detected — "linear" (trilinear) or "nearest" (each input voxel keeps the value of
    the stored voxel it lies in, so a lesion's peak is not averaged under the threshold); recorded in
    the extent, and predict resamples alike.
    A test case that cannot be read (its stored arrays, its NIfTI files, a label that no longer
    agrees with the store) is left out of everything, classifier gate included: `on_skip(case, reason)`
    is called, the thresholds come from the other cases, and `skipped_cases` records it. With no test
    positive left, PetctlError.
    """
    from petctl.engine.geometry import check_resample

    check_resample(resample)
    check_gate_margin(gate_margin)
    check_gate_positives(gate_positives)
    if pet_extent and component_seed:
        raise PetctlError("the component seed and the PET extent are alternatives: turn the PET extent off to seed components")
    if urine_veto and not pet_extent:
        raise PetctlError("the urine veto reads the CT of the input grid, as the PET extent does: keep --pet-extent to use --urine-veto")
    if not negatives and np.isfinite(volume_budget_ml):
        raise PetctlError("a volume budget weighs the test negatives' false-positive volume: keep --negatives to use --volume-budget-ml")
    if not pet_extent:  # options of the PET extent's threshold choice, which --no-pet-extent would quietly ignore
        given = [name for name, off in (("--volume-budget-ml", np.isfinite(volume_budget_ml)), ("--resample nearest", resample != "linear"),
                                        ("--threshold-prior", threshold_prior != "preset"), ("--no-negatives", not negatives)) if off]
        if given:
            raise PetctlError(f"{given[0]} belongs to the PET extent's threshold choice: keep --pet-extent to use it")
    from petctl.engine.ensemble import RunModels
    from petctl.engine.metrics import (
        SEED_THRESHOLDS,
        THRESHOLDS,
        auroc,
        best_seeded_threshold,
        best_threshold,
        classifier_threshold,
        dice_sweep,
        seeded_dice_grid,
        specificity_at,
    )
    from petctl.engine.extent import FRACTION, GROW_VOXELS, REFINE_THRESHOLDS, SHELL
    from petctl.engine.store import CaseStore, write_json_atomic
    from petctl.engine.urine import UrineVeto

    veto = UrineVeto() if urine_veto else None
    t0 = time.perf_counter()
    models = RunModels.load(run_dir, need_cls=gate)
    assert models.store is not None
    store = CaseStore(models.store)
    manifest = json.loads((models.store / "manifest.json").read_text())["cases"]
    splits = json.loads((models.store / "splits.json").read_text())
    test = [c for c in splits["test"] if c in manifest]
    positives = [c for c in test if manifest[c]["positive"]]
    if not positives:
        raise PetctlError(f"{models.store}: the test set has no positive case to calibrate the segmentation threshold on")
    per_case: dict[str, dict[str, Any]] = {c: {"positive": bool(manifest[c]["positive"])} for c in test}
    skipped: dict[str, str] = {}

    def skip(case: str, exc: BaseException) -> None:
        skipped[case] = case_reason(case, exc)
        per_case.pop(case, None)
        if on_skip:
            on_skip(case, skipped[case])

    def gate_threshold() -> float:
        kept = [c for c in test if c not in skipped]
        return classifier_threshold(np.array([per_case[c]["positive"] for c in kept], bool),
                                    np.array([per_case[c]["cls_score"] for c in kept], float), gate_margin)

    cls_thr = None
    if gate and models.cls:  # first the gate: negatives it stops cost no segmentation here, as in predict
        for case in test:
            try:
                score = models.cls_score(torch.from_numpy(store.load(case).image.read_all()[1]).float())
                if not np.isfinite(score):
                    raise PetctlError(f"{case}: the classifier scored it {score} (a NaN or infinite PET in the store?)")
                per_case[case]["cls_score"] = float(score)
            except Exception as exc:  # noqa: BLE001 — one unreadable case is that case's line, the others go on
                skip(case, exc)
        _check_positives_left(models.store, per_case, skipped)
        cls_thr = gate_threshold()
    segmented = [c for c in test if c not in skipped and (per_case[c]["positive"]
                 or (pet_extent and negatives and (cls_thr is None or per_case[c]["cls_score"] >= cls_thr)))]
    sources = _sources(models.store, segmented) if pet_extent else {}
    extent_tables, input_curves = [], []  # extent_tables: (case, positive, table) per segmented case

    seeds = SEED_THRESHOLDS if component_seed else SEED_THRESHOLDS[:1]  # [0.0]: every component kept
    ensemble_tables, fold_curves = [], {m.name: [] for m in models.seg}
    for case in test:
        if case in skipped:
            continue
        row = per_case[case]
        if case in segmented:
            try:  # everything of one case first, so a case that fails half-way leaves nothing behind
                if case not in sources and pet_extent:
                    raise PetctlError(f"{case}: not in the prepared cohort's folder any more")
                stored = store.load(case)
                image = torch.from_numpy(stored.image.read_all()).float()
                fold_probs = models.fold_probs(image, tta=tta)
                ensemble = np.mean(fold_probs, axis=0)
                table = own = ext = plain = None
                if row["positive"]:
                    label = stored.label.read_all()
                    table = seeded_dice_grid(label, ensemble, THRESHOLDS, seeds)
                    own = [dice_sweep(label, p, THRESHOLDS) for p in fold_probs]
                if pet_extent:
                    ext, plain = _input_grid_curves(case, sources[case], stored.attrs["geometry"], ensemble, row["positive"], veto,
                                                    resample)
            except Exception as exc:  # noqa: BLE001 — as above
                skip(case, exc)
            else:
                if table is not None:
                    ensemble_tables.append(table)
                    for m, curve in zip(models.seg, own):
                        fold_curves[m.name].append(curve)
                    row["dice_table"] = table
                if ext is not None:
                    extent_tables.append((case, row["positive"], ext))
                    if row["positive"]:
                        input_curves.append(plain)
                    row["extent_table"] = ext
        if on_case:
            on_case(case)
    _check_positives_left(models.store, per_case, skipped)
    test = [c for c in test if c not in skipped]
    positives = [c for c in positives if c not in skipped]
    gate_before = cls_thr
    if cls_thr is not None and skipped:  # a skipped positive may have held the gate down
        cls_thr = gate_threshold()

    mean_table = np.nanmean(np.array(ensemble_tables), axis=0)
    mean_curve = mean_table[:, 0]  # seed 0: every component kept (the paper's plain threshold)
    seg_thr, seed_thr, seg_dice = best_seeded_threshold(mean_table, THRESHOLDS, seeds)
    seed_col = int(np.argmin(np.abs(seeds - seed_thr)))
    plain_thr, plain_dice = best_threshold(mean_curve, THRESHOLDS)
    folds = []
    for m in models.seg:
        own = np.nanmean(np.array(fold_curves[m.name]), axis=0)
        ft, fd = best_threshold(own, THRESHOLDS)
        entry = {"fold": m.name, "val_threshold": m.val_threshold, "test_best_threshold": ft, "test_dice_alone": fd}
        if m.val_threshold is not None:
            idx = int(np.argmin(np.abs(THRESHOLDS - m.val_threshold)))
            entry["ensemble_dice_at_val_threshold"] = float(mean_curve[idx])
        folds.append(entry)
    extent: dict[str, Any] | None = None
    if pet_extent:
        pos = np.array([t for _, p, t in extent_tables if p])
        num_negatives = sum(not per_case[c]["positive"] for c in test)  # gated ones count with no false positive
        measured = negatives and num_negatives > 0  # no test negative (left): their FPV is not measured, not 0
        if np.isfinite(volume_budget_ml) and not measured:
            raise PetctlError(f"{models.store}: a volume budget weighs the test negatives' false-positive volume, "
                              f"and the test split has none{' left' if skipped else ''}")
        fpv_neg = _negatives_fpv_curve(extent_tables, set(), num_negatives) if measured else np.full(len(REFINE_THRESHOLDS), np.nan)
        dice_curve, fnv_curve = np.nanmean(pos[:, :, 0], axis=0), pos[:, :, 2].mean(axis=0)
        prior = models.seg[0].cfg.extent_threshold_prior if threshold_prior == "preset" else threshold_prior
        # not measured: no budget either (checked above), so FPV does not enter the choice
        choice = choose_extent_threshold(REFINE_THRESHOLDS, pos[:, :, 0], np.nan_to_num(fpv_neg), fnv_curve, volume_budget_ml,
                                         None if prior is None else float(prior))
        ext_thr, ext_dice, budget_met = choice["threshold"], choice["mean_dice"], choice["budget_met"]
        in_thr, in_dice = best_threshold(np.nanmean(np.array(input_curves), axis=0), THRESHOLDS)
        i = int(np.argmin(np.abs(REFINE_THRESHOLDS - ext_thr)))
        extent = {
            "method": "pet_a50", "fraction": FRACTION, "grow_voxels": GROW_VOXELS, "shell_voxels": list(SHELL), "resample": resample,
            "thresholds": REFINE_THRESHOLDS.tolist(), "mean_dice_curve": _listed(dice_curve),
            "negatives_segmented": measured,
            "mean_fpv_ml_negatives_curve": _listed(fpv_neg) if measured else None, "mean_fnv_ml_curve": _listed(fnv_curve),
            "volume_budget_ml": float(volume_budget_ml) if np.isfinite(volume_budget_ml) else None, "budget_met": budget_met,
            "mean_fpv_ml_negatives": float(fpv_neg[i]) if measured else None, "mean_fnv_ml": float(fnv_curve[i]),
            "best_dice_unconstrained": float(np.nanmax(dice_curve)),
            "rule": "best_mean_dice" if choice["threshold_prior"] is None else "one_standard_error_toward_prior", "threshold_prior": choice["threshold_prior"],
            "best_threshold": choice["best_threshold"], "best_dice": choice["best_dice"],
            "dice_standard_error": choice["dice_standard_error"],
            "plain_on_input_grid": {"threshold": in_thr, "mean_dice": in_dice},
        }
    for row in per_case.values():
        if "dice_table" in row:
            row["dice_at_threshold"] = float(row.pop("dice_table")[int(np.argmin(np.abs(THRESHOLDS - seg_thr))), seed_col])
        if "extent_table" in row:
            d, fpv, fnv = row.pop("extent_table")[int(np.argmin(np.abs(REFINE_THRESHOLDS - ext_thr)))]
            row.update(fpv_ml_at_threshold=float(fpv), fnv_ml_at_threshold=float(fnv))
            if row["positive"]:
                row["dice_at_threshold"] = float(d)
    detected = None
    if cls_thr is not None and gate_positives == "detected":
        detected = detected_gate_threshold(per_case, gate_margin)
        if detected is not None and detected[0] > cls_thr:
            cls_thr = detected[0]
    if cls_thr is not None and gate_before is not None and cls_thr > gate_before:
        for row in per_case.values():  # negatives the final gate stops: no false positive in predict
            if not row["positive"] and row["cls_score"] < cls_thr and "fpv_ml_at_threshold" in row:
                row["fpv_ml_without_gate"] = row["fpv_ml_at_threshold"]
                row["fpv_ml_at_threshold"] = 0.0
        if extent is not None and extent["negatives_segmented"]:
            stopped = {c for c in test if not per_case[c]["positive"] and per_case[c]["cls_score"] < cls_thr}
            fpv_neg = _negatives_fpv_curve(extent_tables, stopped, num_negatives)
            extent["mean_fpv_ml_negatives_curve"] = _listed(fpv_neg)
            extent["mean_fpv_ml_negatives"] = float(fpv_neg[int(np.argmin(np.abs(REFINE_THRESHOLDS - ext_thr)))])

    payload: dict[str, Any] = {
        "version": THRESHOLDS_VERSION,
        "run": Path(run_dir).name,
        "store": str(models.store),
        "test_cases": test,
        "skipped_cases": skipped,
        "tta": bool(tta),
        "segmentation": {
            "threshold": float(seg_thr), "seed_threshold": float(seed_thr), "mean_dice": float(seg_dice),
            "num_positives": len(positives), "without_seed": {"threshold": plain_thr, "mean_dice": plain_dice},
            "thresholds": THRESHOLDS.tolist(), "mean_dice_curve": _listed(mean_curve),
            "seed_thresholds": seeds.tolist(),
            "best_dice_per_seed": [None if np.isnan(col).all() else float(np.nanmax(col)) for col in mean_table.T],
            "mean_dice_curve_at_seed": _listed(mean_table[:, seed_col]),
            "folds": folds,
            "extent": extent,
            "urine_veto": veto.to_json() if veto else None,
        },
        "classifier": None,
        "cases": per_case,
    }
    if extent is not None:  # predict draws PET extents at this threshold
        payload["segmentation"].update(threshold=float(ext_thr), mean_dice=float(ext_dice))
    if cls_thr is not None:
        labels = np.array([per_case[c]["positive"] for c in test], bool)
        scores = np.array([per_case[c]["cls_score"] for c in test], float)
        num_negatives = int((~labels).sum())
        gated = int(((scores < cls_thr) & ~labels).sum())
        payload["classifier"] = {
            "threshold": float(cls_thr), "margin": float(gate_margin), "lowest_positive_score": float(scores[labels].min()),
            "gate_positives": gate_positives,
            # "detected" with no positive found at all: the gate fell back to every positive (the paper's)
            "gate_fell_back_to_all": gate_positives == "detected" and detected is None,
            "gate_positive_score": float(detected[1]) if detected else float(scores[labels].min()),
            "positives_left_out": int(detected[2]) if detected else 0,
            "positives_below_threshold": int(((scores < cls_thr) & labels).sum()),
            "auroc": float(auroc(labels, scores)),
            "specificity": float(specificity_at(labels, scores, cls_thr)) if num_negatives else float("nan"),
            "negatives": num_negatives, "negatives_skipping_segmentation": gated, "positives": int(labels.sum()),
            "models": [m.name for m in models.cls],
        }
    payload["seconds"] = round(time.perf_counter() - t0, 2)
    plot_calibration(Path(run_dir), payload, fold_curves, THRESHOLDS)  # first: a failed plot leaves the thresholds as they were
    write_json_atomic(Path(run_dir) / "thresholds.json", payload)
    return payload


def _sources(store: Path, cases: list[str]) -> dict[str, Any]:
    """The NIfTI files the store was prepared from, for `cases` (the PET extent is scored on them)."""
    from petctl.engine.cohort import discover
    from petctl.engine.store import read_json

    prep = read_json(Path(store) / "prepare.json")["config"]
    data = Path(prep["data"])
    hint = "calibrate reads the prepared cohort's NIfTI files for the PET extent; --no-pet-extent calibrates without them"
    try:
        found = {s.case: s for s in discover(data, Path(prep["metadata"]) if prep.get("metadata") else None)}
    except PetctlError as exc:
        raise PetctlError(f"{exc} ({hint})") from None
    return {c: found[c] for c in cases if c in found}  # a case not found: calibrate skips it, by name


def _check_positives_left(store: Path, per_case: dict[str, dict[str, Any]], skipped: dict[str, str]) -> None:
    if skipped and not any(r["positive"] for r in per_case.values()):
        raise PetctlError(f"{store}: no test positive left to calibrate on ({len(skipped)} test case(s) skipped, "
                          f"first {next(iter(skipped))}: {next(iter(skipped.values()))})")


def _input_grid_curves(case: str, source: Any, geometry_json: dict[str, Any], ensemble: np.ndarray,
                       positive: bool, veto: Any = None, resample: str = "linear") -> tuple[np.ndarray, np.ndarray]:
    """One case on its input grid (the probabilities resampled by `resample`): the PET extent's (Dice,
    FPV, FNV) per REFINE_THRESHOLDS (after the urine veto, when given), and the plain threshold's Dice per THRESHOLDS."""
    from petctl.engine.evaluate import affine_voxel_ml
    from petctl.engine.extent import REFINE_THRESHOLDS, extent_curves
    from petctl.engine.geometry import CaseGeometry, spacing_of, to_original
    from petctl.engine.metrics import THRESHOLDS, dice_sweep
    from petctl.engine.nifti import load_case

    loaded = load_case(source, warn=False)
    label = loaded.label if loaded.label is not None else np.zeros(loaded.pet.shape, np.uint8)
    if bool(label.any()) != positive:
        raise PetctlError(f"{case}: its NIfTI label {'holds no' if positive else 'holds a'} lesion but the store says otherwise (was the cohort changed after prepare?)")
    probs = to_original(np.asarray(ensemble, np.float32), CaseGeometry.from_json(geometry_json), mode=resample)
    voxel_ml = affine_voxel_ml(loaded.affine)
    if veto is None or not bool((probs >= float(REFINE_THRESHOLDS.min())).any()):  # nothing the veto could drop
        curves = extent_curves(label, loaded.pet, probs, voxel_ml, REFINE_THRESHOLDS)
    else:
        from petctl.engine.urine import water_region

        curves = extent_curves(label, loaded.pet, probs, voxel_ml, REFINE_THRESHOLDS,
                               urine=water_region(loaded.ct, spacing_of(loaded.affine), veto), urine_fraction=veto.fraction)
    return curves, dice_sweep(label, probs, THRESHOLDS)


def _negatives_fpv_curve(tables: list[tuple[str, bool, np.ndarray]], stopped: set[str], negatives: int) -> np.ndarray:
    """Mean false-positive volume over the test negatives per REFINE_THRESHOLDS: `tables` are the
    segmented cases' (case, positive, extent table); a negative not segmented or in `stopped` (by
    the gate) counts 0, as in predict; no negative at all gives zeros."""
    from petctl.engine.extent import REFINE_THRESHOLDS

    total = sum((t[:, 1] for c, p, t in tables if not p and c not in stopped), np.zeros(len(REFINE_THRESHOLDS)))
    return total / max(negatives, 1)


def _listed(curve: np.ndarray) -> list[float | None]:
    return [None if not np.isfinite(v) else float(v) for v in curve]


def best_within_budget(thresholds: np.ndarray, dice: np.ndarray, fpv_ml: np.ndarray, fnv_ml: np.ndarray,
                       budget_ml: float) -> tuple[float, float, bool]:
    """(threshold, Dice, budget met): the best mean Dice among thresholds whose mean FPV (test
    negatives) and mean FNV (test positives) are both within `budget_ml`; when none is, the best
    Dice of all. Ties go to the lower threshold."""
    ok = (np.asarray(fpv_ml) <= budget_ml) & (np.asarray(fnv_ml) <= budget_ml) & np.isfinite(dice)
    scored = np.where(ok, dice, -np.inf) if ok.any() else np.where(np.isfinite(dice), dice, -np.inf)
    i = int(np.argmax(scored))
    return float(thresholds[i]), float(dice[i]), bool(ok.any())


def choose_extent_threshold(thresholds: np.ndarray, per_case_dice: np.ndarray, fpv_ml: np.ndarray, fnv_ml: np.ndarray,
                            budget_ml: float = VOLUME_BUDGET_ML, prior: float | None = None) -> dict[str, Any]:
    """The one-standard-error rule toward a prior for the PET-extent threshold.

    `per_case_dice` is (positives, thresholds). The best threshold is the best mean Dice
    (`best_within_budget`: inside the budget when any threshold is). Its standard error is the
    per-case Dice's standard deviation over sqrt(positives) at that threshold; every threshold whose
    mean Dice is within one standard error of the best (and inside the budget) is as good as the
    test split can tell, and the one nearest `prior` is chosen (ties: the lower). With ~15 test
    positives the band is wide and the prior decides; with hundreds it narrows to the best.
    Without a prior the best is chosen."""
    thresholds = np.asarray(thresholds, float)
    table = np.asarray(per_case_dice, float)
    mean = np.nanmean(table, axis=0)
    best_t, best_d, met = best_within_budget(thresholds, mean, fpv_ml, fnv_ml, budget_ml)
    best = int(np.argmin(np.abs(thresholds - best_t)))
    column = table[:, best][np.isfinite(table[:, best])]
    se = float(np.std(column, ddof=1) / np.sqrt(column.size)) if column.size > 1 else 0.0
    eligible = np.isfinite(mean)
    if met:
        eligible &= (np.asarray(fpv_ml) <= budget_ml) & (np.asarray(fnv_ml) <= budget_ml)
    chosen = best
    if prior is not None:
        near = eligible & (mean >= best_d - se)
        chosen = int(np.argmin(np.where(near, np.abs(thresholds - prior), np.inf)))
    return {"threshold": float(thresholds[chosen]), "mean_dice": float(mean[chosen]), "budget_met": met,
            "best_threshold": best_t, "best_dice": best_d, "dice_standard_error": se,
            "threshold_prior": None if prior is None else float(prior)}


def plot_calibration(run_dir: Path, payload: dict[str, Any], fold_curves: dict[str, list[np.ndarray]], thresholds: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def values(curve: list[float | None]) -> list[float]:
        return [np.nan if v is None else v for v in curve]

    seg = payload["segmentation"]
    ext = seg.get("extent")
    fig, axes = plt.subplots(1, 2 if ext else 1, figsize=(11 if ext else 6, 4), squeeze=False)
    ax = axes[0, 0]
    for name, curves in fold_curves.items():
        ax.plot(thresholds, np.nanmean(np.array(curves), axis=0), lw=1, alpha=0.6, label=name)
    ax.plot(thresholds, values(seg["mean_dice_curve"]), "k-", lw=2.5, label="ensemble, plain threshold")
    seed = seg.get("seed_threshold") or 0.0
    if seed > 0:
        ax.plot(thresholds, values(seg["mean_dice_curve_at_seed"]), "r--", lw=2, label=f"ensemble, components seeded at {seed:.2f}")
    if ext:
        ax.plot(ext["thresholds"], values(ext["mean_dice_curve"]), "r-", lw=2, label="ensemble, PET extent (input grid)")
        if ext.get("best_dice") is not None and ext.get("threshold_prior") is not None:
            ax.axhspan(ext["best_dice"] - ext["dice_standard_error"], ext["best_dice"], color="r", alpha=0.12,
                       label=f"within 1 SE of the best ({ext['best_threshold']:.2f})")
            ax.axvline(ext["threshold_prior"], color="r", ls=":", lw=1, label=f"prior {ext['threshold_prior']:.2f}")
    ax.plot([seg["threshold"]], [seg["mean_dice"]], "r*", ms=14,
            label=f"chosen {seg['threshold']:.3g}{f' / seed {seed:.2f}' if seed > 0 else ''} (Dice {seg['mean_dice']:.3f})")
    ax.set(xlabel="threshold", ylabel="mean Dice over test positives", title="Segmentation threshold", ylim=(0, 1))
    ax.legend(fontsize=7, loc="lower center")
    if ext:
        ax = axes[0, 1]
        fpv_curve = ext.get("mean_fpv_ml_negatives_curve")
        if fpv_curve is not None:
            ax.plot(ext["thresholds"], values(fpv_curve), "m-", lw=2, label="FPV, test negatives (gated: 0)")
        ax.plot(ext["thresholds"], values(ext["mean_fnv_ml_curve"]), "c-", lw=2, label="FNV, test positives")
        budget = ext["volume_budget_ml"]
        if budget is not None:
            ax.axhline(budget, color="k", ls=":", lw=1, label=f"budget {budget:g} mL")
        ax.axvline(seg["threshold"], color="r", lw=1, label=f"chosen {seg['threshold']:.3g}")
        top = max([v for v in (fpv_curve or []) + ext["mean_fnv_ml_curve"] if v is not None] + [1.0])
        ax.set(xlabel="threshold", ylabel="mean volume (mL)",
               title="PET extent: error volumes" + ("" if fpv_curve is not None else " (test negatives not segmented)"),
               ylim=(0, min(top * 1.05, 4 * budget) if budget else top * 1.05))
        ax.legend(fontsize=7, loc="upper center")
    fig.tight_layout()
    save_figure(fig, run_dir / "calibration_dice.png")
    cls = payload.get("classifier")
    if not cls:  # an ROC of an earlier calibration with the gate would no longer describe this one
        (run_dir / "calibration_roc.png").unlink(missing_ok=True)
    if cls:
        from sklearn.metrics import roc_curve

        cases = payload["cases"]
        labels = np.array([cases[c]["positive"] for c in payload["test_cases"]], int)
        scores = np.array([cases[c]["cls_score"] for c in payload["test_cases"]], float)
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        if 0 < labels.sum() < len(labels):
            fpr, tpr, _ = roc_curve(labels, scores)
            ax.plot(fpr, tpr, "b-", lw=2, label=f"AUROC {cls['auroc']:.3f}")
            ax.plot([1 - cls["specificity"]], [1.0], "r*", ms=14, label=f"threshold {cls['threshold']:.3f}")
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        ax.set(xlabel="1 − specificity", ylabel="sensitivity", title="MIP classifier gate")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        save_figure(fig, run_dir / "calibration_roc.png")

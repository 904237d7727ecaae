"""`petctl predict`: NIfTI in, NIfTI mask out in the input's own geometry.

Per case: exactly prepare's preprocessing (the training store's fingerprint and spacing); the MIP
classifier gate first (probability below its calibrated threshold → an empty mask is written, no
segmentation cost); otherwise the fold ensemble by sliding window, its probabilities mapped back
onto the input's grid, and the calibrated threshold there — with the PET extent when calibrated so
(each component of `p >= threshold` redrawn at its background-corrected 50 % SUV isocontour,
`extent.pet_extent_mask`), or with the component seed when one was calibrated (components with
no voxel at the seed are dropped); then, when calibrated with the urine veto, the components that
lie mostly in urine on the CT are dropped (`urine.veto_mask`). The mask keeps the input's grid (same shape, affine and
orientation as the PET, which is the label grid of the cohort). Outputs are written atomically and never over an input file.
Several processes split the cases by rank: `predict_processes` starts them itself (`petctl predict
--processes N`), or they come from a launcher (`RANK`/`WORLD_SIZE`, as `accelerate launch` and srun
set), each writing its own summary and merging it into predictions.json (`write_summary`).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from petctl.engine.cohort import CaseSource, discover, is_valid_case_id
from petctl.engine.figures import save_figure
from petctl.errors import CaseError, PetctlError, case_reason


@dataclass(frozen=True)
class PredictOptions:
    gate: bool = True
    tta: bool | None = None
    """Flip test-time augmentation; None: as the run was calibrated (thresholds.json `tta`)."""
    save_probabilities: str | None = None
    """None, "float32" or "uint8" (probability × 255, rounded). NIfTI-1 has no float16."""
    preview: bool = False
    stitch_on_cpu: bool | None = None
    """Stitch windows on the CPU; None decides by volume size (≥ 64 M voxels)."""

    def __post_init__(self) -> None:
        if self.save_probabilities not in (None, "float32", "uint8"):
            raise PetctlError("--save-probabilities must be float32 or uint8")


@dataclass
class PredictResult:
    written: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


_CT_FILE = re.compile(r"^(.*)_0000\.nii(\.gz)?$")


def _ct_file_case(ct: Path) -> CaseSource:
    """The case of one CASE_0000 CT file; its PET is CASE_0001 beside it, under either suffix."""
    from petctl.engine.cohort import nifti_path

    m = _CT_FILE.match(ct.name)
    if not m:
        raise PetctlError(f"{ct}: a single-case input must be the CT file CASE_0000.nii.gz (its PET CASE_0001 beside it)")
    case = m.group(1)
    pet = nifti_path(ct.with_name(f"{case}_0001")) or ct.with_name(f"{case}_0001.nii{m.group(2) or ''}")
    return CaseSource(case, ct, pet, None, case, None)


def input_cases(path: Path) -> list[CaseSource]:
    """Cases of an nnU-Net folder (imagesTs, else imagesTr), an AutoPET folder, or one CT file + its PET.

    A bare folder of CASE_0000 / CASE_0001 files lists each CASE once (.nii.gz or .nii, either for
    either channel); other files there (a `.part`, a backup) are not cases. No metadata CSV is read.
    """
    from petctl.engine.cohort import autopet_studies, nifti_path

    path = Path(path)
    if path.is_file():
        return [_ct_file_case(path)]
    if (path / "imagesTs").is_dir():
        return discover(path, split="Ts", with_metadata=False)
    if (path / "imagesTr").is_dir():
        return discover(path, split="Tr", with_metadata=False)
    if autopet_studies(path):
        return discover(path, with_metadata=False)
    cts = {m.group(1) for p in path.glob("*_0000.nii*") if (m := _CT_FILE.match(p.name))}
    if cts:  # a bare folder of CASE_0000/CASE_0001 files
        return [_ct_file_case(nifti_path(path / f"{case}_0000")) for case in sorted(cts)]
    raise PetctlError(f"{path}: no cases found (nnU-Net imagesTs/imagesTr, AutoPET layout, or CASE_0000/0001 files)")


def _safe_output(out_dir: Path, case: str, suffix: str, inputs: set[Path]) -> Path:
    if not is_valid_case_id(case):
        raise CaseError(case, "case id would leave the output folder; refused")
    target = (out_dir / f"{case}{suffix}").resolve()
    if out_dir.resolve() not in target.parents:
        raise CaseError(case, "output path leaves the output folder; refused")
    if target in inputs:
        raise CaseError(case, f"output {target.name} would overwrite an input file; refused")
    return target


def _save_nifti(data: np.ndarray, reference: Any, path: Path, dtype: Any, what: str = "mask") -> None:
    import nibabel as nib

    header = reference.header.copy()
    header.set_data_dtype(dtype)
    # not the PET's: its display window (a 0/1 mask under cal_max 20 looks black) and description
    header["cal_min"], header["cal_max"] = 0, 0
    header["descrip"] = f"petctl {what}".encode()
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), reference.affine, header=header)
    # each form as the reference has it, coded or not (a qform written where the input had none would
    # be a second, shear-free approximation of its sform); neither coded: both from the affine, coded 1
    qcode, scode = int(reference.header["qform_code"]), int(reference.header["sform_code"])
    if qcode or scode:
        img.set_qform(reference.get_qform(), code=qcode)
        img.set_sform(reference.get_sform(), code=scode)
    else:
        img.set_qform(reference.affine, code=1)
        img.set_sform(reference.affine, code=1)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.nii.gz")
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def predict(run_dir: Path, input_path: Path, output: Path, options: PredictOptions = PredictOptions(), *,
            on_case: Callable[[str], None] | None = None, on_skip: Callable[[str, str], None] | None = None,
            rank: int | None = None, world_size: int | None = None, device: torch.device | None = None) -> PredictResult:
    """Predict every input case (of this rank's share) into `output`; a bad case is reported and
    skipped, never raised. `device`: where the models run (default: the GPU when there is one)."""
    import nibabel as nib

    from petctl.engine.ensemble import RunModels, read_thresholds
    from petctl.engine.extent import pet_extent_mask
    from petctl.engine.geometry import check_resample, spacing_of, to_original
    from petctl.engine.metrics import seeded_mask
    from petctl.engine.nifti import load_case
    from petctl.engine.prepare import preprocess
    from petctl.engine.store import read_json
    from petctl.engine.urine import UrineVeto, veto_mask

    run_dir = Path(run_dir)
    thresholds = read_thresholds(run_dir)
    seg_threshold = float(thresholds["segmentation"]["threshold"])
    seed_threshold = float(thresholds["segmentation"].get("seed_threshold") or 0.0)
    extent = thresholds["segmentation"].get("extent")  # None: calibrated without the PET extent
    resample = (extent or {}).get("resample", "linear")  # recorded since calibrate --resample; trilinear before
    check_resample(resample, source=str(run_dir / "thresholds.json"))
    veto = UrineVeto.from_json(thresholds["segmentation"].get("urine_veto"))  # None: calibrated without it
    cls_info = thresholds.get("classifier")
    gate = options.gate and cls_info is not None
    tta = bool(thresholds.get("tta", False)) if options.tta is None else options.tta
    models = RunModels.load(run_dir, need_cls=gate, device=device)
    assert models.store is not None
    fingerprint = read_json(models.store / "fingerprint.json")
    prep = read_json(models.store / "prepare.json")["config"]
    cases = input_cases(input_path)
    # every input file of every rank (labels too: `predict DS DS/labelsTs` must not replace the ground truth)
    inputs = {Path(p).resolve() for c in cases for p in (c.ct, c.pet, c.label) if p is not None}
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    cases = cases[rank::world_size]
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    result = PredictResult()
    for src in cases:
        t0 = time.perf_counter()
        try:
            mask_path = _safe_output(output, src.case, ".nii.gz", inputs)
            loaded = load_case(src, need_label=False)
            image, _, geometry, _ = preprocess(loaded, fingerprint, tuple(prep["spacing"]), int(prep.get("crop_margin", 2)))
            pet, affine = (loaded.pet if options.preview or extent else None), loaded.affine
            ct = loaded.ct if veto is not None else None
            del loaded  # the full-size CT (unless the urine veto reads it) and PET (unless the extent or preview needs it) go
            image_t = torch.from_numpy(image).float()
            reference = nib.load(str(src.pet))
            record: dict[str, Any] = {"stored_shape": list(image.shape[1:]), "tta": tta}
            probs = None
            if gate:
                score = models.cls_score(image_t[1])
                record["cls_score"] = score
                record["gated"] = bool(score < float(cls_info["threshold"]))
            else:
                record["gated"] = False
            if record["gated"]:
                mask = np.zeros(geometry.original_shape, np.uint8)
            else:
                stitch_cpu = options.stitch_on_cpu if options.stitch_on_cpu is not None else image.shape[1] * image.shape[2] * image.shape[3] >= 64 * 1024**2
                probs_stored = models.seg_probs(image_t, tta=tta, stitch_on_cpu=stitch_cpu)
                probs = to_original(probs_stored, geometry, mode=resample)  # as calibrate chose
                if extent:
                    mask = pet_extent_mask(pet, probs, seg_threshold, fraction=float(extent["fraction"]),
                                           grow=int(extent["grow_voxels"]), shell=tuple(extent["shell_voxels"])).astype(np.uint8)
                else:
                    mask = seeded_mask(probs, seg_threshold, seed_threshold).astype(np.uint8)
                if veto is not None:
                    kept = veto_mask(mask, ct, spacing_of(affine), veto)
                    record["urine_vetoed_voxels"] = int(mask.sum() - kept.sum())
                    mask = kept.astype(np.uint8)
            _save_nifti(mask, reference, mask_path, np.uint8)
            record["lesion_voxels"] = int(mask.sum())
            if options.save_probabilities:
                prob_path = _safe_output(output, src.case, "_prob.nii.gz", inputs)
                p = probs if probs is not None else np.zeros(geometry.original_shape, np.float32)
                if options.save_probabilities == "uint8":
                    _save_nifti(np.rint(np.clip(p, 0, 1) * 255), reference, prob_path, np.uint8, "probability x255")
                else:
                    _save_nifti(p, reference, prob_path, np.float32, "probability")
            if options.preview:
                preview_png(_safe_output(output, src.case, "_preview.png", inputs), pet, mask, affine, src.case, record)
            record["seconds"] = round(time.perf_counter() - t0, 3)
            result.written[src.case] = record
        except Exception as exc:  # any one case's failure (MemoryError, a bad header…) is that case's, not the batch's
            result.skipped[src.case] = reason = case_reason(src.case, exc)
            if on_skip is not None:
                on_skip(src.case, reason)
        if on_case:
            on_case(src.case)
    return result


def preview_png(path: Path, pet: np.ndarray, mask: np.ndarray, affine: np.ndarray, case: str, record: dict[str, Any]) -> None:
    """Coronal PET MIP (inverted grey, like a reading room) with the predicted mask's MIP in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from petctl.engine.geometry import spacing_of, to_canonical
    from petctl.engine.mip import mip

    pet_c, canon = to_canonical(pet, affine)
    mask_c, _ = to_canonical(mask, affine)
    sx, _, sz = spacing_of(canon)
    img, m = mip(pet_c, "y"), mip(mask_c, "y")
    fig, ax = plt.subplots(figsize=(3.2, 3.2 * img.shape[0] * sz / max(img.shape[1] * sx, 1e-6)))
    ax.imshow(img, cmap="gray_r", vmin=0, vmax=np.percentile(img, 99.5), aspect=sz / sx)
    overlay = np.ma.masked_where(m == 0, m)
    ax.imshow(overlay, cmap="autumn", alpha=0.6, aspect=sz / sx)
    title = f"{case}" + (" — gated (healthy)" if record.get("gated") else f" — {record.get('lesion_voxels', 0)} voxels")
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)


def rank_share(total: int, rank: int, world_size: int) -> int:
    """How many of `total` cases rank `rank` of `world_size` predicts (`cases[rank::world_size]`)."""
    return len(range(rank, total, world_size))


def predict_processes(run_dir: Path, input_path: Path, output: Path, options: PredictOptions, processes: int, *,
                      on_case: Callable[[str], None] | None = None,
                      on_skip: Callable[[str, str], None] | None = None) -> PredictResult:
    """`predict` split over `processes` local worker processes (rank r of N, cases[r::N]), merged.

    Each worker runs on GPU r when there are at least N GPUs (else all share the GPU, or the CPU with
    its cores shared out as threads); progress and skipped cases reach the callbacks as they happen.
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, wait

    if processes < 1:
        raise PetctlError(f"--processes must be at least 1 (got {processes})")
    if processes == 1:
        return predict(run_dir, input_path, output, options, on_case=on_case, on_skip=on_skip, rank=0, world_size=1)
    ctx = mp.get_context("spawn")  # torch and fork do not mix
    gpus = torch.cuda.device_count()
    threads = max(1, (os.cpu_count() or 1) // processes)
    result = PredictResult()
    with ctx.Manager() as manager, ProcessPoolExecutor(max_workers=processes, mp_context=ctx) as pool:
        events = manager.Queue()

        def drain() -> None:
            while not events.empty():
                event = events.get()
                if event[0] == "case" and on_case:
                    on_case(event[1])
                elif event[0] == "skip" and on_skip:
                    on_skip(event[1], event[2])

        devices = [f"cuda:{r}" if gpus >= processes else ("cuda" if gpus else "cpu") for r in range(processes)]
        futures = [pool.submit(_predict_worker, str(run_dir), str(input_path), str(output), options, r, processes, devices[r],
                               threads, events) for r in range(processes)]
        pending = set(futures)
        while pending:
            _, pending = wait(pending, timeout=0.2)
            drain()
        drain()
        for future in futures:  # a worker that died raises here, with its own traceback
            part = future.result()
            result.written.update(part.written)
            result.skipped.update(part.skipped)
    result.written = dict(sorted(result.written.items()))
    result.skipped = dict(sorted(result.skipped.items()))
    return result


def _predict_worker(run_dir: str, input_path: str, output: str, options: PredictOptions, rank: int, world_size: int,
                    device: str, threads: int, events: Any) -> PredictResult:
    torch.set_num_threads(threads)
    return predict(Path(run_dir), Path(input_path), Path(output), options, rank=rank, world_size=world_size,
                   device=torch.device(device), on_case=lambda c: events.put(("case", c)),
                   on_skip=lambda c, r: events.put(("skip", c, r)))


def launch_id() -> str | None:
    """What the ranks of one outside launch share: torchrun's run id (accelerate launch, torchrun), else
    SLURM's job and step; None when neither is set."""
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return f"torchrun:{os.environ['TORCHELASTIC_RUN_ID']}"
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm:{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_STEP_ID', '')}"
    return None


def write_summary(output: Path, result: PredictResult, *, rank: int = 0, world_size: int = 1,
                  launch: str | None = None) -> None:
    """OUTPUT/predictions.json. Ranks launched from outside (`RANK`/`WORLD_SIZE`) each write
    predictions.rank{R}.json and then, one at a time (a file lock), merge every rank file there is into
    predictions.json, so the last to finish leaves the whole cohort in it. With a `launch` id (see
    `launch_id`), rank files an earlier launch left there are not merged."""
    from petctl.engine.store import write_json_atomic

    output = Path(output)
    payload = {"written": result.written, "skipped": result.skipped}
    if world_size <= 1:
        write_json_atomic(output / "predictions.json", payload)
        return
    import fcntl

    write_json_atomic(output / f"predictions.rank{rank}.json",
                      {**payload, "rank": rank, "world_size": world_size, "launch": launch})
    with open(output / ".predictions.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        parts = [json.loads(p.read_text()) for p in (output / f"predictions.rank{r}.json" for r in range(world_size)) if p.exists()]
        parts = [part for part in parts if launch is None or part.get("launch") == launch]
        merged = {key: dict(sorted(item for part in parts for item in part[key].items())) for key in ("written", "skipped")}
        write_json_atomic(output / "predictions.json", {**merged, "ranks_merged": len(parts), "world_size": world_size})

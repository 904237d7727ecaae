"""Find the cases of a cohort on disk: nnU-Net raw layout or the original AutoPET folder layout.

A cohort becomes a list of `CaseSource` records (case id, CT/PET/label paths, patient, diagnosis).
Patient grouping and diagnosis come from a metadata CSV when one is given or found beside the
data (`case,patient,diagnosis`, or AutoPET's `Subject ID` / `Study UID` / `diagnosis` columns);
without one, patient = case and the diagnosis is decided later from the label (empty = negative).
Reading voxels is not done here; see `petctl.engine.nifti`.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from petctl.errors import PetctlError

NEGATIVE = "NEGATIVE"
_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_NIFTI_ENDINGS = (".nii.gz", ".nii")


@dataclass(frozen=True)
class CaseSource:
    """Where one case's files are, and what the metadata says about it."""

    case: str
    ct: Path
    pet: Path
    label: Path | None
    patient: str
    diagnosis: str | None
    """`NEGATIVE`, a cancer type, or None when no metadata says (decided from the label)."""


def is_valid_case_id(case: str) -> bool:
    """Case ids become file names in stores and outputs, so they may not hold path syntax."""
    return bool(_CASE_ID.match(case)) and ".." not in case


def discover(data: Path, metadata: Path | None = None, *, split: str = "Tr", with_metadata: bool = True) -> list[CaseSource]:
    """List the cases in `data` (nnU-Net raw or AutoPET layout), sorted by case id.

    `split` is "Tr" (imagesTr/labelsTr) or "Ts" (imagesTs/labelsTs) for nnU-Net layouts.
    `with_metadata=False` reads no metadata CSV unless `metadata` names one (predict needs only the files).
    Raises PetctlError when the folder holds neither layout.
    """
    data = Path(data)
    if not data.is_dir():
        raise PetctlError(f"{data}: not a folder")
    if (data / f"images{split}").is_dir():
        cases = _discover_nnunet(data, split)
    elif autopet_studies(data):
        cases = _discover_autopet(data)
    else:
        raise PetctlError(
            f"{data}: neither nnU-Net raw layout (images{split}/) nor AutoPET layout (PATIENT/STUDY/SUV.nii.gz)"
        )
    meta_path = metadata or (_default_metadata(data) if with_metadata else None)
    meta = _read_metadata(meta_path)
    if meta:
        unmatched = sorted(c.case for c in cases if (meta.get(c.case) or meta.get(c.patient)) is None)
        if unmatched:  # their patient is their own case id: a study of a listed patient could straddle the splits
            import logging

            shown = ", ".join(unmatched[:5]) + ("…" if len(unmatched) > 5 else "")
            logging.getLogger(__name__).warning("%s: %d of %d cases have no row (each taken as its own patient): %s",
                                                meta_path, len(unmatched), len(cases), shown)
        cases = [_with_metadata(c, meta) for c in cases]
    return sorted(cases, key=lambda c: c.case)


def nifti_path(base: Path) -> Path | None:
    """`base` + .nii.gz, else `base` + .nii, where one exists."""
    for ending in _NIFTI_ENDINGS:
        p = base.with_name(base.name + ending)
        if p.exists():
            return p
    return None


def _channels(data: Path) -> tuple[int, int]:
    """Which nnU-Net channel index is CT and which is PET (dataset.json `channel_names`)."""
    ds = data / "dataset.json"
    if not ds.exists():
        return 0, 1
    try:
        names = json.loads(ds.read_text()).get("channel_names") or json.loads(ds.read_text()).get("modality") or {}
    except json.JSONDecodeError as exc:
        raise PetctlError(f"{ds}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    ct = pet = None
    for idx, name in names.items():
        n = str(name).lower()
        if n in ("ct", "ctres") or n.startswith("ct"):
            ct = int(idx)
        elif "pet" in n or "suv" in n:
            pet = int(idx)
    if ct is None or pet is None:
        return 0, 1
    return ct, pet


def _discover_nnunet(data: Path, split: str) -> list[CaseSource]:
    ct_ch, pet_ch = _channels(data)
    images = data / f"images{split}"
    labels = data / f"labels{split}"
    ids: set[str] = set()
    for p in images.iterdir():
        m = re.match(r"^(.*)_(\d{4})\.nii(\.gz)?$", p.name)
        if m:
            ids.add(m.group(1))
    cases = []
    for case in ids:
        ct = nifti_path(images / f"{case}_{ct_ch:04d}")
        pet = nifti_path(images / f"{case}_{pet_ch:04d}")
        label = nifti_path(labels / case) if labels.is_dir() else None
        cases.append(
            CaseSource(
                case=case,
                ct=ct or images / f"{case}_{ct_ch:04d}.nii.gz",
                pet=pet or images / f"{case}_{pet_ch:04d}.nii.gz",
                label=label if label is not None else (labels / f"{case}.nii.gz" if labels.is_dir() else None),
                patient=case,
                diagnosis=None,
            )
        )
    return cases


def autopet_studies(data: Path) -> list[Path]:
    """PATIENT/STUDY folders of an AutoPET cohort: those holding SUV.nii.gz or SUV.nii (not a backup
    or partial copy beside it), sorted."""
    return [s for s in sorted(Path(data).glob("*/*/")) if s.is_dir() and nifti_path(s / "SUV") is not None]


def _discover_autopet(data: Path) -> list[CaseSource]:
    """One case per study folder; two folders whose names map to the same case id (characters
    outside A-Z a-z 0-9 . _ - become _) keep the first and name the other in a warning."""
    import logging

    cases: dict[str, CaseSource] = {}
    for study in autopet_studies(data):
        patient = study.parent.name
        case = re.sub(r"[^A-Za-z0-9._-]", "_", f"{patient}_{study.name}")
        if case in cases:
            logging.getLogger(__name__).warning("%s: case id %s is taken by %s; this study is left out (rename one folder)",
                                                study, case, Path(cases[case].pet).parent)
            continue
        ct = nifti_path(study / "CTres") or nifti_path(study / "CT") or study / "CTres.nii.gz"
        cases[case] = CaseSource(case=case, ct=ct, pet=nifti_path(study / "SUV"), label=nifti_path(study / "SEG"), patient=patient,
                                 diagnosis=None)
    return list(cases.values())


def _default_metadata(data: Path) -> Path | None:
    for name in ("metadata.csv", "Metadata.csv", "Clinical Metadata FDG PET_CT Lesions.csv"):
        if (data / name).exists():
            return data / name
    found = sorted(data.glob("*.csv"))
    if len(found) != 1:
        return None
    try:  # a lone CSV of other columns (results, notes) is not the cohort's metadata: left alone
        with found[0].open(newline="", encoding="utf-8-sig") as fh:
            header = {f.strip().lower() for f in next(csv.reader(fh), [])}
    except UnicodeDecodeError:
        return found[0]  # maybe the metadata, in another encoding: reading it says so in one line
    except (OSError, csv.Error):
        return None
    return found[0] if "case" in header or "subject id" in header else None


def _read_metadata(path: Path | None) -> dict[str, tuple[str, str | None]]:
    """Map case id (or AutoPET `Subject ID/Study UID`) → (patient, diagnosis)."""
    if path is None:
        return {}
    path = Path(path)
    if not path.exists():
        raise PetctlError(f"{path}: metadata CSV not found")
    try:
        return _parse_metadata(path)
    except UnicodeDecodeError as exc:
        raise PetctlError(f"{path}: metadata CSV is not UTF-8 (byte {exc.start}); save it as UTF-8") from None
    except csv.Error as exc:
        raise PetctlError(f"{path}: metadata CSV is malformed ({exc})") from None


def _parse_metadata(path: Path) -> dict[str, tuple[str, str | None]]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = {f.strip().lower(): f for f in (reader.fieldnames or [])}
        meta: dict[str, tuple[str, str | None]] = {}
        if "case" in fields:
            for row in reader:
                patient = (row.get(fields.get("patient", ""), "") or row[fields["case"]]).strip()
                diag = (row.get(fields.get("diagnosis", ""), "") or "").strip() or None
                meta[row[fields["case"]].strip()] = (patient, diag)
        elif "subject id" in fields:
            for row in reader:
                subject = row[fields["subject id"]].strip()
                diag = (row.get(fields.get("diagnosis", ""), "") or "").strip() or None
                study = (row.get(fields.get("study uid", ""), "") or "").strip()
                key = re.sub(r"[^A-Za-z0-9._-]", "_", f"{subject}_{study}") if study else subject
                meta[key] = (subject, diag)
                meta.setdefault(subject, (subject, diag))
        else:
            raise PetctlError(
                f"{path}: metadata CSV needs columns case,patient,diagnosis or AutoPET's 'Subject ID','diagnosis'"
            )
    return meta


def _with_metadata(case: CaseSource, meta: dict[str, tuple[str, str | None]]) -> CaseSource:
    hit = meta.get(case.case) or meta.get(case.patient)
    if hit is None:
        return case
    patient, diagnosis = hit
    return CaseSource(case.case, case.ct, case.pet, case.label, patient, diagnosis.upper() if diagnosis else None)

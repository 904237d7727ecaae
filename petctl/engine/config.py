"""Training configuration: one frozen dataclass and named presets (plain functions).

A variant of a preset is `dataclasses.replace(preset(), field=value)`, never a subclass. The
config is written as JSON beside every checkpoint and into the registry.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable, Sequence

from petctl.errors import PetctlError

POSITION_CHANNELS = 3
"""Input channels the position channels add (x, y, z; `petctl.engine.position`)."""


@dataclass(frozen=True)
class TrainConfig:
    """Segmentation (and classifier) training settings."""

    preset: str = "custom"
    arch: str = "swin_unetr"
    """swin_unetr (the paper's Swin-UNETR tiny), dynunet (nnU-Net style) or basic_unet (CPU)."""
    feature_size: int = 12
    features: tuple[int, ...] | None = None
    """basic_unet channel widths."""
    spacing: tuple[float, float, float] = (2.04, 2.04, 3.0)
    """The spacing the store should be prepared at for this preset (mm)."""
    patch_size: tuple[int, int, int] = (96, 96, 96)
    in_channels: int = 2
    """Input channels of the segmentation net: set from the store when a fold trains (CT and PET,
    and the wide PET of `prepare --pet-wide`, plus the position channels; `with_image_channels`),
    recorded in the fold's config for inference."""
    patches_per_scan: int = 12
    batch_size: int = 4
    lesion_prob: float = 2 / 3
    """Probability of a lesion-centred patch. The paper's text says 2/3, its released code used 1/3."""
    position_channels: bool = False
    """Give the segmentation net each voxel's position in the body-cropped volume as three more
    input channels (`petctl.engine.position`), so a patch knows where in the body it lies."""
    lesion_size_power: float = 0.0
    """A lesion-centred patch picks a component of its scan with weight (voxel count) ** this: 0 picks
    every component alike (small lesions as often as big ones), 1 every lesion voxel alike. An option:
    on 3 demo seeds p = 0.5 found one missed large lesion, lost another and cost Dice (README)."""
    hard_lesion_gain: float = 0.0
    """Hard-example mining per lesion: a component's weight in lesion-centred draws is multiplied by
    1 + gain × its running miss rate (the share of its voxels the net scored ≤ 0.5 in the patches
    centred on it, averaged over epochs with momentum 0.5). 0 turns it off."""
    lesion_dim: float = 0.0
    """Probability that a training patch's lesions are dimmed (`AugmentConfig.p_lesion_dim`): their
    uptake above the tissue around them scaled by U(0.5, 1), so faint lesions are not only the rare
    faint ones of the cohort. 0 turns it off (the paper)."""
    num_cycles: int = 50
    epochs_per_cycle: int = 5
    lr: float = 5e-4
    lr_min_ratio: float = 0.0
    weight_decay: float = 0.0
    loss: str = "bce"
    """bce (the paper's choice), dice, or dice_ce."""
    output_prior: float | None = 0.01
    """Initial sigmoid output (bias prior) of the segmentation head; None keeps the default init."""
    augment: bool = True
    num_workers: int = 2
    grad_accum: int = 1
    mixed_precision: str = "no"
    """no or bf16 (GPUs)."""
    channels_last: bool = False
    """Keep the networks' activations channels-last (NDHWC / NHWC). On the CPU (oneDNN) this makes a
    BasicUNet training step about 1.4× faster and a ResNet's 1.15× (bench/channels_last.py); the CPU presets turn it on."""
    extent_threshold_prior: float | None = None
    """calibrate's PET-extent threshold when the test split cannot tell it from the best (within one
    standard error of the best mean Dice; `calibrate.choose_extent_threshold`); None: the best."""
    sw_overlap: float = 0.5
    sw_batch_size: int = 2
    max_val_cases: int | None = None
    """Validate on at most this many cases per cycle (None: all of the fold's validation cases)."""
    seed: int = 0
    pretrained: str | None = None
    """Local path of a Swin-UNETR (BTCV layout) checkpoint; never downloaded."""
    cls_model: str = "swin_tiny_patch4_window7_224"
    """timm model name of the MIP classifier (1 logit)."""
    cls_projections: tuple[str, ...] = ("x", "y")
    """MIP projections; one model per projection and fold. A projection is an axis (the paper's x
    and y; it found z worse, AUROC 83.8 vs 92.9/93.0) or several ("xy"): one model that learns from
    and scores every view of each scan, the views' probabilities averaged."""
    cls_img_size: tuple[int, int] = (352, 224)
    """(rows, cols) of the resized MIP: 224 wide × 352 tall, since rows run along the body axis."""
    cls_batch_size: int = 8
    cls_num_cycles: int = 5
    cls_epochs_per_cycle: int = 3
    cls_lr: float = 5e-4
    cls_pretrained: str | None = None
    """Local timm checkpoint for the classifier; never downloaded."""
    cls_head: str = "global"
    """"global": timm's pooled linear head (the paper). "lesion_map": a feature-pyramid head on the
    backbone's last three stages draws a stride-8 lesion map of the MIP, trained on the projected
    lesion masks as well as the scan label; the scan's logit is the map's maximum. cpu-small's since
    2026-12-07: at 13 epochs, on 5 demo seeds, it had moved AUROC by no more than the seed-to-seed
    noise; at 40 it matched 80 epochs of the global head on 320 held-out scans of two cohorts (0.964
    and 0.985) in 0.6 of their time. Its steps take ~15 % longer (README, the demo section)."""
    cls_map_weight: float = 1.0
    """Weight of the lesion-map loss (per-pixel BCE) beside the scan loss, for cls_head lesion_map."""
    cls_mip_shrink: str = "max"
    """How a MIP shrinks to `cls_img_size` along an axis longer than it: "max" (each output pixel the
    maximum of those it covers, then bilinear; since 2026-12-07) or "bilinear" (sampling alone, which
    classifiers trained before were; a config saved without the field reads as it)."""
    collective_timeout_s: int = 600
    """A rank that waits longer than this on a collective (a peer died) fails instead of hanging."""

    def __post_init__(self) -> None:
        if self.arch not in ("swin_unetr", "dynunet", "basic_unet"):
            raise PetctlError(f"arch must be swin_unetr, dynunet or basic_unet (got {self.arch!r})")
        if self.loss not in ("bce", "dice", "dice_ce"):
            raise PetctlError(f"loss must be bce, dice or dice_ce (got {self.loss!r})")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise PetctlError(f"mixed_precision must be no, bf16 or fp16 (got {self.mixed_precision!r})")
        if not 0.0 <= self.lesion_prob <= 1.0:
            raise PetctlError("lesion_prob must be within [0, 1]")
        if self.lesion_size_power < 0:
            raise PetctlError(f"lesion_size_power must be ≥ 0 (got {self.lesion_size_power})")
        if not 0.0 <= self.lesion_dim <= 1.0:
            raise PetctlError(f"lesion_dim must be within [0, 1] (got {self.lesion_dim})")
        if self.hard_lesion_gain < 0:
            raise PetctlError(f"hard_lesion_gain must be ≥ 0 (got {self.hard_lesion_gain})")
        for name in ("patches_per_scan", "batch_size", "num_cycles", "epochs_per_cycle", "grad_accum"):
            if getattr(self, name) < 1:
                raise PetctlError(f"{name} must be at least 1")
        from petctl.engine.mip import check_projections

        try:
            check_projections(self.cls_projections)
        except ValueError as exc:
            raise PetctlError(f"cls_projections: {exc}") from None
        if self.cls_head not in ("global", "lesion_map"):
            raise PetctlError(f"cls_head must be global or lesion_map (got {self.cls_head!r})")
        if self.cls_map_weight < 0:
            raise PetctlError(f"cls_map_weight must be ≥ 0 (got {self.cls_map_weight})")
        if self.cls_mip_shrink not in ("max", "bilinear"):
            raise PetctlError(f"cls_mip_shrink must be max or bilinear (got {self.cls_mip_shrink!r})")
        if self.extent_threshold_prior is not None and not 0.0 < self.extent_threshold_prior < 1.0:
            raise PetctlError(f"extent_threshold_prior must be within (0, 1) (got {self.extent_threshold_prior})")
        if len(self.patch_size) != 3 or min(self.patch_size) < 16:
            raise PetctlError(f"patch_size must be three sizes ≥ 16 (got {self.patch_size})")

    def with_image_channels(self, num_image_channels: int) -> "TrainConfig":
        """The config a fold records for a store of `num_image_channels` (2, or 3 with --pet-wide):
        `in_channels` is the net's inputs, the position channels included."""
        return replace(self, in_channels=num_image_channels + (POSITION_CHANNELS if self.position_channels else 0))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known}
        kw.setdefault("cls_mip_shrink", "bilinear")  # saved before the field: its classifiers saw bilinear MIPs
        return cls(**kw)


def autopet_paper() -> TrainConfig:
    """The paper: Swin-UNETR tiny, 96³, 12 patches/scan, batch 4, 50×5 cycles, NAdam 5e-4, BCE."""
    return TrainConfig(preset="autopet-paper")


def cpu_small() -> TrainConfig:
    """A small BasicUNet at 32³ and 4×4×6 mm that learns the synthetic cohort in minutes on 2 cores.

    Batches of 4 patches: the same patches per second on 2 cores as batches of 8 and twice the
    updates; where the demo's time budget cuts the epochs to half (slow machines), batches of 4 met
    the quality targets that batches of 8 missed (README, 2026-11-30). One cosine cycle (the demo's
    budget buys ~3000 steps per fold, too few to spend on a restart: 12 epochs of a 5-fold split's
    ~65 positives × 16 patches; 6 and then 9 epochs missed more large lesions, README) and a
    classifier trained 40 epochs with the lesion-map head (~650 steps on ~130 scans: at 13 and 16
    epochs it was undertrained; on two cohorts' 320 held-out scans its AUROC went from 0.934 and 0.966
    at 16 epochs with the global head to 0.964 and 0.985, as high as 80 epochs of the global head in
    0.6 of their time; README, the demo section); channels-last activations (1.4× faster steps on the CPU); position
    channels (a 13 cm patch does not show where in the body it lies; README, the demo section)."""
    return TrainConfig(
        preset="cpu-small",
        arch="basic_unet",
        features=(8, 8, 16, 32, 64, 8),
        spacing=(4.0, 4.0, 6.0),
        patch_size=(32, 32, 32),
        patches_per_scan=16,
        batch_size=4,
        num_cycles=1,
        epochs_per_cycle=12,
        lr=3e-3,
        lr_min_ratio=0.02,
        num_workers=0,
        sw_batch_size=8,
        cls_model="resnet10t",
        cls_img_size=(160, 96),
        cls_num_cycles=1,
        cls_epochs_per_cycle=40,
        cls_head="lesion_map",
        cls_lr=1e-3,
        channels_last=True,
        position_channels=True,
        # The held-out optimum of 11 development demos (seeds 101-1111) lay at 0.60-0.80 (0.75 on 5);
        # on them the test split's (~15 positives) best Dice gave held-out Dice 0.764 on average, 0.75 fixed 0.790.
        extent_threshold_prior=0.75,
    )


def cpu_tiny() -> TrainConfig:
    """A few steps of tiny networks: for tests and smoke runs only (no quality). timm's 0.37 M-parameter
    `test_resnet` stands in for resnet10t (4.9 M), so a run's classifier checkpoints take ~6 MB, not ~80;
    it keeps cpu-small's lesion-map head, so the tests run the demo's classifier."""
    return replace(
        cpu_small(), preset="cpu-tiny", features=(4, 4, 8, 8, 16, 4), patches_per_scan=2, batch_size=2,
        num_cycles=2, epochs_per_cycle=1, max_val_cases=2, cls_model="test_resnet", cls_num_cycles=1,
        cls_epochs_per_cycle=1, cls_img_size=(96, 64),
    )


def with_overrides(cfg: TrainConfig, *, task: str = "seg", cycles: int | None = None, epochs: int | None = None,
                   mixed_precision: str | None = None, pretrained: str | None = None,
                   hard_lesion_gain: float | None = None, lesion_dim: float | None = None,
                   projections: Sequence[str] | None = None) -> TrainConfig:
    """A preset with the command line's overrides (`petctl train`, `petctl slurm plan`): cycles,
    epochs and pretrained weights set those of `task` (the classifier's for "cls": `cls_pretrained`,
    a local timm state dict); `projections`, the classifier's; None leaves a field as is."""
    if task not in ("seg", "cls"):
        raise PetctlError(f"task must be seg or cls (got {task!r})")
    cycle_fields = ("num_cycles", "epochs_per_cycle") if task == "seg" else ("cls_num_cycles", "cls_epochs_per_cycle")
    overrides = {k: v for k, v in {cycle_fields[0]: cycles, cycle_fields[1]: epochs, "mixed_precision": mixed_precision,
                                    "pretrained" if task == "seg" else "cls_pretrained": pretrained, "hard_lesion_gain": hard_lesion_gain,
                                    "lesion_dim": lesion_dim,
                                    "cls_projections": tuple(projections) if projections is not None else None}.items() if v is not None}
    return replace(cfg, **overrides)


PRESETS: dict[str, Callable[[], TrainConfig]] = {
    "autopet-paper": autopet_paper,
    "cpu-small": cpu_small,
    "cpu-tiny": cpu_tiny,
}


def preset(name: str) -> TrainConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise PetctlError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})") from None

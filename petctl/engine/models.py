"""Model builders: the 3-D segmentation networks, the 2-D MIP classifier, and local weight loading.

`build_seg_model` makes the paper's Swin-UNETR "tiny" (feature_size 12), an nnU-Net style DynUNet,
or a small BasicUNet for CPUs; all give one logit channel (sigmoid) per voxel. `build_classifier`
makes a timm network with one logit for the MIP lesion/no-lesion classifier (timm's pooled head, or
a lesion-map head whose maximum is the logit). Weights only ever come
from a local file, read with `torch.load(weights_only=True)`, so a checkpoint that is really a
pickled program is refused instead of run. Nothing here knows about processes or devices.
"""

from __future__ import annotations

import math

import pickle
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from petctl.errors import PetctlError

SEG_ARCHS = ("swin_unetr", "dynunet", "basic_unet")

SWIN_UNETR_INPUT_KEYS = (
    "swinViT.patch_embed.proj.weight",
    "encoder1.layer.conv1.conv.weight",
    "encoder1.layer.conv3.conv.weight",
)
"""MONAI Swin-UNETR weights that see the input channels (checked against monai 1.6: these are the
only keys whose shape changes with in_channels). `conv3` is the residual 1×1 conv of encoder1."""

DYNUNET_MAX_POOLS = 5
"""nnU-Net's cap on 3-D downsampling steps."""
DYNUNET_MIN_POOL_SIZE = 8
"""An axis is halved only while it is at least this long, so the bottleneck stays ≥ 4 voxels."""


class ModelConfigError(PetctlError, ValueError):
    """A model option or patch size that cannot work: a ValueError the CLI shows as one line."""


def check_patch_size(arch: str, patch: Sequence[int]) -> tuple[int, int, int]:
    """Return `patch` as a 3-tuple if `arch` can take it, else raise `ModelConfigError` saying why.

    swin_unetr: five ×2 downsamplings, so each side must be a multiple of 32, and at least 64: at 32
    the bottleneck is 1×1×1 and its instance norm has a single value to normalise (an error).
    basic_unet: four ×2 downsamplings, multiples of 16. dynunet: strides follow the patch
    (`dynunet_plan`), so each side need only halve evenly for as long as it is pooled.
    """
    _check_arch(arch)
    patch = tuple(int(p) for p in patch)
    if len(patch) != 3 or min(patch) < 1:
        raise ModelConfigError(f"patch size must be three positive sizes (got {patch})")
    if arch == "swin_unetr":
        if any(p % 32 for p in patch):
            raise ModelConfigError(f"swin_unetr needs patch sides divisible by 32 (got {patch}); try 64, 96 or 128")
        if min(patch) < 64:
            raise ModelConfigError(
                f"swin_unetr needs patch sides of at least 64 (got {patch}): at 32 its bottleneck is 1×1×1 "
                "and instance norm fails"
            )
    elif arch == "basic_unet":
        if any(p % 16 for p in patch):
            raise ModelConfigError(f"basic_unet needs patch sides divisible by 16 (got {patch})")
    else:
        if min(patch) < DYNUNET_MIN_POOL_SIZE:
            raise ModelConfigError(f"dynunet needs patch sides of at least {DYNUNET_MIN_POOL_SIZE} (got {patch})")
        sizes = list(patch)
        for _ in range(DYNUNET_MAX_POOLS):
            for axis, size in enumerate(sizes):
                if size >= DYNUNET_MIN_POOL_SIZE and size % 2:
                    raise ModelConfigError(
                        f"dynunet cannot halve patch side {patch[axis]} evenly down to "
                        f"{DYNUNET_MIN_POOL_SIZE // 2}–{DYNUNET_MIN_POOL_SIZE - 1} voxels (got {patch}); "
                        "use a multiple of 16 such as 48, 64, 96 or 128"
                    )
            sizes = [s // 2 if s >= DYNUNET_MIN_POOL_SIZE else s for s in sizes]
    return patch  # type: ignore[return-value]


def dynunet_plan(patch_size: Sequence[int]) -> tuple[list[list[int]], list[list[int]]]:
    """nnU-Net style (kernels, strides) for an isotropic-spacing patch.

    Each level halves every axis that is still ≥ 8 voxels (so it ends at 4–7), at most five times;
    all kernels are 3³ and the first level has stride 1. The number of levels is `len(strides)`.
    """
    sizes = list(check_patch_size("dynunet", patch_size))
    kernels, strides = [[3, 3, 3]], [[1, 1, 1]]
    while len(strides) <= DYNUNET_MAX_POOLS:
        stride = [2 if s >= DYNUNET_MIN_POOL_SIZE else 1 for s in sizes]
        if stride == [1, 1, 1]:
            break
        sizes = [s // st for s, st in zip(sizes, stride)]
        kernels.append([3, 3, 3])
        strides.append(stride)
    return kernels, strides


def build_seg_model(
    arch: str,
    *,
    in_channels: int = 2,
    out_channels: int = 1,
    feature_size: int = 12,
    features: tuple[int, ...] | None = None,
    patch_size: Sequence[int] | None = None,
    gradient_checkpointing: bool = False,
) -> nn.Module:
    """A 3-D segmentation network; input (B, in_channels, *patch), output (B, out_channels, *patch).

    With one output channel the output is the logit of "lesion" for a sigmoid.
    - swin_unetr: MONAI SwinUNETR, the paper's tiny variant at `feature_size=12` (a multiple of 12);
      `gradient_checkpointing` trades compute for activation memory.
    - dynunet: MONAI DynUNet with nnU-Net style kernels/strides from `patch_size` (required);
      `features` are the per-level filters if given (one per level of `dynunet_plan`), else
      nnU-Net's 32·2^level capped at 320. No deep supervision.
    - basic_unet: MONAI BasicUNet with `features` (six widths), default (8, 8, 16, 32, 64, 8).
    `patch_size`, when given, is validated with `check_patch_size` for every arch.
    """
    _check_arch(arch)
    if patch_size is not None:
        patch_size = check_patch_size(arch, patch_size)
    if gradient_checkpointing and arch != "swin_unetr":
        raise ModelConfigError(f"gradient checkpointing is only available for swin_unetr (arch is {arch})")
    if arch == "swin_unetr":
        from monai.networks.nets import SwinUNETR

        return SwinUNETR(
            in_channels=in_channels,
            out_channels=out_channels,
            feature_size=feature_size,
            spatial_dims=3,
            use_checkpoint=gradient_checkpointing,
        )
    if arch == "dynunet":
        from monai.networks.nets import DynUNet

        if patch_size is None:
            raise ModelConfigError("dynunet needs a patch size to plan its strides")
        kernels, strides = dynunet_plan(patch_size)
        filters = list(features) if features is not None else [min(32 * 2**i, 320) for i in range(len(strides))]
        if len(filters) != len(strides):
            raise ModelConfigError(
                f"dynunet at patch {patch_size} has {len(strides)} levels, so it needs {len(strides)} features "
                f"(got {len(filters)}: {tuple(filters)})"
            )
        return DynUNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=kernels,
            strides=strides,
            upsample_kernel_size=strides[1:],
            filters=filters,
            norm_name=("INSTANCE", {"affine": True}),
            deep_supervision=False,
        )
    from monai.networks.nets import BasicUNet

    return BasicUNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        features=tuple(features) if features is not None else (8, 8, 16, 32, 64, 8),
    )


def init_output_prior(model: nn.Module, prior: float = 0.01) -> None:
    """Set the bias of the single-channel output conv so the initial sigmoid equals `prior`.

    Lesion voxels are well under 1% of a patch; starting at p = 0.5 wastes the first hundreds of
    steps on pushing the background down (the RetinaNet prior initialisation for sigmoid heads).
    """
    last = None
    for module in model.modules():
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)) and module.out_channels == 1 and module.bias is not None:
            last = module
    if last is None:
        raise ModelConfigError("no single-channel output convolution with a bias to initialise")
    with torch.no_grad():
        last.bias.fill_(math.log(prior / (1.0 - prior)))


def _check_arch(arch: str) -> None:
    if arch not in SEG_ARCHS:
        raise ModelConfigError(f"unknown segmentation arch {arch!r} (known: {', '.join(SEG_ARCHS)})")


def read_tensor_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a local checkpoint, read with `weights_only=True` and never executed.

    The state dict may sit under `state_dict` or `model`, or be the top level; `module.` prefixes
    (DataParallel / DDP) are stripped and non-tensor entries dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise PetctlError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise PetctlError(f"{path} is not a plain tensor checkpoint (refused by weights_only loading)") from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PetctlError(f"{path}: cannot be read as a torch checkpoint ({first_line})") from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    items = obj.items() if isinstance(obj, Mapping) else ()
    tensors = {_strip_module(str(k)): v for k, v in items if isinstance(v, torch.Tensor)}
    if not tensors:
        raise PetctlError(f"{path}: holds no tensors (expected a state dict)")
    return tensors


def _strip_module(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module.") :]
    return key


def load_pretrained_swin_unetr(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load a public BTCV Swin-UNETR checkpoint (1 input channel, 14 classes) into `model`.

    Input-layer weights (`SWIN_UNETR_INPUT_KEYS`) trained on one channel are repeated over the
    model's input channels and divided by their number: an input whose channels all equal the
    original single channel then gives exactly the original activation, so the pretrained scale is
    kept instead of doubled. The `out.*` head is dropped when its shape differs (14 classes vs 1)
    and keeps its fresh init. Every other shared key must match in shape (a mismatch means another
    feature_size or depth, and is refused). Checkpoint keys the model lacks are skipped.

    Returns {loaded: count of tensors written (adapted included), adapted: [keys], skipped: [keys],
    missing: [model keys the checkpoint does not have]}.
    """

    def adapt(key: str, value: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
        if key not in SWIN_UNETR_INPUT_KEYS or value.shape[1] != 1:
            return None
        if value.shape[0] != target.shape[0] or value.shape[2:] != target.shape[2:]:
            return None
        channels = target.shape[1]
        return value.repeat(1, channels, *([1] * (value.dim() - 2))) / channels

    return _load_matching(
        model, path, read_tensor_checkpoint(path), adapt=adapt, is_head=lambda key: key.startswith("out."),
        mismatch_hint="a different feature_size or input channels?",
    )


def build_classifier(
    name: str = "swin_tiny_patch4_window7_224",
    *,
    in_chans: int = 1,
    img_size: tuple[int, int] = (224, 352),
    pretrained_path: str | Path | None = None,
    drop_rate: float = 0.0,
    head: str = "global",
) -> nn.Module:
    """A timm image classifier with one logit (lesion present), input (B, in_chans, *img_size).

    `head="global"` keeps timm's pooled linear head; `head="lesion_map"` wraps the backbone in a
    `LesionMapClassifier` (pretrained weights are loaded into the backbone first).

    Models that take an `img_size` (Swin, ViT) are built for it; CNNs take any size. timm's Swin
    pads each stage to whole windows, so the ImageNet swin_tiny_patch4_window7_224 runs at 224×352
    with its own window 7 (stages 56×88 … 7×11 are padded on the width) and its pretrained relative
    position tables load unchanged. Never downloads: `pretrained_path` is a local timm state dict,
    loaded by `load_pretrained_classifier`.
    """
    import timm

    if not timm.is_model(name):
        raise ModelConfigError(f"unknown timm model {name!r}")
    kwargs: dict[str, Any] = dict(pretrained=False, num_classes=1, in_chans=in_chans, drop_rate=drop_rate)
    try:
        model = timm.create_model(name, img_size=tuple(img_size), **kwargs)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
        model = timm.create_model(name, **kwargs)
    if pretrained_path is not None:
        load_pretrained_classifier(model, pretrained_path)
    if head == "lesion_map":
        return LesionMapClassifier(model)
    if head != "global":
        raise ModelConfigError(f"classifier head must be global or lesion_map (got {head!r})")
    return model


class LesionMapClassifier(nn.Module):
    """A timm backbone with a feature-pyramid head that draws a lesion map of the MIP.

    The last three stages (strides 8, 16, 32 for ResNets and Swin) are projected to `width`
    channels, summed top-down at stride 8 and turned into one logit per map pixel; the scan's logit
    is the map's maximum (a lesion anywhere makes the scan positive). Training supervises the map
    with the projected lesion mask, so each MIP teaches where as well as whether — far more signal
    per scan than one label when scans are few. `forward(x)` returns (B, 1) like a timm
    classifier; `forward(x, with_map=True)` returns (logit, map (B, 1, H/8, W/8)). timm's own
    head and final norm are pruned, so every parameter takes part in the loss (DDP needs that).
    """

    def __init__(self, backbone: nn.Module, width: int = 32, levels: int = 3) -> None:
        super().__init__()
        num_stages = len(backbone.feature_info)
        self.indices = list(range(num_stages - levels, num_stages))
        backbone.prune_intermediate_layers(self.indices, prune_head=True, prune_norm=True)
        self.backbone = backbone
        channels = [backbone.feature_info[i]["num_chs"] for i in self.indices]
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.map_head = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(width, 1, 1))

    @property
    def map_stride(self) -> int:
        return int(self.backbone.feature_info[self.indices[0]]["reduction"])

    def forward(self, x: torch.Tensor, with_map: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        feats = self.backbone.forward_intermediates(x, indices=self.indices, intermediates_only=True)
        top = self.lateral[-1](feats[-1])
        for lateral, feat in zip(reversed(self.lateral[:-1]), reversed(feats[:-1])):
            top = nn.functional.interpolate(top, size=feat.shape[-2:], mode="nearest") + lateral(feat)
        lesion_map = self.map_head(top)
        logit = lesion_map.flatten(1).amax(1, keepdim=True)
        return (logit, lesion_map) if with_map else logit


def load_pretrained_classifier(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load a local timm state dict (e.g. ImageNet, 3 channels, 1000 classes) into a timm `model`.

    The model family's own checkpoint filter runs first (for Swin: the original Microsoft layout,
    relative position tables resized to other windows). The first conv (named by the model's
    `pretrained_cfg`) is adapted to the model's input channels with timm's `adapt_input_conv`
    (3 → 1 sums the RGB filters); the classifier is dropped when its shape differs. Every other
    shared key must match in shape. Returns the same report as `load_pretrained_swin_unetr`.
    """
    from timm.models import adapt_input_conv

    source = read_tensor_checkpoint(path)
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        source = filter_fn(source, model)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    first_convs = _as_names(cfg.get("first_conv"))
    classifiers = _as_names(cfg.get("classifier"))

    def adapt(key: str, value: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
        if key.rsplit(".", 1)[0] not in first_convs or not key.endswith(".weight") or value.dim() != 4:
            return None
        return adapt_input_conv(target.shape[1], value)

    return _load_matching(
        model, path, source, adapt=adapt, is_head=lambda key: key.rsplit(".", 1)[0] in classifiers,
        mismatch_hint="weights of another timm model?",
    )


def _as_names(value: str | Sequence[str] | None) -> set[str]:
    if value is None:
        return set()
    return {value} if isinstance(value, str) else set(value)


def _load_matching(
    model: nn.Module,
    path: str | Path,
    source: Mapping[str, torch.Tensor],
    *,
    adapt: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor | None],
    is_head: Callable[[str], bool],
    mismatch_hint: str,
) -> dict[str, Any]:
    """Copy `source` into `model`: equal shapes as they are, input layers via `adapt`, a head of
    another shape dropped, any other mismatch refused. Returns the loader report."""
    own = model.state_dict()
    update: dict[str, torch.Tensor] = {}
    adapted: list[str] = []
    skipped: list[str] = []
    for key, value in source.items():
        target = own.get(key)
        if target is None:
            skipped.append(key)
        elif value.shape == target.shape:
            update[key] = value
        elif (changed := adapt(key, value, target)) is not None:
            update[key] = changed
            adapted.append(key)
        elif is_head(key):
            skipped.append(key)
        else:
            raise PetctlError(
                f"{path}: {key} has shape {tuple(value.shape)} in the checkpoint but {tuple(target.shape)} in the "
                f"model ({mismatch_hint})"
            )
    if not update:
        raise PetctlError(f"{path}: none of its keys belong to a {type(model).__name__} (weights of another model?)")
    model.load_state_dict(update, strict=False)
    missing = [k for k in own if k not in source]
    return {"loaded": len(update), "adapted": adapted, "skipped": skipped, "missing": missing}


@contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to `num_threads` (at least 1) inside the block and the caller's
    count back after it, however the block ends: nets stepping side by side on the CPU, each in its own
    Python thread on its share of the cores (`budget.probe_seg_step`, `RunModels.fold_probs`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(num_threads)))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def channels_last(model: torch.nn.Module, enabled: bool = True) -> torch.nn.Module:
    """`model` with channels-last weights (3-D or 2-D, by its first convolution), in place; as is
    when not `enabled` or when it has no convolution. oneDNN then keeps activations NDHWC/NHWC."""
    if not enabled:
        return model
    conv = next((m for m in model.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.Conv2d))), None)
    if conv is None:
        return model
    return model.to(memory_format=torch.channels_last_3d if isinstance(conv, torch.nn.Conv3d) else torch.channels_last)


def as_channels_last(x: torch.Tensor, enabled: bool = True) -> torch.Tensor:
    """A batch (5-D or 4-D) in channels-last memory order when `enabled`."""
    if not enabled or x.dim() not in (4, 5):
        return x
    return x.contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)

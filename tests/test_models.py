"""Model builders, local weight loading (and refusal of pickled programs), and MIPs."""

from __future__ import annotations

import os
import pickle
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from petctl.engine.mip import mip, mip_batch, resize_mip
from petctl.engine.models import (
    SWIN_UNETR_INPUT_KEYS,
    build_classifier,
    as_channels_last,
    build_seg_model,
    channels_last,
    check_patch_size,
    dynunet_plan,
    load_pretrained_classifier,
    load_pretrained_swin_unetr,
    torch_threads,
)
from petctl.errors import PetctlError

torch.set_num_threads(min(2, torch.get_num_threads()))


# --- segmentation models -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch, patch, kwargs",
    [
        ("basic_unet", (32, 32, 32), dict(features=(4, 4, 8, 8, 16, 4))),
        ("dynunet", (32, 32, 32), dict(features=(4, 8, 16, 16))),
        ("swin_unetr", (64, 64, 64), dict(feature_size=12)),
    ],
)
def test_seg_model_forward_shape(arch: str, patch: tuple[int, int, int], kwargs: dict) -> None:
    torch.manual_seed(0)
    model = build_seg_model(arch, patch_size=patch, **kwargs).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 2, *patch))
    assert out.shape == (1, 1, *patch)
    assert torch.isfinite(out).all()


def test_torch_threads_sets_the_count_and_gives_it_back_however_the_block_ends() -> None:
    before = torch.get_num_threads()
    with torch_threads(0):  # a share rounded down to nothing is still one thread
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="inside"):
        with torch_threads(3):
            assert torch.get_num_threads() == 3
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before


def test_channels_last_keeps_the_output_and_the_weights() -> None:
    """Channels-last weights and inputs give the same output, and a state saved from a
    channels-last model loads into a default one (and back) unchanged."""
    torch.manual_seed(0)
    plain = build_seg_model("basic_unet", features=(4, 4, 8, 8, 16, 4), patch_size=(32, 32, 32)).eval()
    fast = build_seg_model("basic_unet", features=(4, 4, 8, 8, 16, 4), patch_size=(32, 32, 32)).eval()
    fast.load_state_dict(plain.state_dict())
    assert channels_last(fast) is fast
    conv = next(m for m in fast.modules() if isinstance(m, torch.nn.Conv3d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d) and not conv.weight.is_contiguous()
    x = torch.randn(2, 2, 32, 32, 32)
    fast_x = as_channels_last(x)
    assert fast_x.is_contiguous(memory_format=torch.channels_last_3d) and torch.equal(fast_x, x)
    with torch.no_grad():
        torch.testing.assert_close(fast(fast_x), plain(x), atol=1e-5, rtol=1e-4)
    again = build_seg_model("basic_unet", features=(4, 4, 8, 8, 16, 4), patch_size=(32, 32, 32))
    again.load_state_dict(fast.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), plain.state_dict().values()))
    net2d = channels_last(build_classifier("resnet10t", in_chans=1, img_size=(64, 48)))
    conv2d = next(m for m in net2d.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv2d.weight.is_contiguous(memory_format=torch.channels_last)
    assert channels_last(plain, enabled=False) is plain
    assert next(m for m in plain.modules() if isinstance(m, torch.nn.Conv3d)).weight.is_contiguous()
    assert as_channels_last(x, enabled=False) is x and as_channels_last(torch.zeros(3, 4)).is_contiguous()


@pytest.mark.parametrize(
    "arch, patch, fragment",
    [
        ("swin_unetr", (96, 96, 80), "divisible by 32"),
        ("swin_unetr", (32, 32, 32), "at least 64"),
        ("swin_unetr", (64, 64, 32), "at least 64"),
        ("basic_unet", (32, 32, 40), "divisible by 16"),
        ("dynunet", (36, 36, 36), "halve"),
        ("dynunet", (4, 32, 32), "at least 8"),
        ("dynunet", (32, 32), "three"),
        ("unet3000", (64, 64, 64), "known: swin_unetr, dynunet, basic_unet"),
    ],
)
def test_check_patch_size_refuses(arch: str, patch: tuple[int, ...], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment) as info:
        check_patch_size(arch, patch)
    assert isinstance(info.value, PetctlError)  # the CLI shows it as one line


@pytest.mark.parametrize(
    "arch, patch", [("swin_unetr", (64, 96, 128)), ("basic_unet", (32, 48, 16)), ("dynunet", (48, 40, 20))]
)
def test_check_patch_size_accepts(arch: str, patch: tuple[int, int, int]) -> None:
    assert check_patch_size(arch, list(patch)) == patch


def test_build_seg_model_refusals() -> None:
    with pytest.raises(ValueError, match="known: swin_unetr, dynunet, basic_unet"):
        build_seg_model("vnet")
    with pytest.raises(ValueError, match="needs a patch size"):
        build_seg_model("dynunet")
    with pytest.raises(ValueError, match="has 4 levels, so it needs 4 features"):
        build_seg_model("dynunet", patch_size=(32, 32, 32), features=(8, 8, 16, 32, 64, 8))
    with pytest.raises(ValueError, match="only available for swin_unetr"):
        build_seg_model("basic_unet", gradient_checkpointing=True)
    with pytest.raises(ValueError, match="at least 64"):
        build_seg_model("swin_unetr", patch_size=(32, 32, 32))


@pytest.mark.parametrize(
    "patch, strides",
    [
        ((32, 32, 32), [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]),
        ((48, 48, 20), [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 1]]),
        ((256, 256, 256), [[1, 1, 1]] + [[2, 2, 2]] * 5),  # capped at five poolings like nnU-Net
    ],
)
def test_dynunet_plan(patch: tuple[int, int, int], strides: list[list[int]]) -> None:
    kernels, got = dynunet_plan(patch)
    assert got == strides
    assert kernels == [[3, 3, 3]] * len(strides)


# --- Swin-UNETR pretrained weights ---------------------------------------------------------------


@pytest.fixture(scope="module")
def btcv_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A fake BTCV Swin-UNETR tiny checkpoint with the public files' key layout (1 in, 14 out)."""
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(1)
    source = SwinUNETR(in_channels=1, out_channels=14, feature_size=12, spatial_dims=3).state_dict()
    path = tmp_path_factory.mktemp("btcv") / "swin_unetr.tiny_5000ep_f12_lr2e-4_pretrained.pt"
    torch.save({"epoch": 5000, "state_dict": {f"module.{k}": v for k, v in source.items()}}, path)
    return path, source


def test_load_pretrained_swin_unetr(btcv_checkpoint: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, source = btcv_checkpoint
    torch.manual_seed(2)
    model = build_seg_model("swin_unetr", in_channels=2, out_channels=1)
    fresh_head = model.state_dict()["out.conv.conv.weight"].clone()

    report = load_pretrained_swin_unetr(model, path)

    state = model.state_dict()
    assert sorted(report["adapted"]) == sorted(SWIN_UNETR_INPUT_KEYS)
    for key in SWIN_UNETR_INPUT_KEYS:
        assert torch.equal(state[key], torch.cat([source[key], source[key]], dim=1) / 2)
    deep = "swinViT.layers4.0.blocks.1.attn.qkv.weight"
    assert torch.equal(state[deep], source[deep])
    assert torch.equal(state["decoder1.conv_block.conv2.conv.weight"], source["decoder1.conv_block.conv2.conv.weight"])
    assert sorted(report["skipped"]) == ["out.conv.conv.bias", "out.conv.conv.weight"]
    assert torch.equal(state["out.conv.conv.weight"], fresh_head)
    assert report["loaded"] == len(source) - 2
    assert report["missing"] == []

    # the 1/in_channels scale: a two-channel input of equal channels sees the original filter's response
    x = torch.randn(1, 1, 4, 4, 4)
    key = "swinViT.patch_embed.proj.weight"
    both = F.conv3d(x.repeat(1, 2, 1, 1, 1), state[key], stride=2)
    torch.testing.assert_close(both, F.conv3d(x, source[key], stride=2))


def test_load_pretrained_swin_unetr_refuses_other_shapes(
    btcv_checkpoint: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    _, source = btcv_checkpoint
    bad = dict(source)
    bad["encoder2.layer.conv1.conv.weight"] = torch.zeros(24, 24, 3, 3, 3)  # as if feature_size were 24
    path = tmp_path / "f24.pt"
    torch.save(bad, path)
    model = build_seg_model("swin_unetr")
    with pytest.raises(PetctlError, match=r"encoder2\.layer\.conv1\.conv\.weight has shape \(24, 24, 3, 3, 3\)"):
        load_pretrained_swin_unetr(model, path)

    torch.save({"model": {"fc.weight": torch.zeros(3, 3)}}, path)
    with pytest.raises(PetctlError, match="none of its keys belong"):
        load_pretrained_swin_unetr(model, path)


class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.mark.parametrize("fmt", ["torch_save", "raw_pickle"])
@pytest.mark.parametrize("loader", ["swin_unetr", "classifier"])
def test_malicious_checkpoint_refused_and_not_run(tmp_path: Path, fmt: str, loader: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    payload = {"state_dict": {"w": _Payload(marker)}}
    if fmt == "torch_save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    assert not marker.exists()

    load = load_pretrained_swin_unetr if loader == "swin_unetr" else load_pretrained_classifier
    refused = r"is not a plain tensor checkpoint \(refused by weights_only loading\)"
    with pytest.raises(PetctlError, match=refused) as info:
        load(torch.nn.Linear(2, 1), path)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_unreadable_checkpoint_is_one_line(tmp_path: Path) -> None:
    model = build_seg_model("basic_unet", features=(4, 4, 8, 8, 16, 4))
    with pytest.raises(PetctlError, match="no such checkpoint file"):
        load_pretrained_swin_unetr(model, tmp_path / "absent.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint at all" * 10)
    with pytest.raises(PetctlError, match="garbage.pt") as info:
        load_pretrained_swin_unetr(model, garbage)
    assert "\n" not in str(info.value)


# --- MIP classifier ------------------------------------------------------------------------------


def test_swin_classifier_224x352_with_local_imagenet_style_weights(tmp_path: Path) -> None:
    import timm

    name = "swin_tiny_patch4_window7_224"
    torch.manual_seed(3)
    imagenet = timm.create_model(name, pretrained=False).state_dict()  # 3 channels, 1000 classes, 224²
    path = tmp_path / "swin_tiny.pth"
    torch.save(imagenet, path)

    model = build_classifier(name, in_chans=1, img_size=(224, 352), pretrained_path=str(path)).eval()
    state = model.state_dict()
    assert torch.equal(state["patch_embed.proj.weight"], imagenet["patch_embed.proj.weight"].sum(dim=1, keepdim=True))
    table = "layers.3.blocks.1.attn.relative_position_bias_table"
    assert torch.equal(state[table], imagenet[table])  # window 7 kept: no resize at 224×352
    assert state["head.fc.weight"].shape == (1, 768)
    with torch.no_grad():
        out = model(torch.randn(2, 1, 224, 352))
    assert out.shape == (2, 1)


def test_cnn_classifier_and_local_weights(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(4)
    rgb = timm.create_model("resnet10t", pretrained=False).state_dict()
    path = tmp_path / "resnet10t.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in rgb.items()}}, path)

    model = build_classifier("resnet10t", in_chans=1, img_size=(224, 352))  # resnets take no img_size
    report = load_pretrained_classifier(model, path)
    assert report["adapted"] == ["conv1.0.weight"]
    assert sorted(report["skipped"]) == ["fc.bias", "fc.weight"]
    assert report["loaded"] == len(rgb) - 2
    state = model.state_dict()
    assert torch.equal(state["conv1.0.weight"], rgb["conv1.0.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(state["layer4.0.conv2.weight"], rgb["layer4.0.conv2.weight"])
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 224, 352)).shape == (2, 1)


def test_lesion_map_classifier_logit_is_the_map_maximum_and_every_parameter_learns() -> None:
    from petctl.engine.models import LesionMapClassifier

    torch.manual_seed(5)
    model = channels_last(build_classifier("resnet10t", in_chans=1, img_size=(64, 48), head="lesion_map"))
    assert isinstance(model, LesionMapClassifier) and model.map_stride == 8
    x = as_channels_last(torch.randn(3, 1, 64, 48))
    logit, lesion_map = model(x, with_map=True)
    assert logit.shape == (3, 1) and lesion_map.shape == (3, 1, 8, 6)
    torch.testing.assert_close(logit[:, 0], lesion_map.flatten(1).amax(1))
    torch.testing.assert_close(model(x), logit)
    (logit.sum() + lesion_map.mean()).backward()
    # timm's head and final norm are pruned: nothing is left without a gradient (DDP would refuse)
    assert all(p.grad is not None for p in model.parameters())
    assert not any(name.startswith(("backbone.fc.", "backbone.head")) for name, _ in model.named_parameters())
    with pytest.raises(ValueError, match="global or lesion_map"):
        build_classifier("resnet10t", head="patches")


def test_lesion_map_swin_loads_local_weights_into_its_backbone(tmp_path: Path) -> None:
    import timm

    name = "swin_tiny_patch4_window7_224"
    torch.manual_seed(6)
    imagenet = timm.create_model(name, pretrained=False).state_dict()
    path = tmp_path / "swin_tiny.pth"
    torch.save(imagenet, path)
    model = build_classifier(name, in_chans=1, img_size=(224, 352), pretrained_path=str(path), head="lesion_map").eval()
    state = model.state_dict()
    assert torch.equal(state["backbone.patch_embed.proj.weight"], imagenet["patch_embed.proj.weight"].sum(dim=1, keepdim=True))
    table = "layers.3.blocks.1.attn.relative_position_bias_table"
    assert torch.equal(state[f"backbone.{table}"], imagenet[table])
    with torch.no_grad():
        logit, lesion_map = model(torch.randn(1, 1, 224, 352), with_map=True)
    assert logit.shape == (1, 1) and lesion_map.shape == (1, 1, 28, 44)


def test_build_classifier_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown timm model"):
        build_classifier("not_a_model_xyz")


# --- MIPs ----------------------------------------------------------------------------------------

SHAPE = (5, 6, 7)  # X, Y, Z
VOXEL = (1, 2, 5)  # x, y, z of the bright voxel


@pytest.mark.parametrize(
    "axis, shape, pixel",
    [
        ("y", (7, 5), (7 - 1 - 5, 1)),  # coronal: rows z (head up), cols x
        ("x", (7, 6), (7 - 1 - 5, 2)),  # sagittal: rows z (head up), cols y
        ("z", (6, 5), (6 - 1 - 2, 1)),  # axial: rows y (anterior up), cols x
    ],
)
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_mip_layout(axis: str, shape: tuple[int, int], pixel: tuple[int, int], kind: str) -> None:
    volume = np.zeros(SHAPE, np.float32)
    volume[VOXEL] = 5.0
    volume[VOXEL[0], VOXEL[1], 0] = 1.0  # dimmer voxel at the feet, hidden behind nothing on x/y MIPs
    image = mip(volume if kind == "numpy" else torch.from_numpy(volume), axis)
    assert isinstance(image, np.ndarray if kind == "numpy" else torch.Tensor)
    image = np.asarray(image)
    assert image.shape == shape
    assert image[pixel] == 5.0
    assert np.unravel_index(np.argmax(image), shape) == pixel
    if axis != "z":
        assert image[-1, pixel[1]] == 1.0  # feet on the last row


def test_mip_takes_the_maximum_along_the_ray() -> None:
    volume = np.zeros(SHAPE, np.float32)
    volume[2, :, 3] = [0.1, 0.9, 0.3, 0.2, 0.4, 0.5]
    assert mip(volume, "y")[7 - 1 - 3, 2] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="x, y, z"):
        mip(volume, "coronal")


@pytest.mark.parametrize("axis", ["x", "y", "z"])
def test_mip_batch_equals_per_volume(axis: str) -> None:
    volumes = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(5))
    batch = mip_batch(volumes, axis)
    assert batch.shape[:2] == (3, 1)
    for b in range(3):
        assert torch.equal(batch[b, 0], mip(volumes[b], axis))


def test_resize_mip() -> None:
    out = resize_mip(torch.full((2, 1, 40, 30), 3.0))
    assert out.shape == (2, 1, 352, 224)
    torch.testing.assert_close(out, torch.full_like(out, 3.0))
    assert resize_mip(torch.zeros(1, 1, 40, 30, dtype=torch.float16)).dtype == torch.float16
    assert resize_mip(torch.ones(1, 1, 8, 8, dtype=torch.uint8), (4, 4)).dtype == torch.float32
    gradient = torch.linspace(0, 1, 224).expand(1, 1, 352, 224)
    assert torch.equal(resize_mip(gradient), gradient)  # already the classifier's size (the presets' H, W)


def test_shrinking_a_mip_keeps_every_thin_hot_spot_at_its_peak() -> None:
    """600 rows of a paper-preset coronal MIP to 352: bilinear sampling alone kept 15-100 % of a
    one-row hot spot (and a lesion's label MIP fell under 0.5, an empty map target)."""
    for row in range(200, 220):
        img = torch.zeros(1, 1, 600, 294)
        img[0, 0, row, 100:105] = 1.0
        out = resize_mip(img, (352, 224))
        assert out.shape == (1, 1, 352, 224) and float(out.max()) == 1.0, row
    # one axis shrinks, the other grows: the maximum over the shrunk axis, then bilinear
    img = torch.zeros(1, 1, 100, 50)
    img[0, 0, 37, :] = 2.0
    out = resize_mip(img, (40, 80))
    assert out.shape == (1, 1, 40, 80) and torch.allclose(out.amax(dim=2), torch.full((1, 1, 80), 2.0))
    # an enlarged MIP (cpu-small's 160 × 96 from ~134 × 92) is plain bilinear, as before
    small = torch.rand(1, 1, 134, 92)
    torch.testing.assert_close(resize_mip(small, (160, 96)), torch.nn.functional.interpolate(small, (160, 96), mode="bilinear"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mip_on_gpu_matches_cpu() -> None:
    volumes = torch.rand(2, 16, 12, 20)
    for axis in ("x", "y", "z"):
        gpu = resize_mip(mip_batch(volumes.cuda(), axis), (32, 48))
        assert gpu.is_cuda
        torch.testing.assert_close(gpu.cpu(), resize_mip(mip_batch(volumes, axis), (32, 48)))


def test_a_classifier_saved_before_the_max_shrink_keeps_its_bilinear_mips() -> None:
    from petctl.engine.config import TrainConfig, cpu_small

    saved = cpu_small().to_json()
    assert TrainConfig.from_json(saved).cls_mip_shrink == "max"
    del saved["cls_mip_shrink"]  # a config written before the field
    assert TrainConfig.from_json(saved).cls_mip_shrink == "bilinear"
    img = torch.rand(1, 1, 600, 294)
    torch.testing.assert_close(resize_mip(img, (352, 224), "bilinear"),
                               torch.nn.functional.interpolate(img, (352, 224), mode="bilinear", align_corners=False))
    with pytest.raises(ValueError, match="shrink must be max or bilinear"):
        resize_mip(img, (352, 224), "area")

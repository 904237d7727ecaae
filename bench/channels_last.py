"""Benchmark: one training step of the cpu-small networks, channels-last against the default layout.

The CPU presets keep activations channels-last (`TrainConfig.channels_last`): oneDNN's 3-D
convolution backward is much faster on NDHWC than on NCDHW. This times, in the same run and
single-threaded (as each demo fold runs), a full NAdam + BCE step of the cpu-small BasicUNet
(8,8,16,32,64,8) on a batch of the preset's size (4; 8 before 9a643f6) of random 32³ patches, and of the resnet10t MIP
classifier on 8 MIPs of 160×96, in both layouts, best of a few repetitions, after checking that
both layouts give the same output. Last line:
`RESULT channels_last seg_step_ratio=R cls_step_ratio=C` (default-layout time / channels-last time).

    .venv/bin/python bench/channels_last.py [--quick]
"""

from __future__ import annotations

import _common  # noqa: I001 — must come first: pins thread pools before numpy is imported

_common.pin_threads()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

from petctl.engine.classifier import build_classifier_for  # noqa: E402
from petctl.engine.config import cpu_small  # noqa: E402
from petctl.engine.models import as_channels_last, build_seg_model, channels_last  # noqa: E402


def step_time(build: Callable[[], torch.nn.Module], x: torch.Tensor, y: torch.Tensor, fast: bool, repeats: int) -> float:
    """Best seconds of one forward + backward + NAdam step (after one warm-up step)."""
    torch.manual_seed(0)
    model = channels_last(build(), fast)
    opt = torch.optim.NAdam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    x = as_channels_last(x, fast)
    best = float("inf")
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            best = min(best, time.perf_counter() - t0)
    return best


def same_output(build: Callable[[], torch.nn.Module], x: torch.Tensor) -> float:
    torch.manual_seed(0)
    plain = build().eval()
    fast = channels_last(build().eval())
    fast.load_state_dict(plain.state_dict())
    with torch.no_grad():
        return float((plain(x) - fast(as_channels_last(x))).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    _common.pin_torch_threads()
    repeats = 2 if args.quick else 5
    cfg = cpu_small().with_image_channels(2)  # CT and PET, and the position channels when the preset has them
    g = torch.Generator().manual_seed(0)

    def seg() -> torch.nn.Module:
        return build_seg_model(cfg.arch, in_channels=cfg.in_channels, features=cfg.features, patch_size=cfg.patch_size)

    def cls() -> torch.nn.Module:
        return build_classifier_for(dataclasses.replace(cfg, channels_last=False))

    xs = torch.randn((cfg.batch_size, cfg.in_channels, *cfg.patch_size), generator=g)
    ys = (torch.rand((cfg.batch_size, 1, *cfg.patch_size), generator=g) > 0.95).float()
    xc = torch.randn((cfg.cls_batch_size, 1, *cfg.cls_img_size), generator=g)
    yc = (torch.rand((cfg.cls_batch_size, 1), generator=g) > 0.5).float()
    ratios = {}
    for name, build, x, y in (("seg", seg, xs, ys), ("cls", cls, xc, yc)):
        diff = same_output(build, x[:2])
        if diff > 1e-3:
            raise SystemExit(f"{name}: channels-last output differs from the default layout by {diff:.2e}")
        plain_s = step_time(build, x, y, False, repeats)
        fast_s = step_time(build, x, y, True, repeats)
        ratios[name] = plain_s / fast_s
        print(f"{name}: {tuple(x.shape)} step default layout {plain_s * 1e3:7.1f} ms, channels-last {fast_s * 1e3:7.1f} ms "
              f"→ {ratios[name]:.2f}× (outputs agree to {diff:.1e}), best of {repeats}, 1 thread")
    print(f"RESULT channels_last seg_step_ratio={ratios['seg']:.2f} cls_step_ratio={ratios['cls']:.2f}")


if __name__ == "__main__":
    main()

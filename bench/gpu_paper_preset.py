"""The paper preset on one GPU: train steps per second and peak memory, and one sliding-window prediction.

Needs a CUDA GPU. Measures, for Swin-UNETR tiny (feature size 12, 2 inputs, 1 sigmoid output) at
96³ and batch 4 with NAdam + BCE as `autopet-paper` trains it:
- fwd+bwd+step time and peak memory in fp32 and bf16 autocast (RESULT ... ratio_bf16_vs_fp32);
- sliding-window inference (overlap 0.5, gaussian, batch 2 windows) over a whole-body volume at
  2.04×2.04×3 mm (256×256×326 voxels, about a 52×52×98 cm field of view).
The end-to-end chain (prepare → train → predict) with this preset is run by the script's caller
through the CLI (see README "GPU").

    python bench/gpu_paper_preset.py [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> int:
    import torch
    from monai.inferers import sliding_window_inference

    from petctl.engine.config import preset
    from petctl.engine.models import build_seg_model, init_output_prior

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--volume", default="256,256,326")
    ap.add_argument("--quick", action="store_true", help="fewer timed steps (make bench)")
    args = ap.parse_args()
    if args.quick:
        args.steps = min(args.steps, 10)
    if not torch.cuda.is_available():
        print("RESULT gpu_paper_preset skipped=no_cuda")
        return 0
    dev = torch.device("cuda")
    cfg = preset("autopet-paper")
    torch.backends.cudnn.benchmark = True
    out: dict[str, object] = {"device": torch.cuda.get_device_name(0), "preset": cfg.preset, "patch": cfg.patch_size,
                              "batch": cfg.batch_size}

    def train_rate(precision: str) -> tuple[float, float]:
        torch.manual_seed(0)
        model = build_seg_model(cfg.arch, feature_size=cfg.feature_size, patch_size=cfg.patch_size).to(dev)
        init_output_prior(model, cfg.output_prior)
        opt = torch.optim.NAdam(model.parameters(), lr=cfg.lr)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        x = torch.randn(cfg.batch_size, 2, *cfg.patch_size, device=dev)
        y = (torch.rand(cfg.batch_size, 1, *cfg.patch_size, device=dev) > 0.98).float()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(args.steps + 3):
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = loss_fn(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            torch.cuda.synchronize()
            if i >= 3:
                times.append(time.perf_counter() - t)
        times.sort()
        return times[len(times) // 2], torch.cuda.max_memory_allocated() / 2**30

    for precision in ("fp32", "bf16"):
        step_s, mem = train_rate(precision)
        out[f"{precision}_step_s"] = round(step_s, 4)
        out[f"{precision}_samples_per_s"] = round(cfg.batch_size / step_s, 1)
        out[f"{precision}_peak_gib"] = round(mem, 2)
        print(f"{precision}: {step_s * 1000:.1f} ms/step (batch {cfg.batch_size}), {cfg.batch_size / step_s:.1f} samples/s, peak {mem:.2f} GiB", flush=True)

    model = build_seg_model(cfg.arch, feature_size=cfg.feature_size, patch_size=cfg.patch_size).to(dev).eval()
    shape = tuple(int(v) for v in args.volume.split(","))
    volume = torch.randn(1, 2, *shape, device=dev)
    for precision in ("fp32", "bf16"):
        torch.cuda.reset_peak_memory_stats()
        best = float("inf")
        for _ in range(2):
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                probs = torch.sigmoid(sliding_window_inference(volume, cfg.patch_size, cfg.sw_batch_size, model,
                                                               overlap=cfg.sw_overlap, mode="gaussian").float())
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        out[f"sw_{precision}_s"] = round(best, 3)
        out[f"sw_{precision}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        print(f"sliding window {shape} {precision}: {best:.2f} s, peak {out[f'sw_{precision}_peak_gib']} GiB, mean p {float(probs.mean()):.4f}", flush=True)
    print(json.dumps(out))
    print(f"RESULT gpu_paper_preset train_samples_per_s_bf16={out['bf16_samples_per_s']} ratio_bf16_vs_fp32="
          f"{out['fp32_step_s'] / out['bf16_step_s']:.2f} sliding_window_s_bf16={out['sw_bf16_s']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training through `accelerate launch`: real 2-process gloo DDP, SIGTERM + resume, checkpoints."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from petctl.engine.config import TrainConfig, cpu_tiny, preset
from petctl.engine.launch import launch_command
from petctl.engine.loop import Position, find_checkpoint, load_checkpoint, save_checkpoint
from petctl.errors import PetctlError


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "HF_HOME": str(tmp_path / "hf"), "PETCTL_HOME": str(tmp_path / "home"),
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train(store: Path, tmp_path: Path, *extra: str, processes: int = 1, run: str = "t") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "petctl", "train", "--store", str(store), "--fold", "0", "--preset", "cpu-tiny",
           "--processes", str(processes), "--run", run, *extra]
    return subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=600)


@pytest.mark.ddp
@pytest.mark.parametrize("attempt", range(3))
def test_two_process_gloo_ddp_keeps_weights_identical(store: Path, tmp_path: Path, attempt: int):
    result = _train(store, tmp_path, "--max-steps", "3", processes=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "terminate called" not in result.stderr
    meta = json.loads((tmp_path / "home/runs/t/seg/fold0/checkpoints/last/meta.json").read_text())
    assert meta["num_processes"] == 2
    digests = meta["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert meta["position"]["global_step"] == 3


def test_full_fold_records_metrics_and_registry(store: Path, tmp_path: Path):
    result = _train(store, tmp_path, "--lesion-dim", "0.5")  # the fold also dims lesions (sampling's tests check how)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    fold = tmp_path / "home/runs/t/seg/fold0"
    metrics = json.loads((fold / "metrics.json").read_text())
    cfg = cpu_tiny()
    assert [c["cycle"] for c in metrics["cycles"]] == list(range(1, cfg.num_cycles + 1))
    assert 0.0 <= metrics["best"]["top_k_auroc"] <= 1.0
    # the training curve between validations: one record per epoch, the cycles' validations on its axis
    epochs = metrics["epochs"]
    assert [e["epoch"] for e in epochs] == list(range(1, cfg.num_cycles * cfg.epochs_per_cycle + 1))
    assert all(math.isfinite(e["train_loss"]) and e["lr"] > 0 and e["steps"] > 0 for e in epochs)
    assert [c["epoch"] for c in metrics["cycles"]] == [k * cfg.epochs_per_cycle for k in range(1, cfg.num_cycles + 1)]
    assert epochs[-1]["global_step"] == metrics["cycles"][-1]["global_step"] == sum(e["steps"] for e in epochs)
    assert (fold / "progress.png").stat().st_size > 1000
    assert find_checkpoint(fold / "checkpoints" / "best") is not None
    assert json.loads((fold / "checkpoints" / "last" / "meta.json").read_text())["config"]["lesion_dim"] == 0.5
    # `last` resumes (optimizer + scheduler), `best` is for inference: weights and sidecar only
    assert sorted(p.name for p in (fold / "checkpoints" / "last").iterdir()) == ["meta.json", "model.pt", "training_state.pt"]
    assert sorted(p.name for p in (fold / "checkpoints" / "best").iterdir()) == ["meta.json", "model.pt"]
    step = json.loads((tmp_path / "home/runs/t/steps/train-seg-fold0.json").read_text())
    assert step["status"] == "done" and "top_k_auroc" in step["metrics"]
    assert "Table 1" in result.stdout


def test_a_deadline_past_cuts_the_last_cycle_to_its_floor_and_the_cosine_still_ends(store: Path, tmp_path: Path):
    """PETCTL_TRAIN_DEADLINE already past: at its first check the fold cuts its cycle to 80 % of the
    planned steps (`LoopConfig.deadline_min_share`), the rate still falls to its minimum there, and the
    metrics record the cut and the time a step."""
    from petctl.engine.folds import DEADLINE_ENV
    from petctl.engine.loop import DEADLINE_CHECK, DEADLINE_WARMUP

    cmd = [sys.executable, "-m", "petctl", "train", "--store", str(store), "--fold", "0", "--preset", "cpu-tiny",
           "--cycles", "1", "--epochs", "40", "--run", "d"]
    result = subprocess.run(cmd, env={**_env(tmp_path), DEADLINE_ENV: repr(time.time() - 1.0)}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / "home/runs/d/seg/fold0/metrics.json").read_text())
    cycle = metrics["cycles"][-1]
    planned = cycle["deadline_cut"]["planned_steps"]
    assert 0.8 * planned > DEADLINE_WARMUP + DEADLINE_CHECK  # the cut (to 80 %) falls after the first check
    assert cycle["deadline_cut"]["steps"] == cycle["global_step"] == math.ceil(0.8 * planned)
    assert sum(e["steps"] for e in metrics["epochs"]) == cycle["global_step"] and len(metrics["epochs"]) < 40
    cfg = cpu_tiny()
    assert cycle["lr_end"] == pytest.approx(cfg.lr * cfg.lr_min_ratio)  # the cosine ran on to its minimum
    assert cycle["step_seconds"] > 0 and "past the deadline at this pace" in result.stdout
    step = json.loads((tmp_path / "home/runs/d/steps/train-seg-fold0.json").read_text())
    assert step["status"] == "done"
    # a bad deadline is one clear line
    bad = subprocess.run(cmd[:-1] + ["e"], env={**_env(tmp_path), DEADLINE_ENV: "soon"}, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and f"{DEADLINE_ENV}='soon'" in bad.stdout + bad.stderr


@pytest.mark.ddp
def test_hard_lesion_mining_under_two_process_ddp(store: Path, tmp_path: Path):
    # every rank folds all ranks' lesion-patch recalls in the same order: the miss rates the
    # checkpoint keeps come from both ranks' patches, and the weights stay identical
    result = _train(store, tmp_path, "--cycles", "1", "--epochs", "2", "--hard-lesion-gain", "3", processes=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    fold = tmp_path / "home/runs/t/seg/fold0"
    meta = json.loads((fold / "checkpoints/last/meta.json").read_text())
    assert meta["config"]["hard_lesion_gain"] == 3.0
    digests = meta["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    from petctl.engine.trainer import read_fold

    train_cases, _ = read_fold(store, 0)
    rates = meta["sampler_state"]
    assert sorted(rates) == sorted(train_cases)
    # the tiny nets miss lesions: the recalls were folded in (rates off 0), and every rate is a share
    assert any(r > 0 for v in rates.values() for r in v) and all(0.0 <= r <= 1.0 for v in rates.values() for r in v)
    epochs = json.loads((fold / "metrics.json").read_text())["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert all(0.0 <= e["lesion_patch_recall"] <= 1.0 and e["hard_lesions"] >= 0 for e in epochs)
    # with the mining off (the default) nothing is tracked
    plain = _train(store, tmp_path, "--cycles", "1", "--epochs", "1", run="plain")
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]
    plain_meta = json.loads((tmp_path / "home/runs/plain/seg/fold0/checkpoints/last/meta.json").read_text())
    assert plain_meta["sampler_state"] is None
    assert "lesion_patch_recall" not in json.loads((tmp_path / "home/runs/plain/seg/fold0/metrics.json").read_text())["epochs"][0]


def test_sigterm_checkpoints_and_rerun_resumes(store: Path, tmp_path: Path):
    cmd = [sys.executable, "-m", "petctl", "train", "--store", str(store), "--fold", "0", "--preset", "cpu-tiny",
           "--cycles", "1", "--epochs", "40", "--run", "r"]
    proc = subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:  # wait until training is under way
        seen.append(line)
        if " step " in line and "loss" in line:
            break
    proc.send_signal(signal.SIGTERM)  # what SLURM (or a user's kill) sends
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, "".join(seen) + out
    assert "re-run the same command to resume" in out
    ckpt = tmp_path / "home/runs/r/seg/fold0/checkpoints/last"
    _, state, meta = load_checkpoint(ckpt)
    stopped_at = meta["position"]["global_step"]
    assert stopped_at >= 10 and state["optimizer"] is not None
    step = json.loads((tmp_path / "home/runs/r/steps/train-seg-fold0.json").read_text())
    assert step["status"] == "pending" and "stopped by signal" in step["message"]
    resumed = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"step {stopped_at}" in resumed.stdout
    _, _, meta = load_checkpoint(ckpt)
    assert meta["position"]["cycle"] == 1 and meta["position"]["global_step"] == meta["history"][0]["global_step"] > stopped_at
    # the epochs logged before the signal came back with the checkpoint: the curve has every epoch once
    assert [e["epoch"] for e in meta["epochs"]] == list(range(1, 41))
    step = json.loads((tmp_path / "home/runs/r/steps/train-seg-fold0.json").read_text())
    assert step["status"] == "done" and step["attempts"] == 2


def test_checkpoint_is_atomic_and_old_copy_is_found(tmp_path: Path):
    cfg = cpu_tiny()
    state = {"w": torch.ones(3)}
    save_checkpoint(tmp_path / "last", model_state=state, optimizer_state=None, scheduler_state=None,
                    position=Position(1, 0, 0, 5), config=cfg.to_json(), metric=0.5)
    # a save killed after moving the old copy aside: the old copy is still found
    os.replace(tmp_path / "last", tmp_path / ".last.old-123")
    found = find_checkpoint(tmp_path / "last")
    assert found is not None and load_checkpoint(found)[2]["position"]["global_step"] == 5
    assert not list(tmp_path.glob(".last.tmp-*"))
    # the next save (as the resumed run makes) sweeps what killed saves left: the old copy, a half temp
    (tmp_path / ".last.tmp-456").mkdir()
    (tmp_path / ".last.tmp-456" / "model.pt").write_bytes(b"half")
    (tmp_path / ".best.old-9").mkdir()  # another checkpoint's copy is not this save's to remove
    save_checkpoint(tmp_path / "last", model_state=state, optimizer_state=None, scheduler_state=None,
                    position=Position(1, 0, 0, 6), config=cfg.to_json(), metric=0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".best.old-9", "last"]
    assert load_checkpoint(find_checkpoint(tmp_path / "last"))[2]["position"]["global_step"] == 6


def test_malicious_checkpoint_is_refused(tmp_path: Path):
    from petctl.errors import PetctlError

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "ck").mkdir()
    torch.save({"x": Evil()}, tmp_path / "ck" / "model.pt")
    (tmp_path / "ck" / "meta.json").write_text("{}")
    with pytest.raises(PetctlError, match="cannot be loaded safely"):
        load_checkpoint(tmp_path / "ck")
    assert not marker.exists()


def test_presets_and_validation():
    assert preset("autopet-paper").arch == "swin_unetr" and preset("autopet-paper").patch_size == (96, 96, 96)
    assert preset("cpu-small").arch == "basic_unet"
    # channels-last on the CPU presets only: the paper preset's GPU step was measured without it
    assert preset("cpu-small").channels_last and preset("cpu-tiny").channels_last and not preset("autopet-paper").channels_last
    from petctl.errors import PetctlError

    with pytest.raises(PetctlError):
        preset("nope")
    with pytest.raises(PetctlError):
        TrainConfig(loss="focal")
    with pytest.raises(PetctlError, match="cls_head must be global or lesion_map"):
        TrainConfig(cls_head="patches")
    with pytest.raises(PetctlError, match="cls_map_weight"):
        TrainConfig(cls_map_weight=-1.0)
    assert TrainConfig.from_json(cpu_tiny().to_json()) == cpu_tiny()
    # the paper's preset keeps timm's pooled head, the CPU ones the lesion-map head (cpu-tiny as
    # cpu-small, so the tests run the demo's classifier), and a config written before the field reads as global
    assert preset("autopet-paper").cls_head == "global"
    assert preset("cpu-small").cls_head == "lesion_map" == cpu_tiny().cls_head
    old = {k: v for k, v in cpu_tiny().to_json().items() if k not in ("cls_head", "cls_map_weight")}
    assert TrainConfig.from_json(old).cls_head == "global"


def test_launch_command_shapes():
    cpu2 = launch_command(processes=2, cpu=True)
    assert "--multi_gpu" in cpu2 and cpu2[cpu2.index("--num_processes") + 1] == "2" and "--cpu" not in cpu2
    one = launch_command(processes=1, cpu=True)
    assert "--multi_gpu" not in one and "--cpu" in one
    multi = launch_command(processes=8, nodes=2, machine_rank="$SLURM_NODEID", main_address="node1")
    assert multi[multi.index("--machine_rank") + 1] == "$SLURM_NODEID" and "node1" in multi


def test_classifier_folds_train_per_projection(store: Path, tmp_path: Path):
    result = _train(store, tmp_path, "--task", "cls", run="c")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((tmp_path / "home/runs/c/cls/fold0-x/train_config.json").read_text())["cls_head"] == "lesion_map"  # cpu-tiny's, as cpu-small's
    for axis in ("x", "y"):
        metrics = json.loads((tmp_path / f"home/runs/c/cls/fold0-{axis}/metrics.json").read_text())
        assert metrics["selection"] == "auroc" and metrics["config"]["projection"] == axis
        scores = metrics["cycles"][-1]["val_scores"]
        assert scores and all(0.0 <= r["score"] <= 1.0 for r in scores)
        step = json.loads((tmp_path / f"home/runs/c/steps/train-cls-fold0-{axis}.json").read_text())
        assert step["status"] == "done"
    assert "MIP classifier folds" in result.stdout


def test_lesion_map_classifier_learns_from_the_projected_masks_and_reloads(store: Path, tmp_path: Path, monkeypatch):
    from dataclasses import replace

    from petctl.engine.classifier import build_classifier_for, fit_cls
    from petctl.engine.models import LesionMapClassifier

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    states = {}
    for weight in (0.0, 1.0):
        cfg = replace(cpu_tiny(), cls_head="lesion_map", cls_map_weight=weight)
        out = tmp_path / f"w{weight}"
        assert fit_cls(cfg, store, 0, "y", out, max_steps=2) == 0
        state, _, meta = load_checkpoint(find_checkpoint(out / "checkpoints" / "last"))
        model = build_classifier_for(TrainConfig.from_json(meta["config"]))  # as the ensemble rebuilds it
        assert isinstance(model, LesionMapClassifier)
        model.load_state_dict(state)
        with torch.no_grad():
            assert model.eval()(torch.randn(1, 1, *cfg.cls_img_size)).shape == (1, 1)
        states[weight] = state
    # same seed, same batches: only the lesion-map loss can make the two runs' weights differ
    assert any(not torch.equal(states[0.0][k], states[1.0][k]) for k in states[0.0])


def test_one_classifier_on_both_views_trains_scores_and_reloads(store: Path, tmp_path: Path, monkeypatch):
    """`cls_projections=("xy",)`: one model per fold learns from every scan's x and y MIPs (a batch of
    cls_batch_size views, half as many scans) and scores a scan by the mean of its views."""
    from dataclasses import replace

    from petctl.engine.classifier import ClsTask, build_classifier_for, fit_cls, pet_mip
    from petctl.engine.ensemble import LoadedModel, RunModels
    from petctl.engine.mip import mip_batch, resize_mip
    from petctl.engine.store import CaseStore
    from petctl.engine.trainer import read_fold

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cfg = replace(cpu_tiny(), cls_projections=("xy",), cls_batch_size=4)
    train, val = read_fold(store, 0, task="cls")

    class _Acc:
        process_index, num_processes = 0, 1

    task = ClsTask(cfg, store, "xy", train, val, _Acc())
    assert task.views == ("x", "y") and task.cases_per_batch == 2 and task.steps_per_epoch == -(-len(train) // 2)
    batch = next(task.batches(0))
    seen = []
    model = build_classifier_for(cfg)
    forward = model.forward
    model.forward = lambda x, **k: (seen.append(x.shape), forward(x, **k))[1]
    task.loss(model, batch, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert len(batch) == 2 and seen[-1][0] == 4  # two scans × two views

    out = tmp_path / "xy"
    assert fit_cls(cfg, store, 0, "xy", out, max_steps=2) == 0
    state, _, meta = load_checkpoint(find_checkpoint(out / "checkpoints" / "last"))
    assert meta["config"]["projection"] == "xy"
    model = build_classifier_for(TrainConfig.from_json(meta["config"]))
    model.load_state_dict(state)
    model.eval()
    case = CaseStore(store).list()[0]
    pet = torch.from_numpy(CaseStore(store).load(case).image.read_all()[1]).float()
    with torch.no_grad():
        views = [float(torch.sigmoid(model(resize_mip(mip_batch(pet[None], a), cfg.cls_img_size)))[0, 0]) for a in ("x", "y")]
        assert torch.allclose(pet_mip(CaseStore(store), case, "x", cfg.cls_img_size, torch.device("cpu")),
                              resize_mip(mip_batch(pet[None], "x"), cfg.cls_img_size)[0])
    models = RunModels(run_dir=tmp_path, seg=[], cls=[LoadedModel("fold0-xy", 0, cfg, model, "xy")])
    assert models.cls_score(pet) == pytest.approx(sum(views) / 2, abs=1e-6)
    for bad in (("xx",), ("w",), ("x", "x"), ()):
        with pytest.raises(PetctlError, match="cls_projections"):
            replace(cpu_tiny(), cls_projections=bad)
    with pytest.raises(PetctlError, match="a projection is one or more distinct axes"):
        fit_cls(cfg, store, 0, "xw", tmp_path / "bad")


def test_mip_of_augmented_volume_keeps_layout(store: Path):
    from petctl.engine.classifier import pet_mip
    from petctl.engine.store import CaseStore

    s = CaseStore(store)
    case = s.list()[0]
    image = pet_mip(s, case, "y", (96, 64), torch.device("cpu"))
    assert image.shape == (1, 96, 64) and torch.isfinite(image).all()


def test_overrides_set_the_counts_of_the_task_and_nothing_else():
    from petctl.engine.config import preset, with_overrides

    base = preset("cpu-small")
    seg = with_overrides(base, task="seg", cycles=3, epochs=2, mixed_precision="bf16")
    assert (seg.num_cycles, seg.epochs_per_cycle, seg.mixed_precision) == (3, 2, "bf16")
    assert (seg.cls_num_cycles, seg.cls_epochs_per_cycle) == (base.cls_num_cycles, base.cls_epochs_per_cycle)
    cls = with_overrides(base, task="cls", cycles=4)
    assert (cls.cls_num_cycles, cls.num_cycles, cls.cls_epochs_per_cycle) == (4, base.num_cycles, base.cls_epochs_per_cycle)
    assert with_overrides(base) == base


def test_lesion_dimming_reaches_the_pet_channels_of_the_folds_augmentation():
    from petctl.engine.config import preset, with_overrides
    from petctl.engine.trainer import seg_augment

    base = preset("cpu-small")
    assert base.lesion_dim == 0.0 and seg_augment(base.with_image_channels(2)).p_lesion_dim == 0.0
    dim = with_overrides(base, lesion_dim=0.3)
    assert (dim.lesion_dim, dim.hard_lesion_gain) == (0.3, base.hard_lesion_gain)
    two, wide = seg_augment(dim.with_image_channels(2)), seg_augment(dim.with_image_channels(3))  # CT, PET (+ the wide PET)
    assert (two.p_lesion_dim, two.lesion_dim_channels, wide.lesion_dim_channels) == (0.3, (1,), (1, 2))
    assert seg_augment(replace(dim, position_channels=False, in_channels=3)).lesion_dim_channels == (1, 2)
    # the contrast floor maps the PET channel back to SUV with the store's normalization
    fingerprint = {"pet": {"mean": 6.6, "std": 3.2, "clip": [0.9, 13.2]}}
    assert two.lesion_dim_suv is None and seg_augment(dim.with_image_channels(2), fingerprint).lesion_dim_suv == (6.6, 3.2)
    with pytest.raises(PetctlError, match="lesion_dim"):
        replace(base, lesion_dim=1.5)


def test_the_deadline_pace_cuts_only_what_does_not_fit_and_gives_steps_back():
    from petctl.engine.loop import LoopConfig, deadline_end

    now = time.time()
    cfg = LoopConfig(num_cycles=1, epochs_per_cycle=10, lr=1e-3, deadline=now + 100.0)
    assert deadline_end(cfg, 200, 0.45, 400) == 400  # 200 steps left at 0.45 s: 90 s, it fits
    assert deadline_end(cfg, 200, 0.6, 400) == pytest.approx(366, abs=1)  # at 0.6 s a step, 166 more
    assert deadline_end(cfg, 200, 10.0, 400) == 320  # never below 80 % of the plan
    late = LoopConfig(num_cycles=1, epochs_per_cycle=10, lr=1e-3, deadline=now - 5.0)
    assert deadline_end(late, 100, 0.5, 400) == 320  # past it: the floor
    assert deadline_end(late, 390, 0.5, 400) == 391  # past the floor already: the next step


def test_classifier_folds_start_from_local_timm_weights(store: Path, tmp_path: Path):
    """`train --task cls --pretrained PATH` starts the classifier from a local timm state dict (here
    ImageNet-shaped weights of the cpu-tiny preset's test_resnet: 3 channels, 1000 classes, made by
    the test): the first conv summed to the MIP's channel, the head replaced; the segmentation's own
    `pretrained` stays unset. A missing file is one line before anything starts."""
    import timm
    import torch

    from petctl.engine.config import cpu_tiny, with_overrides

    torch.manual_seed(5)
    imagenet = timm.create_model("test_resnet", pretrained=False).state_dict()
    path = tmp_path / "test_resnet_in1k.pth"
    torch.save(imagenet, path)
    cfg = with_overrides(cpu_tiny(), task="cls", pretrained=str(path))
    assert cfg.cls_pretrained == str(path) and cfg.pretrained is None
    assert with_overrides(cpu_tiny(), task="seg", pretrained="swin.pt").cls_pretrained is None

    missing = _train(store, tmp_path, "--task", "cls", "--pretrained", str(tmp_path / "nope.pth"), "--max-steps", "1")
    assert missing.returncode == 2 and "--pretrained" in missing.stderr and "no such file" in missing.stderr
    result = _train(store, tmp_path, "--task", "cls", "--pretrained", str(path), "--max-steps", "1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    fold = tmp_path / "home/runs/t/cls/fold0-x"
    assert json.loads((fold / "train_config.json").read_text())["cls_pretrained"] == str(path)
    model_state, _, _ = load_checkpoint(fold / "checkpoints/last")
    stem = model_state["backbone.conv1.0.weight"]  # cpu-tiny's lesion-map head wraps the loaded backbone
    summed = imagenet["conv1.0.weight"].sum(dim=1, keepdim=True)
    fresh = timm.create_model("test_resnet", pretrained=False, in_chans=1, num_classes=1).state_dict()["conv1.0.weight"]
    # one optimizer step away from the loaded weights, far from any fresh initialisation
    assert (stem - summed).abs().max() < 0.05 < (fresh - summed).abs().max()

"""The training loop itself, on a toy task in this process: preemption during validation, and a
resume under another schedule refused."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from petctl.engine.loop import EXIT_PREEMPTED, LoopConfig, StepRef, find_checkpoint, load_checkpoint, run_cycles
from petctl.errors import PetctlError


class _Stop:
    signal: int | None = None


class _Toy:
    """A linear model on random batches; `signal_in_validation` raises the stop flag while validating."""

    def __init__(self, stop: _Stop, steps_per_epoch: int = 3, signal_in_validation: bool = False) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Linear(2, 1)
        self.steps_per_epoch = steps_per_epoch
        self.stop, self.signal_in_validation = stop, signal_in_validation
        self.steps = self.validations = 0
        self.validated_modules: list[type] = []

    def batches(self, epoch: int) -> Iterator[torch.Tensor]:
        g = torch.Generator().manual_seed(epoch)
        while True:
            yield torch.randn(4, 2, generator=g)

    def loss(self, model: torch.nn.Module, batch: Any, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        self.steps += 1
        return model(batch.to(device)).pow(2).mean()

    def validate(self, model: torch.nn.Module, accelerator: Any, should_stop: Any = None) -> dict[str, Any] | None:
        self.validated_modules.append(type(model))
        if self.signal_in_validation:
            self.stop.signal = 10  # SIGUSR1 arrives between two validation cases
        if should_stop is not None and should_stop():
            return None
        self.validations += 1
        return {"selection": 0.5 + 0.1 * self.validations}


def _run(task: _Toy, out: Path, stop: _Stop, cycles: int = 2, **loop: Any) -> int:
    from accelerate import Accelerator

    cfg = LoopConfig(**{"num_cycles": cycles, "epochs_per_cycle": 1, "lr": 0.05, **loop})
    return run_cycles(task, cfg, out, Accelerator(cpu=True, gradient_accumulation_steps=cfg.grad_accum), StepRef(), stop,
                      {"toy": True}, "toy")


def test_a_signal_during_validation_saves_last_and_the_resume_validates_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    stop = _Stop()
    first = _Toy(stop, signal_in_validation=True)
    assert _run(first, tmp_path, stop) == EXIT_PREEMPTED
    assert first.steps == 3 and first.validations == 0
    assert first.validated_modules == [torch.nn.Linear]  # the bare module, never DDP's wrapper
    _, _, meta = load_checkpoint(find_checkpoint(tmp_path / "checkpoints" / "last"))
    assert meta["position"] == {"cycle": 0, "epoch": 1, "step_in_epoch": 0, "global_step": 3}  # cycle 1 trained, not validated

    stop.signal = None
    resumed = _Toy(stop)
    assert _run(resumed, tmp_path, stop) == 0
    assert resumed.steps == 3 and resumed.validations == 2  # cycle 1 validated without training again; cycle 2 trained
    history = json.loads((tmp_path / "metrics.json").read_text())["cycles"]
    assert [h["cycle"] for h in history] == [1, 2]
    assert all(math.isfinite(h["train_loss"]) for h in history)  # cycle 1's loss from its epoch record


def test_a_resume_under_another_schedule_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    stop = _Stop()
    assert _run(_Toy(stop, signal_in_validation=True), tmp_path, stop) == EXIT_PREEMPTED
    stop.signal = None
    with pytest.raises(PetctlError, match=r"toy: cannot resume from .*another schedule \(steps_per_epoch 3 → 4\)"):
        _run(_Toy(stop, steps_per_epoch=4), tmp_path, stop)
    with pytest.raises(PetctlError, match=r"num_cycles 2 → 3"):
        _run(_Toy(stop), tmp_path, stop, cycles=3)

    # the optimizer's own numbers: its state dict would silently bring the old learning rate back
    with pytest.raises(PetctlError, match=r"another schedule \(lr 0.05 → 0.01\)"):
        _run(_Toy(stop), tmp_path, stop, lr=0.01)


def test_a_resume_into_another_network_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    stop = _Stop()
    assert _run(_Toy(stop, signal_in_validation=True), tmp_path, stop) == EXIT_PREEMPTED
    stop.signal = None
    other = _Toy(stop)
    other.model = torch.nn.Linear(2, 3)  # another preset's net in the same fold folder
    with pytest.raises(PetctlError) as err:
        _run(other, tmp_path, stop)
    text = str(err.value)
    assert "\n" not in text and "toy: cannot resume from" in text and "its network differs from this config's" in text


def test_a_rerun_with_the_same_max_steps_trains_no_further(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    stop = _Stop()
    for _ in range(3):
        task = _Toy(stop)
        assert _run(task, tmp_path, stop, max_steps=2) == 0
        _, _, meta = load_checkpoint(find_checkpoint(tmp_path / "checkpoints" / "last"))
        assert meta["position"]["global_step"] == 2
    assert task.steps == 0  # the re-runs took none


def test_grad_accum_must_divide_a_cycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """accelerate counts the accumulation over the whole run: 3 batches a cycle under grad_accum 2
    would put cycle 2's updates off its schedule. A divisor trains, with updates at the cycle's ends."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    stop = _Stop()
    with pytest.raises(PetctlError, match=r"toy: grad_accum 2 does not divide a cycle's 3 batches"):
        _run(_Toy(stop), tmp_path / "a", stop, grad_accum=2)
    task = _Toy(stop, steps_per_epoch=4)
    assert _run(task, tmp_path / "b", stop, grad_accum=2) == 0 and task.steps == 8


def test_a_signal_at_an_epochs_last_step_keeps_the_epochs_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped on the last batch of an epoch, the epoch is recorded (its steps and loss) before `last` is saved."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    stop = _Stop()

    class _LastStep(_Toy):
        def loss(self, model, batch, generator, device):
            if self.steps == 2:  # the third (last) batch of the first epoch
                self.stop.signal = 10
            return super().loss(model, batch, generator, device)

    assert _run(_LastStep(stop), tmp_path, stop) == EXIT_PREEMPTED
    _, _, meta = load_checkpoint(find_checkpoint(tmp_path / "checkpoints" / "last"))
    assert meta["position"] == {"cycle": 0, "epoch": 1, "step_in_epoch": 0, "global_step": 3}
    assert [(e["epoch"], e["steps"]) for e in meta["epochs"]] == [(1, 3)] and math.isfinite(meta["epochs"][0]["train_loss"])
    stop.signal = None
    resumed = _Toy(stop)
    assert _run(resumed, tmp_path, stop) == 0 and resumed.steps == 3  # cycle 2 only
    epochs = json.loads((tmp_path / "metrics.json").read_text())["epochs"]
    assert [(e["epoch"], e["steps"]) for e in epochs] == [(1, 3), (2, 3)]


class _AugToy(_Toy):
    """`_Toy` whose loss draws an augmentation from the loop's generator; `signal_at` raises the stop
    flag after that many steps of this run (mid-epoch when it is not a multiple of 3)."""

    def __init__(self, stop: _Stop, signal_at: int | None = None) -> None:
        super().__init__(stop)
        self.signal_at, self.noise = signal_at, []

    def loss(self, model: torch.nn.Module, batch: Any, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        self.steps += 1
        noise = torch.randn(batch.shape, generator=generator)
        self.noise.append(noise)
        if self.signal_at is not None and self.steps == self.signal_at:
            self.stop.signal = 10
        return model(batch.to(device) + noise).pow(2).mean()


def test_a_mid_epoch_resume_draws_the_augmentations_of_the_uninterrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The augmentation generator is seeded from (seed, rank, epoch, step), not carried from the
    epoch's start: a run stopped after step 4 (epoch 2 of 3 steps) and resumed draws, step for step,
    what the uninterrupted run drew, and ends with the same weights."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    stop = _Stop()
    whole = _AugToy(stop)
    assert _run(whole, tmp_path / "whole", stop, cycles=2) == 0
    assert len(whole.noise) == 6
    first = _AugToy(stop, signal_at=4)
    assert _run(first, tmp_path / "cut", stop, cycles=2) == EXIT_PREEMPTED
    _, _, meta = load_checkpoint(find_checkpoint(tmp_path / "cut" / "checkpoints" / "last"))
    assert meta["position"]["step_in_epoch"] == 1 and meta["position"]["global_step"] == 4
    stop.signal = None
    rest = _AugToy(stop)
    assert _run(rest, tmp_path / "cut", stop, cycles=2) == 0
    drawn = first.noise + rest.noise
    assert len(drawn) == 6 and all(torch.equal(a, b) for a, b in zip(drawn, whole.noise))
    assert torch.equal(rest.model.weight, whole.model.weight) and torch.equal(rest.model.bias, whole.model.bias)


def test_every_rank_epoch_and_step_draws_its_own_augmentations() -> None:
    from petctl.engine.loop import augment_seed

    seeds = {augment_seed(0, r, e, s) for r in range(2) for e in range(3) for s in range(3)}
    assert len(seeds) == 18 and augment_seed(0, 1, 2, 0) == augment_seed(0, 1, 2, 0) != augment_seed(1, 1, 2, 0)


def test_a_resume_keeps_the_fp16_loss_scale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16's loss scaler travels in `last`: a resumed run goes on from the scale the first part
    reached (here grown ×2 every 2 steps), not from a new scaler's, and ends where the whole run does.
    A CPU GradScaler stands in for the GPU's: accelerate calls the same scale/step/update."""
    from accelerate import Accelerator

    from petctl.engine.loop import LoopConfig, StepRef, run_cycles

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))

    def run(task: _Toy, out: Path, init_scale: float) -> tuple[int, float]:
        cfg = LoopConfig(num_cycles=2, epochs_per_cycle=1, lr=0.05)
        accelerator = Accelerator(cpu=True)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=2)
        code = run_cycles(task, cfg, out, accelerator, StepRef(), stop, {"toy": True}, "toy")
        return code, accelerator.scaler.get_scale()

    stop = _Stop()
    assert run(_AugToy(stop), tmp_path / "whole", 8.0) == (0, 8.0 * 2 ** 3)  # 6 steps: grown 3 times
    assert run(_AugToy(stop, signal_at=4), tmp_path / "cut", 8.0) == (EXIT_PREEMPTED, 32.0)
    stop.signal = None
    assert run(_AugToy(stop), tmp_path / "cut", 2.0 ** 16) == (0, 64.0)

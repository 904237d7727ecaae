"""The fold queue: several launcher process trees at a time, signals passed to every running one."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from petctl.engine.folds import FoldLaunch, _Job, _slot_environments, run_pool, train_folds
from petctl.engine.config import preset
from petctl.errors import PetctlError


def _job(tmp: Path, name: str, seconds: float, code: int = 0) -> _Job:
    # Each job records when it started and ended, and exits 75 (like a checkpointed fold) on SIGTERM.
    script = (
        "import signal, sys, time, pathlib\n"
        f"p = pathlib.Path({str(tmp / name)!r})\n"
        "signal.signal(signal.SIGTERM, lambda *a: (p.with_suffix('.term').write_text('1'), sys.exit(75)))\n"
        "p.with_suffix('.start').write_text(repr(time.time()))\n"
        f"time.sleep({seconds})\n"
        "p.with_suffix('.end').write_text(repr(time.time()))\n"
        f"sys.exit({code})\n"
    )
    return _Job(label=name, step=name, cmd=[sys.executable, "-c", script])


def _times(tmp: Path, name: str) -> tuple[float, float]:
    return float((tmp / f"{name}.start").read_text()), float((tmp / f"{name}.end").read_text())


def _run(jobs, slots, **kw):
    started, codes = [], {}

    def finished(job, code):
        codes[job.label] = code
        return code

    worst = run_pool(jobs, [dict(os.environ)] * slots, started=lambda job, slot: started.append((job.label, slot)),
                     finished=finished, stop_code=75, **kw)
    return worst, started, codes


def test_two_slots_run_jobs_at_the_same_time_and_keep_the_order(tmp_path: Path):
    jobs = [_job(tmp_path, n, 1.0) for n in ("a", "b", "c")]
    worst, started, codes = _run(jobs, 2)
    assert worst == 0 and codes == {"a": 0, "b": 0, "c": 0}
    assert [label for label, _ in started] == ["a", "b", "c"]
    (a0, a1), (b0, b1), (c0, _) = (_times(tmp_path, n) for n in "abc")
    assert b0 < a1 and a0 < b1  # a and b overlapped
    assert c0 >= min(a1, b1) - 0.05  # c waited for a free slot


def test_one_slot_runs_jobs_one_after_another(tmp_path: Path):
    jobs = [_job(tmp_path, n, 0.3) for n in ("a", "b")]
    _run(jobs, 1)
    assert _times(tmp_path, "b")[0] >= _times(tmp_path, "a")[1]


def test_worst_status_is_returned_and_a_failure_does_not_stop_the_queue(tmp_path: Path):
    jobs = [_job(tmp_path, "a", 0.1, code=3), _job(tmp_path, "b", 0.1)]
    worst, _, codes = _run(jobs, 1)
    assert worst == 3 and codes == {"a": 3, "b": 0}


def _run_signalled(jobs, slots, sig):
    """_run, with `sig` sent to this process 1.5 s in; also checks it all ended well before the jobs' 30 s."""
    timer = threading.Timer(1.5, lambda: os.kill(os.getpid(), sig))
    timer.start()
    t0 = time.monotonic()
    try:
        result = _run(jobs, slots)
    finally:
        timer.cancel()
    assert time.monotonic() - t0 < 20
    return result


def test_sigterm_reaches_every_running_job_and_nothing_new_starts(tmp_path: Path):
    worst, started, codes = _run_signalled([_job(tmp_path, n, 30) for n in ("a", "b", "c")], 2, signal.SIGTERM)
    assert worst == 75 and codes == {"a": 75, "b": 75}
    assert [label for label, _ in started] == ["a", "b"]
    assert (tmp_path / "a.term").exists() and (tmp_path / "b.term").exists() and not (tmp_path / "c.start").exists()


def test_ctrl_c_stops_the_running_jobs_like_sigterm(tmp_path: Path):
    """The launchers run in their own sessions, so the terminal's SIGINT reaches only us: it is passed on."""
    before = signal.getsignal(signal.SIGINT)
    worst, _, codes = _run_signalled([_job(tmp_path, n, 30) for n in ("a", "b")], 1, signal.SIGINT)
    assert worst == 75 and codes == {"a": 75} and (tmp_path / "a.term").exists() and not (tmp_path / "b.start").exists()
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler again afterwards


def test_a_failing_pool_stops_its_running_jobs_before_raising(tmp_path: Path):
    jobs = [_job(tmp_path, "a", 30), _job(tmp_path, "b", 0.2)]

    def finished(job, code):
        raise RuntimeError("registry unreachable")  # b ends first, while a still runs

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="registry unreachable"):
        run_pool(jobs, [dict(os.environ)] * 2, started=lambda job, slot: None, finished=finished, stop_code=75)
    assert time.monotonic() - t0 < 20 and (tmp_path / "a.term").exists()  # a was told to stop and was waited for


def test_gpu_slots_get_their_own_share_of_the_visible_gpus(monkeypatch: pytest.MonkeyPatch):
    envs = _slot_environments(2, cpu=False, env={"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0,1", "2,3"]
    assert [e.get("CUDA_VISIBLE_DEVICES") for e in _slot_environments(2, cpu=True, env={})] == [None, None]
    with pytest.raises(PetctlError, match="at least as many GPUs"):
        _slot_environments(3, cpu=False, env={"CUDA_VISIBLE_DEVICES": "0,1"})


def test_concurrent_folds_are_refused_for_multi_node_launches(tmp_path: Path):
    with pytest.raises(PetctlError, match="single-node"):
        train_folds(preset("cpu-tiny"), tmp_path, "seg", [0], run="r", home=tmp_path, launch=FoldLaunch(nodes=2, concurrent=2))


def test_a_fold_failing_before_it_starts_is_not_taken_for_the_earlier_signal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fold an earlier launch stopped by signal keeps its registry step pending with that message;
    when the next launch fails before the fold starts (an exit 1 that never reaches the registry),
    the queue reports that failure, not a second preemption. A launch that does get stopped again
    (a new attempt, the message written by it) still reads as preempted."""
    import petctl.engine.launch as launch_mod
    from petctl.engine.registry import Registry

    registry = Registry(tmp_path)
    registry.create_run("r", kind="train", config={})
    registry.start_step("r", "train-seg-fold0", kind="train-seg")
    registry.update_step("r", "train-seg-fold0", status="pending", message="stopped by signal at step 10; re-run to resume")
    script = {"text": "import sys; sys.exit(1)"}
    monkeypatch.setattr(launch_mod, "launch_command", lambda **kw: [sys.executable, "-c", script["text"]])
    warned: list[str] = []
    code = train_folds(preset("cpu-tiny"), tmp_path, "seg", [0], run="r", home=tmp_path, warn=warned.append, say=lambda m: None)
    assert code == 1 and warned == ["seg fold0: training exited with status 1"]
    script["text"] = (  # a new attempt that the signal stops: registered, checkpointed, and the launcher dies of it (-15)
        "import os, signal; from petctl.engine.registry import Registry; r = Registry(" + repr(str(tmp_path)) + "); "
        "r.start_step('r', 'train-seg-fold0', kind='train-seg'); "
        "r.update_step('r', 'train-seg-fold0', status='pending', message='stopped by signal at step 12; re-run to resume'); "
        "os.kill(os.getpid(), signal.SIGTERM)")
    warned.clear()
    code = train_folds(preset("cpu-tiny"), tmp_path, "seg", [0], run="r", home=tmp_path, warn=warned.append, say=lambda m: None)
    assert code == 75 and warned == ["seg fold0: stopped by signal after saving its checkpoint; re-run the same command to resume"]


@pytest.mark.parametrize("concurrent, ports", [(1, [29500, 29500, 29500]), (2, [29500, 29501, 29502])])
def test_a_given_port_is_shifted_per_job_only_when_jobs_run_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   concurrent: int, ports: list[int]):
    import petctl.engine.folds as folds

    seen: list[list[str]] = []
    monkeypatch.setattr(folds, "run_pool", lambda jobs, *a, **k: seen.extend(j.cmd for j in jobs) or 0)
    launch = FoldLaunch(processes=2, port=29500, concurrent=concurrent)
    assert train_folds(preset("cpu-tiny"), tmp_path, ("seg", "cls"), [0], run="r", home=tmp_path, launch=launch) == 0
    assert [int(c[c.index("--main_process_port") + 1]) for c in seen] == ports  # seg fold0, cls fold0-x, fold0-y


def test_train_on_several_machines_takes_each_machine_s_rank_and_the_main_address(store: Path, tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch):
    from typer.testing import CliRunner

    import petctl.engine.folds as folds
    from petctl.cli import app

    seen: list[list[str]] = []
    monkeypatch.setattr(folds, "run_pool", lambda jobs, *a, **k: seen.extend(j.cmd for j in jobs) or 0)
    base = ["train", "--store", str(store), "--task", "seg", "--fold", "0", "--preset", "cpu-tiny", "--home", str(tmp_path / "h"),
            "--processes", "8", "--nodes", "2"]
    runner = CliRunner()
    missing = runner.invoke(app, base)
    assert missing.exit_code == 2 and "--nodes 2: run this command on every machine" in missing.output
    bad = runner.invoke(app, [*base, "--machine-rank", "2", "--main-address", "node1", "--main-port", "29400"])
    assert bad.exit_code == 2 and "--machine-rank must be 0 … 1" in bad.output
    ok = runner.invoke(app, [*base, "--machine-rank", "1", "--main-address", "node1", "--main-port", "29400"])
    assert ok.exit_code == 0, ok.output
    cmd = seen[0]
    assert cmd[cmd.index("--num_machines") + 1] == "2" and cmd[cmd.index("--machine_rank") + 1] == "1"
    assert cmd[cmd.index("--main_process_ip") + 1] == "node1" and cmd[cmd.index("--main_process_port") + 1] == "29400"
    # accelerate starts processes // nodes on each machine: 3 over 2 machines would silently train 2
    odd = runner.invoke(app, [*base[:-4], "--processes", "3", "--nodes", "2", "--machine-rank", "0", "--main-address", "node1",
                              "--main-port", "29400"])
    assert odd.exit_code == 2 and "--processes 3 must be a multiple of --nodes 2" in odd.output


def test_the_ranks_get_time_to_save_after_a_term(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """torchrun's agent SIGKILLs its ranks 30 s after a TERM unless told otherwise; the launch gives
    them the 110 s that SLURM's USR1 leaves (a value the user set is kept)."""
    import petctl.engine.folds as folds

    envs: list[dict[str, str]] = []
    monkeypatch.setattr(folds, "run_pool", lambda jobs, slot_env, **k: envs.extend(slot_env) or 0)
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    assert train_folds(preset("cpu-tiny"), tmp_path, "seg", [0], run="r", home=tmp_path) == 0
    assert envs and all(e["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "110" for e in envs)
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "300")
    envs.clear()
    assert train_folds(preset("cpu-tiny"), tmp_path, "seg", [0], run="r2", home=tmp_path) == 0
    assert all(e["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "300" for e in envs)

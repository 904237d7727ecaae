"""Injected faults: SIGKILL during prepare and during a checkpoint save, a full disk, a rank that
dies mid-training, and many petctl processes writing one registry at once.

Each test injects the fault for real (a SIGKILL at an observed moment, a size-limited tmpfs or
loop-mounted filesystem) and then checks what must hold: nothing half-written is visible, the
previous good state still loads, and re-running finishes with the same result an uninterrupted
run gives.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from petctl.engine.store import CaseStore

COARSE_ARGS = ["--spacing", "6,6,8", "--folds", "2", "--test-fraction", "0.25"]  # the conftest `store` settings


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PETCTL_HOME": str(tmp_path / "home"), "HF_HOME": str(tmp_path / "hf"),
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _wait_for(condition: Callable[[], bool], proc: subprocess.Popen, what: str, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            pytest.fail(f"the process ended (status {proc.returncode}) before {what}")
        time.sleep(0.002)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def _children(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc)."""
    parent_of: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parent_of.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        kids = parent_of.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _json_files_parse(root: Path) -> list[Path]:
    """Every *.json below root (hidden temporaries included) parses; returns them."""
    files = sorted(root.rglob("*.json"))
    for path in files:
        json.loads(path.read_text())
    return files


def _assert_same_store(store: Path, reference: Path) -> None:
    """Byte-identical arrays and attributes for every case, and equal stage JSON files."""
    for name in ("manifest.json", "splits.json", "fingerprint.json"):
        assert json.loads((store / name).read_text()) == json.loads((reference / name).read_text()), name
    ours, theirs = json.loads((store / "prepare.json").read_text()), json.loads((reference / "prepare.json").read_text())
    for d in (ours, theirs):
        d["config"].pop("store")
    assert ours == theirs
    a, b = CaseStore(store), CaseStore(reference)
    assert a.list() == b.list() and len(a.list()) == len(json.loads((reference / "manifest.json").read_text())["cases"])
    for case in b.list():
        x, y = a.load(case), b.load(case)
        assert x.attrs == y.attrs, case
        for get in (lambda s: s.image.read_all(), lambda s: s.label.read_all(), lambda s: s.lesion_coords, lambda s: s.body_coords):
            u, v = get(x), get(y)
            assert u.dtype == v.dtype and u.shape == v.shape and u.tobytes() == v.tobytes(), case
    assert not [p.name for p in (store / "cases").iterdir() if p.name.startswith(".")]


_SLOW_CASE_RENAME = textwrap.dedent("""
    import os, sys, time
    real_replace = os.replace
    def replace(src, dst, *args, **kwargs):
        if "/.tmp-" in str(src):  # a finished temp case folder waits before its rename: a window to kill in
            time.sleep(0.5)
        return real_replace(src, dst, *args, **kwargs)
    os.replace = replace
    sys.argv = ["petctl", *sys.argv[1:]]
    from petctl.cli import main
    main()
""")


def _prepare_cmd(cohort: Path, out: Path, *, slow_case_rename: bool = False) -> list[str]:
    """`petctl prepare` as a child process; `slow_case_rename` holds each complete temp case folder
    for 0.5 s before its rename, so a kill lands while it exists (cases are written in milliseconds)."""
    args = ["prepare", str(cohort), "--store", str(out), *COARSE_ARGS]
    return [sys.executable, "-c", _SLOW_CASE_RENAME, *args] if slow_case_rename else [sys.executable, "-m", "petctl", *args]


# -- SIGKILL during prepare ------------------------------------------------------------------------
def _scan_started(out: Path) -> bool:
    return (out / ".parts" / "scans.json").exists() and not (out / "cases").exists()


def _three_cases_written(out: Path) -> bool:
    return len(CaseStore(out).list()) >= 3


def _temp_case_exists(out: Path) -> bool:
    cases = out / "cases"
    try:
        return any(p.name.startswith(".tmp-") for p in cases.iterdir())
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("moment", ["during the scan pass", "after 3 cases", "while a temp case folder exists"])
def test_sigkill_during_prepare_then_rerun_gives_the_uninterrupted_store(cohort: Path, store: Path, tmp_path: Path, moment: str):
    from petctl.engine.prepare import PrepareConfig, run

    out = tmp_path / "store"
    condition = {"during the scan pass": _scan_started, "after 3 cases": _three_cases_written,
                 "while a temp case folder exists": _temp_case_exists}[moment]
    proc = subprocess.Popen(_prepare_cmd(cohort, out, slow_case_rename=moment == "while a temp case folder exists"), env=_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: condition(out), proc, moment)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    s = CaseStore(out)
    listed = s.list()
    if moment == "during the scan pass":
        assert listed == []
    elif moment == "after 3 cases":
        assert 3 <= len(listed) < 10
    else:
        assert _temp_case_exists(out), "the kill landed after the rename; the temp folder should still be there"
    reference = CaseStore(store)
    for case in listed:  # what is visible after the kill is already complete and final
        assert s.load(case).image.read_all().tobytes() == reference.load(case).image.read_all().tobytes()
    assert not (out / "manifest.json").exists()
    _json_files_parse(out)

    result = run(PrepareConfig(data=str(cohort), store=str(out), spacing=(6.0, 6.0, 8.0), num_folds=2, test_fraction=0.25))
    assert set(result.reused) == set(listed) and not result.skipped
    assert len(result.reused) + len(result.prepared) == 10
    CaseStore(out).close()
    _assert_same_store(out, store)


# -- SIGKILL while a checkpoint is written ---------------------------------------------------------
_KILLED_SAVE = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import torch
    from petctl.engine import loop

    folder, moment = Path(sys.argv[1]), sys.argv[2]

    def announce_and_hang():
        print("READY", flush=True)
        time.sleep(600)

    if moment == "mid-write":  # the new files are in the temp folder, one of them torn in half
        def fsync(fd):
            path = os.readlink(f"/proc/self/fd/{fd}")
            os.truncate(path, os.path.getsize(path) // 2)
            announce_and_hang()
        loop.os.fsync = fsync
    else:  # the old copy was moved aside, the new one is not in place yet
        real_replace = os.replace
        def replace(src, dst):
            real_replace(src, dst)
            if ".old-" in str(dst):
                announce_and_hang()
        loop.os.replace = replace

    model_state, state, meta = loop.load_checkpoint(folder)
    newer = {k: torch.zeros_like(v) for k, v in model_state.items()}
    loop.save_checkpoint(folder, model_state=newer, optimizer_state=state.get("optimizer"), scheduler_state=state.get("scheduler"),
                         position=loop.Position(5, 0, 0, 999), config=meta["config"], metric=0.0)
    print("SAVED", flush=True)
""")


def _kill_a_save(folder: Path, moment: str, env: dict[str, str]) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(folder), moment], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "READY", line + proc.communicate(timeout=60)[1][-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def _train(store: Path, tmp_path: Path, *extra: str, run: str = "r", timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "petctl", "train", "--store", str(store), "--fold", "0", "--preset", "cpu-tiny", "--run", run, *extra]
    return subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=timeout)


def test_sigkill_during_checkpoint_save_keeps_the_previous_one_and_resume_works(store: Path, tmp_path: Path):
    import torch

    from petctl.engine.loop import find_checkpoint, load_checkpoint

    first = _train(store, tmp_path, "--max-steps", "2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    last = tmp_path / "home/runs/r/seg/fold0/checkpoints/last"
    good_state, _, good_meta = load_checkpoint(last)
    assert good_meta["position"]["global_step"] == 2

    for moment in ("mid-write", "after the old copy was moved aside"):
        _kill_a_save(last, moment, _env(tmp_path))
        assert list(last.parent.glob(".last.tmp-*" if moment == "mid-write" else ".last.old-*")), moment  # the kill landed there
        found = find_checkpoint(last)
        assert found is not None, moment
        state, _, meta = load_checkpoint(found)
        assert meta["position"]["global_step"] == 2, moment
        assert all(torch.equal(state[k], good_state[k]) for k in good_state), moment
    assert not last.exists() and find_checkpoint(last).name.startswith(".last.old-")

    resumed = _train(store, tmp_path, "--max-steps", "4")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming at" in resumed.stdout and "step 2" in resumed.stdout
    _, _, meta = load_checkpoint(find_checkpoint(last))
    assert meta["position"]["global_step"] == 4
    step = json.loads((tmp_path / "home/runs/r/steps/train-seg-fold0.json").read_text())
    assert step["status"] == "done" and step["attempts"] == 2


# -- a full disk -----------------------------------------------------------------------------------
@contextlib.contextmanager
def _small_disk(folder: Path, size_bytes: int) -> Iterator[bool]:
    """Mount a size-limited filesystem on `folder`: tmpfs, else a loop-mounted ext4 image.

    Yields True when one was mounted (root inside a container that allows it); False otherwise, and
    the caller simulates ENOSPC instead.
    """
    folder.mkdir(parents=True, exist_ok=True)
    mib = max(1, -(-size_bytes // 2**20))
    attempts = [["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(folder)]]
    image = folder.with_name(folder.name + ".img")
    if shutil.which("mkfs.ext4"):
        attempts.append(["sh", "-c", f"truncate -s {mib + 2}M '{image}' && mkfs.ext4 -q -m 0 '{image}' && mount -o loop '{image}' '{folder}'"])
    mounted = False
    if os.geteuid() == 0 and shutil.which("mount"):
        for cmd in attempts:
            if subprocess.run(cmd, capture_output=True).returncode == 0:
                mounted = True
                break
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
        image.unlink(missing_ok=True)


def _fill(folder: Path, leave_bytes: int) -> Path:
    """Fill the filesystem of `folder` until about `leave_bytes` are free; returns the filler file."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    filler = folder / "filler"
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, free - leave_bytes))
    return filler


@contextlib.contextmanager
def _simulated_enospc(under: Path, after_calls: int) -> Iterator[None]:
    """Fallback when no small filesystem can be mounted: `os.fsync` of files below `under` raises
    ENOSPC from its `after_calls`-th call on (a full disk can surface at fsync on network
    filesystems); removed at exit, which is "space freed"."""
    real = os.fsync
    calls = [0]

    def fsync(fd: int) -> None:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target.startswith(str(under)):
            calls[0] += 1
            if calls[0] >= after_calls:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    os.fsync = fsync
    try:
        yield
    finally:
        os.fsync = real


def _sizes(store: Path) -> tuple[int, int, int]:
    """(bytes of one scan part file, all scan parts, all cases) of the reference store, page-rounded."""
    page = lambda n: -(-n // 4096) * 4096  # noqa: E731
    parts = [page(p.stat().st_size) for p in (store / ".parts").glob("*.npz")]
    cases = sum(page(p.stat().st_size) for p in (store / "cases").rglob("*") if p.is_file())
    return max(parts), sum(parts), cases


@pytest.mark.parametrize("when", ["scan", "write"])
def test_full_disk_during_prepare_is_one_clear_error_and_rerun_completes(cohort: Path, store: Path, tmp_path: Path, home: Path, when: str):
    """A real full filesystem (tmpfs / loop ext4); where neither can be mounted (not root), the
    ENOSPC is simulated at `os.fsync` of the store's files (write pass only)."""
    from typer.testing import CliRunner

    from petctl.cli import app

    one_part, all_parts, all_cases = _sizes(store)
    disk = tmp_path / "disk"
    out = disk / "store"
    args = ["prepare", str(cohort), "--store", str(out), *COARSE_ARGS]
    with _small_disk(disk, all_parts + all_cases + 2**21) as mounted:
        if mounted:
            # room for 2.5 scan parts, or for every scan part and about half of the cases
            leave = int(2.5 * one_part) if when == "scan" else all_parts + 64 * 1024 + all_cases // 2
            filler = _fill(disk, leave)
            failed = CliRunner().invoke(app, args)
        else:
            if when == "scan":
                pytest.skip("ENOSPC in the scan pass needs a small filesystem (mount not permitted here)")
            filler = None
            with _simulated_enospc(out / "cases", after_calls=40):
                failed = CliRunner().invoke(app, args)
        text = failed.output
        assert failed.exit_code == 2, text
        errors = [l for l in text.splitlines() if l.startswith("error:")]
        assert len(errors) == 1 and "no space left on device" in errors[0] and "free space and re-run" in errors[0], text
        assert "Traceback" not in text
        # nothing half-written is visible: listed cases read completely, no temp folders, no torn JSON
        s = CaseStore(out)
        listed = s.list()
        assert (0 < len(listed) < 10) if when == "write" else listed == []
        for case in listed:
            assert s.load(case).label.read_all().shape == tuple(s.load(case).attrs["case"]["stored_shape"])
        s.close()
        assert not [p.name for p in (out / "cases").iterdir() if p.name.startswith(".")] if (out / "cases").exists() else True
        assert not [p.name for p in (out / ".parts").iterdir() if p.name.startswith(".")]
        assert not (out / "manifest.json").exists()
        _json_files_parse(out)
        _json_files_parse(home)
        step = json.loads((home / "runs/store/steps/prepare.json").read_text())
        assert step["status"] == "failed" and "no space left" in step["message"]

        if filler is not None:
            filler.unlink()  # space freed
        again = CliRunner().invoke(app, args)
        assert again.exit_code == 0, again.output
        _assert_same_store(out, store)


def test_full_disk_during_checkpoint_keeps_the_previous_one(tmp_path: Path):
    """ENOSPC while saving a checkpoint: one clear error, the previous checkpoint intact and no temp
    folder left; once space is freed the save succeeds. Simulated at `os.fsync` where no small
    filesystem can be mounted."""
    import torch

    from petctl.engine.loop import Position, find_checkpoint, load_checkpoint, save_checkpoint
    from petctl.errors import PetctlError

    disk = tmp_path / "disk"
    small = {"w": torch.ones(1000)}
    big = {"w": torch.ones(2_000_000)}  # 8 MB: more than is left
    with _small_disk(disk, 16 * 2**20) as mounted:
        folder = disk / "run" / "checkpoints" / "last"
        save_checkpoint(folder, model_state=small, optimizer_state=None, scheduler_state=None, position=Position(global_step=1),
                        config={"preset": "cpu-tiny"}, metric=None)
        filler = _fill(disk, 256 * 1024) if mounted else None
        with contextlib.nullcontext() if mounted else _simulated_enospc(disk, after_calls=1):
            with pytest.raises(PetctlError, match="no space left on device") as info:
                save_checkpoint(folder, model_state=big, optimizer_state={"state": {}, "param_groups": []}, scheduler_state=None,
                                position=Position(global_step=2), config={"preset": "cpu-tiny"}, metric=None)
        assert "\n" not in str(info.value) and "free space" in str(info.value)
        assert find_checkpoint(folder) == folder
        state, _, meta = load_checkpoint(folder)
        assert meta["position"]["global_step"] == 1 and torch.equal(state["w"], small["w"])
        assert sorted(p.name for p in folder.parent.iterdir()) == ["last"]  # no temp or old copy left
        if filler is not None:
            filler.unlink()
        save_checkpoint(folder, model_state=big, optimizer_state=None, scheduler_state=None, position=Position(global_step=2),
                        config={"preset": "cpu-tiny"}, metric=None)
        assert load_checkpoint(folder)[2]["position"]["global_step"] == 2


# -- a rank that dies ------------------------------------------------------------------------------
@pytest.mark.ddp
def test_killing_one_ddp_rank_fails_the_other_and_the_registry_step(store: Path, tmp_path: Path):
    cmd = [sys.executable, "-m", "petctl", "train", "--store", str(store), "--fold", "0", "--preset", "cpu-tiny",
           "--processes", "2", "--cycles", "1", "--epochs", "40", "--run", "d"]
    proc = subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        seen = []
        for line in proc.stdout:  # rank 0 prints every 10 steps: training is under way on both ranks
            seen.append(line)
            if " step " in line and "loss" in line:
                break
        workers = [p for p in _children(proc.pid) if "petctl.engine.launch" in _cmdline(p) and "RANK" in _environ(p)]
        ranks = {int(_environ(p)["RANK"]): p for p in workers}
        assert set(ranks) == {0, 1}, ("".join(seen), ranks)
        os.kill(ranks[1], signal.SIGKILL)
        t_kill = time.monotonic()
        out, _ = proc.communicate(timeout=240)  # the surviving rank must not hang on its next collective
        waited = time.monotonic() - t_kill
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode not in (0, 75), out[-3000:]
    assert "training exited with status" in out
    with contextlib.suppress(ProcessLookupError):
        os.kill(ranks[0], 0)
        pytest.fail("rank 0 is still alive after the launcher exited")
    step = json.loads((tmp_path / "home/runs/d/steps/train-seg-fold0.json").read_text())
    assert step["status"] == "failed" and step["message"], step
    assert step["ended"] is not None
    print(f"rank 0 exited {waited:.1f} s after rank 1 was killed: {step['message'][:120]}")


# -- many writers on one registry ------------------------------------------------------------------
def _random_weight_run(home: Path, run: str, store: Path) -> None:
    """A predict-ready run without training: one random-weight cpu-tiny fold, no classifier gate."""
    from petctl.engine.config import cpu_tiny
    from petctl.engine.loop import Position, save_checkpoint
    from petctl.engine.models import build_seg_model
    from petctl.engine.registry import Registry

    cfg = cpu_tiny().with_image_channels(2)
    Registry(home).create_run(run, kind="train", config={"store": str(store)})
    model = build_seg_model(cfg.arch, in_channels=cfg.in_channels, features=cfg.features, patch_size=cfg.patch_size)
    save_checkpoint(home / "runs" / run / "seg" / "fold0" / "checkpoints" / "best", model_state=model.state_dict(), optimizer_state=None,
                    scheduler_state=None, position=Position(), config={**cfg.to_json(), "fold": 0, "store": str(store)}, metric=None)
    (home / "runs" / run / "thresholds.json").write_text(json.dumps({"version": 1, "segmentation": {"threshold": 0.5}}))


def test_eight_concurrent_petctl_processes_share_one_registry(cohort: Path, store: Path, tmp_path: Path):
    """3 short trainings (two folds of one run, one other run), 1 predict and 4 `status --json` loops at once."""
    env = _env(tmp_path)
    home = tmp_path / "home"
    _random_weight_run(home, "rnd", store)
    case = sorted((cohort / "imagesTr").glob("*_0000.nii.gz"))[0]
    base = [sys.executable, "-m", "petctl"]
    writers = {
        ("shared", "train-seg-fold0"): ["train", "--store", str(store), "--fold", "0", "--run", "shared", "--preset", "cpu-tiny", "--max-steps", "2"],
        ("shared", "train-seg-fold1"): ["train", "--store", str(store), "--fold", "1", "--run", "shared", "--preset", "cpu-tiny", "--max-steps", "2"],
        ("other", "train-seg-fold0"): ["train", "--store", str(store), "--fold", "0", "--run", "other", "--preset", "cpu-tiny", "--max-steps", "2"],
        ("rnd", "predict-*"): ["predict", "--run", "rnd", "--no-gate", str(case), str(tmp_path / "pred")],
    }
    procs = [subprocess.Popen(base + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for args in writers.values()]
    stop = tmp_path / "stop"
    status_loop = textwrap.dedent(f"""
        import json, os, subprocess, time
        bad, calls = [], 0
        while not os.path.exists({str(stop)!r}) or calls < 2:
            time.sleep(2.0 if calls else 0.0)  # readers, not CPU hogs: the 2 cores belong to the trainings
            r = subprocess.run({base!r} + ["status", "--json"], capture_output=True, text=True)
            calls += 1
            try:
                json.loads(r.stdout)
                if r.returncode != 0 or "unreadable" in r.stdout:
                    bad.append(r.stdout[-500:] + r.stderr[-500:])
            except ValueError:
                bad.append("not JSON: " + r.stdout[-300:] + r.stderr[-300:])
        print(json.dumps({{"calls": calls, "bad": bad}}))
    """)
    watchers = [subprocess.Popen([sys.executable, "-c", status_loop], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(4)]
    try:
        outputs = [p.communicate(timeout=600)[0] for p in procs]
        stop.touch()
        reports = [json.loads(w.communicate(timeout=120)[0]) for w in watchers]
    finally:
        stop.touch()
        for p in procs + watchers:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    for r in reports:
        assert r["calls"] >= 2 and not r["bad"], r
    files = _json_files_parse(home)
    assert files and not [f for f in home.rglob("*") if f.name.endswith((".tmp", ".lock"))]
    for run, step in writers:
        records = [json.loads(f.read_text()) for f in (home / "runs" / run / "steps").glob(f"{step}.json")]
        assert len(records) == 1 and records[0]["status"] == "done", (run, step, records)
        assert json.loads((home / "runs" / run / "run.json").read_text())["run"] == run
    assert {p.name for p in (home / "runs").iterdir()} == {"shared", "other", "rnd"}
    assert (tmp_path / "pred" / f"{case.name[: -len('_0000.nii.gz')]}.nii.gz").exists()

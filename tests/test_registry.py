"""The run registry (atomic JSON files, lock files, many writers) and the `petctl status` verb."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import typer
from click.testing import Result
from typer.testing import CliRunner

import petctl
from petctl.engine.registry import (
    FileLock,
    Registry,
    RegistryWarning,
    RunRecord,
    StepRecord,
    code_version,
    slurm_job_id,
    step_context,
)
from petctl.errors import PetctlError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "home")


def _tmp_files(home: Path) -> list[Path]:
    return [p for p in home.rglob("*") if p.name.endswith((".tmp", ".lock", ".stale"))]


# --------------------------------------------------------------------------------------------
# records and files


def test_round_trip(registry: Registry) -> None:
    run = registry.create_run("r1", kind="train", config={"folds": 5}, parent=None)
    child = registry.create_run("r2", kind="retrain", parent="r1")
    assert registry.run("r1") == run and registry.run("r2").parent == "r1"
    assert [r.run for r in registry.runs()] == ["r1", "r2"]
    assert RunRecord.from_json(json.loads(json.dumps(child.to_json()))) == child

    started = registry.start_step("r1", "seg-fold0", kind="train-seg", config={"fold": 0})
    assert (started.status, started.attempts, started.ended, started.pid) == ("running", 1, None, os.getpid())
    registry.update_step("r1", "seg-fold0", metrics={"dice": 0.5, "loss": 0.9})
    registry.update_step("r1", "seg-fold0", metrics={"dice": 0.7})
    done = registry.finish_step("r1", "seg-fold0", metrics={"auroc": 0.8})
    assert done.status == "done" and done.ended is not None and done.ended >= done.started
    assert done.metrics == {"loss": 0.9, "dice": 0.7, "auroc": 0.8}
    assert list(done.metrics) == ["loss", "dice", "auroc"]  # newest writes last
    assert registry.step("r1", "seg-fold0") == done
    assert StepRecord.from_json(json.loads(json.dumps(done.to_json()))) == done

    on_disk = json.loads((registry.home / "runs/r1/steps/seg-fold0.json").read_text())
    assert on_disk["version"] == 1 and on_disk["config"] == {"fold": 0} and on_disk["host"] == socket.gethostname()
    assert registry.step("r1", "never") is None
    assert _tmp_files(registry.home) == []


def test_start_step_creates_run_and_counts_attempts(registry: Registry) -> None:
    registry.start_step("r", "prepare", kind="prepare")
    assert registry.run("r").kind == "prepare"
    registry.fail_step("r", "prepare", "disk full")
    failed = registry.step("r", "prepare")
    assert failed is not None and (failed.status, failed.message) == ("failed", "disk full")
    again = registry.start_step("r", "prepare", kind="prepare")
    assert (again.status, again.attempts, again.message, again.ended) == ("running", 2, None, None)
    assert again.created == failed.created


def test_mark_pending_keeps_a_step_running_under_its_job_and_takes_over_a_dead_attempt(registry: Registry,
                                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pending = registry.mark_pending("r", "cls-fold1", kind="train-cls", slurm_job_id="77_1")
    assert (pending.status, pending.attempts, pending.slurm_job_id) == ("pending", 0, "77_1")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    registry.start_step("r", "cls-fold1", kind="train-cls")
    assert registry.step("r", "cls-fold1").slurm_job_id == "77_1"
    assert registry.mark_pending("r", "cls-fold1", kind="train-cls", slurm_job_id="77_1").status == "running"
    # the attempt of job 77 was SIGKILLed and left "running"; a resubmission as job 90 takes the step over
    again = registry.mark_pending("r", "cls-fold1", kind="train-cls", slurm_job_id="90_1")
    assert (again.status, again.slurm_job_id) == ("pending", "90_1")


def test_create_run_exist_ok(registry: Registry) -> None:
    first = registry.create_run("r", kind="train", config={"a": 1})
    assert registry.create_run("r", kind="other", config={"a": 2}) == first
    with pytest.raises(PetctlError, match="already exists"):
        registry.create_run("r", kind="train", exist_ok=False)
    with pytest.raises(PetctlError, match="no run"):
        registry.run("missing")


def test_update_refusals(registry: Registry) -> None:
    with pytest.raises(PetctlError, match="never started"):
        registry.update_step("r", "s", metrics={"x": 1})
    registry.start_step("r", "s", kind="predict")
    with pytest.raises(PetctlError, match="cannot update"):
        registry.update_step("r", "s", attempts_typo=3)
    with pytest.raises(PetctlError, match="status"):
        registry.update_step("r", "s", status="exploded")
    assert registry.step("r", "s").status == "running"  # type: ignore[union-attr]


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "..", "x" * 129, "a b", "é"])
def test_bad_names_refused(registry: Registry, name: str) -> None:
    with pytest.raises(PetctlError):
        registry.create_run(name, kind="train")
    with pytest.raises(PetctlError):
        registry.start_step("ok", name, kind="train-seg")
    with pytest.raises(PetctlError):
        registry.create_run("ok2", kind="train", parent=name)
    assert not (registry.home.parent / "x").exists()


def test_files_respect_umask(registry: Registry) -> None:
    old = os.umask(0o027)
    try:
        registry.start_step("r", "s", kind="prepare")
    finally:
        os.umask(old)
    for path in (registry.home / "runs/r/run.json", registry.home / "runs/r/steps/s.json"):
        assert path.stat().st_mode & 0o777 == 0o640


def test_reader_never_sees_partial_file(registry: Registry) -> None:
    registry.start_step("r", "s", kind="train-seg")
    stop = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def read() -> None:
        path = registry.home / "runs/r/steps/s.json"
        while not stop.is_set():
            try:
                seen.append(len(json.loads(path.read_text())["metrics"]))
            except BaseException as exc:  # noqa: BLE001 - any failure is the test failing
                errors.append(exc)
                return

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(200):
            registry.update_step("r", "s", metrics={f"m{i}": "x" * 2000})
    finally:
        stop.set()
        reader.join()
    assert errors == []
    assert len(seen) > 10 and seen == sorted(seen)
    assert len(registry.step("r", "s").metrics) == 200  # type: ignore[union-attr]
    assert _tmp_files(registry.home) == []


_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from petctl.engine.registry import Registry
    home, worker, n = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    reg = Registry(home)
    reg.start_step("shared", f"own-{worker}", kind="train-seg")
    for i in range(n):
        reg.update_step("shared", "common", metrics={f"w{worker}_{i}": i})
        if i % 10 == 0:
            reg.start_step("shared", f"w{worker}-extra{i}", kind="train-cls")
    reg.finish_step("shared", f"own-{worker}", metrics={"n": n})
    """
)


def test_concurrent_writer_processes_lose_nothing(registry: Registry) -> None:
    num_workers, num_updates = 8, 50
    registry.start_step("shared", "common", kind="train-seg")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(registry.home), str(w), str(num_updates)], env=env)
        for w in range(num_workers)
    ]
    # Meanwhile `status`-style reads must always succeed and never go backwards.
    last = 0
    while any(p.poll() is None for p in procs):
        common = registry.step("shared", "common")
        assert common is not None and len(common.metrics) >= last
        last = len(common.metrics)
        assert all(s.kind != "unreadable" for s in registry.steps("shared"))
    assert [p.wait(timeout=120) for p in procs] == [0] * num_workers

    common = registry.step("shared", "common")
    assert common is not None
    assert set(common.metrics) == {f"w{w}_{i}" for w in range(num_workers) for i in range(num_updates)}
    names = {s.step for s in registry.steps("shared")}
    expected = {"common"} | {f"own-{w}" for w in range(num_workers)}
    expected |= {f"w{w}-extra{i}" for w in range(num_workers) for i in range(0, num_updates, 10)}
    assert names == expected
    assert all(registry.step("shared", f"own-{w}").status == "done" for w in range(num_workers))  # type: ignore[union-attr]
    assert _tmp_files(registry.home) == []


# --------------------------------------------------------------------------------------------
# locks


def _write_lock(path: Path, host: str, pid: int, age_s: float = 0.0) -> None:
    path.write_text(json.dumps({"host": host, "pid": pid, "token": "someone-else"}))
    if age_s:
        then = time.time() - age_s
        os.utime(path, (then, then))


def test_old_lock_is_broken(registry: Registry) -> None:
    registry.start_step("r", "s", kind="train-seg")
    lock = registry.home / "runs/r/steps/s.lock"
    _write_lock(lock, "some-other-host", 1, age_s=120)
    registry.update_step("r", "s", metrics={"x": 1})
    assert registry.step("r", "s").metrics == {"x": 1}  # type: ignore[union-attr]
    assert not lock.exists()


def test_lock_of_dead_process_is_broken(registry: Registry) -> None:
    registry.start_step("r", "s", kind="train-seg")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = registry.home / "runs/r/steps/s.lock"
    _write_lock(lock, socket.gethostname(), dead.pid)
    started = time.monotonic()
    registry.update_step("r", "s", metrics={"x": 2})
    assert time.monotonic() - started < 5
    assert registry.step("r", "s").metrics == {"x": 2}  # type: ignore[union-attr]


def test_live_lock_times_out_clearly(tmp_path: Path) -> None:
    registry = Registry(tmp_path, lock_timeout_s=0.3)
    registry.start_step("r", "s", kind="train-seg")
    lock = tmp_path / "runs/r/steps/s.lock"
    _write_lock(lock, socket.gethostname(), os.getpid())  # alive and fresh: must be respected
    with pytest.raises(PetctlError, match="timed out .* waiting for lock"):
        registry.update_step("r", "s", metrics={"x": 3})
    assert registry.step("r", "s").metrics == {}  # type: ignore[union-attr]
    assert lock.exists()


def test_release_leaves_a_lock_taken_over_by_another(tmp_path: Path) -> None:
    lock = FileLock(tmp_path / "x.lock")
    token = lock.acquire()
    _write_lock(lock.path, "elsewhere", 42)  # ours was broken as stale and someone else took it
    lock.release(token)
    assert lock.path.exists()


def test_breaker_that_lost_the_race_restores_the_new_lock(tmp_path: Path) -> None:
    lock = FileLock(tmp_path / "x.lock")
    _write_lock(lock.path, "gone-host", 1, age_s=120)
    judged, owner = lock.path.stat(), lock.path.read_text()
    lock.path.rename(tmp_path / "broken-by-another")  # kept, so the new lock gets a new inode
    token = lock.acquire()  # the other breaker's fresh lock
    lock._break("late", judged, owner)
    assert json.loads(lock.path.read_text())["token"] == token
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken-by-another", "x.lock"]


def test_breaker_restores_a_new_lock_on_the_stale_one_s_inode(tmp_path: Path) -> None:
    """ext4 and tmpfs give a freed inode number to the next file: a fresh lock taken after another
    breaker removed the stale one can carry the judged inode, and must still be put back."""
    lock = FileLock(tmp_path / "x.lock")
    _write_lock(lock.path, "gone-host", 1, age_s=120)
    judged, owner = lock.path.stat(), lock.path.read_text()
    _write_lock(lock.path, socket.gethostname(), os.getpid())  # rewritten in place: the same inode, a live owner
    assert lock.path.stat().st_ino == judged.st_ino
    live = lock.path.read_text()
    lock._break("late", judged, owner)
    assert lock.path.read_text() == live
    assert [p.name for p in tmp_path.iterdir()] == ["x.lock"]


def _race_worker(path: str, marker: str, rounds: int, barrier, overlaps) -> None:  # noqa: ANN001 (multiprocessing objects)
    real_link = os.link

    def slow_link(*args, **kwargs):  # noqa: ANN002, ANN003
        time.sleep(0.005)  # widens the moment a lock moved aside is missing (this forked worker only)
        return real_link(*args, **kwargs)

    os.link = slow_link
    lock = FileLock(Path(path), timeout_s=30)
    for _ in range(rounds):
        barrier.wait()  # the parent has planted a stale lock: every worker finds it at once
        token = lock.acquire()
        try:
            try:
                fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:  # another worker is inside too
                with overlaps.get_lock():
                    overlaps.value += 1
            else:
                time.sleep(0.002)
                os.close(fd)
                os.unlink(marker)
        finally:
            lock.release(token)
        barrier.wait()


def test_breakers_of_one_stale_lock_let_one_writer_in_at_a_time(tmp_path: Path) -> None:
    """Four writers find the same dead owner's lock at once, round after round. Without turns
    between breakers, one could move aside the fresh lock another had just taken while a third took
    the lock before it was put back: two writers inside one record's read-modify-write (the workers'
    `os.link`, which puts a lock back, is slowed so that moment is wide enough to be hit)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path, marker, workers, rounds = tmp_path / "x.lock", tmp_path / "inside", 4, 150
    barrier, overlaps = ctx.Barrier(workers + 1, timeout=60), ctx.Value("i", 0)
    procs = [ctx.Process(target=_race_worker, args=(str(path), str(marker), rounds, barrier, overlaps)) for _ in range(workers)]
    for p in procs:
        p.start()
    try:
        for _ in range(rounds):
            _write_lock(path, socket.gethostname(), dead.pid)
            barrier.wait()
            barrier.wait()
            assert not path.exists()  # every writer released
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0] * workers
    assert overlaps.value == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no turn file or moved lock left behind


# --------------------------------------------------------------------------------------------
# step_context, environment


def test_step_context_success_and_failure(registry: Registry) -> None:
    with step_context(registry, "r", "ok", kind="calibrate") as record:
        assert record.status == "running"
        registry.update_step("r", "ok", metrics={"threshold": 0.4})
    ok = registry.step("r", "ok")
    assert ok is not None and ok.status == "done" and ok.metrics == {"threshold": 0.4}

    with pytest.raises(ValueError, match="boom"):
        with step_context(registry, "r", "bad", kind="calibrate"):
            raise ValueError("boom")
    bad = registry.step("r", "bad")
    assert bad is not None and (bad.status, bad.message) == ("failed", "ValueError: boom")
    assert bad.ended is not None


@pytest.mark.parametrize(
    ("exc", "status", "message"),
    [
        (SystemExit(0), "done", None),
        (SystemExit(None), "done", None),
        (SystemExit(3), "failed", "SystemExit: exit status 3"),
        (SystemExit(143), "failed", "stopped by SIGTERM (a time limit, scancel or kill)"),
        (KeyboardInterrupt(), "failed", "KeyboardInterrupt"),
    ],
)
def test_step_context_exits(registry: Registry, exc: BaseException, status: str, message: str | None) -> None:
    with pytest.raises(type(exc)):
        with step_context(registry, "r", "s", kind="retrain"):
            raise exc
    record = registry.step("r", "s")
    assert record is not None and (record.status, record.message) == (status, message)


def test_slurm_job_id_from_env(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    assert slurm_job_id() is None
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    assert slurm_job_id() == "123"
    assert registry.start_step("r", "plain", kind="prepare").slurm_job_id == "123"
    monkeypatch.setenv("SLURM_JOB_ID", "131")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "100")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    assert slurm_job_id() == "100_7"
    assert registry.start_step("r", "array", kind="train-seg").slurm_job_id == "100_7"


def test_code_version() -> None:
    version = code_version()
    assert version.startswith(petctl.__version__)
    assert version == petctl.__version__ or version.startswith(f"{petctl.__version__}+g")


def test_unreadable_files_do_not_break_listing(registry: Registry) -> None:
    registry.start_step("r", "good", kind="train-seg")
    steps_dir = registry.home / "runs/r/steps"
    (steps_dir / "truncated.json").write_text('{"version": 1, "run": "r", "st')
    (steps_dir / "wrong.json").write_text(json.dumps({"version": 1, "run": "r", "status": "weird"}))
    (registry.home / "runs/broken").mkdir()
    (registry.home / "runs/broken/run.json").write_text("\x00\x00")
    with pytest.warns(RegistryWarning):
        steps = {s.step: s for s in registry.steps("r")}
    assert steps["good"].status == "running"
    for name in ("truncated", "wrong"):
        assert (steps[name].status, steps[name].kind) == ("failed", "unreadable")
        assert "unreadable record" in (steps[name].message or "")
    with pytest.warns(RegistryWarning):
        assert {r.run: r.kind for r in registry.runs()} == {"r": "train-seg", "broken": "unreadable"}
    with pytest.raises(PetctlError, match="cannot read"):
        registry.step("r", "truncated")
    with pytest.raises(PetctlError, match="cannot read"):
        registry.update_step("r", "truncated", metrics={"x": 1})
    with pytest.warns(RegistryWarning):  # restarting a step replaces its unreadable record
        assert registry.start_step("r", "truncated", kind="train-seg").attempts == 1


# --------------------------------------------------------------------------------------------
# petctl status


@pytest.fixture
def cli() -> typer.Typer:
    from petctl.cli import app  # imported here so the registry tests run even if another verb is broken

    return app


def _invoke(cli: typer.Typer, *args: str) -> Result:
    return CliRunner().invoke(cli, ["status", *args], env={"COLUMNS": "200"})


def test_status_without_runs(cli: typer.Typer, tmp_path: Path) -> None:
    result = _invoke(cli, "--home", str(tmp_path / "empty"))
    assert result.exit_code == 0
    assert result.output.strip() == f"No runs in {tmp_path / 'empty'}."
    as_json = json.loads(_invoke(cli, "--home", str(tmp_path / "empty"), "--json").output)
    assert as_json["runs"] == []


def _populate(registry: Registry) -> None:
    registry.start_step("r1", "prepare", kind="prepare")
    registry.finish_step("r1", "prepare", metrics={"num_cases": 40})
    registry.start_step("r1", "seg-fold0", kind="train-seg")
    registry.update_step("r1", "seg-fold0", metrics={"dice": 0.712345, "loss": 0.25, "note": "text"})
    registry.start_step("r1", "cls-fold0", kind="train-cls")
    registry.fail_step("r1", "cls-fold0", "CUDA out of memory")
    registry.mark_pending("r1", "calibrate", kind="calibrate")
    registry.create_run("r2", kind="retrain", parent="r1")


def test_status_tables(cli: typer.Typer, registry: Registry) -> None:
    _populate(registry)
    result = _invoke(cli, "--home", str(registry.home))
    assert result.exit_code == 0, result.output
    out = result.output
    for text in ("prepare", "seg-fold0", "cls-fold0", "calibrate", "running", "failed", "pending", "done",
                 "CUDA out of memory", "dice=0.7123", "num_cases=40", "r2", "1/4"):
        assert text in out, text
    assert "note=" not in out  # only numeric metrics

    only = _invoke(cli, "--home", str(registry.home), "--run", "r2").output
    assert "r2" in only and "seg-fold0" not in only


def test_status_json(cli: typer.Typer, registry: Registry) -> None:
    _populate(registry)
    result = _invoke(cli, "--home", str(registry.home), "--json")
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert data["home"] == str(registry.home)
    runs = {r["run"]: r for r in data["runs"]}
    assert runs["r2"]["parent"] == "r1" and runs["r2"]["steps"] == []
    steps = {s["step"]: s for s in runs["r1"]["steps"]}
    assert {k: s["status"] for k, s in steps.items()} == {
        "prepare": "done", "seg-fold0": "running", "cls-fold0": "failed", "calibrate": "pending",
    }
    assert steps["cls-fold0"]["message"] == "CUDA out of memory"
    assert steps["seg-fold0"]["metrics"]["dice"] == pytest.approx(0.712345)


def test_status_json_is_strict_json_without_nan(cli: typer.Typer, registry: Registry) -> None:
    registry.start_step("r", "seg-fold0", kind="train-seg")
    registry.update_step("r", "seg-fold0", metrics={"dice": float("nan"), "loss": float("inf"), "steps": 3})
    result = _invoke(cli, "--home", str(registry.home), "--json")
    assert result.exit_code == 0 and "NaN" not in result.output and "Infinity" not in result.output
    metrics = json.loads(result.output)["runs"][0]["steps"][0]["metrics"]
    assert metrics == {"dice": None, "loss": None, "steps": 3}


def test_a_sigterm_marks_the_step_under_way_failed(tmp_path: Path) -> None:
    """A SLURM time limit or scancel TERMs calibrate or prepare: the CLI turns it into exit 143 and
    the step is recorded failed, not left "running" forever."""
    import signal
    import subprocess
    import sys

    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "import petctl.cli as cli\n"
        "from petctl.engine.registry import Registry, step_context\n"
        "def app(standalone_mode=False):\n"
        "    with step_context(Registry(Path(sys.argv[1])), 'r', 'calibrate', kind='calibrate'):\n"
        "        print('started', flush=True)\n"
        "        time.sleep(120)\n"
        "cli.app = app\n"
        "cli.main()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "home")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
    finally:
        proc.kill()
    record = Registry(tmp_path / "home").step("r", "calibrate")
    assert record is not None and (record.status, record.message) == ("failed", "stopped by SIGTERM (a time limit, scancel or kill)")


def test_status_survives_corrupt_step(cli: typer.Typer, registry: Registry) -> None:
    _populate(registry)
    (registry.home / "runs/r1/steps/copied.json").write_text("{")
    result = _invoke(cli, "--home", str(registry.home))
    assert result.exit_code == 0
    assert "copied" in result.output and "unreadable" in result.output


def test_status_unknown_run(cli: typer.Typer, registry: Registry) -> None:
    _populate(registry)
    result = _invoke(cli, "--home", str(registry.home), "--run", "nope")
    assert result.exit_code != 0
    assert result.exit_code == 2 and "no run 'nope'" in result.output
    assert "Traceback" not in result.output


def test_status_reads_a_time_without_a_zone_as_utc():
    """A step time written without a zone (by hand, or by another tool) is read as UTC, as petctl
    writes its own, so `petctl status` shows the duration instead of failing on naive − aware."""
    from datetime import datetime, timezone

    from petctl.commands.status import duration
    from petctl.engine.registry import StepRecord

    now = datetime(2024, 1, 1, 0, 5, tzinfo=timezone.utc)
    running = StepRecord(run="r", step="s", kind="train-seg", status="running", created="2024-01-01T00:00:00",
                         started="2024-01-01T00:00:00")
    assert duration(running, now) == "5m00s…"
    done = StepRecord(run="r", step="s", kind="train-seg", status="done", created="x",
                      started="2024-01-01T00:00:00+00:00", ended="2024-01-01T00:01:30")
    assert duration(done) == "1m30s"
    assert duration(StepRecord(run="r", step="s", kind="k", status="done", created="x", started="yesterday")) == "-"


def test_the_term_handler_exits_143_once_and_leaves_forked_workers_to_die_of_it() -> None:
    """A second TERM kills outright (the handler steps aside); a pool worker forked from the command
    dies of the TERM as before, instead of raising SystemExit into the pool's task."""
    import multiprocessing as mp
    import os
    import signal

    import petctl.cli as cli

    old, old_pid = signal.getsignal(signal.SIGTERM), cli._MAIN_PID
    try:
        cli._MAIN_PID = os.getpid()
        signal.signal(signal.SIGTERM, cli._exit_on_term)

        def worker() -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            os._exit(0)  # not reached: the TERM kills

        child = mp.get_context("fork").Process(target=worker)
        child.start()
        child.join(30)
        assert child.exitcode == -signal.SIGTERM
        with pytest.raises(SystemExit) as exc:
            cli._exit_on_term(signal.SIGTERM, None)
        assert exc.value.code == 143 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, old)
        cli._MAIN_PID = old_pid

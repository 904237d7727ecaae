"""The run registry: one JSON file per run and per step under HOME, safe on NFS with many writers.

Layout: `HOME/runs/<run>/run.json` and `HOME/runs/<run>/steps/<step>.json`. There is no database:
every file is replaced atomically (temp file in the same folder, fsync, `os.replace`), so readers
never take a lock and never see a partial file. Writers do read-modify-write under a per-record
lock file made with `O_CREAT | O_EXCL` (atomic on NFSv3+ too); a lock left by a dead process on
this host, or older than `stale_after_s`, is broken. Names are checked so no path leaves HOME, and
files are created with mode 0o666 so the user's umask decides who may read them.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import math
import logging
import os
import random
import socket
import subprocess
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from petctl import __version__
from petctl.errors import PetctlError

SCHEMA_VERSION = 1
STATUSES = ("pending", "running", "done", "failed")
UNREADABLE = "unreadable"
"""The `kind` given to placeholder records for files that exist but cannot be parsed."""

_MAX_NAME = 128
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
_READ_RETRIES = 5
_UNREADABLE_ERRORS = (OSError, ValueError, PetctlError)  # ValueError covers bad JSON and bad UTF-8
_jitter = random.Random()  # lock back-off only; never used for anything that must be reproducible

log = logging.getLogger(__name__)


class RegistryWarning(UserWarning):
    """A registry file could not be read; the listing shows a placeholder instead."""


def check_name(name: str, what: str = "name") -> str:
    """Return `name` if it is a safe run/step name (letters, digits, `._-`, no leading dot, ≤ 128)."""
    if not isinstance(name, str) or not name:
        raise PetctlError(f"{what} must be a non-empty string")
    if len(name) > _MAX_NAME:
        raise PetctlError(f"{what} {name[:40]!r}… is longer than {_MAX_NAME} characters")
    if name.startswith(".") or not set(name) <= _NAME_CHARS:
        raise PetctlError(f"{what} {name!r} may only use letters, digits and '._-', and may not start with '.'")
    return name


def utc_now() -> str:
    """The current time as ISO-8601 UTC with milliseconds (sorts as text)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """`petctl.__version__`, plus `+g<short sha>` when the package sits at the root of a git checkout."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():  # installed wheel: do not ask git about some unrelated repo
        return __version__
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+g{sha}" if sha else __version__


def slurm_job_id(environ: Mapping[str, str] | None = None) -> str | None:
    """The SLURM job id as `squeue`/`sacct` name it: `JOBID`, or `ARRAYJOBID_TASK` for array tasks."""
    env = os.environ if environ is None else environ
    array_job, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return env.get("SLURM_JOB_ID") or None


# --------------------------------------------------------------------------------------------
# Records


def _expect(data: Mapping[str, Any], key: str, kind: type, *, nullable: bool = False) -> Any:
    value = data.get(key)
    if value is None and nullable:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise PetctlError(f"field {key!r} should be {kind.__name__}, got {value!r}")
    return value


def _check_version(data: Any) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise PetctlError(f"expected a JSON object, got {type(data).__name__}")
    if data.get("version") != SCHEMA_VERSION:
        raise PetctlError(f"unsupported registry schema version {data.get('version')!r} (expected {SCHEMA_VERSION})")
    return data


@dataclass(frozen=True)
class RunRecord:
    """One run: a named group of steps (a training campaign, a retrain, a prediction batch)."""

    run: str
    """The run name (also its folder name)."""
    kind: str
    """What the run is for, e.g. "train" or "predict"."""
    created: str
    """ISO-8601 UTC time the run was first registered."""
    config: dict[str, Any] = field(default_factory=dict)
    """The configuration the run was created with."""
    parent: str | None = None
    """The run this one derives from (e.g. the retrain's training run), or None."""
    code_version: str = ""
    """petctl version (and git sha) that created the run."""

    def to_json(self) -> dict[str, Any]:
        return {"version": SCHEMA_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: Any) -> RunRecord:
        data = _check_version(data)
        return cls(
            run=check_name(_expect(data, "run", str), "run name"),
            kind=_expect(data, "kind", str),
            created=_expect(data, "created", str),
            config=dict(_expect(data, "config", dict)),
            parent=_expect(data, "parent", str, nullable=True),
            code_version=_expect(data, "code_version", str),
        )


@dataclass(frozen=True)
class StepRecord:
    """One pipeline step of a run (prepare, a training fold, calibrate, retrain, predict)."""

    run: str
    step: str
    kind: str
    """e.g. "prepare", "train-seg", "train-cls", "calibrate", "retrain", "predict"."""
    status: str
    """One of `STATUSES`: pending, running, done, failed."""
    created: str
    """ISO-8601 UTC time the step was first registered."""
    started: str | None = None
    """Start of the latest attempt."""
    ended: str | None = None
    """End of the latest attempt (None while pending or running)."""
    config: dict[str, Any] = field(default_factory=dict)
    code_version: str = ""
    host: str | None = None
    """Host of the latest attempt."""
    pid: int | None = None
    slurm_job_id: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    """Merged by `Registry.update_step`; the most recently written keys come last."""
    message: str | None = None
    """Why the step failed, or None."""
    attempts: int = 0
    """How many times the step was started."""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise PetctlError(f"step status {self.status!r} is not one of {', '.join(STATUSES)}")

    def to_json(self) -> dict[str, Any]:
        return {"version": SCHEMA_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: Any) -> StepRecord:
        data = _check_version(data)
        return cls(
            run=check_name(_expect(data, "run", str), "run name"),
            step=check_name(_expect(data, "step", str), "step name"),
            kind=_expect(data, "kind", str),
            status=_expect(data, "status", str),
            created=_expect(data, "created", str),
            started=_expect(data, "started", str, nullable=True),
            ended=_expect(data, "ended", str, nullable=True),
            config=dict(_expect(data, "config", dict)),
            code_version=_expect(data, "code_version", str),
            host=_expect(data, "host", str, nullable=True),
            pid=_expect(data, "pid", int, nullable=True),
            slurm_job_id=_expect(data, "slurm_job_id", str, nullable=True),
            metrics=dict(_expect(data, "metrics", dict)),
            message=_expect(data, "message", str, nullable=True),
            attempts=_expect(data, "attempts", int),
        )


_UPDATABLE = frozenset(f.name for f in dataclasses.fields(StepRecord)) - {"run", "step", "metrics", "status", "message"}


# --------------------------------------------------------------------------------------------
# Files: atomic writes, lock-free reads, lock files


def json_safe(value: Any) -> Any:
    """`value` with every NaN or infinite float as None (JSON has no NaN, and strict parsers, jq or
    JavaScript, refuse Python's bare NaN): a held-out AUROC without negatives, a selection before
    any validation."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as JSON to `path` so that readers see the old file or the new one, never a mix."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=True) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` (temp file, fsync, rename): readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask, unlike mkstemp's 0o600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def read_json(path: Path) -> Any:
    """Parse a JSON file, retrying NFS's ESTALE (the file was replaced while we opened it)."""
    for attempt in range(_READ_RETRIES):
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            if exc.errno != errno.ESTALE or attempt == _READ_RETRIES - 1:
                raise
            time.sleep(0.01 * (attempt + 1))
    raise AssertionError("unreachable")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@dataclass(frozen=True)
class FileLock:
    """An exclusive lock file next to a record: `O_CREAT | O_EXCL`, owner written inside."""

    path: Path
    timeout_s: float = 30.0
    """How long `acquire` waits before raising `PetctlError`."""
    stale_after_s: float = 60.0
    """A lock older than this is considered abandoned (records are held for milliseconds)."""

    def _stale_reason(self) -> tuple[str, os.stat_result, str] | None:
        """Why the current lock file is abandoned (and which file was judged: its stat and owner), or None if it is not."""
        try:
            judged = self.path.stat()
            owner = self.path.read_text(encoding="utf-8")
        except OSError:  # gone already (released or broken), or unreadable: not ours to judge
            return None
        age = time.time() - judged.st_mtime
        if age > self.stale_after_s:
            return f"{age:.0f} s old", judged, owner
        try:
            info = json.loads(owner)
            host, pid = info["host"], int(info["pid"])
        except (ValueError, KeyError, TypeError):
            return None  # being written right now, or foreign: only age can tell
        if host == socket.gethostname() and not _pid_alive(pid):
            return f"owner pid {pid} on {host} is gone", judged, owner
        return None

    def _same(self, path: Path, judged: os.stat_result, owner: str) -> bool:
        """Whether `path` is still the file judged stale. The inode alone cannot tell: ext4 and tmpfs
        hand a freed inode number to the next file at once, so a fresh lock taken after the stale one
        was removed may carry the judged inode; its owner (a new token) and its mtime differ."""
        try:
            now = path.stat()
            now_owner = path.read_text(encoding="utf-8")
        except OSError:
            return False
        return (now.st_ino, now.st_dev, now.st_mtime_ns) == (judged.st_ino, judged.st_dev, judged.st_mtime_ns) and now_owner == owner

    def _break(self, reason: str, judged: os.stat_result, owner: str) -> bool:
        """Remove the lock judged stale, if it is still that file; False when another process is
        breaking it right now (the caller waits and looks again).

        Breakers take turns through a second lock file (`.NAME.break`, `O_CREAT | O_EXCL`): every
        waiter sees a stale lock at once, and without turns one breaker could move aside the fresh
        lock another breaker had just taken, and a third process take the lock in the moment before
        it was put back — two holders. The one whose turn it is checks that the lock is still the
        judged file, then renames it aside and checks the file it moved once more (a slow but live
        owner may have released it and a new one taken it in between; that one is put back).
        A turn file left by a breaker that died is removed after `stale_after_s`."""
        turn = self.path.with_name(f".{self.path.name}.break")
        try:
            os.close(os.open(turn, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            try:
                if time.time() - turn.stat().st_mtime > self.stale_after_s:
                    turn.unlink(missing_ok=True)  # its breaker died mid-break (breaking takes microseconds)
            except OSError:
                pass
            return False
        try:
            if not self._same(self.path, judged, owner):
                return True  # released, or broken by the breaker before us: look again
            aside = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.stale")
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                return True
            try:
                if not self._same(aside, judged, owner):
                    try:
                        os.link(aside, self.path)
                    except OSError:
                        log.warning("moved a live lock %s aside and could not restore it", self.path)
                    return True
                log.warning("broke stale lock %s (%s)", self.path, reason)
            finally:
                aside.unlink(missing_ok=True)
            return True
        finally:
            turn.unlink(missing_ok=True)

    def acquire(self) -> str:
        """Take the lock; return the token that proves ownership to `release`."""
        token = uuid.uuid4().hex
        owner = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": token, "time": utc_now()})
        deadline = time.monotonic() + self.timeout_s
        delay = 0.001
        while True:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                stale = self._stale_reason()
                if stale is not None and self._break(*stale):
                    continue
                if time.monotonic() > deadline:
                    raise PetctlError(
                        f"timed out after {self.timeout_s:.0f} s waiting for lock {self.path}; "
                        "if no petctl process is using this run, delete the lock file"
                    ) from None
                time.sleep(delay * (0.5 + _jitter.random()))
                delay = min(delay * 2, 0.05)
                continue
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write(owner)
            except BaseException:
                self.path.unlink(missing_ok=True)
                raise
            return token

    def release(self, token: str) -> None:
        """Remove the lock if it is still ours (it may have been broken as stale meanwhile)."""
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if isinstance(info, dict) and info.get("token") == token:
            self.path.unlink(missing_ok=True)
        else:
            log.warning("lock %s was taken over while held; another process broke it as stale", self.path)

    @contextmanager
    def held(self) -> Iterator[None]:
        token = self.acquire()
        try:
            yield
        finally:
            self.release(token)


# --------------------------------------------------------------------------------------------
# The registry


class Registry:
    """Runs and steps under `home/runs`. Every method is safe to call from many processes at once."""

    def __init__(self, home: Path, *, lock_timeout_s: float = 30.0, stale_lock_s: float = 60.0) -> None:
        self.home = Path(home)
        self.root = self.home / "runs"
        self.lock_timeout_s = lock_timeout_s
        self.stale_lock_s = stale_lock_s

    # paths ----------------------------------------------------------------------------------
    def run_dir(self, run: str) -> Path:
        return self.root / check_name(run, "run name")

    def _run_file(self, run: str) -> Path:
        return self.run_dir(run) / "run.json"

    def _step_file(self, run: str, step: str) -> Path:
        return self.run_dir(run) / "steps" / f"{check_name(step, 'step name')}.json"

    def _lock(self, record: Path) -> FileLock:
        return FileLock(record.with_suffix(".lock"), timeout_s=self.lock_timeout_s, stale_after_s=self.stale_lock_s)

    # runs -----------------------------------------------------------------------------------
    def create_run(
        self, run: str, *, kind: str, config: Mapping[str, Any] | None = None,
        parent: str | None = None, exist_ok: bool = True,
    ) -> RunRecord:
        """Register a run; an existing run is returned as it is (or refused when `exist_ok` is False)."""
        path = self._run_file(run)
        if parent is not None:
            check_name(parent, "parent run name")
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock(path).held():
            if path.exists():
                if not exist_ok:
                    raise PetctlError(f"run {run!r} already exists in {self.root}")
                return self.run(run)
            record = RunRecord(
                run=run, kind=kind, created=utc_now(), config=dict(config or {}),
                parent=parent, code_version=code_version(),
            )
            write_json_atomic(path, record.to_json())
        return record

    def run(self, run: str) -> RunRecord:
        """The run record; `PetctlError` if it does not exist or cannot be read."""
        path = self._run_file(run)
        try:
            return RunRecord.from_json(read_json(path))
        except FileNotFoundError:
            raise PetctlError(f"no run {run!r} in {self.root}") from None
        except _UNREADABLE_ERRORS as exc:
            raise PetctlError(f"cannot read {path}: {exc}") from None

    def runs(self) -> list[RunRecord]:
        """All runs, oldest first. Unreadable run files show as placeholders of kind `unreadable`."""
        if not self.root.is_dir():
            return []
        records = []
        for folder in self.root.iterdir():
            if not folder.is_dir() or not _is_name(folder.name):
                continue
            path = folder / "run.json"
            try:
                records.append(RunRecord.from_json(read_json(path)))
            except FileNotFoundError:
                continue  # being created right now
            except _UNREADABLE_ERRORS as exc:
                warnings.warn(f"cannot read {path}: {exc}", RegistryWarning, stacklevel=2)
                records.append(RunRecord(run=folder.name, kind=UNREADABLE, created="", config={"error": str(exc)}))
        return sorted(records, key=lambda r: (r.created, r.run))

    # steps ----------------------------------------------------------------------------------
    def step(self, run: str, step: str) -> StepRecord | None:
        """The step record, or None if it was never registered; `PetctlError` if it is unreadable."""
        path = self._step_file(run, step)
        try:
            return StepRecord.from_json(read_json(path))
        except FileNotFoundError:
            return None
        except _UNREADABLE_ERRORS as exc:
            raise PetctlError(f"cannot read {path}: {exc}") from None

    def steps(self, run: str) -> list[StepRecord]:
        """All steps of a run, by creation time. Unreadable files show as failed `unreadable` steps."""
        folder = self.run_dir(run) / "steps"
        if not folder.is_dir():
            return []
        records = []
        for path in folder.glob("*.json"):
            if not _is_name(path.stem):
                continue
            try:
                records.append(StepRecord.from_json(read_json(path)))
            except FileNotFoundError:
                continue
            except _UNREADABLE_ERRORS as exc:
                warnings.warn(f"cannot read {path}: {exc}", RegistryWarning, stacklevel=2)
                records.append(StepRecord(
                    run=run, step=path.stem, kind=UNREADABLE, status="failed", created="",
                    message=f"unreadable record {path}: {exc}",
                ))
        return sorted(records, key=lambda r: (r.created, r.step))

    def _modify(
        self, run: str, step: str, change: Callable[[StepRecord | None], StepRecord], *, create: bool,
    ) -> StepRecord:
        """Read-modify-write one step under its lock; `change(old | None) -> new`."""
        path = self._step_file(run, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock(path).held():
            try:
                old = StepRecord.from_json(read_json(path))
            except FileNotFoundError:
                old = None
            except _UNREADABLE_ERRORS as exc:
                if not create:
                    raise PetctlError(f"cannot read {path}: {exc}") from None
                warnings.warn(f"replacing unreadable {path}: {exc}", RegistryWarning, stacklevel=3)
                old = None
            if old is None and not create:
                raise PetctlError(f"step {run}/{step} was never started")
            new = change(old)
            write_json_atomic(path, new.to_json())
        return new

    def _fresh(self, run: str, step: str, kind: str, config: Mapping[str, Any] | None, old: StepRecord | None) -> StepRecord:
        return StepRecord(
            run=run, step=step, kind=kind, status="pending",
            created=old.created if old else utc_now(),
            config=dict(config) if config is not None else (old.config if old else {}),
            code_version=code_version(),
            metrics=old.metrics if old else {},
            attempts=old.attempts if old else 0,
        )

    def start_step(self, run: str, step: str, *, kind: str, config: Mapping[str, Any] | None = None) -> StepRecord:
        """Mark a step running in this process (attempts + 1). Creates the run when missing.

        Metrics of earlier attempts are kept, so a resumed step can continue its curves.
        """
        self._ensure_run(run, kind)

        def change(old: StepRecord | None) -> StepRecord:
            base = self._fresh(run, step, kind, config, old)
            return dataclasses.replace(
                base, status="running", started=utc_now(), ended=None, host=socket.gethostname(),
                pid=os.getpid(), slurm_job_id=slurm_job_id(), message=None, attempts=base.attempts + 1,
            )

        return self._modify(run, step, change, create=True)

    def mark_pending(
        self, run: str, step: str, *, kind: str, config: Mapping[str, Any] | None = None,
        slurm_job_id: str | None = None,
    ) -> StepRecord:
        """Register a planned step (e.g. a submitted SLURM job that has not started yet).

        A step already running under this very job is left as it is (a job that started before its
        submitter registered it); one running under another job id, or none, is an attempt that died
        without a word (SIGKILL, a node lost) and becomes pending under the new job.
        """
        self._ensure_run(run, kind)

        def change(old: StepRecord | None) -> StepRecord:
            if old is not None and old.status == "running" and slurm_job_id is not None and old.slurm_job_id == slurm_job_id:
                return old
            fresh = self._fresh(run, step, kind, config, old)
            return dataclasses.replace(fresh, slurm_job_id=slurm_job_id)

        return self._modify(run, step, change, create=True)

    def update_step(
        self, run: str, step: str, *, metrics: Mapping[str, Any] | None = None,
        status: str | None = None, message: str | None = None, **extra: Any,
    ) -> StepRecord:
        """Merge `metrics` into the step's metrics and set the other given fields, under the lock."""
        unknown = set(extra) - _UPDATABLE
        if unknown:
            raise PetctlError(f"cannot update step field(s) {', '.join(sorted(unknown))}")

        def change(old: StepRecord | None) -> StepRecord:
            assert old is not None
            merged = {k: v for k, v in old.metrics.items() if not metrics or k not in metrics}
            merged.update(metrics or {})  # re-written keys move to the end: the newest come last
            fields: dict[str, Any] = {"metrics": merged, **extra}
            if status is not None:
                fields["status"] = status
            if message is not None:
                fields["message"] = message
            return dataclasses.replace(old, **fields)

        return self._modify(run, step, change, create=False)

    def finish_step(self, run: str, step: str, *, metrics: Mapping[str, Any] | None = None) -> StepRecord:
        """Mark a step done now, merging final metrics."""
        return self.update_step(run, step, metrics=metrics, status="done", ended=utc_now())

    def fail_step(self, run: str, step: str, reason: str) -> StepRecord:
        """Mark a step failed now with `reason` as its message."""
        return self.update_step(run, step, status="failed", message=reason, ended=utc_now())

    def _ensure_run(self, run: str, kind: str) -> None:
        if not self._run_file(run).exists():
            self.create_run(run, kind=kind)


def _is_name(name: str) -> bool:
    try:
        check_name(name)
    except PetctlError:
        return False
    return True


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextmanager
def step_context(
    registry: Registry, run: str, step: str, *, kind: str, config: Mapping[str, Any] | None = None,
) -> Iterator[StepRecord]:
    """Start a step, yield its record, then mark it done, or failed with the exception's reason.

    `SystemExit(0)`/`SystemExit(None)` counts as success; any other exit, Ctrl-C included, as failure.
    The exception is always re-raised; a failure to record the failure is logged, not raised over it.
    """
    record = registry.start_step(run, step, kind=kind, config=config)
    try:
        yield record
    except SystemExit as exc:
        if exc.code in (None, 0):
            registry.finish_step(run, step)
        elif exc.code == 143:  # petctl's CLI turns a SIGTERM into this exit
            _record_failure(registry, run, step, "stopped by SIGTERM (a time limit, scancel or kill)")
        else:
            _record_failure(registry, run, step, f"SystemExit: exit status {exc.code}")
        raise
    except BaseException as exc:
        _record_failure(registry, run, step, _reason(exc))
        raise
    registry.finish_step(run, step)


def _record_failure(registry: Registry, run: str, step: str, reason: str) -> None:
    try:
        registry.fail_step(run, step, reason)
    except Exception as exc:  # keep the original error visible
        log.error("could not record failure of %s/%s: %s", run, step, exc)

"""The SLURM chain: sbatch scripts rendered from `slurm/*.sbatch.tmpl`, and a thin sbatch/scancel/squeue layer.

`render_plan(cfg)` is pure: it returns the scripts as strings, the training config they share and
the jobs' dependencies (prepare → segmentation and classifier training arrays → calibrate →
merged retrain arrays → optional predict). Every value that reaches a script is quoted: with
`shlex.quote` on shell lines, and with sbatch's own double-quote rules on `#SBATCH` lines (which
sbatch parses itself). `write_plan` puts the files in `HOME/runs/RUN/slurm/` with a `plan.json`;
`submit_plan` submits them held, registers every step as pending with its job id, then releases
them, so no job can start before the registry knows it. `JobStates` answers "what state is this
job in" from squeue, then `scontrol show job`, then sacct, whichever answers, within a short budget.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import string
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from petctl.errors import PetctlError

PLAN_VERSION = 1
TEMPLATES = Path(__file__).parents[1] / "slurm_templates"
"""The `*.sbatch.tmpl` files: the repository's top-level `slurm/` folder, which the package reaches
through its `slurm_templates` link and a wheel carries as package data (a non-editable install
has no repository folder to read them from)."""

# Words of a command line that are shell code, not values: NUL cannot occur in a path or option,
# so a user's value can never be mistaken for one of these.
_SHELL_REFS = {
    "\0NODE_RANK": '"$SLURM_NODEID"', "\0MAIN_ADDR": '"$MAIN_ADDR"', "\0PORT": '"$PORT"',
    "\0FOLD": '"$FOLD"', "\0AXIS": '"$AXIS"', "\0CONFIG": '"$OUT/train_config.json"', "\0OUT": '"$OUT"',
}
NODE_RANK, MAIN_ADDR, PORT, FOLD, AXIS, CONFIG, OUT = _SHELL_REFS


@dataclass(frozen=True)
class SlurmConfig:
    """What `petctl slurm plan` needs: the run, its inputs, and the resources to ask SLURM for."""

    run: str
    data: str
    """The raw cohort folder (absolute)."""
    store: str
    """The store `prepare` writes and training reads (absolute)."""
    home: str
    """petctl home (absolute); exported as PETCTL_HOME in every job."""
    workdir: str
    """Folder the jobs `cd` into (where the plan was made)."""
    preset: str = "autopet-paper"
    num_folds: int = 5
    """prepare --folds, and the size of the segmentation arrays (× projections for the classifier)."""
    nodes: int = 1
    """Nodes per training task (multi-node accelerate when > 1)."""
    gpus_per_node: int = 1
    """GPUs per node; 0 = CPU-only cluster (no gres, ACCELERATE_USE_CPU=true, one process per node)."""
    cpus_per_task: int = 8
    """CPUs per node (one task per node); prepare's workers."""
    partition: str | None = None
    """This and the next five: the sbatch options of the same name (None = the cluster's default)."""
    account: str | None = None
    qos: str | None = None
    mem: str | None = None
    time: str | None = None
    constraint: str | None = None
    spacing: tuple[float, float, float] | None = None
    """Store spacing for prepare; None = the preset's."""
    test_fraction: float | None = None
    """prepare --test-fraction; None = prepare's default."""
    cycles: int | None = None
    """Overrides of the preset's segmentation cycles and epochs per cycle (as `petctl train --task seg --cycles/--epochs`)."""
    epochs: int | None = None
    cls_cycles: int | None = None
    """The same for the classifier (as `petctl train --task cls --cycles/--epochs`)."""
    cls_epochs: int | None = None
    pretrained: str | None = None
    """Local weights the segmentation folds start from (`petctl train --task seg --pretrained`), absolute."""
    cls_pretrained: str | None = None
    """Local timm weights the classifier folds start from (`petctl train --task cls --pretrained`), absolute."""
    cls_projections: tuple[str, ...] | None = None
    """The classifier's MIP projections (`petctl train --task cls --projections`; None: the preset's);
    the classifier array holds folds × projections tasks."""
    max_steps: int | None = None
    """Stop each training task after this many steps (smoke runs)."""
    mixed_precision: str = "no"
    predict_input: str | None = None
    """With `predict_output`: the final predict job's input and output folders (absolute)."""
    predict_output: str | None = None
    calibrate_args: tuple[str, ...] = ()
    """More words for the calibrate job's `petctl calibrate --run RUN` (e.g. `--urine-veto`,
    `--gate-margin 0.5`); the run and the home are the plan's own."""
    python: str = sys.executable
    """The interpreter that runs petctl on the compute nodes (same shared filesystem)."""

    def __post_init__(self) -> None:
        from petctl.engine.registry import check_name

        check_name(self.run, "run")
        check_name(self.merged_run, "merged run")
        for name in ("nodes", "cpus_per_task"):
            if getattr(self, name) < 1:
                raise PetctlError(f"--{name.replace('_', '-')} must be at least 1")
        if self.num_folds < 2:
            raise PetctlError("--folds must be at least 2 (cross-validation)")
        if self.gpus_per_node < 0:
            raise PetctlError("--gpus-per-node must be 0 (CPU) or more")
        if (self.predict_input is None) != (self.predict_output is None):
            raise PetctlError("--predict-input and --predict-output go together")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            for text in (value if isinstance(value, tuple) else (value,)):
                if isinstance(text, str) and ("\n" in text or "\r" in text or "\0" in text):
                    raise PetctlError(f"{f.name} may not contain a line break or NUL ({text[:40]!r})")
        owned = [w for w in self.calibrate_args if w.split("=", 1)[0] in ("--run", "--home")]
        if owned:
            raise PetctlError(f"--calibrate-args may not set {owned[0].split('=', 1)[0]}: the plan sets the run and the home itself")
        if "\\" in self.home:  # SLURM drops backslashes from --output paths (its escape character)
            raise PetctlError(f"petctl home may not contain a backslash for SLURM jobs ({self.home[:60]!r})")

    @property
    def processes_per_node(self) -> int:
        return max(1, self.gpus_per_node)

    @property
    def merged_run(self) -> str:
        """The merged retrain's run, as `petctl retrain-merged` names it."""
        return f"{self.run}-merged"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SlurmConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        return cls(**kw)


@dataclass(frozen=True)
class PlannedStep:
    """A registry step a job runs: array task `task` (None for a plain job) runs `step` of `run`."""

    run: str
    step: str
    kind: str
    task: int | None = None


@dataclass(frozen=True)
class Job:
    """One sbatch script of the chain."""

    name: str
    """e.g. "prepare", "train-seg", "train-cls-merged"; the script is `<name>.sbatch`."""
    verb: str
    """The petctl verb the job runs (recorded in plan.json)."""
    after: tuple[str, ...] = ()
    """Jobs that must finish successfully first (`--dependency=afterok:...`)."""
    steps: tuple[PlannedStep, ...] = ()
    """The registry steps it runs, registered as pending when it is submitted."""
    array: int | None = None
    """Number of array tasks, or None for a plain job."""

    @property
    def filename(self) -> str:
        return f"{self.name}.sbatch"


@dataclass(frozen=True)
class Plan:
    """The chain: jobs in submission order (each after the ones it waits for)."""

    config: SlurmConfig
    jobs: tuple[Job, ...]
    train_config: dict[str, Any]
    """The TrainConfig JSON every training task copies to its fold folder."""

    def to_json(self) -> dict[str, Any]:
        """plan.json; `submit_plan` fills in each job's `job_id`."""
        return {
            "version": PLAN_VERSION,
            "run": self.config.run,
            "config": self.config.to_json(),
            "jobs": [{"name": j.name, "verb": j.verb, "script": j.filename, "after": list(j.after), "array": j.array,
                      "steps": [dataclasses.asdict(s) for s in j.steps], "job_id": None} for j in self.jobs],
        }


# --------------------------------------------------------------------------------------------
# Quoting and templates


def shell_words(argv: Sequence[str]) -> str:
    """A command line: every word `shlex.quote`d, except the `_SHELL_REFS` placeholders."""
    return " ".join(_SHELL_REFS.get(word) or shlex.quote(word) for word in argv)


def sbatch_quote(value: str | int) -> str:
    """A value for an `#SBATCH` line, which sbatch parses itself (no shell): double quotes group,
    a backslash escapes the next character, and `#` may start a comment, so it is escaped too."""
    text = str(value)
    if re.fullmatch(r"[A-Za-z0-9_.,:=@+/%-]+", text):
        return text
    return '"' + re.sub(r'([\\"#])', r"\\\1", text) + '"'


def _slurm_filename(path: str) -> str:
    """A path for --output: `%` is a SLURM filename pattern, `%%` a literal percent sign."""
    return path.replace("%", "%%")


class ShellTemplate(string.Template):
    """`$name` placeholders are lower case; bash's own variables in the templates are upper case."""

    _placeholder = re.compile(r"\$(?:\{([a-z_][a-z0-9_]*)\}|([a-z_][a-z0-9_]*))")

    def render(self, values: Mapping[str, str]) -> str:
        wanted = {a or b for a, b in self._placeholder.findall(self.template)}
        if wanted != set(values):
            raise ValueError(f"template placeholders {sorted(wanted)} != values {sorted(values)}")
        return self.safe_substitute(values)


def _template(name: str) -> ShellTemplate:
    return ShellTemplate((TEMPLATES / f"{name}.sbatch.tmpl").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# Rendering (pure)


def train_config_json(cfg: SlurmConfig) -> dict[str, Any]:
    """The preset with the plan's overrides, as `petctl train` builds it."""
    from petctl.engine.config import preset, with_overrides

    seg = with_overrides(preset(cfg.preset), task="seg", cycles=cfg.cycles, epochs=cfg.epochs, mixed_precision=cfg.mixed_precision,
                         pretrained=cfg.pretrained)
    return with_overrides(seg, task="cls", cycles=cfg.cls_cycles, epochs=cfg.cls_epochs, pretrained=cfg.cls_pretrained,
                          projections=cfg.cls_projections).to_json()


def plan_dir(home: str | os.PathLike[str], run: str) -> Path:
    return Path(home) / "runs" / run / "slurm"


def _directives(cfg: SlurmConfig, job: Job, *, nodes: int, gpus: int) -> str:
    logs = _slurm_filename(str(plan_dir(cfg.home, cfg.run) / "logs"))
    pairs: list[tuple[str, str | int | None]] = [
        ("job-name", f"{cfg.run}-{job.name}"),
        ("output", f"{logs}/%x-%A_%a.out" if job.array else f"{logs}/%x-%j.out"),
        ("array", f"0-{job.array - 1}" if job.array else None),
        ("nodes", nodes), ("ntasks-per-node", 1), ("cpus-per-task", cfg.cpus_per_task),
        ("gpus-per-node", gpus or None),
        ("partition", cfg.partition), ("account", cfg.account), ("qos", cfg.qos),
        ("mem", cfg.mem), ("time", cfg.time), ("constraint", cfg.constraint),
    ]
    return "\n".join(f"#SBATCH --{key}={sbatch_quote(value)}" for key, value in pairs if value is not None)


def _environment(cfg: SlurmConfig, *, cpu: bool) -> str:
    from petctl.engine.folds import ELASTIC_SHUTDOWN_S

    lines = [f"export PETCTL_HOME={shlex.quote(cfg.home)}", "export PYTHONUNBUFFERED=1",
             # torchrun kills its ranks this long after the trap's TERM (its default 30 s): time to save `last`
             f"export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${{TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-{ELASTIC_SHUTDOWN_S}}}"]
    if cpu:
        lines.append("export ACCELERATE_USE_CPU=true")
    return "\n".join(lines)


def _petctl(cfg: SlurmConfig, *args: str) -> list[str]:
    return [cfg.python, "-m", "petctl", *args]


def _common(cfg: SlurmConfig, job: Job, *, nodes: int = 1, gpus: int = 0) -> dict[str, str]:
    return {
        "directives": _directives(cfg, job, nodes=nodes, gpus=gpus),
        "environment": _environment(cfg, cpu=cfg.gpus_per_node == 0),
        "workdir": shlex.quote(cfg.workdir),
        "banner": shlex.quote(f"petctl: run {cfg.run}, {job.name}:"),
    }


def _render_prepare(cfg: SlurmConfig, job: Job, spacing: Sequence[float]) -> str:
    command = _petctl(cfg, "prepare", cfg.data, "--store", cfg.store, "--spacing", ",".join(f"{s:g}" for s in spacing),
                      "--folds", str(cfg.num_folds), "--run", cfg.run)
    if cfg.test_fraction is not None:
        command += ["--test-fraction", f"{cfg.test_fraction:g}"]
    return _template("prepare").render({**_common(cfg, job), "command": shell_words(command)})


def _render_step(cfg: SlurmConfig, job: Job, command: Sequence[str]) -> str:
    gpus = min(cfg.gpus_per_node, 1)
    return _template("step").render({**_common(cfg, job, gpus=gpus), "command": shell_words(command)})


def _render_train(cfg: SlurmConfig, job: Job, task: str, merged: bool, axes: Sequence[str]) -> str:
    from petctl.engine.launch import entry_args, launch_command

    folder = plan_dir(cfg.home, cfg.run)
    run = cfg.merged_run if merged else cfg.run
    module_args = entry_args(config=CONFIG, store=cfg.store, fold=FOLD, task=task, out=OUT, run=run, home=cfg.home,
                             projection=AXIS if axes else None, merged=merged, max_steps=cfg.max_steps)
    argv = launch_command(
        processes=cfg.processes_per_node * cfg.nodes, nodes=cfg.nodes, machine_rank=NODE_RANK, main_address=MAIN_ADDR,
        mixed_precision=cfg.mixed_precision, cpu=cfg.gpus_per_node == 0, module_args=module_args,
        threads=max(1, cfg.cpus_per_task // cfg.processes_per_node),
    )
    argv[0] = cfg.python  # launch_command names this machine's interpreter; the nodes use the plan's
    argv[argv.index("--main_process_port") + 1] = PORT
    family = f"{task}{'-merged' if merged else ''}"
    runs = Path(cfg.home) / "runs"
    prologue = ""
    if merged:  # as `petctl retrain-merged` does: the merged run keeps the parent's calibrated thresholds
        # every array task copies at once: through a per-task temporary file and an atomic rename,
        # since two `cp`s racing onto one new file fail with "File exists" (O_EXCL)
        source, target = (runs / r / "thresholds.json" for r in (cfg.run, cfg.merged_run))
        partial = shlex.quote(f"{target}.") + '"$SLURM_JOB_ID.tmp"'
        prologue = (f"cp -- {shlex.quote(str(source))} {partial} && mv -f -- {partial} {shlex.quote(str(target))} "
                    "|| exit 1\n")
    values = {
        **_common(cfg, job, nodes=cfg.nodes, gpus=cfg.gpus_per_node),
        "axes": " ".join(shlex.quote(a) for a in axes),
        "family_dir": shlex.quote(str(runs / run / family)),
        "prologue": prologue,
        "config": shlex.quote(str(folder / "train_config.json")),
        "launch": shell_words(argv),
        "srun_options": f"--gpus-per-node={cfg.gpus_per_node} " if cfg.gpus_per_node else "",
    }
    return _template("train").render(values)


def render_plan(cfg: SlurmConfig) -> tuple[Plan, dict[str, str]]:
    """The chain's jobs and their scripts (`{file name: text}`), without touching the filesystem."""
    from petctl.engine.config import TrainConfig

    train_json = train_config_json(cfg)
    train_cfg = TrainConfig.from_json(train_json)
    axes, k = tuple(train_cfg.cls_projections), cfg.num_folds
    scripts: dict[str, str] = {}

    def train_job(task: str, merged: bool, after: tuple[str, ...]) -> Job:
        family = f"{task}{'-merged' if merged else ''}"
        run = cfg.merged_run if merged else cfg.run
        if task == "seg":  # array task id = fold; classifier: fold × projection axis
            steps = tuple(PlannedStep(run, f"train-{family}-fold{f}", "train-seg", f) for f in range(k))
        else:
            steps = tuple(PlannedStep(run, f"train-{family}-fold{f}-{a}", "train-cls", f * len(axes) + i)
                          for f in range(k) for i, a in enumerate(axes))
        job = Job(f"train-{family}", "train", after, steps, len(steps))
        scripts[job.filename] = _render_train(cfg, job, task, merged, axes if task == "cls" else ())
        return job

    prepare = Job("prepare", "prepare", (), (PlannedStep(cfg.run, "prepare", "prepare"),))
    scripts[prepare.filename] = _render_prepare(cfg, prepare, cfg.spacing or train_cfg.spacing)
    jobs = [prepare, train_job("seg", False, ("prepare",)), train_job("cls", False, ("prepare",))]
    calibrate = Job("calibrate", "calibrate", ("train-seg", "train-cls"), (PlannedStep(cfg.run, "calibrate", "calibrate"),))
    scripts[calibrate.filename] = _render_step(cfg, calibrate, _petctl(cfg, "calibrate", "--run", cfg.run, *cfg.calibrate_args))
    jobs += [calibrate, train_job("seg", True, ("calibrate",)), train_job("cls", True, ("calibrate",))]
    if cfg.predict_input is not None and cfg.predict_output is not None:
        # no pending placeholder: predict names its step when it starts (predict-YYYYmmdd-HHMMSS-PID)
        # and records this job's id in it itself
        predict = Job("predict", "predict", ("train-seg-merged", "train-cls-merged"))
        scripts[predict.filename] = _render_step(
            cfg, predict, _petctl(cfg, "predict", "--run", cfg.merged_run, cfg.predict_input, cfg.predict_output))
        jobs.append(predict)
    return Plan(cfg, tuple(jobs), train_json), scripts


# --------------------------------------------------------------------------------------------
# Files


def write_plan(plan: Plan, scripts: Mapping[str, str], folder: Path) -> Path:
    """Write the scripts, `train_config.json` and `plan.json` into `folder` (created, with `logs/`)."""
    from petctl.engine.registry import write_json_atomic

    (folder / "logs").mkdir(parents=True, exist_ok=True)  # SLURM does not create --output folders
    for name, text in scripts.items():
        (folder / name).write_text(text, encoding="utf-8")  # mode 0o666 & ~umask
    write_json_atomic(folder / "train_config.json", plan.train_config)
    write_json_atomic(folder / "plan.json", plan.to_json())
    return folder / "plan.json"


def read_plan(folder: Path) -> dict[str, Any]:
    """`plan.json` as written by `write_plan` (and updated by `submit_plan`)."""
    from petctl.engine.registry import read_json

    path = folder / "plan.json"
    try:
        data = read_json(path)
    except FileNotFoundError:
        raise PetctlError(f"no SLURM plan in {folder}; run `petctl slurm plan` first") from None
    except (OSError, ValueError) as exc:
        raise PetctlError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("version") != PLAN_VERSION:
        raise PetctlError(f"{path}: unsupported plan version {data.get('version') if isinstance(data, dict) else None!r}")
    return data


def submitted_ids(plan: Mapping[str, Any]) -> list[str]:
    return [j["job_id"] for j in plan["jobs"] if j.get("job_id")]


def step_job_id(job_id: str, task: int | None) -> str:
    """The id squeue and the registry use for one array task (`ID_TASK`) or a plain job (`ID`)."""
    return job_id if task is None else f"{job_id}_{task}"


# --------------------------------------------------------------------------------------------
# Submitting and cancelling (the only code here that runs SLURM commands)

Runner = Callable[..., "subprocess.CompletedProcess[str]"]


def _slurm(runner: Runner, argv: Sequence[str], timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    try:
        return runner(list(argv), capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        raise PetctlError(f"`{argv[0]}` not found: run this on a SLURM login node") from None
    except subprocess.TimeoutExpired:
        raise PetctlError(f"`{argv[0]}` did not answer within {timeout_s:.0f} s (is slurmctld up?)") from None


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "no message")


def submit_plan(folder: Path, registry: Any, *, only: Sequence[str] | None = None,
                runner: Runner = subprocess.run) -> dict[str, str]:
    """Submit the plan's jobs in order with `sbatch --parsable --hold --dependency=afterok:…
    --kill-on-invalid-dep=yes` (a failed job cancels the jobs after it), register every step as
    pending with its job id, then release them; returns job name → SLURM job id.
    `only` limits the jobs: a dependency outside it whose earlier submission squeue still lists
    (queued or running) is waited for (`afterok` on that job's id); one that has left the queue is
    taken as done. When sbatch refuses a job, the jobs already submitted are cancelled and the error
    is one line."""
    from petctl.engine.registry import write_json_atomic

    plan = read_plan(folder)
    names = [j["name"] for j in plan["jobs"]]
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise PetctlError(f"no job {unknown[0]!r} in the plan (jobs: {', '.join(names)})")
    cfg = SlurmConfig.from_json(plan["config"])
    selected = [j for j in plan["jobs"] if only is None or j["name"] in only]
    earlier = {j["name"]: j["job_id"] for j in plan["jobs"] if j.get("job_id")}
    live = set(_active(runner, list(earlier.values())))
    active = [earlier[j["name"]] for j in selected if earlier.get(j["name"]) in live]
    if active:
        raise PetctlError(f"run {cfg.run} still has SLURM jobs queued or running ({', '.join(active)}); "
                          f"`petctl slurm cancel --run {cfg.run}` first")
    # with `only`: the jobs left out that are still queued or running, by name (earlier submissions)
    waiting = {name: job_id for name, job_id in earlier.items() if job_id in live}
    ids: dict[str, str] = {}
    for job in selected:
        argv = ["sbatch", "--parsable", "--hold"]
        after = [ids[a] if a in ids else waiting[a] for a in job["after"] if a in ids or a in waiting]
        if after:
            # a failed dependency cancels the job instead of leaving it pending forever
            argv += ["--dependency=afterok:" + ":".join(after), "--kill-on-invalid-dep=yes"]
        argv.append(str(folder / job["script"]))
        result = _slurm(runner, argv)
        if result.returncode != 0:
            note = _cancel_ids(runner, list(ids.values())) if ids else ""
            raise PetctlError(f"sbatch refused {job['name']}: {_first_line(result.stderr or result.stdout)}{note}")
        ids[job["name"]] = result.stdout.strip().split(";")[0]
    try:  # the jobs are held: a registry or plan.json that cannot take them must not leave them unrecorded
        registry.create_run(cfg.run, kind="train", config={"store": cfg.store, "preset": cfg.preset, "slurm": str(folder)})
        if any(name.endswith("-merged") for name in ids):
            registry.create_run(cfg.merged_run, kind="train", config={"store": cfg.store, "parent": cfg.run}, parent=cfg.run)
        for job in selected:  # with `only`, the other jobs keep their earlier ids
            job["job_id"] = ids[job["name"]]
            for s in job["steps"]:
                registry.mark_pending(s["run"], s["step"], kind=s["kind"], slurm_job_id=step_job_id(job["job_id"], s["task"]))
        write_json_atomic(folder / "plan.json", plan)
    except Exception as exc:
        note = _cancel_ids(runner, list(ids.values())) if ids else ""
        raise PetctlError(f"could not record the submitted jobs ({type(exc).__name__}: {_first_line(str(exc))}){note}") from None
    if ids:
        result = _slurm(runner, ["scontrol", "release", ",".join(ids.values())])
        if result.returncode != 0:
            raise PetctlError(f"submitted but could not release the held jobs {', '.join(ids.values())}: "
                              f"{_first_line(result.stderr)} (run `scontrol release` yourself)")
    return ids


def check_replaceable(folder: Path, run: str, *, force: bool, runner: Runner = subprocess.run) -> None:
    """`slurm plan` may write over an earlier plan only when that one was never submitted, or, with
    `force`, when none of its jobs is still queued or running: the new plan.json forgets the old
    job ids, so jobs still running would go on writing to the run unseen by `cancel` and `submit`."""
    if not (folder / "plan.json").exists():
        return
    earlier = submitted_ids(read_plan(folder))
    if not earlier:
        return
    if not force:
        raise PetctlError(f"run {run} was already submitted (jobs {', '.join(earlier)}); "
                          f"`petctl slurm cancel --run {run}` them, or pass --force to replace the plan")
    active = _active(runner, earlier)
    if active:
        raise PetctlError(f"run {run} still has SLURM jobs queued or running ({', '.join(active)}); "
                          f"`petctl slurm cancel --run {run}` them before --force replaces the plan")


def _active(runner: Runner, ids: Sequence[str]) -> list[str]:
    """The ones of `ids` (plain or array job ids) that squeue still lists."""
    if not ids:
        return []
    result = _slurm(runner, ["squeue", "-h", "-r", "-o", "%i|%T", "-u", _user()], timeout_s=30)
    if result.returncode != 0:  # an empty answer from a squeue that failed is not "none running"
        raise PetctlError(f"cannot list the SLURM jobs (squeue, exit status {result.returncode}: {_first_line(result.stderr or result.stdout)})")
    listed = parse_squeue(result.stdout)
    bases = {job.split("_")[0] for job in listed}
    return [i for i in ids if i in bases]


def _cancel_ids(runner: Runner, ids: Sequence[str]) -> str:
    result = _slurm(runner, ["scancel", *ids])
    if result.returncode == 0:
        return f"; cancelled the jobs already submitted ({', '.join(ids)})"
    return f"; could not cancel the jobs already submitted ({', '.join(ids)}): {_first_line(result.stderr)}"


def cancel_plan(folder: Path, registry: Any, *, runner: Runner = subprocess.run) -> list[str]:
    """scancel every submitted job of the plan; its steps still pending or running are marked failed
    ("cancelled"; a training rank that saves its checkpoint on the way out marks its step pending again)."""
    plan = read_plan(folder)
    ids = submitted_ids(plan)
    if not ids:
        return []
    result = _slurm(runner, ["scancel", *ids])
    if result.returncode != 0:
        raise PetctlError(f"scancel failed: {_first_line(result.stderr)}")
    for job in plan["jobs"]:
        for s in job["steps"] if job.get("job_id") else ():
            record = registry.step(s["run"], s["step"])
            job_id = step_job_id(job["job_id"], s["task"])
            # running: only under this plan's job (a local `petctl calibrate` of the same run is not ours)
            if record is not None and (record.status == "pending" or (record.status == "running" and record.slurm_job_id == job_id)):
                registry.fail_step(s["run"], s["step"], f"cancelled (SLURM job {job_id})")
    return ids


# --------------------------------------------------------------------------------------------
# Job states for `petctl status`


def _expand_tasks(spec: str) -> list[str]:
    """`0-3,7%2` → ["0", "1", "2", "3", "7"]."""
    tasks: list[str] = []
    for part in spec.split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()):
            tasks += [str(t) for t in range(int(lo), int(hi or lo) + 1)]
    return tasks


def parse_squeue(text: str) -> dict[str, str]:
    """`squeue -h -r -o '%i|%T'` lines → {job id: state}."""
    out = {}
    for line in text.splitlines():
        job, _, state = line.strip().partition("|")
        if job and state:
            out[job] = state
    return out


def parse_scontrol(text: str) -> dict[str, str]:
    """`scontrol -o show job` lines → {job id (and ARRAY_TASK for array tasks): state}."""
    out = {}
    for line in text.splitlines():
        fields = dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line))
        state = fields.get("JobState")
        if not state or "JobId" not in fields:
            continue
        array_job, tasks = fields.get("ArrayJobId"), fields.get("ArrayTaskId")
        if array_job and tasks:
            for t in _expand_tasks(tasks):
                out[f"{array_job}_{t}"] = state
        else:
            out[fields["JobId"]] = state
    return out


def parse_sacct(text: str) -> dict[str, str]:
    """`sacct -n -X -P -o JobID,State` lines → {job id: state} ("CANCELLED by 0" → "CANCELLED")."""
    out = {}
    for line in text.splitlines():
        job, _, state = line.strip().partition("|")
        if job and state and "[" not in job:
            out[job] = state.split()[0]
    return out


class JobStates:
    """Looks job states up lazily: one squeue call for all the user's jobs, then per array/job id
    `scontrol show job` and sacct for the ones squeue no longer lists, all within `budget_s`."""

    def __init__(self, budget_s: float = 4.0, call_timeout_s: float = 2.0, runner: Runner = subprocess.run,
                 available: bool | None = None) -> None:
        self.budget_s, self.call_timeout_s, self._runner = budget_s, call_timeout_s, runner
        self._deadline: float | None = None
        self._known: dict[str, str] | None = None
        self._asked: set[str] = set()
        self.available = shutil.which("squeue") is not None if available is None else available

    def _ask(self, argv: list[str]) -> str | None:
        assert self._deadline is not None
        left = min(self.call_timeout_s, self._deadline - time.monotonic())
        if left <= 0:
            return None
        try:
            result = self._runner(argv, capture_output=True, text=True, timeout=left)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout if result.returncode == 0 else None

    def state(self, job_id: str | None) -> str:
        """The SLURM state of `job_id` ("RUNNING", "COMPLETED", …); "–" without SLURM, "?" when unknown."""
        if not job_id:
            return "-"
        if not self.available:
            return "–"
        if self._known is None:
            self._deadline = time.monotonic() + self.budget_s
            text = self._ask(["squeue", "-h", "-r", "-o", "%i|%T", "-u", _user()])
            if text is None:  # slurmctld down or too slow: do not wait on it again for every row
                self.available = False
                return "–"
            self._known = parse_squeue(text)
        base = job_id.split("_")[0]
        if job_id not in self._known and base not in self._asked:
            self._asked.add(base)
            for argv, parse in ((["scontrol", "-o", "show", "job", base], parse_scontrol),
                                (["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", base], parse_sacct)):
                text = self._ask(argv)
                found = parse(text) if text else {}
                self._known.update({k: v for k, v in found.items() if k not in self._known})
                if job_id in self._known:
                    break
        return self._known.get(job_id, "?")


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())

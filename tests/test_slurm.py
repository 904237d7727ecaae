"""`petctl slurm`: rendered sbatch scripts (snapshots, quoting, a sandbox run with stub SLURM commands),
submit/cancel/status against a fake SLURM, and the chain on a real local SLURM cluster.

The `slurm` tests start a throwaway cluster with tools/local-slurm/start-local-slurm.sh (2 emulated
nodes × 1 CPU on this host; a requeued job may start again after 15 s instead of SLURM's 120 s) and
stop it by PID at the end, also when a test fails. Wall times on the 2-core development VM (shared
with other jobs; most of each task is Python/torch start-up, 3 interpreters per task):
  cluster start + stop                                                       ~15 s
  test_chain_on_local_cluster: prepare → 2 seg + 4 cls → calibrate
    → 2 + 4 merged → predict, 15 jobs, at most 2 at a time                   ~4-5 min
  test_preempted_task_checkpoints_requeues_and_resumes (single node)         ~1.5 min
  test_training_task_across_two_nodes (2 × 1 gloo rank, preempted too)       ~1.5 min
  test_sbatch_reads_quoted_directives                                        ~3 s
The other tests here need no cluster and take about 5 s together.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from petctl.cli import app
from petctl.engine.registry import Registry
from petctl.engine.slurm import (
    JobStates,
    SlurmConfig,
    cancel_plan,
    check_replaceable,
    parse_sacct,
    parse_scontrol,
    parse_squeue,
    plan_dir,
    read_plan,
    render_plan,
    sbatch_quote,
    submit_plan,
    write_plan,
)
from petctl.errors import PetctlError

REPO = Path(__file__).resolve().parents[1]
SNAPSHOTS = Path(__file__).parent / "snapshots" / "slurm"
UPDATE = os.environ.get("PETCTL_UPDATE_SNAPSHOTS") == "1"
# a path component that tries every way out of a quoted shell word (and out of an #SBATCH value)
NASTY = "we'ird \"dir\" $(touch pwned1) `touch pwned2`; touch pwned3 #x %y"


def _cfg(**changes) -> SlurmConfig:
    base = SlurmConfig(run="r1", data="/data/cohort", store="/scratch/store", home="/home/u/petctl", workdir="/home/u/work",
                       preset="cpu-tiny", num_folds=2, gpus_per_node=0, cpus_per_task=2, python="/opt/venv/bin/python",
                       predict_input="/data/new", predict_output="/data/masks")
    return dataclasses.replace(base, **changes)


GPU = dict(preset="autopet-paper", num_folds=5, nodes=2, gpus_per_node=4, cpus_per_task=32, partition="gpu",
           account="proj-123", qos="normal", mem="256G", time="2-00:00:00", constraint="a100&ib", mixed_precision="bf16")


# --------------------------------------------------------------------------------------------
# rendering


@pytest.mark.parametrize("variant, changes, names", [
    ("cpu-2folds", {}, None),
    ("gpu-2nodes", GPU, ("train-seg.sbatch", "train-cls-merged.sbatch", "calibrate.sbatch")),
])
def test_scripts_match_snapshots(variant, changes, names):
    _, scripts = render_plan(_cfg(**changes))
    folder = SNAPSHOTS / variant
    for name in names or scripts:
        path = folder / name
        if UPDATE:
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(scripts[name])
        assert scripts[name] == path.read_text(), f"{name} changed; PETCTL_UPDATE_SNAPSHOTS=1 to accept"


def test_plan_chain_dependencies_and_steps():
    plan, scripts = render_plan(_cfg(num_folds=3))
    jobs = {j.name: j for j in plan.jobs}
    assert [j.name for j in plan.jobs] == ["prepare", "train-seg", "train-cls", "calibrate", "train-seg-merged",
                                           "train-cls-merged", "predict"]
    assert jobs["train-seg"].after == ("prepare",) and jobs["calibrate"].after == ("train-seg", "train-cls")
    assert jobs["train-cls-merged"].after == ("calibrate",) and jobs["predict"].after == ("train-seg-merged", "train-cls-merged")
    assert jobs["train-seg"].array == 3 and jobs["train-cls"].array == 6 and jobs["prepare"].array is None
    # classifier task id → fold × axis, in the order the script maps it
    assert [(s.task, s.step) for s in jobs["train-cls"].steps][:3] == [(0, "train-cls-fold0-x"), (1, "train-cls-fold0-y"),
                                                                        (2, "train-cls-fold1-x")]
    assert {s.run for s in jobs["train-seg-merged"].steps} == {"r1-merged"} and jobs["predict"].steps == ()
    assert "#SBATCH --array=0-5" in scripts["train-cls.sbatch"]
    assert "--dependency" not in "".join(scripts.values())  # dependencies are given at submit time
    assert "predict" not in {j.name for j in render_plan(_cfg(predict_input=None, predict_output=None))[0].jobs}


def test_multi_node_launch_line():
    _, scripts = render_plan(_cfg(**GPU))
    text = scripts["train-seg.sbatch"]
    assert "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1" in text and "#SBATCH --gpus-per-node=4" in text
    assert '#SBATCH --constraint="a100&ib"' in text and "#SBATCH --partition=gpu" in text
    launch = next(line for line in text.splitlines() if "accelerate.commands.launch" in line)
    assert "--num_processes 8 --num_machines 2" in launch and "--multi_gpu" in launch
    assert '--machine_rank "$SLURM_NODEID" --main_process_ip "$MAIN_ADDR"' in launch
    assert '--main_process_port "$PORT"' in launch and "--mixed_precision bf16" in launch
    assert "--num_cpu_threads_per_process 8" in launch and "ACCELERATE_USE_CPU" not in text
    assert "--signal=B:USR1@120" in text and "#SBATCH --requeue" in text


@pytest.mark.parametrize("value, expected", [
    ("gpu", "gpu"), ("2-00:00:00", "2-00:00:00"), ("a100&ib", '"a100&ib"'), ('x "y" #z \\w', '"x \\"y\\" \\#z \\\\w"'),
])
def test_sbatch_quote(value, expected):
    assert sbatch_quote(value) == expected


@pytest.mark.parametrize("changes", [{}, GPU])
def test_scripts_are_valid_bash(changes, tmp_path):
    _, scripts = render_plan(_cfg(**changes, home=f"/tmp/{NASTY}", store=f"/s/{NASTY}\\"))
    for name, text in scripts.items():
        (tmp_path / name).write_text(text)
        result = subprocess.run(["bash", "-n", str(tmp_path / name)], capture_output=True, text=True)
        assert result.returncode == 0, (name, result.stderr)


@pytest.mark.parametrize("bad, message", [
    (dict(run="a;b"), "may only use"), (dict(num_folds=1), "--folds"), (dict(partition="gpu\nrm -rf /"), "line break"),
    (dict(predict_input="/x", predict_output=None), "go together"), (dict(gpus_per_node=-1), "--gpus-per-node"),
    (dict(home="/a\\b"), "backslash"),
])
def test_config_validation(bad, message):
    with pytest.raises(PetctlError, match=message):
        _cfg(**bad)


# --------------------------------------------------------------------------------------------
# the scripts, run in a sandbox: stub srun / scontrol / python record what they were asked to do

STUB_SRUN = r"""#!/bin/bash
# srun stand-in: run the command once per "node" (SLURM_NODEID 0..N-1) and forward USR1/TERM as srun does
while [[ $1 == --* ]]; do [[ $1 == --nodes=* ]] && N=${1#--nodes=}; shift; done
PIDS=()
for ((i = 0; i < N; i++)); do SLURM_NODEID=$i "$@" & PIDS+=($!); done
trap 'SIGNALLED=1; kill -USR1 "${PIDS[@]}"' USR1
trap 'SIGNALLED=1; kill -TERM "${PIDS[@]}"' TERM
CODE=0
for p in "${PIDS[@]}"; do
  while :; do SIGNALLED=; wait "$p"; c=$?; [[ -z $SIGNALLED ]] && break; done
  ((c > CODE)) && CODE=$c
done
exit $CODE
"""
STUB_SCONTROL = r"""#!/bin/bash
case "$1 $2" in
  "show hostnames") echo node-a; echo node-b ;;
  "-o show") echo "NodeName=$4 Arch=x86_64 NodeAddr=10.1.2.3 NodeHostName=$4" ;;
  "requeue "*) echo "requeue $2" >> "$SANDBOX_LOG/scontrol" ;;
esac
"""
STUB_PYTHON = r"""#!/bin/bash
# python stand-in: record argv (NUL-separated) and cwd; optionally "train" until SIGTERM, then exit 75
printf '%s\0' "$@" > "$SANDBOX_LOG/argv.${SLURM_NODEID:-job}"
if [[ -n ${STUB_TRAIN_S:-} ]]; then
  trap 'sleep "${STUB_SAVE_S:-0}"; echo stopped >> "$SANDBOX_LOG/events"; exit 75' TERM  # STUB_SAVE_S: a slow checkpoint
  for ((i = 0; i < STUB_TRAIN_S * 10; i++)); do sleep 0.1; done
fi
exit "${STUB_EXIT:-0}"
"""


@pytest.fixture()
def sandbox(tmp_path: Path):
    """(config, folder of the written plan, env to run a script with, log folder)."""
    stubs, log = tmp_path / "bin", tmp_path / "log"
    stubs.mkdir()
    log.mkdir()
    for name, text in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL), ("python", STUB_PYTHON)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    root = tmp_path / NASTY
    (root / "work").mkdir(parents=True)
    cfg = _cfg(nodes=2, data=str(root / "raw"), store=str(root / "st\\ore"), home=str(root / "home"), workdir=str(root / "work"),
               python=str(stubs / "python"), predict_input=str(root / "in"), predict_output=str(root / "out"))
    plan, scripts = render_plan(cfg)
    folder = plan_dir(cfg.home, cfg.run)
    write_plan(plan, scripts, folder)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "SANDBOX_LOG": str(log), "SLURM_JOB_ID": "4242",
           "SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_JOB_NUM_NODES": "2", "SLURM_CPUS_PER_TASK": "2"}
    yield cfg, folder, env, log
    assert not list(tmp_path.rglob("pwned*")), "a quoted value ran as a command"


def _run_script(path: Path, env: dict[str, str], timeout_s: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(["bash", str(path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _argv(log: Path, who: str) -> list[str]:
    return (log / f"argv.{who}").read_bytes().decode().split("\0")[:-1]


def test_sandbox_train_task_maps_fold_axis_and_node_ranks(sandbox):
    cfg, folder, env, log = sandbox
    result = _run_script(folder / "train-cls.sbatch", env)
    assert result.returncode == 0, result.stderr
    out = Path(cfg.home) / "runs" / cfg.run / "cls" / "fold1-y"  # task 3 = fold 1, axis y
    assert (out / "train_config.json").read_text() == (folder / "train_config.json").read_text()
    for rank in (0, 1):
        argv = _argv(log, str(rank))
        opts = dict(zip(argv, argv[1:]))
        assert opts["--machine_rank"] == str(rank) and opts["--main_process_ip"] == "10.1.2.3"
        assert opts["--main_process_port"] == str(20000 + 4242) and opts["--num_processes"] == "2"
        assert opts["--fold"] == "1" and opts["--projection"] == "y" and opts["--out"] == str(out)
        assert opts["--store"] == cfg.store and opts["--home"] == cfg.home  # the nasty paths arrive verbatim
        assert opts["--config"] == str(out / "train_config.json")
    assert "task 3 = fold1-y" in result.stdout


def test_sandbox_merged_tasks_copy_the_thresholds_side_by_side(sandbox):
    """Every merged array task copies the parent's thresholds at once; none may fail on the race
    (two plain `cp`s onto one new file: "File exists", about 4 rounds in 30 here)."""
    cfg, folder, env, log = sandbox
    source = Path(cfg.home) / "runs" / cfg.run / "thresholds.json"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text('{"seg": 0.4}')
    merged = Path(cfg.home) / "runs" / cfg.merged_run
    merged.mkdir(parents=True)
    script = (folder / "train-seg-merged.sbatch").read_text()
    (copy,) = [line for line in script.splitlines() if "thresholds.json" in line]
    race = ('for r in $(seq 30); do rm -f -- "$TARGET"; for i in $(seq 16); do (SLURM_JOB_ID=$((5000 + i)); eval "$COPY") & done; '
            'wait; done')  # 16 tasks at once (bash forks faster than Popen), 30 rounds
    result = subprocess.run(["bash", "-c", race], env={**env, "COPY": copy, "TARGET": str(merged / "thresholds.json")},
                            capture_output=True, text=True, timeout=120)
    assert "exists" not in result.stderr and "cannot" not in result.stderr, result.stderr
    assert (merged / "thresholds.json").read_text() == '{"seg": 0.4}'
    assert not list(merged.glob("thresholds.json.*"))  # no temporary copies left behind
    result = _run_script(folder / "train-seg-merged.sbatch", {**env, "SLURM_ARRAY_TASK_ID": "1"})
    assert result.returncode == 0, result.stderr  # and the whole task runs with it


def test_sandbox_prepare_and_steps_pass_values_verbatim(sandbox):
    cfg, folder, env, log = sandbox
    result = _run_script(folder / "prepare.sbatch", {**env, "STUB_EXIT": "3"})
    assert result.returncode == 0 and "skipped some cases" in result.stderr  # exit 3 = finished with skipped cases
    assert _argv(log, "job")[:4] == ["-m", "petctl", "prepare", cfg.data] and _argv(log, "job")[-2:] == ["--workers", "2"]
    result = _run_script(folder / "predict.sbatch", env)
    assert result.returncode == 0, result.stderr
    assert _argv(log, "job") == ["-m", "petctl", "predict", "--run", "r1-merged", cfg.predict_input, cfg.predict_output]


@pytest.mark.parametrize("sigs, requeued, code", [((signal.SIGUSR1,), True, 0), ((signal.SIGTERM,), False, 75),
                                                   ((signal.SIGUSR1, signal.SIGTERM), True, 0)])  # the time limit's TERM after USR1
def test_sandbox_signal_checkpoints_every_node_then_requeues(sandbox, sigs, requeued, code):
    cfg, folder, env, log = sandbox
    save_s = "1.5" if len(sigs) > 1 else "0"  # the second signal lands while the ranks still save
    proc = subprocess.Popen(["bash", str(folder / "train-seg.sbatch")],
                            env={**env, "SLURM_ARRAY_TASK_ID": "0", "STUB_TRAIN_S": "60", "STUB_SAVE_S": save_s},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not ((log / "argv.0").exists() and (log / "argv.1").exists()) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # let the node wrappers install their traps
        for sig in sigs:
            proc.send_signal(sig)
            time.sleep(0.3)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code, err
    assert (log / "events").read_text().split() == ["stopped", "stopped"]  # both nodes' ranks checkpointed
    assert (log / "scontrol").exists() == requeued
    if requeued:
        assert (log / "scontrol").read_text().strip() == "requeue 4242"


# --------------------------------------------------------------------------------------------
# CLI


def _plan_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["slurm", "plan", "--run", "r", "--store", str(tmp_path / "store"), "--data", str(tmp_path / "raw"),
            "--preset", "cpu-tiny", "--gpus-per-node", "0", "--folds", "2", "--home", str(tmp_path / "home"), *extra]


def test_cli_plan_dry_run_writes_nothing(tmp_path: Path):
    result = CliRunner().invoke(app, _plan_args(tmp_path, "--dry-run"))
    assert result.exit_code == 0, result.output
    assert "# ==> train-seg.sbatch <==" in result.output and "#!/bin/bash" in result.output
    assert not (tmp_path / "home").exists()


def test_cli_plan_writes_files_with_the_users_umask(tmp_path: Path):
    old = os.umask(0o027)
    try:
        result = CliRunner().invoke(app, _plan_args(tmp_path))
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    folder = tmp_path / "home/runs/r/slurm"
    assert (folder / "logs").is_dir() and (folder / "plan.json").exists()
    for name in ("train-seg.sbatch", "plan.json", "train_config.json"):
        assert (folder / name).stat().st_mode & 0o777 == 0o640, name
    assert read_plan(folder)["jobs"][0]["job_id"] is None


def test_cli_plan_sets_the_cycles_of_each_task_apart(tmp_path: Path):
    """--cycles/--epochs set the segmentation's schedule and --cls-cycles/--cls-epochs the
    classifier's, as --pretrained/--cls-pretrained set each one's starting weights, in the one
    train_config.json both training jobs copy; what is not given stays the preset's."""
    from petctl.engine.config import preset

    (tmp_path / "in1k.pth").write_bytes(b"weights")
    result = CliRunner().invoke(app, _plan_args(tmp_path, "--cycles", "2", "--epochs", "3", "--cls-epochs", "4",
                                                "--cls-pretrained", str(tmp_path / "in1k.pth")))
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "home/runs/r/slurm/train_config.json").read_text())
    assert written["cls_pretrained"] == str((tmp_path / "in1k.pth").resolve()) and written["pretrained"] is None
    tiny = preset("cpu-tiny")
    assert (written["num_cycles"], written["epochs_per_cycle"]) == (2, 3)
    assert (written["cls_num_cycles"], written["cls_epochs_per_cycle"]) == (tiny.cls_num_cycles, 4) != (tiny.cls_num_cycles, tiny.cls_epochs_per_cycle)
    assert read_plan(tmp_path / "home/runs/r/slurm")["config"]["cls_epochs"] == 4


def test_cli_plan_sets_the_classifiers_projections(tmp_path: Path):
    """--cls-projections xy trains one classifier per fold on both views (as `petctl train
    --projections xy`): the array shrinks to one task per fold, each named for its projection, and the
    train_config.json the jobs read says so; a projection MIPs do not have fails in one line."""
    result = CliRunner().invoke(app, _plan_args(tmp_path, "--cls-projections", "xy"))
    assert result.exit_code == 0, result.output
    folder = tmp_path / "home/runs/r/slurm"
    assert json.loads((folder / "train_config.json").read_text())["cls_projections"] == ["xy"]
    jobs = {j["name"]: j for j in read_plan(folder)["jobs"]}
    assert [s["step"] for s in jobs["train-cls"]["steps"]] == ["train-cls-fold0-xy", "train-cls-fold1-xy"]
    script = (folder / "train-cls.sbatch").read_text()
    assert "#SBATCH --array=0-1" in script and "AXES=(xy)" in script
    assert "AXES=(x y)" in CliRunner().invoke(app, _plan_args(tmp_path, "--dry-run")).output  # the preset's
    bad = CliRunner().invoke(app, _plan_args(tmp_path / "bad", "--cls-projections", "x,w"))
    assert bad.exit_code != 0 and "cls_projections" in bad.output and "w" in bad.output
    assert len(bad.output.strip().splitlines()) == 1 and not (tmp_path / "bad/home").exists()


def test_cli_plan_passes_checked_calibrate_options(tmp_path: Path):
    result = CliRunner().invoke(app, _plan_args(tmp_path, "--calibrate-args", "--urine-veto --gate-margin 0.5"))
    assert result.exit_code == 0, result.output
    folder = tmp_path / "home/runs/r/slurm"
    script = (folder / "calibrate.sbatch").read_text()
    assert script.rstrip().endswith("calibrate --run r --urine-veto --gate-margin 0.5")
    assert read_plan(folder)["config"]["calibrate_args"] == ["--urine-veto", "--gate-margin", "0.5"]
    # checked against `petctl calibrate` at plan time: one line naming the option, nothing written
    for words, message in (("--gate-margn 0.5", "No such option: --gate-margn"), ("--gate-margin x", "Invalid value for '--gate-margin'"),
                           ("--run other", "may not set --run"), ("--home=/elsewhere", "may not set --home"),
                           ("--urine-veto '", "No closing quotation")):
        result = CliRunner().invoke(app, _plan_args(tmp_path / "bad", "--calibrate-args", words))
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, (words, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert not (tmp_path / "bad").exists()


def test_cli_errors_are_one_line(tmp_path: Path):
    result = CliRunner().invoke(app, _plan_args(tmp_path, "--partition", "a\nb"))
    assert result.exit_code == 2 and "line break" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["slurm", "submit", "--run", "nope", "--home", str(tmp_path / "home")])
    assert result.exit_code == 2 and "petctl slurm plan" in result.output


# --------------------------------------------------------------------------------------------
# submit / cancel / states against a fake SLURM


class FakeSlurm:
    """Answers sbatch/scontrol/scancel/squeue like SLURM; `refuse` names a script sbatch rejects."""

    def __init__(self, refuse: str | None = None, queue: str = "") -> None:
        self.calls: list[list[str]] = []
        self.refuse, self.queue, self.next_id = refuse, queue, 100

    def __call__(self, argv, **kwargs):
        self.calls.append(list(argv))
        if argv[0] == "sbatch":
            if self.refuse and argv[-1].endswith(self.refuse):
                return subprocess.CompletedProcess(argv, 1, "", "sbatch: error: invalid partition specified: nope\n"
                                                               "sbatch: error: Batch job submission failed: Invalid partition\n")
            self.next_id += 1
            return subprocess.CompletedProcess(argv, 0, f"{self.next_id}\n", "")
        if argv[0] == "squeue":
            return subprocess.CompletedProcess(argv, 0, self.queue, "")
        return subprocess.CompletedProcess(argv, 0, "", "")


@pytest.fixture()
def planned(tmp_path: Path) -> tuple[Path, Registry]:
    cfg = _cfg(home=str(tmp_path / "home"))
    plan, scripts = render_plan(cfg)
    folder = plan_dir(cfg.home, cfg.run)
    write_plan(plan, scripts, folder)
    return folder, Registry(Path(cfg.home))


def test_submit_holds_registers_then_releases(planned):
    folder, registry = planned
    fake = FakeSlurm()
    result = submit_plan(folder, registry, runner=fake)
    sbatch = [c for c in fake.calls if c[0] == "sbatch"]
    assert [Path(c[-1]).name for c in sbatch] == ["prepare.sbatch", "train-seg.sbatch", "train-cls.sbatch", "calibrate.sbatch",
                                                  "train-seg-merged.sbatch", "train-cls-merged.sbatch", "predict.sbatch"]
    assert all("--hold" in c and "--parsable" in c for c in sbatch)
    assert "--dependency=afterok:101" in sbatch[1] and "--dependency=afterok:102:103" in sbatch[3]
    assert "--dependency=afterok:105:106" in sbatch[6]
    assert all(("--kill-on-invalid-dep=yes" in c) == any(a.startswith("--dependency") for a in c) for c in sbatch)
    assert fake.calls[-1] == ["scontrol", "release", "101,102,103,104,105,106,107"]
    assert result["train-cls"] == "103" and len(result) == 7
    step = registry.step("r1", "train-cls-fold1-y")
    assert step.status == "pending" and step.slurm_job_id == "103_3"
    assert registry.step("r1-merged", "train-seg-merged-fold0").slurm_job_id == "105_0"
    assert registry.run("r1-merged").parent == "r1"
    assert [j["job_id"] for j in read_plan(folder)["jobs"]] == [str(i) for i in range(101, 108)]


def test_submit_refusal_is_one_line_and_cancels_the_rest(planned):
    folder, registry = planned
    fake = FakeSlurm(refuse="train-cls.sbatch")
    with pytest.raises(PetctlError) as err:
        submit_plan(folder, registry, runner=fake)
    assert str(err.value) == ("sbatch refused train-cls: sbatch: error: invalid partition specified: nope; "
                              "cancelled the jobs already submitted (101, 102)")
    assert ["scancel", "101", "102"] in fake.calls
    assert registry.steps("r1") == []


def test_resubmit_refused_while_jobs_are_queued_and_cancel(planned, monkeypatch):
    folder, registry = planned
    submit_plan(folder, registry, runner=FakeSlurm())
    with pytest.raises(PetctlError, match="still has SLURM jobs queued or running"):
        submit_plan(folder, registry, runner=FakeSlurm(queue="102_0|RUNNING\n102_1|PENDING\n"))
    for var in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "101")
    registry.start_step("r1", "prepare", kind="prepare")  # the plan's prepare job, running
    monkeypatch.delenv("SLURM_JOB_ID")
    registry.start_step("r1", "calibrate", kind="calibrate")  # a local `petctl calibrate` of the same run
    fake = FakeSlurm()
    assert cancel_plan(folder, registry, runner=fake) == [str(i) for i in range(101, 108)]
    assert fake.calls == [["scancel", *[str(i) for i in range(101, 108)]]]
    assert registry.step("r1", "train-seg-fold0").status == "failed" and "cancelled" in registry.step("r1", "train-seg-fold0").message
    prepare = registry.step("r1", "prepare")  # running when cancelled: a dead job's step must not stay "running"
    assert prepare.status == "failed" and prepare.message == "cancelled (SLURM job 101)"
    assert registry.step("r1", "calibrate").status == "running"  # not the plan's job: left to end by itself


def test_a_plan_is_replaced_only_when_its_submitted_jobs_have_left_the_queue(planned):
    """Without --force a submitted plan is kept; with it, only once none of its jobs is queued or
    running (the new plan.json would forget their ids while they go on writing to the run)."""
    folder, registry = planned
    check_replaceable(folder, "r1", force=False, runner=FakeSlurm())  # written, never submitted: replaceable
    submit_plan(folder, registry, runner=FakeSlurm())
    with pytest.raises(PetctlError, match="already submitted .*pass --force"):
        check_replaceable(folder, "r1", force=False, runner=FakeSlurm())
    queued = FakeSlurm(queue="104|PENDING\n999|RUNNING\n")
    with pytest.raises(PetctlError) as err:
        check_replaceable(folder, "r1", force=True, runner=queued)
    assert str(err.value) == ("run r1 still has SLURM jobs queued or running (104); "
                              "`petctl slurm cancel --run r1` them before --force replaces the plan")
    check_replaceable(folder, "r1", force=True, runner=FakeSlurm(queue="999|RUNNING\n"))  # only another run's job left
    check_replaceable(folder.parent / "nothing", "r1", force=False, runner=FakeSlurm())


def test_a_registry_that_cannot_take_the_submitted_jobs_cancels_them(planned, monkeypatch):
    """The jobs are held when the registry is written: if it fails (a corrupt run.json, a lock
    timeout, a full disk) they are cancelled, not left held, unrecorded, for a later release to run twice."""
    folder, registry = planned

    def broken(*a, **k):
        raise PetctlError("r1: run.json is not valid JSON")

    monkeypatch.setattr(registry, "create_run", broken)
    fake = FakeSlurm()
    with pytest.raises(PetctlError) as err:
        submit_plan(folder, registry, runner=fake)
    assert str(err.value).startswith("could not record the submitted jobs (PetctlError: r1: run.json is not valid JSON); "
                                     "cancelled the jobs already submitted (101, 102")
    assert ["scancel", *[str(i) for i in range(101, 108)]] in fake.calls
    assert not any(c[:2] == ["scontrol", "release"] for c in fake.calls)
    assert all(not j.get("job_id") for j in read_plan(folder)["jobs"])


def test_a_failed_squeue_is_not_an_empty_queue(planned):
    folder, registry = planned
    submit_plan(folder, registry, runner=FakeSlurm())

    class Down(FakeSlurm):
        def __call__(self, argv, **kwargs):
            if argv[0] == "squeue":
                return subprocess.CompletedProcess(argv, 1, "", "slurm_load_jobs error: Unable to contact slurm controller\n")
            return super().__call__(argv, **kwargs)

    with pytest.raises(PetctlError, match=r"cannot list the SLURM jobs \(squeue, exit status 1: slurm_load_jobs error"):
        check_replaceable(folder, "r1", force=True, runner=Down())
    with pytest.raises(PetctlError, match="cannot list the SLURM jobs"):
        submit_plan(folder, registry, runner=Down())


def test_submit_only_keeps_other_job_ids(planned):
    folder, registry = planned
    submit_plan(folder, registry, runner=FakeSlurm())
    fake = FakeSlurm()
    fake.next_id = 200
    submit_plan(folder, registry, only=["train-seg"], runner=fake)
    assert [c for c in fake.calls if c[0] == "sbatch"][0][-2:] == ["--hold", str(folder / "train-seg.sbatch")]
    ids = {j["name"]: j["job_id"] for j in read_plan(folder)["jobs"]}
    assert ids["train-seg"] == "201" and ids["prepare"] == "101"


def test_submit_only_waits_for_earlier_jobs_still_in_the_queue(planned):
    """`submit --only calibrate` while the earlier training arrays still run makes calibrate wait
    for them (afterok on their ids); dependencies that have left the queue are taken as done."""
    folder, registry = planned
    submit_plan(folder, registry, runner=FakeSlurm())  # prepare 101, train-seg 102, train-cls 103, calibrate 104
    fake = FakeSlurm(queue="102_0|RUNNING\n102_1|PENDING\n")  # train-cls (103) and prepare have finished
    fake.next_id = 300
    assert submit_plan(folder, registry, only=["calibrate"], runner=fake) == {"calibrate": "301"}
    sbatch = [c for c in fake.calls if c[0] == "sbatch"]
    assert len(sbatch) == 1 and "--dependency=afterok:102" in sbatch[0] and "--kill-on-invalid-dep=yes" in sbatch[0]
    fake = FakeSlurm()  # nothing left in the queue: no dependency at all
    fake.next_id = 400
    submit_plan(folder, registry, only=["train-seg-merged", "train-cls-merged"], runner=fake)
    assert not any(a.startswith("--dependency") for c in fake.calls if c[0] == "sbatch" for a in c)
    fake = FakeSlurm(queue="401_2|RUNNING\n")  # predict waits for the merged seg still running, not for cls
    fake.next_id = 500
    submit_plan(folder, registry, only=["predict"], runner=fake)
    assert "--dependency=afterok:401" in [c for c in fake.calls if c[0] == "sbatch"][0]


def test_state_parsers():
    assert parse_squeue("5_0|RUNNING\n7|PENDING\n\n") == {"5_0": "RUNNING", "7": "PENDING"}
    line = "JobId=12 ArrayJobId=9 ArrayTaskId=2 JobName=x JobState=COMPLETED Reason=None"
    pending = "JobId=9 ArrayJobId=9 ArrayTaskId=3-4,6%2 JobState=PENDING Reason=Dependency"
    assert parse_scontrol(f"{line}\n{pending}\nJobId=13 JobName=y JobState=FAILED") == {
        "9_2": "COMPLETED", "9_3": "PENDING", "9_4": "PENDING", "9_6": "PENDING", "13": "FAILED"}
    assert parse_sacct("2|CANCELLED by 0\n3_[1-2]|PENDING\n3_0|COMPLETED\n") == {"2": "CANCELLED", "3_0": "COMPLETED"}


def test_job_states_fall_back_and_cache():
    answers = {"squeue": "5_0|RUNNING\n", "scontrol": "JobId=31 ArrayJobId=3 ArrayTaskId=1 JobState=COMPLETED\n",
               "sacct": "2|TIMEOUT\n"}
    calls = []

    def runner(argv, **kwargs):
        calls.append(argv)
        if argv[0] == "scontrol" and argv[-1] != "3":
            return subprocess.CompletedProcess(argv, 1, "", "slurm_load_jobs error: Invalid job id specified")
        return subprocess.CompletedProcess(argv, 0, answers[argv[0]], "")

    states = JobStates(runner=runner, available=True)
    assert [states.state(i) for i in ("5_0", "3_1", "2", "5_0", "3_7", None)] == ["RUNNING", "COMPLETED", "TIMEOUT", "RUNNING", "?", "-"]
    assert [c[0] for c in calls] == ["squeue", "scontrol", "scontrol", "sacct"]  # 3_7: array 3 was asked already


def test_job_states_without_slurm():
    assert JobStates(available=False).state("5") == "–"

    def hang(argv, **kwargs):
        raise subprocess.TimeoutExpired(argv, kwargs.get("timeout", 0))

    states = JobStates(runner=hang, available=True)
    assert states.state("5") == "–" and states.state("6") == "–"


def test_status_shows_slurm_state_column(planned, monkeypatch, tmp_path):
    folder, registry = planned
    submit_plan(folder, registry, runner=FakeSlurm())
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))
    monkeypatch.setenv("COLUMNS", "250")
    result = CliRunner().invoke(app, ["status", "--run", "r1", "--home", str(registry.root.parent)])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "train-seg-fold1" in line)
    assert "102_1" in row and "–" in row and "SLURM state" in result.output


# --------------------------------------------------------------------------------------------
# a real local SLURM cluster


def _free_port_block(count: int = 3) -> int:
    for base in range(16817, 17800, 10):
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port block for the local SLURM cluster")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A 2-node local SLURM cluster (root only), stopped by PID at the end even when tests fail."""
    tools = REPO / "tools" / "local-slurm"
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (munged and slurmd run as root/munge)")
    if not all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in ("slurmctld", "slurmd", "munged", "sbatch")):
        result = subprocess.run([str(tools / "install.sh")], capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            pytest.skip(f"slurmctld/munged are missing and cannot be installed: {(result.stderr or result.stdout).strip()[-300:]}")
    base = Path(f"/tmp/petctl-slurm-test-{os.getpid()}")  # short: the munge socket path has a length limit
    env = {**os.environ, "SLURM_LOCAL_BASE": str(base), "SLURM_LOCAL_NODES": "2", "SLURM_LOCAL_CPUS": "1",
           "SLURM_LOCAL_PORT": str(_free_port_block()), "SLURM_LOCAL_CRED_EXPIRE": "15"}
    previous = os.environ.get("SLURM_CONF")
    try:
        start = subprocess.run([str(tools / "start-local-slurm.sh")], env=env, capture_output=True, text=True, timeout=300)
        assert start.returncode == 0, f"local SLURM did not start:\n{start.stderr[-3000:]}"
        os.environ["SLURM_CONF"] = str(base / "etc" / "slurm.conf")
        yield base
    finally:
        subprocess.run([str(tools / "stop-local-slurm.sh")], env=env, capture_output=True, text=True, timeout=300)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        shutil.rmtree(base, ignore_errors=True)


def _petctl(home: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PETCTL_HOME": str(home), "HF_HOME": str(home.parent / "hf"), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-m", "petctl", *args], env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _wait_for_jobs(ids: list[str], logs: Path, timeout_s: float) -> None:
    """Until SLURM no longer lists any of `ids` (array or plain job ids) in three polls running (a
    requeue passes through states a single poll could miss); on timeout cancel them and fail."""
    deadline, absent = time.monotonic() + timeout_s, 0
    while time.monotonic() < deadline:
        listed = parse_squeue(subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T"], capture_output=True, text=True).stdout)
        absent = 0 if {job.split("_")[0] for job in listed} & set(ids) else absent + 1
        if absent == 3:
            return
        time.sleep(2)
    subprocess.run(["scancel", *ids])
    tails = "\n".join(f"== {p.name}\n{p.read_text()[-1500:]}" for p in sorted(logs.glob("*.out")))
    pytest.fail(f"jobs {ids} still queued after {timeout_s:.0f} s\n{tails}")


def _scontrol_state(job_id: str) -> str:
    text = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    return ",".join(sorted(set(parse_scontrol(text).values()))) or "?"


@pytest.mark.slurm
@pytest.mark.slow
def test_chain_on_local_cluster(slurm_cluster, cohort: Path, tmp_path: Path):
    t0 = time.monotonic()
    home = tmp_path / "home dir 'q' #1 %x"  # the --output path survives sbatch's own parsing
    new = tmp_path / "new" / "imagesTs"
    new.mkdir(parents=True)
    first = sorted((cohort / "imagesTr").iterdir())[:2]  # one case: its CT and PET
    for path in first:
        shutil.copy(path, new / path.name)
    _petctl(home, "slurm", "plan", "--run", "c", "--store", str(tmp_path / "store"), "--data", str(cohort), "--preset", "cpu-tiny",
            "--gpus-per-node", "0", "--cpus-per-task", "1", "--folds", "2", "--spacing", "6,6,8", "--test-fraction", "0.25",
            "--cycles", "1", "--predict-input", str(new.parent), "--predict-output", str(tmp_path / "masks"),
            "--calibrate-args", "--gate-margin 0.5", cwd=tmp_path)
    _petctl(home, "slurm", "submit", "--run", "c")
    plan = read_plan(home / "runs/c/slurm")
    ids = [j["job_id"] for j in plan["jobs"]]
    assert all(ids), plan
    _wait_for_jobs(ids, home / "runs/c/slurm/logs", timeout_s=600)
    registry = Registry(home)
    expected = {s["step"]: s["run"] for j in plan["jobs"] for s in j["steps"]}
    states = {step: registry.step(run, step).status for step, run in expected.items()}
    assert set(states.values()) == {"done"}, states
    assert len(expected) == 1 + 2 + 4 + 1 + 2 + 4
    predicted = [s for s in registry.steps("c-merged") if s.kind == "predict"]
    assert [(s.status, s.slurm_job_id) for s in predicted] == [("done", ids[-1])]
    assert (tmp_path / "masks" / f"{first[0].name[: -len('_0000.nii.gz')]}.nii.gz").exists()
    assert (home / "runs/c-merged/thresholds.json").exists()
    assert json.loads((home / "runs/c/thresholds.json").read_text())["classifier"]["margin"] == 0.5  # --calibrate-args reached it
    assert {_scontrol_state(i) for i in ids} == {"COMPLETED"}
    status = _petctl(home, "status", "--run", "c").stdout
    assert "COMPLETED" in status
    print(f"chain wall time {time.monotonic() - t0:.0f} s")


def _submit_one_task(home: Path, run: str, *plan_args: str) -> tuple[str, Path]:
    """Plan, then sbatch array task 0 of the segmentation training alone; (array job id, its log)."""
    _petctl(home, "slurm", "plan", "--run", run, *plan_args)
    folder = home / "runs" / run / "slurm"
    job = subprocess.run(["sbatch", "--parsable", "--array=0", str(folder / "train-seg.sbatch")],
                         capture_output=True, text=True, check=True).stdout.strip()
    return job, folder / "logs" / f"{run}-train-seg-{job}_0.out"


def _preempt_at_step_10(job: str, log: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (log.exists() and "step 10/" in log.read_text()):
        time.sleep(1)
    assert log.exists() and "step 10/" in log.read_text(), log.read_text() if log.exists() else "no log"
    subprocess.run(["scancel", "--signal=USR1", "--batch", f"{job}_0"], check=True)


def _assert_resumed(text: str, step) -> None:
    # stopped mid-cycle (not after the cycle ended) and resumed from that very step
    stopped = re.search(r"stopped by signal at step (\d+); checkpoint saved", text)
    assert stopped and "requeueing job" in text and "restart 1)" in text, text[-3000:]
    assert re.search(rf"resuming at cycle 1, epoch \d+, step {stopped.group(1)}\n", text), text[-3000:]
    assert step.status == "done" and step.attempts == 2, step


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_task_checkpoints_requeues_and_resumes(slurm_cluster, store: Path, tmp_path: Path):
    t0 = time.monotonic()
    home = tmp_path / "home"
    job, log = _submit_one_task(home, "p", "--store", str(store), "--data", str(tmp_path / "unused"), "--preset", "cpu-tiny",
                                "--gpus-per-node", "0", "--cpus-per-task", "1", "--folds", "2", "--cycles", "1",
                                "--epochs", "15")  # 45 steps: room for the signal's latency
    _preempt_at_step_10(job, log)
    _wait_for_jobs([job], log.parent, timeout_s=300)
    _assert_resumed(log.read_text(), Registry(home).step("p", "train-seg-fold0"))
    meta = json.loads((home / "runs/p/seg/fold0/checkpoints/last/meta.json").read_text())
    assert meta["position"]["cycle"] == 1 and meta["position"]["global_step"] > 10
    assert _scontrol_state(f"{job}_0") == "COMPLETED"
    print(f"preemption round trip {time.monotonic() - t0:.0f} s")


@pytest.mark.slurm
@pytest.mark.slow
def test_training_task_across_two_nodes(slurm_cluster, store: Path, tmp_path: Path):
    """One task, one gloo process on each emulated node; preempted and resumed too (torchrun's path)."""
    t0 = time.monotonic()
    home = tmp_path / "home"
    job, log = _submit_one_task(home, "m", "--store", str(store), "--data", str(tmp_path / "unused"), "--preset", "cpu-tiny",
                                "--gpus-per-node", "0", "--nodes", "2", "--cpus-per-task", "1", "--folds", "2", "--cycles", "1",
                                "--epochs", "20")  # each rank sees half the cases: 2 steps an epoch; 40 steps leave room
                                                   # for the signal's latency
    _preempt_at_step_10(job, log)
    _wait_for_jobs([job], log.parent, timeout_s=300)
    text = log.read_text()
    assert f"on {socket.gethostname().split('.')[0]}-[1-2]" in text  # one task, both emulated nodes
    _assert_resumed(text, Registry(home).step("m", "train-seg-fold0"))
    meta = json.loads((home / "runs/m/seg/fold0/checkpoints/last/meta.json").read_text())
    assert meta["num_processes"] == 2 and meta["position"]["cycle"] == 1
    digests = meta["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert _scontrol_state(f"{job}_0") == "COMPLETED"
    print(f"two-node task with preemption {time.monotonic() - t0:.0f} s")


@pytest.mark.slurm
def test_sbatch_reads_quoted_directives(slurm_cluster, tmp_path: Path):
    """A home path with quotes, `#`, `%`, `;` and `$()` reaches sbatch's --output intact."""
    home = tmp_path / NASTY
    _petctl(home, "slurm", "plan", "--run", "q", "--store", str(tmp_path / "s"), "--data", str(tmp_path / "missing"),
            "--gpus-per-node", "0", "--cpus-per-task", "1", "--folds", "2", "--preset", "cpu-tiny", cwd=tmp_path)
    folder = home / "runs/q/slurm"
    job = subprocess.run(["sbatch", "--parsable", str(folder / "prepare.sbatch")], capture_output=True, text=True,
                         check=True).stdout.strip()
    _wait_for_jobs([job], folder / "logs", timeout_s=120)
    log = folder / "logs" / f"q-prepare-{job}.out"
    assert log.exists(), list((folder / "logs").iterdir())
    assert "petctl: run q, prepare:" in log.read_text()
    assert _scontrol_state(job) == "FAILED"  # no such cohort: prepare fails, as it should
    assert not list(tmp_path.rglob("pwned*"))


@pytest.mark.slow
def test_a_wheel_install_renders_the_templates(tmp_path: Path):
    """A non-editable install has no repository `slurm/` folder: the wheel carries the templates."""
    repo = Path(__file__).resolve().parents[1]
    wheels, site, src = tmp_path / "wheels", tmp_path / "site", tmp_path / "src"
    # build from a copy (links kept), so setuptools' build/ and egg-info never land in the checkout
    for name in ("petctl", "slurm"):
        shutil.copytree(repo / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(repo / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("petctl-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    code = ("import petctl.engine.slurm as s, pathlib; "
            "assert pathlib.Path(s.__file__).is_relative_to(pathlib.Path(r'%s')), s.__file__; "
            "names = sorted(p.name for p in s.TEMPLATES.glob('*.sbatch.tmpl')); print(names); "
            "[s._template(n.split('.')[0]) for n in names]" % site)
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(site)}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(sorted(p.name for p in (repo / "slurm").glob("*.sbatch.tmpl")))

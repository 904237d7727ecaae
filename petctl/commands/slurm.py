"""Run the whole chain on a SLURM cluster: `plan` renders sbatch scripts, `submit` queues them, `cancel` stops them.

`petctl slurm plan` writes HOME/runs/RUN/slurm/: prepare (CPU) → segmentation and classifier training
arrays (one task per fold, or per fold × projection) → calibrate → merged retrain arrays → optional
predict, each waiting for the one before (`afterok`), plus plan.json. Training tasks start one
accelerate launcher per node with `srun`; SIGUSR1 (sent 120 s before the time limit, or by
`scancel --signal=USR1 --batch JOB`) makes every rank save its checkpoint, then the task requeues
itself and resumes. `submit` registers every step as pending with its SLURM job id, so
`petctl status` shows the SLURM state beside the registry's.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from petctl.errors import PetctlError

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, rich_markup_mode="rich")

RunOpt = Annotated[str, typer.Option("--run", help="Registry run name (the plan lives in HOME/runs/RUN/slurm/).")]
HomeOpt = Annotated[Optional[Path], typer.Option("--home", help="petctl home (default $PETCTL_HOME or ./cache).")]


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from petctl.cli import user_errors  # imported late: petctl.cli imports this module

        return user_errors(fn)(*args, **kwargs)

    return wrapper


def _absolute(path: Path) -> str:
    return os.path.abspath(path)  # jobs run elsewhere: no relative paths in the scripts


def _spacing(text: str | None) -> tuple[float, float, float] | None:
    if text is None:
        return None
    from petctl.commands.prepare import _spacing as parse

    return parse(text)


def _calibrate_args(text: str | None, run: str) -> tuple[str, ...]:
    """The words of --calibrate-args, parsed by `petctl calibrate`'s own options (unknown options and
    bad values fail at plan time, in one line, instead of in the calibrate job hours later)."""
    import shlex

    if not text:
        return ()
    try:
        words = tuple(shlex.split(text))
    except ValueError as e:
        raise PetctlError(f"--calibrate-args: {e}") from None
    from petctl.cli import app as cli_app  # imported late: petctl.cli imports this module

    command = typer.main.get_command(cli_app).commands["calibrate"]  # type: ignore[attr-defined]
    try:
        command.make_context("calibrate", ["--run", run, *words])
    except Exception as e:  # click's usage errors (from the click that typer bundles)
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        raise PetctlError(f"--calibrate-args {text!r}: {message}") from None
    return words


def plan(
    run: RunOpt,
    store: Annotated[Path, typer.Option("--store", help="Store that prepare writes and training reads.")],
    data: Annotated[Path, typer.Option("--data", help="Raw cohort folder for prepare.")],
    preset: Annotated[str, typer.Option("--preset", help="autopet-paper, cpu-small or cpu-tiny.")] = "autopet-paper",
    partition: Annotated[Optional[str], typer.Option("--partition", help="SLURM partition.")] = None,
    account: Annotated[Optional[str], typer.Option("--account", help="SLURM account.")] = None,
    qos: Annotated[Optional[str], typer.Option("--qos", help="SLURM QOS.")] = None,
    nodes: Annotated[int, typer.Option("--nodes", help="Nodes per training task (multi-node accelerate when > 1).")] = 1,
    gpus_per_node: Annotated[int, typer.Option("--gpus-per-node", help="GPUs per node; 0 = CPU-only (gloo, one process per node).")] = 1,
    cpus_per_task: Annotated[int, typer.Option("--cpus-per-task", help="CPUs per node (prepare uses them as workers).")] = 8,
    mem: Annotated[Optional[str], typer.Option("--mem", help="Memory per node, e.g. 64G.")] = None,
    time_limit: Annotated[Optional[str], typer.Option("--time", help="Time limit per job, e.g. 1-00:00:00 (training requeues itself).")] = None,
    constraint: Annotated[Optional[str], typer.Option("--constraint", help="SLURM node features, e.g. a100.")] = None,
    folds: Annotated[int, typer.Option("--folds", help="Cross-validation folds (prepare --folds; array sizes).")] = 5,
    spacing: Annotated[Optional[str], typer.Option("--spacing", help="Store spacing x,y,z in mm (default: the preset's).")] = None,
    test_fraction: Annotated[Optional[float], typer.Option("--test-fraction", help="prepare --test-fraction (default: prepare's).")] = None,
    cycles: Annotated[Optional[int], typer.Option("--cycles", help="Override the preset's number of segmentation cycles.")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Override the preset's segmentation epochs per cycle.")] = None,
    cls_cycles: Annotated[Optional[int], typer.Option("--cls-cycles", help="Override the preset's number of classifier cycles.")] = None,
    cls_epochs: Annotated[Optional[int], typer.Option("--cls-epochs", help="Override the preset's classifier epochs per cycle.")] = None,
    pretrained: Annotated[Optional[Path], typer.Option("--pretrained", exists=True, dir_okay=False, help="Local Swin-UNETR checkpoint the segmentation folds start from (as `petctl train --task seg --pretrained`); it must be readable from the compute nodes.")] = None,
    cls_pretrained: Annotated[Optional[Path], typer.Option("--cls-pretrained", exists=True, dir_okay=False, help="Local timm state dict the classifier folds start from (as `petctl train --task cls --pretrained`).")] = None,
    cls_projections: Annotated[Optional[str], typer.Option("--cls-projections", help="The classifier's MIP projections, comma-separated, a model each: x,y (the paper's) or xy (one model on both views of each scan; the classifier array shrinks to one task per fold); default: the preset's (x,y).")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Stop training after this many steps (smoke runs).")] = None,
    mixed_precision: Annotated[str, typer.Option("--mixed-precision", help="no or bf16.")] = "no",
    predict_input: Annotated[Optional[Path], typer.Option("--predict-input", help="NIfTI cases to predict at the end.")] = None,
    predict_output: Annotated[Optional[Path], typer.Option("--predict-output", help="Where predict writes the masks.")] = None,
    calibrate_args: Annotated[Optional[str], typer.Option("--calibrate-args", help="More options for the calibrate job, in one quoted string, e.g. '--urine-veto --gate-margin 0.5 --gate-positives detected' (what `petctl demo` calibrates with); checked against `petctl calibrate` now, not when the job starts.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the scripts instead of writing them.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a plan whose jobs were already submitted and have all left the queue (jobs still queued or running are refused: cancel them first).")] = False,
    home: HomeOpt = None,
) -> None:
    """Render the chain's sbatch scripts and plan.json into HOME/runs/RUN/slurm/."""
    from petctl.console import console
    from petctl.engine.slurm import SlurmConfig, check_replaceable, plan_dir, render_plan, write_plan
    from petctl.home import resolve_home

    cfg = SlurmConfig(
        run=run, data=_absolute(data), store=_absolute(store), home=_absolute(resolve_home(home)), workdir=os.getcwd(),
        preset=preset, num_folds=folds, nodes=nodes, gpus_per_node=gpus_per_node, cpus_per_task=cpus_per_task,
        partition=partition, account=account, qos=qos, mem=mem, time=time_limit, constraint=constraint,
        spacing=_spacing(spacing), test_fraction=test_fraction, cycles=cycles, epochs=epochs,
        cls_cycles=cls_cycles, cls_epochs=cls_epochs, pretrained=_absolute(pretrained) if pretrained else None,
        cls_pretrained=_absolute(cls_pretrained) if cls_pretrained else None,
        cls_projections=tuple(p.strip() for p in cls_projections.split(",")) if cls_projections else None, max_steps=max_steps, mixed_precision=mixed_precision,
        predict_input=_absolute(predict_input) if predict_input else None,
        predict_output=_absolute(predict_output) if predict_output else None,
        calibrate_args=_calibrate_args(calibrate_args, run),
    )
    result, scripts = render_plan(cfg)
    if dry_run:
        for name, text in scripts.items():
            typer.echo(f"# ==> {name} <==\n{text}")
        return
    folder = plan_dir(cfg.home, run)
    check_replaceable(folder, run, force=force)
    write_plan(result, scripts, folder)
    _jobs_table(f"SLURM plan for run {run} → {folder}", [(j.name, j.array, j.after, j.filename) for j in result.jobs])
    console.print(f"submit with: petctl slurm submit --run {run}" + (f" --home {home}" if home else ""))


def submit(
    run: RunOpt,
    only: Annotated[Optional[str], typer.Option("--only", help="Comma list of jobs to submit (e.g. train-seg): a job left out that is still queued or running from the earlier submit is waited for (afterok), one that has left the queue is taken as done.")] = None,
    home: HomeOpt = None,
) -> None:
    """Submit the planned chain (sbatch --dependency=afterok) and register every step as pending."""
    from petctl.console import console
    from petctl.engine.registry import Registry
    from petctl.engine.slurm import plan_dir, read_plan, submit_plan
    from petctl.home import resolve_home

    home_dir = resolve_home(home)
    folder = plan_dir(home_dir, run)
    selected = [s.strip() for s in only.split(",") if s.strip()] if only else None
    ids = submit_plan(folder, Registry(home_dir), only=selected)
    jobs = read_plan(folder)["jobs"]
    _jobs_table(f"run {run}: submitted", [(j["name"], j["array"], j["after"], ids[j["name"]]) for j in jobs if j["name"] in ids],
                last="SLURM job")
    console.print(f"follow with: petctl status --run {run}")


def cancel(run: RunOpt, home: HomeOpt = None) -> None:
    """scancel the run's submitted jobs; steps still pending are marked failed (cancelled)."""
    from petctl.console import console
    from petctl.engine.registry import Registry
    from petctl.engine.slurm import cancel_plan, plan_dir
    from petctl.home import resolve_home

    home_dir = resolve_home(home)
    ids = cancel_plan(plan_dir(home_dir, run), Registry(home_dir))
    console.print(f"cancelled {', '.join(ids)}" if ids else f"run {run} has no submitted jobs")


def _jobs_table(title: str, rows: list[tuple[str, int | None, Any, str]], last: str = "script") -> None:
    from rich.table import Table

    from petctl.console import console

    table = Table(title=title, title_justify="left")
    for header in ("job", "array tasks", "after", last):
        table.add_column(header, no_wrap=True)
    for name, array, after, info in rows:
        table.add_row(name, str(array) if array else "-", ", ".join(after) or "-", info)
    console.print(table)


app.command("plan", help=plan.__doc__)(_user_errors(plan))
app.command("submit", help=submit.__doc__)(_user_errors(submit))
app.command("cancel", help=cancel.__doc__)(_user_errors(cancel))

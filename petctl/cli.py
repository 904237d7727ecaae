"""The `petctl` command line: the root Typer app, global flags, and one verb per module.

Each verb lives in `petctl/commands/<verb>.py`, parses options into a config and calls one engine
function. Nothing here imports torch, so `petctl --help` and `petctl status` start fast.
Errors a user can fix (`PetctlError`) become one line on stderr and exit status 2.
"""

from __future__ import annotations

import functools
import logging
from typing import Annotated, Any, Callable

import typer

from petctl import __version__
from petctl.commands import calibrate, demo, evaluate, predict, prepare, retrain_merged, slurm, status, synth, train
from petctl.errors import EXIT_USAGE, PetctlError

app = typer.Typer(
    name="petctl",
    help="Train and run the AutoPET-II whole-body PET/CT lesion segmentation method.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"petctl {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug details.")] = False,
) -> None:
    """petctl: prepare → train → calibrate → retrain-merged → predict → evaluate, with a run registry."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a `PetctlError` raised by a verb into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PetctlError as exc:
            from petctl.console import error_line

            error_line(str(exc))
            raise typer.Exit(EXIT_USAGE) from None

    return wrapper


app.command("synth", help=synth.__doc__)(user_errors(synth.synth))
app.command("prepare", help=prepare.__doc__)(user_errors(prepare.prepare))
app.command("train", help=train.__doc__)(user_errors(train.train))
app.command("calibrate", help=calibrate.__doc__)(user_errors(calibrate.calibrate))
app.command("retrain-merged", help=retrain_merged.__doc__)(user_errors(retrain_merged.retrain_merged))
app.command("predict", help=predict.__doc__)(user_errors(predict.predict))
app.command("demo", help=demo.__doc__)(user_errors(demo.demo))
app.command("evaluate", help=evaluate.__doc__)(user_errors(evaluate.evaluate))
app.command("status", help=status.__doc__)(user_errors(status.status))
app.add_typer(slurm.app, name="slurm", help=slurm.__doc__)


EXIT_TERMINATED = 128 + 15


_MAIN_PID: int | None = None


def _exit_on_term(signum: int, frame: object) -> None:
    """SIGTERM in the command's own process: exit 143 through the registry's step context (a second
    TERM kills as before). In a worker a pool forked from it: die of the TERM, as before."""
    import os
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if os.getpid() != _MAIN_PID:
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise SystemExit(EXIT_TERMINATED)


def main() -> None:
    """Console-script entry point: user errors become one line, not a traceback.

    A SIGTERM (a SLURM time limit, `scancel`, `kill`) becomes `SystemExit(143)` where nothing else
    handles it, so the registry step under way is marked failed instead of left "running"
    (training's launch pool installs its own handler while folds run)."""
    import os
    import signal

    global _MAIN_PID
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        _MAIN_PID = os.getpid()
        signal.signal(signal.SIGTERM, _exit_on_term)
    try:
        code = app(standalone_mode=False)
        raise SystemExit(code if isinstance(code, int) else 0)
    except PetctlError as exc:
        from petctl.console import error_line

        error_line(str(exc))
        raise SystemExit(EXIT_USAGE) from None
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except (typer.Abort, KeyboardInterrupt):
        raise SystemExit(130) from None
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        if isinstance(exc, _click_exceptions()):
            exc.show()
            raise SystemExit(exc.exit_code) from None
        raise


def _click_exceptions() -> tuple[type[Exception], ...]:
    """Click's usage-error base class, from click and from the copy newer typer releases vendor
    (`typer._click`), whose exceptions are not click's."""
    found: list[type[Exception]] = []
    try:
        import click

        found.append(click.exceptions.ClickException)
    except ImportError:
        pass
    try:
        from typer import _click  # type: ignore[attr-defined]

        found.append(_click.exceptions.ClickException)
    except ImportError:
        pass
    return tuple(found)


if __name__ == "__main__":
    main()

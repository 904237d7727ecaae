"""Entry point that `accelerate launch` starts in every process: `python -m petctl.engine.launch`.

It reads the fold's JSON config and calls `trainer.fit`. Building the `accelerate launch` command
line (single process, multi-GPU, CPU gloo, multi-node) is `launch_command`, a pure function.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence


def launch_command(
    *,
    processes: int,
    nodes: int = 1,
    machine_rank: int | str = 0,
    main_address: str | None = None,
    port: int = 29500,
    mixed_precision: str = "no",
    cpu: bool = False,
    module_args: Sequence[str] = (),
    threads: int | None = None,
    quiet: bool = False,
) -> list[str]:
    """The `accelerate launch` argv for one fold (processes = total across all nodes).

    `quiet`: when the single training process fails, the launcher exits 1 without its own
    traceback (the process has printed its error already).
    """
    if threads is None:
        # CPU training: one OpenMP thread per process. With two threads on a shared 2-core machine
        # a fwd+bwd step went from 1.1 s to 6 s as soon as anything else ran (spin-waiting).
        threads = 1 if cpu else max(1, (os.cpu_count() or 1) // max(1, processes // max(1, nodes)))
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if processes > 1 or nodes > 1:
        cmd += ["--multi_gpu"]
    cmd += [
        "--num_processes", str(processes),
        "--num_machines", str(nodes),
        "--mixed_precision", "no" if cpu else mixed_precision,
        "--dynamo_backend", "no",
        "--main_process_port", str(port),
        "--num_cpu_threads_per_process", str(threads),
    ]
    if nodes > 1:
        cmd += ["--machine_rank", str(machine_rank), "--main_process_ip", str(main_address or "127.0.0.1")]
    if cpu and processes == 1 and nodes == 1:
        cmd += ["--cpu"]
    if quiet:
        cmd += ["--quiet"]
    cmd += ["-m", "petctl.engine.launch", *module_args]
    return cmd


def entry_args(*, config: str, store: str, fold: str, task: str, out: str, run: str, home: str,
               projection: str | None = None, merged: bool = False, max_steps: int | None = None) -> list[str]:
    """The argv of this module's `main` for one fold (shared by local launches and sbatch scripts)."""
    args = ["--config", config, "--store", store, "--fold", fold, "--task", task, "--out", out, "--run", run, "--home", home]
    if projection:
        args += ["--projection", projection]
    if merged:
        args.append("--merged")
    if max_steps is not None:
        args += ["--max-steps", str(max_steps)]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="petctl.engine.launch")
    parser.add_argument("--config", required=True, help="TrainConfig JSON file")
    parser.add_argument("--store", required=True)
    parser.add_argument("--fold", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--run", default=None)
    parser.add_argument("--home", default=None)
    parser.add_argument("--merged", action="store_true")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--task", choices=("seg", "cls"), default="seg")
    parser.add_argument("--projection", default="x", help="MIP projection for --task cls: an axis, or several (xy) for one model")
    args = parser.parse_args(argv)

    from petctl.engine.config import TrainConfig
    from petctl.errors import PetctlError

    common = dict(run=args.run, home=Path(args.home) if args.home else None, merged=args.merged, max_steps=args.max_steps)
    try:
        try:
            cfg = TrainConfig.from_json(json.loads(Path(args.config).read_text()))
        except (OSError, ValueError, TypeError) as exc:  # missing, not JSON, or fields of another version
            raise PetctlError(f"{args.config}: cannot read the training config ({type(exc).__name__}: {exc})") from None
        if args.task == "cls":
            from petctl.engine.classifier import fit_cls

            return fit_cls(cfg, Path(args.store), args.fold, args.projection, Path(args.out), **common)
        from petctl.engine.trainer import fit

        return fit(cfg, Path(args.store), args.fold, Path(args.out), **common)
    except PetctlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code) if os.environ.get("PETCTL_HARD_EXIT") else sys.exit(code)

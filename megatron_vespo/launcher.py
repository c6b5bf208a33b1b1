"""Starting local worker processes (torchrun) for the commands, their layout and their log.

``run_distributed`` runs a command of ``megatron_vespo`` (convert, score, mismatch) on its layout's
ranks: under a launcher (torchrun, srun) on the ranks it was started with, otherwise it starts
torchrun on this machine itself. ``run_module`` starts any module that way (the parity check's
workers too), so every command line and environment of a local torchrun comes from here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from megatron_vespo import comm

ARGV_ENV = "MEGATRON_VESPO_ARGV"  # the command line of ranks started by run_distributed


def log(message: str) -> None:
    """A progress line on stderr (stdout stays the commands' output), once: from rank 0."""
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(message, file=sys.stderr, flush=True)


def add_layout_arguments(parser) -> None:
    for key in ("tp", "pp", "ep"):
        parser.add_argument(f"--{key}", type=int, default=1)
    parser.add_argument("--etp", type=int, default=None, help="expert tensor parallel (default: tp)")


def layout_from_args(args):
    """The command's layout. Under a launcher (WORLD_SIZE set: torchrun, srun) data parallelism takes
    the processes the model layout leaves, as in the trainer; otherwise the fewest processes."""
    from megatron_vespo.mcore.parallel import Layout

    sizes = dict(tp=args.tp, pp=args.pp, vpp=getattr(args, "vpp", 1), cp=getattr(args, "cp", 1), ep=args.ep,
                 etp=args.etp)
    if "WORLD_SIZE" in os.environ:
        return Layout.for_world(int(os.environ["WORLD_SIZE"]), **sizes)
    return Layout(**sizes).validate()


def module_command(module: str, nproc: int) -> list[str]:
    """``python -m module``, under ``torchrun --standalone`` on this machine when nproc > 1."""
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return cmd + ["-m", module]


def worker_environment(single_thread: bool, **overrides: str) -> dict[str, str]:
    """This process's environment for workers: Python's warnings off unless the caller chose, and
    one OpenMP thread per process with ``single_thread`` (ranks on one CPU would oversubscribe it)."""
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    if single_thread:
        env.setdefault("OMP_NUM_THREADS", "1")
    env.update(overrides)
    return env


def run_module(module: str, nproc: int, argv: list[str] = (), env: dict[str, str] | None = None,
               **run_kwargs) -> subprocess.CompletedProcess:
    """Run ``module`` with ``argv`` on ``nproc`` local processes (``subprocess.run``'s keywords pass through)."""
    return subprocess.run(module_command(module, nproc) + list(argv), env=env, **run_kwargs)


def run_distributed(args, argv: list[str], body, precheck=None) -> int:
    """Run ``body(args, layout)`` on the layout's ranks, starting torchrun here when needed;
    ``precheck(args, layout)`` runs first, so bad input fails before any process starts."""
    layout = layout_from_args(args)
    if precheck is not None:
        precheck(args, layout)
    if "WORLD_SIZE" not in os.environ and layout.world_size > 1:
        # the arguments travel in the environment: torchrun's own parser would take an option of
        # ours that abbreviates one of its own (--n: --nnodes, --node-rank, ...) as ambiguous
        env = worker_environment(single_thread=not torch.cuda.is_available(), **{ARGV_ENV: json.dumps(argv)})
        log(f"starting {layout.world_size} processes ({layout})")
        return run_module("megatron_vespo", layout.world_size, env=env).returncode
    from megatron_vespo.mcore.parallel import initialize_model_parallel

    initialize_model_parallel(layout)
    try:
        body(args, layout)
    finally:
        if torch.distributed.is_initialized():
            comm.barrier()
            torch.distributed.destroy_process_group()
    return 0

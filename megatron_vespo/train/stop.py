"""A graceful stop of a training run: the trainer finishes its rollout batch, writes a checkpoint and
exits, so that a resubmission resumes without losing more than that batch.

Two ways to ask, on any rank:

* SIGTERM or SIGINT (``scancel --signal=TERM JOBID.STEP``; Ctrl-C). torchrun forwards them to its
  workers and SIGKILLs them 30 s later, so this suits short rollout batches; a second signal stops
  at once.
* the file ``RUN_DIR/STOP`` (the SLURM scripts write it when the batch script gets SIGTERM, e.g.
  from ``--signal=B:TERM@300`` before the time limit): no deadline but the scripts' TRAIN_STOP_S.

The ranks agree at rollout-batch boundaries, the only places a checkpoint resumes exactly, with one
MAX all-reduce of a flag.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import torch

from megatron_vespo import comm

STOP_FILE_NAME = "STOP"
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, STOP_FILE_NAME)
        self.signal_name: str | None = None
        self._previous: dict = {}

    def install(self) -> "StopRequest":
        """Take over SIGTERM and SIGINT (only the main thread may set handlers)."""
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in SIGNALS}
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:  # asked twice: stop now
            self.restore()
            raise KeyboardInterrupt(f"{name} received twice: stopping without a checkpoint")
        self.signal_name = name
        print(f"{name}: the run stops after this rollout batch, with a checkpoint ({name} again: at once)",
              file=sys.stderr, flush=True)

    def local_reason(self) -> str | None:
        """Why this rank wants to stop, or None."""
        if self.signal_name is not None:
            return self.signal_name
        if os.path.exists(self.path):
            return f"stop file {self.path}"
        return None

    def agreed(self) -> bool:
        """Whether any rank was asked to stop (a collective: every rank calls it at the same point)."""
        flag = torch.tensor([0 if self.local_reason() is None else 1], dtype=torch.int32)
        world = torch.distributed.group.WORLD if torch.distributed.is_initialized() else None
        return bool(comm.all_reduce_max(flag, world, tag="stop_request").item())

    def consume(self, rank: int) -> None:
        """The request was honoured: remove the stop file, so that the next run does not stop."""
        if rank == 0 and os.path.exists(self.path):
            os.remove(self.path)

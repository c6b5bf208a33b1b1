"""Parallel layouts ("tp2pp2ep2") and Megatron-Core process-group initialisation."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

_TOKEN = re.compile(r"(tp|pp|vpp|cp|ep|etp|dp)(\d+)")


def _check_sizes(**sizes) -> None:
    """Every parallel size is an integer >= 1 (etp and dp may be None: derived); a 0 from the
    command line (--tp 0) would otherwise end in a ZeroDivisionError."""
    for key, value in sizes.items():
        if value is None and key in ("etp", "dp"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    vpp: int = 1  # virtual pipeline: model chunks per pipeline rank
    cp: int = 1
    ep: int = 1
    etp: int | None = None  # expert tensor parallel; Megatron's default is tp
    dp: int | None = None  # inferred as the smallest size the expert layout allows

    def __post_init__(self):
        _check_sizes(**{f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def parse(cls, text: str) -> "Layout":
        text = text.strip().lower()
        if text in ("", "single", "1", "world1"):
            return cls()
        sizes: dict[str, int] = {}
        pos = 0
        for match in _TOKEN.finditer(text):
            if match.start() != pos:
                break
            key, value = match.group(1), int(match.group(2))
            if key in sizes:
                raise ValueError(f"layout {text!r} names {key} twice")
            if value < 1:
                raise ValueError(f"layout {text!r}: {key} must be >= 1")
            sizes[key] = value
            pos = match.end()
        if pos != len(text):
            raise ValueError(
                f"cannot parse layout {text!r} at {text[pos:]!r}; use e.g. 'tp2pp2ep2' "
                f"(keys tp, pp, vpp, cp, ep, etp, dp)"
            )
        return cls(**sizes)

    @classmethod
    def for_world(cls, world_size: int, tp: int = 1, pp: int = 1, vpp: int = 1, cp: int = 1, ep: int = 1,
                  etp: int | None = None) -> "Layout":
        """The layout of ``world_size`` processes: data parallelism takes what tp x pp x cp leaves
        (dp = world / (tp * pp * cp)). The one place a run's dp is derived: the trainer, every
        command and the SLURM pre-flight check use it."""
        _check_sizes(tp=tp, pp=pp, vpp=vpp, cp=cp, ep=ep, etp=etp)
        per_replica = tp * pp * cp
        if world_size < 1 or world_size % per_replica:
            raise ValueError(f"{world_size} processes are not a multiple of tp {tp} x pp {pp} x cp {cp} = "
                             f"{per_replica}")
        return cls(tp=tp, pp=pp, vpp=vpp, cp=cp, ep=ep, etp=etp, dp=world_size // per_replica).validate(world_size)

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def data_parallel(self) -> int:
        if self.dp is not None:
            return self.dp
        experts = self.ep * self.expert_tp
        return experts // math.gcd(experts, self.tp * self.cp)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.data_parallel

    def validate(self, world_size: int | None = None) -> "Layout":
        if world_size is not None and world_size != self.world_size:
            raise ValueError(
                f"layout {self} needs world size {self.world_size}, but {world_size} processes run"
            )
        if self.vpp > 1 and self.pp == 1:
            raise ValueError(f"layout {self}: virtual pipeline (vpp = {self.vpp}) needs pp > 1")
        dense_ranks = self.tp * self.cp * self.data_parallel
        if dense_ranks % (self.ep * self.expert_tp):
            raise ValueError(
                f"layout {self}: ep*etp = {self.ep * self.expert_tp} must divide tp*cp*dp = {dense_ranks}"
            )
        return self

    def __str__(self) -> str:
        parts = [f"{f.name}{getattr(self, f.name)}" for f in fields(self)
                 if f.name not in ("etp", "dp") and getattr(self, f.name) != 1]
        if self.etp is not None:
            parts.append(f"etp{self.etp}")
        parts.append(f"dp{self.data_parallel}")
        return "".join(parts)


def init_distributed(backend: str | None = None) -> None:
    """Initialise torch.distributed from torchrun's environment (or as a single process)."""
    if dist.is_initialized():
        # set up by someone else: host tensors (object broadcasts, metrics, export buckets, route
        # gathers) need a CPU backend in the default group; a plain "nccl" group fails on the first
        # of them ("No backend type associated with device type cpu") at world size > 1
        config = str(dist.get_backend_config())
        if dist.get_world_size() > 1 and "cpu:" not in config and config != "gloo":
            raise RuntimeError(f"torch.distributed was initialised with backend {config!r}, which has no CPU "
                               "backend; initialise it with backend='cpu:gloo,cuda:nccl' (or let megatron_vespo "
                               "do it)")
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # one process: any free port (parallel runs must not collide)
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    if backend is None:
        # on GPUs CUDA tensors go through NCCL and host tensors (object broadcasts, metrics, export
        # buckets, route gathers) through gloo; plain "nccl" rejects a CPU tensor at world size > 1
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if "nccl" in backend:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend=backend)


def initialize_model_parallel(layout: Layout, seed: int = 1234) -> None:
    """Create Megatron's process groups for ``layout`` and seed its RNG tracker."""
    from megatron_vespo.mcore import versions

    versions.check_supported()
    versions.check_triton_importable()
    from megatron.core import parallel_state, tensor_parallel

    from megatron_vespo.mcore.cpu import apply_cpu_patches, apply_local_spec_patches

    apply_cpu_patches()
    apply_local_spec_patches()
    init_distributed()
    layout.validate(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tp,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)

"""Make Megatron-Core 0.16.1 run on a CPU-only PyTorch build with gloo.

Applied by :func:`apply_cpu_patches` only when CUDA is absent. On a GPU without TransformerEngine
(the local spec) :func:`apply_local_spec_patches` applies the three that the local spec needs on any
device (``te_general_gemm``, ``sequence_parallel_torch_norm``, ``torch_adam_step_on_load``);
nothing else is touched.
Every patch is small, named, and states the Megatron file it answers to (paths relative to
``megatron/core/``). ``tests/test_cpu_patches.py`` covers each one.

Patches:

* ``CudaToCpuMode`` (schedules.py, optimizer/*.py, clip_grads.py, param_and_grad_buffer.py,
  moe/moe_utils.py, transformer/utils.py): a ``TorchFunctionMode`` that rewrites hard-coded CUDA
  devices to CPU, makes ``Tensor.cuda()`` a no-op and reports CUDA type names from
  ``Tensor.type()`` (the optimizer checks ``'torch.cuda.FloatTensor'``). There are too many
  ``device="cuda"`` literals inside large functions to patch each one.
* ``current_device`` (dozens of files): ``torch.cuda.current_device()`` returns ``"cpu"``.
* ``streams_and_events`` (moe/token_dispatcher.py, moe/shared_experts.py,
  distributed/param_and_grad_buffer.py): CUDA streams/events become no-op stand-ins.
* ``cpu_rng_tracker`` (tensor_parallel/random.py): the RNG tracker keeps CPU generator states.
* ``te_general_gemm`` (moe/moe_utils.py): the name is undefined without TransformerEngine.
* ``numpy_split_sizes`` (moe/moe_utils.py ``maybe_move_tensor_to_cpu``): CPU tensors are turned
  into numpy too, so the alltoall dispatcher passes plain split sizes to ``all_to_all_single``.
* ``uneven_all_gather`` (tensor_parallel/mappings.py ``_gather_along_first_dim``): gloo cannot
  ``all_gather`` chunks of different sizes; pad to the largest, gather, strip.
* ``sequence_parallel_torch_norm`` (transformer/torch_norm.py ``WrappedTorchNorm``): the local norm
  refuses sequence parallelism, which MoE with TP > 1 requires. Build the torch norm and tag its
  parameters ``sequence_parallel`` so ``finalize_model_grads`` all-reduces their grads over TP.
* ``torch_adam_step_on_load`` (optimizer/distrib_optimizer.py
  ``_set_main_param_and_optimizer_states``): without Apex or TransformerEngine the distributed
  optimizer runs torch's Adam, whose per-parameter state holds a ``step`` tensor that the
  checkpoint's per-parameter state lacks (Megatron restores it from the parameter groups just
  before, as ONE tensor shared by every parameter, which torch's Adam then increments in place
  once per parameter at each step). Loading a checkpoint failed with KeyError 'step'; once past
  that, the bias correction after a resume would be wrong. Give each parameter its own step and
  copy only the states the checkpoint has.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_APPLIED: list[str] = []
_MODE: "CudaToCpuMode | None" = None

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is a CUDA ordinal in Megatron's calls (``.to(0)``, ``device=0``).
    return isinstance(device, int) and not isinstance(device, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Rewrite CUDA placements to CPU for every torch function call while active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs:  # fast path first: most calls carry no device at all
            device = kwargs.get("device")
            if (device is not None and _is_cuda_device(device)) or kwargs.get("pin_memory"):
                kwargs = {**kwargs, "device": "cpu" if device is not None else None}
                if kwargs["device"] is None:
                    del kwargs["device"]
                kwargs.pop("pin_memory", None)  # pinning needs CUDA
        else:
            kwargs = {}
        if func in _SPECIAL:
            if func is torch.Tensor.cuda:
                return args[0]
            if func is torch.Tensor.type and len(args) == 1 and not kwargs:
                return _CUDA_TYPE_NAMES.get(args[0].dtype, func(*args))
            if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
                args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


_SPECIAL = frozenset({torch.Tensor.cuda, torch.Tensor.type, torch.Tensor.to})


class _NoOpStream:
    """Stand-in for ``torch.cuda.Stream``/``Event``: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        # record_event(), wait_stream(), synchronize(), query(): all chainable no-ops.
        return lambda *args, **kwargs: _NoOpStream()

    def __eq__(self, other):
        return isinstance(other, _NoOpStream)

    def __hash__(self):
        return 0


def _patch_current_device() -> None:
    torch.cuda.current_device = lambda: "cpu"


def _patch_streams_and_events() -> None:
    torch.cuda.Stream = _NoOpStream
    torch.cuda.Event = _NoOpStream
    torch.cuda.current_stream = lambda *a, **k: _NoOpStream()
    torch.cuda.default_stream = lambda *a, **k: _NoOpStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *a, **k: None
    torch.Tensor.record_stream = lambda self, stream: None


def _patch_cpu_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    base = mrandom.CudaRNGStatesTracker

    class CpuRNGStatesTracker(base):
        """Megatron's tracker, holding CPU generator states (there is no CUDA generator)."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            generator = torch.Generator().manual_seed(seed)
            self.states_[name] = generator.get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer_state = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer_state)

    # initialize_rng_tracker looks the class up by this module-level name at call time.
    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    mrandom.initialize_rng_tracker(force_reset=True)


def _patch_te_general_gemm() -> None:
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _patch_numpy_split_sizes() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    @functools.wraps(original)
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy() if as_numpy else tensor
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    if hasattr(token_dispatcher, "maybe_move_tensor_to_cpu"):
        token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _patch_uneven_all_gather() -> None:
    from megatron.core.tensor_parallel import mappings

    original = mappings._gather_along_first_dim

    @functools.wraps(original)
    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(s) for s in output_split_sizes]
        longest = max(sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        gathered = input_.new_empty((longest * len(sizes), *input_.shape[1:]))
        torch.distributed.all_gather_into_tensor(gathered, padded.contiguous(), group=group)
        pieces = [gathered[i * longest : i * longest + size] for i, size in enumerate(sizes)]
        return torch.cat(pieces, dim=0)

    mappings._gather_along_first_dim = _gather_along_first_dim


def _patch_sequence_parallel_torch_norm() -> None:
    from megatron.core.transformer import torch_norm

    norms = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}

    def __new__(cls, config, hidden_size, eps=1e-5, persist_layer_norm=False,
                zero_centered_gamma=False, normalization="LayerNorm"):
        if config.normalization not in norms:
            raise ValueError(f"normalization {config.normalization!r} is not supported on CPU")
        if config.layernorm_zero_centered_gamma:
            raise ValueError("layernorm_zero_centered_gamma is not supported by torch norms")
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        norm = norms[config.normalization](hidden_size, eps=eps, dtype=config.params_dtype, device=device)
        for param in norm.parameters():
            # Under sequence parallelism each TP rank sees other tokens (or, for q/k norms,
            # other heads): finalize_model_grads sums grads of params tagged like this over TP.
            param.sequence_parallel = bool(config.sequence_parallel)
        return norm

    torch_norm.WrappedTorchNorm.__new__ = __new__


def _patch_torch_adam_step_on_load() -> None:
    from megatron.core.optimizer import distrib_optimizer

    original = distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states

    @functools.wraps(original)
    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state.get(main_param, {})
        if isinstance(state.get("step"), torch.Tensor) and "step" not in tensors:
            state["step"] = state["step"].clone()  # its own counter, restored from the parameter groups
            tensors = {**tensors, "step": state["step"]}
        return original(self, model_param, tensors)

    distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states


_PATCHES = {
    "current_device": _patch_current_device,
    "streams_and_events": _patch_streams_and_events,
    "cpu_rng_tracker": _patch_cpu_rng_tracker,
    "te_general_gemm": _patch_te_general_gemm,
    "numpy_split_sizes": _patch_numpy_split_sizes,
    "uneven_all_gather": _patch_uneven_all_gather,
    "sequence_parallel_torch_norm": _patch_sequence_parallel_torch_norm,
    "torch_adam_step_on_load": _patch_torch_adam_step_on_load,
}


def cpu_patches_needed() -> bool:
    return not torch.cuda.is_available()


# Needed wherever the local spec runs without TransformerEngine, GPUs included: Megatron's router
# names te_general_gemm whether or not TE imported, its local norm refuses sequence parallelism,
# and its distributed optimizer falls back to torch's Adam.
LOCAL_SPEC_PATCHES = ("te_general_gemm", "sequence_parallel_torch_norm", "torch_adam_step_on_load")


def apply_local_spec_patches() -> list[str]:
    """On a machine without TransformerEngine (GPU or not), the patches the local spec needs;
    idempotent. Returns the names applied (none when TE is installed)."""
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is not None:
        return []
    _apply_once(LOCAL_SPEC_PATCHES)
    return list(LOCAL_SPEC_PATCHES)


def _apply_once(names) -> None:
    for name in names:
        if name not in _APPLIED:
            _PATCHES[name]()
            _APPLIED.append(name)


def apply_cpu_patches(force: bool = False) -> list[str]:
    """Apply every patch once (idempotent) when CUDA is absent; return the names applied."""
    global _MODE
    if not (force or cpu_patches_needed()):
        return []
    if _MODE is not None:
        return list(_APPLIED)
    _apply_once(_PATCHES)
    _MODE = CudaToCpuMode()
    _MODE.__enter__()  # stays active for the life of the process
    _APPLIED.append("cuda_to_cpu_mode")
    return list(_APPLIED)


def applied_patches() -> list[str]:
    return list(_APPLIED)

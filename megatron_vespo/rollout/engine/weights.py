"""Weight updates of the local engine, as SGLang 0.5.23 applies them: Hugging Face checkpoint
tensors (one per expert) written into the served transformers model, a model directory loaded from
disk, tensors broadcast over a weight-update group (``comm.StandaloneGroup``, gloo on CPU) inside
the begin/end weight-update session; and ``hf_weight`` to read a weight back by its checkpoint name.
"""

from __future__ import annotations

import contextlib
import math
import os
import re

import torch

from megatron_vespo.rollout.protocol import brief

DEFAULT_GROUP_NAME = "weight_update_group"
MAX_GROUP_WORLD_SIZE = 1 << 16  # ranks of a weight-update group: the trainer and every server GPU


def _group_args_problem(master_address, master_port, rank_offset, world_size, group_name, backend) -> str | None:
    """What is wrong with init_weights_update_group's arguments (SGLang's types), or None. The
    world size is bounded too: the group allocates per rank."""
    for key, value in (("master_address", master_address), ("group_name", group_name), ("backend", backend)):
        if not isinstance(value, str) or not value:
            return f"{key} must be a non-empty string, got {brief(value)}"
    for key, value in (("master_port", master_port), ("rank_offset", rank_offset), ("world_size", world_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{key} must be an integer, got {brief(value)}"
    if not 1 <= master_port <= 65535:
        return f"master_port must be in [1, 65535], got {brief(master_port)}"
    if not 2 <= world_size <= MAX_GROUP_WORLD_SIZE:
        return f"world_size must be in [2, {MAX_GROUP_WORLD_SIZE}] (the trainer and the servers), got {brief(world_size)}"
    if not 1 <= rank_offset < world_size:
        return f"rank_offset must be in [1, world_size={world_size}) (rank 0 is the trainer), got {brief(rank_offset)}"
    return None


def hf_targets(model, model_type: str | None) -> dict:
    """Hugging Face checkpoint name -> (parameter, index into it, expected shape).

    transformers 5 fuses experts: ``mlp.experts.gate_up_proj`` [E, 2I, H] holds cat(gate, up)
    of each expert, ``mlp.experts.down_proj`` [E, H, I]; checkpoints (and the exporter) name one
    tensor per expert. Mixtral checkpoints say ``block_sparse_moe`` and w1/w3/w2 (gate/up/down)
    where the transformers 5 module is ``mlp``. The fused parameter names are accepted too."""
    mixtral = model_type == "mixtral"
    gate, up, down = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    moe = "block_sparse_moe" if mixtral else "mlp"
    modules = dict(model.named_modules())
    targets = {}
    for name, param in model.named_parameters():
        targets[name] = (param, (), tuple(param.shape))
        match = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.(experts\.(gate_up_proj|down_proj)|gate\.weight)", name)
        if match is None:
            continue
        layer = match.group(1)
        prefix = f"model.layers.{layer}.{moe}."
        if match.group(3) is None:  # the router
            targets[prefix + "gate.weight"] = (param, (), tuple(param.shape))
            continue
        experts = modules[f"model.layers.{layer}.mlp.experts"]
        if getattr(experts, "is_transposed", False) or not getattr(experts, "is_concatenated", True):
            raise NotImplementedError(f"{name}: expert weights stored transposed or interleaved are not supported")
        num_experts, rows, cols = param.shape
        for e in range(num_experts):
            base = f"{prefix}experts.{e}."
            if match.group(3) == "gate_up_proj":
                half = rows // 2
                targets[base + f"{gate}.weight"] = (param, (e, slice(0, half)), (half, cols))
                targets[base + f"{up}.weight"] = (param, (e, slice(half, rows)), (half, cols))
            else:
                targets[base + f"{down}.weight"] = (param, (e,), (rows, cols))
    return targets


class EngineWeights:
    """The weight half of ``LocalEngine``. A mixin: it writes the engine's model under its
    ``_model_lock`` once no batch runs (``_exclusive_weights``, with ``_cond``,
    ``_updates_pending`` and the scheduler's state) and keeps the session flag ``_session_open``
    (under ``_lock``), the groups ``_groups`` and the names being joined ``_joining`` (under
    ``_lock``), ``_receive_lock`` and the ``_targets`` cache, all set
    by ``LocalEngine.__init__``."""

    @contextlib.contextmanager
    def _exclusive_weights(self):
        """Where SGLang applies an update: at once when generation is paused, otherwise after the
        running batch has finished (its model-update writer lock); no new batch starts meanwhile."""
        with self._cond:
            self._updates_pending += 1
            while self._has_running() and not self._paused and not self._closed:
                self._cond.wait()
        try:
            with self._model_lock, torch.no_grad():
                yield
        finally:
            with self._cond:
                self._updates_pending -= 1
                self._cond.notify_all()

    def _weight_targets(self) -> dict:
        """hf_targets of the served model, built on first use (the parameters stay the same objects)."""
        if self._targets is None:
            self._targets = hf_targets(self.model, self.model_type)
        return self._targets

    def hf_weight(self, name: str) -> torch.Tensor:
        """A copy of the weight the Hugging Face checkpoint calls ``name`` (one tensor per expert)."""
        targets = self._weight_targets()
        if name not in targets:
            raise KeyError(f"unknown tensor {name!r}: not a Hugging Face checkpoint name of this {self.architectures[0]}")
        param, index, _ = targets[name]
        with self._model_lock:
            return param.data[index].detach().clone()

    def _skipped(self, name: str) -> bool:
        # a tied lm_head is the embedding: checkpoints may carry it, the model has one tensor
        return name == "lm_head.weight" and bool(getattr(self.config, "tie_word_embeddings", False))

    def update_from_named_tensors(self, named_tensors, weight_version: str | None = None) -> int:
        """Write Hugging Face checkpoint tensors (one per expert, any order) into the model, with
        dtype conversion into the engine dtype. The whole bucket is checked first: an unknown name
        or a wrong shape raises ValueError naming the tensor and nothing is written. Returns the
        number of tensors written."""
        targets = self._weight_targets()
        plan = []
        for item in named_tensors:
            name, tensor = item
            if self._skipped(name):
                continue
            if name not in targets:
                example = next((n for n in targets if ".experts." in n), "model.embed_tokens.weight")
                raise ValueError(f"unknown tensor {name!r}: not a Hugging Face checkpoint name of this "
                                 f"{self.architectures[0]} (e.g. {example!r}); nothing was written")
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
            param, index, shape = targets[name]
            if tuple(tensor.shape) != shape:
                raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}; "
                                 f"nothing was written")
            if not tensor.is_floating_point():
                raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, expected a floating-point tensor")
            plan.append((param, index, tensor))
        with self._exclusive_weights():
            for param, index, tensor in plan:
                param.data[index].copy_(tensor.detach().to(device=param.device))
        if weight_version is not None:
            self.set_weight_version(weight_version)
        return len(plan)

    def update_from_disk(self, model_path: str, weight_version: str | None = None,
                         abort_all_requests: bool = False) -> dict:
        """SGLang's update_weights_from_disk: load the HF directory and copy its weights into the
        served model (same architecture and shapes). Returns {success, message, num_paused_requests}.
        Only a local model directory is loaded: anything else (a hub id such as "gpt2") is refused
        before any request is aborted or anything is read, never looked up on the hub."""
        if not isinstance(model_path, str) or not os.path.isdir(model_path):
            return {"success": False, "num_paused_requests": 0,
                    "message": f"model_path {brief(model_path)} is not a local directory: the local engine loads "
                               f"Hugging Face model directories only (config.json + safetensors)"}
        if not os.path.isfile(os.path.join(model_path, "config.json")):
            return {"success": False, "num_paused_requests": 0,
                    "message": f"model_path {model_path!r} has no config.json: not a Hugging Face model directory"}
        if abort_all_requests:
            self.abort(abort_all=True, message="aborted by update_weights_from_disk")
        try:
            new = self._load_model(model_path)
        except Exception as err:
            return {"success": False, "message": f"failed to load a model from {model_path!r}: "
                                                 f"{type(err).__name__}: {err}", "num_paused_requests": 0}
        cur, fresh = dict(self.model.named_parameters()), dict(new.named_parameters())
        problems = [f"missing {n}" for n in cur if n not in fresh] + [f"unexpected {n}" for n in fresh if n not in cur]
        problems += [f"{n}: shape {tuple(fresh[n].shape)}, served {tuple(p.shape)}" for n, p in cur.items()
                     if n in fresh and fresh[n].shape != p.shape]
        if problems:
            return {"success": False, "num_paused_requests": 0,
                    "message": f"{model_path} does not match the served {self.architectures[0]}: "
                               f"{'; '.join(problems[:5])}{' ...' if len(problems) > 5 else ''}"}
        with self._exclusive_weights():
            for name, param in cur.items():
                param.data.copy_(fresh[name].data)
            self.model_path = model_path
            held = self.num_held_requests()
        del new, fresh
        message = "Succeeded to update model weights."
        if weight_version is not None:
            self.set_weight_version(weight_version)
            message += f" Weight version updated to {weight_version}."
        return {"success": True, "message": message, "num_paused_requests": held}

    # -- SGLang 0.5.23's weight-update session and the distributed route
    def begin_weight_update(self) -> tuple[bool, str]:
        with self._lock:
            if self._session_open:
                return False, "a weight-update session is already open; call end_weight_update() first"
            self._session_open = True
            return True, "Success"

    @property
    def weight_update_session_open(self) -> bool:
        return self._session_open

    def end_weight_update(self) -> tuple[bool, str]:
        with self._lock:
            if not self._session_open:
                return False, "no weight-update session is open; call begin_weight_update() first"
            self._session_open = False
            return True, "Success"

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = DEFAULT_GROUP_NAME, backend: str = "nccl",
                                  timeout_s: float = 600.0, connect_timeout_s: float = 30.0) -> tuple[bool, str]:
        """Join a comm.StandaloneGroup as rank ``rank_offset`` (the trainer is rank 0). Blocks until
        every rank has joined, at most ``connect_timeout_s`` (connecting and the rendezvous);
        ``timeout_s`` bounds each later broadcast. One join at a time: a second one while the first
        waits is refused, so callers cannot pile up threads stuck in rendezvous."""
        from megatron_vespo.comm import StandaloneGroup

        problem = _group_args_problem(master_address, master_port, rank_offset, world_size, group_name, backend)
        if problem:
            return False, problem
        if backend != "gloo":
            return False, (f"backend {backend!r} is not available: the local engine runs on CPU, "
                           f"use backend 'gloo'")
        with self._lock:
            if group_name in self._groups:
                return False, f"weight-update group {group_name!r} already exists; destroy it first"
            if self._joining:
                return False, (f"weight-update group {sorted(self._joining)[0]!r} is still being joined; "
                               f"one init_weights_update_group at a time")
            self._joining.add(group_name)
        try:
            group = StandaloneGroup(master_address, master_port, rank_offset, world_size, backend="gloo",
                                    group_name=group_name, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s)
        except Exception as err:
            return False, (f"joining {group_name!r} at {master_address}:{master_port} failed: "
                           f"{type(err).__name__}: {err}")
        finally:
            with self._lock:
                self._joining.discard(group_name)
        with self._lock:
            self._groups[group_name] = group
        return True, "Succeeded to initialize custom process group."

    def destroy_weights_update_group(self, group_name: str = DEFAULT_GROUP_NAME) -> tuple[bool, str]:
        if not isinstance(group_name, str):
            return False, f"group_name must be a string, got {brief(group_name)}"
        with self._lock:
            group = self._groups.pop(group_name, None)
        if group is None:
            return False, f"no weight-update group named {group_name!r}"
        return True, "Succeeded to destroy custom process group."

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                        group_name: str = DEFAULT_GROUP_NAME, weight_version: str | None = None,
                                        abort_all_requests: bool = False, load_format: str | None = None,
                                        **_ignored) -> tuple[bool, str]:
        """Receive each tensor by broadcast from rank 0 of the group, in order, then apply them as
        one bucket. Refused (without receiving) outside begin/end_weight_update, as SGLang 0.5.23."""
        with self._lock:
            if not self._session_open:
                return False, ("update_weights_from_distributed must run between begin_weight_update() "
                               "and end_weight_update()")
        group = self._groups.get(group_name) if isinstance(group_name, str) else None
        if group is None:
            return False, f"no weight-update group named {group_name!r}: call init_weights_update_group first"
        if load_format not in (None, "auto", "default"):
            return False, f"load_format {load_format!r} is not supported by the local engine (only per-tensor)"
        if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)
                and len(names) == len(dtypes) == len(shapes)):
            return False, "names, dtypes and shapes must be lists of the same length"
        specs, elements = [], 0
        for name, dtype, shape in zip(names, dtypes, shapes):
            if not isinstance(name, str):
                return False, f"names must be strings, got {brief(name)}"
            torch_dtype = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else None
            if not isinstance(torch_dtype, torch.dtype):
                return False, f"tensor {name!r}: unknown dtype {brief(dtype)}"
            if not isinstance(shape, list) or not all(
                    isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                return False, f"tensor {name!r}: shape must be a list of non-negative integers, got {brief(shape)}"
            elements += math.prod(shape)
            specs.append((name, torch_dtype, shape))
        # every tensor is allocated before any is checked against the model (all are received, see
        # below): a bucket is part of the model, so more elements than the model has is no bucket
        limit = sum(p.numel() for p in self.model.parameters())
        if elements > limit:
            return False, (f"the shapes ask for {elements} elements, more than the served model's {limit}: "
                           f"refused before receiving anything")
        if abort_all_requests:
            self.abort(abort_all=True, message="aborted by update_weights_from_distributed")
        with self._receive_lock:
            received = []
            for name, torch_dtype, shape in specs:  # receive all, even a bad one: rank 0 sends them all
                tensor = torch.empty(shape, dtype=torch_dtype)
                group.broadcast_(tensor, src=0)
                received.append((name, tensor))
            try:
                self.update_from_named_tensors(received, weight_version=weight_version)
            except ValueError as err:
                return False, str(err)
        message = "Succeeded to update parameter online."
        if weight_version is not None:
            message += f" Weight version updated to {weight_version}."
        return True, message

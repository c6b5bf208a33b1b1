"""The policy on Megatron-Core: model + DDP + optimizer, the pi_old forward, the optimizer step,
and checkpoints. The trainer's loop (``trainer.py``) calls these; the loss is the project's hook.

Samples are replicated on every rank; each data-parallel rank takes its contiguous block of a
mini-batch (``batch.partition``), packs it into THD micro-batches and slices them for context
parallelism. A sequence never spans micro-batches.
"""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from megatron_vespo import comm
from megatron_vespo.batch import (
    Sample, build_micro_batch, packed_width, partition, slice_for_cp, token_budget_plan, validate_samples,
)
from megatron_vespo.hook import make_forward_step, reduce_metrics
from megatron_vespo.launcher import log
from megatron_vespo.losses import LossConfig
from megatron_vespo.mcore.grad_shards import owned_gradient_slices
from megatron_vespo.mcore.parallel import Layout, initialize_model_parallel
from megatron_vespo.train import checkpoints
from megatron_vespo.train.checkpoints import COMPLETE_MARKER, MCORE_DIR
from megatron_vespo.train.grad_norms import gradient_norms


class Policy:
    def __init__(self, cfg, layout: Layout, trainable: bool = True, reuse_process_groups: bool = False):
        """``trainable=False``: the model alone (no DDP grad buffers, optimizer or scheduler), for
        scoring studies that only run forwards and the KL term's reference model.
        ``reuse_process_groups``: a second model of the same layout in this process keeps the
        groups the first made (re-creating them would strand the first's)."""
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from megatron_vespo.convert.families import load_model_config
        from megatron_vespo.mcore.model import build_gpt_chunks, transformer_config
        from megatron_vespo.mcore.weights import SafetensorsSource, ShardContext, check_embedding_rows, load_hf_state

        self.cfg, self.layout = cfg, layout
        if not reuse_process_groups:
            initialize_model_parallel(layout, seed=cfg.run.seed)
        self.hf_config, self.model_cfg = load_model_config(cfg.model.hf_dir)
        self.model_cfg.check_layout(layout)
        dtype = torch.bfloat16 if cfg.model.params_dtype == "bfloat16" else torch.float32
        overrides = {}
        if cfg.model.recompute:
            overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        if cfg.algorithm.routing_replay != "none":
            from megatron_vespo.routing_replay import RoutingReplay

            overrides["moe_enable_routing_replay"] = True
            RoutingReplay.clear_registry()  # Megatron keeps one global list of routers
        # under a pipeline every micro-batch of a step is padded to one length (below), so stages need
        # no shape exchange (with it the interleaved schedule hangs on gloo)
        overrides["variable_seq_lengths"] = False
        self.config = transformer_config(self.model_cfg, layout, params_dtype=dtype, **overrides)
        chunks = build_gpt_chunks(self.model_cfg, self.config)
        source = SafetensorsSource(cfg.model.hf_dir)
        if torch.distributed.get_rank() == 0:
            check_embedding_rows(source, self.model_cfg, warn=log)
        for chunk in chunks:
            load_hf_state(chunk, source, ShardContext.from_model(chunk, self.model_cfg))
        self.chunks = chunks
        self.trainable = trainable
        self.models = chunks
        o = cfg.optimizer
        self.distributed_optimizer = trainable and cfg.distributed_optimizer(ps.get_data_parallel_world_size())
        wanted = [k for k in ("overlap_grad_reduce", "overlap_param_gather", "cpu_offload") if getattr(o, k)]
        if trainable and o.cpu_offload and not torch.cuda.is_available():
            raise ValueError("optimizer.cpu_offload moves the optimizer from GPU memory to the host (Megatron's "
                             "HybridDeviceOptimizer); this run has no GPU, its optimizer is on the host already")
        if trainable and wanted and not self.distributed_optimizer:
            raise ValueError(f"optimizer.{wanted[0]} needs the distributed optimizer, which is off at data parallel "
                             f"size {ps.get_data_parallel_world_size()}: set optimizer.distributed: true")
        if trainable:
            ddp_config = DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, use_distributed_optimizer=self.distributed_optimizer,
                overlap_grad_reduce=o.overlap_grad_reduce, overlap_param_gather=o.overlap_param_gather)
            self.models = [DistributedDataParallel(self.config, ddp_config, chunk) for chunk in chunks]
            self.config.no_sync_func = _per_chunk([d.no_sync for d in self.models])
            if o.overlap_grad_reduce:  # the pipeline schedules start each chunk's reduce-scatter early
                self.config.grad_sync_func = _per_chunk([d.start_grad_sync for d in self.models])
            if o.overlap_param_gather:  # ... and each chunk's parameter all-gather before its forward
                self.config.param_sync_func = _per_chunk([d.start_param_sync for d in self.models])
            self.config.finalize_model_grads_func = finalize_model_grads
            self.optimizer = get_megatron_optimizer(OptimizerConfig(
                optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
                adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad, bf16=dtype == torch.bfloat16,
                params_dtype=dtype, use_distributed_optimizer=self.distributed_optimizer,
                overlap_param_gather=o.overlap_param_gather, optimizer_cpu_offload=o.cpu_offload), self.models)
            self.scheduler = OptimizerParamScheduler(
                self.optimizer, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
                lr_warmup_steps=o.warmup_steps, lr_decay_steps=max(cfg.run.steps, o.warmup_steps + 1),
                lr_decay_style="constant" if o.min_lr in (0.0, o.lr) else "cosine", start_wd=o.weight_decay,
                end_wd=o.weight_decay, wd_incr_steps=max(cfg.run.steps, 1), wd_incr_style="constant")
        self.ps = ps
        self.dp_size, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.cp_rank = ps.get_context_parallel_rank()
        self.loss_cfg: LossConfig = cfg.algorithm.loss
        self.replay = None
        if cfg.algorithm.routing_replay != "none":
            from megatron_vespo.routing_replay import RoutingReplay

            self.replay = RoutingReplay(self.models, self.model_cfg)

    # -- batches --------------------------------------------------------------------------------

    def _micro_batches(self, samples: list[Sample], ids: list[int], num_microbatches: int):
        """This rank's CP-local packed micro-batches for the samples ``ids`` (a mini-batch):
        ``num_microbatches`` contiguous blocks per data rank, or, with
        algorithm.max_tokens_per_micro_batch, packed to that budget (``batch.token_budget_plan``)."""
        cp, tp = self.layout.cp, self.layout.tp
        seq_multiple = 2 * cp if cp > 1 else 1
        total_multiple = seq_multiple * tp
        lengths = [int(s.tokens.numel()) for s in samples]
        budget = self.cfg.algorithm.max_tokens_per_micro_batch
        if budget:
            # the interleaved schedule (vpp) runs the micro-batches in groups of pp
            plan = token_budget_plan([lengths[i] for i in ids], self.dp_size, budget, seq_multiple,
                                     total_multiple, self.layout.pp if self.layout.vpp > 1 else 1, ids=ids)
        else:
            plan = partition(len(ids), self.dp_size, num_microbatches)
        every = [[[ids[i] for i in block] for block in rank] for rank in plan]
        groups = every[self.dp_rank]
        # pipeline stages exchange fixed-shape activations: one length for all micro-batches; with the
        # budget, the widest on any rank (every rank knows the plan), which stays within the budget.
        # Without a pipeline each micro-batch keeps its own width: only CP/TP rounding is padding.
        pad_to = None
        if self.layout.pp > 1:
            pad_to = max(packed_width(lengths, g, seq_multiple, total_multiple)
                         for rank in (every if budget else [groups]) for g in rank)
        out = []
        for group in groups:
            mb = build_micro_batch([samples[i] for i in group], "packed", seq_multiple, total_multiple, group,
                                   pad_to=pad_to)
            out.append(slice_for_cp(mb, cp, self.cp_rank))
        return out, groups

    def _num_microbatches(self, n_samples: int) -> int:
        per_rank = n_samples // self.dp_size
        mbs = self.cfg.algorithm.micro_batch_size or per_rank
        return max(per_rank // mbs, 1)

    def _run(self, forward_step, micro_batches, forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        # virtual pipeline: one iterator per model chunk, over the same micro-batches
        iterator = iter(micro_batches) if len(self.models) == 1 else [iter(micro_batches) for _ in self.models]
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iterator, model=self.models,
            num_microbatches=len(micro_batches), seq_length=micro_batches[0].tokens.shape[1] * self.layout.cp,
            micro_batch_size=1, forward_only=forward_only)

    # -- pi_old ---------------------------------------------------------------------------------

    def logprobs(self, samples: list[Sample], replay: list | None = None,
                 record: bool = False) -> tuple[list[torch.Tensor], list | None]:
        """Per-sample log-probs of the response tokens under the current weights (fp32, at the
        rollout temperature), on every rank, and the routes: ``replay`` routes the samples as given
        (R3: the engine's routes, one [tokens, layers, top_k] per sample); ``record`` returns the
        routes the routers choose (R2, to replay in training), else the routes returned are None."""
        from megatron_vespo.hook import HookGroups, make_scoring_step

        if replay is not None and record:
            raise ValueError("a scoring pass either replays routes or records them, not both")
        mode = "replay" if replay is not None else "record" if record else None
        self._check_replay(mode, replay, len(samples))
        ids = list(range(len(samples)))
        micro_batches, _ = self._micro_batches(samples, ids, self._num_microbatches(len(samples)))
        prompt_len = {i: samples[i].prompt_len for i in ids}
        pieces = []  # (sample id, response positions, values) from the last stage, TP rank 0
        hook_groups = HookGroups.from_parallel_state()

        def keep(mb, rows, logp):
            if hook_groups.tp_rank != 0:
                return
            seq = mb.seq_index.reshape(-1)[rows].cpu()
            pos = mb.position_ids.reshape(-1)[rows].cpu()
            logp = logp.float().cpu()
            for local in seq.unique().tolist():
                sample = mb.sample_ids[local]
                take = seq == local
                pieces.append((sample, (pos[take] + 1 - prompt_len[sample]).tolist(), logp[take].tolist()))

        forward_step = make_scoring_step(keep, temperature=self.loss_cfg.temperature, groups=hook_groups)
        for chunk in self.models:
            chunk.eval()
        with torch.no_grad(), self._replay_pass(mode, replay, forward_only=True) as step:
            self._run(step(forward_step), micro_batches, forward_only=True)
        for chunk in self.models:
            chunk.train()
        routes = None
        if record:
            recorded = self.replay.recorded_routes([s.tokens.numel() for s in samples], across_dp=True)
            routes = [recorded[i] for i in ids]
        gathered = comm.gather_objects(pieces, dst=0)
        result = None
        if torch.distributed.get_rank() == 0:
            result = [torch.full((s.response_len,), float("nan")) for s in samples]
            for rank_pieces in gathered:
                for sample, positions, values in rank_pieces:
                    result[sample][positions] = torch.tensor(values)
            for i, values in enumerate(result):
                if torch.isnan(values).any():
                    missing = torch.isnan(values).nonzero().flatten()[:5].tolist()
                    raise RuntimeError(f"pi_old forward left sample {i} without log-probs at {missing}")
        return comm.broadcast_object(result), routes

    def _check_replay(self, mode: str | None, routes, n_samples: int) -> None:
        if mode is not None and self.replay is None:
            raise ValueError(f"routing replay ({mode}) asked of a policy built without it "
                             "(algorithm.routing_replay is none, or the model has no experts)")
        if routes is not None and len(routes) != n_samples:
            raise ValueError(f"{len(routes)} route sets for {n_samples} samples: one per sample")

    @contextlib.contextmanager
    def _replay_pass(self, mode: str | None, routes, forward_only: bool):
        """Around one forward(-backward) of Megatron: routing replay started in ``mode``, its
        forward steps wrapped, and every route set checked used (or the pass dropped on an error).
        Yields what wraps a forward step (the identity without replay)."""
        if mode is None:
            yield lambda forward_step: forward_step
            return
        self.replay.start(mode, routes)
        try:
            yield self.replay.wrap
            self.replay.finish(forward_only=forward_only)
        except BaseException:
            self.replay.abort()
            raise

    # -- training -------------------------------------------------------------------------------

    def train_step(self, samples: list[Sample], ids: list[int], routes: list | None = None) -> dict[str, float]:
        """One optimizer step on the mini-batch ``ids``; returns the reduced metrics (every rank).
        ``routes``: per-sample routes (indexed like ``samples``) replayed in forward and recompute,
        required with routing replay (R3: the engine's, R2: those ``logprobs(record=True)`` gave)."""
        if not self.trainable:
            raise RuntimeError("this Policy was built with trainable=False (no optimizer)")
        if self.replay is not None and routes is None:
            raise ValueError("routing replay is on: train_step needs the routes to replay (R3: the engine's, "
                             "R2: those logprobs(record=True) returned)")
        mode = "replay" if routes is not None else None
        self._check_replay(mode, routes, len(samples))
        if not any(samples[i].trained for i in ids):
            # nothing to learn from (every response masked): the loss would be 0 / 0. The schedule
            # still advances, so a step keeps its learning rate whatever was masked.
            self.scheduler.step(increment=1)
            return {"update_skipped": 1.0, "lr": float(self.optimizer.param_groups[0]["lr"])}
        micro_batches, _ = self._micro_batches(samples, ids, self._num_microbatches(len(ids)))
        for chunk in self.models:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        with self._replay_pass(mode, routes, forward_only=False) as step:
            out = self._run(step(make_forward_step(self.loss_cfg)), micro_batches, forward_only=False)
        # before the step: the clip scales the gradients
        group_norms = gradient_norms(self.chunks, owned_gradient_slices(self.models))
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        metrics = reduce_metrics(out)
        metrics.update(group_norms)
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["update_skipped"] = float(not ok)
        metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])
        return metrics

    def synchronize_parameters(self) -> None:
        """Make every rank's weights current. With optimizer.overlap_param_gather the updated
        weights arrive during the next forward; what reads them otherwise (weight sync,
        checkpoints) calls this first."""
        if self.trainable and self.cfg.optimizer.overlap_param_gather:
            with torch.no_grad():
                for model in self.models:
                    model.start_param_sync(force_sync=True)

    def validate(self, samples: list[Sample]) -> None:
        validate_samples(samples, self.model_cfg.vocab_size, need_old=not self.loss_cfg.bypass,
                         need_engine=self.loss_cfg.bypass or self.loss_cfg.correction != "none",
                         need_ref=self.loss_cfg.kl_coef > 0)

    # -- checkpoints ----------------------------------------------------------------------------

    def _sharded_state(self, load_from: str | None = None):
        from megatron_vespo.mcore.checkpoint_keys import align_keys_to_checkpoint

        model_state = {}
        for i, chunk in enumerate(self.chunks):
            model_state[f"model{i}"] = chunk.sharded_state_dict()
        if load_from is not None:  # a checkpoint of the other layer spec (TE <-> local) reads too
            align_keys_to_checkpoint(model_state, load_from)
        # the optimizer's sharded state refers to the model's sharded tensors (any nesting: virtual
        # pipeline chunks share local key names, so they stay apart); loading: Megatron first
        # creates the Adam moments, so the checkpoint has tensors to fill
        # the distributed optimizer's state in its canonical, per-parameter form: a checkpoint
        # reshards to any data-parallel size (Megatron's default form cannot be saved on 0.19)
        metadata = {"distrib_optim_sharding_type": "fully_reshardable"} if self.distributed_optimizer else None
        if load_from is not None and self.distributed_optimizer:
            # a fresh distributed optimizer has no Adam state to describe yet: Megatron's own loader
            # creates it with one zero-gradient step, which the loaded state then replaces
            for inner in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
                if not inner.optimizer.state:
                    inner._init_optimizer_states_with_dummy_values()
        return {"model": model_state,
                "optimizer": self.optimizer.sharded_state_dict(model_state, is_loading=load_from is not None,
                                                               metadata=metadata)}

    def save(self, directory: str, trainer_state: dict) -> None:
        """Model, optimizer, scheduler, every rank's RNG states and the trainer's own state."""
        from megatron.core import dist_checkpointing, tensor_parallel

        rank = torch.distributed.get_rank()
        self.synchronize_parameters()
        if rank == 0:
            os.makedirs(os.path.join(directory, MCORE_DIR), exist_ok=True)
        comm.barrier()
        dist_checkpointing.save(self._sharded_state(), os.path.join(directory, MCORE_DIR))
        checkpoints.write_rng(checkpoints.rng_file(directory, rank), tensor_parallel.get_cuda_rng_tracker().get_states())
        if rank == 0:
            checkpoints.write_scheduler(directory, self.scheduler.state_dict())
            checkpoints.write_trainer_state(directory, {**trainer_state,
                                                        "distributed_optimizer": self.distributed_optimizer})
        comm.barrier()
        if rank == 0:  # the marker makes the checkpoint visible only once complete
            with open(os.path.join(directory, COMPLETE_MARKER), "w") as f:
                f.write("ok\n")
        comm.barrier()

    def load(self, directory: str) -> dict:
        """Restore everything ``save`` wrote; returns the trainer's state. Every file is checked
        before Megatron reads the shards, on every rank, and the ranks agree: a checkpoint that
        cannot be loaded raises CheckpointUnreadable (naming the file) on all of them."""
        from megatron.core import dist_checkpointing, tensor_parallel

        from megatron_vespo.mcore import versions

        rank = torch.distributed.get_rank()
        mcore_dir = os.path.join(directory, MCORE_DIR)
        notes = []

        def side_files():
            state = checkpoints.read_trainer_state(directory)
            scheduler = checkpoints.read_scheduler(directory, note=notes.append)
            path = checkpoints.rng_file(directory, rank)
            rng = checkpoints.read_rng(path, note=notes.append) if os.path.exists(path) else None
            checkpoints.check_dist_checkpoint(mcore_dir)
            versions.check_checkpoint_readable(mcore_dir)
            return state, scheduler, rng

        def model_and_optimizer():
            loaded = dist_checkpointing.load(self._sharded_state(load_from=mcore_dir), mcore_dir)
            for i, chunk in enumerate(self.chunks):
                chunk.load_state_dict(loaded["model"][f"model{i}"])
            self.optimizer.load_state_dict(loaded["optimizer"])

        state, scheduler, rng = _on_every_rank(side_files, directory)
        saved_distributed = bool(state.get("distributed_optimizer", False))  # earlier checkpoints: plain Adam
        if saved_distributed != self.distributed_optimizer:
            raise ValueError(
                f"{directory} was written {'with' if saved_distributed else 'without'} the distributed optimizer and "
                f"this run has it {'on' if self.distributed_optimizer else 'off'} (data parallel size {self.dp_size}); "
                f"their optimizer states have different forms: resume with optimizer.distributed: "
                f"{'true' if saved_distributed else 'false'}")
        _on_every_rank(model_and_optimizer, directory)
        for message in notes:
            log(message)
        self.scheduler.load_state_dict(scheduler)
        if rng is not None:
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
            tensor_parallel.get_cuda_rng_tracker().set_states(rng["cuda_tracker"])
        return state


def _per_chunk(functions: list):
    """Megatron takes one function for a single model chunk, a list with virtual pipelining."""
    return functions if len(functions) > 1 else functions[0]


def _on_every_rank(read, directory: str):
    """``read()`` on every rank, then one agreement: if it failed anywhere, every rank raises
    CheckpointUnreadable with what each failing rank found (so no rank goes on alone into a
    collective the others never reach)."""
    from torch.distributed.checkpoint.api import CheckpointException

    result, error = None, None
    try:
        result = read()
    except checkpoints.CheckpointUnreadable as err:
        error = str(err)
    except (Exception, CheckpointException) as err:  # torch's CheckpointException is a BaseException
        error = f"{directory}: {type(err).__name__}: {str(err).strip()[:1000]}"
    errors = comm.broadcast_object(comm.gather_objects(error, dst=0))
    by_message: dict[str, list[int]] = {}
    for rank, message in enumerate(errors):
        if message is not None:
            by_message.setdefault(message, []).append(rank)
    if by_message:
        if len(errors) == 1:
            raise checkpoints.CheckpointUnreadable(next(iter(by_message)))
        shown = [f"{message} (rank{'s' if len(ranks) > 1 else ''} {_ranges(ranks)})"
                 for message, ranks in list(by_message.items())[:4]]
        raise checkpoints.CheckpointUnreadable("; ".join(shown))
    return result


def _ranges(ranks: list[int]) -> str:
    return ",".join(str(r) for r in ranks) if len(ranks) <= 4 else f"{ranks[0]}-{ranks[-1]} ({len(ranks)})"

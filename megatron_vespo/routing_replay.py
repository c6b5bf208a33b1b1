"""MoE routing replay for the trainer: R3 (replay the engine's routes) and R2 (record the routes
of the pi_old forward, replay them in the training forwards), on Megatron-Core's ``RouterReplay``.

Routes are per sample: int32 ``[rows, num_layers, top_k]`` over ALL model layers (global 0-based
layer ids; rows of dense layers are present and ignored), row t = the experts token t used. The
engine (SGLang ``return_routed_experts``) returns ``rows = len - 1`` (the last token never ran
through it); the router still runs on that token in training, so it reuses row ``len - 2``
(any valid route will do: that token's output feeds no loss). ``rows = len`` (recorded by R2) is
taken as is.

Usage (the model must be built with ``transformer_config(..., moe_enable_routing_replay=True)``,
after :meth:`RoutingReplay.clear_registry`)::

    RoutingReplay.clear_registry()
    chunks = build_gpt_chunks(m, transformer_config(m, layout, moe_enable_routing_replay=True))
    replay = RoutingReplay(chunks, m)

    # R3: every training (or pi_old) pass replays the engine's routes
    replay.start("replay", routes)                  # routes[sample_id] -> [len - 1 or len, L, k]
    get_forward_backward_func()(forward_step_func=replay.wrap(forward_step), ...)
    replay.finish(forward_only=False)               # every route set consumed exactly as expected

    # R2: record in the forward-only pi_old pass, then replay as above
    replay.start("record")
    get_forward_backward_func()(forward_step_func=replay.wrap(forward_step), ..., forward_only=True)
    replay.finish(forward_only=True)
    routes = replay.recorded_routes(lengths)        # {sample_id: int32 [len, L, k]}

How the tokens a router sees are found (exactly as the model slices them): the micro-batch given
to the forward step is this CP rank's part (``batch.slice_for_cp``: zigzag chunks, per packed
sequence for THD); its ``seq_index`` / ``position_ids`` name the sample and the position of every
local token. The model turns ``[b, s]`` into ``[s, b]`` and, with sequence parallelism, each TP
rank keeps the contiguous ``s / tp`` slice of the sequence dimension (Megatron's
``scatter_to_sequence_parallel_region`` in the embedding; later stages receive that slice), so the
router's ``logits.view(-1, E)`` rows are ``[s/tp * b]`` tokens in s-major order. Padding tokens get
distinct valid experts. Pipeline stages and virtual chunks: each local router is mapped to its
GLOBAL layer through ``TransformerLayer.layer_number`` of the chunk it sits in; the forward step
tells the chunk (Megatron passes the chunk it runs), so only that chunk's routers get routes.

Replay inside Megatron (``router_replay.py``): REPLAY_FORWARD gathers the probabilities from the
router's dense pre-top-k scores (``scores.gather(1, idx)``) - the logits for Qwen3-MoE
(``moe_router_pre_softmax=False``, then softmax over the k gathered logits = softmax, top-k,
renormalise), the all-expert softmax with ``router_pre_softmax=True`` (not renormalised, as
the model's own top-k). Each ``set_target_indices`` also appends to a FIFO that REPLAY_BACKWARD
pops when activation recompute re-runs the router during backward; backward order equals
forward order per chunk in every Megatron schedule (no pipelining, 1F1B, interleaved), so after
its forward a micro-batch leaves the routers in REPLAY_BACKWARD. :meth:`finish` checks that each
router consumed every route set once in forward and once more in recompute if (and only if) its
layer is recomputed, and names the layer otherwise.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from megatron_vespo import comm
from megatron_vespo.mcore.versions import canonical_routes, replay_layer_number

MODES = ("replay", "record")
GATHER_TAG = "routing_replay_gather"


class RoutingReplayError(RuntimeError):
    """Routes that do not fit the model, the micro-batch or the expected consumption."""


@dataclass
class _Router:
    layer: int  # global 0-based layer id
    chunk: int  # index of the model chunk (virtual pipeline stage) on this rank
    local_index: int  # position of its layer in the chunk's decoder
    replay: object  # megatron RouterReplay
    recomputed: bool  # re-run during backward (activation recompute) when training
    n_set: int = 0  # micro-batches whose routes were given (replay) or recorded (record)
    n_forward: int = 0  # router calls in REPLAY_FORWARD / RECORD
    n_backward: int = 0  # router calls in REPLAY_BACKWARD (recompute)
    fresh: bool = False  # routes set and not yet used by a forward
    training: bool = True


@dataclass
class _Record:
    sample_ids: list[int]
    slot: torch.Tensor  # long [n]: index into sample_ids, -1 for padding
    pos: torch.Tensor  # long [n]: position in the sample
    chunk: int
    indices: list[torch.Tensor] = field(default_factory=list)  # int32 [n, k] per router of the chunk


def _unwrap(model):
    while hasattr(model, "module") and isinstance(getattr(model, "module"), torch.nn.Module):
        model = model.module
    return model


def _is_recomputed(config, local_index: int) -> bool:
    """Whether Megatron re-runs this layer's router in backward (TransformerBlock / MoELayer)."""
    if config.recompute_granularity == "full":
        if config.recompute_method == "uniform":
            return True
        if config.recompute_method == "block":
            return local_index < (config.recompute_num_layers or 0)
        return False
    if config.recompute_granularity == "selective":
        return "moe" in (config.recompute_modules or [])
    return False


def complete_routes(routes, length: int) -> torch.Tensor:
    """int32 ``[length, L, k]`` from the engine's ``[length - 1, L, k]`` (last row repeated) or a
    full array."""
    routes = torch.as_tensor(routes).to(torch.int32)
    if routes.dim() != 3:
        raise RoutingReplayError(f"routes must be [tokens, layers, top_k], got shape {tuple(routes.shape)}")
    if routes.shape[0] == length:
        return routes
    if routes.shape[0] == length - 1 and length >= 2:
        return torch.cat([routes, routes[-1:]], dim=0)
    raise RoutingReplayError(f"routes have {routes.shape[0]} rows for a sample of {length} tokens "
                             f"(expected {length - 1} from the engine or {length})")


def local_token_index(mb, tp_size: int = 1, tp_rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot, position), each long ``[s/tp * b]``: for every token this rank's routers see, in
    router row order, its index into ``mb.sample_ids`` (-1 for padding) and its position in the
    sample. ``mb`` is this CP rank's micro-batch; ``tp_size``/``tp_rank`` apply the
    sequence-parallel split (pass 1/0 without sequence parallelism)."""
    seq, pos = mb.seq_index, mb.position_ids
    b, s = seq.shape
    if s % tp_size:
        raise RoutingReplayError(f"the micro-batch's sequence dimension {s} is not divisible by tp = {tp_size} "
                                 f"(sequence parallelism splits it)")
    part = s // tp_size
    rows = slice(tp_rank * part, (tp_rank + 1) * part)
    return seq.t()[rows].reshape(-1), pos.t()[rows].reshape(-1)


class RoutingReplay:
    """Routing replay for this rank's model chunks (see the module doc).

    ``chunks``: this rank's model chunks in virtual-stage order (GPTModel or DDP-wrapped, as given
    to the schedule). Construct on every rank at once: it checks over the pipeline group that each
    MoE layer has exactly one router (one tiny all-reduce)."""

    def __init__(self, chunks, model_cfg, check_coverage: bool = True):
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.moe.router_replay import RouterReplay

        if not model_cfg.is_moe:
            raise RoutingReplayError(f"routing replay needs an MoE model; {model_cfg.family} has no experts")
        chunks = chunks if isinstance(chunks, (list, tuple)) else [chunks]
        self.model_cfg = model_cfg
        self.chunks = [_unwrap(c) for c in chunks]
        self.num_layers, self.top_k, self.num_experts = (model_cfg.num_layers, model_cfg.moe_router_topk,
                                                         model_cfg.num_experts)
        self.routers: list[_Router] = []
        self.sequence_parallel = bool(self.chunks[0].config.sequence_parallel)
        for ci, chunk in enumerate(self.chunks):
            config = chunk.config
            if not config.moe_enable_routing_replay:
                raise RoutingReplayError("the model was built without routing replay: build it with "
                                         "transformer_config(..., moe_enable_routing_replay=True)")
            for li, layer in enumerate(chunk.decoder.layers):
                router = getattr(layer.mlp, "router", None)
                # Megatron 0.19+ gives each RouterReplay its global layer; before, only the layer knows it
                g = (replay_layer_number(router) or layer.layer_number) - 1
                if g in model_cfg.dense_layers:
                    if router is not None:
                        raise RoutingReplayError(f"layer {g} is dense in the model config but has a router")
                    continue
                if router is None or getattr(router, "router_replay", None) is None:
                    raise RoutingReplayError(f"layer {g} (chunk {ci}) is an MoE layer without a RouterReplay")
                if router.layer_number is not None and router.layer_number != layer.layer_number:
                    raise RoutingReplayError(f"layer {g}: router.layer_number {router.layer_number} != "
                                             f"layer_number {layer.layer_number}")
                self.routers.append(_Router(g, ci, li, router.router_replay, _is_recomputed(config, li)))
        registered = RouterReplay.global_router_replay_instances
        mine = {id(r.replay) for r in self.routers}
        orphans = [x for x in registered if id(x) not in mine]
        missing = [r.layer for r in self.routers if not any(x is r.replay for x in registered)]
        if orphans or missing or len(registered) != len(self.routers):
            raise RoutingReplayError(
                f"{len(registered)} RouterReplay instance(s) are registered in this process but this "
                f"rank's model chunks hold {len(self.routers)} MoE router(s) ({len(orphans)} orphan "
                f"instance(s) from routers built before or after these chunks; routers of layers "
                f"{missing} not registered). Call RoutingReplay.clear_registry() right before building "
                f"the model and build nothing with moe_enable_routing_replay=True afterwards")
        for r in self.routers:
            self._install(r)
        self.mode: str | None = None
        self.routes = None
        self.records: list[_Record] = []
        self._chunk_of = {id(c): i for i, c in enumerate(self.chunks)}
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.tp_cp_group = ps.get_tensor_and_context_parallel_group()
        self.dp_group = ps.get_data_parallel_group()
        self.cp_size = ps.get_context_parallel_world_size()
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.last_counts: dict[int, tuple[int, int, int]] = {}
        if check_coverage:
            self._check_coverage()

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def clear_registry() -> None:
        """Forget every RouterReplay instance registered so far (Megatron keeps one global list);
        call right before building the model whose routers are to be replayed."""
        from megatron.core.transformer.moe.router_replay import RouterReplay

        RouterReplay.clear_global_router_replay_instances()

    def _check_coverage(self) -> None:
        """Every MoE layer of the model has exactly one router over the pipeline stages."""
        count = torch.zeros(self.num_layers, dtype=torch.int32)
        for r in self.routers:
            count[r.layer] += 1
        comm.all_reduce_sum(count, self.pp_group, tag=GATHER_TAG)
        moe_layers = [g for g in range(self.num_layers) if g not in self.model_cfg.dense_layers]
        bad = [g for g in moe_layers if int(count[g]) != 1]
        if bad:
            raise RoutingReplayError(f"MoE layers {bad} have {[int(count[g]) for g in bad]} routers over the "
                                     f"pipeline stages (expected exactly one each)")

    def _describe(self, r: _Router) -> str:
        from megatron.core import parallel_state as ps

        return (f"layer {r.layer} (pipeline stage {ps.get_pipeline_model_parallel_rank()}, chunk {r.chunk}, "
                f"local layer {r.local_index})")

    def _install(self, r: _Router) -> None:
        """Wrap the instance's ``get_replay_topk`` to count calls and check token counts."""
        replay = r.replay
        original = getattr(replay, "_vespo_original_get_replay_topk", None)
        if original is None:
            original = replay.get_replay_topk
            replay._vespo_original_get_replay_topk = original
        replay.get_replay_topk = functools.partial(self._counted_topk, r, original)

    def _counted_topk(self, r: _Router, original, scores, topk, num_groups=None, group_topk=None,
                      default_compute_topk=None):
        from megatron.core.transformer.moe.router_replay import RouterReplayAction as A

        action = r.replay.router_replay_action
        if action == A.REPLAY_FORWARD:
            if not r.fresh:
                raise RoutingReplayError(f"{self._describe(r)}: the router ran a forward without routes set for "
                                         f"it (a forward outside RoutingReplay.wrap, or twice for one micro-batch)")
            self._check_rows(r, r.replay.target_topk_idx, scores, "forward")
            r.fresh = False
            r.n_forward += 1
        elif action == A.REPLAY_BACKWARD:
            if not r.replay.replay_backward_list:
                raise RoutingReplayError(f"{self._describe(r)}: recompute ran the router but no routes are left "
                                         f"to replay ({r.n_backward} popped of {r.n_set} set)")
            self._check_rows(r, r.replay.replay_backward_list[0], scores, "recompute")
            r.n_backward += 1
        elif action == A.RECORD:
            r.n_forward += 1
        return original(scores, topk, num_groups, group_topk, default_compute_topk)

    def _check_rows(self, r, indices, scores, what):
        if indices is None or indices.shape[0] != scores.shape[0]:
            got = None if indices is None else tuple(indices.shape)
            raise RoutingReplayError(f"{self._describe(r)}: {what} replay routes have shape {got} but the "
                                     f"router sees {scores.shape[0]} tokens")

    # ------------------------------------------------------------------ slicing
    def chunk_index(self, model) -> int:
        index = self._chunk_of.get(id(_unwrap(model)))
        if index is None:
            raise RoutingReplayError("the forward step got a model chunk this RoutingReplay was not built from")
        return index

    def routers_of(self, chunk: int | None) -> list[_Router]:
        return [r for r in self.routers if chunk is None or r.chunk == chunk]

    def _sp(self) -> tuple[int, int]:
        return (self.tp_size, self.tp_rank) if self.sequence_parallel else (1, 0)

    def routes_for_microbatch(self, mb, per_sample_routes, chunk: int | None = None) -> list[torch.Tensor]:
        """int32 ``[s/tp * b, top_k]`` per local router (of ``chunk``, or all), in router row order.

        ``per_sample_routes[sample_id]``: ``[len - 1 or len, num_layers, top_k]`` (numpy or torch)
        for every sample id of ``mb.sample_ids``; ``mb`` is this CP rank's micro-batch."""
        if self.cp_size > 1 and mb.cp_size != self.cp_size:
            raise RoutingReplayError(f"the micro-batch is not this CP rank's part (cp_size {mb.cp_size}, "
                                     f"context parallel size {self.cp_size}): pass slice_for_cp(...)")
        routers = self.routers_of(chunk)
        layers = torch.tensor([r.layer for r in routers], dtype=torch.long)
        slot, pos = local_token_index(mb, *self._sp())
        k, n = self.top_k, slot.numel()
        # padding tokens: distinct valid experts, rotated so they spread over the experts
        out = ((torch.arange(n).unsqueeze(1) + torch.arange(k)) % self.num_experts).to(torch.int32)
        out = out.unsqueeze(1).expand(n, len(routers), k).contiguous()
        for j in slot.unique().tolist():
            if j < 0:
                continue
            sid = mb.sample_ids[j]
            try:
                routes = per_sample_routes[sid]
            except (KeyError, IndexError):
                raise RoutingReplayError(f"no routes for sample {sid} (micro-batch samples {mb.sample_ids})") from None
            routes = torch.as_tensor(routes)
            if routes.dim() != 3 or routes.shape[1] != self.num_layers or routes.shape[2] != k:
                raise RoutingReplayError(f"sample {sid}: routes have shape {tuple(routes.shape)}, expected "
                                         f"[tokens, {self.num_layers} layers, top_k {k}]")
            rows = slot == j
            p = pos[rows]
            length = self._sample_length(mb, j)
            if length is not None and routes.shape[0] not in (length - 1, length):
                raise RoutingReplayError(f"sample {sid}: routes have {routes.shape[0]} rows for {length} tokens "
                                         f"(expected {length - 1} from the engine or {length})")
            top = routes.shape[0]
            if int(p.max()) > top:
                raise RoutingReplayError(f"sample {sid}: routes have {top} rows but the micro-batch holds "
                                         f"position {int(p.max())}")
            p = torch.where(p == top, p - 1, p)  # the engine's missing last row: repeat the previous
            out[rows] = routes.index_select(0, p)[:, layers].to(torch.int32)
        self._validate(out, routers)
        return [out[:, i].contiguous() for i in range(len(routers))]

    @staticmethod
    def _sample_length(mb, j: int) -> int | None:
        """Length of sample slot ``j`` where the micro-batch tells it (packed, or no CP)."""
        if mb.fmt == "packed" and mb.cu_seqlens is not None:
            return int(mb.cu_seqlens[j + 1] - mb.cu_seqlens[j])
        if mb.cp_size == 1:
            return int((mb.seq_index == j).sum())
        return None

    def _validate(self, out: torch.Tensor, routers) -> None:
        if out.numel() == 0:
            return
        low, high = int(out.min()), int(out.max())
        if low < 0 or high >= self.num_experts:
            bad = ((out < 0) | (out >= self.num_experts)).any(dim=(0, 2)).nonzero().flatten().tolist()
            raise RoutingReplayError(f"expert ids outside [0, {self.num_experts}) in layers "
                                     f"{[routers[i].layer for i in bad]}")
        srt = out.sort(dim=-1).values
        dup = (srt[..., 1:] == srt[..., :-1]).any(dim=-1)
        if dup.any():
            i = int(dup.any(dim=0).nonzero()[0])
            raise RoutingReplayError(f"layer {routers[i].layer}: {int(dup[:, i].sum())} token(s) route to the same "
                                     f"expert twice (top-k experts must be distinct)")

    # ------------------------------------------------------------------ sessions
    def start(self, mode: str, routes=None) -> None:
        """Begin a pass: ``"replay"`` the given per-sample routes, or ``"record"`` the routers' own."""
        if mode not in MODES:
            raise ValueError(f"routing replay mode must be one of {MODES}, got {mode!r}")
        if self.mode is not None:
            raise RoutingReplayError(f"a {self.mode!r} pass is still open: call finish() first")
        if mode == "replay" and routes is None:
            raise ValueError("replay needs per-sample routes")
        self._reset()
        self.mode, self.routes = mode, routes
        if mode == "record":
            self.records = []

    def begin_microbatch(self, model, mb) -> None:
        """Call in the forward step right before ``model(...)`` (``model``: the chunk Megatron passed)."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction as A

        if self.mode is None:
            raise RoutingReplayError("no routing replay pass is open: call start() first")
        chunk = self.chunk_index(model)
        routers = self.routers_of(chunk)
        training = self.chunks[chunk].training
        if self.mode == "replay":
            device = next(self.chunks[chunk].parameters()).device
            for r, routes in zip(routers, self.routes_for_microbatch(mb, self.routes, chunk)):
                if r.fresh:
                    raise RoutingReplayError(f"{self._describe(r)}: routes of the previous micro-batch were never "
                                             f"used by a forward")
                r.replay.set_target_indices(routes.to(device=device, dtype=torch.long))
                r.n_set, r.fresh, r.training = r.n_set + 1, True, training
            action = A.REPLAY_FORWARD
        else:
            slot, pos = local_token_index(mb, *self._sp())
            self.records.append(_Record(list(mb.sample_ids), slot, pos, chunk))
            for r in routers:
                r.replay.recorded_topk_idx = None
                r.training = training
            action = A.RECORD
        for r in self.routers:
            r.replay.set_router_replay_action(action)

    def end_microbatch(self, model) -> None:
        """Call right after ``model(...)`` returns: recompute in backward then replays these routes."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction as A

        chunk = self.chunk_index(model)
        routers = self.routers_of(chunk)
        if self.mode == "replay":
            unused = [r for r in routers if r.fresh]
            if unused:
                raise RoutingReplayError(f"{self._describe(unused[0])}: routes were set but the forward did not run "
                                         f"this router")
        elif self.mode == "record":
            record = self.records[-1]
            for r in routers:
                idx = r.replay.recorded_topk_idx
                if idx is None or idx.shape[0] != record.slot.numel():
                    raise RoutingReplayError(f"{self._describe(r)}: recorded {None if idx is None else idx.shape[0]} "
                                             f"tokens, the micro-batch gives the router {record.slot.numel()}")
                # ascending expert ids: Megatron 0.18+ leaves no_grad routes unsorted (versions.py)
                record.indices.append(canonical_routes(idx.detach()).to(device="cpu", dtype=torch.int32))
                # a recompute in backward (training pass) then replays what the forward chose
                r.replay.replay_backward_list.append(idx.detach())
                r.n_set += 1
        for r in self.routers:
            r.replay.set_router_replay_action(A.REPLAY_BACKWARD)

    def wrap(self, forward_step):
        """A ``forward_step_func(data_iterator, model)`` that does begin/end around ``forward_step``.
        The data iterator must yield the (CP-local) MicroBatch on every pipeline stage."""

        def wrapped(data_iterator, model):
            if data_iterator is None:
                raise RoutingReplayError("routing replay needs the micro-batch on every pipeline stage "
                                         "(the forward step got data_iterator=None)")
            proxy = _BeginOnNext(data_iterator, functools.partial(self.begin_microbatch, model))
            result = forward_step(proxy, model)
            if not proxy.pulled:
                raise RoutingReplayError("the forward step did not take a micro-batch from the iterator")
            self.end_microbatch(model)
            return result

        return wrapped

    def finish(self, forward_only: bool) -> None:
        """Close the pass: check that each router consumed every route set exactly once in forward
        and once more in recompute (training passes, recomputed layers), then reset. Raises
        RoutingReplayError naming the first layers that did not."""
        problems = []
        self.last_counts = {}
        for r in self.routers:
            recompute = r.recomputed and r.training and not forward_only
            expected_bwd = r.n_set if recompute else 0
            left = len(r.replay.replay_backward_list)
            self.last_counts[r.layer] = (r.n_set, r.n_forward, r.n_backward)
            if r.n_forward != r.n_set or r.n_backward != expected_bwd or r.fresh or (
                    recompute and left != 0):
                problems.append(f"{self._describe(r)}: {r.n_set} micro-batch route set(s), {r.n_forward} used in "
                                f"forward, {r.n_backward} in recompute (expected {expected_bwd}), {left} left")
        mode = self.mode
        self._reset()
        if problems:
            more = f" (+{len(problems) - 4} more)" if len(problems) > 4 else ""
            raise RoutingReplayError(f"routing replay ({mode}) routes not consumed exactly once: "
                                     + "; ".join(problems[:4]) + more)

    def abort(self) -> None:
        """Drop an open pass without checks (after an exception inside it)."""
        self._reset()

    def _reset(self) -> None:
        for r in self.routers:
            r.replay.clear_indices()
            r.replay.clear_router_replay_action()
            r.n_set = r.n_forward = r.n_backward = 0
            r.fresh = False
        self.mode, self.routes = None, None

    # ------------------------------------------------------------------ R2: recorded routes
    def recorded_routes(self, lengths, across_dp: bool = False) -> dict[int, torch.Tensor]:
        """The last record pass as per-sample int32 ``[len, num_layers, top_k]`` (dense layers 0).

        Gathered over TP (sequence parallel), CP and PP, so every rank of this data-parallel rank
        gets its samples whole; ``across_dp`` also sums over the data-parallel group, so every rank
        gets every sample named in ``lengths``. ``lengths[sample_id]`` = number of tokens. Every rank
        of the group must have recorded the same micro-batches. Collectives: one int32 all-reduce
        (SUM) per group over the samples' routes; each (token, MoE layer) has exactly one owner."""
        if not self.records:
            raise RoutingReplayError("nothing was recorded: run a pass started with start('record')")
        if across_dp:
            sids = sorted(lengths.keys() if isinstance(lengths, Mapping) else range(len(lengths)))
        else:
            sids = sorted({sid for rec in self.records for sid in rec.sample_ids})
        sizes = [int(lengths[s]) for s in sids]
        offsets = dict(zip(sids, torch.tensor([0] + sizes).cumsum(0).tolist()))
        L, k = self.num_layers, self.top_k
        buf = torch.zeros((sum(sizes), L, k), dtype=torch.int32)
        for rec in self.records:
            real = rec.slot >= 0
            sid = torch.tensor(rec.sample_ids, dtype=torch.long)[rec.slot[real]]
            row = torch.tensor([offsets[int(s)] for s in sid.tolist()], dtype=torch.long) + rec.pos[real]
            for r, idx in zip(self.routers_of(rec.chunk), rec.indices):
                buf[row, r.layer] = idx[real] + 1  # 0 = not recorded here
        groups = [self.tp_cp_group, self.pp_group] + ([self.dp_group] if across_dp else [])
        for group in groups:
            self._check_same_shape(buf, len(sids), group)
            comm.all_reduce_sum(buf, group, tag=GATHER_TAG)
        buf -= 1
        moe = [g for g in range(L) if g not in self.model_cfg.dense_layers]
        body = buf[:, moe]
        if (body < 0).any() or (body >= self.num_experts).any():
            rows = ((body < 0) | (body >= self.num_experts)).any(dim=(1, 2)).nonzero().flatten()
            first = int(rows[0])
            sid = next(s for s in sids if offsets[s] <= first < offsets[s] + int(lengths[s]))
            raise RoutingReplayError(f"recorded routes incomplete or doubled: {rows.numel()} token(s), first "
                                     f"sample {sid} position {first - offsets[sid]} (was every sample recorded "
                                     f"exactly once on some rank?)")
        buf[:, [g for g in range(L) if g in self.model_cfg.dense_layers]] = 0
        return {s: buf[offsets[s]:offsets[s] + size] for s, size in zip(sids, sizes)}

    @staticmethod
    def _check_same_shape(buf, n_samples, group) -> None:
        """All ranks of ``group`` reduce the same layout (sum of x and x^2 equal size*x, size*x^2)."""
        if comm.group_size(group) == 1:
            return
        x = torch.tensor([n_samples, buf.shape[0]], dtype=torch.float64)
        probe = torch.cat([x, x * x])
        comm.all_reduce_sum(probe, group, tag=GATHER_TAG)
        size = comm.group_size(group)
        if not torch.equal(probe, torch.cat([x, x * x]) * size):
            raise RoutingReplayError("ranks of one model-parallel group recorded different samples: record with "
                                     "the same micro-batches on every TP/CP/PP rank of a data-parallel rank")


class _BeginOnNext:
    """Iterator proxy: calls ``begin(mb)`` with the first micro-batch taken from it."""

    def __init__(self, iterator, begin):
        self.iterator, self.begin, self.pulled = iterator, begin, False

    def __iter__(self):
        return self

    def __next__(self):
        if self.pulled:
            raise RoutingReplayError("the forward step took two micro-batches in one call")
        mb = next(self.iterator)
        self.pulled = True
        self.begin(mb)
        return mb

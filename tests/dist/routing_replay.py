"""Routing replay (R2/R3) under one parallel layout, against the plain-PyTorch fp64 reference.

Runs Megatron-Core's real forward/backward (get_forward_backward_func, DDP, finalize_model_grads)
with the VESPO hook wrapped by ``RoutingReplay.wrap`` and prints, on rank 0, one line
``RESULT {json}`` with the measured numbers (the pytest side judges them). Checks (``--checks``):

  r3           random valid routes (unlike the router's own) replayed; loss and EVERY gradient of
               EVERY rank vs the reference forced to the same routes; per batch format
  negative     the same routes for the wrong layer / shifted by one token: the loss must move
  r2           record in a forward-only pass; recorded == the reference's own top-k; a training
               pass replaying them == the non-replayed one (loss and gradients)
  recompute    rebuild with full activation recompute; r3 parity again (routes popped during
               backward), and with the recompute replay switched off (gradients must go wrong)
  consumption  routes set for a micro-batch that never runs, and other misuse, raise clear errors
  orphan       routers built after the replayed model are refused
"""

import argparse
import json
import math
import sys
import time
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from megatron_vespo import comm  # noqa: E402
from megatron_vespo.parity.reference import ReferenceMoE, init_hf_state, reference_loss  # noqa: E402
from megatron_vespo.parity.worker import make_samples, relative_difference, tiny_model_config  # noqa: E402

SEED = 1234
M = tiny_model_config()
MOE_LAYERS = [g for g in range(M.num_layers) if g not in M.dense_layers]


class RoutedReference(ReferenceMoE):
    """The reference with each sample's routes forced (keyed by the Sample object)."""

    def __init__(self, m, state, routes_by_sample):
        super().__init__(m, state)
        self.routes_by_sample = routes_by_sample

    def response_logprobs(self, sample, temperature=1.0, routes=None, with_entropy=False):
        if routes is None:
            routes = self.routes_by_sample.get(id(sample))
        return super().response_logprobs(sample, temperature, routes, with_entropy)


def reference(samples, micro_batches, cfg, routes=None):
    """fp64 loss and gradients; ``routes[i]``: full [len, L, k] routes of sample i (or natural)."""
    from megatron_vespo.routing_replay import complete_routes

    state = {k: v.double().requires_grad_(True) for k, v in init_hf_state(M, SEED).items()}
    forced = {} if routes is None else {
        id(s): complete_routes(routes[i], s.tokens.numel()) for i, s in enumerate(samples)}
    loss = reference_loss(RoutedReference(M, state, forced), samples, micro_batches, cfg)
    loss.backward()
    grads = {k: (v.grad if v.grad is not None else torch.zeros_like(v)).detach() for k, v in state.items()}
    return float(loss), grads


def reference_topk(samples):
    """The fp64 reference's own routes [len, L, k] per sample (dense layers 0) and the margin
    between the k-th and (k+1)-th router logit (to tell a near-tie from a real mismatch)."""
    state = {k: v.double() for k, v in init_hf_state(M, SEED).items()}
    ref = ReferenceMoE(M, state)
    out = []
    with torch.no_grad():
        for s in samples:
            found = []
            ref.forward(s.tokens, routes_out=found)
            routes = torch.zeros(s.tokens.numel(), M.num_layers, M.moe_router_topk, dtype=torch.int32)
            for layer, idx in found:
                routes[:, layer] = idx.to(torch.int32)
            out.append(routes)
    return out


def random_routes(samples, seed):
    """Engine-shaped routes: int32 numpy [len - 1, L, k], distinct random experts, dense rows 0."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in samples:
        n = s.tokens.numel() - 1
        r = torch.rand(n, M.num_layers, M.num_experts, generator=gen).argsort(-1)[..., :M.moe_router_topk]
        r[:, list(M.dense_layers)] = 0
        out.append(r.to(torch.int32).numpy())
    return out


class Run:
    """Model chunks of this rank (DDP-wrapped), the replay, and the seeded batch."""

    def __init__(self, layout, recompute=False, fixed_seq=False):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed import finalize_model_grads

        from megatron_vespo.batch import build_micro_batch, partition, slice_for_cp
        from megatron_vespo.mcore.model import build_gpt_chunks, transformer_config
        from megatron_vespo.mcore.weights import ShardContext, load_hf_state
        from megatron_vespo.routing_replay import RoutingReplay

        self.layout = layout
        extra = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) \
            if recompute else {}
        if fixed_seq:  # every micro-batch padded to one length (see --fixed-seq)
            extra["variable_seq_lengths"] = False
        RoutingReplay.clear_registry()
        config = transformer_config(M, layout, moe_enable_routing_replay=True, **extra)
        self.chunks = build_gpt_chunks(M, config)
        weights = init_hf_state(M, SEED)
        self.ctxs = []
        for chunk in self.chunks:
            ctx = ShardContext.from_model(chunk, M)
            load_hf_state(chunk, weights, ctx)
            self.ctxs.append(ctx)
        ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                use_distributed_optimizer=False)
        self.ddps = [DistributedDataParallel(config, ddp_cfg, c) for c in self.chunks]
        config.no_sync_func = [d.no_sync for d in self.ddps] if len(self.ddps) > 1 else self.ddps[0].no_sync
        config.finalize_model_grads_func = finalize_model_grads
        self.replay = RoutingReplay(self.ddps, M)

        self.samples = None
        if torch.distributed.get_rank() == 0:
            self.samples = make_samples(ReferenceMoE(M, init_hf_state(M, SEED)), 8, SEED)
        self.samples = comm.broadcast_object(self.samples)
        self.plan = partition(len(self.samples), ps.get_data_parallel_world_size(), 2)
        self.all_mbs = [ids for rank_plan in self.plan for ids in rank_plan]
        cp = layout.cp
        seq_multiple = 2 * cp if cp > 1 else 1
        self.cp = cp

        def local(fmt, samples=None):
            samples = samples or self.samples

            def build(ids, pad_to=None):
                return build_micro_batch([samples[i] for i in ids], fmt, seq_multiple, seq_multiple * layout.tp, ids,
                                         pad_to)

            pad_to = max(build(ids).tokens.shape[1] for ids in self.all_mbs) if fixed_seq else None
            return [slice_for_cp(build(ids, pad_to), cp, ps.get_context_parallel_rank())
                    for ids in self.plan[ps.get_data_parallel_rank()]]

        self.local = local

    def step(self, fmt, mode=None, routes=None, forward_only=False, finish=True, samples=None):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_vespo.hook import make_forward_step, reduce_metrics
        from megatron_vespo.losses import LossConfig

        mbs = self.local(fmt, samples)
        for d in self.ddps:
            d.zero_grad_buffer()
        forward_step = make_forward_step(LossConfig(name="vespo"))
        if mode is not None:
            self.replay.start(mode, routes)
            forward_step = self.replay.wrap(forward_step)
        iters = [iter(mbs) for _ in self.ddps] if len(self.ddps) > 1 else iter(mbs)
        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iters, model=self.ddps, num_microbatches=len(mbs),
            seq_length=mbs[0].tokens.shape[1] * self.cp, micro_batch_size=mbs[0].tokens.shape[0],
            forward_only=forward_only)
        if mode is not None and finish:
            self.replay.finish(forward_only)
        return reduce_metrics(out)["policy_loss"]

    def grads(self):
        out = {}
        for i, chunk in enumerate(self.chunks):
            for name, p in chunk.named_parameters():
                g = p.main_grad if getattr(p, "main_grad", None) is not None else p.grad
                out[(i, name)] = g.detach().clone()
        return out

    def worst_vs_reference(self, ref_grads):
        """Max over this rank's parameters (all chunks) and then over all ranks."""
        from megatron_vespo.mcore.weights import local_tensor

        worst, where = 0.0, ""
        for (i, name), g in self.grads().items():
            d = relative_difference(g, local_tensor(name, ref_grads, self.ctxs[i]))
            if d > worst or not math.isfinite(d):
                worst, where = d, f"chunk{i}:{name}"
        return max_over_ranks(worst, where)


def max_over_ranks(value, where=""):
    rows = comm.gather_objects((value, where, torch.distributed.get_rank()))
    best = max(rows, key=lambda r: r[0]) if rows else None
    return comm.broadcast_object(best[:2] if best else None)


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def consistent_samples(samples, routes):
    """Copies of ``samples`` whose pi_old / engine log-probs sit around the policy UNDER THE
    FORCED ROUTES (as an engine's would), with make_samples' offsets: the loss stays O(1)."""
    import copy

    state = {k: v.double() for k, v in init_hf_state(M, SEED).items()}
    ref = ReferenceMoE(M, state)
    out = []
    with torch.no_grad():
        for s, r in zip(samples, routes):
            from megatron_vespo.routing_replay import complete_routes

            natural = ref.response_logprobs(s)
            forced = ref.response_logprobs(s, routes=complete_routes(r, s.tokens.numel()))
            c = copy.copy(s)
            c.old_logprobs = (forced + (s.old_logprobs - natural)).clamp(max=0.0).float()
            c.engine_logprobs = (forced + (s.engine_logprobs - natural)).clamp(max=0.0).float()
            out.append(c)
    return out


def check_r3(run, formats, results):
    payload = None
    if torch.distributed.get_rank() == 0:
        routes = random_routes(run.samples, SEED + 7)
        samples = consistent_samples(run.samples, routes)
        natural = reference_topk(samples)
        differ = sum(int((torch.sort(torch.as_tensor(r)[:, g], -1).values
                          != torch.sort(n[:-1, g], -1).values).any(-1).sum())
                     for r, n in zip(routes, natural) for g in MOE_LAYERS)
        total = sum((s.tokens.numel() - 1) * len(MOE_LAYERS) for s in samples)
        payload = (routes, samples, reference(samples, run.all_mbs, run_cfg(), routes),
                   reference(samples, run.all_mbs, run_cfg())[0], differ / total)
    routes, samples, (ref_loss, ref_grads), nat_loss, differ = comm.broadcast_object(payload)
    run.r3_samples = samples
    results["r3_routes_differing_from_router"] = differ
    results["r3_reference_loss_forced"], results["r3_reference_loss_natural"] = ref_loss, nat_loss
    for fmt in formats:
        start = time.perf_counter()
        loss = run.step(fmt, "replay", routes, samples=samples)
        worst, where = run.worst_vs_reference(ref_grads)
        results[f"r3_{fmt}"] = dict(loss=loss, loss_rel=rel(loss, ref_loss), grad_rel=worst, worst_param=where,
                                    seconds=time.perf_counter() - start, counts=consumption(run))
    return routes, ref_loss


def consumption(run):
    """(set, forward, backward) per global layer from the last finished pass, over all ranks."""
    rows = comm.gather_objects(run.replay.last_counts)
    merged = {}
    for r in rows or []:
        for layer, c in r.items():
            merged.setdefault(str(layer), []).append(list(c))
    return comm.broadcast_object(merged)


def run_cfg():
    from megatron_vespo.losses import LossConfig

    return LossConfig(name="vespo")


def check_negative(run, routes, ref_loss, results):
    def layer_offset(r):
        r = torch.as_tensor(r).clone()
        moved = r.clone()
        for a, b in zip(MOE_LAYERS, MOE_LAYERS[1:] + MOE_LAYERS[:1]):
            moved[:, a] = r[:, b]
        return moved.numpy()

    def token_shift(r):
        r = torch.as_tensor(r)
        return torch.cat([r[:1], r[:-1]]).numpy()  # token t gets token t-1's route

    for name, fn in (("layer_offset", layer_offset), ("token_shift", token_shift)):
        loss = run.step("packed", "replay", [fn(r) for r in routes], forward_only=True, samples=run.r3_samples)
        results[f"negative_{name}_loss_rel"] = rel(loss, ref_loss)


def check_r2(run, formats, results):
    samples = run.samples
    lengths = {i: s.tokens.numel() for i, s in enumerate(samples)}
    natural = reference_topk(samples) if torch.distributed.get_rank() == 0 else None
    ref = reference(samples, run.all_mbs, run_cfg()) if torch.distributed.get_rank() == 0 else None
    ref_loss, ref_grads = comm.broadcast_object(ref)
    for fmt in formats:
        run.step(fmt, "record", forward_only=True)
        recorded = run.replay.recorded_routes(lengths, across_dp=True)
        mine = run.replay.recorded_routes(lengths)  # this DP rank's samples only
        local_ok = all(torch.equal(mine[s], recorded[s]) for s in mine)
        same = comm.broadcast_object(recorded)
        consistent = all(torch.equal(same[s], recorded[s]) for s in recorded) and local_ok
        row = dict(ranks_disagree=max_over_ranks(0.0 if consistent else 1.0)[0])
        if torch.distributed.get_rank() == 0:
            mism = compared = 0
            for i, s in enumerate(samples):
                a = recorded[i][:, MOE_LAYERS].sort(-1).values
                b = natural[i][:, MOE_LAYERS].sort(-1).values
                mism += int((a != b).any(-1).sum())
                compared += a.shape[0] * a.shape[1]
            dense_nonzero = sum(int(recorded[i][:, list(M.dense_layers)].abs().sum()) for i in recorded)
            row.update(mismatched_vs_reference_topk=mism, compared=compared, dense_nonzero=dense_nonzero,
                       samples=len(recorded))
        row = comm.broadcast_object(row)
        loss_plain = run.step(fmt)
        grads_plain = run.grads()
        loss_replay = run.step(fmt, "replay", recorded)
        grads_replay = run.grads()
        worst = max(relative_difference(grads_replay[k], grads_plain[k]) for k in grads_plain)
        row.update(loss_plain=loss_plain, loss_replay=loss_replay, loss_rel=rel(loss_replay, loss_plain),
                   grad_rel=max_over_ranks(worst)[0], loss_rel_vs_reference=rel(loss_replay, ref_loss),
                   grad_rel_vs_reference=run.worst_vs_reference(ref_grads)[0])
        results[f"r2_{fmt}"] = row


def check_recompute(layout, results, fixed_seq=False):
    from megatron_vespo.routing_replay import RoutingReplay, RoutingReplayError

    run = Run(layout, recompute=True, fixed_seq=fixed_seq)
    sub = {}
    routes, _ = check_r3(run, ["packed"], sub)
    results["recompute_r3_packed"] = sub["r3_packed"]
    # negative control: after each forward leave the routers WITHOUT the backward replay, so the
    # recompute picks its own top-k: gradients go wrong and finish() names the layer
    replay = run.replay
    replay.end_microbatch = lambda model: (RoutingReplay.end_microbatch(replay, model),
                                           [r.replay.clear_router_replay_action() for r in replay.routers])
    ref_grads = None
    if torch.distributed.get_rank() == 0:
        ref_grads = reference(run.r3_samples, run.all_mbs, run_cfg(), routes)[1]
    ref_grads = comm.broadcast_object(ref_grads)
    run.step("packed", "replay", routes, finish=False, samples=run.r3_samples)
    try:
        replay.finish(forward_only=False)
        message = ""
    except RoutingReplayError as err:
        message = str(err)
    del replay.end_microbatch
    results["recompute_without_backward_replay"] = dict(grad_rel=run.worst_vs_reference(ref_grads)[0],
                                                        error=message[:300])


def check_consumption(run, routes, results):
    from megatron_vespo.routing_replay import RoutingReplayError

    replay, mbs, out = run.replay, run.local("packed"), {}

    def expect(name, fn):
        try:
            fn()
            out[name] = ""
        except RoutingReplayError as err:
            out[name] = str(err)
        finally:
            if replay.mode is not None:
                replay.abort()

    def never_run():
        replay.start("replay", routes)
        replay.begin_microbatch(run.ddps[0], mbs[0])  # routes set, model never called
        replay.finish(forward_only=False)

    def set_twice():
        replay.start("replay", routes)
        replay.begin_microbatch(run.ddps[0], mbs[0])
        replay.begin_microbatch(run.ddps[0], mbs[1])

    def missing_sample():
        run.step("packed", "replay", {i: r for i, r in enumerate(routes) if i != mbs[0].sample_ids[-1]})

    def wrong_rows():
        run.step("packed", "replay", [r[:-2] for r in routes])

    def duplicate_experts():
        bad = [r.copy() for r in routes]
        bad[mbs[0].sample_ids[0]][0, MOE_LAYERS[0], 1] = bad[mbs[0].sample_ids[0]][0, MOE_LAYERS[0], 0]
        run.step("packed", "replay", bad)

    for name, fn in (("never_run", never_run), ("set_twice", set_twice), ("missing_sample", missing_sample),
                     ("wrong_rows", wrong_rows), ("duplicate_experts", duplicate_experts)):
        expect(name, fn)
    # the replay is usable again afterwards
    out["after_errors_loss"] = run.step("packed", "replay", routes, samples=run.r3_samples)
    results["consumption"] = out


def check_orphan(run, results):
    from megatron_vespo.mcore.model import build_gpt_model, transformer_config
    from megatron_vespo.routing_replay import RoutingReplay, RoutingReplayError

    build_gpt_model(M, transformer_config(M, run.layout, moe_enable_routing_replay=True))  # orphan routers
    try:
        RoutingReplay(run.ddps, M)
        results["orphan_error"] = ""
    except RoutingReplayError as err:
        results["orphan_error"] = str(err)
    RoutingReplay.clear_registry()
    try:
        RoutingReplay(run.ddps, M)
        results["unregistered_error"] = ""
    except RoutingReplayError as err:
        results["unregistered_error"] = str(err)


def main():
    from megatron_vespo.mcore.parallel import Layout, initialize_model_parallel

    parser = argparse.ArgumentParser()
    parser.add_argument("--layout", required=True)
    parser.add_argument("--checks", default="r3,negative,r2")
    parser.add_argument("--formats", default="packed,padded")
    parser.add_argument("--fixed-seq", action="store_true",
                        help="pad every micro-batch to one length and set variable_seq_lengths=False: with "
                             "pp=2 and a virtual pipeline, Megatron's untagged shape/tensor p2p messages between "
                             "the same two ranks cross on gloo and the interleaved training schedule hangs")
    args = parser.parse_args()
    layout = Layout.parse(args.layout)
    initialize_model_parallel(layout, seed=SEED)
    checks = args.checks.split(",")
    formats = args.formats.split(",")
    results = {"layout": str(layout)}
    start = time.perf_counter()
    if {"r3", "negative", "r2", "consumption", "orphan"} & set(checks):
        run = Run(layout, fixed_seq=args.fixed_seq)
        routes = ref_loss = None
        if "r3" in checks or "negative" in checks or "consumption" in checks:
            routes, ref_loss = check_r3(run, formats, results)
        if "negative" in checks:
            check_negative(run, routes, ref_loss, results)
        if "r2" in checks:
            check_r2(run, formats, results)
        if "consumption" in checks:
            check_consumption(run, routes, results)
        if "orphan" in checks:
            check_orphan(run, results)
    if "recompute" in checks:
        check_recompute(layout, results, args.fixed_seq)
    results["seconds"] = time.perf_counter() - start
    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps(results), flush=True)
    comm.barrier()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The trainer-path exactness check: the real Trainer and Policy on fixed rollout batches, against a
single-process fp64 plain-PyTorch reference that applies the same optimizer updates.

Run under torchrun (or alone for one process)::

    torchrun --nproc-per-node 2 -m megatron_vespo.parity.trainer_path --layout tp2 --work DIR --json-out OUT

For each routing-replay mode (none, r2, r3) it runs the trainer's real sequence of calls: Trainer
(model build, HF load, local engine start) -> rollout batch 1 -> advantages -> pi_old forward
(R2 records routes there; R3 replays the engine's) -> N optimizer steps -> weight sync to the engine
-> checkpoint -> rollout batch 2 -> N steps -> weight sync -> final checkpoint; then a second Trainer
resumes from the mid-run checkpoint (as after a kill) and trains batch 2 again. Only the engine's
sampling is replaced: ``generate_batch`` returns fixed batches (samples, rewards, engine log-probs and
routed experts), so nothing is left to chance.

At every optimizer step every rank compares with the reference: the loss, every gradient before
clipping (its local slice of each HF tensor, replicated parameters included) and every updated
parameter (as its update since the start); the mini-batch split, the global grad norm and the
per-group norms. After every weight sync rank 0 compares the engine's weights with the
reference's parameters. The test model has a pad_token_id that a response samples mid-sequence,
so transformers' frozen padding row is checked on the way.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import sys
import warnings

import numpy as np
import torch

from megatron_vespo import comm
from megatron_vespo.batch import Sample
from megatron_vespo.mcore.grad_shards import owned_gradient_slices
from megatron_vespo.mcore.model import MoEModelConfig
from megatron_vespo.parity.reference import ReferenceMoE, init_hf_state, reference_loss
from megatron_vespo.parity.worker import relative_difference

MODES = ("none", "r2", "r3")
PAD = 3  # the test model's pad_token_id; one response samples it mid-sequence
SEED = 4321
ROLLOUT_BATCHES = 2
PROMPTS, GROUP, STALENESS, MICRO_BATCH = 4, 4, 2, 2  # 16 samples, 2 mini-batches of 8, micro-batches of 2
OPTIMIZER = dict(lr=3e-3, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.99, adam_eps=1e-8, clip_grad=0.5)
ADVANTAGE_EPS = 1e-6


def model_config() -> MoEModelConfig:
    """The parity model (a dense first layer, 8 experts top-2, GQA, q/k norms) with a padding id."""
    return MoEModelConfig(
        vocab_size=256, hidden_size=48, num_layers=4, num_attention_heads=4, num_query_groups=2,
        head_dim=12, ffn_hidden_size=64, moe_ffn_hidden_size=24, num_experts=8, moe_router_topk=2,
        dense_layers=(0,), rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=64, padding_idx=PAD,
    )


def write_hf_model(directory: str, m: MoEModelConfig) -> None:
    """A Hugging Face Qwen3-MoE directory with the parity's seeded weights."""
    import transformers as tf
    from safetensors.torch import save_file

    config = tf.Qwen3MoeConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_query_groups, head_dim=m.head_dim,
        intermediate_size=m.ffn_hidden_size, moe_intermediate_size=m.moe_ffn_hidden_size,
        num_experts=m.num_experts, num_experts_per_tok=m.moe_router_topk, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=list(m.dense_layers), rms_norm_eps=m.rms_norm_eps,
        max_position_embeddings=m.max_position_embeddings, tie_word_embeddings=False, pad_token_id=m.padding_idx,
        bos_token_id=1, eos_token_id=2)
    config.rope_parameters = {"rope_type": "default", "rope_theta": m.rope_theta}
    os.makedirs(directory, exist_ok=True)
    config.save_pretrained(directory)
    state = {name: tensor.float().contiguous() for name, tensor in init_hf_state(m, SEED).items()}
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})


# -- the fixed rollout batches -------------------------------------------------------------------


def fixed_batches(m: MoEModelConfig, reference: ReferenceMoE) -> list:
    """Rollout batches as the engine would return them: uneven prompts and responses (one with PAD
    inside), finish reasons, engine log-probs near the policy's, routed experts (dense layers zero,
    one row fewer than tokens) and rewards with one all-equal group (advantages 0)."""
    from megatron_vespo.rollout.client import RolloutSample
    from megatron_vespo.train.trainer import RolloutBatch

    gen = torch.Generator().manual_seed(SEED + 7)
    batches = []
    for b in range(ROLLOUT_BATCHES):
        samples, rewards = [], []
        for p in range(PROMPTS):
            prompt = torch.randint(4, m.vocab_size, (int(torch.randint(3, 9, (1,), generator=gen)),), generator=gen)
            group_rewards = [0.5] * GROUP if p == 1 else \
                [float(v) for v in torch.randint(0, 3, (GROUP,), generator=gen) / 2]
            for j in range(GROUP):
                response = torch.randint(4, m.vocab_size, (int(torch.randint(2, 13, (1,), generator=gen)),),
                                         generator=gen)
                if b == 0 and p == 0 and j == 1:
                    response[response.numel() // 2] = PAD
                tokens = torch.cat([prompt, response])
                sample = Sample(tokens=tokens, prompt_len=prompt.numel(), advantage=0.0, old_logprobs=None)
                with torch.no_grad():
                    current = reference.response_logprobs(sample).float()
                engine = (current + 0.05 * torch.randn(current.shape, generator=gen)).clamp(max=0.0)
                routes = torch.rand((tokens.numel() - 1, m.num_layers, m.num_experts), generator=gen)
                routes = routes.argsort(dim=-1)[..., :m.moe_router_topk].to(torch.int32)
                routes[:, list(m.dense_layers)] = 0
                samples.append(RolloutSample(
                    index=p, prompt_ids=prompt.tolist(), response_ids=response.tolist(),
                    engine_logprobs=engine.numpy(), finish_reason="stop" if j % 2 else "length",
                    weight_version=f"v{b}", routed_experts=routes.numpy()))
                rewards.append(group_rewards[j])
        batches.append(RolloutBatch(index=b, first_uid=b * PROMPTS, samples=samples, rewards=rewards, seconds=0.0,
                                    next_uid=(b + 1) * PROMPTS))
    return batches


# -- the reference -------------------------------------------------------------------------------


def pad_routes(routes: np.ndarray, length: int) -> torch.Tensor:
    """Engine routes have one row fewer than tokens: the last token reuses the row before it (its
    output feeds no loss)."""
    routes = torch.as_tensor(routes, dtype=torch.long)
    return torch.cat([routes, routes[-1:]]) if routes.shape[0] == length - 1 else routes


class ReferenceTrainer:
    """fp64, one process, plain PyTorch: the loop the trainer runs, written out."""

    def __init__(self, m: MoEModelConfig, initial: dict[str, torch.Tensor], loss_cfg, mode: str):
        self.m, self.loss_cfg, self.mode = m, loss_cfg, mode
        self.params = {k: v.double().clone() for k, v in initial.items()}
        self.initial = {k: v.double() for k, v in initial.items()}  # the KL term's reference policy
        self.exp_avg = {k: torch.zeros_like(v) for k, v in self.params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(v) for k, v in self.params.items()}
        self.t = 0
        self.steps: list[dict] = []

    def rollout_batch(self, batch) -> None:
        rewards = torch.tensor(batch.rewards, dtype=torch.float64).view(-1, GROUP)
        advantages = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + ADVANTAGE_EPS)
        samples = [Sample.from_rollout(s, float(a)) for s, a in zip(batch.samples, advantages.flatten())]
        model = ReferenceMoE(self.m, self.params)
        routes = None
        if self.mode == "r3":
            routes = {i: pad_routes(s.routed_experts, samples[i].tokens.numel()) for i, s in enumerate(batch.samples)}
        with torch.no_grad():
            if self.mode == "r2":  # record the routes the routers choose in the pi_old forward
                routes = {}
                for i, s in enumerate(samples):
                    chosen = []
                    model.forward(s.tokens, routes_out=chosen)
                    table = torch.zeros((s.tokens.numel(), self.m.num_layers, self.m.moe_router_topk), dtype=torch.long)
                    for layer, top_idx in chosen:
                        table[:, layer] = top_idx
                    routes[i] = table
            for i, s in enumerate(samples):
                s.old_logprobs = model.response_logprobs(s, self.loss_cfg.temperature,
                                                         None if routes is None else routes[i])
            if self.loss_cfg.kl_coef > 0:
                start = ReferenceMoE(self.m, self.initial)
                for s in samples:
                    s.ref_logprobs = start.response_logprobs(s, self.loss_cfg.temperature)
        size = len(samples) // STALENESS  # grouped mini-batches: contiguous blocks in order
        for start in range(0, len(samples), size):
            self.step(samples, list(range(start, start + size)), routes)

    def step(self, samples, ids, routes) -> None:
        state = {k: v.clone().requires_grad_(True) for k, v in self.params.items()}
        loss = reference_loss(ReferenceMoE(self.m, state), samples, [ids], self.loss_cfg, routes)
        loss.backward()
        grads = {k: v.grad.detach().clone() if v.grad is not None else torch.zeros_like(v) for k, v in state.items()}
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
        clip = OPTIMIZER["clip_grad"] / (norm + 1e-6)  # Megatron's clip_grad_by_total_norm_fp32
        self.t += 1
        lr, b1, b2, eps = OPTIMIZER["lr"], OPTIMIZER["adam_beta1"], OPTIMIZER["adam_beta2"], OPTIMIZER["adam_eps"]
        for name, p in self.params.items():  # torch.optim.AdamW, decoupled decay off for 1-D params
            g = grads[name] * clip if clip < 1.0 else grads[name]
            if p.dim() > 1:
                p.mul_(1 - lr * OPTIMIZER["weight_decay"])
            self.exp_avg[name].mul_(b1).add_(g, alpha=1 - b1)
            self.exp_avg_sq[name].mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (self.exp_avg_sq[name].sqrt() / math.sqrt(1 - b2 ** self.t)).add_(eps)
            p.addcdiv_(self.exp_avg[name], denom, value=-lr / (1 - b1 ** self.t))
        self.steps.append(dict(ids=ids, loss=float(loss.detach()), grads=grads, grad_norm=norm,
                               params={k: v.clone() for k, v in self.params.items()}))


# -- the trainer under test ------------------------------------------------------------------------


def train_config(work: str, hf_dir: str, mode: str, layout, negative_control: bool = False,
                 extra: tuple[str, ...] = ()):
    """The trainer's config for this check; ``negative_control`` makes the trainer use the
    population std for advantages (a factor sqrt(n / (n - 1)) off): the check must fail."""
    from megatron_vespo.train.config import load_config

    overrides = [
        f"model.hf_dir={hf_dir}", f"model.tp={layout.tp}", f"model.pp={layout.pp}", f"model.cp={layout.cp}",
        f"model.ep={layout.ep}", f"model.etp={layout.expert_tp}", "model.params_dtype=float32",
        "data.task=synthetic", f"rollout.prompts_per_batch={PROMPTS}", f"rollout.group_size={GROUP}",
        "rollout.engine=local", "rollout.local_dtype=float32", "rollout.weight_sync=inprocess",
        "rollout.temperature=1.0", "algorithm.loss.name=vespo", "algorithm.loss.correction=fold",
        "algorithm.loss.aggregation=token_mean", f"algorithm.staleness={STALENESS}",
        f"algorithm.micro_batch_size={MICRO_BATCH}", "algorithm.advantage=grpo",
        f"algorithm.advantage_eps={ADVANTAGE_EPS}",
        f"algorithm.advantage_std={'population' if negative_control else 'unbiased'}",
        "algorithm.mini_batch_order=grouped", "algorithm.pi_old=recompute", f"algorithm.routing_replay={mode}",
        f"run.run_dir={os.path.join(work, 'runs', mode)}", f"run.steps={ROLLOUT_BATCHES * STALENESS}",
        f"run.seed={SEED}", f"run.save_every={STALENESS}", "run.tensorboard=false", "run.plot=false",
        "optimizer.min_lr=0.0", "optimizer.warmup_steps=0",
    ] + [f"optimizer.{k}={v}" for k, v in OPTIMIZER.items()] + list(extra)
    return load_config(None, overrides)


class FixedRolloutTrainer:
    """The real Trainer whose engine answers are the fixed batches (everything else untouched)."""

    @staticmethod
    def build(cfg, batches):
        from megatron_vespo.train.trainer import Trainer

        class _Trainer(Trainer):
            def generate_batch(self, index: int, first_uid: int):
                batch = batches[index]
                assert batch.first_uid == first_uid, (batch.first_uid, first_uid)
                return dataclasses.replace(batch, samples=[dataclasses.replace(s) for s in batch.samples])

        return _Trainer(cfg)


def _local_items(trainer, m):
    from megatron_vespo.mcore.weights import ShardContext

    for chunk in trainer.policy.chunks:
        ctx = ShardContext.from_model(chunk, m)
        for name, param in chunk.named_parameters():
            yield name, param, ctx


def observe(trainer, m, initial, record: list) -> None:
    """Wrap the policy's train_step and optimizer step to capture what the check compares."""
    from megatron_vespo.mcore.weights import local_tensor

    policy = trainer.policy
    start = {name: local_tensor(name, initial, ctx).double() for name, _, ctx in _local_items(trainer, m)}
    real_step, real_train_step = policy.optimizer.step, policy.train_step
    owned = owned_gradient_slices(policy.models)
    current = {}

    def step():
        # compared on the host in fp64, where the reference lives (the model may be on a GPU)
        # with the distributed optimizer a rank holds the reduced gradient of its slices only
        current["grads"] = {}
        for name, p, _ in _local_items(trainer, m):
            grad = (p.main_grad if getattr(p, "main_grad", None) is not None else p.grad).detach()
            first, last = (0, grad.numel()) if owned is None else owned.get(p, (0, grad.numel()))
            current["grads"][name] = (grad.reshape(-1)[first:last].to("cpu", torch.float64, copy=True), (first, last))
        key = "embedding.word_embeddings.weight"
        if m.padding_idx is not None and key in current["grads"]:  # the pad row's gradient (the part held here)
            flat, (first, last) = current["grads"][key]
            embedding = policy.chunks[0].embedding.word_embeddings
            hidden, row = embedding.weight.shape[1], m.padding_idx - embedding.vocab_start_index
            low, high = max(row * hidden, first), min((row + 1) * hidden, last)
            if 0 <= row < embedding.weight.shape[0] and low < high:
                current["pad_row_grad"] = float(flat[low - first:high - first].abs().max())
        out = real_step()
        policy.synchronize_parameters()  # overlap_param_gather: the gather the next forward would do
        current["updates"] = {name: p.detach().to("cpu", torch.float64) - start[name]
                              for name, p, _ in _local_items(trainer, m)}
        return out

    real_micro_batches = policy._micro_batches

    def micro_batches(*args, **kwargs):  # the widths (sequence dimension) of this rank's last micro-batches
        out = real_micro_batches(*args, **kwargs)
        current["widths"] = [int(mb.tokens.shape[1]) for mb in out[0]]
        return out

    policy._micro_batches = micro_batches

    def train_step(samples, ids, routes=None):
        metrics = real_train_step(samples, ids, routes)
        record.append(dict(ids=list(ids), metrics=metrics, **current))
        current.clear()
        return metrics

    policy.optimizer.step, policy.train_step = step, train_step


def compare_step(got: dict, want: dict, initial: dict, trainer, m) -> dict:
    from megatron_vespo.mcore.weights import local_tensor

    worst = {"grad": (0.0, ""), "update": (0.0, "")}
    for name, _, ctx in _local_items(trainer, m):
        grad, (first, last) = got["grads"][name]
        for key, mine, theirs in (("grad", grad, local_tensor(name, want["grads"], ctx).reshape(-1)[first:last]),
                                  ("update", got["updates"][name],
                                   local_tensor(name, want["params"], ctx) - local_tensor(name, initial, ctx))):
            diff = relative_difference(mine, theirs)
            if diff > worst[key][0] or not math.isfinite(diff):
                worst[key] = (diff, name)
    metrics = got["metrics"]
    norms = [v for k, v in metrics.items() if k.startswith("grad_norm/") and "embedding_max_row" not in k]
    return dict(
        ids_equal=got["ids"] == want["ids"],
        loss=metrics["policy_loss"], ref_loss=want["loss"], loss_abs_diff=abs(metrics["policy_loss"] - want["loss"]),
        grad_norm_rel_diff=abs(metrics["grad_norm"] - want["grad_norm"]) / want["grad_norm"],
        group_norms_rel_diff=abs(math.sqrt(sum(v * v for v in norms)) - metrics["grad_norm"]) / metrics["grad_norm"],
        grad_rel_diff=worst["grad"][0], grad_worst=worst["grad"][1],
        update_rel_diff=worst["update"][0], update_worst=worst["update"][1],
        pad_row_grad=got.get("pad_row_grad"), widths=got["widths"],
    )


def engine_difference(trainer, want_params: dict, initial: dict) -> tuple[float, str]:
    """Rank 0: the engine's weights after a sync against the reference (as updates since the start)."""
    engine = trainer.server.engine
    worst = (0.0, "")
    for name, value in want_params.items():
        diff = relative_difference(engine.hf_weight(name).double() - initial[name], value - initial[name])
        if diff > worst[0] or not math.isfinite(diff):
            worst = (diff, name)
    return worst


def run_mode(args, layout, m, hf_dir, initial, batches, reference, mode) -> list[dict]:
    """The whole sequence for one replay mode; returns one row per compared event (rank 0)."""
    rank = torch.distributed.get_rank()
    rows = []
    cfg = train_config(args.work, hf_dir, mode, layout, args.negative_control, tuple(args.override))
    run_dir = cfg.run.run_dir
    if rank == 0 and os.path.exists(run_dir):
        shutil.rmtree(run_dir)
    comm.barrier()
    for phase in ("fresh", "resumed"):
        if phase == "resumed":
            cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, resume=True))
            if rank == 0:  # as after a kill: the run's last checkpoint is the mid-run one
                shutil.rmtree(os.path.join(run_dir, "checkpoints", f"step-{ROLLOUT_BATCHES * STALENESS}"))
            comm.barrier()
        trainer = FixedRolloutTrainer.build(cfg.validate(), batches)
        record: list[dict] = []
        syncs: list[int] = []
        try:
            observe(trainer, m, initial, record)
            real_sync = trainer._sync_weights

            def sync(new_version: bool = True):
                real_sync(new_version)
                syncs.append(trainer.step)
                if rank == 0:
                    want = initial if trainer.step == 0 else reference.steps[trainer.step - 1]["params"]
                    diff, name = engine_difference(trainer, want, initial)
                    rows.append(dict(mode=mode, phase=phase, event="weight_sync", step=trainer.step,
                                     engine_rel_diff=diff, engine_worst=name))

            trainer._sync_weights = sync
            trainer.setup()
            first_step = trainer.step
            trainer.run()
        finally:
            trainer.close()
        expected_first = 0 if phase == "fresh" else STALENESS
        if first_step != expected_first:
            raise RuntimeError(f"{mode}/{phase}: the trainer started at step {first_step}, expected {expected_first}")
        for offset, got in enumerate(record):
            step = first_step + offset + 1
            result = compare_step(got, reference.steps[step - 1], initial, trainer, m)
            per_rank = comm.gather_objects(result)
            if rank == 0:
                merged = dict(mode=mode, phase=phase, event="optimizer_step", step=step)
                merged.update(loss=per_rank[0]["loss"], ref_loss=per_rank[0]["ref_loss"])
                for key in ("loss_abs_diff", "grad_norm_rel_diff", "group_norms_rel_diff"):
                    merged[key] = max(r[key] for r in per_rank)
                for key in ("grad", "update"):
                    worst = max(range(len(per_rank)), key=lambda i: per_rank[i][f"{key}_rel_diff"])
                    merged[f"{key}_rel_diff"] = per_rank[worst][f"{key}_rel_diff"]
                    merged[f"{key}_worst"] = f"rank{worst}:{per_rank[worst][f'{key}_worst']}"
                merged["ids_equal"] = all(r["ids_equal"] for r in per_rank)
                pads = [r["pad_row_grad"] for r in per_rank if r["pad_row_grad"] is not None]
                merged["pad_row_grad"] = max(pads) if pads else None
                merged["micro_batch_widths"] = [r["widths"] for r in per_rank]  # per rank, CP-local
                rows.append(merged)
        if len(record) != ROLLOUT_BATCHES * STALENESS - expected_first:
            raise RuntimeError(f"{mode}/{phase}: {len(record)} optimizer steps ran")
    return rows


def run(args) -> dict | None:
    from megatron_vespo.mcore.parallel import Layout, init_distributed
    from megatron_vespo.mcore.weights import SafetensorsSource, hf_names

    init_distributed()
    rank = torch.distributed.get_rank()
    layout = Layout.parse(args.layout)
    m = model_config()
    hf_dir = os.path.join(args.work, "model")
    if rank == 0 and not os.path.exists(os.path.join(hf_dir, "model.safetensors")):
        write_hf_model(hf_dir, m)
    comm.barrier()
    source = SafetensorsSource(hf_dir)
    initial = {name: source.read(name).double() for name in hf_names(m)}
    references, batches = None, None
    if rank == 0:
        batches = fixed_batches(m, ReferenceMoE(m, initial))
        loss_cfg = train_config(args.work, hf_dir, "none", Layout(), extra=tuple(args.override)).validate().algorithm.loss
        references = {}
        for mode in args.modes.split(","):
            reference = ReferenceTrainer(m, initial, loss_cfg, mode)
            for batch in batches:
                reference.rollout_batch(batch)
            references[mode] = reference
    batches = comm.broadcast_object(batches)
    references = comm.broadcast_object(references)
    rows = []
    for mode in args.modes.split(","):
        rows += run_mode(args, layout, m, hf_dir, initial, batches, references[mode], mode)
    if rank == 0:
        return dict(layout=args.layout, world_size=torch.distributed.get_world_size(), rows=rows)
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", default="single")
    parser.add_argument("--modes", default=",".join(MODES), help="routing replay modes: none,r2,r3")
    parser.add_argument("--work", required=True, help="a directory for the model, runs and checkpoints")
    parser.add_argument("--json-out", required=True)
    parser.add_argument("--negative-control", action="store_true",
                        help="the trainer uses population-std advantages; every comparison must then fail")
    parser.add_argument("--override", action="append", default=[],
                        help="a trainer config override (section.key=value), e.g. optimizer.overlap_grad_reduce=true")
    args = parser.parse_args(argv)
    for mode in args.modes.split(","):
        if mode not in MODES:
            parser.error(f"unknown routing replay mode {mode!r}; choose from {MODES}")
    warnings.filterwarnings("ignore", module="megatron")
    from megatron_vespo.parity.worker import finish

    finish(run(args), args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

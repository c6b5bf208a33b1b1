"""A single-process plain-PyTorch reference: a Qwen3-MoE-shaped model and the policy loss.

No Megatron code is used here: the model reads Hugging Face-named tensors, runs each sequence
on its own (positions 0..L-1, full causal attention, per-token top-k routing) and scores the
responses with ``log_softmax(logits / T)`` over the full vocabulary. It is the yardstick for
every distributed layout of the hook.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatron_vespo import losses
from megatron_vespo.batch import Sample
from megatron_vespo.losses import LossConfig, SequenceStats, TokenBatch
from megatron_vespo.mcore.model import MoEModelConfig
from megatron_vespo.mcore.weights import hf_shapes


def init_hf_state(m: MoEModelConfig, seed: int, std: float = 0.08) -> dict[str, torch.Tensor]:
    """Seeded random weights under HF names (norm gains around 1, decisive routers)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in hf_shapes(m).items():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("mlp.gate.weight"):
            state[name] = 0.5 * torch.randn(shape, generator=gen)
        else:
            state[name] = std * torch.randn(shape, generator=gen)
    return state


def _acc(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 (the reference may run in fp64 to be a sharper yardstick)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _rms_norm(x, weight, eps):
    x32 = _acc(x)
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class ReferenceMoE:
    """Forward of one sequence from HF-named tensors (which may require grad)."""

    def __init__(self, m: MoEModelConfig, state: dict[str, torch.Tensor]):
        self.m, self.w = m, state

    def rope(self, length: int):
        d = self.m.head_dim
        inv_freq = 1.0 / (self.m.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    def attention(self, x, i, cos, sin):
        m, w, p = self.m, self.w, f"model.layers.{i}.self_attn."
        L, d = x.shape[0], m.head_dim
        q = (x @ w[p + "q_proj.weight"].T).view(L, m.num_attention_heads, d)
        k = (x @ w[p + "k_proj.weight"].T).view(L, m.num_query_groups, d)
        v = (x @ w[p + "v_proj.weight"].T).view(L, m.num_query_groups, d)
        if m.qk_layernorm:
            q = _rms_norm(q, w[p + "q_norm.weight"], m.rms_norm_eps)
            k = _rms_norm(k, w[p + "k_norm.weight"], m.rms_norm_eps)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
        rep = m.num_attention_heads // m.num_query_groups
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        probs = torch.softmax(_acc(scores.masked_fill(~causal, float("-inf"))), dim=-1).to(v.dtype)
        out = torch.einsum("hqk,khd->qhd", probs, v).reshape(L, -1)
        return out @ w[p + "o_proj.weight"].T

    def mlp(self, x, prefix):
        gate = x @ self.w[prefix + "gate_proj.weight"].T
        up = x @ self.w[prefix + "up_proj.weight"].T
        return (F.silu(gate) * up) @ self.w[prefix + "down_proj.weight"].T

    def moe(self, x, i, routes=None):
        """MoE block of layer ``i``; ``routes`` [L, top_k] forces the experts (routing replay):
        their probabilities are the softmax over the forced experts' router logits."""
        m, p = self.m, f"model.layers.{i}.mlp."
        router_logits = _acc(x) @ _acc(self.w[p + "gate.weight"]).T
        if routes is None:
            top_vals, top_idx = torch.topk(router_logits, m.moe_router_topk, dim=-1)
        else:
            top_idx = torch.as_tensor(routes).to(torch.long)
            top_vals = router_logits.gather(1, top_idx)
        probs = torch.softmax(top_vals, dim=-1).to(x.dtype)
        out = torch.zeros_like(x)
        for e in range(m.num_experts):
            rows, slot = (top_idx == e).nonzero(as_tuple=True)
            if rows.numel():
                y = self.mlp(x[rows], p + f"experts.{e}.")
                out = out.index_add(0, rows, y * probs[rows, slot].unsqueeze(1))
        return out, top_idx

    def forward(self, tokens: torch.Tensor, routes=None, routes_out: list | None = None) -> torch.Tensor:
        """Logits [L, vocab]. ``routes`` [L, num_layers, top_k] (global layer ids; dense layers
        ignored) forces each MoE layer's experts; ``routes_out``, when a list, receives
        ``(layer, top_idx [L, top_k])`` for every MoE layer."""
        m, w = self.m, self.w
        x = w["model.embed_tokens.weight"][tokens]
        if m.padding_idx is not None:  # transformers' padding_idx: that row gets no lookup gradient
            x = torch.where((tokens == m.padding_idx).unsqueeze(1), x.detach(), x)
        cos, sin = self.rope(tokens.numel())
        for i in range(m.num_layers):
            p = f"model.layers.{i}."
            x = x + self.attention(_rms_norm(x, w[p + "input_layernorm.weight"], m.rms_norm_eps), i, cos, sin)
            h = _rms_norm(x, w[p + "post_attention_layernorm.weight"], m.rms_norm_eps)
            if i in m.dense_layers:
                x = x + self.mlp(h, p + "mlp.")
                continue
            out, top_idx = self.moe(h, i, None if routes is None else torch.as_tensor(routes)[:, i])
            if routes_out is not None:
                routes_out.append((i, top_idx.detach()))
            x = x + out
        x = _rms_norm(x, w["model.norm.weight"], m.rms_norm_eps)
        return x @ w["lm_head.weight"].T

    def response_logprobs(self, sample: Sample, temperature: float = 1.0, routes=None,
                          with_entropy: bool = False):
        """log p of the response tokens ([response_len]); with ``with_entropy`` also each
        position's entropy of the whole softmax."""
        logits = self.forward(sample.tokens, routes=routes)
        logp = torch.log_softmax(_acc(logits) / temperature, dim=-1)
        positions = torch.arange(sample.prompt_len - 1, sample.tokens.numel() - 1)
        picked = logp[positions, sample.tokens[positions + 1]]
        if not with_entropy:
            return picked
        return picked, -torch.special.xlogy(logp[positions].exp(), logp[positions].exp()).sum(-1)


def reference_loss(model: ReferenceMoE, samples: list[Sample], micro_batches: list[list[int]],
                   cfg: LossConfig, routes: dict | None = None) -> torch.Tensor:
    """Global loss over micro-batches (each a list of sample ids), as Megatron normalises it;
    ``routes[sample id]`` ([L, layers, top_k]) forces the experts (routing replay)."""
    total, normaliser = 0.0, 0.0
    for ids in micro_batches:
        logps, entropies, olds, engines, refs, masks, seq_index = [], [], [], [], [], [], []
        for j, sid in enumerate(ids):
            s = samples[sid]
            logp_j, entropy_j = model.response_logprobs(s, cfg.temperature, None if routes is None else routes[sid],
                                                        with_entropy=True)
            logps.append(logp_j)
            entropies.append(entropy_j)
            olds.append(s.old_logprobs if s.old_logprobs is not None else s.engine_logprobs)
            engines.append(s.engine_logprobs)
            refs.append(s.ref_logprobs)
            masks.append(torch.full((s.response_len,), 1.0 if s.trained else 0.0))
            seq_index.append(torch.full((s.response_len,), j, dtype=torch.long))
        logp = torch.cat(logps)
        engine = None if any(e is None for e in engines) else torch.cat(engines).to(logp.dtype)
        ref = None if any(r is None for r in refs) else torch.cat(refs).to(logp.dtype)
        old = torch.cat(olds).to(logp.dtype)
        if cfg.bypass:
            old, engine = engine, None
        mask = torch.cat(masks).to(logp.dtype)
        tokens = TokenBatch(logp, old, engine, mask, torch.cat(seq_index), ref)
        adv = torch.tensor([float(samples[sid].advantage) for sid in ids], dtype=logp.dtype)
        per_seq = lambda v: torch.zeros(len(ids), dtype=logp.dtype).index_add(0, tokens.seq_index, v.to(logp.dtype) * mask)  # noqa: E731
        extras = losses.sequence_sums_for(cfg, tokens, adv[tokens.seq_index])
        stats = SequenceStats(
            log_ratio_sum=per_seq(tokens.token_log_ratio().detach()),
            mismatch_sum=per_seq(tokens.token_mismatch()),
            token_count=per_seq(torch.ones_like(logp)),
            advantages=adv,
            extra={k: per_seq(v) for k, v in extras.items()},
        )
        out, weights, _ = losses.compute_loss(stats, tokens, cfg)
        loss_sum, count = losses.aggregate(out.per_token_loss, weights, tokens, stats, cfg.aggregation, True)
        extra, _ = losses.regularizer(tokens, torch.cat(entropies), cfg)
        if extra is not None:
            loss_sum = loss_sum + losses.aggregate(extra, torch.ones_like(extra), tokens, stats, cfg.aggregation,
                                                   True)[0]
        total = total + loss_sum
        normaliser += float(count)
    return total / normaliser

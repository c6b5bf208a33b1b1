"""Core attention for the local (non-TransformerEngine) spec with context parallelism and THD.

Megatron-Core's local ``DotProductAttention`` refuses context parallelism and packed sequences
(``transformer/dot_product_attention.py``); only TransformerEngine's attention supports them.
This module fills ``core_attention`` in the local spec so the whole model runs under CP on CPU:

* K/V are all-gathered over the CP group (differentiable: the backward reduce-scatters their
  grads), queries stay local;
* the causal mask is built from each token's true position in its sequence, recovered from
  Megatron's load-balanced 2*cp chunking (``batch.cp_chunk_index``);
* packed (THD) batches attend only within their own sequence (``cu_seqlens_q_padded``).

Memory is O(local tokens x all tokens) per head: meant for CPU tests and small runs. On GPUs the
TransformerEngine spec is used instead.
"""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide

from megatron_vespo import comm
from megatron_vespo.batch import cp_chunk_index


def _positions_and_segments(length: int, cu_seqlens_padded, cp_size: int, cp_rank: int):
    """Position in its sequence and sequence id of every token CP rank ``cp_rank`` holds."""
    if cu_seqlens_padded is None:
        pos = cp_chunk_index(length * cp_size, cp_size, cp_rank)
        return pos, torch.zeros_like(pos)
    bounds = cu_seqlens_padded.tolist()
    positions, segments = [], []
    for seg, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        pos = cp_chunk_index(b - a, cp_size, cp_rank)
        positions.append(pos)
        segments.append(torch.full_like(pos, seg))
    pos, seg = torch.cat(positions), torch.cat(segments)
    if pos.numel() != length:
        raise ValueError(
            f"packed attention: cu_seqlens_padded covers {pos.numel()} local tokens, input has {length}"
        )
    return pos, seg


class ContextParallelLocalAttention(MegatronModule):
    """Drop-in ``core_attention`` for the local spec: causal, GQA, CP and THD aware."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal and attn_mask_type != AttnMaskType.padding_causal:
            raise ValueError(f"ContextParallelLocalAttention supports causal masks only, got {attn_mask_type}")
        if (attention_dropout if attention_dropout is not None else config.attention_dropout) != 0:
            raise ValueError("ContextParallelLocalAttention has no attention dropout; set attention_dropout=0")
        tp = pg_collection.tp.size() if pg_collection is not None else parallel_state.get_tensor_model_parallel_world_size()
        self.cp_group = pg_collection.cp if pg_collection is not None else parallel_state.get_context_parallel_group()
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)

    def _attend(self, query, key, value, q_pos, k_pos, in_order: bool = False):
        """Causal attention of [sq, b, h, d] queries on [sk, b, h, d] keys at the given positions;
        ``in_order``: both are positions 0..s-1 (no CP), where torch's fused attention keeps no
        [s, s] scores for the backward (memory linear in s, not quadratic)."""
        q = query.permute(1, 2, 0, 3)  # [b, h, s, d]
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        if in_order:
            context = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                       scale=self.softmax_scale)
            context = context.permute(2, 0, 1, 3).contiguous()
            return context.view(context.shape[0], context.shape[1], self.heads * self.head_dim)
        allowed = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * self.softmax_scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        context = torch.matmul(probs, v).permute(2, 0, 1, 3).contiguous()  # [sq, b, h, d]
        return context.view(context.shape[0], context.shape[1], self.heads * self.head_dim)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by ContextParallelLocalAttention")
        if attention_mask is not None:
            raise ValueError("pass attention_mask=None: the causal mask is built from token positions")
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if thd:  # [t, h, d] -> [t, 1, h, d]
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        cp_size, cp_rank = comm.group_size(self.cp_group), comm.group_rank(self.cp_group)
        cu = None
        if thd:
            cu = packed_seq_params.cu_seqlens_q_padded
            if cu is None:
                cu = packed_seq_params.cu_seqlens_q
        local_len = query.shape[0]
        # positions and segments are worked out on the host (cu_seqlens copied once, no device sync
        # per sequence); what indexes or masks the scores is moved to where they live
        cu = cu.cpu() if cu is not None else None
        q_pos, q_seg = _positions_and_segments(local_len, cu, cp_size, cp_rank)
        key = comm.all_gather_first_dim_with_grad(key, self.cp_group)
        value = comm.all_gather_first_dim_with_grad(value, self.cp_group)
        kv = [_positions_and_segments(local_len, cu, cp_size, r) for r in range(cp_size)]
        k_pos = torch.cat([p for p, _ in kv])
        k_seg = torch.cat([s for _, s in kv])
        device = query.device
        repeat = self.heads // self.groups
        if repeat > 1:
            key = key.repeat_interleave(repeat, dim=2)
            value = value.repeat_interleave(repeat, dim=2)
        in_order = cp_size == 1  # every sequence's positions are 0..L-1 on the one rank
        if not thd:
            context = self._attend(query, key, value, q_pos.to(device), k_pos.to(device), in_order)
        else:
            # one sequence at a time: cost sum_i L_i^2, not (sum_i L_i)^2
            pieces = []
            for seg in range(int(q_seg.max()) + 1 if q_seg.numel() else 0):
                q_idx = (q_seg == seg).nonzero().squeeze(1)
                k_idx = (k_seg == seg).nonzero().squeeze(1)
                q_on, k_on = q_idx.to(device), k_idx.to(device)
                pieces.append(self._attend(query.index_select(0, q_on), key.index_select(0, k_on),
                                           value.index_select(0, k_on), q_pos[q_idx].to(device),
                                           k_pos[k_idx].to(device), in_order))
            context = torch.cat(pieces, dim=0)
        if thd:
            context = context.squeeze(1)
        return context

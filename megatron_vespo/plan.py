"""``megatron-vespo plan``: per-GPU memory of the trainer for a model, a layout and a micro-batch size.

For every pipeline rank the plan counts, in bytes, what the trainer's Megatron side holds
(``train/policy.py``: Megatron DDP with ``grad_reduce_in_fp32``, Megatron's Adam, the loss hook's
log-prob path) and reports the most loaded rank. All TP/CP/EP/DP ranks of one pipeline stage hold
the same amounts (balanced routing assumed, below), so the pipeline rank decides.

Notation: ``b`` bytes of the parameter dtype, ``H`` hidden size, ``V`` vocabulary, ``nq``/``nkv``
query heads / key-value groups, ``d`` head dim, ``F`` dense FFN size, ``Fm`` expert FFN size,
``E`` experts, ``k`` top-k, ``T`` = ``--max-tokens`` (tokens of one micro-batch on one data-parallel
rank), ``t = T / cp`` (this rank's tokens), ``s = t / tp`` (sequence-parallel rows: Megatron turns
sequence parallelism on whenever tp > 1), ``c = s * k * etp`` (expert token copies this rank's
experts process, routing balanced over experts), ``L`` longest sequence (``--sequence-length``).

Parameters (``b`` bytes each): per layer the QKV weight ``(nq + 2 nkv) d H / tp`` (+ bias),
``linear_proj`` ``nq d H / tp``, two RMSNorms ``H`` and the q/k norms ``d`` each (replicated over
TP); a dense MLP ``3 F H / tp``; an MoE layer the router ``E H`` (replicated) and ``E / ep`` local
experts of ``3 Fm H / etp`` (plus a shared expert ``3 S H / tp`` and its gate ``H``). The first
pipeline stage holds the embedding ``V H / tp``, the last the final norm and the output layer
``V H / tp`` (with tied embeddings and pp > 1 the last stage holds its own copy). Layers are split
evenly: virtual chunk ``j`` of pipeline rank ``r`` holds the ``L / (pp vpp)`` layers of stage ``j pp + r``.

Gradients: Megatron DDP with ``grad_reduce_in_fp32`` keeps an fp32 main grad for every local
parameter: ``4`` bytes each (bucket padding, < 64 elements a parameter, is left out).

Optimizer (Adam): two fp32 moments, plus an fp32 master copy when the parameters are 16-bit:
``8`` or ``12`` bytes a parameter. The distributed optimizer shards this over the data-parallel
group: dense parameters over ``dp * cp``, expert parameters over the expert data-parallel size
``world / (pp * ep * etp)``.

Activations: what autograd keeps for the backward of one micro-batch, per layer, summed over this
rank's layers and multiplied by the micro-batches in flight when the first backward starts:
``min(m, pp - r)`` for pipeline rank ``r`` (1F1B), ``min(m vpp, 2 (pp - r - 1) + (vpp - 1) pp + 1)``
chunk forwards with a virtual pipeline (averaged over the rank's chunks), 1 without a pipeline.
Per layer (elements times ``b`` unless stated), the ``te`` spec (TransformerEngine on GPUs: flash
attention, fused RoPE and SwiGLU, norms fused into the following linear where Megatron fuses them):

* attention: norm input and output ``2 s H``; the fused QKV output ``t (nq + 2 nkv) d / tp`` (V
  stays a view of it); the q/k norm inputs ``t (nq + nkv) d / tp`` (q/k layernorm only); the
  rotated q and k ``t (nq + nkv) d / tp``; the attention output ``t nq d / tp`` (also
  ``linear_proj``'s input); the softmax statistics ``4 t nq / tp`` bytes;
* dense MLP: norm input and output ``2 s H``, fc1 output ``2 t F / tp`` (SwiGLU's input), fc2 input
  ``t F / tp``;
* MoE: norm input and output ``2 s H`` (the output is the router's input), routing
  ``s k (8 + 4)`` bytes (top-k indices and fp32 probabilities; ``+ 4 s E`` with a softmax over all
  experts), the permuted tokens ``c H``, per token copy the fc1 output ``2 Fm / etp`` and fc2
  input ``Fm / etp`` plus its fp32 probability, and ``8 (E s + c)`` bytes of permutation indices;
  a shared expert adds ``3 t S / tp + s H``.

The ``local`` spec (the CPU/local layer spec this project uses without TransformerEngine; what the
CPU measurement checks) keeps more: torch's RMSNorm keeps its input and the normalised tensor and
the next linear its output (``3 s H``); q's norm input is a copy and both q/k norms keep their
normalised tensor; RoPE keeps cos and sin for q and k ``4 t d``; its core attention
(``mcore/attention.py``) keeps per sequence q and the GQA-repeated, CP-gathered k and v
(``t (nq + 2 cp nq) d / tp``); under CP also the fp32 softmax ``4 t L nq / tp`` bytes (``+ b``
more for its 16-bit copy) and the mask ``t L`` bytes, without CP (torch's fused attention) its
output ``t nq d / tp`` and the fp32 log-sum-exp ``4 t nq / tp`` instead; the unfused SwiGLU keeps fc1's output, silu's output
and the linear half plus the fc2 input: ``5 F`` per token (``6 Fm`` per expert copy, the
probability-scaled copy included).

``--recompute full`` (Megatron ``recompute_granularity=full``, uniform, one layer at a time, as
``model.recompute`` sets): only each layer's input ``s H`` is kept per micro-batch; the backward
recomputes one layer at a time, so one layer's activations (the largest on the rank) exist again
while its backward runs: the "recompute working set".

Log-prob path (last stage): the logits of one micro-batch ``t V / tp`` (parameter dtype; the loss
writes their gradient into their own memory, so no second copy); the loss hook's chunk workspace
(``logprobs.py``, torch path: chunks of up to ``CHUNK_BYTES`` of fp32 rows, cached between calls:
one buffer for fp32 logits, two for 16-bit ones; a chunk is a run of consecutive response rows, so
it ends with each sequence (``L``) unless CP splits the sequences, whose middle pieces join across
sequences); and the larger of the chunk's product in the forward (one more chunk) and the output
layer's backward, which runs while the logits and their gradient are alive: its weight gradient
``V H / tp`` (parameter dtype, before DDP adds it to the fp32 main grad) and the input gradient
``t H`` (twice with sequence parallelism: the re-gathered input). The GPU's Triton path needs no
chunk buffers; the plan keeps them as margin.

One layer's transients: what a layer's forward or backward holds besides the kept activations (the
gradients of its largest intermediates; in an MoE forward the expert outputs before the combine):
``2 c H + s H`` for MoE, ``3 t F / tp + s H`` for a dense MLP, ``2 t (nq + 2 nkv) d / tp + s H``
for attention (local spec: the repeated, gathered k and v), the largest over the rank's layers.

Peak: the model state plus the largest of three moments of a step: the loss (last stage:
activations + log-prob path), a layer (activations + recompute working set + one layer's
transients, + the cached workspace on the last stage) and the first stage's last backward (the first
layer's activations and transients and the embedding's weight gradient ``V H / tp``).

Checked against real CPU steps (``benchmarks/bench_plan.py``, docs/PERFORMANCE.md): the ``local``
terms and everything outside the layers are measured there; the ``te`` terms are read from
Megatron-Core 0.19 / TransformerEngine and not measured (no GPU). Not modelled: routing imbalance
(a rank whose experts receive more than their share of tokens holds more), NCCL/CUDA buffers and
fragmentation (the verdict's reserve), the scoring (pi_old) pass (forward only, chunked from hidden
states: far below the training step).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from megatron_vespo.logprobs import CHUNK_BYTES
from megatron_vespo.mcore.model import MoEModelConfig
from megatron_vespo.mcore.parallel import Layout

GIB = 2**30
DTYPE_BYTES = {"bfloat16": 2, "float32": 4}  # what the trainer runs (model.params_dtype)
SPECS = ("te", "local")
RECOMPUTE = ("none", "full")
# what the verdict keeps free besides the modelled peak: the CUDA context and cuBLAS/TE workspaces
# (~1 GiB), NCCL communicators of the tp/pp/dp/ep/cp groups (~0.5 GiB each, several of them)
DEFAULT_RESERVE_GIB = 4.0
DEFAULT_FRAGMENTATION = 0.10  # PyTorch's caching allocator: blocks it holds but cannot reuse


@dataclass(frozen=True)
class PlanInput:
    model: MoEModelConfig
    layout: Layout  # dp resolved (Layout.for_world)
    max_tokens: int  # tokens of one micro-batch on one data-parallel rank, before the CP split
    params_dtype: str = "bfloat16"
    distributed_optimizer: bool = False
    recompute: str = "none"
    micro_batches: int | None = None  # per step and data-parallel rank; None: enough to fill the pipeline
    spec: str = "te"
    sequence_length: int | None = None  # longest sequence (local attention, workspace rows); None: max_tokens
    reference_model: bool = False  # algorithm.kl_coef > 0: the frozen starting model, in the same layout

    def validate(self) -> "PlanInput":
        self.model.validate().check_layout(self.layout)
        self.layout.validate()
        if self.params_dtype not in DTYPE_BYTES:
            raise ValueError(f"params dtype {self.params_dtype!r}: choose one of {sorted(DTYPE_BYTES)}")
        if self.spec not in SPECS:
            raise ValueError(f"spec {self.spec!r}: choose one of {SPECS}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute {self.recompute!r}: choose one of {RECOMPUTE}")
        for name in ("max_tokens", "micro_batches", "sequence_length"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if self.max_tokens < self.layout.cp:
            raise ValueError(f"max-tokens {self.max_tokens} is fewer than cp = {self.layout.cp} ranks share")
        return self

    @property
    def bytes(self) -> int:
        return DTYPE_BYTES[self.params_dtype]

    @property
    def tokens(self) -> int:
        """t: this CP rank's tokens of one micro-batch."""
        return math.ceil(self.max_tokens / self.layout.cp)

    @property
    def rows(self) -> float:
        """s: sequence-parallel rows (Megatron's SP is on whenever tp > 1)."""
        return self.tokens / self.layout.tp

    @property
    def longest(self) -> int:
        return min(self.sequence_length or self.max_tokens, self.max_tokens)


# -- parameters ------------------------------------------------------------------------------------


def expert_data_parallel(layout: Layout) -> int:
    """Megatron's expert data-parallel size: the ranks holding the same experts."""
    return layout.world_size // (layout.pp * layout.ep * layout.expert_tp)


def chunk_layers(m: MoEModelConfig, layout: Layout, pp_rank: int) -> list[list[int]]:
    """Layer ids of each model chunk of pipeline rank ``pp_rank`` (Megatron's even split)."""
    per_chunk = m.num_layers // (layout.pp * layout.vpp)
    return [list(range((j * layout.pp + pp_rank) * per_chunk, (j * layout.pp + pp_rank + 1) * per_chunk))
            for j in range(layout.vpp)]


def is_moe_layer(m: MoEModelConfig, layer: int) -> bool:
    return m.is_moe and layer not in m.dense_layers


def layer_parameters(m: MoEModelConfig, layout: Layout, layer: int) -> dict[str, tuple[int, str]]:
    """name -> (elements on one rank, "dense" | "expert") of one decoder layer."""
    tp, ep, etp = layout.tp, layout.ep, layout.expert_tp
    h, d = m.hidden_size, m.head_dim
    qkv_out = (m.num_attention_heads + 2 * m.num_query_groups) * d // tp
    out = {
        "input_layernorm": (h, "dense"),
        "linear_qkv": (qkv_out * h + (qkv_out if m.qkv_bias else 0), "dense"),
        "linear_proj": (h * m.num_attention_heads * d // tp, "dense"),
        "pre_mlp_layernorm": (h, "dense"),
    }
    if m.qk_layernorm:
        out["q_k_layernorm"] = (2 * d, "dense")
    if is_moe_layer(m, layer):
        out["router"] = (m.num_experts * h, "dense")
        out["experts"] = (m.num_experts // ep * 3 * m.moe_ffn_hidden_size // etp * h, "expert")
        if m.shared_expert_size:
            out["shared_expert"] = (3 * m.shared_expert_size // tp * h + (h if m.shared_expert_gate else 0),
                                    "dense")
    else:
        out["mlp"] = (3 * m.ffn_hidden_size // tp * h, "dense")
    return out


def rank_parameters(m: MoEModelConfig, layout: Layout, pp_rank: int) -> dict[str, int]:
    """{"dense": elements, "expert": elements, and the embedding/output parts} on pipeline rank ``pp_rank``."""
    counts = {"dense": 0, "expert": 0, "embedding": 0, "output_layer": 0, "layers": 0}
    for chunk in chunk_layers(m, layout, pp_rank):
        for layer in chunk:
            for count, kind in layer_parameters(m, layout, layer).values():
                counts[kind] += count
                counts["layers"] += count
    vocab_shard = m.vocab_size // layout.tp * m.hidden_size
    if pp_rank == 0:  # chunk 0 of rank 0 is the first stage
        counts["embedding"] = vocab_shard
    if pp_rank == layout.pp - 1:  # the last chunk of the last rank is the last stage
        # tied embeddings on one stage share the weight; across stages the last holds a copy
        counts["output_layer"] = vocab_shard if (not m.tie_word_embeddings or layout.pp > 1) else 0
        counts["dense"] += m.hidden_size  # final norm
    counts["dense"] += counts["embedding"] + counts["output_layer"]
    return counts


def total_parameters(m: MoEModelConfig) -> int:
    """All parameters of the model (one replica, unsharded): the Hugging Face model's count."""
    counts = rank_parameters(m, Layout(), 0)
    return counts["dense"] + counts["expert"]


# -- activations ----------------------------------------------------------------------------------


def layer_activations(p: PlanInput, layer: int) -> dict[str, float]:
    """Bytes autograd keeps for the backward of one layer and one micro-batch, by part."""
    m, lay, b = p.model, p.layout, p.bytes
    tp, etp, cp = lay.tp, lay.expert_tp, lay.cp
    t, s = p.tokens, p.rows
    h, d = m.hidden_size, m.head_dim
    nq, nkv = m.num_attention_heads / tp, m.num_query_groups / tp
    local = p.spec == "local"
    norm = (3 if local else 2) * s * h * b  # norm input + output (local: + the normalised tensor)
    parts = {"attention_norm": norm, "qkv": t * (nq + 2 * nkv) * d * b}
    if m.qk_layernorm:
        # te: the norms' (contiguous) inputs; local: q's input copy and both normalised tensors
        parts["qk_norm"] = t * (2 * nq + nkv if local else nq + nkv) * d * b
    if local:
        longest = p.longest
        parts["rope"] = 4 * t * d * b  # cos and sin of q and k, per sequence
        if cp == 1:  # torch's fused causal attention: q, repeated k, v, its output and the fp32 log-sum-exp
            parts["core_attention"] = 4 * t * nq * d * b + 4 * t * nq
        else:
            parts["core_attention"] = (t * nq * d * b + 2 * t * cp * nq * d * b  # q; repeated, gathered k, v
                                       + t * longest * nq * (4 + (b if b != 4 else 0))  # fp32 softmax (+ cast)
                                       + t * longest)  # the causal mask (bool)
        parts["attention_out"] = t * nq * d * b
    else:
        parts["rope_out"] = t * (nq + nkv) * d * b
        parts["attention_out"] = t * nq * d * b + 4 * t * nq  # output (linear_proj's input) + softmax stats
    if is_moe_layer(m, layer):
        k, e = m.moe_router_topk, m.num_experts
        copies = s * k * etp
        fm = m.moe_ffn_hidden_size / etp
        parts["moe_norm"] = norm
        parts["routing"] = s * k * 12 + (4 * s * e if m.router_pre_softmax else 0) + 8 * (e * s + copies)
        parts["experts"] = copies * (h * b + (6 if local else 3) * fm * b + 4)
        if m.shared_expert_size:
            parts["shared_expert"] = (5 if local else 3) * t * m.shared_expert_size / tp * b + s * h * b
    else:
        parts["mlp_norm"] = norm
        parts["mlp"] = (5 if local else 3) * t * m.ffn_hidden_size / tp * b
    return parts


def in_flight(p: PlanInput, pp_rank: int) -> float:
    """Micro-batches (model chunks' worth, averaged) whose activations a rank holds when its first
    backward starts: Megatron's warm-up forwards plus one."""
    pp, vpp = p.layout.pp, p.layout.vpp
    if pp == 1:
        return 1
    m = p.micro_batches or pp
    if vpp == 1:
        return min(m, pp - pp_rank)
    chunk_forwards = min(m * vpp, 2 * (pp - pp_rank - 1) + (vpp - 1) * pp + 1)
    return chunk_forwards / vpp  # in units of the rank's whole layer set


def layer_transient(p: PlanInput, layer: int) -> float:
    """Bytes one layer's forward or backward holds besides what is kept: the gradients of its
    largest intermediates (and, in an MoE layer's forward, the expert outputs before they are
    combined): two token-copy buffers ``2 c H`` and the layer output/gradient ``s H`` for MoE,
    ``3 t F / tp + s H`` for a dense MLP, ``2 t (nq + 2 nkv) d / tp + s H`` for attention."""
    m, lay, b = p.model, p.layout, p.bytes
    t, s, h = p.tokens, p.rows, m.hidden_size
    qkv = (m.num_attention_heads + 2 * m.num_query_groups) * m.head_dim / lay.tp
    if p.spec == "local":  # the local attention's k and v are GQA-repeated and CP-gathered
        qkv = (1 + 2 * lay.cp) * m.num_attention_heads * m.head_dim / lay.tp
    attention = 2 * t * qkv * b
    if is_moe_layer(m, layer):
        mlp = 2 * s * m.moe_router_topk * lay.expert_tp * h * b
    else:
        mlp = 3 * t * m.ffn_hidden_size / lay.tp * b
    return max(attention, mlp) + s * h * b


def logprob_parts(p: PlanInput) -> dict[str, float]:
    """The last stage's loss: logits, the hook's chunk buffers and the output layer's backward."""
    m, lay, b = p.model, p.layout, p.bytes
    t, vocab = p.tokens, m.vocab_size // lay.tp
    # a chunk is a run of consecutive response rows: it ends with each sequence (its last token has
    # no label) unless CP splits sequences, whose middle chunks then join across sequences
    rows = min(max(1, CHUNK_BYTES // (4 * vocab)), t if lay.cp > 1 else p.longest, t)
    chunk = rows * vocab * 4
    return {
        "logits": t * vocab * b,
        # cached between calls: exp(z) (and the fp32 copy of 16-bit logits)
        "workspace": chunk * (1 if b == 4 else 2),
        # whichever is larger: vecdot's product in the forward, or the output layer's backward
        # (its weight gradient before DDP adds it to the fp32 main grad, and the input gradient,
        # plus the re-gathered input with sequence parallelism)
        "transient": max(chunk, vocab * m.hidden_size * b + t * m.hidden_size * b * (2 if lay.tp > 1 else 1)),
    }


@dataclass
class RankPlan:
    pp_rank: int
    layers: list[int]
    first_stage: bool
    last_stage: bool
    parameter_count: dict[str, int]
    parameters: float
    gradients: float
    optimizer: float
    micro_batches_in_flight: float
    activations: float  # kept for the backward, all micro-batches in flight
    activations_per_micro_batch: float
    activation_parts: dict[str, float]  # one micro-batch, summed over the rank's layers
    recompute_working_set: float
    layer_transient: float  # the largest over the rank's layers
    logprob_path: float
    logprob_parts: dict[str, float] = field(default_factory=dict)
    embedding_grad: float = 0.0
    first_layer_end: float = 0.0  # the "embedding" moment of step_phases
    reference_parameters: float = 0.0  # the KL term's reference model (parameters only)

    @property
    def state(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.reference_parameters

    @property
    def step_phases(self) -> dict[str, float]:
        """Bytes over the model state at the three candidate peaks of a step:

        * loss: the last stage from the loss to the output layer's backward (kept + log-prob path);
        * layer: any layer's forward or backward (kept + the recomputed layer + its transients; the
          last stage still holds the cached workspace);
        * embedding: the first stage's last backward (the first layer's activations, its transients
          and the embedding's weight gradient)."""
        phases = {"layer": self.activations + self.recompute_working_set + self.layer_transient
                  + self.logprob_parts.get("workspace", 0.0)}
        if self.last_stage:
            phases["loss"] = self.activations + self.logprob_path
        if self.first_stage:
            phases["embedding"] = self.first_layer_end
        return phases

    @property
    def step_extra(self) -> float:
        """Peak over the model state during the forward/backward."""
        return max(self.step_phases.values())

    @property
    def peak_phase(self) -> str:
        phases = self.step_phases
        return max(phases, key=phases.get)

    @property
    def peak(self) -> float:
        return self.state + self.step_extra


def rank_plan(p: PlanInput, pp_rank: int) -> RankPlan:
    m, lay, b = p.model, p.layout, p.bytes
    counts = rank_parameters(m, lay, pp_rank)
    n_dense, n_expert = counts["dense"], counts["expert"]
    state_bytes = 8 if b == 4 else 12  # Adam m, v in fp32 (+ an fp32 master copy of 16-bit parameters)
    if p.distributed_optimizer:
        optimizer = state_bytes * (n_dense / (lay.data_parallel * lay.cp) + n_expert / expert_data_parallel(lay))
    else:
        optimizer = state_bytes * (n_dense + n_expert)
    layers = [i for chunk in chunk_layers(m, lay, pp_rank) for i in chunk]
    first, last = pp_rank == 0, pp_rank == lay.pp - 1
    parts: dict[str, float] = {}
    per_layer = {i: sum(layer_activations(p, i).values()) for i in layers}
    s, h = p.rows, m.hidden_size
    if p.recompute == "full":
        parts["layer_inputs"] = len(layers) * s * h * b
        working = max(per_layer.values(), default=0.0)
    else:
        for i in layers:
            for name, value in layer_activations(p, i).items():
                parts[name] = parts.get(name, 0.0) + value
        working = 0.0
    logprob: dict[str, float] = {}
    if last:
        parts["final_norm_and_output_input"] = (3 if p.spec == "local" else 2) * s * h * b
        logprob = logprob_parts(p)
    per_mb = sum(parts.values())
    flight = in_flight(p, pp_rank)
    transient = max((layer_transient(p, i) for i in layers), default=0.0)
    embedding_grad = m.vocab_size // lay.tp * h * b if first else 0.0
    first_layer_end = 0.0
    if first and layers:  # the last micro-batch's first layer (recomputed or kept), then the embedding
        first_layer_end = per_layer[layers[0]] + layer_transient(p, layers[0]) + embedding_grad
    return RankPlan(
        pp_rank=pp_rank, layers=layers, first_stage=first, last_stage=last, parameter_count=counts,
        parameters=(n_dense + n_expert) * b, gradients=(n_dense + n_expert) * 4, optimizer=optimizer,
        micro_batches_in_flight=flight, activations=flight * per_mb, activations_per_micro_batch=per_mb,
        activation_parts=parts, recompute_working_set=working, layer_transient=transient,
        logprob_path=sum(logprob.values()), logprob_parts=logprob, embedding_grad=embedding_grad,
        first_layer_end=first_layer_end, reference_parameters=(n_dense + n_expert) * b if p.reference_model else 0.0)


@dataclass
class Plan:
    input: PlanInput
    ranks: list[RankPlan]
    gpu_memory_gib: float = 80.0
    reserve_gib: float = DEFAULT_RESERVE_GIB
    fragmentation: float = DEFAULT_FRAGMENTATION

    @property
    def worst(self) -> RankPlan:
        return max(self.ranks, key=lambda r: r.peak)

    @property
    def needed_gib(self) -> float:
        return self.worst.peak * (1 + self.fragmentation) / GIB + self.reserve_gib

    @property
    def fits(self) -> bool:
        return self.needed_gib <= self.gpu_memory_gib

    def to_json(self) -> dict:
        p = self.input
        w = self.worst
        return {
            "model": {**asdict(p.model), "dense_layers": list(p.model.dense_layers),
                      "parameters": total_parameters(p.model)},
            "layout": str(p.layout), "world_size": p.layout.world_size,
            "expert_data_parallel": expert_data_parallel(p.layout),
            "max_tokens": p.max_tokens, "params_dtype": p.params_dtype,
            "distributed_optimizer": p.distributed_optimizer, "recompute": p.recompute,
            "micro_batches": p.micro_batches, "spec": p.spec, "sequence_length": p.longest,
            "most_loaded_pp_rank": w.pp_rank,
            "ranks": [dict(asdict(r), state=r.state, step_phases=r.step_phases, step_extra=r.step_extra,
                           peak_phase=r.peak_phase, peak=r.peak) for r in self.ranks],
            "peak_bytes": w.peak, "peak_gib": w.peak / GIB,
            "gpu_memory_gib": self.gpu_memory_gib, "reserve_gib": self.reserve_gib,
            "fragmentation": self.fragmentation, "needed_gib": self.needed_gib, "fits": self.fits,
        }


def make_plan(p: PlanInput, gpu_memory_gib: float = 80.0, reserve_gib: float = DEFAULT_RESERVE_GIB,
              fragmentation: float = DEFAULT_FRAGMENTATION) -> Plan:
    p.validate()
    for name, value in (("gpu-memory-gib", gpu_memory_gib), ("reserve-gib", reserve_gib),
                        ("fragmentation", fragmentation)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf") \
                or (name == "gpu-memory-gib" and value == 0):
            raise ValueError(f"{name} must be a finite number {'> 0' if name == 'gpu-memory-gib' else '>= 0'}, "
                             f"got {value!r}")
    ranks = [rank_plan(p, r) for r in range(p.layout.pp)]
    return Plan(p, ranks, float(gpu_memory_gib), float(reserve_gib), float(fragmentation))


# -- the command ----------------------------------------------------------------------------------


def _gib(value: float) -> str:
    return f"{value / GIB:8.2f} GiB"


def _billions(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.1f} M"


def format_plan(plan: Plan, nodes: int | None = None, gpus_per_node: int | None = None) -> str:
    p, w = plan.input, plan.worst
    lay, m = p.layout, p.model
    world = f"{lay.world_size} GPUs" + (f" ({nodes} nodes x {gpus_per_node})" if nodes and gpus_per_node else "")
    edp = expert_data_parallel(lay)
    stage = ("first and last" if w.first_stage and w.last_stage else "first" if w.first_stage
             else "last" if w.last_stage else "middle")
    n_local = w.parameter_count["dense"] + w.parameter_count["expert"]
    flight = w.micro_batches_in_flight
    rows: list[tuple[str, float | None]] = [
        (f"parameters ({p.params_dtype}, {_billions(n_local)})", w.parameters),
        ("gradients (fp32 main grads)", w.gradients),
        ("optimizer (Adam m, v" + (" + fp32 master" if p.bytes != 4 else "") + "; "
         + (f"sharded: dense / {lay.data_parallel * lay.cp}, experts / {edp})" if p.distributed_optimizer
            else "not sharded)"), w.optimizer),
    ]
    if p.reference_model:
        rows.append(("reference model for the KL term (parameters)", w.reference_parameters))
    rows += [
        (f"activations ({len(w.layers)} layer {'inputs' if p.recompute == 'full' else 'sets'}, "
         f"{flight:g} micro-batch{'es' if flight != 1 else ''} in flight)", w.activations),
    ]
    if p.recompute == "full":
        rows.append(("recompute working set (one layer)", w.recompute_working_set))
    rows.append(("one layer's transient buffers", w.layer_transient))
    if w.last_stage:
        lp = w.logprob_parts
        rows += [("log-prob path", w.logprob_path),
                 (f"  logits [{p.tokens}, {m.vocab_size // lay.tp}] (gradient in place)", lp["logits"]),
                 ("  chunk workspace (cached)", lp["workspace"]),
                 ("  output-layer backward / chunk product", lp["transient"])]
    if w.first_stage:
        rows.append(("embedding weight gradient (last backward)", w.embedding_grad))
    phase_rule = {"loss": "activations + log-prob path",
                  "layer": "activations + " + ("recompute working set + " if p.recompute == "full" else "")
                           + "one layer's transients" + (" + workspace" if w.last_stage else ""),
                  "embedding": "first layer + its transients + embedding gradient"}[w.peak_phase]
    width = max(len(name) for name, _ in rows) + 2
    lines = [
        f"model: {m.family}, {_billions(total_parameters(m))} parameters ({m.num_layers} layers, hidden "
        f"{m.hidden_size}, {m.num_experts} experts top-{m.moe_router_topk}, vocab {m.vocab_size})",
        f"layout: {lay} on {world}; expert data parallel {edp}",
        f"micro-batch: {p.max_tokens} tokens ({p.tokens} per CP rank), {p.params_dtype} parameters, "
        f"{'distributed' if p.distributed_optimizer else 'replicated'} optimizer, recompute {p.recompute}, "
        f"{p.spec} layer spec",
        f"most loaded: pipeline rank {w.pp_rank} of {lay.pp} ({stage} stage)",
        "",
    ]
    lines += [f"  {name.ljust(width)}{_gib(value)}" for name, value in rows]
    lines += [
        f"  {'peak'.ljust(width)}{_gib(w.peak)}",
        f"    = parameters + gradients + optimizer{' + reference model' if p.reference_model else ''} + {phase_rule}",
    ]
    if lay.pp > 1:
        lines.append("  peak per pipeline rank: " + ", ".join(f"{r.pp_rank}: {r.peak / GIB:.2f}"
                                                          for r in plan.ranks) + " GiB")
    spare = plan.gpu_memory_gib - plan.needed_gib
    lines += [
        "",
        f"reserve: {plan.reserve_gib:g} GiB (CUDA context, NCCL buffers, cuBLAS/TE workspaces) + "
        f"{plan.fragmentation:.0%} of the peak (allocator fragmentation)",
        f"needs {plan.needed_gib:.1f} GiB of {plan.gpu_memory_gib:g} GiB: "
        + (f"fits ({spare:.1f} GiB spare)" if plan.fits else f"does NOT fit ({-spare:.1f} GiB over)"),
    ]
    return "\n".join(lines)


def layout_for(text: str, world: int) -> Layout:
    """The layout ``text`` on ``world`` GPUs (data parallelism takes what it leaves, as in the trainer)."""
    parsed = Layout.parse(text)
    try:
        layout = Layout.for_world(world, tp=parsed.tp, pp=parsed.pp, vpp=parsed.vpp, cp=parsed.cp, ep=parsed.ep,
                                  etp=parsed.etp)
    except ValueError as err:
        raise ValueError(f"layout {text!r} on {world} GPUs: {err}") from None
    if parsed.dp is not None and parsed.dp != layout.data_parallel:
        raise ValueError(f"layout {text!r} names dp{parsed.dp}, but {world} GPUs give dp{layout.data_parallel}")
    return layout


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face model directory (or its config.json)")
    parser.add_argument("--layout", default="single", help="e.g. tp2pp1ep8 (keys tp, pp, vpp, cp, ep, etp)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, required=True,
                        help="tokens of one micro-batch on one data-parallel rank (packed sequences)")
    parser.add_argument("--params-dtype", choices=sorted(DTYPE_BYTES), default="bfloat16")
    parser.add_argument("--distributed-optimizer", action="store_true",
                        help="Adam state and master weights sharded over data parallelism")
    parser.add_argument("--recompute", choices=RECOMPUTE, default="none")
    parser.add_argument("--kl-reference", action="store_true",
                        help="algorithm.kl_coef > 0: count the frozen reference model's parameters too")
    parser.add_argument("--micro-batches", type=int, default=None,
                        help="micro-batches per step and data-parallel rank (default: enough to fill the pipeline)")
    parser.add_argument("--spec", choices=SPECS, default="te",
                        help="te: TransformerEngine layers on GPUs; local: the CPU/local layer spec")
    parser.add_argument("--sequence-length", type=int, default=None,
                        help="longest packed sequence (local attention; workspace rows); default max-tokens")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0)
    parser.add_argument("--reserve-gib", type=float, default=DEFAULT_RESERVE_GIB,
                        help="kept free for the CUDA context, NCCL and cuBLAS/TE workspaces")
    parser.add_argument("--fragmentation", type=float, default=DEFAULT_FRAGMENTATION,
                        help="fraction of the peak added for allocator fragmentation")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def plan_from_args(args) -> Plan:
    from megatron_vespo.convert.families import load_model_config

    for name in ("nodes", "gpus_per_node"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    _, model = load_model_config(args.model)
    layout = layout_for(args.layout, args.nodes * args.gpus_per_node)
    p = PlanInput(model=model, layout=layout, max_tokens=args.max_tokens, params_dtype=args.params_dtype,
                  distributed_optimizer=args.distributed_optimizer, recompute=args.recompute,
                  micro_batches=args.micro_batches, spec=args.spec, sequence_length=args.sequence_length,
                  reference_model=args.kl_reference)
    return make_plan(p, args.gpu_memory_gib, args.reserve_gib, args.fragmentation)


def main(args) -> int:
    plan = plan_from_args(args)
    if args.json:
        print(json.dumps(plan.to_json(), indent=1))
    else:
        print(format_plan(plan, args.nodes, args.gpus_per_node))
    return 0

"""Hugging Face tensor names <-> this rank's Megatron-Core parameters.

``local_tensor(name, source, ctx)`` gives, for a Megatron parameter of this rank, the part of the
HF tensors it holds, reading only those slices from ``source`` (in-memory tensors or safetensors
files), so the same function loads checkpoints and shards reference gradients. Layout rules
(Megatron-Core 0.16; local and TransformerEngine parameter names):

* ``linear_qkv`` (weight and bias): per query group g, rows [q heads of g | k_g | v_g]; TP splits
  whole groups, so each rank reads only its groups' rows of q/k/v;
* gated ``linear_fc1``: each (expert-)TP rank holds [gate shard ; up shard];
* row-parallel weights (``linear_proj``, ``linear_fc2``) split dim 1; embedding/output dim 0;
* experts: local expert j on EP rank r is global expert r * (E / ep) + j (local
  ``local_experts.{j}.linear_fc1.weight``, TE grouped ``experts.linear_fc1.weight{j}``);
* norms, the router and the shared-expert gate are replicated; TE fuses the input norm into
  ``linear_qkv.layer_norm_weight`` and a dense MLP's norm into ``linear_fc1.layer_norm_weight``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from megatron_vespo.input_files import InputFileError, check_file, read_json_object
from megatron_vespo.mcore.model import MoEModelConfig

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight$")
_TE_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc1|linear_fc2)\.weight(\d+)$")


# ----------------------------------------------------------------------------- HF naming
@dataclass(frozen=True)
class HFNaming:
    moe: str  # prefix of router and experts inside a layer
    gate: str
    up: str
    down: str

    def expert(self, layer: int, e: int, which: str) -> str:
        return f"model.layers.{layer}.{self.moe}experts.{e}.{getattr(self, which)}.weight"

    def router(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.moe}gate.weight"


def naming(m: MoEModelConfig) -> HFNaming:
    if m.family == "mixtral":
        return HFNaming("block_sparse_moe.", "w1", "w3", "w2")
    return HFNaming("mlp.", "gate_proj", "up_proj", "down_proj")


def hf_names(m: MoEModelConfig) -> list[str]:
    """Every HF tensor name of the model, in a stable order."""
    nm = naming(m)
    names = ["model.embed_tokens.weight"]
    for i in range(m.num_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight"]
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        if m.qkv_bias:
            names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
        if m.qk_layernorm:
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        names += [p + "post_attention_layernorm.weight"]
        if not m.is_moe or i in m.dense_layers:
            names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
            continue
        names += [nm.router(i)]
        for e in range(m.num_experts):
            names += [nm.expert(i, e, w) for w in ("gate", "up", "down")]
        if m.shared_expert_size:
            names += [p + f"mlp.shared_expert.{x}_proj.weight" for x in ("gate", "up", "down")]
            if m.shared_expert_gate:
                names += [p + "mlp.shared_expert_gate.weight"]
    names += ["model.norm.weight"]
    if not m.tie_word_embeddings:
        names += ["lm_head.weight"]
    return names


def hf_shapes(m: MoEModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every HF tensor of the model."""
    h, d = m.hidden_size, m.head_dim
    q, kv = m.num_attention_heads * d, m.num_query_groups * d
    shapes = {}
    for name in hf_names(m):
        leaf = name.rsplit(".", 2)[-2] if name.endswith((".weight", ".bias")) else name
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            shape = (m.vocab_size, h)
        elif leaf in ("q_norm", "k_norm"):
            shape = (d,)
        elif leaf.endswith("layernorm") or name == "model.norm.weight":
            shape = (h,)
        elif leaf in ("q_proj", "k_proj", "v_proj"):
            rows = q if leaf == "q_proj" else kv
            shape = (rows,) if name.endswith(".bias") else (rows, h)
        elif leaf == "o_proj":
            shape = (h, q)
        elif leaf == "gate" and ".experts." not in name:  # the router
            shape = (m.num_experts, h)
        elif leaf == "shared_expert_gate":
            shape = (1, h)
        else:
            ffn = (m.moe_ffn_hidden_size if ".experts." in name else
                   m.shared_expert_size if ".shared_expert." in name else m.ffn_hidden_size)
            shape = (h, ffn) if leaf in ("down_proj", "w2") else (ffn, h)
        shapes[name] = shape
    return shapes


# ----------------------------------------------------------------------------- sources
class TensorSource:
    """Read HF tensors, or row/column ranges of them, by name."""

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        raise NotImplementedError


class DictSource(TensorSource):
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def _get(self, name):
        if name not in self.tensors:
            raise KeyError(f"missing tensor {name!r}")
        return self.tensors[name]

    def shape(self, name):
        return tuple(self._get(name).shape)

    def read(self, name, dim=None, start=0, stop=None):
        t = self._get(name)
        return t if dim is None else t.narrow(dim, start, (stop or t.shape[dim]) - start)


def _safe_open(path: str):
    """safetensors' reader of ``path``; a file it cannot parse (truncated, a Git LFS pointer, not
    safetensors at all) is an error naming the file instead of safetensors' bare message."""
    from safetensors import safe_open

    check_file(path, "safetensors file")
    try:
        return safe_open(path, "pt")
    except Exception as err:  # SafetensorError has no importable base in every release
        raise InputFileError(f"safetensors file {path} cannot be read ({err}); is it truncated or a "
                             f"Git LFS pointer?") from None


class SafetensorsSource(TensorSource):
    """A Hugging Face model directory (``model.safetensors`` or a sharded index). Reads only the
    requested slices and counts the bytes it read."""

    def __init__(self, directory: str):
        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.exists(index):
            weight_map = read_json_object(index, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise InputFileError(f"safetensors index {index} has no 'weight_map' object of tensor name -> file")
            missing = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(directory, f))})
            if missing:
                raise InputFileError(f"safetensors index {index} names files that are not in {directory}: "
                                     f"{missing[:5]}")
        else:
            single = os.path.join(directory, "model.safetensors")
            if not os.path.exists(single):
                raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {directory}")
            with _safe_open(single) as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        self.directory, self.weight_map = directory, weight_map
        self._files = {}
        self._open = _safe_open
        self.bytes_read = 0

    def _file(self, name):
        if name not in self.weight_map:
            raise KeyError(f"missing tensor {name!r} in {self.directory}")
        file = self.weight_map[name]
        if file not in self._files:
            self._files[file] = self._open(os.path.join(self.directory, file))
        return self._files[file]

    def shape(self, name):
        return tuple(self._file(name).get_slice(name).get_shape())

    def read(self, name, dim=None, start=0, stop=None):
        piece = self._file(name).get_slice(name)
        shape = piece.get_shape()
        if dim is None:
            t = piece[:]
        else:
            index = [slice(None)] * len(shape)
            index[dim] = slice(start, stop if stop is not None else shape[dim])
            t = piece[tuple(index)]
        self.bytes_read += t.numel() * t.element_size()
        return t


def as_source(tensors) -> TensorSource:
    return tensors if isinstance(tensors, TensorSource) else DictSource(tensors)


# ----------------------------------------------------------------------------- embedding health
class DegenerateEmbeddingWarning(UserWarning):
    """Tokens the engine can sample have an all-zero or near-zero input embedding."""


def degenerate_embedding_rows(embedding: torch.Tensor, relative: float = 1e-2) -> list[int]:
    """Ids of embedding rows whose norm is at most ``relative`` times the median row norm (an
    all-zero row always)."""
    norms = embedding.detach().double().norm(dim=1)
    return (norms <= relative * norms.median()).nonzero().flatten().tolist()


def check_embedding_rows(source: "TensorSource", m, warn=None) -> list[int]:
    """Warn (DegenerateEmbeddingWarning) about input-embedding rows that are zero or near zero.

    The engine samples from the whole vocabulary, so any such token can appear inside a response;
    the next layer's RMSNorm then sees a near-zero input, where its gradient is weight / sqrt(eps)
    (1000x at eps 1e-6): a spike in that embedding row that grad clipping turns into a lost step."""
    import warnings

    rows = degenerate_embedding_rows(source.read("model.embed_tokens.weight"))
    if rows:
        shown = ", ".join(str(r) for r in rows[:10]) + (", ..." if len(rows) > 10 else "")
        frozen = (f" Row {m.padding_idx} is pad_token_id: frozen as in transformers (no gradient from its "
                  "lookup), but the model still reads a zero vector there."
                  if m.padding_idx is not None and m.padding_idx in rows else "")
        message = (f"model.embed_tokens.weight: {len(rows)} token(s) the engine can sample have an all-zero or "
                   f"near-zero embedding (ids {shown}; below 1% of the median row norm). Sampled inside a "
                   "response, such a token puts a near-zero vector into the first RMSNorm, whose gradient "
                   "there is weight / sqrt(eps): a gradient spike in that row." + frozen +
                   " Initialise these rows like the others (or keep the engine from sampling them).")
        warnings.warn(message, DegenerateEmbeddingWarning, stacklevel=2)
        if warn is not None:
            warn(f"warning: {message}")
    return rows


# ----------------------------------------------------------------------------- sharding
@dataclass(frozen=True)
class ShardContext:
    model: MoEModelConfig
    tp: int
    tp_rank: int
    etp: int
    etp_rank: int
    ep: int
    ep_rank: int
    layer_numbers: tuple[int, ...]  # global 0-based layer id of each local layer

    @classmethod
    def from_model(cls, gpt_model, model_cfg: MoEModelConfig) -> "ShardContext":
        from megatron.core import parallel_state as ps

        layers = tuple(layer.layer_number - 1 for layer in gpt_model.decoder.layers)
        return cls(
            model=model_cfg,
            tp=ps.get_tensor_model_parallel_world_size(),
            tp_rank=ps.get_tensor_model_parallel_rank(),
            etp=ps.get_expert_tensor_parallel_world_size(),
            etp_rank=ps.get_expert_tensor_parallel_rank(),
            ep=ps.get_expert_model_parallel_world_size(),
            ep_rank=ps.get_expert_model_parallel_rank(),
            layer_numbers=layers,
        )


def _part(src: TensorSource, name: str, parts: int, rank: int, dim: int) -> torch.Tensor:
    size = src.shape(name)[dim]
    if size % parts:
        raise ValueError(f"{name}: dimension {dim} of size {size} is not divisible by {parts}")
    step = size // parts
    return src.read(name, dim, rank * step, (rank + 1) * step).contiguous()


def fused_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """Megatron's interleaved [group: q heads, k, v] rows (weights or biases) for ``groups`` groups."""
    tail = q.shape[1:]
    q = q.reshape(groups, -1, *tail)
    k = k.reshape(groups, -1, *tail)
    v = v.reshape(groups, -1, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def _qkv(src: TensorSource, prefix: str, suffix: str, ctx: ShardContext) -> torch.Tensor:
    m = ctx.model
    groups = m.num_query_groups // ctx.tp
    first = ctx.tp_rank * groups
    q_rows = (m.num_attention_heads // m.num_query_groups) * m.head_dim
    q = src.read(f"{prefix}q_proj.{suffix}", 0, first * q_rows, (first + groups) * q_rows)
    k = src.read(f"{prefix}k_proj.{suffix}", 0, first * m.head_dim, (first + groups) * m.head_dim)
    v = src.read(f"{prefix}v_proj.{suffix}", 0, first * m.head_dim, (first + groups) * m.head_dim)
    return fused_qkv(q, k, v, groups)


def _gated_fc1(src: TensorSource, gate: str, up: str, parts: int, rank: int) -> torch.Tensor:
    return torch.cat([_part(src, gate, parts, rank, 0), _part(src, up, parts, rank, 0)], dim=0)


def _expert(src: TensorSource, layer: int, local: int, fc: str, ctx: ShardContext) -> torch.Tensor:
    m, nm = ctx.model, naming(ctx.model)
    e = ctx.ep_rank * (m.num_experts // ctx.ep) + local
    if fc == "linear_fc1":
        return _gated_fc1(src, nm.expert(layer, e, "gate"), nm.expert(layer, e, "up"), ctx.etp, ctx.etp_rank)
    return _part(src, nm.expert(layer, e, "down"), ctx.etp, ctx.etp_rank, 1)


def local_tensor(name: str, tensors, ctx: ShardContext) -> torch.Tensor:
    """The part of the HF tensors that Megatron parameter ``name`` holds on this rank."""
    src = as_source(tensors)
    m = ctx.model
    embed = "model.embed_tokens.weight"
    if name == "embedding.word_embeddings.weight":
        return _part(src, embed, ctx.tp, ctx.tp_rank, 0)
    if name == "output_layer.weight":
        return _part(src, embed if m.tie_word_embeddings else "lm_head.weight", ctx.tp, ctx.tp_rank, 0)
    if name == "decoder.final_layernorm.weight":
        return src.read("model.norm.weight")
    match = _LAYER.match(name)
    if not match:
        raise KeyError(f"no Hugging Face mapping for Megatron parameter {name!r}")
    layer = ctx.layer_numbers[int(match.group(1))]
    rest = match.group(2)
    p = f"model.layers.{layer}."
    replicated = {
        "input_layernorm.weight": p + "input_layernorm.weight",
        "self_attention.linear_qkv.layer_norm_weight": p + "input_layernorm.weight",
        "pre_mlp_layernorm.weight": p + "post_attention_layernorm.weight",
        "mlp.linear_fc1.layer_norm_weight": p + "post_attention_layernorm.weight",
        "self_attention.q_layernorm.weight": p + "self_attn.q_norm.weight",
        "self_attention.k_layernorm.weight": p + "self_attn.k_norm.weight",
        "mlp.router.weight": naming(m).router(layer),
        "mlp.shared_experts.gate_weight": p + "mlp.shared_expert_gate.weight",
    }
    if rest in replicated:
        return src.read(replicated[rest])
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        return _qkv(src, p + "self_attn.", rest.rsplit(".", 1)[1], ctx)
    if rest == "self_attention.linear_proj.weight":
        return _part(src, p + "self_attn.o_proj.weight", ctx.tp, ctx.tp_rank, 1)
    for mlp, hf in (("mlp.", "mlp."), ("mlp.shared_experts.", "mlp.shared_expert.")):
        if rest == mlp + "linear_fc1.weight":
            return _gated_fc1(src, p + hf + "gate_proj.weight", p + hf + "up_proj.weight", ctx.tp, ctx.tp_rank)
        if rest == mlp + "linear_fc2.weight":
            return _part(src, p + hf + "down_proj.weight", ctx.tp, ctx.tp_rank, 1)
    expert = _LOCAL_EXPERT.match(rest)
    if expert:
        return _expert(src, layer, int(expert.group(1)), expert.group(2), ctx)
    expert = _TE_EXPERT.match(rest)
    if expert:
        return _expert(src, layer, int(expert.group(2)), expert.group(1), ctx)
    raise KeyError(f"no Hugging Face mapping for Megatron parameter {name!r}")


@torch.no_grad()
def load_hf_state(gpt_model, tensors, ctx: ShardContext, progress=None) -> int:
    """Copy HF tensors (a dict or a :class:`TensorSource`) into this rank's parameters; returns
    how many parameters were set. Shapes are checked and named; ``progress()`` runs per parameter."""
    src = as_source(tensors)
    count = 0
    for name, param in gpt_model.named_parameters():
        value = local_tensor(name, src, ctx)
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(
                f"{name}: Hugging Face tensors give shape {tuple(value.shape)}, "
                f"the model expects {tuple(param.shape)}"
            )
        param.copy_(value)
        count += 1
        if progress is not None:
            progress()
    return count

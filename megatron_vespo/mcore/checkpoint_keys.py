"""Checkpoint key names that differ between Megatron's TransformerEngine spec and its local spec.

TransformerEngine fuses the norm before attention into ``linear_qkv`` and, in dense layers, the
norm before the MLP into ``linear_fc1``: a TE checkpoint holds ``self_attention.linear_qkv.
layer_norm_weight`` and ``mlp.linear_fc1.layer_norm_weight``. The local spec keeps separate norms
and saves them under those fused names (``sharded_state_dict_keys_map`` in
``models/gpt/gpt_layer_specs.py: get_gpt_layer_local_spec``), in every layer. A TE MoE layer has no
``linear_fc1`` to fuse into and keeps its own ``pre_mlp_layernorm`` (a ``TENorm``, no key map), so
for MoE layers the two specs disagree: TE saves ``pre_mlp_layernorm.weight``, the local spec
``mlp.linear_fc1.layer_norm_weight``. A GPU trainer (TE) and ``convert`` on a CPU node (local)
must read each other's checkpoints: before loading, each requested key the checkpoint lacks is
renamed to its alias when the checkpoint holds that instead. Optimizer states are keyed by their
parameter's key (``optimizer.state.exp_avg.<key>``), so aligning the model's request first is
enough for them.
"""

from __future__ import annotations

# (name in one spec, name in the other): substrings of a sharded tensor key
SPEC_KEY_ALIASES = (("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"),)


def stored_tensor_keys(directory: str) -> set[str]:
    """The tensor keys a Megatron distributed checkpoint holds (read from its metadata only)."""
    from megatron.core import dist_checkpointing

    return set(dist_checkpointing.load_tensors_metadata(directory).keys())


def alias_of(key: str, stored: set[str]) -> str | None:
    """The name under which ``stored`` holds ``key``'s tensor, when it holds it under an alias."""
    for a, b in SPEC_KEY_ALIASES:
        for ours, theirs in ((a, b), (b, a)):
            if ours in key and key.replace(ours, theirs) in stored:
                return key.replace(ours, theirs)
    return None


def align_keys_to_checkpoint(sharded_state, directory: str) -> list[tuple[str, str]]:
    """Rename, in place, the keys of ``sharded_state`` (a nested dict/list of sharded tensors) that
    ``directory`` stores under the other spec's name; returns the (requested, stored) pairs."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    stored = stored_tensor_keys(directory)
    renamed = []
    for item in nested_values(sharded_state):
        key = getattr(item, "key", None)
        if not isinstance(key, str) or key in stored:
            continue
        alias = alias_of(key, stored)
        if alias is not None:
            item.key = alias
            renamed.append((key, alias))
    return renamed

"""Gradient norms per parameter group, so a spike shows where it sits (metrics.jsonl and the plot).

Groups by Megatron-Core parameter name: embedding, attention, router, experts, mlp (dense MLPs and
shared experts), norms (every RMSNorm/LayerNorm gain), output. Each parameter is counted once, as
Megatron's own grad-norm does: replicas across TP ranks and shared (tied) copies are skipped, dense
sums are reduced over the model-parallel group (TP x PP) and expert sums over the expert
tensor-model-pipeline group. The root of the sum of all groups' squares is the optimizer's
``grad_norm``. Also reported: the embedding row with the largest gradient (its id and norm),
since a degenerate embedding row concentrates a spike in one row.
"""

from __future__ import annotations

import torch

from megatron_vespo import comm

GROUPS = ("embedding", "attention", "router", "experts", "mlp", "norms", "output")
METRIC_PREFIX = "grad_norm/"
MAX_ROW, MAX_ROW_ID = METRIC_PREFIX + "embedding_max_row", METRIC_PREFIX + "embedding_max_row_id"
METRIC_NAMES = tuple(METRIC_PREFIX + group for group in GROUPS) + (MAX_ROW, MAX_ROW_ID)


def parameter_group(name: str) -> str:
    """The group of a Megatron-Core GPTModel parameter name."""
    if name.startswith("embedding."):
        return "embedding"
    if name.startswith("output_layer."):
        return "output"
    if "layernorm" in name or "layer_norm_" in name:
        return "norms"
    if ".mlp.router." in name:
        return "router"
    if ".mlp.experts." in name:
        return "experts"
    if ".self_attention." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    raise ValueError(f"parameter {name!r} belongs to no gradient-norm group")


def _counted(param) -> bool:
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    return param_is_not_shared(param) and param_is_not_tensor_parallel_duplicate(param)


def _grad(param) -> torch.Tensor | None:
    grad = getattr(param, "main_grad", None)
    return grad if grad is not None else param.grad


def gradient_norms(chunks, owned: dict | None = None) -> dict[str, float]:
    """``grad_norm/<group>`` for every group, ``grad_norm/embedding_max_row`` (the largest row
    norm of the embedding gradient) and ``grad_norm/embedding_max_row_id``, on every rank of the
    model-parallel group that holds the embedding (global rank 0 among them). Call after the
    backward pass (gradients reduced over data parallelism), before the optimizer step.
    ``owned`` (mcore.grad_shards.owned_gradient_slices; distributed optimizer): the slice of each
    gradient this rank holds reduced; the sums are then completed over data parallelism."""
    from megatron.core import parallel_state as ps

    # row 0: sums of squares, row 1: parameter counts (groups the model lacks are not reported)
    dense = torch.zeros((2, len(GROUPS)), dtype=torch.float64)
    expert = torch.zeros((2, len(GROUPS)), dtype=torch.float64)
    embedding_grad, vocab_start, embedding_slice = None, 0, None
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            grad = _grad(param)
            if grad is None:
                continue
            first, last = (0, grad.numel()) if owned is None else owned.get(param, (0, grad.numel()))
            if name == "embedding.word_embeddings.weight":
                embedding_grad, vocab_start = grad, chunk.embedding.word_embeddings.vocab_start_index
                embedding_slice = (first, last)
            if not _counted(param):
                continue
            target = expert if not getattr(param, "allreduce", True) else dense
            group = GROUPS.index(parameter_group(name))
            target[0, group] += grad.detach().reshape(-1)[first:last].double().pow(2).sum().cpu()
            target[1, group] += 1
    device = _device()
    dense, expert = dense.to(device), expert.to(device)
    if owned is not None:  # each data-parallel rank summed its own slices; counts stay per replica
        dense[0], expert[0] = _sum_over_data_parallel(dense[0], expert[0])
    comm.all_reduce_sum(dense, ps.get_model_parallel_group(), tag="grad_norm_groups")
    comm.all_reduce_sum(expert, ps.get_expert_tensor_model_pipeline_parallel_group(), tag="grad_norm_groups")
    squares, counts = (dense + expert).cpu().tolist()
    out = {f"{METRIC_PREFIX}{group}": square ** 0.5 for group, square, count in zip(GROUPS, squares, counts) if count}
    if embedding_grad is not None:
        rows = embedding_grad.detach().double()
        if owned is not None:  # squares of the owned elements per row, summed over data parallelism
            flat = torch.zeros(rows.numel(), dtype=torch.float64, device=rows.device)
            first, last = embedding_slice
            flat[first:last] = rows.reshape(-1)[first:last].pow(2)
            squares_per_row = flat.view(rows.shape).sum(1).to(device)
            comm.all_reduce_sum(squares_per_row, ps.get_data_parallel_group(with_context_parallel=True),
                                tag="grad_norm_rows")
            row_norms = squares_per_row.sqrt()
        else:
            row_norms = rows.norm(dim=1)
        local = torch.stack([row_norms.max(), (row_norms.argmax() + vocab_start).double()]).to(device)
        candidates = comm.all_gather_stack(local, ps.get_tensor_model_parallel_group(), tag="grad_norm_rows")
        best = candidates[candidates[:, 0].argmax()].cpu().tolist()
        out[MAX_ROW] = best[0]
        out[MAX_ROW_ID] = int(best[1])
    return out


def _sum_over_data_parallel(dense_squares: torch.Tensor, expert_squares: torch.Tensor):
    from megatron.core import parallel_state as ps

    dense_squares, expert_squares = dense_squares.clone(), expert_squares.clone()
    comm.all_reduce_sum(dense_squares, ps.get_data_parallel_group(with_context_parallel=True), tag="grad_norm_groups")
    comm.all_reduce_sum(expert_squares, ps.get_expert_data_parallel_group(), tag="grad_norm_groups")
    return dense_squares, expert_squares


def _device() -> str:
    # the reductions' tensors live where the default group's backend serves them
    return "cuda" if torch.cuda.is_available() else "cpu"

"""Test-only stand-in for SGLang's compiled ``sgl_kernel`` package on a CPU without Intel AMX.

Never on a GPU machine's path: it exists because the registry's sgl-kernel wheels are CUDA-only.
SGLang's CPU path imports ``sgl_kernel`` unconditionally, but without AMX it runs its layers in
plain PyTorch and calls one op of it on every batch, ``assign_req_to_token_pool_cpu``, written
here in plain torch. The other names SGLang imports on this path are never called here; they
raise if they ever are, naming themselves.
"""

import torch


def assign_req_to_token_pool_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                                 start_offset: torch.Tensor, end_offset: torch.Tensor,
                                 out_cache_loc: torch.Tensor, pool_len: int) -> None:
    """Write each request's new KV-cache slots into its row of ``req_to_token``: request i takes
    the next ``end[i] - start[i]`` entries of ``out_cache_loc`` (requests in order) and stores them
    at positions ``start[i]:end[i]`` of row ``req_pool_indices[i]``."""
    taken = 0
    for row, start, end in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        count = end - start
        if count > 0:
            if end > pool_len:
                raise IndexError(f"request row {row}: KV positions up to {end} exceed the pool length {pool_len}")
            req_to_token[row, start:end] = out_cache_loc[taken:taken + count].to(req_to_token.dtype)
        taken += count


def _not_in_stand_in(name: str):
    def op(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name} is not part of the CPU test stand-in (tests/sglang_cpu)")

    op.__name__ = name
    return op


copy_all_layer_kv_cache_cpu = _not_in_stand_in("copy_all_layer_kv_cache_cpu")
# speculative decoding (imported by SGLang's CPU path, never used by these servers)
for _name in ("build_tree_kernel_efficient_cpu", "verify_tree_greedy_cpu", "assign_draft_cache_locs_contiguous_cpu",
              "assign_extend_cache_locs_cpu", "fill_accept_out_cache_loc_cpu", "fill_bonus_tokens_cpu",
              "rotate_input_ids_cpu"):
    globals()[_name] = _not_in_stand_in(_name)
del _name

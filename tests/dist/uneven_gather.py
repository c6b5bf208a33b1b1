"""gloo cannot all_gather uneven chunks; the patched Megatron gather can."""

import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_vespo.mcore.cpu import apply_cpu_patches  # noqa: E402

apply_cpu_patches()
from megatron.core.tensor_parallel import mappings  # noqa: E402

dist.init_process_group("gloo")
rank = dist.get_rank()
sizes = [3, 5]
local = torch.full((sizes[rank], 2), float(rank + 1))
out = mappings._gather_along_first_dim(local, dist.group.WORLD, output_split_sizes=sizes)
assert out.shape == (8, 2), out.shape
assert out[:3].eq(1).all() and out[3:].eq(2).all()
even = mappings._gather_along_first_dim(torch.full((2, 2), float(rank)), dist.group.WORLD)
assert even.shape == (4, 2) and even[2:].eq(1).all()
dist.barrier()
if rank == 0:
    print("UNEVEN_GATHER_OK")
dist.destroy_process_group()

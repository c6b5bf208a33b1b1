"""Export throughput: HF-named tensors streamed from a sharded Megatron-Core model (export_hf),
against a plain copy of the same bytes (allocate + copy, bucket by bucket) in the same run.
Target: export / plain copy >= 0.5.

Usage: python benchmarks/bench_export.py [--layout tp2ep2] [--json OUT]
(a layout of more than one rank starts torchrun itself)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BUCKET = 64 * 2**20


def model_config():
    from megatron_vespo.mcore.model import MoEModelConfig

    return MoEModelConfig(vocab_size=32000, hidden_size=512, num_layers=4, num_attention_heads=8,
                          num_query_groups=4, head_dim=64, ffn_hidden_size=2048, moe_ffn_hidden_size=512,
                          num_experts=16, moe_router_topk=2)


def run(layout_text: str, repeats: int) -> dict | None:
    from megatron_vespo.convert.export import export_hf
    from megatron_vespo.mcore.model import build_gpt_model, transformer_config
    from megatron_vespo.mcore.parallel import Layout, initialize_model_parallel

    layout = Layout.parse(layout_text)
    initialize_model_parallel(layout)
    m = model_config()
    gpt = build_gpt_model(m, transformer_config(m, layout))
    rank = torch.distributed.get_rank()
    export_s, total = [], 0
    for _ in range(repeats):
        torch.distributed.barrier()
        start = time.perf_counter()
        total = 0
        for bucket in export_hf(gpt, m, bucket_bytes=BUCKET):
            total += sum(t.numel() * t.element_size() for _, t in bucket)
        torch.distributed.barrier()
        export_s.append(time.perf_counter() - start)
    # Transport alone: every other rank sends its share of the same bytes, point to point, bucket by bucket.
    from megatron_vespo import comm
    from megatron_vespo.mcore.weights import hf_shapes

    world = torch.distributed.get_world_size()
    total = comm.broadcast_object(total)  # only the destination counted the bytes
    share = torch.randn(total // 4 // world if world > 1 else 0)
    gather_s = []
    for _ in range(repeats):
        torch.distributed.barrier()
        start = time.perf_counter()
        for b, chunk in enumerate(share.split(BUCKET // 4 // max(world, 1)) if share.numel() else []):
            sizes = [0] + [chunk.numel()] * (world - 1)
            comm.send_flat_to(chunk if rank else chunk[:0], sizes, dst=0, tag=b).wait()
        gather_s.append(time.perf_counter() - start)
    result = None
    if rank == 0:
        # plain copy of the same bytes, tensor by tensor (same sizes and allocations as the export)
        numels = [torch.Size(s).numel() for s in hf_shapes(m).values()]
        source = torch.randn(max(numels))
        copy_s = []
        for _ in range(max(repeats, 5)):  # the copy is short and noisy: best of several
            start = time.perf_counter()
            for n in numels:
                torch.empty(n).copy_(source[:n])
            copy_s.append(time.perf_counter() - start)
        e, c, g = min(export_s), min(copy_s), min(gather_s)
        result = dict(layout=str(layout), bytes=total, export_gbps=total / e / 1e9, copy_gbps=total / c / 1e9,
                      ratio=c / e, transport_gbps=(total * (world - 1) / world) / g / 1e9 if world > 1 else None)
        print("EXPORT", json.dumps(result), flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", default="single")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    from megatron_vespo.mcore.parallel import Layout

    world = Layout.parse(args.layout).world_size
    if "WORLD_SIZE" not in os.environ and world > 1:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc_per_node={world}", __file__, *sys.argv[1:]],
                              env=env, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("EXPORT")]
        if proc.returncode or not lines:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        result = json.loads(lines[0].split(" ", 1)[1])
    else:
        result = run(args.layout, args.repeats)
        if result is None:
            return 0
    print(f"export from {result['layout']}: {result['bytes'] / 2**20:.0f} MiB of HF tensors, "
          f"{result['export_gbps']:.2f} GB/s; plain copy of the same bytes {result['copy_gbps']:.2f} GB/s; "
          f"ratio {result['ratio']:.2f} (target >= 0.5)")
    if result["transport_gbps"]:
        print(f"    the same bytes point to point, bare, between the {result['layout']} processes: "
              f"{result['transport_gbps']:.2f} GB/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

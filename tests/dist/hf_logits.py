"""Tiny random Hugging Face models of each family, loaded from safetensors into Megatron-Core under
--layout; fp32 logits compared with transformers' own forward. Prints one JSON line on rank 0.

  --negative-control: swap experts 0 and 1 of the first MoE layer on the Megatron side.
"""

import argparse
import json
import os
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from tests.hf_models import TINY, make_hf_model  # noqa: E402

def swapped_experts(src, m, layer):
    """A TensorSource that exchanges experts 0 and 1 of one layer (a typical mapping bug)."""
    from megatron_vespo.mcore.weights import TensorSource, naming

    class SwappedExperts(TensorSource):
        def __init__(self):
            nm = naming(m)
            self.swap = {}
            for w in ("gate", "up", "down"):
                a, b = nm.expert(layer, 0, w), nm.expert(layer, 1, w)
                self.swap[a], self.swap[b] = b, a

        def shape(self, name):
            return src.shape(self.swap.get(name, name))

        def read(self, name, dim=None, start=0, stop=None):
            return src.read(self.swap.get(name, name), dim, start, stop)

    return SwappedExperts()


def megatron_logits(m, directory, layout, tokens, negative_control):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_vespo import comm
    from megatron_vespo.mcore.model import build_gpt_chunks, transformer_config
    from megatron_vespo.mcore.weights import SafetensorsSource, ShardContext, TensorSource, load_hf_state

    config = transformer_config(m, layout)
    chunks = build_gpt_chunks(m, config)
    source = SafetensorsSource(directory)
    used: TensorSource = source
    if negative_control:
        used = swapped_experts(source, m, min(i for i in range(m.num_layers) if i not in m.dense_layers))
    for chunk in chunks:
        load_hf_state(chunk, used, ShardContext.from_model(chunk, m))
        chunk.eval()
    captured = []

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        out = model(batch, torch.arange(batch.shape[1]).expand_as(batch), None)

        def loss_func(output):
            captured.append(output.detach())
            return output.sum() * 0, torch.tensor(1, dtype=torch.int), {}

        return out, loss_func

    rows = list(tokens.split(1))  # one micro-batch per row (the interleaved schedule wants >= pp)
    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=forward_step,
                                    data_iterator=[iter(rows) for _ in chunks] if len(chunks) > 1 else iter(rows),
                                    model=chunks, num_microbatches=len(rows), seq_length=tokens.shape[1],
                                    micro_batch_size=1, forward_only=True)
    logits = None
    if ps.is_pipeline_last_stage():
        full = torch.cat(captured, dim=0).contiguous()
        shards = comm.all_gather_stack(full, ps.get_tensor_model_parallel_group())
        logits = torch.cat(list(shards.unbind(0)), dim=-1)
    return logits, source.bytes_read, chunks


def roundtrip_exact(gpt, m, directory, out_dir) -> dict | None:
    """Export from this layout in small buckets and compare every tensor bit for bit."""
    from megatron_vespo.convert.export import plan_buckets, save_hf_checkpoint
    from megatron_vespo.convert.families import load_hf_config
    from megatron_vespo.mcore.weights import SafetensorsSource

    bucket_bytes = 16 * 1024
    files = save_hf_checkpoint(gpt, m, out_dir, load_hf_config(directory), bucket_bytes=bucket_bytes)
    if torch.distributed.get_rank() != 0:
        return None
    original, exported = SafetensorsSource(directory), SafetensorsSource(out_dir)
    mismatched = [n for n in original.weight_map if not torch.equal(original.read(n), exported.read(n))]
    extra = sorted(set(exported.weight_map) - set(original.weight_map))
    return {"exact": not mismatched and not extra, "mismatched": mismatched[:5], "extra": extra[:5],
            "files": len(files), "planned": len(plan_buckets(m, torch.float32, bucket_bytes))}


def main():
    from megatron_vespo import comm
    from megatron_vespo.convert.families import load_hf_config, model_config_from_hf
    from megatron_vespo.mcore.parallel import Layout, initialize_model_parallel

    parser = argparse.ArgumentParser()
    parser.add_argument("--layout", required=True)
    parser.add_argument("--families", default="qwen3_moe,qwen2_moe,mixtral,qwen3,llama")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--negative-control", action="store_true")
    parser.add_argument("--roundtrip", action="store_true", help="also export and compare bit for bit")
    args = parser.parse_args()
    layout = Layout.parse(args.layout)
    initialize_model_parallel(layout)
    rank = torch.distributed.get_rank()
    families = args.families.split(",")
    for family in families:
        directory = os.path.join(args.workdir, family)
        if rank == 0 and not os.path.exists(os.path.join(directory, "config.json")):
            make_hf_model(family, directory)
    comm.barrier()
    tokens = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    report = {}
    for family in families:
        directory = os.path.join(args.workdir, family)
        m = model_config_from_hf(load_hf_config(directory))
        if not m.is_moe and layout.ep > 1:
            continue
        logits, bytes_read, chunks = megatron_logits(m, directory, layout, tokens, args.negative_control)
        roundtrip = None
        if args.roundtrip:
            roundtrip = roundtrip_exact(chunks, m, directory, os.path.join(args.workdir, f"export-{layout}-{family}"))
        result = None
        if logits is not None:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
            with torch.no_grad():
                expected = hf(tokens).logits
            result = ((logits - expected).norm() / expected.norm()).item()
        total = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
                    if f.endswith(".safetensors"))
        results = comm.gather_objects((result, bytes_read / total))
        if rank == 0:
            report[family] = {"rel_diff": max(r[0] for r in results if r[0] is not None),
                              "max_read_fraction": max(r[1] for r in results), "roundtrip": roundtrip}
    if rank == 0:
        print("HF_LOGITS", json.dumps(report))
    comm.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

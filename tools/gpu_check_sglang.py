#!/usr/bin/env python
"""The SGLang row of the GPU check (tools/gpu_check.py sglang): a real SGLang server on the GPU
serving a tiny random Qwen3-MoE (every layer MoE, as SGLang 0.5.23 builds it), in bf16.

1. /generate with log-probs and routed experts (through the project's RolloutClient, which
   checks the routes' shape and range);
2. the engine's log-probs against Megatron's (``megatron-vespo score --backend mcore``, bf16, the
   TE spec when installed) on the sampled sequences: the training-inference gap, max |delta logp|;
3. weight sync by every route (disk, tensor = CUDA IPC, distributed over NCCL... or gloo: one GPU
   cannot hold two NCCL ranks of one group) alternating two models; after each, the server's
   log-probs must match the model just sent and not the other (transformers, bf16 server).

Prints one JSON line ``{"check": "sglang", ...}`` at the end."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SYNC_TOLERANCE = 0.15  # bf16 server vs fp32 transformers, tiny random model
NEGATIVE_MIN = 0.5     # the model not sent must differ by more than this


def free_port_block(count: int) -> int:
    for base in range(12000, 21000, 50):
        try:
            for port in range(base, base + count):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no block of free ports in 12000-21000")


def engine_vs_hf(url: str, hf_dir: str, vocab: int) -> tuple[float, str | None]:
    import torch
    import transformers as tf

    from megatron_vespo.rollout.client import RolloutClient

    sample = RolloutClient([url], vocab_size=vocab).generate_sync(
        [[1, 2, 3, 9]], {"max_new_tokens": 8, "temperature": 1.0})[0]
    model = tf.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([sample.prompt_ids + sample.response_ids])).logits[0], -1)
    ref = logp[len(sample.prompt_ids) - 1:-1].gather(1, torch.tensor(sample.response_ids)[:, None])[:, 0]
    return (ref - torch.from_numpy(sample.engine_logprobs)).abs().max().item(), sample.weight_version


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True)
    parser.add_argument("--sglang-python", required=True)
    parser.add_argument("--cpu-test", action="store_true",
                        help="rehearse on a CPU (SGLang's CPU set-up from tests/engines.py; no tensor route)")
    args = parser.parse_args()

    from megatron_vespo.rollout.client import RolloutClient
    from megatron_vespo.rollout.launch import EngineCluster, LaunchOptions
    from tests.hf_models import make_hf_model

    root = os.path.join(args.work, "sglang")
    a, b = os.path.join(root, "a"), os.path.join(root, "b")
    make_hf_model("qwen3_moe", a, seed=0, dense_layers=())
    make_hf_model("qwen3_moe", b, seed=7, dense_layers=())
    config = json.load(open(os.path.join(a, "config.json")))
    vocab, layers, top_k = config["vocab_size"], config["num_hidden_layers"], config["num_experts_per_tok"]
    base = free_port_block(20)
    options = LaunchOptions(model=a, engine="sglang", num_servers=1, dtype="bfloat16", port=base, port_stride=17,
                            router_port=base + 18, log_dir=os.path.join(root, "logs"), health_timeout=600,
                            no_router=True, enable_return_routed_experts=True, server_python=args.sglang_python,
                            gpus_per_node=1, mem_fraction_static=0.3, shutdown_timeout=20)
    numbers: dict = {}
    if args.cpu_test:
        from tests.engines import start_cluster

        cluster = start_cluster("sglang", a, options.log_dir, dtype="bfloat16")
    else:
        cluster = EngineCluster.start(options)
    try:
        url = cluster.server_urls[0]
        client = RolloutClient([url], vocab_size=vocab, routing=(layers, top_k, config.get("num_experts") or config["num_local_experts"]))
        samples = client.generate_sync([[1, 2, 3, 9], [4, 5, 6]], {"max_new_tokens": 24, "temperature": 1.0},
                                       n=4, return_routed_experts=True)
        assert all(s.routed_experts is not None and len(s.engine_logprobs) == len(s.response_ids) for s in samples)
        numbers["samples"] = len(samples)

        inputs = os.path.join(root, "scored.jsonl")
        with open(inputs, "w") as f:
            for s in samples:
                f.write(json.dumps({"input_ids": s.prompt_ids + s.response_ids}) + "\n")
        proc = subprocess.run([sys.executable, "-m", "megatron_vespo", "score", "--backend", "mcore", "--model", a,
                               "--input", inputs, "--dtype", "bfloat16"], cwd=ROOT, capture_output=True, text=True,
                              timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"score: {proc.stderr[-800:]}")
        scored = [json.loads(line)["logprobs"] for line in proc.stdout.splitlines() if line.startswith("{")]
        gap = max(abs(engine - ours) for s, row in zip(samples, scored)
                  for engine, ours in zip(s.engine_logprobs.tolist(), row[len(s.prompt_ids) - 1:]))
        numbers["engine_vs_megatron_max_abs"] = gap

        import torch

        sent, routes = "a", []
        # CUDA IPC needs a GPU: a CPU rehearsal leaves the tensor route out
        for step, route in enumerate(("disk", "distributed") if args.cpu_test else ("disk", "tensor", "distributed"),
                                     start=1):
            sent = "b" if sent == "a" else "a"
            extra = ["--disk-dir", os.path.join(root, "disk")] if route == "disk" else []
            # two NCCL ranks cannot share one GPU: with a single GPU the group runs on gloo
            backend = "nccl" if torch.cuda.device_count() > 1 else "gloo"
            cmd = [sys.executable, os.path.join(ROOT, "tests", "dist", "weight_sync.py"), "--hf",
                   os.path.join(root, sent), "--route", route, "--servers", url, "--version", f"v{step}",
                   "--backend", backend, "--bucket-bytes", str(4 * 2**20), *extra]
            env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(base + 19))
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"weight sync by {route}: {proc.stderr[-800:]}")
            error, version = engine_vs_hf(url, os.path.join(root, sent), vocab)
            negative, _ = engine_vs_hf(url, os.path.join(root, "a" if sent == "b" else "b"), vocab)
            ok = error < SYNC_TOLERANCE and negative > NEGATIVE_MIN and version == f"v{step}"
            routes.append(f"{route}{'' if route != 'distributed' else f' ({backend})'} "
                          f"{'ok' if ok else 'FAILED'} ({error:.3f} vs {negative:.2f})")
            numbers[f"sync_{route}_max_abs"] = error
            if not ok:
                raise RuntimeError(f"after the {route} sync the server does not serve the model sent: "
                                   f"|delta| {error:.3f}, other model {negative:.3f}, version {version}")
        status, detail = "pass", (f"{numbers['samples']} samples with routes; engine vs Megatron (bf16) max |delta "
                                  f"logp| {gap:.3f}; weight sync: " + ", ".join(routes))
    except Exception as err:  # the row says what failed; the server is stopped either way
        status, detail = "fail", f"{type(err).__name__}: {err}"[:900]
    finally:
        cluster.stop()
    print(json.dumps({"check": "sglang", "status": status, "detail": detail, **numbers}), flush=True)
    return 0 if status == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())

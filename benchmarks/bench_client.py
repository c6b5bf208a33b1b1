"""Rollout-client overhead: requests/s through RolloutClient (validation, retries bookkeeping,
log-prob and routed-expert decoding and checks) vs. raw aiohttp POSTs of the same bodies to the
same local engine, in the same run. Short generations, so the client's own cost is visible.

Usage: python benchmarks/bench_client.py [--requests 256] [--concurrency 32] [--json OUT]
Target: client / raw >= 0.9.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def start_engine(model_dir: str, port: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, "-m", "megatron_vespo", "serve-local", "--model", model_dir,
                             "--port", str(port), "--dtype", "float32"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def raw(url: str, bodies: list[dict], concurrency: int) -> float:
    import aiohttp

    limit = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def one(body):
            async with limit, session.post(url + "/generate", json=body) as answer:
                assert answer.status == 200, await answer.text()
                await answer.json()

        start = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        return time.perf_counter() - start


async def through_client(client, prompts, params) -> float:
    start = time.perf_counter()
    samples = await client.generate(prompts, params, return_routed_experts=True)
    elapsed = time.perf_counter() - start
    assert len(samples) == len(prompts)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()

    from megatron_vespo.convert.families import load_hf_config, model_config_from_hf
    from megatron_vespo.rollout import protocol
    from megatron_vespo.rollout.client import RolloutClient, wait_until_healthy
    from megatron_vespo.rollout.weight_sync import _free_port
    from tests.hf_models import make_hf_model

    with tempfile.TemporaryDirectory() as tmp:
        make_hf_model("qwen3_moe", tmp)
        m = model_config_from_hf(load_hf_config(tmp))
        port = _free_port()
        engine = start_engine(tmp, port)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_healthy([url], timeout_s=300, processes=[engine])
            prompts = [[1 + (i * 7 + j) % (m.vocab_size - 1) for j in range(8 + i % 8)] for i in range(args.requests)]
            params = {"max_new_tokens": args.max_new_tokens, "temperature": 1.0, "sampling_seed": 0,
                      "ignore_eos": True}
            bodies = [protocol.generate_request(p, params, rid=f"raw-{i}", return_routed_experts=True)
                      for i, p in enumerate(prompts)]
            client = RolloutClient([url], max_concurrency=args.concurrency, vocab_size=m.vocab_size,
                                   routing=(m.num_layers, m.moe_router_topk, m.num_experts))
            raw_s, client_s = [], []
            asyncio.run(raw(url, bodies[:16], args.concurrency))  # warm-up
            for _ in range(args.repeats):  # interleaved, so drift hits both alike
                raw_s.append(asyncio.run(raw(url, bodies, args.concurrency)))
                client_s.append(asyncio.run(through_client(client, prompts, params)))
        finally:
            engine.terminate()
            engine.wait(30)
    r, c = args.requests / min(raw_s), args.requests / min(client_s)
    result = dict(requests=args.requests, concurrency=args.concurrency, max_new_tokens=args.max_new_tokens,
                  raw_rps=r, client_rps=c, ratio=c / r)
    print(f"{args.requests} requests, concurrency {args.concurrency}, {args.max_new_tokens} new tokens each: "
          f"raw HTTP {r:.1f} req/s, RolloutClient {c:.1f} req/s, ratio {c / r:.3f} (target >= 0.9)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

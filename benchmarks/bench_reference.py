"""The KL term's reference model (algorithm.kl_coef > 0): what it costs in memory and time.

The trainer builds a second, frozen ``Policy(trainable=False)`` of the starting checkpoint in the
training layout and scores every rollout batch with it once (``Trainer._prepare``). This measures,
in one process on CPU (fp32 and bf16 parameters, the 29 M-parameter model of bench_scale.py):

* the reference model's tensor bytes (parameter storages) and the resident memory its build adds,
  against the policy's parameters (the plan's ``--kl-reference`` row counts exactly these bytes);
* the seconds of its scoring pass over a rollout batch against the policy's pi_old pass.

Usage: python benchmarks/bench_reference.py [--json OUT]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from proc_memory import status, storages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def worker(model: str, dtype: str, out: str) -> None:
    from bench_scale import make_samples
    from megatron_vespo.mcore.parallel import Layout
    from megatron_vespo.train.config import TrainConfig
    from megatron_vespo.train.policy import Policy

    torch.set_num_threads(1)
    cfg = TrainConfig()
    cfg.model.hf_dir, cfg.model.params_dtype = model, dtype
    policy = Policy(cfg, Layout())
    gc.collect()
    before = status("VmRSS")
    reference = Policy(cfg, Layout(), trainable=False, reuse_process_groups=True)
    gc.collect()
    added = status("VmRSS") - before
    params = lambda p: [t for chunk in p.chunks for t in chunk.parameters()]  # noqa: E731
    samples = make_samples([256] * 16, 16, 16000, 1)
    seconds = {}
    for name, p in (("policy", policy), ("reference", reference)):
        p.logprobs(samples)  # warm-up
        start = time.perf_counter()
        p.logprobs(samples)
        seconds[name] = time.perf_counter() - start
    with open(out, "w") as f:
        json.dump(dict(reference_bytes=sum(storages(params(reference)).values()),
                       policy_parameter_bytes=sum(storages(params(policy)).values()),
                       parameters=sum(t.numel() for t in params(reference)), rss_added=added, seconds=seconds), f)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    from bench_scale import STATE_MODEL, make_model

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        make_model(model, STATE_MODEL)
        for dtype in ("float32", "bfloat16"):
            out = os.path.join(tmp, f"{dtype}.json")
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MASTER_ADDR="127.0.0.1", MASTER_PORT="29571",
                       WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", model, dtype, out],
                                  env=env, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(proc.stderr[-3000:])
            with open(out) as f:
                r = json.load(f)
            results[dtype] = r
            mib = 2**20
            print(f"{dtype:8s} reference model {r['reference_bytes'] / mib:7.1f} MiB of parameters "
                  f"({r['parameters'] / 1e6:.1f} M; the policy's parameters {r['policy_parameter_bytes'] / mib:.1f} MiB, "
                  f"ratio {r['reference_bytes'] / r['policy_parameter_bytes']:.3f}), resident memory added "
                  f"{r['rss_added'] / mib:.1f} MiB; scoring 16 x 272 tokens: reference {r['seconds']['reference']:.2f} s, "
                  f"pi_old {r['seconds']['policy']:.2f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

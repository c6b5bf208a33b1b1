#!/usr/bin/env python
"""The GPU checks behind tools/gpu_check.sh: each prints one JSON line
``{"check": NAME, "status": "pass" | "fail" | "skip", "detail": ..., ...numbers}``.

    python tools/gpu_check.py env | train | parity | trainer_path | logprobs | te | sglang | mismatch --work DIR

* env       the GPU, the driver's CUDA, torch, and which extras are installed (TE, apex, SGLang)
* train     the trainer on the GPU under NCCL (a tiny all-MoE Qwen3-MoE, the local engine on the
            host): pi_old forwards, 3 optimizer steps, weight syncs and a checkpoint; then the
            checkpoint read back on the CPU path (``convert mcore-to-hf`` with the GPU hidden)
* parity    the loss hook's forward/backward on the GPU against the fp64 reference (local spec;
            the TE spec too when TransformerEngine is installed, with its TF32/bf16 tolerance)
* trainer_path  the trainer's real sequence of calls (parity/trainer_path.py) against the fp64
            reference: steps, weight syncs, checkpoint and resume, routing replay
* logprobs  the log-prob path (vocab-parallel log-softmax in token chunks, its backward) on bf16
            logits, as a fraction of the throughput of a device-to-device copy of the same logits
* te        TE-spec against local-spec logits in fp32 and bf16 (needs TransformerEngine)
* sglang    a real SGLang server on the GPU (needs SGLang in SGLANG_PYTHON's environment)
* mismatch  the mismatch command: the local engine's rollouts scored by Megatron on the GPU
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGPROB_TARGET = 0.8  # the log-prob path's throughput over a device-to-device copy of the logits


def report(check: str, status: str, detail: str, **numbers) -> int:
    print(json.dumps({"check": check, "status": status, "detail": detail, **numbers}), flush=True)
    return 0 if status != "fail" else 1


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _run(cmd: list[str], env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def _tail(proc: subprocess.CompletedProcess, n: int = 600) -> str:
    return (proc.stderr or proc.stdout or "")[-n:].replace("\n", " | ")


def _tiny_model(work: str) -> str:
    """The demo's warm-started all-MoE Qwen3-MoE (it has rewards to learn from)."""
    from megatron_vespo.train.demo import build_model

    return build_model(os.path.join(work, "model"), "reverse", log=lambda message: None, digits=(2, 3))


# -- the checks --------------------------------------------------------------------------------------


def check_env(args) -> int:
    import torch

    if not torch.cuda.is_available():
        return report("env", "fail", "no CUDA device visible to torch")
    props = torch.cuda.get_device_properties(0)
    extras = {name: _installed(module) for name, module in
              (("transformer_engine", "transformer_engine"), ("apex", "apex"), ("megatron_core", "megatron.core"))}
    sglang_python = os.environ.get("SGLANG_PYTHON", "")
    extras["sglang"] = bool(sglang_python) and _run([sglang_python, "-c", "import sglang"]).returncode == 0
    return report("env", "pass", f"{props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, "
                  f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)", extras=extras)


def check_train(args) -> int:
    model = _tiny_model(args.work)
    run_dir = os.path.join(args.work, "train")
    overrides = [f"model.hf_dir={model}", f"run.run_dir={run_dir}", "run.steps=3", "run.save_every=0",
                 "algorithm.staleness=1", "rollout.prompts_per_batch=8", "rollout.group_size=4",
                 "data.synthetic_max_digits=3", "run.tensorboard=false", "run.plot=false", "run.resume=false"]
    start = time.perf_counter()
    proc = _run([sys.executable, "-m", "megatron_vespo", "train", "--config",
                 os.path.join(ROOT, "examples", "configs", "demo_cpu.yaml"), *overrides])
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        return report("train", "fail", f"megatron-vespo train on the GPU: {_tail(proc)}")
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    exported = os.path.join(args.work, "exported")
    back = _run([sys.executable, "-m", "megatron_vespo", "convert", "mcore-to-hf", "--ckpt",
                 os.path.join(run_dir, "checkpoints", "step-3"), "--out", exported], env={"CUDA_VISIBLE_DEVICES": ""})
    if back.returncode != 0:
        return report("train", "fail", f"the GPU checkpoint did not read back on the CPU path: {_tail(back)}")
    finite = all(row["grad_norm"] == row["grad_norm"] and abs(row["policy_loss"]) < 1e6 for row in rows)
    status = "pass" if len(rows) == 3 and finite else "fail"
    grad_norms = ", ".join(f"{row['grad_norm']:.3f}" for row in rows)
    return report("train", status, f"3 steps on the GPU in {seconds:.0f} s (grad norms "
                  f"{grad_norms}); checkpoint exported on the CPU path",
                  seconds=seconds)


def check_parity(args) -> int:
    """The parity command itself on the GPU (``--device gpu``): its tolerance follows the spec."""
    from megatron_vespo.parity.launcher import default_tolerance

    out = os.path.join(args.work, "parity.json")
    proc = _run([sys.executable, "-m", "megatron_vespo", "parity", "--device", "gpu", "--layouts", "single",
                 "--losses", "vespo,grpo", "--formats", "padded,packed", "--correction", "tis", "--json", out])
    if not os.path.exists(out):
        return report("parity", "fail", f"megatron-vespo parity --device gpu: {_tail(proc)}")
    tolerance, why = default_tolerance("gpu")
    rows = json.load(open(out))["rows"]
    worst_loss = max(r.get("loss_rel_diff", float("inf")) for r in rows)
    worst_grad = max(r.get("grad_rel_diff", float("inf")) for r in rows)
    worst_param = max(rows, key=lambda r: r.get("grad_rel_diff", float("inf"))).get("worst_param", "?")
    status = "pass" if proc.returncode == 0 else "fail"
    return report("parity", status, f"{why}; vs the fp64 reference: worst loss {worst_loss:.2e}, worst gradient "
                  f"{worst_grad:.2e} ({worst_param}), tolerance {tolerance:g}",
                  loss_rel_diff=worst_loss, grad_rel_diff=worst_grad)


# the bars of tests/test_trainer_path.py (fp32 trainer against the fp64 reference)
TRAINER_PATH_BARS = {"loss_abs_diff": 1e-4, "grad_rel_diff": 1e-3, "update_rel_diff": 1e-2,
                     "grad_norm_rel_diff": 1e-4, "engine_rel_diff": 1e-2}


def check_trainer_path(args) -> int:
    """The trainer's real sequence of calls on the GPU (build and HF load, pi_old, optimizer steps,
    weight syncs, checkpoint, resume; routing replay none/r2/r3) against the fp64 reference."""
    out = os.path.join(args.work, "trainer_path.json")
    start = time.perf_counter()
    proc = _run([sys.executable, "-m", "megatron_vespo.parity.trainer_path", "--layout", "single", "--work",
                 os.path.join(args.work, "trainer_path"), "--json-out", out])
    if proc.returncode != 0 or not os.path.exists(out):
        return report("trainer_path", "fail", f"parity.trainer_path on the GPU: {_tail(proc)}")
    rows = json.load(open(out))["rows"]
    worst = {key: max((r[key] for r in rows if key in r), default=float("nan")) for key in TRAINER_PATH_BARS}
    failed = [key for key, bar in TRAINER_PATH_BARS.items() if not worst[key] < bar]
    steps = sum(r["event"] == "optimizer_step" for r in rows)
    detail = (f"{steps} optimizer steps and {len(rows) - steps} weight syncs (none/r2/r3, fresh and resumed) in "
              f"{time.perf_counter() - start:.0f} s; worst: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    if failed:
        detail += f"; over the bar: {failed}"
    return report("trainer_path", "fail" if failed else "pass", detail, **worst)


def check_logprobs(args) -> int:
    import torch

    from megatron_vespo.logprobs import vocab_parallel_logprobs

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens, vocab = (8192, 151936) if device == "cuda" else (64, 1024)
    logits = torch.randn(tokens, vocab, device=device, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,), device=device)
    rows = torch.arange(tokens, device=device)

    def timed(fn, repeat=10):
        for _ in range(3):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeat

    def logprob_pass(inplace_grad):
        # torch.autograd.grad, as in training, where the gradient flows on into the output layer:
        # .backward() on this leaf would clone an in-place gradient into .grad (one more copy)
        logp, _ = vocab_parallel_logprobs(logits, rows, targets, inplace_grad=inplace_grad)
        torch.autograd.grad(logp, logits, grad_outputs=torch.ones_like(logp))

    copy_s = timed(lambda: logits.detach().clone())
    # the trainer's setting (hook.py: the gradient written into the logits' memory) and the plain one
    trainer_s = timed(lambda: logprob_pass(True))
    plain_s = timed(lambda: logprob_pass(False))
    # forward and backward each read the logits once and the backward writes their gradient: three
    # passes over the logits, where the copy makes two (one read, one write)
    ratio = 1.5 * copy_s / trainer_s
    status = "pass" if ratio >= LOGPROB_TARGET else "fail"
    return report("logprobs", status, f"{tokens} x {vocab} bf16 logits on {device}: copy {copy_s * 1e3:.2f} ms, "
                  f"log-prob forward+backward {trainer_s * 1e3:.2f} ms (gradient in place; "
                  f"{plain_s * 1e3:.2f} ms without): {ratio:.2f} of the copy's throughput (target >= {LOGPROB_TARGET})",
                  copy_ms=copy_s * 1e3, path_ms=trainer_s * 1e3, plain_path_ms=plain_s * 1e3, ratio=ratio)


def _score(model: str, inputs: str, dtype: str, spec: str) -> list[list[float]]:
    """``megatron-vespo score --backend mcore`` under one layer spec: per-token log-probs."""
    from megatron_vespo.mcore.model import LAYER_SPEC_ENV

    proc = _run([sys.executable, "-m", "megatron_vespo", "score", "--backend", "mcore", "--model", model,
                 "--input", inputs, "--dtype", dtype], env={LAYER_SPEC_ENV: spec})
    if proc.returncode != 0:
        raise RuntimeError(f"score ({spec} spec, {dtype}): {_tail(proc)}")
    return [json.loads(line)["logprobs"] for line in proc.stdout.splitlines() if line.startswith("{")]


def _score_inputs(work: str, vocab: int, sequences: int = 8, length: int = 96) -> str:
    import random

    rng = random.Random(0)
    path = os.path.join(work, "score_inputs.jsonl")
    with open(path, "w") as f:
        for _ in range(sequences):
            f.write(json.dumps({"input_ids": [rng.randrange(vocab) for _ in range(length)]}) + "\n")
    return path


def check_te(args) -> int:
    """The same HF weights under TransformerEngine's spec and the local spec: per-token log-probs
    (the logits' log-softmax at the next token) in fp32 and bf16, max |difference| reported."""
    if not _installed("transformer_engine"):
        return report("te", "skip", "TransformerEngine is not installed on this machine (pip install -e '.[gpu]')")
    model = _tiny_model(args.work)
    vocab = json.load(open(os.path.join(model, "config.json")))["vocab_size"]
    inputs = _score_inputs(args.work, vocab)
    gaps = {}
    for dtype in ("float32", "bfloat16"):
        te, local = _score(model, inputs, dtype, "te"), _score(model, inputs, dtype, "local")
        gaps[dtype] = max(abs(a - b) for x, y in zip(te, local) for a, b in zip(x, y))
    # TF32 GEMMs in TE against full fp32 in torch: logits differ at ~1e-3 relative
    status = "pass" if gaps["float32"] < 2e-2 else "fail"
    return report("te", status, f"TE spec vs local spec, max |delta logp| over {len(te)} x {len(te[0])} tokens: "
                  f"fp32 {gaps['float32']:.2e} (TE's fp32 GEMMs are TF32), bf16 {gaps['bfloat16']:.2e}",
                  max_abs_delta_fp32=gaps["float32"], max_abs_delta_bf16=gaps["bfloat16"])


def check_sglang(args) -> int:
    """A real SGLang server on the GPU: /generate with log-probs and routed experts, its log-probs
    against Megatron's (``score``), and every weight-sync route (disk, tensor, distributed) making
    the server equal to a second model's weights."""
    sglang_python = os.environ.get("SGLANG_PYTHON", "")
    if not sglang_python or _run([sglang_python, "-c", "import sglang"]).returncode != 0:
        return report("sglang", "skip", "no SGLang on this machine (set SGLANG_PYTHON to a venv with sglang 0.5.23)")
    proc = _run([sys.executable, os.path.join(ROOT, "tools", "gpu_check_sglang.py"), "--work", args.work,
                 "--sglang-python", sglang_python], timeout=900)
    line = next((line for line in reversed(proc.stdout.splitlines()) if line.startswith('{"check"')), None)
    if line is None:
        return report("sglang", "fail", f"tools/gpu_check_sglang.py: {_tail(proc)}")
    print(line, flush=True)
    return 0 if '"status": "pass"' in line else 1


def check_mismatch(args) -> int:
    model = _tiny_model(args.work)
    out = os.path.join(args.work, "mismatch")
    proc = _run([sys.executable, "-m", "megatron_vespo", "mismatch", "--engine", "local", "--model", model,
                 "--prompts", "synthetic:reverse", "--n", "4", "--num-prompts", "16", "--max-new-tokens", "6",
                 "--r3", "--out", out])
    if proc.returncode != 0:
        return report("mismatch", "fail", f"the mismatch command: {_tail(proc)}")
    passes = json.load(open(os.path.join(out, "report.json")))["passes"]
    worst = {name: p["token"]["abs_delta"]["max"] for name, p in passes.items()}
    return report("mismatch", "pass", "local engine (bf16, host) vs Megatron on the GPU: max |delta logp| "
                  + ", ".join(f"{k} {v:.3g}" for k, v in worst.items()), **{f"max_abs_delta_{k}": v for k, v in worst.items()})


CHECKS = {"env": check_env, "train": check_train, "parity": check_parity, "trainer_path": check_trainer_path,
          "logprobs": check_logprobs,
          "te": check_te, "sglang": check_sglang, "mismatch": check_mismatch}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("check", choices=sorted(CHECKS))
    parser.add_argument("--work", default=os.path.join(ROOT, "runs", "gpu_check"))
    args = parser.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    sys.path.insert(0, ROOT)
    try:
        return CHECKS[args.check](args)
    except Exception as err:  # one check's failure is its row in the table, not the end of the run
        return report(args.check, "fail", f"{type(err).__name__}: {err}")


if __name__ == "__main__":
    sys.exit(main())

"""The Triton log-prob kernels (megatron_vespo/logprobs_kernels.py), run by Triton's interpreter on
CPU tensors, against the chunked torch path and an fp64 reference.

TRITON_INTERPRET=1 must be set before Triton is imported, and other tests share this process, so
the checks run in child processes: this file, run as a script, is the worker (``python
tests/test_logprob_kernels.py CASE...`` prints one JSON line, case -> "ok" or the failure), and
under torchrun it is a 2-rank TP worker. The pytest process itself never imports Triton.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
MARK = "LOGPROB_KERNEL_RESULTS "


# ----------------------------------------------------------------------------------------------
# worker side (child processes, TRITON_INTERPRET=1)


_CALLS = {"row_stats": 0, "logit_grad": 0}


def _counting_kernels():
    """The kernels module, its calls counted (from 0 again on every call of this), so a case can
    tell that the Triton path ran."""
    from megatron_vespo import logprobs_kernels as K

    if not getattr(K, "_counted", False):
        for name in _CALLS:
            def counted(*args, _fn=getattr(K, name), _name=name, **kwargs):
                _CALLS[_name] += 1
                return _fn(*args, **kwargs)

            setattr(K, name, counted)
        K._counted = True
    _CALLS.update(row_stats=0, logit_grad=0)
    return K, _CALLS


def _reference(logits, rows, targets, vocab_start, temperature, weights):
    """fp64 single-shard reference: logp = (z_y if the shard owns y else 0) - log Z, the entropy of
    softmax(z), and d (sum_i w_i logp_i) / d logits (zero rows where not asked)."""
    z = logits.detach().double()[rows] / temperature
    local = targets - vocab_start
    owned = (local >= 0) & (local < z.shape[1])
    log_p = torch.log_softmax(z, dim=-1)
    target = torch.where(owned, z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None])[:, 0], 0.0)
    logp = target - torch.logsumexp(z, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    onehot = torch.zeros_like(z)
    onehot[owned.nonzero()[:, 0], local[owned]] = 1.0
    grad = torch.zeros(logits.shape, dtype=torch.float64)
    grad[rows] = (onehot - log_p.exp()) * weights.double()[:, None] / temperature
    return logp, entropy, grad


def _run_path(kernel, make_logits, rows, targets, vocab_start, temperature, weights, inplace):
    """logp, entropy, the gradient, and the logits after the backward, on one path."""
    from megatron_vespo import logprobs

    logprobs.KERNEL = kernel
    logits = make_logits()
    logp, entropy = logprobs.vocab_parallel_logprobs(logits, rows, targets, vocab_start=vocab_start,
                                                     temperature=temperature, inplace_grad=inplace)
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    assert logp.requires_grad and not entropy.requires_grad
    version = logits._version
    (grad,) = torch.autograd.grad((logp * weights).sum(), logits)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    assert (grad.data_ptr() == logits.data_ptr()) == inplace, "in place iff inplace_grad"
    if inplace:
        assert logits._version > version, "an in-place gradient must move the logits' version counter"
    return logp.detach(), entropy, grad, logits.detach()


def _close_in_dtype(got, want, dtype, what):
    """got (logits' dtype) vs want (fp64 or another path): fp32 rounding, or one 16-bit ulp (the
    interpreter rounds fp32 -> bf16 toward zero, a GPU to nearest)."""
    got, want = got.detach().double(), want.detach().double()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=lambda m: f"{what}: {m}")
    else:
        ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)  # spacing / |value| at most
        bad = (got - want).abs() > ulp * torch.maximum(got.abs(), want.abs()) + 1e-7
        assert not bad.any(), (f"{what}: {int(bad.sum())} entries off by more than one {dtype} ulp, "
                               f"max abs diff {float((got - want).abs().max()):.3g}")


def _single_shard_case(dtype, positions, vocab, rows, vocab_start, temperature, inplace, block=None,
                       row_pad=0, target_range=None, ramp=0.0, poison=False, seed=0):
    """One rank (group None): the Triton path vs the torch path vs fp64."""
    K, calls = _counting_kernels()
    saved = (K.FWD_BLOCK, K.BWD_BLOCK)
    if block:
        K.FWD_BLOCK = K.BWD_BLOCK = block
    try:
        gen = torch.Generator().manual_seed(seed)
        base = 3 * torch.randn(positions, vocab + row_pad, generator=gen)
        if ramp:  # rows rising / falling along the vocab: the running max moves by far, or never
            slope = torch.linspace(-ramp, ramp, vocab + row_pad)
            base += torch.stack([slope if r % 2 else slope.flip(0) for r in range(positions)])
        base = base.to(dtype)
        unused = torch.ones(positions, dtype=torch.bool)
        unused[rows] = False
        if poison:  # rows not asked for are never read: NaN / inf there must not leak
            base[unused.nonzero()[::2, 0]] = float("nan")
            base[unused.nonzero()[1::2, 0]] = float("inf")
        rows = torch.tensor(rows)
        lo, hi = target_range or (vocab_start, vocab_start + vocab)
        targets = torch.randint(lo, hi, (rows.numel(),), generator=gen)
        weights = torch.randn(rows.numel(), generator=gen)

        def make_logits():  # a non-leaf (like a model's output), row stride vocab + row_pad
            logits = base.clone().requires_grad_(True) * 1
            return logits[:, :vocab] if row_pad else logits

        assert make_logits().stride() == (vocab + row_pad, 1)
        kernel_out = _run_path("triton", make_logits, rows, targets, vocab_start, temperature, weights, inplace)
        assert calls["row_stats"] == 1 and calls["logit_grad"] == 1, f"the Triton path did not run: {calls}"
        torch_out = _run_path("torch", make_logits, rows, targets, vocab_start, temperature, weights, inplace)
        assert calls["row_stats"] == 1 and calls["logit_grad"] == 1, f"the torch path ran kernels: {calls}"
        ref_logp, ref_entropy, ref_grad = _reference(base[:, :vocab], rows, targets, vocab_start, temperature,
                                                     weights)
        logp, entropy, grad, after = kernel_out
        t_logp, t_entropy, t_grad, _ = torch_out
        torch.testing.assert_close(logp, t_logp, rtol=2e-6, atol=2e-6, msg=lambda m: f"logp vs torch: {m}")
        torch.testing.assert_close(entropy, t_entropy, rtol=2e-6, atol=2e-6, msg=lambda m: f"entropy vs torch: {m}")
        torch.testing.assert_close(logp.double(), ref_logp, rtol=2e-6, atol=2e-6,
                                   msg=lambda m: f"logp vs fp64: {m}")
        torch.testing.assert_close(entropy.double(), ref_entropy, rtol=2e-6, atol=2e-6,
                                   msg=lambda m: f"entropy vs fp64: {m}")
        _close_in_dtype(grad, t_grad, dtype, "gradient vs torch")
        _close_in_dtype(grad, ref_grad, dtype, "gradient vs fp64")
        for g in (grad, t_grad):  # +0.0, bit for bit
            assert not (g[unused] != 0).any() and not g[unused].signbit().any(), "rows not asked for: zeros"
        assert (grad[rows] != 0).any()
        if not inplace:
            torch.testing.assert_close(after, base[:, :vocab], rtol=0, atol=0, equal_nan=True,
                                       msg="without inplace_grad the logits stay as they were")
    finally:
        K.FWD_BLOCK, K.BWD_BLOCK = saved


def _two_shard_case(dtype, temperature, block):
    """The kernels on the two vocab shards of one vocabulary, combined as logprobs.py combines
    ranks, vs fp64 log_softmax over the full vocabulary (targets on either shard)."""
    from megatron_vespo import logprobs_kernels as K

    gen = torch.Generator().manual_seed(5)
    positions, shard = 10, 150
    full = (4 * torch.randn(positions, 2 * shard, generator=gen)).to(dtype)
    rows = torch.tensor([0, 3, 4, 5, 8])
    targets = torch.randint(0, 2 * shard, (rows.numel(),), generator=gen)
    targets[:2] = torch.tensor([3, 2 * shard - 1])  # one on each shard at least
    weights = torch.randn(rows.numel(), generator=gen)
    shards = [full[:, r * shard:(r + 1) * shard].contiguous() for r in range(2)]
    local = torch.stack([K.row_stats(s, rows, targets - r * shard, temperature, block=block)
                         for r, s in enumerate(shards)])
    lse_r, neg_entropy_r, target_r = local.unbind(-1)
    log_z = torch.logsumexp(lse_r, dim=0)
    log_w = lse_r - log_z
    entropy = -(log_w.exp() * (neg_entropy_r + log_w)).sum(0)
    logp = target_r.sum(0) - log_z
    grad = torch.cat([K.logit_grad(s, rows, targets - r * shard, log_z, weights, temperature, block=block)
                      for r, s in enumerate(shards)], dim=1)
    ref_logp, ref_entropy, ref_grad = _reference(full, rows, targets, 0, temperature, weights)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=2e-6, atol=2e-6, msg=lambda m: f"logp: {m}")
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=2e-6, atol=2e-6, msg=lambda m: f"entropy: {m}")
    torch.testing.assert_close(lse_r[0].double(), torch.logsumexp(shards[0].double()[rows] / temperature, -1),
                               rtol=2e-6, atol=2e-6, msg=lambda m: f"shard log-sum-exp: {m}")
    _close_in_dtype(grad, ref_grad, dtype, "gradient")


def _neg_inf_case():
    """-inf logits (e.g. masked vocabulary), whole chunks of them included: the kernels' guards keep
    the log-sum-exp, the entropy (0 log 0 = 0) and the gradient (0 there) finite and exact. A NaN
    or +inf logit still makes the row's log-sum-exp NaN (the hook's finiteness check needs that)."""
    from megatron_vespo import logprobs_kernels as K

    gen = torch.Generator().manual_seed(9)
    logits = 3 * torch.randn(6, 300, generator=gen)
    logits[0, :128] = float("-inf")  # the first two chunks of 64
    logits[1, 200:] = float("-inf")  # the last chunk (a 44-column tail) and part of the one before
    logits[2, ::3] = float("-inf")
    logits[4, 77] = float("nan")
    logits[5, 299] = float("inf")
    bad = K.row_stats(logits, torch.tensor([4, 5]), torch.tensor([0, 1]), 0.9, block=64)
    assert bad[:, 0].isnan().all(), f"a NaN / inf logit must give a NaN log-sum-exp: {bad}"
    rows, targets = torch.tensor([0, 1, 2]), torch.tensor([150, 10, 4])
    weights = torch.randn(3, generator=gen)
    stats = K.row_stats(logits, rows, targets, 0.9, block=64)
    z = logits.double()[rows] / 0.9
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    torch.testing.assert_close(stats[:, 0].double(), torch.logsumexp(z, -1), rtol=2e-6, atol=2e-6)
    neg_entropy = torch.where(p > 0, p * log_p, 0.0).sum(-1)
    torch.testing.assert_close(stats[:, 1].double(), neg_entropy, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(stats[:, 2].double(), z.gather(1, targets[:, None])[:, 0], rtol=1e-6, atol=1e-6)
    grad = K.logit_grad(logits, rows, targets, stats[:, 0], weights, 0.9, block=64)
    ref = torch.zeros(6, 300, dtype=torch.float64)
    ref[rows] = (torch.zeros_like(z).scatter_(1, targets[:, None], 1.0) - p) * weights.double()[:, None] / 0.9
    torch.testing.assert_close(grad.double(), ref, rtol=1e-5, atol=1e-7)
    assert (grad[logits == float("-inf")] == 0).all() and (grad[3:] == 0).all()


def _empty_rows_case():
    """No rows asked for: empty results and an all-zero gradient."""
    K, calls = _counting_kernels()
    from megatron_vespo import logprobs

    logprobs.KERNEL = "triton"
    logits = (torch.randn(5, 40).bfloat16().requires_grad_(True) * 1)
    logp, entropy = logprobs.vocab_parallel_logprobs(logits, torch.zeros(0, dtype=torch.long),
                                                     torch.zeros(0, dtype=torch.long), inplace_grad=True)
    assert logp.shape == (0,) and entropy.shape == (0,)
    (grad,) = torch.autograd.grad(logp.sum(), logits, allow_unused=True)
    assert grad.data_ptr() == logits.data_ptr() and (grad == 0).all() and calls["logit_grad"] == 1


CASES = {
    # fp32, 300 columns in chunks of 128 (two full chunks and a tail), rows 0, 2-4, 9, 12
    "fp32_blocks_T0.7": lambda: _single_shard_case(torch.float32, 13, 300, [0, 2, 3, 4, 9, 12], 0, 0.7,
                                                   inplace=False, block=128),
    "fp32_blocks_T0.7_inplace": lambda: _single_shard_case(torch.float32, 13, 300, [0, 2, 3, 4, 9, 12], 0, 0.7,
                                                           inplace=True, block=128),
    # logits rising or falling by 60 along the row: chunk maxima far apart, merged with rescaling
    "fp32_ramps_T0.7": lambda: _single_shard_case(torch.float32, 8, 300, [0, 1, 2, 5, 6], 0, 0.7,
                                                  inplace=False, block=64, ramp=30.0),
    # bf16 shard starting at 100 of a 600-token vocabulary: most targets are on other shards
    "bf16_shard_outside_targets_T1.3_inplace": lambda: _single_shard_case(
        torch.bfloat16, 11, 257, [1, 2, 6, 7, 8, 10], 100, 1.3, inplace=True, block=64, target_range=(0, 600),
        poison=True),
    "bf16_shard_outside_targets_T1.3": lambda: _single_shard_case(
        torch.bfloat16, 11, 257, [1, 2, 6, 7, 8, 10], 100, 1.3, inplace=False, block=64, target_range=(0, 600),
        poison=True),
    # default block sizes (one partial block), fp16, T = 1
    "fp16_default_blocks": lambda: _single_shard_case(torch.float16, 7, 300, [1, 5, 6], 0, 1.0, inplace=True),
    # rows of a wider tensor (row stride 256 for 200 columns), in place into that strided view
    "bf16_row_stride_inplace": lambda: _single_shard_case(torch.bfloat16, 9, 200, [0, 4, 5, 8], 0, 0.9,
                                                          inplace=True, block=64, row_pad=56),
    "fp32_row_stride": lambda: _single_shard_case(torch.float32, 9, 200, [3, 4, 5], 0, 0.9, inplace=False,
                                                  block=64, row_pad=56, poison=True),
    "two_shards_fp32_T0.8": lambda: _two_shard_case(torch.float32, 0.8, 64),
    "two_shards_bf16_T0.8": lambda: _two_shard_case(torch.bfloat16, 0.8, 64),
    "neg_inf_logits": _neg_inf_case,
    "empty_rows": _empty_rows_case,
}


def _worker(names):
    results = {}
    for name in names:
        try:
            CASES[name]()
            results[name] = "ok"
        except Exception as exc:  # report every case, not just the first failure
            results[name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}"
    print(MARK + json.dumps(results), flush=True)


def _tp_worker():
    """Under torchrun (2 gloo ranks): the real TP combination on the Triton path vs fp64."""
    import torch.distributed as dist

    K, calls = _counting_kernels()
    from megatron_vespo import comm, logprobs

    logprobs.KERNEL = "triton"
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(11)
    shard, positions = 96, 12
    full = (4 * torch.randn(positions, shard * world, generator=gen)).bfloat16()
    rows = torch.tensor([0, 1, 2, 5, 9, 10, 11])
    targets = torch.randint(0, shard * world, (rows.numel(),), generator=gen)
    weights = torch.randn(rows.numel(), generator=gen)
    logits = full[:, rank * shard:(rank + 1) * shard].clone().requires_grad_(True) * 1
    before = comm.COUNTER[logprobs.TP_TAG]
    logp, entropy = logprobs.vocab_parallel_logprobs(logits, rows, targets, vocab_start=rank * shard,
                                                     temperature=0.8, group=dist.group.WORLD, inplace_grad=True)
    assert comm.COUNTER[logprobs.TP_TAG] - before == 1, "expected exactly one TP collective"
    (grad,) = torch.autograd.grad((logp * weights).sum(), logits)
    assert calls == {"row_stats": 1, "logit_grad": 1}, calls
    ref_logp, ref_entropy, ref_grad = _reference(full, rows, targets, 0, 0.8, weights)
    torch.testing.assert_close(logp.detach().double(), ref_logp, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=2e-6, atol=2e-6)
    _close_in_dtype(grad, ref_grad[:, rank * shard:(rank + 1) * shard], torch.bfloat16, "gradient")
    dist.barrier()
    if rank == 0:
        print("LOGPROB_KERNELS_TP_OK", flush=True)
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# pytest side (never imports Triton)

if __name__ != "__main__":
    import pytest

    pytestmark = pytest.mark.skipif(
        importlib.util.find_spec("triton") is None
        and not (platform.system() == "Linux" and platform.machine() == "x86_64"),
        reason="no Triton for this platform (the test extra installs it on Linux x86_64)",
    )

    def _child_env():
        env = dict(os.environ)
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore",
                   MEGATRON_VESPO_LOGPROB_KERNEL="triton")
        env.setdefault("OMP_NUM_THREADS", "1")
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    @pytest.fixture(scope="module")
    def interpreter_results():
        """Every case, in one child process (importing torch and Triton once)."""
        proc = subprocess.run([sys.executable, str(HERE), *CASES], env=_child_env(), cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
        if proc.returncode != 0 or not lines:
            pytest.fail(f"the interpreter worker failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                        f"{proc.stderr[-5000:]}")
        return json.loads(lines[-1][len(MARK):])

    @pytest.mark.slow
    @pytest.mark.parametrize("case", list(CASES))
    def test_triton_kernels_match_torch_path_and_fp64(interpreter_results, case):
        assert interpreter_results[case] == "ok", interpreter_results[case]

    @pytest.mark.slow
    def test_triton_path_under_real_tp_group():
        """2 gloo ranks: one all-gather, bf16 logits, targets on both shards, in-place gradient."""
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(HERE),
               "--tp"]
        proc = subprocess.run(cmd, env=_child_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0 and "LOGPROB_KERNELS_TP_OK" in proc.stdout, (
            f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")

    def test_dispatch_picks_torch_where_triton_does_not_apply(monkeypatch):
        from megatron_vespo import logprobs

        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        cpu = torch.zeros(2, 8)
        monkeypatch.setattr(logprobs, "KERNEL", "auto")
        assert logprobs._use_kernels(cpu) is None  # CPU logits: the torch path
        monkeypatch.setattr(logprobs, "KERNEL", "triton")
        assert logprobs._use_kernels(cpu.double()) is None  # fp64 always takes the torch path
        assert logprobs._use_kernels(torch.zeros(8, 2).t()) is None  # vocab dim not contiguous
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            logprobs._use_kernels(cpu)  # forced, but CPU tensors without the interpreter
        monkeypatch.setattr(logprobs, "KERNEL", "cuda")
        with pytest.raises(ValueError, match="must be one of"):
            logprobs._use_kernels(cpu)


if __name__ == "__main__":
    if sys.argv[1:] == ["--tp"]:
        _tp_worker()
    else:
        _worker(sys.argv[1:] or list(CASES))

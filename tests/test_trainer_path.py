"""The trainer's real sequence of calls against a single-process fp64 reference, at every optimizer
step (megatron_vespo.parity.trainer_path): model build and load, pi_old forward, train steps,
weight sync, next batch, checkpoint, resume; routing replay off, R2 and R3; six layouts."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, _env

pytestmark = pytest.mark.slow  # every test here starts processes (conftest: the fast tier)

MODES = ("none", "r2", "r3")
STEPS = 4  # 2 rollout batches x staleness 2
RESUMED_FROM = 2


def run_check(layout: str, tmp_path, *extra: str) -> list[dict]:
    world = 1 if layout == "single" else 2
    out = tmp_path / "report.json"
    cmd = [sys.executable]
    if world > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    cmd += ["-m", "megatron_vespo.parity.trainer_path", "--layout", layout, "--work", str(tmp_path / "work"),
            "--json-out", str(out), *extra]
    proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())["rows"]


@pytest.mark.parametrize("layout", ["single", "dp2", "tp2", "pp2", "ep2", "cp2"])
def test_trainer_path_matches_the_fp64_reference(layout, tmp_path):
    """dp2 and ep2 run Megatron's distributed optimizer (the default at dp > 1)."""
    assert_matches(layout, run_check(layout, tmp_path), MODES)


def test_trainer_path_with_overlapped_grad_reduce_and_param_gather(tmp_path):
    """The distributed optimizer's overlap options: gradients reduce-scattered during the backward,
    the updated weights gathered in the next forward (or before a weight sync or a checkpoint)."""
    rows = run_check("dp2", tmp_path, "--modes", "none", "--override", "optimizer.overlap_grad_reduce=true",
                     "--override", "optimizer.overlap_param_gather=true")
    assert_matches("dp2 overlapped", rows, ("none",))


@pytest.mark.parametrize("layout", ["dp2", "pp2"])
def test_trainer_path_with_a_token_budget(layout, tmp_path):
    """Micro-batches packed to a 40-token budget (sequences of 5 to 20 tokens): at dp2 balanced
    over the ranks, each micro-batch its own width; at pp2 all padded to the widest."""
    rows = run_check(layout, tmp_path, "--modes", "none", "--override", "algorithm.max_tokens_per_micro_batch=40",
                     "--override", "algorithm.micro_batch_size=0")
    assert_matches(f"{layout} token budget", rows, ("none",))
    steps = [r for r in rows if r["event"] == "optimizer_step"]
    widths = [w for r in steps for rank in r["micro_batch_widths"] for w in rank]
    assert max(widths) <= 40
    if layout == "pp2":  # pipeline stages exchange one shape
        assert all(len(set(rank)) == 1 for r in steps for rank in r["micro_batch_widths"])
    else:
        assert any(len(set(rank)) > 1 for r in steps for rank in r["micro_batch_widths"])


def test_trainer_path_with_a_kl_term_and_an_entropy_bonus(tmp_path):
    """algorithm.kl_coef (k3, to the starting model, scored by the trainer's frozen reference
    Policy at tp2) and algorithm.entropy_coef (its gradient vocab-parallel), fresh and resumed."""
    rows = run_check("tp2", tmp_path, "--modes", "none", "--override", "algorithm.kl_coef=0.2",
                     "--override", "algorithm.entropy_coef=0.02")
    assert_matches("tp2 kl + entropy", rows, ("none",))


def assert_matches(layout, rows, modes):
    for mode in modes:
        steps = [r for r in rows if r["mode"] == mode and r["event"] == "optimizer_step"]
        fresh = [r for r in steps if r["phase"] == "fresh"]
        resumed = [r for r in steps if r["phase"] == "resumed"]
        assert [r["step"] for r in fresh] == list(range(1, STEPS + 1))
        assert [r["step"] for r in resumed] == list(range(RESUMED_FROM + 1, STEPS + 1))
        for r in steps:
            where = f"{layout} {mode} {r['phase']} step {r['step']}"
            assert r["ids_equal"], f"{where}: the mini-batch split differs"
            assert r["loss_abs_diff"] < 1e-4, f"{where}: loss {r['loss']} vs {r['ref_loss']}"
            assert r["grad_rel_diff"] < 1e-3, f"{where}: gradient {r['grad_worst']} off by {r['grad_rel_diff']:.2e}"
            assert r["update_rel_diff"] < 1e-2, f"{where}: update {r['update_worst']} off by {r['update_rel_diff']:.2e}"
            assert r["grad_norm_rel_diff"] < 1e-4, f"{where}: grad norm off by {r['grad_norm_rel_diff']:.2e}"
            # the per-group norms add up to the optimizer's norm
            assert r["group_norms_rel_diff"] < 1e-6, where
        # PAD is sampled mid-response in the first mini-batch: its frozen row got no gradient
        assert fresh[0]["pad_row_grad"] == 0.0
        # resuming from the mid-run checkpoint reproduces the uninterrupted run exactly
        for before, after in zip(fresh[RESUMED_FROM:], resumed):
            assert after["loss"] == before["loss"] and after["grad_rel_diff"] == before["grad_rel_diff"]
        syncs = [r for r in rows if r["mode"] == mode and r["event"] == "weight_sync"]
        assert [(r["phase"], r["step"]) for r in syncs] == [("fresh", 2), ("fresh", 4), ("resumed", 2),
                                                             ("resumed", 4)]
        for r in syncs:
            assert r["engine_rel_diff"] < 1e-2, f"{layout} {mode}: engine weight {r['engine_worst']} after a sync"


def test_trainer_path_check_fails_for_a_wrong_advantage(tmp_path):
    """Negative control: population-std advantages in the trainer (sqrt(4/3) larger) must fail."""
    rows = run_check("single", tmp_path, "--modes", "none", "--negative-control")
    steps = [r for r in rows if r["event"] == "optimizer_step"]
    assert steps and all(r["grad_rel_diff"] > 0.05 for r in steps)

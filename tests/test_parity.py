"""`megatron-vespo parity`: Megatron-Core forward/backward with the hook under real layouts
(torchrun on gloo) against the single-process plain-PyTorch reference."""

import json

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow  # every test here starts processes (conftest: the fast tier)


def run_parity(tmp_path, *args):
    out = tmp_path / "parity.json"
    proc = run_cli("parity", *args, "--json", str(out))
    report = json.loads(out.read_text()) if out.exists() else None
    return proc, report


def assert_all_ok(proc, report, expected_rows):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = report["rows"]
    assert len(rows) == expected_rows
    for row in rows:
        assert row["loss_rel_diff"] <= 1e-5 and row["grad_rel_diff"] <= 1e-5, row
        # every sequence and token counted exactly once over DP x CP x micro-batches
        assert row["metrics"]["sequences"] == row["batch_sequences"]
        assert row["metrics"]["response_tokens"] == row["batch_response_tokens"]
    assert "parity ok" in proc.stdout


@pytest.mark.parametrize("layouts", ["dp2,tp2,pp2", "cp2,ep2"])
def test_basic_layouts_vespo_and_baselines(tmp_path, layouts):
    proc, report = run_parity(tmp_path, "--layouts", layouts, "--losses", "vespo,grpo,gspo")
    assert_all_ok(proc, report, expected_rows=len(layouts.split(",")) * 3 * 2)
    for row in report["rows"]:
        calls = row["hook_collectives_per_microbatch"]
        # the hook adds ONE TP collective (log-probs) and ONE CP all-reduce (sequence sums), or none
        assert calls["tp_logprobs_all_gather"] == (1 if row["layout"].startswith("tp2") else 0)
        assert calls["cp_sequence_stats_all_reduce"] == (1 if "cp2" in row["layout"] else 0)


def test_distributed_optimizer_reduce_scatters_the_same_gradients(tmp_path):
    """Megatron's distributed optimizer: each rank holds its slices of every gradient bucket
    reduced; those slices equal the reference (dense and expert buckets), in both formats."""
    proc, report = run_parity(tmp_path, "--layouts", "dp2,ep2", "--losses", "vespo", "--distributed-optimizer")
    assert_all_ok(proc, report, expected_rows=2 * 2)


def test_composite_layouts(tmp_path):
    proc, report = run_parity(tmp_path, "--layouts", "tp2ep2,pp2cp2,tp2pp2ep2", "--losses", "vespo,sapo")
    assert_all_ok(proc, report, expected_rows=3 * 2 * 2)


def test_mismatch_fold_and_legacy_aggregation_under_cp(tmp_path):
    proc, report = run_parity(tmp_path, "--layouts", "tp2cp2", "--losses", "vespo", "--correction", "fold",
                              "--aggregation", "legacy_microbatch_token_mean", "--temperature", "0.7")
    assert_all_ok(proc, report, expected_rows=2)
    assert report["rows"][0]["metrics"]["mismatch/abs_logp_diff"] > 0


def test_token_corrections_and_sequence_mean_under_cp(tmp_path):
    proc, report = run_parity(tmp_path, "--layouts", "cp2dp2", "--losses", "cispo,gmpo", "--correction", "tis",
                              "--aggregation", "seq_mean_token_mean")
    assert_all_ok(proc, report, expected_rows=4)


def test_kl_entropy_and_untrained_samples_in_every_layout(tmp_path):
    """The KL penalty (k3 and k1) and the entropy bonus in the hook, with 3 of 16 samples not
    trained (algorithm.mask_truncated): every layout against the reference, which computes the
    entropy of the whole softmax in fp64; the untrained samples' tokens are not counted."""
    terms = ["--kl-coef", "0.1", "--entropy-coef", "0.01", "--untrained", "3", "--formats", "packed"]
    proc, report = run_parity(tmp_path, "--layouts", "dp2,tp2,pp2,cp2,ep2", "--losses", "vespo,grpo", *terms)
    assert_all_ok(proc, report, expected_rows=5 * 2)
    assert all(row["metrics"]["kl_ref/k3"] > 0 for row in report["rows"])
    proc, k1 = run_parity(tmp_path, "--layouts", "tp2", "--losses", "vespo", "--kl-estimator", "k1", *terms)
    assert_all_ok(proc, k1, expected_rows=1)
    # the terms change the loss: the same batch without them
    proc, plain = run_parity(tmp_path, "--layouts", "tp2", "--losses", "vespo", "--formats", "packed")
    assert_all_ok(proc, plain, expected_rows=1)
    with_terms = next(r for r in report["rows"] if r["layout"].startswith("tp2") and r["loss"] == "vespo")
    assert len({round(r["ref_loss"], 6) for r in (with_terms, k1["rows"][0], plain["rows"][0])}) == 3


def test_bypass_mode(tmp_path):
    proc, report = run_parity(tmp_path, "--layouts", "pp2", "--losses", "vespo,grpo", "--bypass",
                              "--formats", "packed")
    assert_all_ok(proc, report, expected_rows=2)


def test_negative_control_is_caught(tmp_path):
    proc, report = run_parity(tmp_path, "--layouts", "ep2", "--losses", "vespo", "--formats", "packed",
                              "--negative-control")
    assert proc.returncode == 1
    assert "parity FAILED" in proc.stdout and "FAIL" in proc.stdout
    assert report["rows"][0]["grad_rel_diff"] > 1e-2


@pytest.mark.parametrize("args,message", [
    (["--layouts", "tp4"], "num_query_groups = 2 is not divisible by tp = 4"),
    (["--layouts", "pp3"], "num_layers = 4 is not divisible by pp * vpp = 3"),
    (["--layouts", "tq2"], "cannot parse layout"),
    (["--losses", "ppo"], "unknown loss 'ppo'"),
    (["--losses", "grpo", "--correction", "fold"], "only defined for vespo"),
])
def test_bad_requests_fail_fast_with_a_clear_error(tmp_path, args, message):
    proc, _ = run_parity(tmp_path, *args)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_allgather_dispatcher(tmp_path):
    proc, report = run_parity(tmp_path, "--layouts", "tp2ep2", "--losses", "vespo", "--formats", "padded",
                              "--dispatcher", "allgather")
    assert_all_ok(proc, report, expected_rows=1)

"""Routing replay R2/R3 (megatron_vespo.routing_replay): Megatron-Core forward/backward with
replayed routes under real layouts (torchrun on gloo) against the plain-PyTorch fp64 reference
forced to the same routes; R2 record-then-replay; misuse raises clear errors."""

import json

import pytest
import torch

from megatron_vespo.batch import Sample, build_micro_batch, cp_chunk_index, slice_for_cp
from megatron_vespo.routing_replay import RoutingReplayError, complete_routes, local_token_index
from tests.conftest import torchrun

TOL = 1e-5
MOE_LAYERS = {"1", "2", "3"}  # tiny_model_config: 4 layers, layer 0 dense


def launch(layout, nproc, checks, formats="packed,padded", extra=()):
    proc = torchrun("routing_replay.py", nproc, "--layout", layout, "--checks", checks, "--formats", formats,
                    *extra)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout[-2000:]
    return json.loads(lines[0][len("RESULT "):])


def assert_counts(counts, recompute=False):
    """Every MoE layer's router consumed each micro-batch's routes once in forward (and once in
    recompute when on); dense layer 0 has no router."""
    assert set(counts) == MOE_LAYERS, counts
    for layer, per_rank in counts.items():
        for n_set, n_fwd, n_bwd in per_rank:
            assert n_set == 2 and n_fwd == n_set and n_bwd == (n_set if recompute else 0), (layer, per_rank)


def assert_r3(result, formats, recompute=False):
    # the forced routes really differ from the router's own choice, and change the model
    assert result["r3_routes_differing_from_router"] > 0.5
    assert abs(result["r3_reference_loss_forced"] - result["r3_reference_loss_natural"]) > 1e-3
    for fmt in formats:
        row = result[f"r3_{fmt}"]
        assert row["loss_rel"] <= TOL and row["grad_rel"] <= TOL, row
        assert_counts(row["counts"], recompute)


def assert_negative(result):
    # the right routes for the wrong layer, or shifted by one token, are caught by the loss
    assert result["negative_layer_offset_loss_rel"] > 1e-3
    assert result["negative_token_shift_loss_rel"] > 1e-3


def assert_r2(result, formats):
    for fmt in formats:
        row = result[f"r2_{fmt}"]
        assert row["samples"] == 8 and row["compared"] > 0
        assert row["mismatched_vs_reference_topk"] == 0, row  # recorded == the router's own top-k
        assert row["dense_nonzero"] == 0 and row["ranks_disagree"] == 0, row
        assert row["loss_rel"] <= TOL and row["grad_rel"] <= TOL, row  # replayed == not replayed
        assert row["loss_rel_vs_reference"] <= TOL and row["grad_rel_vs_reference"] <= TOL, row


def assert_recompute(result):
    row = result["recompute_r3_packed"]
    assert row["loss_rel"] <= TOL and row["grad_rel"] <= TOL, row
    assert_counts(row["counts"], recompute=True)
    # without the backward replay the recompute re-routes: gradients go wrong, and finish() says so
    off = result["recompute_without_backward_replay"]
    assert off["grad_rel"] > 1e-2, off
    assert "0 in recompute (expected 2)" in off["error"] and "layer " in off["error"], off


@pytest.mark.slow
def test_single_process_r3_r2_and_misuse():
    result = launch("single", 1, "r3,negative,r2,consumption,orphan")
    assert_r3(result, ["packed", "padded"])
    assert_negative(result)
    assert_r2(result, ["packed", "padded"])
    c = result["consumption"]
    assert "layer 1 (pipeline stage 0, chunk 0" in c["never_run"] and "0 used in forward" in c["never_run"], c
    assert "routes of the previous micro-batch were never used" in c["set_twice"], c
    assert "no routes for sample 3" in c["missing_sample"], c
    assert "rows for" in c["wrong_rows"], c
    assert "same expert twice" in c["duplicate_experts"], c
    assert abs(c["after_errors_loss"] - result["r3_packed"]["loss"]) <= 1e-6 * abs(result["r3_packed"]["loss"])
    assert "3 orphan instance(s)" in result["orphan_error"]
    assert "routers of layers [1, 2, 3] not registered" in result["unregistered_error"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "cp2"])
def test_tensor_and_context_parallel(layout):
    result = launch(layout, 2, "r3,negative,r2")
    assert_r3(result, ["packed", "padded"])
    assert_negative(result)
    assert_r2(result, ["packed", "padded"])


@pytest.mark.slow
def test_expert_parallel():
    result = launch("ep2", 2, "r3,r2", formats="packed")
    assert_r3(result, ["packed"])
    assert_r2(result, ["packed"])


@pytest.mark.slow
def test_pipeline_parallel_with_recompute():
    result = launch("pp2", 2, "r3,recompute")
    assert_r3(result, ["packed", "padded"])
    assert_recompute(result)


@pytest.mark.slow
def test_virtual_pipeline_with_recompute():
    # fixed lengths: Megatron's interleaved schedule with variable lengths hangs on gloo at pp=2
    result = launch("pp2vpp2", 2, "r3,recompute", formats="packed", extra=("--fixed-seq",))
    assert_r3(result, ["packed"])
    assert_recompute(result)


@pytest.mark.slow
def test_tensor_and_context_parallel_together():
    result = launch("tp2cp2", 4, "r3,negative", formats="packed")
    assert_r3(result, ["packed"])
    assert_negative(result)


# ----------------------------------------------------------------------------- in-process units
def _samples():
    gen = torch.Generator().manual_seed(0)
    out = []
    for n, p in ((7, 3), (12, 5), (5, 2)):
        out.append(Sample(torch.randint(0, 50, (n,), generator=gen), p, 1.0, torch.full((n - p,), -1.0)))
    return out


@pytest.mark.parametrize("fmt", ["packed", "padded"])
@pytest.mark.parametrize("cp,tp", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_local_token_index_covers_every_token_once_in_router_order(fmt, cp, tp):
    samples = _samples()
    full = build_micro_batch(samples, fmt, 2 * cp if cp > 1 else 1, (2 * cp if cp > 1 else 1) * tp, [10, 11, 12])
    seen = []
    for cp_rank in range(cp):
        mb = slice_for_cp(full, cp, cp_rank)
        # independent derivation: CP keeps chunks r and 2cp-1-r (per packed sequence), then the
        # [s, b] tokens are split in s/tp contiguous slices over TP, s-major
        if fmt == "packed":
            bounds = full.cu_seqlens_padded.tolist()
            cols = torch.cat([a + cp_chunk_index(b - a, cp, cp_rank) for a, b in zip(bounds[:-1], bounds[1:])])
        else:
            cols = cp_chunk_index(full.tokens.shape[1], cp, cp_rank)
        b = full.tokens.shape[0]
        for tp_rank in range(tp):
            slot, pos = local_token_index(mb, tp, tp_rank)
            part = cols.numel() // tp
            mine = cols[tp_rank * part:(tp_rank + 1) * part]
            expect_slot = full.seq_index[:, mine].t().reshape(-1)
            expect_pos = full.position_ids[:, mine].t().reshape(-1)
            assert slot.numel() == part * b
            assert torch.equal(slot, expect_slot) and torch.equal(pos[slot >= 0], expect_pos[slot >= 0])
            seen += [(int(j), int(q)) for j, q in zip(slot, pos) if j >= 0]
    expected = [(j, q) for j, s in enumerate(samples) for q in range(s.tokens.numel())]
    assert sorted(seen) == expected  # every token of every sample exactly once


def test_complete_routes_pads_the_engines_missing_last_row():
    engine = torch.randint(0, 8, (4, 3, 2), dtype=torch.int32)
    full = complete_routes(engine.numpy(), 5)
    assert full.shape == (5, 3, 2) and full.dtype == torch.int32
    assert torch.equal(full[:4], engine) and torch.equal(full[4], engine[3])
    assert torch.equal(complete_routes(full, 5), full)
    with pytest.raises(RoutingReplayError, match="3 rows for a sample of 5 tokens"):
        complete_routes(engine[:3], 5)

"""Micro-batches packed to a token budget (``batch.token_budget_plan``): the plan's properties, its
errors, and that token_mean's loss and gradients do not depend on the packing while
legacy_microbatch_token_mean follows the micro-batches (checked on the fp64 plain-PyTorch reference)."""

import math
import random

import pytest
import torch

from megatron_vespo import losses
from megatron_vespo.batch import (
    build_micro_batch, packed_width, partition, slice_for_cp, token_budget_plan, validate_samples,
)
from megatron_vespo.losses import LossConfig
from megatron_vespo.parity.reference import ReferenceMoE, init_hf_state, reference_loss
from megatron_vespo.parity.worker import make_samples, relative_difference, tiny_model_config

SEED = 11


def _padded(lengths, seq_multiple):
    return [-(-n // seq_multiple) * seq_multiple for n in lengths]


def check_plan(plan, lengths, dp, budget, seq_multiple=1, total_multiple=1, microbatch_multiple=1):
    """Every property a plan promises; returns (rank totals, micro-batch loads) in padded tokens."""
    assert len(plan) == dp
    per_rank = len(plan[0])
    assert per_rank >= 1 and per_rank % microbatch_multiple == 0
    assert all(len(rank) == per_rank for rank in plan), "every rank needs the same micro-batch count"
    flat = [i for rank in plan for mb in rank for i in mb]
    assert sorted(flat) == list(range(len(lengths))), "every sequence exactly once"
    assert all(mb for rank in plan for mb in rank), "no empty micro-batch"
    for rank in plan:
        for mb in rank:
            assert packed_width(lengths, mb, seq_multiple, total_multiple) <= budget
    sizes = _padded(lengths, seq_multiple)
    loads = [sum(sizes[i] for i in mb) for rank in plan for mb in rank]
    totals = [sum(sizes[i] for mb in rank for i in mb) for rank in plan]
    return totals, loads


CASES = [  # (n sequences, dp, length range, budget as a multiple of the longest, seq/total/count multiples)
    (64, 1, (1, 50), 1.0, 1, 1, 1),
    (100, 4, (5, 400), 1.3, 1, 1, 1),
    (257, 8, (1, 3000), 2.5, 4, 8, 1),
    (96, 3, (30, 60), 1.0, 2, 2, 2),
    (500, 16, (10, 8000), 4.0, 2, 4, 1),
    (40, 2, (1, 1000), 10.0, 1, 1, 4),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", range(5))
def test_plan_properties_on_random_lengths(case, seed):
    n, dp, (low, high), factor, sm, tm, mm = case
    rng = random.Random(seed * 1000 + n)
    lengths = [rng.randint(low, high) for _ in range(n)]
    longest = max(_padded(lengths, max(sm, tm)))
    budget = int(longest * factor)
    plan = token_budget_plan(lengths, dp, budget, sm, tm, mm)
    totals, loads = check_plan(plan, lengths, dp, budget, sm, tm, mm)
    # the ranks take micro-batches round by round (see the function): their totals differ by no
    # more than the micro-batch loads do, and on these cases by no more than the longest sequence
    assert max(totals) - min(totals) <= max(loads) - min(loads)
    assert max(totals) - min(totals) <= max(_padded(lengths, sm))
    # few micro-batches: the balanced packing cannot fail once K bins hold total / (cap - longest),
    # so the count never exceeds that (and the lower bound is total / cap)
    unit = max(sm, tm)
    cap = budget // unit * unit
    total, big = sum(_padded(lengths, sm)), max(_padded(lengths, sm))
    lower = -(-max(-(-total // cap), 1) // dp)
    assert len(plan[0]) >= -(-lower // mm) * mm
    if cap > big:
        upper = -(-(-(-total // (cap - big))) // dp)
        assert len(plan[0]) <= max(-(-upper // mm) * mm, -(-lower // mm) * mm)
    assert token_budget_plan(lengths, dp, budget, sm, tm, mm) == plan, "deterministic"


def test_balance_and_padding_on_rollout_like_lengths():
    """Long-tailed response lengths as RL gives them: the fewest micro-batches the budget allows
    on every rank, and little padding when every micro-batch is padded to the widest one."""
    rng = random.Random(SEED)
    lengths = [200 + min(7800, int(rng.expovariate(1 / 1500))) for _ in range(512)]
    dp, budget = 8, 16384
    plan = token_budget_plan(lengths, dp, budget, seq_multiple=4, total_multiple=8)
    totals, loads = check_plan(plan, lengths, dp, budget, 4, 8)
    assert len(plan[0]) == math.ceil(math.ceil(sum(_padded(lengths, 4)) / budget) / dp)
    pad_to = max(packed_width(lengths, mb, 4, 8) for rank in plan for mb in rank)
    padding = 1 - sum(lengths) / (dp * len(plan[0]) * pad_to)
    assert padding < 0.02, padding
    assert (max(totals) - min(totals)) / (sum(totals) / dp) < 0.01


def test_plan_builds_equal_width_micro_batches_and_cp_slices():
    lengths = [13, 7, 30, 2, 18, 25, 9, 11, 16, 4]
    plan = token_budget_plan(lengths, 2, 40, seq_multiple=4, total_multiple=8)
    check_plan(plan, lengths, 2, 40, 4, 8)
    samples = [_sample(n) for n in lengths]
    pad_to = max(packed_width(lengths, mb, 4, 8) for rank in plan for mb in rank)
    for rank in plan:
        for mb in rank:
            assert build_micro_batch([samples[i] for i in mb], "packed", 4, 8).tokens.shape[1] == \
                packed_width(lengths, mb, 4, 8)
            built = build_micro_batch([samples[i] for i in mb], "packed", 4, 8, mb, pad_to=pad_to)
            assert built.tokens.shape == (1, pad_to) and pad_to <= 40
            parts = [slice_for_cp(built, 2, r) for r in range(2)]
            assert sum(int(p.loss_mask.sum()) for p in parts) == sum(lengths[i] - 1 for i in mb)


def _sample(length):
    from megatron_vespo.batch import Sample

    return Sample(torch.arange(length) % 50, 1, 1.0, -torch.rand(length - 1))


def test_a_sequence_over_the_budget_is_named():
    with pytest.raises(ValueError, match=r"sequence 2 has 41 tokens .*budget of 40"):
        token_budget_plan([10, 40, 41, 50], 1, 40)
    with pytest.raises(ValueError, match=r"sample 7 has 41 tokens \(44 once padded"):
        token_budget_plan([10, 41], 1, 43, seq_multiple=4, ids=[3, 7])
    # CP/TP padding counts: 37 tokens pad to 40 > 39
    with pytest.raises(ValueError, match=r"sequence 0 has 37 tokens \(40 once padded"):
        token_budget_plan([37], 1, 39, seq_multiple=4, total_multiple=8)


def test_too_few_sequences_is_a_clear_error():
    with pytest.raises(ValueError, match=r"3 sequences cannot give each of 4 data-parallel rank\(s\) 1 micro"):
        token_budget_plan([5, 5, 5], 4, 100)  # a rank would get nothing
    with pytest.raises(ValueError, match=r"3 sequences .*cannot fill 2 micro-batch"):
        token_budget_plan([10, 10, 10], 2, 10)  # 3 full micro-batches cannot split 2 + 2
    with pytest.raises(ValueError, match=r"at least 4 sequences"):
        token_budget_plan([5, 5, 5], 1, 100, microbatch_multiple=4)
    assert token_budget_plan([5, 5, 5, 5], 1, 100, microbatch_multiple=4) == [[[0], [1], [2], [3]]]
    with pytest.raises(ValueError, match="no sequences"):
        token_budget_plan([], 1, 100)
    with pytest.raises(ValueError, match="dp_size must be a positive integer"):
        token_budget_plan([5], 0, 100)
    with pytest.raises(ValueError, match="lengths must be positive"):
        token_budget_plan([5, 0], 1, 100)


def test_a_tight_budget_packs_exactly():
    # 5+5 | 4+3+3: the balanced (largest-into-emptiest) packing fails here, first-fit finds it
    assert token_budget_plan([5, 5, 4, 3, 3], 1, 10) == [[[0, 1], [2, 3, 4]]]
    # five sequences over half the budget need a micro-batch each: 3 per rank, so one apiece
    plan = token_budget_plan([600, 600, 600, 900, 900, 100], 2, 1000)
    check_plan(plan, [600, 600, 600, 900, 900, 100], 2, 1000)
    assert len(plan[0]) == 3


def test_an_empty_micro_batch_is_no_mean_of_the_legacy_aggregation():
    """The plan never leaves a micro-batch empty (build_micro_batch refuses one, too); a micro-batch
    with no token in the loss (every sample untrained) adds 0 and does not count in Megatron's
    normaliser under legacy_microbatch_token_mean, instead of 0/0."""
    empty = torch.zeros(0)
    tokens = losses.TokenBatch(empty, empty, None, empty, torch.zeros(0, dtype=torch.long))
    stats = losses.SequenceStats(empty, empty, empty, empty)
    loss, normaliser = losses.aggregate(empty, empty, tokens, stats, "legacy_microbatch_token_mean", True)
    assert float(loss) == 0.0 and float(normaliser) == 0.0
    with pytest.raises(ValueError, match="at least one sample"):
        build_micro_batch([], "packed")


# -- exactness on the fp64 reference --------------------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    m = tiny_model_config()
    samples = make_samples(ReferenceMoE(m, init_hf_state(m, SEED)), 16, SEED)
    validate_samples(samples, m.vocab_size, need_engine=True)
    state = {k: v.double().requires_grad_(True) for k, v in init_hf_state(m, SEED).items()}
    lengths = [int(s.tokens.numel()) for s in samples]
    dp = 2
    fixed = [mb for rank in partition(len(samples), dp, 2) for mb in rank]  # 4 micro-batches of 4
    budget = 48  # 3 micro-batches per rank of 1 to 3 sequences each
    plan = token_budget_plan(lengths, dp, budget, seq_multiple=2, total_multiple=4)
    check_plan(plan, lengths, dp, budget, 2, 4)
    budgeted = [mb for rank in plan for mb in rank]  # Megatron normalises over every rank's
    assert {frozenset(mb) for mb in budgeted} != {frozenset(mb) for mb in fixed}
    assert len(budgeted) != len(fixed)
    return ReferenceMoE(m, state), samples, state, fixed, budgeted


def _loss_and_grads(value, state):
    names = list(state)
    grads = torch.autograd.grad(value, [state[k] for k in names], allow_unused=True, retain_graph=True)
    return float(value.detach()), {k: torch.zeros_like(state[k]) if g is None else g for k, g in zip(names, grads)}


def _worst(grads, expected):
    return max(relative_difference(grads[k], expected[k]) for k in expected)


CONFIGS = [dict(name="vespo"), dict(name="grpo", correction="tis")]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c["name"])
def test_token_mean_loss_and_gradients_do_not_depend_on_the_packing(reference, config):
    model, samples, state, fixed, budgeted = reference
    cfg = LossConfig(aggregation="token_mean", **config).validate()
    loss_fixed, grads_fixed = _loss_and_grads(reference_loss(model, samples, fixed, cfg), state)
    loss_budget, grads_budget = _loss_and_grads(reference_loss(model, samples, budgeted, cfg), state)
    assert abs(loss_budget - loss_fixed) <= 1e-12 * abs(loss_fixed)
    assert max(g.abs().max() for g in grads_fixed.values()) > 0
    assert _worst(grads_budget, grads_fixed) < 1e-10


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c["name"])
def test_legacy_aggregation_is_the_mean_of_per_micro_batch_token_means(reference, config):
    """legacy_microbatch_token_mean follows the micro-batches: with the budget it is the mean over
    every rank's micro-batches of each one's token mean (the reference's loss under dynamic
    batching), so it differs between packings; its gradients are those of that mean."""
    model, samples, state, fixed, budgeted = reference
    cfg = LossConfig(aggregation="legacy_microbatch_token_mean", **config).validate()
    # each sequence's weighted per-token loss sum: its own micro-batch, so it is packing-independent
    per_seq = LossConfig(aggregation="seq_mean_token_sum", **config).validate()
    sums = [reference_loss(model, samples, [[i]], per_seq) for i in range(len(samples))]
    counts = [s.response_len for s in samples]

    def by_hand(micro_batches):
        means = [sum(sums[i] for i in mb) / sum(counts[i] for i in mb) for mb in micro_batches]
        return sum(means) / len(means)

    results = {}
    for label, micro_batches in (("fixed", fixed), ("budget", budgeted)):
        loss, grads = _loss_and_grads(reference_loss(model, samples, micro_batches, cfg), state)
        hand_loss, hand_grads = _loss_and_grads(by_hand(micro_batches), state)
        assert abs(loss - hand_loss) <= 1e-12 * abs(hand_loss), label
        assert _worst(grads, hand_grads) < 1e-10, label
        results[label] = loss
    assert abs(results["budget"] - results["fixed"]) > 1e-4 * abs(results["fixed"])
    # and token_mean is the one global token mean, whatever the packing
    token_mean = LossConfig(aggregation="token_mean", **config).validate()
    assert float(reference_loss(model, samples, budgeted, token_mean).detach()) == pytest.approx(
        float((sum(sums) / sum(counts)).detach()), rel=1e-12)

import pytest
import torch

from megatron_vespo.batch import (
    Sample, build_micro_batch, cp_chunk_index, cp_token_index, partition, samples_from_lists, slice_for_cp,
    validate_samples,
)


def sample(prompt, response, adv=1.0, engine=True):
    tokens = torch.arange(10, 10 + prompt + response)
    old = -torch.arange(1, response + 1, dtype=torch.float32) / 10
    return Sample(tokens, prompt, adv, old, old - 0.01 if engine else None)


def test_padded_alignment_puts_response_logprobs_at_predicting_positions():
    s = sample(3, 4)
    mb = build_micro_batch([s, sample(2, 1)], "padded", seq_multiple=4)
    assert mb.tokens.shape == (2, 8)
    row = 0
    assert mb.loss_mask[row].tolist() == [0, 0, 1, 1, 1, 1, 0, 0]  # positions 2..5 predict tokens 3..6
    assert mb.labels[row, 2:6].tolist() == s.tokens[3:7].tolist()
    assert mb.old_logp[row, 2:6].tolist() == pytest.approx(s.old_logprobs.tolist())
    assert mb.seq_index[1].tolist() == [1, 1, 1, -1, -1, -1, -1, -1]
    assert mb.advantages.tolist() == [1.0, 1.0]


def test_packed_layout_and_cu_seqlens():
    mb = build_micro_batch([sample(3, 4), sample(2, 1), sample(1, 2)], "packed", seq_multiple=4, total_multiple=8)
    assert mb.tokens.shape == (1, 16)  # 8 + 4 + 4 = 16
    assert mb.cu_seqlens_padded.tolist() == [0, 8, 12, 16]
    assert mb.cu_seqlens.tolist() == [0, 7, 10, 13]
    assert mb.max_seqlen == 8
    assert mb.position_ids[0, 8:11].tolist() == [0, 1, 2]
    assert int(mb.loss_mask.sum()) == 4 + 1 + 2
    params = mb.packed_seq_params()
    assert params.qkv_format == "thd" and params.max_seqlen_q == 8


def test_packed_trailing_padding_segment():
    mb = build_micro_batch([sample(2, 1)], "packed", seq_multiple=1, total_multiple=8)
    assert mb.cu_seqlens_padded.tolist() == [0, 3, 8]
    assert (mb.seq_index[0, 3:] == -1).all()


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_cp_chunks_partition_every_position_once(cp):
    length = 2 * cp * 5
    seen = torch.cat([cp_chunk_index(length, cp, r) for r in range(cp)])
    assert sorted(seen.tolist()) == list(range(length))
    if cp > 1:
        first = cp_chunk_index(length, cp, 0)
        assert first[:5].tolist() == list(range(5)) and first[5:].tolist() == list(range(length - 5, length))


@pytest.mark.parametrize("fmt", ["padded", "packed"])
def test_slice_for_cp_keeps_every_response_token_once(fmt):
    samples = [sample(3, 9), sample(2, 1), sample(5, 6, adv=-1.0)]
    mb = build_micro_batch(samples, fmt, seq_multiple=4, total_multiple=8)
    parts = [slice_for_cp(mb, 2, r) for r in range(2)]
    assert sum(int(p.loss_mask.sum()) for p in parts) == int(mb.loss_mask.sum())
    for i in range(3):
        got = sorted(v for p in parts for v in p.old_logp[p.seq_index == i][p.loss_mask[p.seq_index == i] > 0].tolist())
        assert got == pytest.approx(sorted(samples[i].old_logprobs.tolist()))
    index = torch.cat([cp_token_index(mb, 2, r) for r in range(2)])
    assert sorted(index.tolist()) == list(range(mb.tokens.shape[1]))


def test_cp_requires_divisible_lengths():
    with pytest.raises(ValueError, match="not divisible by 2\\*cp"):
        cp_chunk_index(6, 2, 0)


def test_validation_names_the_problem():
    good = sample(2, 3)
    validate_samples([good], vocab_size=64, need_engine=True)
    bad_shape = Sample(good.tokens, 2, 1.0, torch.zeros(2))
    with pytest.raises(ValueError, match="sample 0: old_logprobs has shape \\(2,\\), expected \\[3\\]"):
        validate_samples([bad_shape], 64)
    nan = Sample(good.tokens, 2, 1.0, torch.tensor([-1.0, float("nan"), -1.0]))
    with pytest.raises(ValueError, match="not finite at response positions \\[1\\]"):
        validate_samples([nan], 64)
    inf_engine = Sample(good.tokens, 2, 1.0, good.old_logprobs, torch.tensor([-1.0, -1.0, float("-inf")]))
    with pytest.raises(ValueError, match="engine_logprobs is not finite"):
        validate_samples([inf_engine], 64)
    with pytest.raises(ValueError, match="empty response"):
        validate_samples([Sample(good.tokens, 5, 1.0, torch.zeros(0))], 64)
    with pytest.raises(ValueError, match="one scalar per sequence"):
        validate_samples([Sample(good.tokens, 2, [1.0, 2.0], good.old_logprobs)], 64)
    with pytest.raises(ValueError, match="advantage is not finite"):
        validate_samples([Sample(good.tokens, 2, float("nan"), good.old_logprobs)], 64)
    with pytest.raises(ValueError, match="token ids must lie in \\[0, 12\\)"):
        validate_samples([good], 12)
    with pytest.raises(ValueError, match="must be <= 0"):
        validate_samples([Sample(good.tokens, 2, 1.0, torch.tensor([-1.0, 0.5, -1.0]))], 64)
    with pytest.raises(ValueError, match="engine_logprobs missing"):
        validate_samples([sample(2, 3, engine=False)], 64, need_engine=True)
    with pytest.raises(ValueError, match="no samples"):
        validate_samples([], 64)


def test_partition():
    plan = partition(12, dp_size=2, num_microbatches=3)
    assert plan[1][0] == [6, 7] and sum(len(m) for d in plan for m in d) == 12
    with pytest.raises(ValueError, match="do not divide"):
        partition(10, 4, 1)


def test_samples_from_lists_checks_every_length():
    samples = samples_from_lists([[1, 2], [3]], [[4, 5], [6]], [0.5, -0.5], [[-0.1, -0.2], [-0.3]])
    assert samples[0].tokens.tolist() == [1, 2, 4, 5] and samples[1].prompt_len == 1
    validate_samples(samples, 10)
    with pytest.raises(ValueError, match="advantages has 3 entries but there are 2 prompts"):
        samples_from_lists([[1], [2]], [[3], [4]], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="old_logprobs has 1 entries"):
        samples_from_lists([[1], [2]], [[3], [4]], [1.0, 2.0], [[-1.0]])
    bad = samples_from_lists([[1]], [[2, 3]], [1.0], [[-1.0]])
    with pytest.raises(ValueError, match="old_logprobs has shape \\(1,\\), expected \\[2\\]"):
        validate_samples(bad, 10)


def test_pad_to_fixes_the_sequence_dimension():
    mb = build_micro_batch([sample(2, 3), sample(1, 1)], "packed", seq_multiple=2, pad_to=12)
    assert mb.tokens.shape == (1, 12) and mb.cu_seqlens_padded.tolist() == [0, 6, 8, 12]
    assert build_micro_batch([sample(2, 3)], "padded", pad_to=9).tokens.shape == (1, 9)
    with pytest.raises(ValueError, match="pad_to=4 is below the needed 8"):
        build_micro_batch([sample(2, 3), sample(1, 1)], "packed", seq_multiple=2, pad_to=4)

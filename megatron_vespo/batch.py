"""Policy-gradient samples, their validation, micro-batches (padded or packed) and CP slicing.

Token alignment: a sample is ``tokens = prompt + response``. Position i predicts token i+1, so
the response token at index j is scored at position j-1; per-token inputs (pi_old and engine
log-probs, one per response token) are stored at those positions.

Context parallelism uses Megatron's load-balanced split: a sequence of padded length P is cut
into 2*cp chunks and CP rank r keeps chunks r and 2*cp-1-r. Padded batches split every row that
way; packed (THD) batches split every packed sequence that way (as TransformerEngine does).
"""

from __future__ import annotations

import bisect
import heapq
import math
from dataclasses import dataclass, field, fields, replace

import torch

from megatron.core.packed_seq_params import PackedSeqParams

FORMATS = ("padded", "packed")


@dataclass
class Sample:
    tokens: torch.Tensor  # long [L], prompt followed by response
    prompt_len: int
    advantage: float
    old_logprobs: torch.Tensor | None  # [L - prompt_len]; None only in bypass mode
    engine_logprobs: torch.Tensor | None = None  # [L - prompt_len]
    ref_logprobs: torch.Tensor | None = None  # [L - prompt_len], the reference policy's (KL term)
    trained: bool = True  # False: no gradient and not counted by the loss (algorithm.mask_truncated)

    @property
    def response_len(self) -> int:
        return int(self.tokens.numel()) - int(self.prompt_len)

    @classmethod
    def from_rollout(cls, rollout, advantage: float = 0.0) -> "Sample":
        """A sample of an engine rollout (anything with ``prompt_ids``, ``response_ids`` and
        ``engine_logprobs``); pi_old is filled in later (recomputed) or never (bypass)."""
        return cls(tokens=torch.tensor(list(rollout.prompt_ids) + list(rollout.response_ids), dtype=torch.long),
                   prompt_len=len(rollout.prompt_ids), advantage=float(advantage), old_logprobs=None,
                   engine_logprobs=torch.as_tensor(rollout.engine_logprobs, dtype=torch.float32).reshape(-1))


def _check_logprobs(name: str, values, expected: int, index: int) -> None:
    if values is None:
        return
    if values.dim() != 1 or values.numel() != expected:
        raise ValueError(
            f"sample {index}: {name} has shape {tuple(values.shape)}, expected [{expected}] "
            f"(one per response token)"
        )
    if not torch.isfinite(values).all():
        bad = (~torch.isfinite(values)).nonzero().flatten()[:5].tolist()
        raise ValueError(f"sample {index}: {name} is not finite at response positions {bad}")
    if (values > 1e-4).any():
        bad = (values > 1e-4).nonzero().flatten()[:5].tolist()
        raise ValueError(f"sample {index}: {name} must be <= 0 (log-probabilities); positive at {bad}")


def validate_samples(
    samples: list[Sample], vocab_size: int, need_old: bool = True, need_engine: bool = False,
    need_ref: bool = False,
) -> None:
    """Raise ValueError naming the first bad sample and what is wrong with it."""
    if not samples:
        raise ValueError("the batch holds no samples")
    for i, s in enumerate(samples):
        if not torch.is_tensor(s.tokens) or s.tokens.dim() != 1:
            raise ValueError(f"sample {i}: tokens must be a 1-D tensor")
        if s.prompt_len < 1:
            raise ValueError(f"sample {i}: prompt_len must be >= 1, got {s.prompt_len}")
        if s.response_len < 1:
            raise ValueError(
                f"sample {i}: empty response (tokens {s.tokens.numel()}, prompt_len {s.prompt_len})"
            )
        if s.tokens.min() < 0 or s.tokens.max() >= vocab_size:
            raise ValueError(
                f"sample {i}: token ids must lie in [0, {vocab_size}); got "
                f"[{int(s.tokens.min())}, {int(s.tokens.max())}]"
            )
        adv = torch.as_tensor(s.advantage, dtype=torch.float64)
        if adv.numel() != 1:
            raise ValueError(f"sample {i}: advantage must be one scalar per sequence, got {adv.numel()} values")
        if not math.isfinite(float(adv)):
            raise ValueError(f"sample {i}: advantage is not finite ({float(adv)})")
        if need_old and s.old_logprobs is None:
            raise ValueError(f"sample {i}: old_logprobs missing (needed unless bypass mode)")
        if need_engine and s.engine_logprobs is None:
            raise ValueError(f"sample {i}: engine_logprobs missing (needed by bypass/correction)")
        if need_ref and s.ref_logprobs is None:
            raise ValueError(f"sample {i}: ref_logprobs missing (the KL term, algorithm.kl_coef > 0, needs the "
                             "reference policy's log-probs)")
        _check_logprobs("old_logprobs", s.old_logprobs, s.response_len, i)
        _check_logprobs("engine_logprobs", s.engine_logprobs, s.response_len, i)
        _check_logprobs("ref_logprobs", s.ref_logprobs, s.response_len, i)


def samples_from_lists(
    prompts: list,
    responses: list,
    advantages,
    old_logprobs: list | None = None,
    engine_logprobs: list | None = None,
) -> list[Sample]:
    """Build Samples from parallel per-sequence lists, naming any length that does not match."""
    n = len(prompts)
    columns = {"responses": responses, "advantages": advantages,
               "old_logprobs": old_logprobs, "engine_logprobs": engine_logprobs}
    for name, column in columns.items():
        if column is not None and len(column) != n:
            raise ValueError(f"{name} has {len(column)} entries but there are {n} prompts "
                             f"(one per sequence expected)")
    samples = []
    for i in range(n):
        prompt = torch.as_tensor(prompts[i], dtype=torch.long)
        response = torch.as_tensor(responses[i], dtype=torch.long)
        as_logprobs = lambda col: None if col is None else torch.as_tensor(col[i], dtype=torch.float32)  # noqa: E731
        samples.append(Sample(torch.cat([prompt, response]), int(prompt.numel()), float(advantages[i]),
                              as_logprobs(old_logprobs), as_logprobs(engine_logprobs)))
    return samples


@dataclass
class MicroBatch:
    """Model inputs and per-token loss inputs, [b, s] (padded) or [1, T] (packed)."""

    fmt: str
    tokens: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor  # float
    old_logp: torch.Tensor
    engine_logp: torch.Tensor | None
    seq_index: torch.Tensor  # long, -1 on padding
    advantages: torch.Tensor  # float32 [n_seq]
    ref_logp: torch.Tensor | None = None  # the reference policy's, where every sample has them
    seq_weight: torch.Tensor | None = None  # float32 [n_seq]: 1 trained, 0 not (Sample.trained)
    cu_seqlens: torch.Tensor | None = None  # int32, true lengths (packed)
    cu_seqlens_padded: torch.Tensor | None = None  # int32, padded lengths (packed)
    max_seqlen: int | None = None
    cp_size: int = 1
    cp_rank: int = 0
    sample_ids: list[int] = field(default_factory=list)

    @property
    def n_seq(self) -> int:
        return int(self.advantages.numel())

    def to(self, device) -> "MicroBatch":
        """This micro-batch with every tensor on ``device``: batches are built on the host, the
        model may live on a GPU (TransformerEngine's THD attention wants cu_seqlens there too)."""
        device = torch.device(device)
        if self.tokens.device == device:
            return self
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=True)
                 for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)

    def packed_seq_params(self) -> PackedSeqParams | None:
        if self.fmt != "packed":
            return None
        return PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=self.cu_seqlens,
            cu_seqlens_kv=self.cu_seqlens,
            cu_seqlens_q_padded=self.cu_seqlens_padded,
            cu_seqlens_kv_padded=self.cu_seqlens_padded,
            max_seqlen_q=self.max_seqlen,
            max_seqlen_kv=self.max_seqlen,
        )


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _fill_sample(mb_fields, offset_row, offset_col, s: Sample, seq_id: int) -> None:
    tokens, labels, mask, old, eng, ref, seq_index, positions = mb_fields
    n = s.tokens.numel()
    p = s.prompt_len
    cols = slice(offset_col, offset_col + n)
    tokens[offset_row, cols] = s.tokens
    labels[offset_row, offset_col : offset_col + n - 1] = s.tokens[1:]
    resp = slice(offset_col + p - 1, offset_col + n - 1)
    mask[offset_row, resp] = 1.0
    if s.old_logprobs is not None:
        old[offset_row, resp] = s.old_logprobs.float()
    if eng is not None:
        eng[offset_row, resp] = s.engine_logprobs.float()
    if ref is not None:
        ref[offset_row, resp] = s.ref_logprobs.float()
    seq_index[offset_row, cols] = seq_id
    positions[offset_row, cols] = torch.arange(n)


def build_micro_batch(
    samples: list[Sample],
    fmt: str,
    seq_multiple: int = 1,
    total_multiple: int = 1,
    sample_ids: list[int] | None = None,
    pad_to: int | None = None,
) -> MicroBatch:
    """Collate samples. Padded: rows padded to a common length (a multiple of ``seq_multiple``).
    Packed: each sequence padded to a multiple of ``seq_multiple``, plus a trailing padding
    segment so the total is a multiple of ``total_multiple``. ``pad_to`` fixes the sequence
    dimension (the allgather MoE dispatcher needs equal token counts on every rank)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown batch format {fmt!r}; choose one of {FORMATS}")
    if not samples:
        raise ValueError("a micro-batch needs at least one sample")
    has_engine = all(s.engine_logprobs is not None for s in samples)
    has_ref = all(s.ref_logprobs is not None for s in samples)
    lengths = [int(s.tokens.numel()) for s in samples]
    if fmt == "padded":
        rows, width = len(samples), _round_up(max(lengths), max(seq_multiple, total_multiple))
        places = [(i, 0) for i in range(rows)]
    else:
        padded = [_round_up(n, seq_multiple) for n in lengths]
        rows, width = 1, _round_up(sum(padded), max(total_multiple, seq_multiple))
        starts = [sum(padded[:i]) for i in range(len(samples))]
        places = [(0, start) for start in starts]
    if pad_to is not None:
        if pad_to < width or pad_to % max(seq_multiple, total_multiple):
            raise ValueError(f"pad_to={pad_to} is below the needed {width} or not a multiple of "
                             f"{max(seq_multiple, total_multiple)}")
        width = pad_to
    tokens = torch.zeros((rows, width), dtype=torch.long)
    labels = torch.zeros_like(tokens)
    mask = torch.zeros((rows, width), dtype=torch.float32)
    old = torch.zeros_like(mask)
    eng = torch.zeros_like(mask) if has_engine else None
    ref = torch.zeros_like(mask) if has_ref else None
    seq_index = torch.full((rows, width), -1, dtype=torch.long)
    positions = torch.zeros_like(tokens)
    fields = (tokens, labels, mask, old, eng, ref, seq_index, positions)
    for i, (s, (r, c)) in enumerate(zip(samples, places)):
        _fill_sample(fields, r, c, s, i)
    mb = MicroBatch(
        fmt=fmt,
        tokens=tokens,
        position_ids=positions,
        labels=labels,
        loss_mask=mask,
        old_logp=old,
        engine_logp=eng,
        seq_index=seq_index,
        advantages=torch.tensor([float(s.advantage) for s in samples], dtype=torch.float32),
        ref_logp=ref,
        seq_weight=torch.tensor([1.0 if s.trained else 0.0 for s in samples], dtype=torch.float32),
        sample_ids=list(sample_ids) if sample_ids is not None else list(range(len(samples))),
    )
    if fmt == "packed":
        bounds_true = [0]
        bounds_padded = [0]
        for n, pn in zip(lengths, padded):
            bounds_true.append(bounds_padded[-1] + n)
            bounds_padded.append(bounds_padded[-1] + pn)
        if bounds_padded[-1] < width:  # trailing padding segment
            bounds_true.append(width)
            bounds_padded.append(width)
        # cu_seqlens (true lengths) are cumulative over true lengths, as TransformerEngine expects.
        true_lengths = [b - a for a, b in zip(bounds_padded[:-1], bounds_true[1:])]
        cu_true = [0]
        for n in true_lengths:
            cu_true.append(cu_true[-1] + n)
        mb.cu_seqlens = torch.tensor(cu_true, dtype=torch.int32)
        mb.cu_seqlens_padded = torch.tensor(bounds_padded, dtype=torch.int32)
        mb.max_seqlen = int(max(b - a for a, b in zip(bounds_padded[:-1], bounds_padded[1:])))
    return mb


def cp_chunk_index(length: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions of a length-``length`` sequence kept by ``cp_rank`` (chunks r and 2cp-1-r)."""
    if cp_size == 1:
        return torch.arange(length)
    if length % (2 * cp_size):
        raise ValueError(f"sequence length {length} is not divisible by 2*cp = {2 * cp_size}")
    chunk = length // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk)
    return torch.cat([first, second])


def cp_token_index(mb: MicroBatch, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Column index along the sequence dim of everything this CP rank keeps."""
    if mb.fmt == "padded":
        return cp_chunk_index(mb.tokens.shape[1], cp_size, cp_rank)
    bounds = mb.cu_seqlens_padded.tolist()
    return torch.cat(
        [a + cp_chunk_index(b - a, cp_size, cp_rank) for a, b in zip(bounds[:-1], bounds[1:])]
    )


def slice_for_cp(mb: MicroBatch, cp_size: int, cp_rank: int) -> MicroBatch:
    """This CP rank's part of a micro-batch (sequence-level tensors stay whole)."""
    if cp_size == 1:
        return mb
    index = cp_token_index(mb, cp_size, cp_rank)
    take = lambda t: None if t is None else t.index_select(1, index).contiguous()  # noqa: E731
    return replace(
        mb,
        tokens=take(mb.tokens),
        position_ids=take(mb.position_ids),
        labels=take(mb.labels),
        loss_mask=take(mb.loss_mask),
        old_logp=take(mb.old_logp),
        engine_logp=take(mb.engine_logp),
        ref_logp=take(mb.ref_logp),
        seq_index=take(mb.seq_index),
        cp_size=cp_size,
        cp_rank=cp_rank,
    )


def partition(n_samples: int, dp_size: int, num_microbatches: int) -> list[list[list[int]]]:
    """Sample ids per DP rank per micro-batch: contiguous blocks, so a sequence never spans
    micro-batches. Raises when the counts do not divide."""
    per_step = dp_size * num_microbatches
    if n_samples % per_step:
        raise ValueError(
            f"{n_samples} samples do not divide into dp={dp_size} x micro-batches={num_microbatches}"
        )
    size = n_samples // per_step
    return [
        [list(range((d * num_microbatches + m) * size, (d * num_microbatches + m + 1) * size))
         for m in range(num_microbatches)]
        for d in range(dp_size)
    ]


# -- micro-batches packed to a token budget -------------------------------------------------------
#
# Under a pipeline every micro-batch of a step is padded to one width (stages exchange fixed shapes),
# so the cost of a step is (micro-batches per rank) x (widest micro-batch): the plan uses the fewest
# micro-batches that fit the budget and balances their token counts globally, which keeps the widest
# one, and with it the padding, small; the ranks' totals then follow from the micro-batches'.


def packed_width(lengths: list[int], ids: list[int], seq_multiple: int = 1, total_multiple: int = 1) -> int:
    """The sequence dimension ``build_micro_batch(..., "packed", seq_multiple, total_multiple)`` gives
    the sequences ``ids`` (indices into ``lengths``), before CP slicing."""
    padded = sum(_round_up(int(lengths[i]), seq_multiple) for i in ids)
    return _round_up(padded, max(seq_multiple, total_multiple))


def _fill_bins(items: list[tuple[int, int]], k: int, cap: int) -> list[list[tuple[int, int]]] | None:
    """``items`` (size, index), largest first, into exactly ``k`` non-empty bins of at most ``cap``;
    None when this heuristic finds no such packing. Needs len(items) >= k."""
    # Largest-first into the emptiest bin: balanced loads (max - min <= the largest item). The first
    # k items open the k bins (an empty bin is the emptiest), so none stays empty.
    bins: list[list[tuple[int, int]]] = [[] for _ in range(k)]
    heap = [(0, b) for b in range(k)]
    for size, index in items:
        load, b = heapq.heappop(heap)
        if load + size > cap:  # the emptiest bin cannot take it: no bin can
            break
        bins[b].append((size, index))
        heapq.heappush(heap, (load + size, b))
    else:
        return bins
    # A tight budget: best-fit-decreasing (the fullest bin that still takes the item) packs tighter;
    # (load, bin) kept sorted so each choice is a bisection.
    bins = [[] for _ in range(k)]
    loads = [0] * k
    by_load = [(0, b) for b in range(k)]
    for size, index in items:
        at = bisect.bisect_right(by_load, (cap - size, k)) - 1
        if at < 0:
            return None
        load, b = by_load.pop(at)
        bins[b].append((size, index))
        loads[b] = load + size
        bisect.insort(by_load, (loads[b], b))
    # The empty bins then take one item each, the smallest of the fullest bin holding two or more
    # (n >= k leaves one to take).
    donors = [(-loads[b], b) for b in range(k) if len(bins[b]) > 1]
    heapq.heapify(donors)
    for e in (b for b in range(k) if not bins[b]):
        _, donor = heapq.heappop(donors)
        item = min(bins[donor])
        bins[donor].remove(item)
        bins[e].append(item)
        by_load.remove((loads[donor], donor))
        by_load.remove((loads[e], e))
        loads[donor] -= item[0]
        loads[e] += item[0]
        bisect.insort(by_load, (loads[donor], donor))
        bisect.insort(by_load, (loads[e], e))
        if len(bins[donor]) > 1:
            heapq.heappush(donors, (-loads[donor], donor))
    # Then move items from the fullest bin to the emptiest while that narrows their gap; each move
    # lowers the sum of squared loads, so this ends (bounded anyway: each round costs O(k)).
    for _ in range(2 * len(items)):
        (low, lo), (high, hi) = by_load[0], by_load[-1]
        movable = [it for it in bins[hi] if it[0] < high - low and low + it[0] <= cap]
        if len(bins[hi]) < 2 or not movable:
            break
        item = min(movable, key=lambda it: (abs(2 * it[0] - (high - low)), it[1]))
        bins[hi].remove(item)
        bins[lo].append(item)
        del by_load[-1], by_load[0]
        loads[hi] -= item[0]
        loads[lo] += item[0]
        bisect.insort(by_load, (loads[hi], hi))
        bisect.insort(by_load, (loads[lo], lo))
    return bins


def token_budget_plan(
    lengths: list[int],
    dp_size: int,
    max_tokens: int,
    seq_multiple: int = 1,
    total_multiple: int = 1,
    microbatch_multiple: int = 1,
    ids: list | None = None,
) -> list[list[list[int]]]:
    """Indices into ``lengths`` per DP rank per micro-batch, packed to a token budget.

    A sequence counts at its CP-padded length (a multiple of ``seq_multiple``) and a micro-batch at
    ``packed_width`` (also rounded to ``total_multiple``), which never exceeds ``max_tokens`` (the
    whole micro-batch, before CP slicing). Every rank gets the same number of micro-batches, a
    multiple of ``microbatch_multiple`` (the interleaved pipeline schedule needs a multiple of pp),
    the fewest this packing finds; none is empty (``build_micro_batch`` refuses one, and under
    legacy_microbatch_token_mean it would be 0/0 yet count in the normaliser). Token counts are
    balanced over all micro-batches, then over ranks: a rank's total differs from another's by at
    most the spread of the micro-batch loads (padded tokens), which is at most the longest sequence
    unless the budget is so tight that the balanced packing fails. Deterministic.

    Raises ValueError naming a sequence longer than the budget (``ids[i]`` when given, else index
    i), and when there are too few sequences to give every rank as many micro-batches as the
    budget needs."""
    for name, value in (("dp_size", dp_size), ("max_tokens", max_tokens), ("seq_multiple", seq_multiple),
                        ("total_multiple", total_multiple), ("microbatch_multiple", microbatch_multiple)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not lengths:
        raise ValueError("no sequences to pack into micro-batches")
    if ids is not None and len(ids) != len(lengths):
        raise ValueError(f"{len(ids)} ids for {len(lengths)} lengths")
    label = (lambda i: f"sample {ids[i]}") if ids is not None else (lambda i: f"sequence {i}")  # noqa: E731
    unit = max(seq_multiple, total_multiple)
    cap = max_tokens // unit * unit  # the largest sum of padded lengths whose packed width fits
    sizes = []
    for i, n in enumerate(lengths):
        if int(n) != n or n < 1:
            raise ValueError(f"{label(i)} has length {n!r}; lengths must be positive integers")
        sizes.append(_round_up(int(n), seq_multiple))
        if packed_width(lengths, [i], seq_multiple, total_multiple) > max_tokens:
            raise ValueError(
                f"{label(i)} has {n} tokens ({packed_width(lengths, [i], seq_multiple, total_multiple)} once "
                f"padded to multiples of {seq_multiple} and {unit}), more than the micro-batch token budget "
                f"of {max_tokens}: raise the budget (algorithm.max_tokens_per_micro_batch) or shorten the "
                f"sequences")
    n = len(sizes)
    step = microbatch_multiple
    if n < dp_size * step:  # no budget helps: a micro-batch holds at least one sequence
        raise ValueError(
            f"{n} sequences cannot give each of {dp_size} data-parallel rank(s) {step} micro-batch(es) of at "
            f"least one sequence: a mini-batch needs at least {dp_size * step} sequences")
    # a bin per sequence longer than half the budget, and room for all the tokens
    need = max(-(-sum(sizes) // cap), sum(2 * s > cap for s in sizes), 1)
    lowest = _round_up(-(-need // dp_size), step)
    highest = n // dp_size // step * step  # every micro-batch holds at least one sequence
    if lowest > highest:
        raise ValueError(
            f"{n} sequences ({sum(sizes)} tokens padded) cannot fill {lowest} micro-batch(es) of at most "
            f"{max_tokens} tokens on each of {dp_size} data-parallel rank(s) (a micro-batch holds at least one "
            f"sequence; the count per rank is a multiple of {step}): give a mini-batch at least "
            f"{lowest * dp_size} sequences or raise the budget")
    items = sorted(((s, i) for i, s in enumerate(sizes)), key=lambda it: (-it[0], it[1]))
    for per_rank in range(lowest, highest + 1, step):
        bins = _fill_bins(items, per_rank * dp_size, cap)
        if bins is not None:
            break
    else:
        raise ValueError(
            f"{n} sequences ({sum(sizes)} tokens padded) found no packing into the same number of micro-batches "
            f"(at most {highest} each) of at most {max_tokens} tokens on {dp_size} data-parallel rank(s): "
            f"raise the budget or give a mini-batch more sequences")
    # Ranks take the micro-batches widest first, one per rank a round, the widest of a round going to
    # the rank with the fewest tokens so far: the ranks' totals then differ by at most the spread of
    # the micro-batch loads (by induction over the rounds).
    loads = [sum(s for s, _ in b) for b in bins]
    order = sorted(range(len(bins)), key=lambda b: (-loads[b], min(i for _, i in bins[b])))
    plan: list[list[list[int]]] = [[] for _ in range(dp_size)]
    totals = [0] * dp_size
    for start in range(0, len(order), dp_size):
        ranks = sorted(range(dp_size), key=lambda r: (totals[r], r))
        for r, b in zip(ranks, order[start:start + dp_size]):
            plan[r].append(sorted(i for _, i in bins[b]))
            totals[r] += loads[b]
    for rank_plan in plan:
        rank_plan.sort(key=lambda mb: mb[0])
    return plan

"""The next token of every row, as SGLang 0.5.23's sampler draws it, and when a request stops."""

from __future__ import annotations

import torch

from megatron_vespo.rollout import protocol
from megatron_vespo.rollout.engine.requests import Request

LOGPROB_MIN = float(torch.finfo(torch.float32).min)  # SGLang clamps -inf log-probs to this


def sample(rows: list[Request], logits: torch.Tensor, eos_token_ids: frozenset) -> list[tuple[int, float]]:
    """Next token and its log-prob for every row, as SGLang's sampler: log-probs are
    log_softmax(logits / T) over the full vocabulary before the top-k/top-p/min-p mask."""
    logits = logits.to(torch.float32, copy=True)  # masked in place below
    for i, r in enumerate(rows):
        # min_new_tokens: SGLang's penalizer sets stop/EOS logits to -inf before the sampler
        if not r.done and len(r.output_ids) < r.sampling.min_new_tokens:
            banned = set(r.sampling.stop_token_ids) | eos_token_ids
            if banned:
                logits[i, sorted(banned)] = float("-inf")
    samplings = [r.sampling for r in rows]
    temps = torch.tensor([1.0 if s.greedy else s.temperature for s in samplings])
    logprobs = torch.log_softmax(logits / temps[:, None], dim=-1)
    tokens = torch.argmax(logits, dim=-1)
    sampled = [i for i, (r, s) in enumerate(zip(rows, samplings)) if not s.greedy and not r.done]
    if sampled:
        index = torch.tensor(sampled)
        probs = logprobs[index].exp()
        order = None
        if any(s.top_k > 0 or s.top_p < 1.0 or s.min_p > 0.0 for s in (samplings[i] for i in sampled)):
            # SGLang's top_k_top_p_min_p_sampling_from_probs_torch, all rows at once
            probs, order = probs.sort(dim=-1, descending=True)
            cumulative = probs.cumsum(dim=-1)
            vocab = probs.shape[-1]
            # a top_k past the vocabulary means all of it (as in SGLang); capped, no row can overflow the tensor
            top_k = torch.tensor([min(samplings[i].top_k, vocab) if samplings[i].top_k > 0 else vocab
                                  for i in sampled])
            top_p = torch.tensor([samplings[i].top_p for i in sampled])
            min_p = torch.tensor([samplings[i].min_p for i in sampled])
            probs[torch.arange(vocab)[None, :] >= top_k[:, None]] = 0.0
            probs[(cumulative - probs) > top_p[:, None]] = 0.0
            probs[probs < probs[:, :1] * min_p[:, None]] = 0.0
        # inverse-CDF draw with one uniform from each request's own generator: reproducible per
        # request whatever else shares its batch
        uniform = torch.cat([torch.rand(1, generator=rows[i].generator, dtype=torch.float64) for i in sampled])
        cdf = probs.double().cumsum(dim=-1)
        total = cdf[:, -1]
        threshold = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
        # right=True lands on an index whose probability is > 0, never on a masked token
        pick = torch.searchsorted(cdf, threshold[:, None], right=True)
        if order is not None:
            pick = order.gather(1, pick)
        tokens[index] = pick[:, 0]
    chosen = logprobs.gather(1, tokens[:, None])[:, 0].clamp(min=LOGPROB_MIN)
    return list(zip(tokens.tolist(), chosen.tolist()))


def check_finish(r: Request, token: int, eos_token_ids: frozenset) -> protocol.FinishReason | None:
    """The reason ``r`` finishes with the token it just got, or None."""
    s = r.sampling
    # SGLang checks stop tokens before the length cap; ignore_eos disables both EOS and stop_token_ids
    if not s.ignore_eos and (token in s.stop_token_ids or token in eos_token_ids):
        return protocol.FinishReason(type="stop", matched=token)
    if len(r.output_ids) >= s.max_new_tokens:
        return protocol.FinishReason(type="length", length=s.max_new_tokens)
    return None

"""The ``/generate`` answer of a finished request, field for field as SGLang 0.5.23 answers."""

from __future__ import annotations

import time

import torch

from megatron_vespo.rollout import protocol
from megatron_vespo.rollout.engine.requests import Request
from megatron_vespo.rollout.engine.sampler import LOGPROB_MIN


def answer(r: Request, tokenizer, weight_version: str) -> dict:
    """The SGLang ``/generate`` answer of the finished request ``r``; ``weight_version`` is the
    engine's now (the last span's)."""
    out = list(r.output_ids)
    prompt_len, n_out = len(r.input_ids), len(out)
    text = None
    if tokenizer is not None:
        shown = out
        if (r.finish.type == "stop" and isinstance(r.finish.matched, int) and not r.sampling.no_stop_trim
                and shown):
            shown = shown[:-1]  # SGLang trims the matched stop token from the text, not from output_ids
        text = tokenizer.decode(shown, skip_special_tokens=r.sampling.skip_special_tokens)
    # the fields SGLang 0.5.23 answers with (those of features this engine lacks at their idle values)
    meta = {"id": r.rid, "finish_reason": r.finish.to_json(), "prompt_tokens": prompt_len,
            "weight_version": weight_version, "num_retractions": 0, "completion_tokens": n_out,
            "reasoning_tokens": 0, "cached_tokens": 0, "cached_tokens_details": None, "dp_rank": None}
    spans = version_spans(r.version_events, weight_version, n_out)
    meta["weight_versions"] = [s for s in spans if s["start"] < n_out or s["start"] == 0]
    meta["weight_version"] = meta["weight_versions"][-1]["version"]
    if r.return_logprob:
        meta["output_token_logprobs"] = [[lp, t, token_text(r, t, tokenizer)]
                                         for lp, t in zip(r.output_logprobs, out)]
        meta["output_token_logprobs_length"] = n_out
        meta["input_token_logprobs"] = (r.input_logprobs or []) if r.logprob_start_len >= 0 else []
    if r.return_routed_experts:
        rows = prompt_len + n_out - 1  # the last sampled token never ran through the model
        routes = torch.cat(r.routes) if r.routes else None
        if routes is not None and routes.shape[0] >= rows:
            routes = routes[r.routed_experts_start_len:rows]
            meta["routed_experts"] = protocol.encode_routed_experts(routes.numpy())
        else:  # aborted before its prefill ran
            meta["routed_experts"] = None
    meta["e2e_latency"] = time.perf_counter() - r.created
    meta["response_sent_to_client_ts"] = time.time()
    if tokenizer is None:  # SGLang with --skip-tokenizer-init answers no text
        return {"output_ids": out, "meta_info": meta}
    return {"text": text, "output_ids": out, "meta_info": meta}


def input_logprobs(r: Request, logits: torch.Tensor, tokenizer) -> list:
    """SGLang's input_token_logprobs from logprob_start_len: [None] for the first token, then
    log_softmax(raw logits) of each next prompt token (prefill log-probs carry no temperature)."""
    start, prompt = r.logprob_start_len, r.input_ids
    entries = [[None, prompt[start], None]]
    if start + 1 < len(prompt):
        lp = torch.log_softmax(logits[start:len(prompt) - 1].float(), dim=-1)
        targets = torch.tensor(prompt[start + 1:])
        values = lp.gather(1, targets[:, None])[:, 0].clamp(min=LOGPROB_MIN).tolist()
        entries += [[v, t, token_text(r, t, tokenizer)] for v, t in zip(values, prompt[start + 1:])]
    return entries


def token_text(r: Request, token: int, tokenizer):
    """The text of one token in a log-prob entry, when the request asked for it."""
    if r.return_text_in_logprobs and tokenizer is not None:
        return tokenizer.decode([token])
    return None


def version_spans(events: list[tuple[str, int]], current: str, num_output: int) -> list[dict]:
    """SGLang's compute_weight_version_spans: which output tokens [start, end) each version made."""
    spans: list[dict] = []
    for version, end in [*events, (current, num_output)]:
        end = min(end, num_output)
        if spans and end <= spans[-1]["end"]:
            continue
        if spans and version == spans[-1]["version"]:
            spans[-1]["end"] = end
            continue
        spans.append({"version": version, "start": spans[-1]["end"] if spans else 0, "end": end})
    return spans

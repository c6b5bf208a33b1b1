"""What a request is: its sampling parameters (``Sampling``), the request in flight (``Request``)
and ``prepare``, which validates one against the served model with SGLang's checks and words."""

from __future__ import annotations

import concurrent.futures
import time
import uuid
from dataclasses import dataclass

import torch

from megatron_vespo.rollout import protocol

_SAMPLING_EPS = 1e-6  # SGLang treats temperature below this as greedy


@dataclass(frozen=True)
class Sampling:
    """Parsed sampling parameters (the subset RL rollouts use, SGLang's defaults)."""

    max_new_tokens: int = 128
    stop_token_ids: tuple = ()
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    min_new_tokens: int = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < _SAMPLING_EPS


def parse_sampling_params(params: dict | None, vocab_size: int | None = None) -> Sampling:
    """SGLang's validation (protocol.validate_sampling_params), then the local engine's own limit:
    only protocol.RL_SAMPLING_KEYS are implemented, anything else is a ValueError naming it."""
    params = {} if params is None else params
    protocol.validate_sampling_params(params, vocab_size)
    unsupported = sorted(set(params) - protocol.RL_SAMPLING_KEYS)
    if unsupported:
        raise ValueError(f"sampling_params: {unsupported} not supported by the local engine "
                         f"(it implements {sorted(protocol.RL_SAMPLING_KEYS)})")
    if params.get("n") not in (None, 1):
        raise ValueError(f"sampling_params.n must be 1 on the local engine, got {params['n']}: "
                         f"send n separate requests")
    values = {k: v for k, v in params.items() if v is not None and k != "n"}
    if "stop_token_ids" in values:
        values["stop_token_ids"] = tuple(values["stop_token_ids"])
    for key in ("temperature", "top_p", "min_p"):
        if key in values:
            values[key] = float(values[key])
    return Sampling(**values)


class Request:
    """One generation in flight. Fields below ``output_ids`` are written by the scheduler thread
    under the engine lock; ``done`` only ever goes False -> True."""

    def __init__(self, rid, input_ids, sampling, return_logprob, logprob_start_len, return_routed_experts,
                 routed_experts_start_len, return_text_in_logprobs, generator):
        self.rid = rid
        self.input_ids = input_ids
        self.sampling = sampling
        self.return_logprob = return_logprob
        self.logprob_start_len = logprob_start_len
        self.return_routed_experts = return_routed_experts
        self.routed_experts_start_len = routed_experts_start_len
        self.return_text_in_logprobs = return_text_in_logprobs
        self.generator = generator
        self.output_ids: list[int] = []
        self.output_logprobs: list[float] = []
        self.input_logprobs: list | None = None
        self.routes: list[torch.Tensor] = []  # int32 chunks [rows, layers, top_k], one row per token fed
        self.version_events: list[tuple[str, int]] = []  # (old version, output tokens made with it)
        self.finish: protocol.FinishReason | None = None
        self.done = False
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.created = time.perf_counter()


class RequestPreparation:
    """``LocalEngine.prepare``. A mixin because validation reads the served model's facts
    (tokenizer, vocab_size, context_length, num_experts, architectures, model_path) and draws a
    seed from the engine's ``_seed_rng``, all set by ``LocalEngine.__init__``."""

    def prepare(self, input_ids: list[int] | None = None, sampling_params: dict | None = None, rid: str | None = None,
                return_logprob: bool = False, logprob_start_len: int = -1, return_routed_experts: bool = False,
                routed_experts_start_len: int = 0, return_text_in_logprobs: bool = False,
                text: str | None = None) -> Request:
        """Validate one request; raises ValueError naming what is wrong. Does not queue it."""
        if (input_ids is None) == (text is None):
            raise ValueError("exactly one of input_ids and text must be given")
        if text is not None:
            if self.tokenizer is None:
                raise ValueError(f"text input needs a tokenizer, and {self.model_path} has none: send input_ids")
            if not isinstance(text, str):
                raise ValueError(f"text must be a string, got {type(text).__name__}")
            input_ids = list(self.tokenizer.encode(text))
        # type and range checks in C (set/map/min/max): a body of millions of tokens is checked in
        # milliseconds, not in seconds of bytecode that compete with the event loop for the GIL
        if not isinstance(input_ids, list) or not input_ids or set(map(type, input_ids)) != {int}:
            raise ValueError("input_ids must be a non-empty list of integers")
        if min(input_ids) < 0 or max(input_ids) >= self.vocab_size:
            bad = [protocol.brief(t) for t in input_ids if not 0 <= t < self.vocab_size]
            raise ValueError(f"input_ids has token ids outside [0, {self.vocab_size}): [{', '.join(bad[:5])}]")
        sampling = parse_sampling_params(sampling_params, self.vocab_size)
        prompt_len = len(input_ids)
        if self.context_length is not None:  # SGLang's checks and words (tokenizer_manager.py), no truncation
            if prompt_len >= self.context_length:
                raise ValueError(f"The input ({prompt_len} tokens) is longer than the model's context length "
                                 f"({self.context_length} tokens).")
            if prompt_len + sampling.max_new_tokens > self.context_length:
                raise ValueError(
                    f"Requested token count exceeds the model's maximum context length of {self.context_length} "
                    f"tokens. You requested a total of {prompt_len + sampling.max_new_tokens} tokens: {prompt_len} "
                    f"tokens from the input messages and {sampling.max_new_tokens} tokens for the completion. "
                    f"Please reduce the number of tokens in the input messages or the completion to fit within "
                    f"the limit.")
        for key, value in (("return_logprob", return_logprob), ("return_routed_experts", return_routed_experts),
                           ("return_text_in_logprobs", return_text_in_logprobs)):
            if not isinstance(value, bool):
                raise ValueError(f"{key} must be a boolean, got {value!r}")
        if not isinstance(logprob_start_len, int) or isinstance(logprob_start_len, bool) or not (
                logprob_start_len == -1 or 0 <= logprob_start_len < prompt_len):
            raise ValueError(f"logprob_start_len must be -1 (output log-probs only) or in [0, {prompt_len}) "
                             f"for this {prompt_len}-token prompt, got {logprob_start_len!r}")
        if return_routed_experts and not self.num_experts:
            raise ValueError(f"return_routed_experts: {self.architectures[0]} at {self.model_path} is a dense "
                             f"model, it has no routed experts")
        if not isinstance(routed_experts_start_len, int) or isinstance(routed_experts_start_len, bool) or not (
                0 <= routed_experts_start_len < prompt_len):
            raise ValueError(f"routed_experts_start_len must be in [0, {prompt_len}) for this {prompt_len}-token "
                             f"prompt, got {routed_experts_start_len!r}")
        if rid is None:
            rid = uuid.uuid4().hex
        if not isinstance(rid, str) or not rid:
            raise ValueError(f"rid must be a non-empty string, got {rid!r}")
        seed = sampling.sampling_seed if sampling.sampling_seed is not None else self._seed_rng.getrandbits(63)
        generator = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
        return Request(rid, list(input_ids), sampling, return_logprob, logprob_start_len, return_routed_experts,
                       routed_experts_start_len, return_text_in_logprobs, generator)

"""SGLang's native HTTP protocol (0.5.23), the subset rollouts use: one module owns it.

Pure functions, no network: request building and sampling-parameter validation (what SGLang's
``SamplingParams.verify`` and its msgspec schema would reject is rejected here first, naming the
key), response decoding (output log-probs, base64 routed experts, finish reasons) and the checks
that keep a bad engine answer out of training. The client and the local engine both use it, so
they cannot disagree about the protocol.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field

import numpy as np

SGLANG_VERSION = "0.5.23"

# sglang/api/v1/api_types.py (0.5.23) SamplingParams: unknown keys are an HTTP 400 there.
SAMPLING_PARAM_KEYS = frozenset({
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema",
    "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
    "no_stop_trim", "stream_interval", "logit_bias", "sampling_seed", "custom_params", "beam_width",
    "watermark", "choice",
})
# What RL rollouts send; the local engine implements exactly these (others are rejected by it).
RL_SAMPLING_KEYS = frozenset({
    "max_new_tokens", "stop_token_ids", "temperature", "top_p", "top_k", "min_p", "min_new_tokens",
    "ignore_eos", "skip_special_tokens", "no_stop_trim", "sampling_seed", "n",
})
_INT_KEYS = {"max_new_tokens", "top_k", "min_new_tokens", "n", "sampling_seed", "stream_interval", "beam_width"}
_FLOAT_KEYS = {"temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty"}
_BOOL_KEYS = {"ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"}

FINISH_TYPES = ("stop", "length", "abort")


class ProtocolError(ValueError):
    """An engine answer (or a request) that breaks the protocol; the message names what is wrong."""


class MissingRoutesError(ProtocolError):
    """Routed experts were asked for and not returned."""


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def brief(value, limit: int = 80) -> str:
    """``repr(value)`` for an error message, short: a number with hundreds of digits (or a long
    string) would bury the message it is quoted in."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10 ** 20:
        return f"a {len(str(abs(value)))}-digit integer"
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def validate_sampling_params(params: dict, vocab_size: int | None = None) -> dict:
    """Return ``params`` unchanged if SGLang 0.5.23 accepts them, else raise ValueError naming the key.
    Mirrors the schema's key/type checks and ``SamplingParams.verify``'s ranges. Integers must fit
    64 bits (SGLang's msgspec schema decodes them so, and the engine's tensors hold them so) and
    numbers must convert to finite floats: a value past either would raise later, in a step shared
    with other requests."""
    if not isinstance(params, dict):
        raise ValueError(f"sampling_params must be a JSON object, got {type(params).__name__}")
    unknown = sorted(set(params) - SAMPLING_PARAM_KEYS)
    if unknown:
        hint = " (SGLang calls it max_new_tokens)" if "max_tokens" in unknown else ""
        raise ValueError(f"sampling_params: unknown key(s) {unknown}{hint}; SGLang {SGLANG_VERSION} rejects them")
    for key, value in params.items():
        if value is None:
            continue
        if key in _INT_KEYS:
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"sampling_params.{key} must be an integer, got {brief(value)}")
            if not INT64_MIN <= value <= INT64_MAX:
                raise ValueError(f"sampling_params.{key} must fit in 64 bits ([-2**63, 2**63 - 1]), "
                                 f"got {brief(value)}")
        if key in _FLOAT_KEYS:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"sampling_params.{key} must be a number, got {brief(value)}")
            try:
                finite = math.isfinite(value)
            except OverflowError:  # an integer too large for a float
                finite = False
            if not finite:
                raise ValueError(f"sampling_params.{key} must be a finite number, got {brief(value)}")
        if key in _BOOL_KEYS and not isinstance(value, bool):
            raise ValueError(f"sampling_params.{key} must be a boolean, got {brief(value)}")
    get = params.get
    temperature = get("temperature", 1.0)
    if temperature is not None and temperature < 0:
        raise ValueError(f"sampling_params.temperature must be a non-negative finite number, got {temperature}")
    top_p = get("top_p", 1.0)
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"sampling_params.top_p must be in (0, 1], got {top_p}")
    min_p = get("min_p", 0.0)
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise ValueError(f"sampling_params.min_p must be in [0, 1], got {min_p}")
    top_k = get("top_k", -1)
    if top_k is not None and top_k < 1 and top_k != -1:
        raise ValueError(f"sampling_params.top_k must be -1 (all) or >= 1, got {top_k}")
    max_new = get("max_new_tokens", 128)
    min_new = get("min_new_tokens", 0) or 0
    if max_new is not None and max_new < 0:
        raise ValueError(f"sampling_params.max_new_tokens must be >= 0, got {max_new}")
    if min_new < 0 or (max_new is not None and min_new > max_new):
        raise ValueError(f"sampling_params.min_new_tokens must be in [0, max_new_tokens], got {min_new}")
    for key in ("frequency_penalty", "presence_penalty"):
        if get(key) is not None and not -2.0 <= get(key) <= 2.0:
            raise ValueError(f"sampling_params.{key} must be in [-2, 2], got {get(key)}")
    if get("repetition_penalty") is not None and not 0.0 < get("repetition_penalty") <= 2.0:
        raise ValueError(f"sampling_params.repetition_penalty must be in (0, 2], got {get('repetition_penalty')}")
    if get("n") is not None and get("n") < 1:
        raise ValueError(f"sampling_params.n must be >= 1, got {get('n')}")
    stop_ids = get("stop_token_ids")
    if stop_ids is not None:
        if not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
            raise ValueError(f"sampling_params.stop_token_ids must be a list of integers, got {brief(stop_ids)}")
        if any(not INT64_MIN <= t <= INT64_MAX for t in stop_ids):
            raise ValueError("sampling_params.stop_token_ids must hold 64-bit integers")
        if vocab_size is not None and any(not 0 <= t < vocab_size for t in stop_ids):
            raise ValueError(f"sampling_params.stop_token_ids has ids outside [0, {vocab_size})")
    if sum(get(k) is not None for k in ("json_schema", "regex", "ebnf", "structural_tag")) > 1:
        raise ValueError("sampling_params: only one of json_schema, regex, ebnf, structural_tag may be set")
    return params


def rollout_sampling_params(max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                            seed: int | None = None) -> dict:
    """The sampling parameters of an RL rollout: the response exactly as sampled (the stop token
    kept, special tokens not skipped), since the trainer scores every sampled token; ``seed``
    (SGLang's ``sampling_seed``) when given."""
    params = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
              "no_stop_trim": True, "skip_special_tokens": False}
    if seed is not None:
        params["sampling_seed"] = seed
    return params


def generate_request(input_ids: list[int], sampling_params: dict, rid: str | None = None,
                     return_logprob: bool = True, return_routed_experts: bool = False) -> dict:
    """The body of one non-streaming ``POST /generate`` with token-id input."""
    if not input_ids or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in input_ids):
        raise ValueError("input_ids must be a non-empty list of non-negative integers")
    body = {"input_ids": list(input_ids), "sampling_params": validate_sampling_params(dict(sampling_params)),
            "return_logprob": bool(return_logprob), "stream": False}
    if rid is not None:
        body["rid"] = rid
    if return_logprob:
        body["logprob_start_len"] = -1  # output-token log-probs only
    if return_routed_experts:
        body["return_routed_experts"] = True
    return body


def encode_routed_experts(routes: np.ndarray) -> str:
    """[tokens, layers, top_k] integers -> base64 of little-endian int32 (SGLang's encoding)."""
    return base64.b64encode(np.ascontiguousarray(routes, dtype="<i4").tobytes()).decode("ascii")


def decode_routed_experts(text: str, num_tokens: int, num_layers: int, top_k: int,
                          num_experts: int | None = None) -> np.ndarray:
    """Base64 int32 -> [num_tokens, num_layers, top_k]; a wrong size or an expert id out of range
    is a ProtocolError naming the shapes (a server without --enable-return-routed-experts, or one
    serving another model, must not feed routing replay)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as err:
        raise ProtocolError(f"routed_experts is not valid base64: {err}") from None
    expected = num_tokens * num_layers * top_k
    if len(raw) != 4 * expected:
        raise ProtocolError(
            f"routed_experts has {len(raw) // 4} int32 values, expected {expected} = {num_tokens} tokens x "
            f"{num_layers} layers x top-k {top_k} (prompt + output - 1 tokens)")
    routes = np.frombuffer(raw, dtype="<i4").reshape(num_tokens, num_layers, top_k).astype(np.int32)
    if num_experts is not None and routes.size and (routes.min() < 0 or routes.max() >= num_experts):
        raise ProtocolError(f"routed_experts has expert ids outside [0, {num_experts}): "
                            f"min {routes.min()}, max {routes.max()}")
    return routes


@dataclass
class FinishReason:
    type: str  # stop | length | abort
    matched: int | str | None = None
    length: int | None = None
    message: str | None = None
    status_code: int | None = None

    def to_json(self) -> dict:
        if self.type == "stop":
            return {"type": "stop", "matched": self.matched}
        if self.type == "length":
            return {"type": "length", "length": self.length}
        out = {"type": "abort", "message": self.message or ""}
        if self.status_code is not None:
            out["status_code"] = self.status_code
        return out


def parse_finish_reason(value) -> FinishReason:
    if not isinstance(value, dict) or value.get("type") not in FINISH_TYPES:
        raise ProtocolError(f"finish_reason must be an object with type in {FINISH_TYPES}, got {value!r}")
    return FinishReason(type=value["type"], matched=value.get("matched"), length=value.get("length"),
                        message=value.get("message"), status_code=value.get("status_code"))


@dataclass
class GenerateResult:
    """One decoded ``/generate`` answer."""

    rid: str
    output_ids: list[int]
    logprobs: np.ndarray | None  # float32 [len(output_ids)]
    routed_experts: np.ndarray | None  # int32 [prompt + output - 1, layers, top_k]
    finish: FinishReason
    weight_version: str | None
    meta: dict = field(default_factory=dict)


def parse_generate_response(answer: dict, prompt_len: int, vocab_size: int | None = None,
                            routing: tuple[int, int, int] | None = None) -> GenerateResult:
    """Decode and check a non-streaming ``/generate`` answer. ``routing`` = (layers, top_k,
    num_experts) when routed experts were asked for. Raises ProtocolError on NaN/inf or positive
    log-probs, log-prob entries that disagree with output_ids, out-of-vocabulary tokens, or a
    routed-experts array of the wrong size."""
    if not isinstance(answer, dict) or not isinstance(answer.get("meta_info"), dict):
        raise ProtocolError(f"/generate answer has no meta_info object: {str(answer)[:200]}")
    meta = answer["meta_info"]
    output_ids = answer.get("output_ids")
    if not isinstance(output_ids, list) or not all(isinstance(t, int) for t in output_ids):
        raise ProtocolError("/generate answer has no output_ids list (needs token-id input and logprobs)")
    if vocab_size is not None and any(not 0 <= t < vocab_size for t in output_ids):
        bad = next(t for t in output_ids if not 0 <= t < vocab_size)
        raise ProtocolError(f"output token {bad} is outside the vocabulary [0, {vocab_size})")
    finish = parse_finish_reason(meta.get("finish_reason"))
    logprobs = None
    entries = meta.get("output_token_logprobs")
    if entries is not None:
        if len(entries) != len(output_ids):
            raise ProtocolError(f"{len(entries)} output_token_logprobs for {len(output_ids)} output tokens")
        values = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, (list, tuple)) or len(entry) < 2:
                raise ProtocolError(f"output_token_logprobs[{i}] must be [logprob, token_id, text], got {entry!r}")
            logprob, token = entry[0], entry[1]
            if token != output_ids[i]:
                raise ProtocolError(f"output_token_logprobs[{i}] is for token {token}, output_ids has {output_ids[i]}")
            if not isinstance(logprob, (int, float)) or not math.isfinite(logprob) or logprob > 1e-4:
                raise ProtocolError(f"output_token_logprobs[{i}] = {logprob!r} is not a finite log-probability")
            values.append(logprob)
        logprobs = np.asarray(values, dtype=np.float32)
    routes = None
    if routing is not None and output_ids:
        text = meta.get("routed_experts")
        if text is None:
            raise MissingRoutesError(
                "routed_experts missing: start the server with --enable-return-routed-experts, and send "
                "such requests to the servers, not through sglang-router (0.3.2 drops return_routed_experts)")
        layers, top_k, num_experts = routing
        routes = decode_routed_experts(text, prompt_len + len(output_ids) - 1, layers, top_k, num_experts)
    return GenerateResult(rid=str(meta.get("id", "")), output_ids=list(output_ids), logprobs=logprobs,
                          routed_experts=routes, finish=finish, weight_version=meta.get("weight_version"),
                          meta=meta)


# -- models SGLang builds wrongly without saying so --------------------------------------------------


def unsupported_model_features(hf_config: dict, sglang_version: str | None = None) -> list[str]:
    """Features of the model in ``hf_config`` (a config.json) that SGLang ``sglang_version``
    (default: the one this module speaks) would serve wrongly without an error, named.

    SGLang 0.5.23's ``models/qwen3_moe.py`` and ``models/qwen2_moe.py`` build every decoder layer
    as MoE: ``mlp_only_layers`` and ``decoder_sparse_step`` are never read, so a dense layer gets an
    MoE block with no expert weights loaded and every answer is NaN (token 0, log-prob null).
    Released Qwen3-MoE / Qwen2-MoE checkpoints have no dense layer; a converted or cut-down one may."""
    from megatron_vespo.convert.families import dense_layer_ids

    version = sglang_version or SGLANG_VERSION
    problems = []
    model_type = hf_config.get("model_type")
    if model_type in ("qwen3_moe", "qwen2_moe") and _at_most(version, "0.5.23"):
        layers = int(hf_config.get("num_hidden_layers") or 0)
        dense = dense_layer_ids(hf_config, layers, model_type) if layers else ()
        if dense:
            problems.append(
                f"{model_type} with dense layers {list(dense)} (mlp_only_layers = "
                f"{hf_config.get('mlp_only_layers')}, decoder_sparse_step = {hf_config.get('decoder_sparse_step')}): "
                f"SGLang {version} builds every {model_type} layer as MoE, so those layers would have no weights "
                f"and every answer would be NaN")
    return problems


def _at_most(version: str, limit: str) -> bool:
    """version <= limit; a version that does not parse counts as old (the safe side)."""
    from packaging.version import InvalidVersion, Version

    try:
        return Version(str(version)) <= Version(limit)
    except InvalidVersion:
        return True

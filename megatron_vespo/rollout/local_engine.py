"""A CPU inference engine with SGLang's semantics, backed by a transformers model (no HTTP here).

It serves the CPU demo, the rollout tests and the trainer's in-process route, so it reproduces what
training depends on, exactly as SGLang 0.5.23 does it:

* output log-probs are ``log_softmax(logits.float() / T)`` over the full vocabulary, taken before
  the top-k / top-p / min-p mask (greedy: log_softmax of the raw logits);
* routed experts are the top-k the model's own routers chose (forward hooks on the router modules),
  ``[prompt + output - 1, layers, top_k]`` int32 with dense layers left zero;
* finish reasons, pause modes (abort / retract / in_place), abort, flush_cache refusal while
  requests run, weight updates from disk or from Hugging Face checkpoint tensors, weight-version
  spans, and the begin/end weight-update session 0.5.23 requires for tensor/distributed updates.

Requests are batched continuously: the scheduler thread prefills every waiting request (up to
``max_batch``) together (left padding, explicit position ids, one DynamicCache) and decodes one
token per step for the whole batch; requests arriving meanwhile are prefilled at the next step
boundary and merged into the running batch's cache. Each request's answer is delivered the moment
it finishes. Callers get ``concurrent.futures.Future`` objects, so an asyncio server stays
responsive while model steps run in the scheduler thread.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass

import torch

from megatron_vespo.rollout import protocol

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
PAUSE_MODES = ("abort", "retract", "in_place")
DEFAULT_GROUP_NAME = "weight_update_group"
_SAMPLING_EPS = 1e-6  # SGLang treats temperature below this as greedy
_LOGPROB_MIN = float(torch.finfo(torch.float32).min)  # SGLang clamps -inf log-probs to this


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


class _Request:
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


def _version_spans(events: list[tuple[str, int]], current: str, num_output: int) -> list[dict]:
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


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple, set)) else [value])]


class LocalEngine:
    """See the module docstring. Thread-safe; ``close()`` (or a ``with`` block) stops the scheduler."""

    def __init__(self, model_dir: str, dtype: str = "bfloat16", max_batch: int = 64, seed: int = 0,
                 weight_version: str = "default", batch_wait_s: float = 0.002, num_threads: int | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not os.path.isdir(model_dir) or not os.path.exists(os.path.join(model_dir, "config.json")):
            raise FileNotFoundError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
        if num_threads is not None:
            if num_threads < 1:
                raise ValueError(f"num_threads must be >= 1, got {num_threads}")
            torch.set_num_threads(num_threads)  # process-wide: None leaves the caller's setting alone
        self.model_path = model_dir
        self.dtype_name, self.dtype = dtype, DTYPES[dtype]
        self.max_batch, self.seed, self.batch_wait_s = max_batch, seed, batch_wait_s
        self.weight_version = str(weight_version)
        self.model = self._load_model(model_dir)
        cfg = self.model.config
        self.config = cfg
        self.architectures = list(getattr(cfg, "architectures", None) or [type(self.model).__name__])
        self.model_type = getattr(cfg, "model_type", None)
        self.num_hidden_layers = int(cfg.num_hidden_layers)
        self.num_experts = int(getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None) or 0)
        self.num_experts_per_tok = int(getattr(cfg, "num_experts_per_tok", 0) or 0) if self.num_experts else 0
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.context_length = int(getattr(cfg, "max_position_embeddings", 0) or 0) or None
        self.tokenizer = self._load_tokenizer(model_dir)
        eos = set(_as_id_list(getattr(cfg, "eos_token_id", None)))
        eos |= set(_as_id_list(getattr(self.model.generation_config, "eos_token_id", None)))
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        self.eos_token_ids = frozenset(t for t in eos if 0 <= t < self.vocab_size)
        self._route_capture: dict[int, torch.Tensor] = {}
        self.moe_layers = self._install_router_hooks()
        self._targets = None  # checkpoint name -> (parameter, index, shape), built on first use

        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._model_lock = threading.Lock()  # one forward or one weight write at a time
        self._waiting: collections.deque[_Request] = collections.deque()
        self._running: list[_Request] = []
        self._by_rid: dict[str, _Request] = {}
        self._paused = False
        self._pause_mode = "abort"
        self._parked = False  # scheduler is holding a batch for an in_place pause
        self._updates_pending = 0
        self._session_open = False
        self._groups: dict[str, object] = {}
        self._receive_lock = threading.Lock()  # broadcasts of two buckets must not interleave
        self._closed = False
        self._seed_rng = random.Random(seed)
        # statistics the tests and benchmarks read
        self.num_forwards = 0
        self.batch_sizes: list[int] = []
        self._worker = threading.Thread(target=self._loop, name="local-engine-scheduler", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ loading
    def _load_model(self, path: str):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
        model.eval()
        model.requires_grad_(False)
        return model

    @staticmethod
    def _load_tokenizer(path: str):
        names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
        if not any(os.path.exists(os.path.join(path, n)) for n in names):
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)

    def _install_router_hooks(self) -> tuple[int, ...]:
        """Hook every router: transformers 5 routers (``*TopKRouter`` at ``model.layers.L.mlp.gate``)
        return (router_logits, scores, indices); the indices are the experts the layer really used."""
        layers = []
        for name, module in self.model.named_modules():
            if not type(module).__name__.endswith("TopKRouter"):
                continue
            match = re.search(r"layers\.(\d+)\.", name)
            if match is None:
                raise RuntimeError(f"router module {name!r} is not inside model.layers.N")
            layer = int(match.group(1))
            module.register_forward_hook(self._route_hook(layer))
            layers.append(layer)
        if self.num_experts and not layers:
            raise RuntimeError(f"{self.architectures}: config has {self.num_experts} experts but no *TopKRouter "
                               f"module was found (unsupported transformers version?)")
        return tuple(sorted(layers))

    def _route_hook(self, layer: int):
        def hook(module, args, output):
            self._route_capture[layer] = output[2]
        return hook

    # ------------------------------------------------------------------ requests
    def prepare(self, input_ids: list[int] | None = None, sampling_params: dict | None = None, rid: str | None = None,
                return_logprob: bool = False, logprob_start_len: int = -1, return_routed_experts: bool = False,
                routed_experts_start_len: int = 0, return_text_in_logprobs: bool = False,
                text: str | None = None) -> _Request:
        """Validate one request; raises ValueError naming what is wrong. Does not queue it."""
        if (input_ids is None) == (text is None):
            raise ValueError("exactly one of input_ids and text must be given")
        if text is not None:
            if self.tokenizer is None:
                raise ValueError(f"text input needs a tokenizer, and {self.model_path} has none: send input_ids")
            if not isinstance(text, str):
                raise ValueError(f"text must be a string, got {type(text).__name__}")
            input_ids = list(self.tokenizer.encode(text))
        if (not isinstance(input_ids, list) or not input_ids
                or not all(isinstance(t, int) and not isinstance(t, bool) for t in input_ids)):
            raise ValueError("input_ids must be a non-empty list of integers")
        bad = [t for t in input_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"input_ids has token ids outside [0, {self.vocab_size}): {bad[:5]}")
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
        return _Request(rid, list(input_ids), sampling, return_logprob, logprob_start_len, return_routed_experts,
                        routed_experts_start_len, return_text_in_logprobs, generator)

    def enqueue(self, requests: list[_Request]) -> list[concurrent.futures.Future]:
        """Queue prepared requests together (so they share a batch); each future resolves to the
        SGLang ``/generate`` answer dict of its request."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            counts = collections.Counter(r.rid for r in requests)
            clash = sorted(rid for rid, n in counts.items() if n > 1 or rid in self._by_rid)
            if clash:
                raise ValueError(f"duplicate request id(s) {clash}: a request with that rid is already in flight")
            for r in requests:
                self._by_rid[r.rid] = r
                self._waiting.append(r)
            self._cond.notify_all()
        return [r.future for r in requests]

    def submit(self, **request) -> concurrent.futures.Future:
        """prepare + enqueue one request (keyword arguments of ``prepare``)."""
        return self.enqueue([self.prepare(**request)])[0]

    def submit_many(self, requests: list[dict]) -> list[concurrent.futures.Future]:
        """Validate every request first, then queue them together: a bad one rejects the lot."""
        return self.enqueue([self.prepare(**r) for r in requests])

    def generate(self, input_ids: list[int] | None = None, sampling_params: dict | None = None,
                 timeout: float | None = None, **request) -> dict:
        """Blocking single request; returns the ``/generate`` answer dict."""
        return self.submit(input_ids=input_ids, sampling_params=sampling_params, **request).result(timeout)

    def generate_batch(self, requests: list[dict], timeout: float | None = None) -> list[dict]:
        return [f.result(timeout) for f in self.submit_many(requests)]

    def inflight(self) -> dict[str, int]:
        """rid -> output tokens so far, for every request queued or running."""
        with self._lock:
            return {rid: len(r.output_ids) for rid, r in self._by_rid.items()}

    def loads(self) -> dict[str, int]:
        """Requests running in a batch now and waiting for one (SGLang's /v1/loads counts)."""
        with self._lock:
            running = sum(1 for r in self._running if not r.done)
            return {"num_running_reqs": running, "num_waiting_reqs": len(self._by_rid) - running}

    # ------------------------------------------------------------------ control
    def abort(self, rid: str | None = None, abort_all: bool = False, message: str = "aborted by abort_request") -> int:
        """Finish the request (or all of them) at once with an abort reason; returns how many."""
        with self._cond:
            if abort_all:
                targets = list(self._by_rid.values())
            else:
                targets = [self._by_rid[rid]] if rid in self._by_rid else []
            for r in targets:
                self._finish(r, protocol.FinishReason(type="abort", message=message))
            self._purge_waiting()
            return len(targets)

    def pause(self, mode: str = "abort") -> None:
        """SGLang's pause_generation. ``abort``: abort everything running or waiting; ``retract``:
        running requests go back to the queue (their KV is dropped and recomputed on continue);
        ``in_place``: the running batch is held with its KV cache. New requests wait in every mode.
        Returns once the scheduler has stopped stepping."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode must be one of {PAUSE_MODES}, got {mode!r}")
        with self._cond:
            self._paused, self._pause_mode = True, mode
            if mode == "abort":
                for r in list(self._by_rid.values()):
                    self._finish(r, protocol.FinishReason(type="abort", message="aborted by pause_generation"))
                self._purge_waiting()
            self._parked = False  # set again by the scheduler once it holds the batch in place
            self._cond.notify_all()
            while self._has_running() and not self._parked and not self._closed:
                self._cond.wait(0.5)

    def resume(self) -> None:
        """SGLang's continue_generation."""
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    continue_generation = resume

    @property
    def paused(self) -> bool:
        return self._paused

    def flush_cache(self) -> bool:
        """True when idle (SGLang refuses while requests run; waiting requests count unless paused).
        The engine keeps no prefix cache across requests, so there is nothing else to drop."""
        with self._lock:
            return not self._has_running() and (self._paused or not any(not r.done for r in self._waiting))

    def num_held_requests(self) -> int:
        with self._lock:
            return len(self._by_rid) if self._paused else 0

    def _has_running(self) -> bool:
        return any(not r.done for r in self._running)

    def _purge_waiting(self) -> None:
        self._waiting = collections.deque(r for r in self._waiting if not r.done)
        self._cond.notify_all()

    def set_weight_version(self, version: str) -> None:
        with self._lock:
            version = str(version)
            if version != self.weight_version:
                # SGLang records, for every request with output so far, how many tokens the old version made
                for r in self._by_rid.values():
                    if r.output_ids:
                        r.version_events.append((self.weight_version, len(r.output_ids)))
                self.weight_version = version

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            for r in list(self._by_rid.values()):
                self._finish(r, protocol.FinishReason(type="abort", message="engine shut down"))
            self._cond.notify_all()
        self._worker.join(timeout=30)
        self._groups.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ scheduler
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (self._paused or not self._waiting or self._updates_pending):
                    self._cond.wait()
                if self._closed:
                    return
            if self.batch_wait_s:
                time.sleep(self.batch_wait_s)  # let requests sent together by separate callers share the batch
            with self._cond:
                if self._paused or self._updates_pending or self._closed:
                    continue
                batch = []
                while self._waiting and len(batch) < self.max_batch:
                    r = self._waiting.popleft()
                    if not r.done:
                        batch.append(r)
                self._running = batch
            try:
                if batch:
                    self._run_batch(batch)
            except Exception as err:  # a model error must not kill the scheduler or hang callers
                log.exception("local engine batch failed")
                with self._cond:
                    for r in batch + self._running:  # the running list includes requests that joined later
                        self._finish(r, protocol.FinishReason(type="abort", status_code=500,
                                                              message=f"engine error: {type(err).__name__}: {err}"))
            finally:
                with self._cond:
                    self._running = []
                    self._cond.notify_all()

    def _forward(self, ids, mask, pos, cache, keep_all: bool):
        with self._model_lock, torch.no_grad():
            self._route_capture.clear()
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                             logits_to_keep=0 if keep_all else 1)
            routes = None
            if self.num_experts:
                b, s = ids.shape
                routes = torch.zeros(b, s, self.num_hidden_layers, self.num_experts_per_tok, dtype=torch.int32)
                for layer, idx in self._route_capture.items():
                    routes[:, :, layer] = idx.reshape(b, s, -1).to(torch.int32)
                self._route_capture.clear()
            self.num_forwards += 1
        return out.logits, routes

    def _prefill(self, rows: list[_Request]):
        """One forward over everything each request has so far (its prompt, plus its output when it
        was retracted), left-padded. Returns (cache, mask, last positions, last logits)."""
        from transformers import DynamicCache

        seqs = [r.input_ids + r.output_ids for r in rows]
        width = max(map(len, seqs))
        pads = [width - len(s) for s in seqs]
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, pads[i]:] = torch.tensor(s)
            mask[i, pads[i]:] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        want_input = [r.return_logprob and r.logprob_start_len >= 0 and r.input_logprobs is None for r in rows]
        cache = DynamicCache(config=self.model.config)
        logits, routes = self._forward(ids, mask, pos, cache, keep_all=any(want_input))
        with self._lock:
            self.batch_sizes.append(len(rows))
            for i, r in enumerate(rows):
                if r.done:
                    continue
                if routes is not None:
                    r.routes = [routes[i, pads[i]:]]  # recomputed rows replace any recorded before a retract
                if want_input[i]:
                    r.input_logprobs = self._input_logprobs(r, logits[i, pads[i]:])
        return cache, mask, pos[:, -1:], logits[:, -1]

    @staticmethod
    def _joinable(cache) -> bool:
        from transformers.cache_utils import DynamicLayer

        return all(type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers)

    @staticmethod
    def _left_pad(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
        if n == 0:
            return t
        shape = list(t.shape)
        shape[dim] = n
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    def _merge(self, cache, mask, other, other_mask):
        """Append another batch's rows to a running cache: the shorter side is left-padded with
        zero keys/values under a zero attention mask, so no row sees the padding."""
        width = max(mask.shape[1], other_mask.shape[1])
        pad_a, pad_b = width - mask.shape[1], width - other_mask.shape[1]
        for la, lb in zip(cache.layers, other.layers):
            la.keys = torch.cat([self._left_pad(la.keys, pad_a, 2), self._left_pad(lb.keys, pad_b, 2)])
            la.values = torch.cat([self._left_pad(la.values, pad_a, 2), self._left_pad(lb.values, pad_b, 2)])
        return cache, torch.cat([self._left_pad(mask, pad_a, 1), self._left_pad(other_mask, pad_b, 1)])

    def _run_batch(self, pending: list[_Request]) -> None:
        """Decode until every request is done. At each step boundary, waiting requests join the
        running batch (prefilled on their own, then merged into its cache) unless the engine is
        paused or a weight update waits for the batch to drain."""
        rows: list[_Request] = []
        cache = mask = pos = last = None
        while True:
            if pending:
                new_cache, new_mask, new_pos, new_last = self._prefill(pending)
                if rows:
                    cache, mask = self._merge(cache, mask, new_cache, new_mask)
                    pos, last = torch.cat([pos, new_pos]), torch.cat([last, new_last])
                else:
                    cache, mask, pos, last = new_cache, new_mask, new_pos, new_last
                rows, pending = rows + pending, []
            picks = self._sample(rows, last)
            with self._cond:
                for r, (token, logprob) in zip(rows, picks):
                    if r.done:
                        continue
                    if r.sampling.max_new_tokens == 0:
                        self._finish(r, protocol.FinishReason(type="length", length=0))
                        continue
                    r.output_ids.append(token)
                    r.output_logprobs.append(logprob)
                    finish = self._check_finish(r, token)
                    if finish is not None:
                        self._finish(r, finish)
                # hold the batch (with its KV cache) while paused in place
                while self._paused and self._pause_mode == "in_place" and not self._closed and any(
                        not r.done for r in rows):
                    self._parked = True
                    self._cond.notify_all()
                    self._cond.wait()
                self._parked = False
                live = [i for i, r in enumerate(rows) if not r.done]
                if self._paused and self._pause_mode == "retract":
                    self._waiting.extendleft(reversed([rows[i] for i in live]))
                    return
                if not self._paused and not self._updates_pending and not self._closed and (
                        not live or self._joinable(cache)):
                    while self._waiting and len(live) + len(pending) < self.max_batch:
                        r = self._waiting.popleft()
                        if not r.done:
                            pending.append(r)
                self._running = [rows[i] for i in live] + pending
                if not live and not pending:
                    return
            if not live:  # everything finished; the new arrivals start a fresh batch
                rows, cache = [], None
                continue
            if len(live) < len(rows):  # drop finished rows from the cache: later steps skip them
                keep = torch.tensor(live)
                cache.batch_select_indices(keep)
                mask, pos = mask[keep], pos[keep]
                rows = [rows[i] for i in live]
                unused = int(mask.any(0).int().argmax())  # leading columns now padding in every row
                if unused and self._joinable(cache):
                    for layer in cache.layers:
                        layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
                    mask = mask[:, unused:]
            step = torch.tensor([[r.output_ids[-1]] for r in rows])
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype)], dim=1)
            pos = pos + 1
            logits, routes = self._forward(step, mask, pos, cache, keep_all=False)
            if routes is not None:
                with self._lock:
                    for i, r in enumerate(rows):
                        if not r.done:
                            r.routes.append(routes[i])
            last = logits[:, -1]

    def _input_logprobs(self, r: _Request, logits: torch.Tensor) -> list:
        """SGLang's input_token_logprobs from logprob_start_len: [None] for the first token, then
        log_softmax(raw logits) of each next prompt token (prefill log-probs carry no temperature)."""
        start, prompt = r.logprob_start_len, r.input_ids
        entries = [[None, prompt[start], None]]
        if start + 1 < len(prompt):
            lp = torch.log_softmax(logits[start:len(prompt) - 1].float(), dim=-1)
            targets = torch.tensor(prompt[start + 1:])
            values = lp.gather(1, targets[:, None])[:, 0].clamp(min=_LOGPROB_MIN).tolist()
            entries += [[v, t, self._token_text(r, t)] for v, t in zip(values, prompt[start + 1:])]
        return entries

    def _sample(self, rows: list[_Request], logits: torch.Tensor) -> list[tuple[int, float]]:
        """Next token and its log-prob for every row, as SGLang's sampler: log-probs are
        log_softmax(logits / T) over the full vocabulary before the top-k/top-p/min-p mask."""
        logits = logits.to(torch.float32, copy=True)  # masked in place below
        for i, r in enumerate(rows):
            # min_new_tokens: SGLang's penalizer sets stop/EOS logits to -inf before the sampler
            if not r.done and len(r.output_ids) < r.sampling.min_new_tokens:
                banned = set(r.sampling.stop_token_ids) | self.eos_token_ids
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
                top_k = torch.tensor([samplings[i].top_k if samplings[i].top_k > 0 else vocab for i in sampled])
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
        chosen = logprobs.gather(1, tokens[:, None])[:, 0].clamp(min=_LOGPROB_MIN)
        return list(zip(tokens.tolist(), chosen.tolist()))

    def _check_finish(self, r: _Request, token: int) -> protocol.FinishReason | None:
        s = r.sampling
        # SGLang checks stop tokens before the length cap; ignore_eos disables both EOS and stop_token_ids
        if not s.ignore_eos and (token in s.stop_token_ids or token in self.eos_token_ids):
            return protocol.FinishReason(type="stop", matched=token)
        if len(r.output_ids) >= s.max_new_tokens:
            return protocol.FinishReason(type="length", length=s.max_new_tokens)
        return None

    def _finish(self, r: _Request, reason: protocol.FinishReason) -> None:
        """Under the lock: freeze the request and answer its caller."""
        if r.done:
            return
        r.done, r.finish = True, reason
        self._by_rid.pop(r.rid, None)
        try:
            answer = self._answer(r)
        except Exception as err:  # never leave a caller waiting
            r.future.set_exception(err)
        else:
            r.future.set_result(answer)
        self._cond.notify_all()

    # ------------------------------------------------------------------ answers
    def _token_text(self, r: _Request, token: int):
        if r.return_text_in_logprobs and self.tokenizer is not None:
            return self.tokenizer.decode([token])
        return None

    def _answer(self, r: _Request) -> dict:
        out = list(r.output_ids)
        prompt_len, n_out = len(r.input_ids), len(out)
        text = None
        if self.tokenizer is not None:
            shown = out
            if (r.finish.type == "stop" and isinstance(r.finish.matched, int) and not r.sampling.no_stop_trim
                    and shown):
                shown = shown[:-1]  # SGLang trims the matched stop token from the text, not from output_ids
            text = self.tokenizer.decode(shown, skip_special_tokens=r.sampling.skip_special_tokens)
        # the fields SGLang 0.5.23 answers with (those of features this engine lacks at their idle values)
        meta = {"id": r.rid, "finish_reason": r.finish.to_json(), "prompt_tokens": prompt_len,
                "weight_version": self.weight_version, "num_retractions": 0, "completion_tokens": n_out,
                "reasoning_tokens": 0, "cached_tokens": 0, "cached_tokens_details": None, "dp_rank": None}
        spans = _version_spans(r.version_events, self.weight_version, n_out)
        meta["weight_versions"] = [s for s in spans if s["start"] < n_out or s["start"] == 0]
        meta["weight_version"] = meta["weight_versions"][-1]["version"]
        if r.return_logprob:
            meta["output_token_logprobs"] = [[lp, t, self._token_text(r, t)]
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
        if self.tokenizer is None:  # SGLang with --skip-tokenizer-init answers no text
            return {"output_ids": out, "meta_info": meta}
        return {"text": text, "output_ids": out, "meta_info": meta}

    # ------------------------------------------------------------------ weights
    @contextlib.contextmanager
    def _exclusive_weights(self):
        """Where SGLang applies an update: at once when generation is paused, otherwise after the
        running batch has finished (its model-update writer lock); no new batch starts meanwhile."""
        with self._cond:
            self._updates_pending += 1
            while self._has_running() and not self._paused and not self._closed:
                self._cond.wait()
        try:
            with self._model_lock, torch.no_grad():
                yield
        finally:
            with self._cond:
                self._updates_pending -= 1
                self._cond.notify_all()

    def _weight_targets(self) -> dict:
        """Hugging Face checkpoint name -> (parameter, index into it, expected shape).

        transformers 5 fuses experts: ``mlp.experts.gate_up_proj`` [E, 2I, H] holds cat(gate, up)
        of each expert, ``mlp.experts.down_proj`` [E, H, I]; checkpoints (and the exporter) name one
        tensor per expert. Mixtral checkpoints say ``block_sparse_moe`` and w1/w3/w2 (gate/up/down)
        where the transformers 5 module is ``mlp``. The fused parameter names are accepted too."""
        if self._targets is not None:
            return self._targets
        mixtral = self.model_type == "mixtral"
        gate, up, down = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
        moe = "block_sparse_moe" if mixtral else "mlp"
        modules = dict(self.model.named_modules())
        targets = {}
        for name, param in self.model.named_parameters():
            targets[name] = (param, (), tuple(param.shape))
            match = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.(experts\.(gate_up_proj|down_proj)|gate\.weight)", name)
            if match is None:
                continue
            layer = match.group(1)
            prefix = f"model.layers.{layer}.{moe}."
            if match.group(3) is None:  # the router
                targets[prefix + "gate.weight"] = (param, (), tuple(param.shape))
                continue
            experts = modules[f"model.layers.{layer}.mlp.experts"]
            if getattr(experts, "is_transposed", False) or not getattr(experts, "is_concatenated", True):
                raise NotImplementedError(f"{name}: expert weights stored transposed or interleaved are not supported")
            num_experts, rows, cols = param.shape
            for e in range(num_experts):
                base = f"{prefix}experts.{e}."
                if match.group(3) == "gate_up_proj":
                    half = rows // 2
                    targets[base + f"{gate}.weight"] = (param, (e, slice(0, half)), (half, cols))
                    targets[base + f"{up}.weight"] = (param, (e, slice(half, rows)), (half, cols))
                else:
                    targets[base + f"{down}.weight"] = (param, (e,), (rows, cols))
        self._targets = targets
        return targets

    def hf_weight(self, name: str) -> torch.Tensor:
        """A copy of the weight the Hugging Face checkpoint calls ``name`` (one tensor per expert)."""
        targets = self._weight_targets()
        if name not in targets:
            raise KeyError(f"unknown tensor {name!r}: not a Hugging Face checkpoint name of this {self.architectures[0]}")
        param, index, _ = targets[name]
        with self._model_lock:
            return param.data[index].detach().clone()

    def _skipped(self, name: str) -> bool:
        # a tied lm_head is the embedding: checkpoints may carry it, the model has one tensor
        return name == "lm_head.weight" and bool(getattr(self.config, "tie_word_embeddings", False))

    def update_from_named_tensors(self, named_tensors, weight_version: str | None = None) -> int:
        """Write Hugging Face checkpoint tensors (one per expert, any order) into the model, with
        dtype conversion into the engine dtype. The whole bucket is checked first: an unknown name
        or a wrong shape raises ValueError naming the tensor and nothing is written. Returns the
        number of tensors written."""
        targets = self._weight_targets()
        plan = []
        for item in named_tensors:
            name, tensor = item
            if self._skipped(name):
                continue
            if name not in targets:
                example = next((n for n in targets if ".experts." in n), "model.embed_tokens.weight")
                raise ValueError(f"unknown tensor {name!r}: not a Hugging Face checkpoint name of this "
                                 f"{self.architectures[0]} (e.g. {example!r}); nothing was written")
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
            param, index, shape = targets[name]
            if tuple(tensor.shape) != shape:
                raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}; "
                                 f"nothing was written")
            if not tensor.is_floating_point():
                raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, expected a floating-point tensor")
            plan.append((param, index, tensor))
        with self._exclusive_weights():
            for param, index, tensor in plan:
                param.data[index].copy_(tensor.detach().to(device=param.device))
        if weight_version is not None:
            self.set_weight_version(weight_version)
        return len(plan)

    def update_from_disk(self, model_path: str, weight_version: str | None = None,
                         abort_all_requests: bool = False) -> dict:
        """SGLang's update_weights_from_disk: load the HF directory and copy its weights into the
        served model (same architecture and shapes). Returns {success, message, num_paused_requests}."""
        if abort_all_requests:
            self.abort(abort_all=True, message="aborted by update_weights_from_disk")
        try:
            new = self._load_model(model_path)
        except Exception as err:
            return {"success": False, "message": f"failed to load a model from {model_path!r}: "
                                                 f"{type(err).__name__}: {err}", "num_paused_requests": 0}
        cur, fresh = dict(self.model.named_parameters()), dict(new.named_parameters())
        problems = [f"missing {n}" for n in cur if n not in fresh] + [f"unexpected {n}" for n in fresh if n not in cur]
        problems += [f"{n}: shape {tuple(fresh[n].shape)}, served {tuple(p.shape)}" for n, p in cur.items()
                     if n in fresh and fresh[n].shape != p.shape]
        if problems:
            return {"success": False, "num_paused_requests": 0,
                    "message": f"{model_path} does not match the served {self.architectures[0]}: "
                               f"{'; '.join(problems[:5])}{' ...' if len(problems) > 5 else ''}"}
        with self._exclusive_weights():
            for name, param in cur.items():
                param.data.copy_(fresh[name].data)
            self.model_path = model_path
            held = self.num_held_requests()
        del new, fresh
        message = "Succeeded to update model weights."
        if weight_version is not None:
            self.set_weight_version(weight_version)
            message += f" Weight version updated to {weight_version}."
        return {"success": True, "message": message, "num_paused_requests": held}

    # -- SGLang 0.5.23's weight-update session and the distributed route
    def begin_weight_update(self) -> tuple[bool, str]:
        with self._lock:
            if self._session_open:
                return False, "a weight-update session is already open; call end_weight_update() first"
            self._session_open = True
            return True, "Success"

    @property
    def weight_update_session_open(self) -> bool:
        return self._session_open

    def end_weight_update(self) -> tuple[bool, str]:
        with self._lock:
            if not self._session_open:
                return False, "no weight-update session is open; call begin_weight_update() first"
            self._session_open = False
            return True, "Success"

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = DEFAULT_GROUP_NAME, backend: str = "nccl",
                                  timeout_s: float = 600.0) -> tuple[bool, str]:
        """Join a comm.StandaloneGroup as rank ``rank_offset`` (the trainer is rank 0). Blocks until
        every rank has joined."""
        from megatron_vespo.comm import StandaloneGroup

        if backend != "gloo":
            return False, (f"backend {backend!r} is not available: the local engine runs on CPU, "
                           f"use backend 'gloo'")
        if group_name in self._groups:
            return False, f"weight-update group {group_name!r} already exists; destroy it first"
        if not isinstance(world_size, int) or not isinstance(rank_offset, int) or not 1 <= rank_offset < world_size:
            return False, (f"rank_offset must be in [1, world_size={world_size}) (rank 0 is the trainer), "
                           f"got {rank_offset}")
        try:
            group = StandaloneGroup(master_address, int(master_port), rank_offset, world_size, backend="gloo",
                                    group_name=group_name, timeout_s=timeout_s)
        except Exception as err:
            return False, (f"joining {group_name!r} at {master_address}:{master_port} failed: "
                           f"{type(err).__name__}: {err}")
        self._groups[group_name] = group
        return True, "Succeeded to initialize custom process group."

    def destroy_weights_update_group(self, group_name: str = DEFAULT_GROUP_NAME) -> tuple[bool, str]:
        if self._groups.pop(group_name, None) is None:
            return False, f"no weight-update group named {group_name!r}"
        return True, "Succeeded to destroy custom process group."

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                        group_name: str = DEFAULT_GROUP_NAME, weight_version: str | None = None,
                                        abort_all_requests: bool = False, load_format: str | None = None,
                                        **_ignored) -> tuple[bool, str]:
        """Receive each tensor by broadcast from rank 0 of the group, in order, then apply them as
        one bucket. Refused (without receiving) outside begin/end_weight_update, as SGLang 0.5.23."""
        with self._lock:
            if not self._session_open:
                return False, ("update_weights_from_distributed must run between begin_weight_update() "
                               "and end_weight_update()")
        group = self._groups.get(group_name)
        if group is None:
            return False, f"no weight-update group named {group_name!r}: call init_weights_update_group first"
        if load_format not in (None, "auto", "default"):
            return False, f"load_format {load_format!r} is not supported by the local engine (only per-tensor)"
        if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)
                and len(names) == len(dtypes) == len(shapes)):
            return False, "names, dtypes and shapes must be lists of the same length"
        specs = []
        for name, dtype, shape in zip(names, dtypes, shapes):
            torch_dtype = getattr(torch, str(dtype).removeprefix("torch."), None)
            if not isinstance(torch_dtype, torch.dtype):
                return False, f"tensor {name!r}: unknown dtype {dtype!r}"
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                return False, f"tensor {name!r}: shape must be a list of non-negative integers, got {shape!r}"
            specs.append((name, torch_dtype, shape))
        if abort_all_requests:
            self.abort(abort_all=True, message="aborted by update_weights_from_distributed")
        with self._receive_lock:
            received = []
            for name, torch_dtype, shape in specs:  # receive all, even a bad one: rank 0 sends them all
                tensor = torch.empty(shape, dtype=torch_dtype)
                group.broadcast_(tensor, src=0)
                received.append((name, tensor))
            try:
                self.update_from_named_tensors(received, weight_version=weight_version)
            except ValueError as err:
                return False, str(err)
        message = "Succeeded to update parameter online."
        if weight_version is not None:
            message += f" Weight version updated to {weight_version}."
        return True, message

    # ------------------------------------------------------------------ info
    def model_info(self) -> dict:
        return {"model_path": self.model_path, "served_model_name": self.model_path, "tokenizer_path": self.model_path,
                "is_generation": True, "preferred_sampling_params": None, "weight_version": self.weight_version,
                "load_format": "auto", "has_image_understanding": False, "has_audio_understanding": False,
                "model_type": self.model_type, "architectures": self.architectures}

    def server_info(self) -> dict:
        context = self.context_length or 0
        return {"version": protocol.SGLANG_VERSION, "model_path": self.model_path, "dtype": self.dtype_name,
                "tp_size": 1, "pp_size": 1, "dp_size": 1, "ep_size": 1, "random_seed": self.seed,
                "max_running_requests": self.max_batch, "max_total_num_tokens": context * self.max_batch,
                "context_length": self.context_length, "enable_return_routed_experts": bool(self.num_experts),
                "skip_tokenizer_init": self.tokenizer is None, "weight_version": self.weight_version,
                "num_hidden_layers": self.num_hidden_layers, "num_experts": self.num_experts,
                "num_experts_per_tok": self.num_experts_per_tok, "vocab_size": self.vocab_size,
                "paused": self._paused, "num_threads": torch.get_num_threads(),
                "frontend": "megatron_vespo.local_engine"}

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

This module assembles ``LocalEngine`` (construction and model loading, the request queue, pause,
abort and close, info) from its parts in ``rollout/engine/``: the request and its validation
(``requests``), the scheduler thread (``scheduler``, over ``running_batch``, ``sampler`` and
``answers``) and the weight updates (``weights``). The parts share the engine's state and locks,
all created in ``LocalEngine.__init__``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import random
import re
import threading

import torch

from megatron_vespo.rollout import protocol
from megatron_vespo.rollout.engine.requests import Request, RequestPreparation, Sampling, parse_sampling_params
from megatron_vespo.rollout.engine.scheduler import Scheduler
from megatron_vespo.rollout.engine.weights import DEFAULT_GROUP_NAME, EngineWeights

# the names callers import from here (serve_local: DEFAULT_GROUP_NAME)
__all__ = ["DEFAULT_GROUP_NAME", "DTYPES", "PAUSE_MODES", "LocalEngine", "Sampling", "parse_sampling_params"]

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
PAUSE_MODES = ("abort", "retract", "in_place")


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple, set)) else [value])]


class LocalEngine(RequestPreparation, Scheduler, EngineWeights):
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
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[Request] = []
        self._by_rid: dict[str, Request] = {}
        self._paused = False
        self._pause_mode = "abort"
        self._parked = False  # scheduler is holding a batch for an in_place pause
        self._updates_pending = 0
        self._session_open = False
        self._groups: dict[str, object] = {}
        self._joining: set[str] = set()  # weight-update groups being joined (one at a time)
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

        from megatron_vespo.convert.families import load_hf_config

        load_hf_config(path)  # a missing or broken config.json is an error naming the file
        # local_files_only: a path that is not a directory must fail here, never become a hub download
        model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype, local_files_only=True)
        model.eval()
        model.requires_grad_(False)
        return model

    @staticmethod
    def _load_tokenizer(path: str):
        names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
        if not any(os.path.exists(os.path.join(path, n)) for n in names):
            return None
        from megatron_vespo.input_files import load_tokenizer

        return load_tokenizer(path)  # its JSON files checked first: a broken one is named

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

    # ------------------------------------------------------------------ requests (prepare: engine/requests.py)
    def enqueue(self, requests: list[Request]) -> list[concurrent.futures.Future]:
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

"""Rollout client for SGLang's native HTTP API (and the local engine, which speaks the same).

``RolloutClient`` sends generations (through the sglang-router or straight to servers),
``EngineControl`` makes the calls the router does not route (pause, continue, flush, abort, weight
updates) to every server directly, ``wait_until_healthy`` waits for servers to come up."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field

import numpy as np

from megatron_vespo.rollout import protocol

log = logging.getLogger(__name__)


def auth_headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def wait_until_healthy(urls: list[str], timeout_s: float = 600.0, api_key: str | None = None,
                       path: str = "/health", processes=None, interval_s: float = 0.5) -> None:
    """Block until every URL answers ``GET path`` with 200. Raises TimeoutError naming the servers
    still down, or RuntimeError as soon as one of ``processes`` (Popen objects, same order as
    ``urls`` or any order) has exited, instead of waiting out the timeout."""
    deadline = time.monotonic() + timeout_s
    pending = list(urls)
    last_error: dict[str, str] = {}
    while pending:
        for proc in processes or []:
            if proc.poll() is not None:
                raise RuntimeError(f"server process {proc.args if isinstance(proc.args, str) else ' '.join(map(str, proc.args))!r} "
                                   f"exited with code {proc.returncode} before becoming healthy")
        still = []
        for url in pending:
            request = urllib.request.Request(url.rstrip("/") + path, headers=auth_headers(api_key))
            try:
                with urllib.request.urlopen(request, timeout=5) as answer:
                    if answer.status != 200:
                        raise urllib.error.HTTPError(url, answer.status, "not ready", None, None)
            except (OSError, urllib.error.URLError, json.JSONDecodeError) as err:
                last_error[url] = str(err)
                still.append(url)
        pending = still
        if pending:
            if time.monotonic() > deadline:
                details = "; ".join(f"{u}: {last_error.get(u)}" for u in pending)
                raise TimeoutError(f"servers not healthy after {timeout_s:.0f} s: {details}")
            time.sleep(interval_s)


# ----------------------------------------------------------------------------------------------
# Rollouts
# ----------------------------------------------------------------------------------------------



@dataclass
class RolloutSample:
    """One finished generation, as training needs it."""

    index: int  # position of its prompt in the request list (a group of n samples shares it)
    prompt_ids: list[int]
    response_ids: list[int]
    engine_logprobs: np.ndarray  # float32 [len(response_ids)]: log_softmax(logits / T), pre top-p/k
    finish_reason: str  # stop | length | abort
    weight_version: str | None
    routed_experts: np.ndarray | None = None  # int32 [prompt + response - 1, layers, top_k]
    server: str = ""
    rid: str = ""
    attempts: int = 1
    meta: dict = field(default_factory=dict)


@dataclass
class RequestFailure:
    index: int
    rid: str
    attempts: int
    error: str


class RolloutError(RuntimeError):
    """Some requests failed for good. ``samples`` holds every request that did finish (nothing
    done is lost), ``failures`` the others with their last error."""

    def __init__(self, failures: list[RequestFailure], samples: list[RolloutSample]):
        self.failures, self.samples = failures, samples
        first = failures[0]
        super().__init__(f"{len(failures)} of {len(failures) + len(samples)} rollout requests failed; "
                         f"first: prompt {first.index} (rid {first.rid}) after {first.attempts} attempt(s): "
                         f"{first.error}")


class _Retryable(Exception):
    pass


class _Fatal(Exception):
    pass


def _nth_sample_params(params: dict, k: int) -> dict:
    """Sample k of a group: with a sampling_seed, seed + k, so a group is reproducible and its
    samples differ (one seed for all n requests would make them identical)."""
    if k == 0 or params.get("sampling_seed") is None:
        return params
    return {**params, "sampling_seed": params["sampling_seed"] + k}


class RolloutClient:
    """Async client for ``POST /generate`` with token-id input.

    ``urls``: the sglang-router, or the servers themselves (then requests are spread round-robin).
    ``server_urls``: the servers behind the router. Requests that ask for routed experts (R3) go
    to them directly, spread round-robin: sglang-router 0.3.2 re-encodes /generate bodies without
    ``return_routed_experts`` (sglang issue #20696), so the servers would never return routes.
    A request that fails (connection error, timeout, HTTP 5xx, an aborted generation, or an answer
    that breaks the protocol: NaN log-probs, wrong routed-experts size, out-of-vocabulary token) is
    retried on the next URL, up to ``max_attempts``; a 4xx answer is the request's own fault and is
    not retried. Each prompt index yields exactly one sample or one reported failure: retries never
    duplicate a sample, failures are never silently dropped.
    """

    def __init__(self, urls: list[str] | str, api_key: str | None = None, max_concurrency: int = 64,
                 timeout_s: float = 600.0, max_attempts: int = 3, retry_backoff_s: float = 0.2,
                 vocab_size: int | None = None, routing: tuple[int, int, int] | None = None,
                 server_urls: list[str] | None = None):
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("RolloutClient needs at least one server or router URL")
        if max_concurrency < 1 or max_attempts < 1:
            raise ValueError("max_concurrency and max_attempts must be >= 1")
        self.urls = [u.rstrip("/") for u in self.urls]
        self.server_urls = [u.rstrip("/") for u in server_urls] if server_urls else self.urls
        self.api_key, self.max_concurrency, self.timeout_s = api_key, max_concurrency, timeout_s
        self.max_attempts, self.retry_backoff_s = max_attempts, retry_backoff_s
        self.vocab_size, self.routing = vocab_size, routing
        self._next_url = itertools.count()

    async def generate(self, prompts: list[list[int]], sampling_params: dict | list[dict], n: int = 1,
                       return_routed_experts: bool = False, session=None) -> list[RolloutSample]:
        """Generate ``n`` samples per prompt (n independent requests, so each can be retried on its
        own). Returns samples ordered by (prompt index, sample number). Raises RolloutError if any
        request failed for good."""
        import aiohttp

        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling_params for {len(prompts)} prompts")
        if return_routed_experts and self.routing is None:
            raise ValueError("return_routed_experts needs routing=(layers, top_k, num_experts) to check answers")
        for p in params:
            protocol.validate_sampling_params(p, self.vocab_size)
            if p.get("n", 1) != 1:
                raise ValueError("sampling_params.n must be 1; ask for n samples with generate(..., n=N)")
        batch = uuid.uuid4().hex[:8]
        jobs = [(i, k, prompts[i], _nth_sample_params(params[i], k)) for i in range(len(prompts)) for k in range(n)]
        limit = asyncio.Semaphore(self.max_concurrency)
        own_session = session is None
        if own_session:
            session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                connector=aiohttp.TCPConnector(limit=self.max_concurrency))
        try:
            results = await asyncio.gather(*(
                self._one(session, limit, f"{batch}-{i}-{k}", i, prompt, p, return_routed_experts)
                for i, k, prompt, p in jobs))
        finally:
            if own_session:
                await session.close()
        samples = [r for r in results if isinstance(r, RolloutSample)]
        failures = [r for r in results if isinstance(r, RequestFailure)]
        if failures:
            raise RolloutError(failures, samples)
        return samples

    def generate_sync(self, *args, **kwargs) -> list[RolloutSample]:
        return asyncio.run(self.generate(*args, **kwargs))

    async def _one(self, session, limit, rid_base, index, prompt, params, routed) -> RolloutSample | RequestFailure:
        start = next(self._next_url)
        targets = self.server_urls if routed else self.urls
        error = ""
        for attempt in range(self.max_attempts):
            url = targets[(start + attempt) % len(targets)]
            rid = f"{rid_base}-a{attempt}"  # a retry is a new request: an abort of the old rid cannot hit it
            try:
                body = protocol.generate_request(prompt, params, rid=rid, return_routed_experts=routed)
                async with limit:
                    result = await self._post_generate(session, url, body, len(prompt), routed)
                return RolloutSample(
                    index=index, prompt_ids=list(prompt), response_ids=result.output_ids,
                    engine_logprobs=result.logprobs if result.logprobs is not None else np.zeros(0, np.float32),
                    finish_reason=result.finish.type, weight_version=result.weight_version,
                    routed_experts=result.routed_experts, server=url, rid=rid, attempts=attempt + 1,
                    meta=result.meta)
            except _Fatal as err:
                return RequestFailure(index, rid, attempt + 1, str(err))
            except ValueError as err:  # the request itself is invalid
                return RequestFailure(index, rid, attempt + 1, str(err))
            except _Retryable as err:
                error = str(err)
                log.warning("rollout request %s failed on %s (attempt %d/%d): %s", rid, url, attempt + 1,
                            self.max_attempts, error)
                await asyncio.sleep(self.retry_backoff_s * (attempt + 1) * (0.5 + random.random()))
        return RequestFailure(index, f"{rid_base}-a{self.max_attempts - 1}", self.max_attempts, error)

    async def _post_generate(self, session, url, body, prompt_len, routed) -> protocol.GenerateResult:
        import aiohttp

        try:
            async with session.post(url + "/generate", json=body, headers=auth_headers(self.api_key)) as answer:
                text = await answer.text()
                status = answer.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as err:
            raise _Retryable(f"{type(err).__name__}: {err}") from None
        if status >= 500 or status in (408, 429):
            raise _Retryable(f"HTTP {status}: {text[:300]}")
        if status != 200:
            raise _Fatal(f"HTTP {status} from {url}/generate: {text[:500]}")
        try:
            answer_json = json.loads(text)
        except json.JSONDecodeError:
            raise _Retryable(f"answer is not JSON: {text[:200]}") from None
        try:
            result = protocol.parse_generate_response(
                answer_json, prompt_len, self.vocab_size, self.routing if routed else None)
        except protocol.MissingRoutesError as err:  # a setup problem: every retry would fail alike
            raise _Fatal(f"{url}: {err}") from None
        except protocol.ProtocolError as err:
            raise _Retryable(f"bad engine answer from {url}: {err}") from None
        if result.finish.type == "abort":
            status_code = result.finish.status_code or 0
            if 400 <= status_code < 500:
                raise _Fatal(f"engine aborted the request: {result.finish.message} (status {status_code})")
            raise _Retryable(f"generation aborted: {result.finish.message}")
        return result


# ----------------------------------------------------------------------------------------------
# Control calls: each server directly (the router does not route them)
# ----------------------------------------------------------------------------------------------


class ControlError(RuntimeError):
    pass


class EngineControl:
    """Calls every server directly, concurrently, for what the router does not route: pause,
    continue, flush, abort and weight updates. Synchronous API (the trainer calls it between steps)."""

    def __init__(self, server_urls: list[str], api_key: str | None = None, timeout_s: float = 600.0):
        if not server_urls:
            raise ValueError("EngineControl needs the server URLs (not the router's)")
        self.urls = [u.rstrip("/") for u in server_urls]
        self.api_key, self.timeout_s = api_key, timeout_s
        self._versions: dict[str, str] = {}

    def call(self, path: str, body: dict | None = None, method: str = "POST", urls: list[str] | None = None,
             check_success: bool = True, bodies: list[dict] | None = None) -> list[dict]:
        """One request per server (``bodies[i]`` for server i when given), all in parallel; raises
        ControlError naming every server that failed."""
        from concurrent.futures import ThreadPoolExecutor

        targets = urls or self.urls
        payloads = bodies or [body] * len(targets)

        def one(args):
            url, payload = args
            data = None if method == "GET" else json.dumps(payload or {}).encode()
            request = urllib.request.Request(url + path, data=data, method=method,
                                             headers={"Content-Type": "application/json", **auth_headers(self.api_key)})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:
                    text = answer.read().decode() or "{}"
            except urllib.error.HTTPError as err:
                return url, None, f"HTTP {err.code}: {err.read().decode(errors='replace')[:300]}"
            except OSError as err:
                return url, None, str(err)
            try:
                out = json.loads(text)
            except json.JSONDecodeError:
                out = {"text": text}
            if check_success and isinstance(out, dict) and out.get("success") is False:
                return url, out, f"success=false: {out.get('message')}"
            return url, out, None

        with ThreadPoolExecutor(max_workers=len(targets)) as pool:
            results = list(pool.map(one, zip(targets, payloads)))
        errors = [f"{url}{path}: {err}" for url, _, err in results if err]
        if errors:
            raise ControlError("; ".join(errors))
        return [out for _, out, _ in results]

    def server_version(self, url: str) -> str:
        if url not in self._versions:
            info = self.call("/server_info", method="GET", urls=[url])[0]
            self._versions[url] = str(info.get("version", "0"))
        return self._versions[url]

    def needs_update_session(self, url: str) -> bool:
        """SGLang >= 0.5.23 refuses tensor/distributed updates outside begin/end_weight_update."""
        from packaging.version import InvalidVersion, Version

        try:
            return Version(self.server_version(url)) >= Version("0.5.23")
        except InvalidVersion:
            return True

    def pause(self, mode: str = "in_place"):
        if mode not in ("abort", "retract", "in_place"):
            raise ValueError(f"pause mode must be abort, retract or in_place, got {mode!r}")
        return self.call("/pause_generation", {"mode": mode})

    def resume(self):
        return self.call("/continue_generation", {})

    def flush_cache(self, timeout_s: float = 60.0):
        """SGLang answers 400 while requests are running; retry until it is idle."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.call("/flush_cache", {}, check_success=False)
            except ControlError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def abort_all(self):
        return self.call("/abort_request", {"abort_all": True, "rid": ""}, check_success=False)

    def begin_weight_update(self):
        urls = [u for u in self.urls if self.needs_update_session(u)]
        return self.call("/begin_weight_update", {}, urls=urls) if urls else []

    def end_weight_update(self):
        urls = [u for u in self.urls if self.needs_update_session(u)]
        return self.call("/end_weight_update", {}, urls=urls) if urls else []

    def update_weights_from_disk(self, model_path: str, weight_version: str, flush_cache: bool = True):
        return self.call("/update_weights_from_disk", {
            "model_path": model_path, "weight_version": weight_version, "flush_cache": flush_cache,
            "abort_all_requests": False})

    def model_info(self) -> list[dict]:
        return self.call("/model_info", method="GET", check_success=False)

    def weight_versions(self) -> list[str | None]:
        return [info.get("weight_version") for info in self.model_info()]

"""The SGLang protocol layer and the rollout client against misbehaving engines (no model needed)."""

import asyncio
import json
import math
import threading

import numpy as np
import pytest

from megatron_vespo.rollout import protocol
from megatron_vespo.rollout.client import RolloutClient, RolloutError
from tests.sglang_schema import Schema, recorded_fields


@pytest.fixture(scope="module")
def schema(tmp_path_factory):
    return Schema(str(tmp_path_factory.mktemp("sglang_schema")))


def test_sampling_keys_are_sglangs_own(schema):
    fields = recorded_fields()["SamplingParams"]
    if schema.api is not None:  # the wheel and the recorded list agree, and so does the protocol module
        assert list(schema.api.SamplingParams.__struct_fields__) == fields
    assert protocol.SAMPLING_PARAM_KEYS == set(fields)
    assert protocol.RL_SAMPLING_KEYS <= protocol.SAMPLING_PARAM_KEYS


@pytest.mark.parametrize("params, message", [
    ({"max_tokens": 8}, "max_new_tokens"),
    ({"top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"top_k": 0}, "top_k must be -1"),
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"max_new_tokens": 4, "min_new_tokens": 5}, "min_new_tokens"),
    ({"max_new_tokens": "8"}, "max_new_tokens must be an integer"),
    ({"ignore_eos": 1}, "ignore_eos must be a boolean"),
    ({"stop_token_ids": [3, 999]}, "outside [0, 100)"),
    ({"regex": "a", "ebnf": "b"}, "only one of"),
    # numbers past what the engine's tensors hold (issue 17): refused here, not in a shared step
    ({"top_k": 10**20}, "top_k must fit in 64 bits ([-2**63, 2**63 - 1]), got a 21-digit integer"),
    ({"sampling_seed": -2**63 - 1}, "sampling_seed must fit in 64 bits"),
    ({"temperature": 10**400}, "temperature must be a finite number, got a 401-digit integer"),
    ({"min_p": float("inf")}, "min_p must be a finite number"),
    ({"stop_token_ids": [10**30]}, "stop_token_ids must hold 64-bit integers"),
])
def test_bad_sampling_params_are_named(params, message, schema):
    with pytest.raises(ValueError) as err:
        protocol.validate_sampling_params(params, vocab_size=100)
    assert message in str(err.value)


def test_requests_the_client_builds_pass_sglangs_schema(schema):
    params = {"max_new_tokens": 16, "temperature": 0.7, "top_p": 0.9, "top_k": -1, "stop_token_ids": [2],
              "min_new_tokens": 1, "no_stop_trim": True, "skip_special_tokens": False, "sampling_seed": 3}
    body = protocol.generate_request([1, 2, 3], params, rid="r0", return_routed_experts=True)
    decoded = schema.check("GenerateRequest", json.loads(json.dumps(body)))
    if schema.api is not None:
        assert decoded.input_ids == [1, 2, 3] and decoded.sampling_params.temperature == 0.7
    # and the schema really rejects what the protocol module rejects
    with pytest.raises(ValueError):
        schema.check("GenerateRequest", {"input_ids": [1], "sampling_params": {"max_tokens": 3}})


def test_routed_experts_round_trip_and_size_errors():
    routes = np.random.default_rng(0).integers(0, 8, size=(5, 3, 2)).astype(np.int32)
    text = protocol.encode_routed_experts(routes)
    assert np.array_equal(protocol.decode_routed_experts(text, 5, 3, 2, num_experts=8), routes)
    with pytest.raises(protocol.ProtocolError, match="expected 36 = 6 tokens x 3 layers x top-k 2"):
        protocol.decode_routed_experts(text, 6, 3, 2)
    with pytest.raises(protocol.ProtocolError, match=r"outside \[0, 4\)"):
        protocol.decode_routed_experts(text, 5, 3, 2, num_experts=4)
    with pytest.raises(protocol.ProtocolError, match="base64"):
        protocol.decode_routed_experts("not base64!", 5, 3, 2)


def _answer(output_ids, logprobs, finish=None, routes=None, version="v0"):
    meta = {"id": "x", "finish_reason": finish or {"type": "length", "length": len(output_ids)},
            "prompt_tokens": 3, "completion_tokens": len(output_ids), "weight_version": version,
            "output_token_logprobs": [[lp, t, None] for lp, t in zip(logprobs, output_ids)]}
    if routes is not None:
        meta["routed_experts"] = protocol.encode_routed_experts(routes)
    return {"text": "", "output_ids": output_ids, "meta_info": meta}


def test_response_checks(schema):
    good = _answer([4, 5], [-0.5, -1.0], routes=np.zeros((4, 2, 2), np.int32))
    schema.check("GenerateResponse", good)
    result = protocol.parse_generate_response(good, prompt_len=3, vocab_size=10, routing=(2, 2, 4))
    assert result.output_ids == [4, 5] and result.routed_experts.shape == (4, 2, 2)
    assert np.allclose(result.logprobs, [-0.5, -1.0]) and result.weight_version == "v0"
    cases = [
        (_answer([4, 5], [-0.5, math.nan]), "output_token_logprobs[1] = nan"),
        (_answer([4, 5], [-0.5, 0.3]), "not a finite log-probability"),
        (_answer([4, 12], [-0.5, -0.1]), "output token 12 is outside the vocabulary"),
        (_answer([4, 5], [-0.5, -1.0], routes=np.zeros((5, 2, 2), np.int32)), "expected 16"),
        (_answer([4, 5], [-0.5, -1.0], finish={"type": "eos"}), "finish_reason"),
    ]
    for answer, message in cases:
        with pytest.raises(protocol.ProtocolError) as err:
            protocol.parse_generate_response(answer, prompt_len=3, vocab_size=10, routing=(2, 2, 4))
        assert message in str(err.value)
    broken = _answer([4, 5], [-0.5, -1.0])
    broken["meta_info"]["output_token_logprobs"][1][1] = 6
    with pytest.raises(protocol.ProtocolError, match="is for token 6"):
        protocol.parse_generate_response(broken, prompt_len=3)


class FakeEngine:
    """A tiny HTTP server whose /generate answers come from a function: for the failure paths a
    real model cannot be made to produce (NaN log-probs, wrong sizes)."""

    def __init__(self, respond):
        from aiohttp import web

        self.respond, self.requests = respond, []

        async def generate(request):
            body = await request.json()
            self.requests.append(body)
            status, payload = self.respond(body, len(self.requests))
            return web.json_response(payload, status=status)

        self.app = web.Application()
        self.app.router.add_post("/generate", generate)
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(10)

    def _run(self):
        from aiohttp import web

        self.loop = asyncio.new_event_loop()
        runner = web.AppRunner(self.app)
        self.loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        self.ready.set()
        self.loop.run_forever()

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.mark.parametrize("answer, message", [
    (_answer([4, 5], [-0.5, math.nan]), "= nan is not a finite log-probability"),
    (_answer([4, 50], [-0.5, -1.0]), "output token 50 is outside the vocabulary"),
    (_answer([4, 5], [-0.5, -1.0], routes=np.zeros((3, 2, 2), np.int32)), "expected 16 = 4 tokens"),
])
def test_client_rejects_bad_engine_answers_after_retrying(answer, message):
    engine = FakeEngine(lambda body, n: (200, answer))
    try:
        client = RolloutClient([engine.url], max_attempts=2, retry_backoff_s=0.0, vocab_size=10, routing=(2, 2, 4))
        with pytest.raises(RolloutError) as err:
            client.generate_sync([[1, 2, 3]], {"max_new_tokens": 2}, return_routed_experts=True)
        assert message in str(err.value) and "after 2 attempt(s)" in str(err.value)
        assert len(engine.requests) == 2 and err.value.samples == []
    finally:
        engine.close()


def test_client_retries_on_another_server_and_keeps_one_sample_per_prompt():
    # server A fails every other request with a 503; server B always answers
    good = lambda body: _answer([7], [-0.25])  # noqa: E731
    a = FakeEngine(lambda body, n: (503, {"error": "overloaded"}) if n % 2 else (200, good(body)))
    b = FakeEngine(lambda body, n: (200, good(body)))
    try:
        client = RolloutClient([a.url, b.url], max_attempts=3, retry_backoff_s=0.0, vocab_size=10)
        samples = client.generate_sync([[1, 2, 3]] * 6, {"max_new_tokens": 1}, n=2)
        assert [s.index for s in samples] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
        assert sum(s.attempts > 1 for s in samples) > 0  # some really were retried elsewhere
        retried = [s for s in samples if s.attempts > 1]
        assert all(s.server == b.url for s in retried if s.attempts == 2 and s.rid.endswith("a1"))
        # every answered rid is distinct: a retry is a new request, never a duplicate sample
        assert len({s.rid for s in samples}) == len(samples)
        assert len(a.requests) + len(b.requests) == len(samples) + sum(s.attempts - 1 for s in samples)
    finally:
        a.close()
        b.close()


def test_a_rejected_request_is_not_retried_and_finished_ones_are_kept():
    def respond(body, n):
        if body["input_ids"] == [9]:
            return 400, {"error": {"message": "bad prompt"}}
        return 200, _answer([7], [-0.25])

    engine = FakeEngine(respond)
    try:
        client = RolloutClient([engine.url], max_attempts=3, retry_backoff_s=0.0)
        with pytest.raises(RolloutError) as err:
            client.generate_sync([[1], [9], [2]], {"max_new_tokens": 1})
        assert "HTTP 400" in str(err.value) and "bad prompt" in str(err.value)
        assert [f.index for f in err.value.failures] == [1] and err.value.failures[0].attempts == 1
        assert sorted(s.index for s in err.value.samples) == [0, 2]
    finally:
        engine.close()

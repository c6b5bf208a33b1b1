"""The local engine against the transformers model it serves: log-probs, routed experts, batching,
finish reasons, pause/abort, weight updates (in-process, disk, gloo broadcast) and the HTTP layer."""

import collections
import json
import os
import random
import socket
import threading
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open

from megatron_vespo.comm import StandaloneGroup
from megatron_vespo.rollout import protocol
from megatron_vespo.rollout.local_engine import LocalEngine
from megatron_vespo.rollout.serve_local import LocalServer
from tests.engines import http, one_thread  # noqa: F401 -- an autouse fixture
from tests.hf_models import make_hf_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3, 4], [20, 21, 22, 23, 24], [100, 1, 2, 3, 90, 91, 92, 93, 94, 95, 96]]


# ----------------------------------------------------------------------------- fixtures
def _load_hf(path, dtype=torch.float32):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _perturbed_copy(src, dst, seed):
    """A second model of the same architecture with different weights (make_hf_model always seeds 0)."""
    model = _load_hf(src)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(dst)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("local_engine")
    out = {}
    for family in ("qwen3_moe", "mixtral", "qwen2_moe", "qwen3"):
        out[family] = str(root / family)
        make_hf_model(family, out[family])
    for family in ("qwen3_moe", "mixtral"):
        out[family + "_b"] = str(root / (family + "_b"))
        _perturbed_copy(out[family], out[family + "_b"], seed=7)
    return out


@pytest.fixture(scope="module")
def engine(dirs):
    with LocalEngine(dirs["qwen3_moe"], dtype="float32", max_batch=16) as eng:
        yield eng


@pytest.fixture(scope="module")
def hf(dirs):
    return _load_hf(dirs["qwen3_moe"])


@pytest.fixture(scope="module")
def schema(tmp_path_factory):
    from tests.sglang_schema import Schema

    return Schema(str(tmp_path_factory.mktemp("sglang_schema")))


@pytest.fixture(scope="module")
def server(engine):
    with LocalServer(engine=engine) as srv:
        yield srv


# ----------------------------------------------------------------------------- helpers
def ref_logprobs(model, prompt, output, temperature):
    """log_softmax(logits / T) of a full forward over prompt + output: [len(output), vocab]."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + output])).logits[0].float()
    scale = temperature if temperature > 0 else 1.0
    return torch.log_softmax(logits / scale, dim=-1)[len(prompt) - 1:len(prompt) + len(output) - 1]


def ref_routes(model, tokens, top_k):
    """Top-k of each router's softmax in one full forward: [len(tokens), layers, top_k], dense layers 0."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([tokens]), output_router_logits=True)
    sparse = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    assert len(sparse) == len(out.router_logits)
    routes = np.zeros((len(tokens), len(model.model.layers), top_k), np.int32)
    for layer, logits in zip(sparse, out.router_logits):
        routes[:, layer] = torch.topk(torch.softmax(logits.float(), -1), top_k).indices.numpy()
    return routes, sparse


def logprobs_of(answer):
    return torch.tensor([e[0] for e in answer["meta_info"]["output_token_logprobs"]])


def decoded_routes(eng, answer, prompt_len):
    return protocol.decode_routed_experts(answer["meta_info"]["routed_experts"],
                                          prompt_len + len(answer["output_ids"]) - 1, eng.num_hidden_layers,
                                          eng.num_experts_per_tok, eng.num_experts)


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def checkpoint_tensors(path):
    tensors = []
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                tensors += [(k, f.get_tensor(k)) for k in f.keys()]
    return tensors



def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- log-probs
SAMPLINGS = [
    {"temperature": 1.0},
    {"temperature": 0.7},
    {"temperature": 1.0, "top_p": 0.6},
    {"temperature": 0.8, "top_k": 3},
    {"temperature": 0.9, "top_k": 10, "top_p": 0.9, "min_p": 0.05},
]


@pytest.mark.parametrize("params", SAMPLINGS, ids=lambda p: "-".join(f"{k}{v}" for k, v in p.items()))
def test_logprobs_equal_hf_forward_fp32(engine, hf, params):
    answers = engine.generate_batch([dict(input_ids=p, return_logprob=True,
                                          sampling_params={"max_new_tokens": 12, "sampling_seed": i, **params})
                                     for i, p in enumerate(PROMPTS)])
    temperature = params["temperature"]
    for prompt, answer in zip(PROMPTS, answers):
        out = answer["output_ids"]
        assert len(out) == 12 and answer["meta_info"]["finish_reason"] == {"type": "length", "length": 12}
        ref = ref_logprobs(hf, prompt, out, temperature)
        expected = ref.gather(1, torch.tensor(out)[:, None])[:, 0]
        # full-vocabulary log-probs, before the top-k/top-p mask (which would renormalise them)
        torch.testing.assert_close(logprobs_of(answer), expected, atol=1e-4, rtol=0)
        ranks = (ref > expected[:, None]).sum(-1)  # how many tokens were more likely than the sampled one
        if "top_k" in params:
            assert int(ranks.max()) < params["top_k"]
        if "top_p" in params:
            probs = ref.exp()
            mass_before = (probs * (probs > probs.gather(1, torch.tensor(out)[:, None]))).sum(-1)
            assert float(mass_before.max()) <= params["top_p"] + 1e-5


def test_greedy_is_argmax_with_raw_logprobs(engine, hf):
    answer = engine.generate(PROMPTS[0], {"max_new_tokens": 10, "temperature": 0.0}, return_logprob=True)
    out = answer["output_ids"]
    ref = ref_logprobs(hf, PROMPTS[0], out, 0.0)
    assert out == ref.argmax(-1).tolist()
    torch.testing.assert_close(logprobs_of(answer), ref.max(-1).values, atol=1e-4, rtol=0)


def test_sampling_follows_the_distribution(engine, hf):
    n = 1200
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([PROMPTS[0]])).logits[0, -1].float()
    # top-k: only the k most likely tokens, with their renormalised probabilities
    answers = engine.generate_batch([dict(input_ids=PROMPTS[0], sampling_params={
        "max_new_tokens": 1, "temperature": 0.3, "top_k": 4, "sampling_seed": s}) for s in range(n)])
    top = torch.topk(torch.softmax(logits / 0.3, -1), 4)
    counts = collections.Counter(a["output_ids"][0] for a in answers)
    assert set(counts) <= set(top.indices.tolist())
    for token, p in zip(top.indices.tolist(), (top.values / top.values.sum()).tolist()):
        assert abs(counts[token] / n - p) < 0.05, (token, counts[token] / n, p)
    # no mask: the mean log-prob of the samples estimates minus the entropy
    answers = engine.generate_batch([dict(input_ids=PROMPTS[0], return_logprob=True, sampling_params={
        "max_new_tokens": 1, "temperature": 0.3, "sampling_seed": n + s}) for s in range(n)])
    logp = torch.log_softmax(logits / 0.3, -1)
    entropy = float(-(logp.exp() * logp).sum())
    assert abs(float(np.mean([a["meta_info"]["output_token_logprobs"][0][0] for a in answers])) + entropy) < 0.15


def test_logprobs_bf16_engine(dirs):
    model = _load_hf(dirs["qwen3_moe"], torch.bfloat16)
    with LocalEngine(dirs["qwen3_moe"], dtype="bfloat16") as eng:
        answers = eng.generate_batch([dict(input_ids=p, return_logprob=True,
                                           sampling_params={"max_new_tokens": 10, "temperature": 0.7,
                                                            "sampling_seed": i}) for i, p in enumerate(PROMPTS)])
    for prompt, answer in zip(PROMPTS, answers):
        ref = ref_logprobs(model, prompt, answer["output_ids"], 0.7)
        expected = ref.gather(1, torch.tensor(answer["output_ids"])[:, None])[:, 0]
        torch.testing.assert_close(logprobs_of(answer), expected, atol=0.06, rtol=0.01)


def test_input_token_logprobs(engine, hf):
    prompt = PROMPTS[3]
    answer = engine.generate(prompt, {"max_new_tokens": 2}, return_logprob=True, logprob_start_len=3)
    entries = answer["meta_info"]["input_token_logprobs"]
    assert [e[1] for e in entries] == prompt[3:] and entries[0][0] is None
    with torch.no_grad():
        lp = torch.log_softmax(hf(input_ids=torch.tensor([prompt])).logits[0].float(), -1)
    expected = lp[3:-1].gather(1, torch.tensor(prompt[4:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor([e[0] for e in entries[1:]]), expected, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- routed experts
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_routed_experts_equal_router_topk(dirs, engine, family):
    eng = engine if family == "qwen3_moe" else LocalEngine(dirs[family], dtype="float32")
    try:
        model = _load_hf(dirs[family])
        answers = eng.generate_batch([dict(input_ids=p, return_routed_experts=True,
                                           sampling_params={"max_new_tokens": 7, "sampling_seed": i})
                                      for i, p in enumerate(PROMPTS)])
        for prompt, answer in zip(PROMPTS, answers):
            routes = decoded_routes(eng, answer, len(prompt))
            tokens = prompt + answer["output_ids"]
            assert routes.shape == (len(tokens) - 1, eng.num_hidden_layers, eng.num_experts_per_tok)
            expected, sparse = ref_routes(model, tokens[:-1], eng.num_experts_per_tok)
            np.testing.assert_array_equal(np.sort(routes, -1), np.sort(expected, -1))
            dense = [i for i in range(eng.num_hidden_layers) if i not in sparse]
            assert (routes[:, dense] == 0).all() and (routes[:, sparse] != routes[:, sparse][..., :1]).any()
        if family == "qwen3_moe":
            assert sparse == [1, 2, 3]  # mlp_only_layers=[0]: layer 0 is dense and reported as zeros
        # routed_experts_start_len drops the first rows
        answer = eng.generate(PROMPTS[0], {"max_new_tokens": 4, "sampling_seed": 0}, return_routed_experts=True,
                              routed_experts_start_len=5)
        rows = len(PROMPTS[0]) + 4 - 1 - 5
        sliced = protocol.decode_routed_experts(answer["meta_info"]["routed_experts"], rows, eng.num_hidden_layers,
                                                eng.num_experts_per_tok)
        np.testing.assert_array_equal(sliced, decoded_routes(eng, answers[0], len(PROMPTS[0]))[5:5 + rows])
    finally:
        if eng is not engine:
            eng.close()


def test_dense_model_rejects_routed_experts(dirs):
    with LocalEngine(dirs["qwen3"], dtype="float32") as eng:
        with pytest.raises(ValueError, match="dense"):
            eng.submit(input_ids=[1, 2], return_routed_experts=True)
        answer = eng.generate([1, 2, 3], {"max_new_tokens": 3, "temperature": 0.0})  # tied embeddings, no experts
        assert len(answer["output_ids"]) == 3


# ----------------------------------------------------------------------------- batching
def test_batch_equals_one_at_a_time(engine):
    requests = [dict(input_ids=p, return_logprob=True, return_routed_experts=True,
                     sampling_params={"max_new_tokens": 6 + 3 * i, "temperature": 1.0, "sampling_seed": 100 + i})
                for i, p in enumerate(PROMPTS)]
    forwards, batches = engine.num_forwards, len(engine.batch_sizes)
    together = engine.generate_batch(requests)
    assert engine.batch_sizes[batches:] == [len(PROMPTS)]  # one batch ...
    assert engine.num_forwards - forwards == 6 + 3 * (len(PROMPTS) - 1)  # ... one forward per step for all
    alone = [engine.generate_batch([r])[0] for r in requests]
    assert engine.batch_sizes[batches + 1:] == [1] * len(PROMPTS)
    for prompt, a, b in zip(PROMPTS, together, alone):
        assert a["output_ids"] == b["output_ids"]
        torch.testing.assert_close(logprobs_of(a), logprobs_of(b), atol=1e-5, rtol=0)
        np.testing.assert_array_equal(decoded_routes(engine, a, len(prompt)), decoded_routes(engine, b, len(prompt)))


def test_answers_arrive_as_each_request_finishes(engine):
    short, long = engine.submit_many([
        dict(input_ids=PROMPTS[0], sampling_params={"max_new_tokens": 2}),
        dict(input_ids=PROMPTS[1], sampling_params={"max_new_tokens": 400, "ignore_eos": True})])
    short.result(timeout=10)
    assert not long.done()
    assert len(long.result(timeout=30)["output_ids"]) == 400


def test_requests_join_a_running_batch(engine):
    def request(i, n):
        return dict(input_ids=PROMPTS[i], return_logprob=True, return_routed_experts=True, rid=f"join{i}",
                    sampling_params={"max_new_tokens": n, "temperature": 1.0, "ignore_eos": True, "sampling_seed": i})

    alone = {i: engine.generate_batch([{**request(i, n), "rid": f"alone{i}"}])[0]
             for i, n in ((1, 150), (3, 20), (0, 20))}
    batches = len(engine.batch_sizes)
    first = engine.submit(**request(1, 150))
    wait_for(lambda: engine.inflight().get("join1", 0) >= 2)
    second = engine.submit(**request(3, 20))  # longer than the running rows: their cache gets left-padded
    wait_for(lambda: engine.inflight().get("join1", 0) >= 40)
    third = engine.submit(**request(0, 20))  # shorter: its own rows get left-padded
    joined = {3: second.result(timeout=30), 0: third.result(timeout=30)}
    assert not first.done()  # both finished inside the running batch
    joined[1] = first.result(timeout=30)
    assert engine.batch_sizes[batches:] == [1, 1, 1]
    for i, answer in joined.items():
        assert answer["output_ids"] == alone[i]["output_ids"]
        torch.testing.assert_close(logprobs_of(answer), logprobs_of(alone[i]), atol=1e-5, rtol=0)
        np.testing.assert_array_equal(decoded_routes(engine, answer, len(PROMPTS[i])),
                                      decoded_routes(engine, alone[i], len(PROMPTS[i])))


# ----------------------------------------------------------------------------- finish reasons
def test_stop_token_length_and_min_new_tokens(engine, hf):
    base = engine.generate(PROMPTS[0], {"max_new_tokens": 8, "temperature": 0.0})["output_ids"]
    stop = base[3]
    answer = engine.generate(PROMPTS[0], {"max_new_tokens": 8, "temperature": 0.0, "stop_token_ids": [stop]})
    assert answer["output_ids"] == base[:base.index(stop) + 1]
    assert answer["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    ignored = engine.generate(PROMPTS[0], {"max_new_tokens": 8, "temperature": 0.0, "stop_token_ids": [stop],
                                           "ignore_eos": True})
    assert ignored["output_ids"] == base and ignored["meta_info"]["finish_reason"]["type"] == "length"
    # min_new_tokens: the stop token cannot be sampled before the minimum; its logit is masked (as SGLang)
    at_least = engine.generate(PROMPTS[0], {"max_new_tokens": 8, "temperature": 0.0, "stop_token_ids": [stop],
                                            "min_new_tokens": base.index(stop) + 2}, return_logprob=True)
    out = at_least["output_ids"]
    assert stop not in out[:base.index(stop) + 2] and len(out) > base.index(stop) + 1
    ref = ref_logprobs(hf, PROMPTS[0], out, 0.0)
    k = base.index(stop)
    assert out[k] == int(torch.topk(ref[k], 2).indices[1])  # the runner-up, since `stop` was the argmax
    zero = engine.generate(PROMPTS[0], {"max_new_tokens": 0})
    assert zero["output_ids"] == [] and zero["meta_info"]["finish_reason"] == {"type": "length", "length": 0}


def test_eos_from_generation_config(dirs, engine, tmp_path):
    base = engine.generate(PROMPTS[2], {"max_new_tokens": 8, "temperature": 0.0})["output_ids"]
    eos = base[2]
    model_dir = tmp_path / "with_eos"
    model_dir.mkdir()
    for name in os.listdir(dirs["qwen3_moe"]):
        os.symlink(os.path.join(dirs["qwen3_moe"], name), model_dir / name)
    os.remove(model_dir / "generation_config.json")
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, 127]}))
    with LocalEngine(str(model_dir), dtype="float32") as eng:
        assert eng.eos_token_ids == {eos, 127}
        answer = eng.generate(PROMPTS[2], {"max_new_tokens": 8, "temperature": 0.0})
        assert answer["output_ids"] == base[:base.index(eos) + 1]
        assert answer["meta_info"]["finish_reason"] == {"type": "stop", "matched": eos}
        ignored = eng.generate(PROMPTS[2], {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True})
        assert ignored["output_ids"] == base


def test_text_input_and_stop_trim(dirs, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model_dir = tmp_path / "with_tokenizer"
    model_dir.mkdir()
    for name in os.listdir(dirs["qwen3_moe"]):
        os.symlink(os.path.join(dirs["qwen3_moe"], name), model_dir / name)
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0").save_pretrained(model_dir)
    with LocalEngine(str(model_dir), dtype="float32") as eng:
        plain = eng.generate(text="w5 w6 w7 w8", sampling_params={"max_new_tokens": 6, "temperature": 0.0})
        assert plain["meta_info"]["prompt_tokens"] == 4
        by_ids = eng.generate([5, 6, 7, 8], {"max_new_tokens": 6, "temperature": 0.0})
        assert plain["output_ids"] == by_ids["output_ids"]
        assert plain["text"] == " ".join(f"w{t}" for t in plain["output_ids"])
        stop = plain["output_ids"][2]
        end = plain["output_ids"].index(stop) + 1
        params = {"max_new_tokens": 6, "temperature": 0.0, "stop_token_ids": [stop]}
        trimmed = eng.generate(text="w5 w6 w7 w8", sampling_params=params)
        assert trimmed["output_ids"] == plain["output_ids"][:end]  # output_ids keep the stop token ...
        assert trimmed["text"] == " ".join(f"w{t}" for t in plain["output_ids"][:end - 1])  # ... the text does not
        kept = eng.generate(text="w5 w6 w7 w8", sampling_params={**params, "no_stop_trim": True})
        assert kept["text"] == " ".join(f"w{t}" for t in plain["output_ids"][:end])


def test_invalid_requests(engine):
    with pytest.raises(ValueError, match="max_tokens"):
        engine.submit(input_ids=[1], sampling_params={"max_tokens": 4})
    with pytest.raises(ValueError, match="repetition_penalty"):  # valid in SGLang, not implemented here
        engine.submit(input_ids=[1], sampling_params={"repetition_penalty": 1.1})
    with pytest.raises(ValueError, match="top_p"):
        engine.submit(input_ids=[1], sampling_params={"top_p": 0.0})
    with pytest.raises(ValueError, match="outside"):
        engine.submit(input_ids=[1, 100000])
    with pytest.raises(ValueError, match="n must be 1"):
        engine.submit(input_ids=[1], sampling_params={"n": 2})
    with pytest.raises(ValueError, match="tokenizer"):
        engine.submit(text="hello")


def test_requests_longer_than_the_context_are_refused_as_sglang_does(engine, monkeypatch):
    """SGLang 0.5.23 (tokenizer_manager.py, no --allow-auto-truncate) answers 400, it does not cap."""
    monkeypatch.setattr(engine, "context_length", 12)
    with pytest.raises(ValueError, match=r"maximum context length of 12 tokens. You requested a total of 14 "
                                         r"tokens: 4 tokens from the input messages and 10 tokens"):
        engine.submit(input_ids=[1, 2, 3, 4], sampling_params={"max_new_tokens": 10})
    with pytest.raises(ValueError, match=r"The input \(12 tokens\) is longer than the model's context length"):
        engine.submit(input_ids=list(range(1, 13)))
    assert len(engine.generate([1, 2, 3, 4], {"max_new_tokens": 8, "ignore_eos": True})["output_ids"]) == 8


# ----------------------------------------------------------------------------- abort / pause / flush
LONG = {"max_new_tokens": 3000, "ignore_eos": True, "sampling_seed": 3}


def test_abort_running_request(engine):
    future = engine.submit(input_ids=PROMPTS[1], sampling_params=LONG, rid="to-abort", return_logprob=True,
                           return_routed_experts=True)
    wait_for(lambda: engine.inflight().get("to-abort", 0) >= 5)
    assert not engine.flush_cache()  # SGLang refuses while requests run
    start = time.monotonic()
    assert engine.abort("to-abort") == 1
    answer = future.result(timeout=1)
    assert time.monotonic() - start < 1
    meta = answer["meta_info"]
    assert meta["finish_reason"]["type"] == "abort" and 5 <= len(answer["output_ids"]) < 3000
    assert len(meta["output_token_logprobs"]) == len(answer["output_ids"])
    decoded_routes(engine, answer, len(PROMPTS[1]))  # P + O - 1 rows even when aborted
    wait_for(engine.flush_cache)


def test_pause_in_place_holds_and_continues(engine):
    uninterrupted = engine.generate(PROMPTS[0], {**LONG, "max_new_tokens": 120}, return_logprob=True)
    future = engine.submit(input_ids=PROMPTS[0], sampling_params={**LONG, "max_new_tokens": 120}, rid="held",
                           return_logprob=True)
    wait_for(lambda: engine.inflight().get("held", 0) >= 3)
    engine.pause("in_place")
    try:
        count = engine.inflight()["held"]
        late = engine.submit(input_ids=PROMPTS[1], sampling_params={"max_new_tokens": 2})
        time.sleep(0.2)
        assert engine.inflight()["held"] == count and not future.done() and not late.done()
        assert not engine.flush_cache()  # the batch is held with its KV cache
        assert engine.num_held_requests() == 2
    finally:
        engine.resume()
    answer = future.result(timeout=30)
    assert answer["output_ids"] == uninterrupted["output_ids"]
    torch.testing.assert_close(logprobs_of(answer), logprobs_of(uninterrupted), atol=1e-5, rtol=0)
    late.result(timeout=10)


def test_pause_retract_recomputes_and_matches(engine):
    params = {**LONG, "max_new_tokens": 120, "temperature": 0.9}
    uninterrupted = engine.generate(PROMPTS[2], params, return_logprob=True, return_routed_experts=True)
    future = engine.submit(input_ids=PROMPTS[2], sampling_params=params, rid="retracted", return_logprob=True,
                           return_routed_experts=True)
    wait_for(lambda: engine.inflight().get("retracted", 0) >= 3)
    batches = len(engine.batch_sizes)
    engine.pause("retract")
    try:
        count = engine.inflight()["retracted"]
        assert 3 <= count < 120 and engine.flush_cache()  # retracted requests hold no KV cache
        time.sleep(0.1)
        assert engine.inflight()["retracted"] == count
    finally:
        engine.resume()
    answer = future.result(timeout=30)
    assert len(engine.batch_sizes) > batches  # it was prefilled again
    assert answer["output_ids"] == uninterrupted["output_ids"]
    torch.testing.assert_close(logprobs_of(answer), logprobs_of(uninterrupted), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(decoded_routes(engine, answer, len(PROMPTS[2])),
                                  decoded_routes(engine, uninterrupted, len(PROMPTS[2])))


def test_pause_abort_mode(engine):
    running = engine.submit(input_ids=PROMPTS[1], sampling_params=LONG)
    wait_for(lambda: any(engine.inflight().values()))
    engine.pause("abort")
    try:
        assert running.result(timeout=1)["meta_info"]["finish_reason"]["type"] == "abort"
        held = engine.submit(input_ids=PROMPTS[1], sampling_params={"max_new_tokens": 2})
        time.sleep(0.1)
        assert not held.done() and engine.flush_cache()
    finally:
        engine.resume()
    assert held.result(timeout=10)["meta_info"]["finish_reason"]["type"] == "length"


# ----------------------------------------------------------------------------- weight updates
def _shuffled_buckets(tensors, n, seed=0):
    tensors = list(tensors)
    random.Random(seed).shuffle(tensors)
    return [tensors[i::n] for i in range(n)]


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_update_from_named_tensors(dirs, family):
    target = _load_hf(dirs[family + "_b"])
    original = _load_hf(dirs[family])
    tensors = checkpoint_tensors(dirs[family + "_b"])
    assert any(".experts.1." in n for n, _ in tensors)  # one tensor per expert, checkpoint names
    with LocalEngine(dirs[family], dtype="float32") as eng:
        prompt = PROMPTS[0]
        before = eng.generate(prompt, {"max_new_tokens": 6, "temperature": 0.0}, return_logprob=True)
        buckets = _shuffled_buckets(tensors, 3)
        for i, bucket in enumerate(buckets):
            eng.update_from_named_tensors(bucket, weight_version="v1" if i == len(buckets) - 1 else None)
        for name, value in target.state_dict().items():
            torch.testing.assert_close(eng.model.state_dict()[name], value, atol=0, rtol=0, msg=name)
        after = eng.generate(prompt, {"max_new_tokens": 6, "temperature": 1.0, "sampling_seed": 1},
                             return_logprob=True)
        assert after["meta_info"]["weight_version"] == "v1"
        ref = ref_logprobs(target, prompt, after["output_ids"], 1.0)
        torch.testing.assert_close(logprobs_of(after), ref.gather(1, torch.tensor(after["output_ids"])[:, None])[:, 0],
                                   atol=1e-4, rtol=0)
        old = ref_logprobs(original, prompt, before["output_ids"], 0.0).max(-1).values
        torch.testing.assert_close(logprobs_of(before), old, atol=1e-4, rtol=0)
        assert not torch.allclose(ref_logprobs(target, prompt, before["output_ids"], 0.0).max(-1).values, old,
                                  atol=1e-3)
        # a bfloat16 tensor is converted into the engine's float32
        name = "model.layers.1.self_attn.o_proj.weight"
        low = (target.state_dict()[name] * 3).to(torch.bfloat16)
        eng.update_from_named_tensors([(name, low)])
        assert eng.model.state_dict()[name].dtype == torch.float32
        torch.testing.assert_close(eng.model.state_dict()[name], low.float(), atol=0, rtol=0)


def test_update_rejects_bad_tensors_and_writes_nothing(dirs, engine):
    good = ("model.layers.1.self_attn.q_proj.weight", torch.zeros(64, 32))
    before = engine.model.state_dict()["model.layers.1.self_attn.q_proj.weight"].clone()
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.experts\.3\.up_proj\.weight.*\(16, 32\)"):
        engine.update_from_named_tensors([good, ("model.layers.2.mlp.experts.3.up_proj.weight", torch.zeros(32, 16))])
    with pytest.raises(ValueError, match="model.layers.1.mlp.experts.9.gate_proj.weight"):
        engine.update_from_named_tensors([good, ("model.layers.1.mlp.experts.9.gate_proj.weight", torch.zeros(16, 32))])
    with pytest.raises(ValueError, match="block_sparse_moe"):  # mixtral naming on a Qwen3-MoE model
        engine.update_from_named_tensors([good, ("model.layers.1.block_sparse_moe.experts.0.w1.weight",
                                                 torch.zeros(16, 32))])
    torch.testing.assert_close(engine.model.state_dict()["model.layers.1.self_attn.q_proj.weight"], before)
    assert engine.weight_version == "default"


def test_update_from_disk_and_version_spans(dirs):
    target = _load_hf(dirs["qwen3_moe_b"])
    with LocalEngine(dirs["qwen3_moe"], dtype="float32") as eng:
        future = eng.submit(input_ids=PROMPTS[1], sampling_params={**LONG, "max_new_tokens": 60}, rid="spans")
        wait_for(lambda: eng.inflight().get("spans", 0) >= 3)
        eng.pause("in_place")
        made = eng.inflight()["spans"]
        result = eng.update_from_disk(dirs["qwen3_moe_b"], weight_version="v2")
        eng.resume()
        assert result["success"] and result["num_paused_requests"] == 1, result
        meta = future.result(timeout=30)["meta_info"]
        assert meta["weight_version"] == "v2"
        assert meta["weight_versions"] == [{"version": "default", "start": 0, "end": made},
                                           {"version": "v2", "start": made, "end": 60}]
        answer = eng.generate(PROMPTS[0], {"max_new_tokens": 5, "temperature": 0.0}, return_logprob=True)
        ref = ref_logprobs(target, PROMPTS[0], answer["output_ids"], 0.0)
        torch.testing.assert_close(logprobs_of(answer), ref.max(-1).values, atol=1e-4, rtol=0)
        assert eng.model_info()["model_path"] == dirs["qwen3_moe_b"]
        bad = eng.update_from_disk(dirs["mixtral"])
        assert not bad["success"] and "does not match" in bad["message"]


def test_distributed_update_over_gloo(dirs):
    target = _load_hf(dirs["qwen3_moe_b"])
    tensors = checkpoint_tensors(dirs["qwen3_moe_b"])
    with LocalServer(dirs["qwen3_moe"], dtype="float32") as srv:
        url, port = srv.url, free_port()
        status, body = http(url, "/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": port,
                                                                 "rank_offset": 1, "world_size": 2, "backend": "nccl"})
        assert status == 400 and "gloo" in body["message"]
        answers = {}
        join = threading.Thread(target=lambda: answers.update(init=http(url, "/init_weights_update_group", {
            "master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
            "group_name": "sync", "backend": "gloo"})))
        join.start()
        group = StandaloneGroup("127.0.0.1", port, 0, 2, backend="gloo", group_name="sync", timeout_s=60)
        join.join(timeout=60)
        assert answers["init"] == (200, {"success": True, "message": answers["init"][1]["message"]})
        buckets = _shuffled_buckets(tensors, 2, seed=1)
        meta = [{"names": [n for n, _ in b], "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in b],
                 "shapes": [list(t.shape) for _, t in b], "group_name": "sync"} for b in buckets]
        # SGLang 0.5.23 refuses outside begin/end_weight_update, before receiving anything
        status, body = http(url, "/update_weights_from_distributed", meta[0])
        assert status == 400 and body["success"] is False and "begin_weight_update" in body["message"]
        assert http(url, "/begin_weight_update", {}) == (200, {"success": True, "message": "Success"})
        for i, (bucket, body) in enumerate(zip(buckets, meta)):
            if i == len(buckets) - 1:
                body["weight_version"] = "step-1"
            post = threading.Thread(target=lambda b=body: answers.update(update=http(
                url, "/update_weights_from_distributed", b)))
            post.start()
            for _, tensor in bucket:
                group.broadcast_(tensor.contiguous(), src=0)
            post.join(timeout=60)
            assert answers["update"][0] == 200 and answers["update"][1]["success"], answers["update"]
        assert http(url, "/end_weight_update", {})[0] == 200
        assert http(url, "/end_weight_update", {})[0] == 400  # no session open any more
        status, answer = http(url, "/generate", {"input_ids": PROMPTS[0], "return_logprob": True,
                                                 "sampling_params": {"max_new_tokens": 5, "temperature": 0.0}})
        assert status == 200 and answer["meta_info"]["weight_version"] == "step-1"
        ref = ref_logprobs(target, PROMPTS[0], answer["output_ids"], 0.0)
        torch.testing.assert_close(logprobs_of(answer), ref.max(-1).values, atol=1e-4, rtol=0)
        assert http(url, "/model_info")[1]["weight_version"] == "step-1"
        assert http(url, "/destroy_weights_update_group", {"group_name": "sync"})[0] == 200


# ----------------------------------------------------------------------------- HTTP
def test_http_generate_single_and_batch(server, engine, schema):
    url = server.url
    single = {"rid": "h0", "input_ids": PROMPTS[0], "return_logprob": True, "return_routed_experts": True,
              "sampling_params": {"max_new_tokens": 3, "temperature": 1.0, "top_p": 1.0, "top_k": -1,
                                  "no_stop_trim": True, "skip_special_tokens": False, "sampling_seed": 5}}
    schema.check("GenerateRequest", single)
    status, answer = http(url, "/generate", single)
    assert status == 200
    schema.check("GenerateResponse", answer)  # SGLang's own response schema
    routing = (engine.num_hidden_layers, engine.num_experts_per_tok, engine.num_experts)
    result = protocol.parse_generate_response(answer, len(PROMPTS[0]), engine.vocab_size, routing)
    assert result.rid == "h0" and len(result.output_ids) == 3 and result.finish.type == "length"
    assert set(answer["meta_info"]) >= {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens",
                                        "weight_version", "e2e_latency"} and "text" not in answer  # no tokenizer
    direct = engine.generate(PROMPTS[0], single["sampling_params"], return_logprob=True)
    assert direct["output_ids"] == result.output_ids
    batch = {"input_ids": PROMPTS[:3], "rid": ["b0", "b1", "b2"], "return_logprob": [True, False, True],
             "sampling_params": [{"max_new_tokens": 2 + i, "temperature": 0.0} for i in range(3)]}
    status, answers = http(url, "/generate", batch)
    assert status == 200 and [a["meta_info"]["id"] for a in answers] == ["b0", "b1", "b2"]
    for a in answers:
        schema.check("GenerateResponse", a)
    assert [len(a["output_ids"]) for a in answers] == [2, 3, 4]
    assert "output_token_logprobs" not in answers[1]["meta_info"]
    assert len(answers[2]["meta_info"]["output_token_logprobs"]) == 4
    status, shared = http(url, "/generate", {**batch, "sampling_params": {"max_new_tokens": 2, "temperature": 0.0}})
    assert status == 200 and [a["output_ids"] for a in shared] == [a["output_ids"][:2] for a in answers]


def test_http_errors_and_control(server, schema):
    url = server.url
    status, body = http(url, "/generate", {"input_ids": [1, 2], "sampling_params": {"max_tokens": 3}})
    assert status == 400 and "max_tokens" in body["error"]["message"]
    status, body = http(url, "/generate", {"input_ids": [1, 2], "stream": True})
    assert status == 400 and "stream" in body["error"]["message"]
    status, body = http(url, "/generate", {"input_ids": [[1, 2], [3]], "rid": ["x"]})
    assert status == 400 and "rid" in body["error"]["message"]
    status, body = http(url, "/pause_generation", {"mode": "sideways"})
    assert status == 400 and "sideways" in body["error"]["message"]
    assert http(url, "/health")[0] == 200 and http(url, "/health_generate")[0] == 200
    info = http(url, "/server_info")[1]
    assert info["version"] == "0.5.23" and info["port"] == server.port
    schema.check("GetServerInfoResponse", info)
    model = http(url, "/get_model_info")[1]
    assert model["is_generation"] is True and model["architectures"] == ["Qwen3MoeForCausalLM"]
    schema.check("GetModelInfoResponse", model)
    assert http(url, "/flush_cache", {})[0] == 200
    assert http(url, "/pause_generation", {"mode": "retract"})[1]["status"] == "ok"
    assert http(url, "/continue_generation", {})[1]["status"] == "ok"
    assert http(url, "/abort_request", {"rid": "", "abort_all": True})[0] == 200


def test_http_stays_responsive_and_batches_concurrent_requests(server, engine):
    url = server.url
    results = {}

    def post(i, params):
        results[i] = http(url, "/generate", {"input_ids": PROMPTS[i % 4], "rid": f"c{i}", "sampling_params": params})

    long = threading.Thread(target=post, args=(9, {"max_new_tokens": 3000, "ignore_eos": True}))
    long.start()
    wait_for(lambda: engine.inflight().get("c9", 0) > 0)
    assert http(url, "/health")[0] == 200 and http(url, "/model_info")[0] == 200
    assert http(url, "/flush_cache", {})[0] == 400  # requests are running
    threads = [threading.Thread(target=post, args=(i, {"max_new_tokens": 4})) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    # all answered while the long request kept decoding: the server was not blocked by the batch, and
    # the short requests joined the running batch instead of waiting for it to finish
    assert "c9" in engine.inflight()
    assert all(results[i][0] == 200 and len(results[i][1]["output_ids"]) == 4 for i in range(4))
    assert http(url, "/abort_request", {"rid": "c9"})[0] == 200
    long.join(timeout=10)
    assert results[9][0] == 200 and results[9][1]["meta_info"]["finish_reason"]["type"] == "abort"


def test_http_client_disconnect_aborts_its_request(server, engine):
    body = json.dumps({"input_ids": [1, 2, 3], "rid": "gone",
                       "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True}}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as conn:
        conn.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_for(lambda: engine.inflight().get("gone", 0) > 0)
    wait_for(lambda: "gone" not in engine.inflight(), timeout=5)


def test_http_api_key(engine):
    with LocalServer(engine=engine, api_key="sekret") as srv:
        assert http(srv.url, "/health")[0] == 200
        status, body = http(srv.url, "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}})
        assert status == 401 and "Authorization" in body["error"]["message"]
        assert http(srv.url, "/model_info", api_key="wrong")[0] == 401
        status, answer = http(srv.url, "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}},
                              api_key="sekret")
        assert status == 200 and len(answer["output_ids"]) == 1

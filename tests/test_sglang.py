"""Real SGLang 0.5.23 servers on the CPU (tests/engines.py): the rollout protocol, routed experts,
pause/continue/flush/abort, the weight-update group and its defects, models SGLang would serve
wrongly, and the local engine answering as the real server does (the same requests to both).

The weight-sync routes against both engines are in test_weight_sync.py, the router and a server
killed mid-batch in test_rollout_cluster.py (both parametrised over the engines); the trainer end
to end against a real server in test_trainer.py."""

import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from megatron_vespo.rollout.client import ControlError, EngineControl, RolloutClient
from megatron_vespo.rollout.protocol import unsupported_model_features
from megatron_vespo.rollout.weight_sync import WeightSync
from tests.engines import start_cluster
from tests.hf_models import make_hf_model

LONG = {"max_new_tokens": 3000, "ignore_eos": True, "sampling_seed": 3}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sglang") / "qwen3_moe"
    make_hf_model("qwen3_moe", str(path), dense_layers=())  # SGLang builds every Qwen3-MoE layer as MoE
    return path


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    """One real SGLang server and one local engine on the same model, both fp32."""
    started = []
    try:
        for engine in ("sglang", "local"):
            started.append(start_cluster(engine, model_dir, tmp_path_factory.mktemp(f"logs-{engine}")))
        yield {"sglang": started[0].server_urls[0], "local": started[1].server_urls[0]}
    finally:
        for cluster in started:
            cluster.stop()


def post(url, path, body, timeout=120):
    """(HTTP status, decoded JSON or text) of a POST."""
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            status, text = answer.status, answer.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def running(url) -> int:
    """Requests running now (SGLang's /v1/loads; the local engine answers it too)."""
    with urllib.request.urlopen(url + "/v1/loads", timeout=10) as answer:
        return sum(entry["num_running_reqs"] for entry in json.loads(answer.read())["loads"])


def wait_running(url, count: int = 1, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while running(url) < count:
        assert time.monotonic() < deadline, f"{url}: no request started running"
        time.sleep(0.05)


def hf_logprobs_and_routes(model_dir, ids):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    routes = {}
    hooks = [module.register_forward_hook(lambda mod, args, out, name=name: routes.__setitem__(name, out[2]))
             for name, module in model.named_modules() if name.endswith("mlp.gate")]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    for hook in hooks:
        hook.remove()
    return logp, routes


@pytest.mark.slow
def test_generate_with_logprobs_and_routed_experts_matches_transformers(servers, model_dir):
    from megatron_vespo.convert.families import load_hf_config, model_config_from_hf

    m = model_config_from_hf(load_hf_config(str(model_dir)))
    client = RolloutClient([servers["sglang"]], vocab_size=m.vocab_size,
                           routing=(m.num_layers, m.moe_router_topk, m.num_experts))
    prompts = [[1 + (7 * i + j) % 120 for j in range(3 + i % 4)] for i in range(4)]
    samples = client.generate_sync(prompts, {"max_new_tokens": 10, "temperature": 0.9, "sampling_seed": 4}, n=2,
                                   return_routed_experts=True)
    assert [s.index for s in samples] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(s.weight_version == "default" and s.finish_reason in ("stop", "length") for s in samples)
    checked = 0
    for sample in samples:
        ids = sample.prompt_ids + sample.response_ids
        logp, routes = hf_logprobs_and_routes(model_dir, ids)
        p = len(sample.prompt_ids)
        # SGLang's log-prob: log_softmax(logits / T) over the vocabulary, before any top-p/top-k
        ref = torch.log_softmax(logp / 0.9, -1)[p - 1:-1].gather(
            1, torch.tensor(sample.response_ids)[:, None])[:, 0]
        assert np.abs(ref.numpy() - sample.engine_logprobs).max() < 1e-3
        rows = len(ids) - 1
        assert sample.routed_experts.shape == (rows, m.num_layers, m.moe_router_topk)
        for layer in range(m.num_layers):
            hf = routes[f"model.layers.{layer}.mlp.gate"][:rows].sort(-1).values.numpy()
            same = np.sort(sample.routed_experts[:, layer], -1) == hf
            checked += same.size
            assert same.mean() > 0.97, layer  # fp32 near-ties in the router may flip a rare slot
    assert checked > 0


@pytest.mark.slow
def test_pause_continue_flush_and_abort_behave_alike(servers):
    """pause(abort) returns running requests as aborted; /flush_cache is refused while a request
    runs and accepted when idle; /abort_request ends one request; /continue_generation resumes."""
    for engine, url in servers.items():
        control = EngineControl([url])
        results = {}
        worker = threading.Thread(target=lambda: results.update(
            answer=post(url, "/generate", {"rid": "long", "input_ids": [1, 2, 3], "sampling_params": LONG,
                                           "return_logprob": True})))
        worker.start()
        wait_running(url)
        status, _ = post(url, "/flush_cache", {})
        assert status == 400, f"{engine}: flush_cache accepted while a request runs"
        control.pause("abort")
        worker.join(60)
        status, answer = results["answer"]
        assert status == 200 and answer["meta_info"]["finish_reason"]["type"] == "abort", (engine, answer)
        assert 0 < len(answer["output_ids"]) < LONG["max_new_tokens"]
        assert len(answer["meta_info"]["output_token_logprobs"]) == len(answer["output_ids"])
        control.flush_cache()
        control.resume()
        worker = threading.Thread(target=lambda: results.update(
            answer=post(url, "/generate", {"rid": "to-abort", "input_ids": [4, 5], "sampling_params": LONG})))
        worker.start()
        wait_running(url)
        status, _ = post(url, "/abort_request", {"rid": "to-abort"})
        worker.join(60)
        assert status == 200 and results["answer"][1]["meta_info"]["finish_reason"]["type"] == "abort", engine
        status, answer = post(url, "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 3}})
        assert status == 200 and len(answer["output_ids"]) == 3, f"{engine} did not resume"


REQUESTS = [  # (what, body): the same to both engines; their answers must agree in kind
    ("greedy with log-probs", {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 6, "temperature": 0.0},
                               "return_logprob": True}),
    ("stop token", {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 6, "temperature": 0.0,
                                                                "stop_token_ids": [0]}, "return_logprob": True}),
    ("prompt log-probs", {"input_ids": [5, 6, 7, 8], "sampling_params": {"max_new_tokens": 2, "temperature": 0.0},
                          "return_logprob": True, "logprob_start_len": 0}),
    ("routed experts", {"input_ids": [9, 10], "sampling_params": {"max_new_tokens": 3, "temperature": 0.0},
                        "return_routed_experts": True}),
    ("unknown sampling key", {"input_ids": [1], "sampling_params": {"max_tokens": 4}}),
    ("past the context", {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 10 ** 7}}),
]


@pytest.mark.slow
@pytest.mark.parametrize("what, body", REQUESTS, ids=[r[0] for r in REQUESTS])
def test_the_local_engine_answers_as_real_sglang(servers, what, body):
    """Status codes, output ids (greedy, fp32), the meta_info fields training reads, finish
    reasons, log-prob entries and the routed-experts layout. Known differences: docs/SGLANG.md."""
    answers = {engine: post(url, "/generate", body) for engine, url in servers.items()}
    (status, real), (local_status, local) = answers["sglang"], answers["local"]
    assert local_status == status, (what, answers)
    if status != 200:
        return
    assert local["output_ids"] == real["output_ids"], what
    assert set(local) == set(real), what  # no "text" without a tokenizer
    meta, local_meta = real["meta_info"], local["meta_info"]
    assert set(local_meta) == set(meta), (what, set(local_meta) ^ set(meta))
    assert local_meta["finish_reason"] == meta["finish_reason"], what
    assert local_meta["weight_versions"] == meta["weight_versions"], what
    for key in ("prompt_tokens", "completion_tokens", "weight_version"):
        assert local_meta[key] == meta[key], (what, key)
    for key in ("output_token_logprobs", "input_token_logprobs"):
        if key in meta and meta[key]:
            got, want = local_meta[key], meta[key]
            assert [e[1] for e in got] == [e[1] for e in want] and len(got) == len(want), (what, key)
            assert [e[2] for e in got] == [e[2] for e in want], (what, key)  # text: null without a tokenizer
            values = [(a[0], b[0]) for a, b in zip(got, want) if b[0] is not None]
            assert all(abs(a - b) < 1e-3 for a, b in values), (what, key)
    if body.get("return_routed_experts"):
        assert local_meta["routed_experts"] == meta["routed_experts"], what  # base64 of the same int32 layout


@pytest.mark.slow
def test_the_weight_update_group_meets_sglangs_rendezvous(servers, model_dir):
    """The trainer's side of /init_weights_update_group (comm.StandaloneGroup) joins the real server's
    and a broadcast arrives; before the fix the two sides used different store keys and hung."""
    from megatron_vespo.comm import StandaloneGroup
    from megatron_vespo.rollout.weight_sync import _free_port
    from safetensors.torch import load_file

    url, port = servers["sglang"], _free_port()
    control = EngineControl([url])
    asked = {}
    worker = threading.Thread(target=lambda: asked.update(answer=control.call("/init_weights_update_group", {
        "master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
        "group_name": "probe", "backend": "gloo"})))
    worker.start()
    group = StandaloneGroup("127.0.0.1", port, 0, 2, backend="gloo", group_name="probe", timeout_s=60)
    worker.join(60)
    assert asked["answer"][0]["success"]
    norm = load_file(str(model_dir / "model.safetensors"))["model.norm.weight"]
    control.begin_weight_update()
    try:
        worker = threading.Thread(target=lambda: asked.update(update=control.call(
            "/update_weights_from_distributed", {"names": ["model.norm.weight"], "dtypes": ["float32"],
                                                 "shapes": [list(norm.shape)], "group_name": "probe"})))
        worker.start()
        group.broadcast_(norm.clone().contiguous())  # the same values: the server's model is unchanged
        worker.join(60)
    finally:
        control.end_weight_update()
        control.call("/destroy_weights_update_group", {"group_name": "probe"})
    assert asked["update"][0]["success"]


@pytest.mark.slow
def test_a_failed_sync_leaves_no_server_paused(servers, model_dir):
    """A sync that fails after pausing (here: /begin_weight_update refused, as a session is already
    open) resumes the server and closes the session: generation works at once and the next sync
    may begin. Before, begin_weight_update ran outside the recovery path."""
    from megatron_vespo.convert.families import load_hf_config, model_config_from_hf

    url = servers["sglang"]
    m = model_config_from_hf(load_hf_config(str(model_dir)))
    status, answer = post(url, "/begin_weight_update", {})
    assert status == 200 and answer["success"]
    sync = WeightSync("distributed", m, control=EngineControl([url]), backend="gloo", dtype=torch.float32)
    with pytest.raises(ControlError, match="already open"):
        sync.sync([], "v-fail")
    status, answer = post(url, "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}},
                          timeout=30)
    assert status == 200 and len(answer["output_ids"]) == 2
    status, answer = post(url, "/begin_weight_update", {})  # no session is left open
    assert status == 200 and answer["success"], answer
    post(url, "/end_weight_update", {})


@pytest.mark.slow
def test_a_data_parallel_server_is_refused_by_name(model_dir, tmp_path):
    """SGLang refuses the weight-update group on a server with --dp-size 2 (an HTTP 500 from an
    assertion); the trainer names the server and the reason before asking, and resumes it."""
    from megatron_vespo.convert.families import load_hf_config, model_config_from_hf

    cluster = start_cluster("sglang", model_dir, tmp_path / "logs", dp_size=2, routed_experts=False)
    try:
        url = cluster.server_urls[0]
        m = model_config_from_hf(load_hf_config(str(model_dir)))
        sync = WeightSync("distributed", m, control=EngineControl([url]), backend="gloo", dtype=torch.float32)
        with pytest.raises(ValueError, match=r"pp_size = dp_size = 1, this one has pp_size 1, dp_size 2"):
            sync.sync([], "v1")
        status, raw = post(url, "/init_weights_update_group", {
            "master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1, "world_size": 2,
            "group_name": "x", "backend": "gloo"}, timeout=30)
        assert status == 500  # what asking anyway gets
        status, answer = post(url, "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}})
        assert status == 200 and len(answer["output_ids"]) == 2
    finally:
        cluster.stop()


@pytest.mark.slow
def test_models_sglang_would_serve_wrongly_are_refused(tmp_path, model_dir):
    """SGLang 0.5.23 builds every Qwen3-MoE layer as MoE: a dense layer would answer NaN."""
    make_hf_model("qwen3_moe", str(tmp_path / "dense0"), dense_layers=(0,))
    config = json.loads((tmp_path / "dense0" / "config.json").read_text())
    problems = unsupported_model_features(config, "0.5.23")
    assert problems and "dense layers [0]" in problems[0]
    assert unsupported_model_features(json.loads((model_dir / "config.json").read_text()), "0.5.23") == []
    from tests.conftest import run_cli

    proc = run_cli("sglang", "launch", "--model", str(tmp_path / "dense0"), "--gpus-per-node", "1", "--dry-run")
    assert proc.returncode == 2 and "SGLang cannot serve this model correctly" in proc.stderr
    assert "dense layers [0]" in proc.stderr
    local = run_cli("sglang", "launch", "--model", str(tmp_path / "dense0"), "--engine", "local", "--dry-run")
    assert local.returncode == 0, local.stderr  # the local engine builds it right


def _train_args(model_dir, run_dir, url, *extra):
    from tests.conftest import ROOT

    return ["train", "--config", str(ROOT / "examples" / "configs" / "demo_cpu.yaml"), f"model.hf_dir={model_dir}",
            f"run.run_dir={run_dir}", "rollout.engine=sglang", f"rollout.server_urls={url}",
            "rollout.weight_sync=distributed", "rollout.weight_sync_backend=gloo", "rollout.prompts_per_batch=4",
            "rollout.group_size=4", "rollout.max_new_tokens=8", "algorithm.staleness=1",
            "algorithm.micro_batch_size=4", "run.steps=2", "run.tensorboard=false", "run.plot=false", *extra]


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """Real SGLang serving the demo's warm-started model (its rewards are not all 0, so it learns)."""
    from megatron_vespo.train.demo import build_model

    directory = build_model(str(tmp_path_factory.mktemp("demo") / "model"), "reverse", log=lambda message: None,
                            digits=(2, 3))
    cluster = start_cluster("sglang", directory, tmp_path_factory.mktemp("logs-demo"))
    try:
        yield directory, cluster.server_urls[0]
    finally:
        cluster.stop()


@pytest.mark.slow
def test_the_trainer_end_to_end_against_real_sglang(demo_server, tmp_path):
    """Rollouts from the real server, two distributed weight syncs over gloo (v1, v2); afterwards
    the server's log-probs are the trained policy's (exported from the final checkpoint)."""
    from tests.conftest import run_cli

    model_dir, url = demo_server
    run_dir = tmp_path / "run"
    proc = run_cli(*_train_args(model_dir, run_dir, url, "data.synthetic_max_digits=3"), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["policy_loss"]) for r in rows)
    assert EngineControl([url]).weight_versions() == ["v2"]
    exported = tmp_path / "policy"
    proc = run_cli("convert", "mcore-to-hf", "--ckpt", str(run_dir / "checkpoints" / "step-2"), "--out", str(exported))
    assert proc.returncode == 0, proc.stderr[-2000:]
    prompt = [1, 5, 6, 7, 3]
    status, answer = post(url, "/generate", {"input_ids": prompt, "return_logprob": True,
                                             "sampling_params": {"max_new_tokens": 6, "sampling_seed": 2}})
    assert status == 200 and answer["meta_info"]["weight_version"] == "v2"
    ids = prompt + answer["output_ids"]
    assert any(r["grad_norm"] > 0 for r in rows)
    for directory, close in ((exported, True), (model_dir, False)):  # the trained policy, not the start
        logp, _ = hf_logprobs_and_routes(directory, ids)
        ref = logp[len(prompt) - 1:-1].gather(1, torch.tensor(answer["output_ids"])[:, None])[:, 0]
        got = torch.tensor([entry[0] for entry in answer["meta_info"]["output_token_logprobs"]])
        assert ((ref - got).abs().max() < 1e-4) == close, directory


@pytest.mark.slow
def test_the_trainer_refuses_a_model_the_server_would_serve_wrongly(servers, tmp_path):
    from tests.conftest import run_cli

    make_hf_model("qwen3_moe", str(tmp_path / "dense0"), dense_layers=(0,))
    proc = run_cli(*_train_args(tmp_path / "dense0", tmp_path / "run", servers["sglang"]), timeout=600)
    assert proc.returncode != 0
    assert f"{servers['sglang']} (SGLang 0.5.23) cannot serve" in proc.stderr and "dense layers [0]" in proc.stderr


def test_the_stand_in_kernel_writes_each_requests_slots():
    """tests/sglang_cpu/sgl_kernel.assign_req_to_token_pool_cpu, against what SGLang's own triton
    kernel (srt/mem_cache/allocation.py: assign_req_to_token_pool) does: request i copies the next
    end[i] - start[i] entries of out_cache_loc (requests in order) to row req_pool_indices[i],
    positions start[i]:end[i]; nothing else changes."""
    import importlib.util

    from tests.engines import SGLANG_CPU

    spec = importlib.util.spec_from_file_location("stand_in", SGLANG_CPU / "sgl_kernel" / "__init__.py")
    stand_in = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stand_in)
    req_to_token = torch.full((4, 10), -1, dtype=torch.int32)
    out_cache_loc = torch.arange(100, 109, dtype=torch.int64)
    stand_in.assign_req_to_token_pool_cpu(torch.tensor([2, 0, 3]), req_to_token, torch.tensor([3, 0, 5]),
                                          torch.tensor([5, 4, 8]), out_cache_loc, 10)
    expected = torch.full((4, 10), -1, dtype=torch.int32)
    expected[2, 3:5] = torch.tensor([100, 101])
    expected[0, 0:4] = torch.tensor([102, 103, 104, 105])
    expected[3, 5:8] = torch.tensor([106, 107, 108])
    assert torch.equal(req_to_token, expected)
    with pytest.raises(NotImplementedError, match="copy_all_layer_kv_cache_cpu is not part of the CPU test"):
        stand_in.copy_all_layer_kv_cache_cpu()


@pytest.mark.slow
def test_the_mismatch_command_against_real_sglang(demo_server, tmp_path):
    from tests.conftest import run_cli

    model_dir, url = demo_server
    # The module's trainer test may have synced trained weights into this server: serve the start again.
    status, answer = post(url, "/update_weights_from_disk", {"model_path": str(model_dir), "weight_version": "v0"})
    assert status == 200 and answer["success"], answer
    proc = run_cli("mismatch", "--engine", url, "--model", model_dir, "--prompts", "synthetic:reverse", "--n", "4",
                   "--num-prompts", "8", "--max-new-tokens", "6", "--r3", "--out", str(tmp_path / "out"), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["samples"] == 32
    for name in ("no_replay", "r3"):  # an fp32 server and an fp32 trainer: the same model, tiny differences
        assert report["passes"][name]["token"]["abs_delta"]["max"] < 1e-3, name

"""Weight sync Megatron-Core -> engine by every route that runs on CPU, from sharded trainers, to
the local engine and to a real SGLang 0.5.23 server (tests/engines.py).

An engine serves model A; trainers load model B (another random init) under several layouts and
send it, then A again, and so on. After each sync the engine's log-probs must equal transformers'
forward of the model just sent (and differ from the other one's: the negative control) and every
sample must carry the new weight version. NCCL (the cluster backend of the distributed route) and
CUDA IPC (the tensor route) cannot run here; the same code runs with gloo, and the tensor route's
payload format is checked."""

import base64
import json
import pickle

import pytest
import torch

from megatron_vespo.rollout.client import ControlError, EngineControl, RolloutClient
from megatron_vespo.rollout.weight_sync import WeightSync, serialize_named_tensors, tensor_route_bodies
from tests.conftest import torchrun
from tests.engines import ENGINES, start_cluster
from tests.hf_models import make_hf_model

TOLERANCE = 1e-4  # |engine - transformers| log-prob, fp32 on both sides


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("wsync")
    # every layer MoE: SGLang 0.5.23 builds every Qwen3-MoE layer as MoE
    make_hf_model("qwen3_moe", str(root / "a"), seed=0, dense_layers=())
    make_hf_model("qwen3_moe", str(root / "b"), seed=7, dense_layers=())
    return root


@pytest.fixture(scope="module", params=ENGINES)
def engine(models, request, tmp_path_factory):
    """A server of model A: the local engine, or real SGLang (both fp32)."""
    cluster = start_cluster(request.param, models / "a", tmp_path_factory.mktemp(f"logs-{request.param}"),
                            routed_experts=False)
    try:
        yield cluster.server_urls[0]
    finally:
        cluster.stop()


def engine_vs_hf(url, hf_dir):
    """(largest |engine - transformers| log-prob difference on a sampled continuation, its version)."""
    import transformers as tf

    sample = RolloutClient([url], vocab_size=128).generate_sync(
        [[1, 2, 3, 9]], {"max_new_tokens": 6, "sampling_seed": 3})[0]
    model = tf.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([sample.prompt_ids + sample.response_ids])).logits[0], -1)
    ref = logp[len(sample.prompt_ids) - 1:-1].gather(1, torch.tensor(sample.response_ids)[:, None])[:, 0]
    return (ref - torch.from_numpy(sample.engine_logprobs)).abs().max().item(), sample.weight_version


def _sync(models, engine, route, layout, nproc, source, version, *extra):
    proc = torchrun("weight_sync.py", nproc, "--hf", str(models / source), "--layout", layout, "--route", route,
                    "--servers", engine, "--version", version, *extra)
    line = next(l for l in proc.stdout.splitlines() if l.startswith("SYNC"))
    return json.loads(line.split(" ", 1)[1])


# (route, layout, processes): the distributed route from every trainer layout, then the disk route
SYNCS = [("distributed", "single", 1), ("distributed", "tp2", 2), ("distributed", "pp2", 2),
         ("distributed", "ep2", 2), ("disk", "ep2", 2)]


@pytest.mark.slow
def test_every_route_from_every_layout(models, engine):
    error_a, _ = engine_vs_hf(engine, models / "a")
    assert error_a < TOLERANCE
    sent = "a"
    for step, (route, layout, nproc) in enumerate(SYNCS, start=1):
        sent = "b" if sent == "a" else "a"
        other = "a" if sent == "b" else "b"
        extra = ["--disk-dir", str(models / "disk")] if route == "disk" else []
        report = _sync(models, engine, route, layout, nproc, sent, f"v{step}", *extra)
        if route == "distributed":
            assert report["buckets"] > 1 and report["bytes"] > 0  # 64 KiB buckets: several broadcasts
        error, version = engine_vs_hf(engine, models / sent)
        negative, _ = engine_vs_hf(engine, models / other)
        where = f"{route} from {layout}"
        assert error < TOLERANCE and version == f"v{step}", (where, error, version)
        assert negative > 0.1, f"{where}: the engine still matches the model it had before"
    assert EngineControl([engine]).weight_versions() == [f"v{len(SYNCS)}"]
    # the engine is not left paused: a fresh generation runs (engine_vs_hf just did)


@pytest.mark.slow
def test_inprocess_route_from_ep2(models):
    proc = torchrun("weight_sync.py", 2, "--hf", str(models / "b"), "--layout", "ep2", "--route", "inprocess",
                    "--engine-model", str(models / "a"), "--version", "v7")
    check = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("CHECK")).split(" ", 1)[1])
    assert check["before"] > 0.1 and check["after"] < 1e-4 and check["version"] == "v7"


@pytest.mark.slow
def test_distributed_updates_are_refused_outside_an_update_session(engine):
    # SGLang 0.5.23 semantics, which the sync honours by wrapping in begin/end_weight_update
    control = EngineControl([engine])
    with pytest.raises(ControlError, match="begin_weight_update"):
        control.call("/update_weights_from_distributed",
                     {"names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[32]],
                      "group_name": "none"})


def test_tensor_route_payload_is_sglangs_serializer_format():
    tensors = [("model.norm.weight", torch.arange(4.0)), ("lm_head.weight", torch.ones(2, 3))]
    payload = serialize_named_tensors(tensors)
    # SGLang's MultiprocessingSerializer.deserialize: base64 -> ForkingPickler bytes -> pickle.loads
    restored = pickle.loads(base64.b64decode(payload))
    assert [n for n, _ in restored] == [n for n, _ in tensors]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(restored, tensors))


def test_tensor_route_sends_each_server_one_serialisation_per_tp_rank():
    """SGLang's TP rank r deserialises entry r (tp_worker.py: deserialize_own_rank): a TP-2 server
    given one entry failed with IndexError on rank 1; and each rank needs its own serialisation
    (torch counts CUDA-IPC handles per serialisation, producer side)."""
    tensors = [("model.norm.weight", torch.arange(4.0))]
    calls = []
    import megatron_vespo.rollout.weight_sync as ws

    original = ws.serialize_named_tensors
    ws.serialize_named_tensors = lambda bucket: calls.append(bucket) or original(bucket)
    try:
        bodies = tensor_route_bodies(tensors, [1, 2, 4], "v3")
    finally:
        ws.serialize_named_tensors = original
    assert [len(b["serialized_named_tensors"]) for b in bodies] == [1, 2, 4] and len(calls) == 7
    for body in bodies:
        assert body["weight_version"] == "v3" and body["flush_cache"] is True
        for entry in body["serialized_named_tensors"]:
            restored = pickle.loads(base64.b64decode(entry))
            assert restored[0][0] == "model.norm.weight" and torch.equal(restored[0][1], tensors[0][1])
    assert all("weight_version" not in b and b["flush_cache"] is False for b in tensor_route_bodies(tensors, [2], None))


def test_tensor_route_names_the_gpu_by_uuid(monkeypatch):
    """SGLang's own senders rewrite the CUDA rebuild's device index to the GPU's UUID (a server
    with other CUDA_VISIBLE_DEVICES numbers GPUs differently); ours does the same. A CPU cannot
    make a CUDA-IPC handle: torch's reduction is stood in for, with the argument layout of
    torch/multiprocessing/reductions.py (device index at argument 6)."""
    import types

    from torch.multiprocessing import reductions

    import megatron_vespo.rollout.weight_sync as ws

    args = ("Tensor", (2,), (1,), 0, "Storage", torch.float32, 3, b"handle", 8, 0, b"ref", 0, b"event", False)
    monkeypatch.setattr(reductions, "reduce_tensor", lambda tensor: (reductions.rebuild_cuda_tensor, args))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(uuid=f"GPU-{index}-uuid"))
    cuda_tensor = types.SimpleNamespace(is_cuda=True, device=types.SimpleNamespace(index=3))
    rebuild, out = ws._reduce_cuda_tensor_by_uuid(cuda_tensor)
    assert rebuild is reductions.rebuild_cuda_tensor
    assert out[6] == "GPU-3-uuid" and out[:6] == args[:6] and out[7:] == args[7:]
    cuda_tensor.device.index = 1  # the layout no longer matches: refuse rather than send a wrong device
    with pytest.raises(RuntimeError, match="reduction changed shape"):
        ws._reduce_cuda_tensor_by_uuid(cuda_tensor)


def test_bad_routes_and_missing_settings_are_named():
    with pytest.raises(ValueError, match="route must be one of"):
        WeightSync("nccl", None, control=EngineControl(["http://x"]))
    with pytest.raises(ValueError, match="disk route needs disk_dir"):
        WeightSync("disk", None, control=EngineControl(["http://x"]))
    with pytest.raises(ValueError, match="needs EngineControl"):
        WeightSync("distributed", None)

"""`megatron-vespo convert` and `megatron-vespo score` end to end (torchrun started by the CLI)."""

import json

import pytest
import torch

from megatron_vespo.mcore.weights import SafetensorsSource
from tests.conftest import run_cli
from tests.hf_models import make_hf_model

pytestmark = pytest.mark.slow  # every test here starts processes (conftest: the fast tier)


@pytest.fixture(scope="module")
def qwen2_moe(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf") / "qwen2_moe"
    make_hf_model("qwen2_moe", str(directory))
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return directory


def test_hf_to_mcore_to_hf_round_trip_across_layouts(qwen2_moe, tmp_path):
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    proc = run_cli("convert", "hf-to-mcore", "--hf", str(qwen2_moe), "--out", str(ckpt), "--tp", "2", "--ep", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "load: 100%" in proc.stderr  # progress bar
    proc = run_cli("convert", "mcore-to-hf", "--ckpt", str(ckpt), "--out", str(back), "--pp", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    original, exported = SafetensorsSource(str(qwen2_moe)), SafetensorsSource(str(back))
    assert set(original.weight_map) == set(exported.weight_map)
    for name in original.weight_map:
        assert torch.equal(original.read(name), exported.read(name)), name
    assert json.loads((back / "config.json").read_text()) == json.loads((qwen2_moe / "config.json").read_text())
    assert (back / "tokenizer_config.json").exists() and (back / "generation_config.json").exists()


def _scores(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line)["logprobs"] for line in proc.stdout.splitlines()]


def test_score_mcore_matches_hf(qwen2_moe, tmp_path):
    inputs = tmp_path / "in.jsonl"
    rows = [[1, 5, 9, 3, 7, 11, 2], [4, 2, 8], [0, 127]]
    inputs.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    hf = _scores(run_cli("score", "--model", str(qwen2_moe), "--backend", "hf", "--input", str(inputs)))
    mc = _scores(run_cli("score", "--model", str(qwen2_moe), "--backend", "mcore", "--input", str(inputs),
                         "--tp", "2", "--ep", "2"))
    assert [len(r) for r in hf] == [len(r) - 1 for r in rows] == [len(r) for r in mc]
    for a, b in zip(hf, mc):
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=1e-5)
        assert all(v < 0 for v in a)


@pytest.mark.parametrize("content,message", [
    ('{"input_ids": [1, 500]}\n', "in.jsonl:1: token ids [500] outside the vocabulary [0, 128)"),
    ('{"input_ids": [1, 2]}\nnot json\n', "in.jsonl:2: expected a JSON object"),
    ('{"input_ids": [3]}\n', "in.jsonl:1: input_ids must be a list of at least 2 integers"),
])
def test_score_rejects_bad_input_by_line(qwen2_moe, tmp_path, content, message):
    (tmp_path / "in.jsonl").write_text(content)
    proc = run_cli("score", "--model", str(qwen2_moe), "--backend", "hf", "--input", str(tmp_path / "in.jsonl"))
    assert proc.returncode == 2 and message in proc.stderr


def test_convert_errors_fail_before_starting_processes(qwen2_moe, tmp_path):
    proc = run_cli("convert", "hf-to-mcore", "--hf", str(qwen2_moe), "--out", str(tmp_path / "x"), "--tp", "4")
    assert proc.returncode == 2 and "num_query_groups = 2 is not divisible by tp = 4" in proc.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    proc = run_cli("convert", "hf-to-mcore", "--hf", str(qwen2_moe), "--out", str(tmp_path / "full"))
    assert proc.returncode == 2 and "is not empty" in proc.stderr
    cfg = tmp_path / "arch"
    cfg.mkdir()
    (cfg / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    proc = run_cli("convert", "hf-to-mcore", "--hf", str(cfg), "--out", str(tmp_path / "y"))
    assert proc.returncode == 2 and "unsupported architecture: model_type 'gpt2'" in proc.stderr
    proc = run_cli("convert", "mcore-to-hf", "--ckpt", str(tmp_path), "--out", str(tmp_path / "z"))
    assert proc.returncode == 2 and "megatron_vespo.json missing" in proc.stderr and "trainer checkpoint" in proc.stderr

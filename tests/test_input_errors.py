"""Bad input is refused where it enters, with an error that names it (issue 17, items 6 and 7).

* Config values: every numeric key has a range (``config.BOUNDS``, ``losses.BOUNDS``); a value
  just outside it, NaN or an infinity is an error naming the key, and every numeric field must
  have a range (a new one without fails here). Rules between keys (top_k 0, digits, min_lr, task
  and reward, URLs) likewise; the configs that were valid stay valid.
* Files: configs, prompt files (.jsonl, .parquet), token-id files, score inputs, a model's
  config.json, tokenizer files, safetensors indexes and files, checkpoint metadata, and
  tools/prepare_data.py's inputs. Missing, a directory, not UTF-8, not parseable, the wrong shape:
  each an error naming the file (and line), through the CLI one line and exit status 2.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import math
import os
import re
import sys
import typing

import numpy as np
import pytest

from megatron_vespo import losses, ranges
from megatron_vespo.input_files import InputFileError
from megatron_vespo.train import config as config_module
from megatron_vespo.train.config import BOUNDS, TrainConfig, load_config
from tests.conftest import ROOT, run_cli

DEMO = os.path.join(ROOT, "examples", "configs", "demo_cpu.yaml")
NOT_UTF8 = b'{"prompt": "caf\xe9", "answer": "1"}\n'  # Latin-1 bytes, as an editor on Windows writes them

# the smallest config.json model_config_from_hf accepts, and a variant with one key changed
DENSE_CONFIG = {"model_type": "qwen3", "vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 64,
                "rms_norm_eps": 1e-6, "rope_theta": 10000.0}


def _cfg(*overrides: str) -> TrainConfig:
    return load_config(DEMO, list(overrides))


# -- config values: ranges ------------------------------------------------------------------------


def _outside(interval: str, is_int: bool) -> list:
    """Values just outside ``interval`` at each finite end (an int field gets ints)."""
    low, low_in, high, high_in = ranges.parse(interval)
    step = 1 if is_int else 1e-3
    out = []
    if math.isfinite(low):
        out.append(low - step if low_in else low)
    if math.isfinite(high):
        out.append(high + step if high_in else high)
    return [int(v) if is_int else float(v) for v in out]


def _numeric_fields(cls, prefix: str = "") -> dict[str, type]:
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            if hint is not losses.LossConfig:  # LossConfig has its own BOUNDS
                out.update(_numeric_fields(hint, f"{prefix}{f.name}."))
        elif hint in (int, float):
            out[prefix + f.name] = hint
    return out


def test_every_numeric_key_has_a_range():
    # a numeric field added without a range would accept negative counts and zero sizes again
    numeric = _numeric_fields(TrainConfig)
    exempt = {"data.seed"}  # any integer
    assert sorted(set(numeric) - set(BOUNDS) - exempt) == []
    assert sorted(set(BOUNDS) - set(numeric)) == []
    loss_numeric = _numeric_fields(losses.LossConfig)
    assert sorted(set(loss_numeric) - set(losses.BOUNDS)) == []  # dual_clip_c is float | None, its own rule
    for interval in list(BOUNDS.values()) + list(losses.BOUNDS.values()):
        ranges.parse(interval)
    _cfg().validate()  # positive control: the demo's values all lie inside


@pytest.mark.parametrize("key", sorted(BOUNDS))
def test_a_value_outside_a_keys_range_is_refused_naming_it(key):
    is_int = _numeric_fields(TrainConfig)[key] is int
    bad = _outside(BOUNDS[key], is_int) + ([] if is_int else [float("nan"), float("inf")])
    assert bad, key
    for value in bad:
        cfg = _cfg()
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
        with pytest.raises(ValueError, match=rf"^{key}\b"):
            cfg.validate()


@pytest.mark.parametrize("key", sorted(losses.BOUNDS))
def test_a_loss_value_outside_its_range_is_refused_naming_it(key):
    for value in _outside(losses.BOUNDS[key], False) + [float("nan")]:
        with pytest.raises(ValueError, match=rf"^{key} must be"):
            losses.LossConfig(**{key: value}).validate()
    # the trainer sets these from rollout.temperature and the algorithm keys of the same names
    if key not in ("temperature", "kl_coef", "entropy_coef"):
        with pytest.raises(ValueError, match=rf"^algorithm.loss: {key} must be"):
            _cfg(f"algorithm.loss.{key}=-1").validate()


def test_the_issue_examples_save_every_and_group_size():
    with pytest.raises(ValueError, match=r"^run.save_every must be >= 0, got -2$"):
        _cfg("run.save_every=-2").validate()  # was accepted and acted as 2
    with pytest.raises(ValueError, match="rollout.group_size = 1: group advantages need at least 2"):
        _cfg("rollout.group_size=1").validate()
    # what was valid stays valid, and the older rule still holds
    assert _cfg("run.save_every=8", "algorithm.staleness=4").validate().run.save_every == 8
    with pytest.raises(ValueError, match="run.save_every = 6 must be a multiple of algorithm.staleness = 4"):
        _cfg("run.save_every=6", "algorithm.staleness=4").validate()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's, on the 0 / 0 shown here
def test_why_one_sample_per_group_and_eps_zero_are_refused():
    from megatron_vespo.train.trainer import group_advantages

    rewards = np.array([1.0, 0.0, 0.5])
    assert np.isnan(group_advantages(rewards, 1, "grpo", 1e-6)).all()  # std with n - 1 = 0
    assert (group_advantages(rewards, 1, "grpo", 1e-6, std="population") == 0).all()
    assert (group_advantages(rewards, 1, "grpo_mean", 1e-6) == 0).all()
    assert np.isnan(group_advantages(np.array([1.0, 1.0]), 2, "grpo", 0.0)).all()  # equal rewards: 0 / 0
    with pytest.raises(ValueError, match="algorithm.advantage_eps must be > 0, got 0.0"):
        _cfg("algorithm.advantage_eps=0").validate()


@pytest.mark.parametrize("overrides, message", [
    (["rollout.top_k=0"], "rollout.top_k = 0: every /generate would be refused"),
    (["data.synthetic_min_digits=5", "data.synthetic_max_digits=3"], "data.synthetic_min_digits = 5 is more than"),
    (["optimizer.min_lr=1e-3", "optimizer.lr=1e-4"], "optimizer.min_lr = 0.001 is above optimizer.lr"),
    (["data.reward=math"], "data.task = synthetic needs data.reward = synthetic"),
    (["data.task=file", "data.prompts_file=p.jsonl", "data.reward=synthetic"],
     "data.task = file needs data.reward = math"),
    (["data.synthetic_task=rotate"], "data.synthetic_task = 'rotate'; choose one of"),
    (["rollout.engine=sglang", "rollout.server_urls=host:30000"], "take http:// or https:// URLs, got ['host:30000']"),
    (["rollout.router_url=localhost:1"], "got ['localhost:1']"),
    (["algorithm.max_policy_lag=0"], "algorithm.max_policy_lag must be >= 1"),  # checked in sync mode too
    (["algorithm.loss.dual_clip_c=nan"], "algorithm.loss: dual_clip_c must be > 1"),
    (["run.run_dir="], "run.run_dir is required"),
])
def test_rules_between_keys(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        _cfg(*overrides).validate()


def test_the_example_configs_still_validate():
    urls = ["rollout.server_urls=http://h1:30000,http://h2:30000", "rollout.router_url=http://r:30000"]
    files = sorted(glob.glob(os.path.join(ROOT, "examples", "configs", "*.yaml")))
    assert len(files) > 1
    for path in files:
        load_config(path, urls).validate()
    _cfg("algorithm.loss.dual_clip_c=null", "rollout.top_k=20", "optimizer.min_lr=5e-4").validate()


# -- config files and overrides -------------------------------------------------------------------


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(InputFileError, match=r"config file .*nope\.yaml does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(InputFileError, match=rf"config file {re.escape(str(tmp_path))} is a directory"):
        load_config(str(tmp_path))
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"run:\n  run_dir: caf\xe9\n")
    with pytest.raises(InputFileError, match=r"latin\.yaml is not UTF-8 text: byte 0xe9 on line 2"):
        load_config(str(latin))
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  tp: 1\n  pp: [2\nrun:\n  steps: 3\n")
    with pytest.raises(InputFileError, match=r"broken\.yaml is not valid YAML: .* at line \d+ column \d+"):
        load_config(str(broken))
    listing = tmp_path / "list.yaml"
    listing.write_text("- model\n- run\n")
    with pytest.raises(InputFileError, match=r"list\.yaml must be a YAML mapping of sections, got list"):
        load_config(str(listing))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("model: 3\n")
    with pytest.raises(ValueError, match="section model must be a mapping of keys, got 3"):
        load_config(str(scalar))
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\nmodel:\n")  # an empty file or section keeps the defaults
    cfg = load_config(str(empty), ["model.tp=2"])
    assert cfg.model.tp == 2 and cfg.run == TrainConfig().run


def test_an_override_that_is_not_yaml_names_itself():
    with pytest.raises(ValueError, match=r"override 'rollout.server_urls=\[http://a:1': the value is not valid YAML"):
        load_config(None, ["rollout.server_urls=[http://a:1"])


# -- prompt files ---------------------------------------------------------------------------------


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["a b c 1 2"], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_prompt_file_errors_name_the_file(tmp_path):
    from megatron_vespo.train.data import PromptFile, PromptFileError, read_token_prompts

    tok = _tokenizer()
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "a", "answer": "1"}\n' + NOT_UTF8)
    for read in (lambda p: PromptFile(p, tokenizer=tok), read_token_prompts):
        with pytest.raises(PromptFileError, match=r"latin\.jsonl is not UTF-8 text: byte 0xe9 on line 2"):
            read(str(latin))
    folder = tmp_path / "prompts.jsonl"
    folder.mkdir()
    for read in (lambda p: PromptFile(p, tokenizer=tok), read_token_prompts):
        with pytest.raises(PromptFileError, match=r"prompts\.jsonl is a directory, not a file"):
            read(str(folder))
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(PromptFileError, match=r"garbage\.parquet: cannot read as parquet"):
        read_token_prompts(str(garbage))  # the schema read (_has_column) raised pyarrow's error before
    # a valid footer over corrupt data pages: read_table fails, not read_schema
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    corrupt = tmp_path / "corrupt.parquet"
    pq.write_table(pa.table({"input_ids": [rng.integers(0, 1000, 20).tolist() for _ in range(500)]}), corrupt,
                   compression="snappy")
    data = bytearray(corrupt.read_bytes())
    data[8:2000] = bytes(b ^ 0xFF for b in data[8:2000])
    corrupt.write_bytes(bytes(data))
    with pytest.raises(PromptFileError, match=r"corrupt\.parquet: cannot read as parquet"):
        read_token_prompts(str(corrupt))
    text = tmp_path / "prompts.txt"
    text.write_text('{"input_ids": [1, 2]}\n')  # was read as JSON lines by the token-id reader
    with pytest.raises(PromptFileError, match=r"prompts\.txt: unsupported extension '\.txt'"):
        read_token_prompts(str(text))
    # positive control: the same rows, UTF-8, are read
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "a b", "answer": "1"}\n')
    assert len(PromptFile(str(good), tokenizer=tok)) == 1


def test_a_broken_tokenizer_file_is_named(tmp_path):
    from megatron_vespo.input_files import load_tokenizer

    _tokenizer().save_pretrained(tmp_path)
    assert load_tokenizer(str(tmp_path)) is not None  # positive control
    (tmp_path / "tokenizer.json").write_text('{"version": ')
    with pytest.raises(InputFileError, match=r"tokenizer file .*tokenizer\.json is not valid JSON: .* line 1"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer_config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(InputFileError, match=r"tokenizer_config\.json is not UTF-8 text"):
        load_tokenizer(str(tmp_path))


# -- a model's config.json, safetensors, checkpoints ------------------------------------------------


def test_a_broken_model_config_json_is_named(tmp_path):
    from megatron_vespo.convert.families import load_hf_config, load_model_config

    model = tmp_path / "model"
    model.mkdir()
    config = model / "config.json"
    config.write_text(json.dumps(DENSE_CONFIG))
    assert load_model_config(str(model))[1].vocab_size == 128  # positive control
    config.write_text('{"model_type": "qwen3",\n "vocab_size": 128,,\n}')
    with pytest.raises(InputFileError, match=rf"model config {re.escape(str(config))} is not valid JSON: .* line 2 "):
        load_hf_config(str(model))
    config.write_bytes(b'{"model_type": "q\xe9"}')
    with pytest.raises(InputFileError, match=r"config\.json is not UTF-8 text"):
        load_hf_config(str(model))
    config.write_text("[1, 2]")
    with pytest.raises(InputFileError, match=r"config\.json must hold a JSON object, got list"):
        load_hf_config(str(model))
    config.write_text("")
    with pytest.raises(InputFileError, match=r"config\.json is empty"):
        load_hf_config(str(model))
    config.unlink()
    config.mkdir()
    with pytest.raises(InputFileError, match=r"config\.json is a directory"):
        load_hf_config(str(model))


@pytest.mark.parametrize("change, message", [
    ({"num_attention_heads": 0}, "num_attention_heads must be an integer >= 1, got 0"),  # was ZeroDivisionError
    ({"num_attention_heads": "32"}, "num_attention_heads must be an integer >= 1, got '32'"),
    ({"hidden_size": [32]}, "hidden_size must be an integer >= 1, got [32]"),  # was a TypeError traceback
    ({"num_key_value_heads": -2}, "num_key_value_heads must be an integer >= 1, got -2"),
    ({"rms_norm_eps": "small"}, "rms_norm_eps must be a finite number > 0"),
    ({"rope_theta": -1}, "rope_theta must be a finite number > 0"),
    ({"rope_parameters": "default"}, "rope_parameters must be an object"),  # was an AttributeError
    ({"model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
      "mlp_only_layers": ["0"]}, "mlp_only_layers must be a list of layer ids"),
])
def test_model_config_values_are_checked_and_named(tmp_path, change, message):
    from megatron_vespo.convert.families import load_model_config, model_config_from_hf

    config = tmp_path / "config.json"
    config.write_text(json.dumps({**DENSE_CONFIG, **change}))
    escaped = message.replace("[", r"\[").replace("(", r"\(")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(config))}: .*{escaped}"):
        load_model_config(str(tmp_path))
    with pytest.raises(ValueError, match=escaped):  # without a path: the message alone
        model_config_from_hf({**DENSE_CONFIG, **change})


def test_safetensors_index_and_files_are_named(tmp_path):
    import torch
    from safetensors.torch import save_file

    from megatron_vespo.mcore.weights import SafetensorsSource

    save_file({"w": torch.zeros(2)}, str(tmp_path / "a.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "a.safetensors"}}))
    assert SafetensorsSource(str(tmp_path)).read("w").tolist() == [0.0, 0.0]  # positive control
    index.write_text('{"weight_map": {"w": "a.safetensors"}')
    with pytest.raises(InputFileError, match=r"safetensors index .*index\.json is not valid JSON"):
        SafetensorsSource(str(tmp_path))
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(InputFileError, match=r"index\.json has no 'weight_map' object"):  # was KeyError 'weight_map'
        SafetensorsSource(str(tmp_path))
    index.write_text(json.dumps({"weight_map": {"w": "b.safetensors"}}))
    with pytest.raises(InputFileError, match=r"names files that are not in .*\['b\.safetensors'\]"):
        SafetensorsSource(str(tmp_path))
    index.unlink()
    (tmp_path / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(InputFileError, match=r"safetensors file .*model\.safetensors cannot be read"):
        SafetensorsSource(str(tmp_path))


def test_checkpoint_metadata_is_named(tmp_path):
    from megatron_vespo.convert.cli import META, checkpoint_source
    from megatron_vespo.mcore import versions

    meta = tmp_path / META
    meta.write_text('{"model": ')
    with pytest.raises(InputFileError, match=rf"checkpoint metadata {re.escape(str(meta))} is not valid JSON"):
        checkpoint_source(str(tmp_path))
    meta.write_text(json.dumps({"hf_config": {}}))
    with pytest.raises(InputFileError, match=rf"{re.escape(str(meta))} is not what 'convert hf-to-mcore' writes "
                                             r"\(KeyError"):
        checkpoint_source(str(tmp_path))
    meta.write_text(json.dumps({"model": {"num_layers": 0, "dense_layers": []}, "hf_config": {}}))
    with pytest.raises(InputFileError, match=r"ValueError: num_layers must be an integer >= 1"):
        checkpoint_source(str(tmp_path))
    (tmp_path / "metadata.json").write_bytes(b"\x80\x04")
    with pytest.raises(InputFileError, match=r"metadata\.json is not UTF-8 text"):
        versions.checkpoint_writer(str(tmp_path))


# -- score inputs and tools/prepare_data.py -------------------------------------------------------


def test_score_input_errors_name_the_file(tmp_path):
    from megatron_vespo.score import read_score_inputs

    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"input_ids": [1, 2]}\n{"input_ids": [3, 4], "note": "\xe9"}\n')
    with pytest.raises(InputFileError, match=r"score input .*in\.jsonl is not UTF-8 text: byte 0xe9 on line 2"):
        read_score_inputs(str(path), 10)
    with pytest.raises(InputFileError, match=r"is a directory"):
        read_score_inputs(str(tmp_path), 10)
    path.write_text("\n\n")
    with pytest.raises(ValueError, match=r"in\.jsonl has no rows"):  # printed nothing and exited 0 before
        read_score_inputs(str(path), 10)
    path.write_text('{"input_ids": [1, true]}\n')
    with pytest.raises(ValueError, match=r"in\.jsonl:1: input_ids must be a list of at least 2 integers"):
        read_score_inputs(str(path), 10)
    path.write_text('{"input_ids": [1, 2]}\n')
    assert read_score_inputs(str(path), 10) == [[1, 2]]


def test_prepare_data_reads_name_the_file(tmp_path):
    spec = importlib.util.spec_from_file_location("prepare_data_tool", os.path.join(ROOT, "tools", "prepare_data.py"))
    tool = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tool  # its dataclasses look their module up there
    spec.loader.exec_module(tool)
    path = tmp_path / "test.jsonl"
    path.write_bytes(b'{"problem": "1+1", "answer": "2"}\n' + NOT_UTF8)
    with pytest.raises(tool.PrepError, match=r"test\.jsonl: not UTF-8 text \(byte 0xe9 on line 2\)"):
        list(tool.iter_rows(path))
    path.write_text('{"problem": "1+1", "answer": "2"}\n')
    assert list(tool.iter_rows(path)) == [(0, {"problem": "1+1", "answer": "2"})]


# -- through the command line ---------------------------------------------------------------------


def _cli(capsys, *argv: str) -> tuple[int, str]:
    from megatron_vespo.cli import main

    code = main(list(argv))
    return code, capsys.readouterr().err


def test_the_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    code, err = _cli(capsys, "train", "--config", DEMO, "run.save_every=-2")
    assert code == 2 and err == "megatron-vespo train: error: run.save_every must be >= 0, got -2\n"
    code, err = _cli(capsys, "train", "--config", str(tmp_path))
    assert code == 2 and err == f"megatron-vespo train: error: config file {tmp_path} is a directory, not a file\n"
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "qwen3", }')
    code, err = _cli(capsys, "convert", "hf-to-mcore", "--hf", str(model), "--out", str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 1 and f"model config {model / 'config.json'} is not valid JSON" in err
    (model / "config.json").write_text(json.dumps(DENSE_CONFIG))
    code, err = _cli(capsys, "convert", "hf-to-mcore", "--hf", str(model), "--out", str(tmp_path / "out"), "--tp", "0")
    # a layout flag of 0 ended in a ZeroDivisionError traceback
    assert code == 2 and err == "megatron-vespo convert: error: tp must be an integer >= 1, got 0\n"
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(model / "model.safetensors"))
    inputs = tmp_path / "in.jsonl"
    inputs.write_bytes(b'{"input_ids": [1, 2]}\xff\n')
    code, err = _cli(capsys, "score", "--model", str(model), "--input", str(inputs))
    assert code == 2 and err.count("\n") == 1 and f"score input {inputs} is not UTF-8 text" in err
    code, err = _cli(capsys, "demo", "--config", DEMO, "rollout.group_size=1")
    assert code == 2 and err.startswith("megatron-vespo demo: error: rollout.group_size = 1: group advantages")


def test_the_demo_validates_before_building_its_model(monkeypatch):
    from types import SimpleNamespace

    from megatron_vespo.train import demo

    monkeypatch.setattr(demo, "build_model", lambda *a, **k: pytest.fail("built the model before validating"))
    with pytest.raises(ValueError, match="optimizer.lr must be > 0"):
        demo.main(SimpleNamespace(config=DEMO, overrides=["optimizer.lr=0"], warm_start_steps=0))


@pytest.mark.slow
def test_the_cli_process_prints_no_traceback(tmp_path):
    bad = tmp_path / "config.yaml"
    bad.write_text("model:\n  hf_dir: x\n run:\n")  # the indentation YAML rejects
    proc = run_cli("train", "--config", str(bad), timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"megatron-vespo train: error: config file {bad} is not valid YAML" in proc.stderr
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_bytes(b"\x00\x01binary")
    proc = run_cli("convert", "hf-to-mcore", "--hf", str(model), "--out", str(tmp_path / "out"), timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"model config {model / 'config.json'} is not valid JSON" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_config_module_keeps_its_bounds_in_the_docs():
    # docs/CONFIG.md shows each key's range (tools/gen_config_reference.py reads BOUNDS)
    text = open(os.path.join(ROOT, "docs", "CONFIG.md")).read()
    for key, interval in list(config_module.BOUNDS.items()) + [(f"algorithm.loss.{k}", v)
                                                               for k, v in losses.BOUNDS.items()]:
        row = next(line for line in text.splitlines() if line.startswith(f"| `{key}` |"))
        assert f"Range `{interval}`." in row, key


def test_the_server_launchers_name_a_broken_model_config(tmp_path):
    """sglang launch checks the model before starting servers; the local engine reads config.json
    before transformers does: a broken one is named either way."""
    from megatron_vespo.rollout.launch import check_model_for_sglang
    from megatron_vespo.rollout.local_engine import LocalEngine

    (tmp_path / "config.json").write_text('{"model_type": "qwen3_moe",')
    with pytest.raises(ValueError, match=str(tmp_path / "config.json")):
        check_model_for_sglang(str(tmp_path))
    with pytest.raises(ValueError, match=str(tmp_path / "config.json")):
        LocalEngine(str(tmp_path), dtype="float32")

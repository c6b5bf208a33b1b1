"""The paper's reference recipe (docs/REFERENCE_RECIPE.md): the prompts tools/prepare_data.py writes
with ``--template reference --no-dedupe``, the config that mirrors recipe/vespo/run/sync/vespo_N_8.sh,
and the document's table against the config.

The expected prompts are built here the way the reference's recipe/vespo/tools/preprocess_datasets.py
builds them (string replacement on DAPO's message, problem + " " + instruction for the benchmarks),
from the tiny dataset copies of tests/test_data.py.
"""

from __future__ import annotations

import importlib.util
import re
import sys

import pyarrow.parquet as pq
import yaml

from megatron_vespo.train.config import load_config
from tests.test_data import DAPO_HEAD, DAPO_TAIL, make_sources
from tests.test_examples import ARCHITECTURES, REFERENCE, ROOT, _config_key_exists, check_config, flatten

BOXED = "Please reason step by step, and put your final answer within \\boxed{}."  # DAPO-Math-17k, AMC 2023
THINK = "Let's think step by step and output the final answer within \\boxed{}."  # AIME 2024, AIME 2025
DOC = ROOT / "docs" / "REFERENCE_RECIPE.md"


def _tool(monkeypatch):
    spec = importlib.util.spec_from_file_location("prepare_data_reference", ROOT / "tools" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _rows(path):
    return pq.read_table(path).to_pylist()


def test_reference_prompts_keep_every_row(tmp_path, monkeypatch, capsys):
    tool = _tool(monkeypatch)
    src, out, out_dedup = tmp_path / "src", tmp_path / "out", tmp_path / "dedup"
    make_sources(src)
    datasets = ["--datasets", "dapo_math_17k,amc23,aime24,aime25", "--template", "reference"]
    assert tool.main(["--source-dir", str(src), "--out-dir", str(out), *datasets, "--no-dedupe"]) == 0, \
        capsys.readouterr().err

    def user(content):
        return [{"role": "user", "content": content}]

    dapo_src = _rows(src / "DAPO-Math-17k" / "data" / "dapo-math-17k.parquet")
    dapo = _rows(out / "dapo_math_17k.parquet")
    # every row as shipped (repeats and the conflicting answer too), the reference's two replacements
    assert [r["prompt"] for r in dapo] == [
        user(r["prompt"][0]["content"].replace(DAPO_HEAD, "").replace(DAPO_TAIL, " " + BOXED)) for r in dapo_src]
    assert [r["answer"] for r in dapo] == [r["reward_model"]["ground_truth"] for r in dapo_src]
    assert dapo[0]["prompt"] == user("What is the sum of 2 and 3? " + BOXED)
    amc_src = _rows(src / "amc23" / "test-00000-of-00001.parquet")
    assert [r["prompt"] for r in _rows(out / "amc23.parquet")] == [user(r["question"] + " " + BOXED) for r in amc_src]
    aime_src = _rows(src / "HuggingFaceH4" / "aime_2024" / "data" / "train-00000-of-00001.parquet")
    assert [r["prompt"] for r in _rows(out / "aime24.parquet")] == [user(r["problem"] + " " + THINK) for r in aime_src]
    assert all(r["prompt"][0]["content"].endswith(" " + THINK) for r in _rows(out / "aime25.parquet"))
    for key in ("dapo_math_17k", "amc23"):
        ids = [r["id"] for r in _rows(out / f"{key}.parquet")]
        assert len(ids) == len(set(ids))

    # without --no-dedupe the same template, one row per problem
    assert tool.main(["--source-dir", str(src), "--out-dir", str(out_dedup), *datasets]) == 0
    assert [r["prompt"] for r in _rows(out_dedup / "dapo_math_17k.parquet")] == [r["prompt"] for r in dapo[:2]]


# The settings of recipe/vespo/run/sync/vespo_N_8.sh and the verl defaults it relies on, in our keys.
SCRIPT = {
    "model.tp": 2, "model.pp": 1, "model.vpp": 1, "model.cp": 1, "model.ep": 8, "model.etp": 1,
    "model.params_dtype": "bfloat16", "model.recompute": True,
    "data.max_prompt_tokens": 1024, "data.seed": 42, "data.reward_timeout_s": 30.0, "data.reward": "math_full",
    "rollout.prompts_per_batch": 2048, "rollout.group_size": 8, "rollout.max_new_tokens": 15360,
    "rollout.temperature": 1.0, "rollout.top_p": 1.0, "rollout.top_k": -1,
    "algorithm.loss.name": "vespo", "algorithm.loss.k_pos": 2.0, "algorithm.loss.lambda_pos": 3.0,
    "algorithm.loss.k_neg": 3.0, "algorithm.loss.lambda_neg": 2.0, "algorithm.loss.correction": "none",
    "algorithm.loss.aggregation": "legacy_microbatch_token_mean",
    "algorithm.staleness": 8, "algorithm.micro_batch_size": 0, "algorithm.max_tokens_per_micro_batch": 16384,
    "algorithm.advantage": "grpo", "algorithm.advantage_eps": 1e-6, "algorithm.advantage_std": "unbiased",
    "algorithm.mini_batch_order": "grouped", "algorithm.pi_old": "recompute", "algorithm.routing_replay": "none",
    "algorithm.async_rollout": False, "algorithm.kl_coef": 0.0, "algorithm.entropy_coef": 0.0,
    "algorithm.filter_groups": False, "algorithm.overlong_buffer": 0, "algorithm.mask_truncated": False,
    "optimizer.lr": 1e-6, "optimizer.min_lr": 1e-6, "optimizer.warmup_steps": 0, "optimizer.weight_decay": 0.01,
    "optimizer.adam_beta1": 0.9, "optimizer.adam_beta2": 0.999, "optimizer.adam_eps": 1e-8,
    "optimizer.clip_grad": 1.0, "optimizer.distributed": True,
    "eval.every": 4, "eval.at_start": False, "eval.at_end": True, "eval.n": 4, "eval.temperature": 1.0,
    "eval.top_p": 0.7, "eval.max_new_tokens": 0,
    "run.seed": 42, "run.save_every": 8, "run.steps": 8 * (1_791_700 // 2048),  # one epoch of DAPO-Math-17k
}


def test_reference_config_is_the_scripts_settings():
    cfg = load_config(str(REFERENCE))
    got = flatten(cfg.to_dict())
    assert {k: got[k] for k in SCRIPT} == SCRIPT
    # ppo_max_token_len_per_gpu counts one GPU's tokens; our budget is before the CP split
    assert cfg.algorithm.max_tokens_per_micro_batch == 16384 * cfg.model.cp
    assert cfg.data.prompts_file == "data/reference/dapo_math_17k.parquet"
    assert [p.rsplit("/", 1)[-1] for p in cfg.eval.sets] == ["amc23.parquet", "aime24.parquet", "aime25.parquet"]
    cfg.rollout.server_urls = [check_config.PLACEHOLDER_URL]
    summary = check_config.check(cfg, 64, ARCHITECTURES["Qwen3-30B-A3B-Base"])  # trainer.nnodes 8 x 8 GPUs
    assert "dp 32" in summary and "64 per data rank" in summary


def test_doc_table_names_the_configs_keys():
    """The 'ours' column names real config keys, and every key the config sets has a row
    (except the ones the scripts fill in and pure plumbing)."""
    text = re.sub(r"```.*?```", "", DOC.read_text(), flags=re.S)
    ours = [line.split("|")[3] for line in text.splitlines() if line.startswith("| ") and line.count("|") == 5]
    key = re.compile(r"`((?:model|data|rollout|algorithm|optimizer|eval|run)\.[a-z0-9_.]+)`")
    keys = {k for cell in ours for k in key.findall(cell)}
    assert len(keys) > 40
    assert sorted(k for k in keys if not _config_key_exists(k)) == []
    plumbing = {"rollout.router_url", "rollout.server_urls", "rollout.api_key", "rollout.timeout_s",
                "rollout.max_attempts", "run.run_dir", "run.tensorboard", "run.plot"}
    written = flatten(yaml.safe_load(REFERENCE.read_text()))
    assert sorted(set(written) - keys - plumbing) == []

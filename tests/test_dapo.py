"""DAPO's data handling: the overlong penalty against DAPO's formula, the group filter, dynamic
sampling in ``Trainer.generate_batch`` (fake engine and prompts, no processes), the async producer
continuing where a batch's prompts ended, truncated samples masked in ``Trainer._prepare``; and one
tiny training run with dynamic sampling that resumes on the same data stream."""

import json
import math
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from megatron_vespo.rollout.client import RolloutSample
from megatron_vespo.train.config import load_config
from megatron_vespo.train.dapo import keep_groups, mask_truncated, overlong_penalty
from megatron_vespo.train.tasks import Prompt
from megatron_vespo.train.trainer import AsyncProducer, RolloutBatch, Trainer, group_advantages


def _dapo_reference(length, max_len, buffer, factor):
    """verl's DAPORewardManager, transcribed."""
    expected_len = max_len - buffer
    exceed_len = length - expected_len
    return min(-exceed_len / buffer * factor, 0)


def test_overlong_penalty_is_dapos():
    assert [overlong_penalty(n, 8, 4, 1.0) for n in (0, 3, 4, 5, 6, 8)] == [0, 0, 0, -0.25, -0.5, -1.0]
    assert overlong_penalty(8, 8, 4, 2.5) == -2.5  # the factor at max_new_tokens
    assert math.copysign(1.0, overlong_penalty(4, 8, 4, 1.0)) == 1.0  # 0, not -0.0 in the logs
    for max_len, buffer, factor in ((8, 1, 1.0), (8, 7, 0.5), (4096, 1024, 1.0), (20, 6, 3.0)):
        for n in range(max_len + 1):
            assert overlong_penalty(n, max_len, buffer, factor) == pytest.approx(
                _dapo_reference(n, max_len, buffer, factor), abs=1e-12), (n, max_len, buffer, factor)
    assert all(overlong_penalty(n, 8, 0, 1.0) == 0.0 for n in range(9))  # buffer 0: off
    with pytest.raises(ValueError, match=r"algorithm.overlong_buffer = 8 must be .* rollout.max_new_tokens = 8"):
        overlong_penalty(3, 8, 8, 1.0)
    with pytest.raises(ValueError, match="algorithm.overlong_penalty_factor"):
        overlong_penalty(3, 8, 4, -1.0)
    with pytest.raises(ValueError, match="a response of 9 tokens"):
        overlong_penalty(9, 8, 4, 1.0)


def test_keep_groups_drops_groups_of_equal_rewards():
    assert keep_groups([1, 1, 0, 1, 0.5, 0.5, 0, 0], 2) == [False, True, False, False]
    assert keep_groups([1, 1, 0, 1, 0.5, 0.5, 0, 0], 4) == [True, True]
    assert keep_groups([0.1 + 0.2, 0.3], 2) == [True]  # exact comparison: these differ
    with pytest.raises(ValueError, match="5 rewards do not split into groups of 2"):
        keep_groups([0, 1, 0, 1, 0], 2)
    with pytest.raises(ValueError, match="fewer than 2"):
        keep_groups([0, 1], 1)
    with pytest.raises(ValueError, match=r"finite; sample\(s\) \[1\]"):
        keep_groups([0, float("nan")], 2)


# -- generate_batch with a fake engine and prompt stream --------------------------------------------
# group_size 2, 4 prompts a batch, max_new_tokens 8. Prompts whose two samples' rewards differ:
# these and every uid from 12 on
INFORMATIVE = {1, 4, 6, 9, 10, 11}


def _task_reward(uid, k):
    return float(k) if uid in INFORMATIVE or uid >= 12 else float(uid % 2 == 0)


def _length(uid, k):
    return 3 if k == 0 else (8 if uid % 2 else 6)  # 8: cut at max_new_tokens


class _Source:
    reward_timeouts = 0

    def prompt(self, uid):
        return Prompt(uid, [100 + uid], None)

    def reward(self, response_ids, text, prompt):
        return _task_reward(prompt.uid, response_ids[0])


class _Client:
    """Answers like RolloutClient.generate_sync: ordered by prompt, then sample."""

    def __init__(self):
        self.rounds = []  # the uids asked for, per call

    def generate_sync(self, prompts, params, n, return_routed_experts=False):
        uids = [ids[0] - 100 for ids in prompts]
        self.rounds.append(uids)
        out = []
        for i, uid in enumerate(uids):
            for k in range(n):
                length = _length(uid, k)
                out.append(RolloutSample(index=i, prompt_ids=[100 + uid], response_ids=[k] * length,
                                         engine_logprobs=np.full(length, -0.5, np.float32),
                                         finish_reason="length" if length == 8 else "stop", weight_version="v0"))
        return out


def _trainer(*overrides):
    trainer = Trainer.__new__(Trainer)  # generate_batch and _prepare need no model or engine
    trainer.cfg = load_config(None, ["rollout.prompts_per_batch=4", "rollout.group_size=2",
                                     "rollout.max_new_tokens=8", "algorithm.pi_old=bypass", *overrides])
    trainer.source, trainer.client, trainer.tokenizer = _Source(), _Client(), None
    trainer.policy = SimpleNamespace(validate=lambda samples: None)
    trainer.reference = None  # no KL term
    trainer.version = 0
    return trainer


def test_dynamic_sampling_fills_the_batch_in_uid_order_and_says_where_the_stream_continues():
    trainer = _trainer("algorithm.filter_groups=true", "algorithm.filter_max_rounds=5")
    batch = trainer.generate_batch(index=3, first_uid=0)
    # round 0 keeps uid 1, round 1 uids 4 and 6, round 2 uid 9 (10 and 11 pass too: surplus, dropped)
    assert trainer.client.rounds == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert [s.prompt_ids[0] - 100 for s in batch.samples] == [1, 1, 4, 4, 6, 6, 9, 9]
    assert [s.index for s in batch.samples] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert batch.rewards == [0.0, 1.0] * 4 and batch.first_uid == 0 and batch.index == 3
    assert batch.next_uid == 12
    generated = [_task_reward(uid, k) for uid in range(12) for k in range(2)]
    assert batch.metrics == {"filter/kept_fraction": 6 / 12, "filter/rounds": 2, "reward/timeouts": 0,
                             "filter/task_mean_generated": pytest.approx(np.mean(generated))}
    # the next batch starts at uid 12 and keeps 10 and 11 no more: they were consumed
    assert trainer.generate_batch(index=4, first_uid=batch.next_uid).samples[0].prompt_ids == [112]

    with pytest.raises(ValueError, match=r"after 1 extra rounds \(8 prompts from uid 0\) only 3 of "
                                         r"rollout.prompts_per_batch = 4 .*algorithm.filter_max_rounds"):
        _trainer("algorithm.filter_groups=true", "algorithm.filter_max_rounds=1").generate_batch(0, 0)

    plain = _trainer().generate_batch(index=0, first_uid=0)  # off: every group, one round
    assert [s.prompt_ids[0] - 100 for s in plain.samples[::2]] == [0, 1, 2, 3]
    assert plain.next_uid == 4 and plain.metrics == {"reward/timeouts": 0}


def test_the_overlong_penalty_is_added_to_the_task_reward():
    batch = _trainer("algorithm.overlong_buffer=4", "algorithm.overlong_penalty_factor=2.0").generate_batch(0, 0)
    lengths = [len(s.response_ids) for s in batch.samples]
    task = [_task_reward(uid, k) for uid in range(4) for k in range(2)]
    penalties = [-2.0 * max(n - 4, 0) / 4 for n in lengths]  # lengths 3, 6, 8: 0, -1, -2
    assert sorted(set(penalties)) == [-2.0, -1.0, 0.0]
    assert batch.rewards == pytest.approx([t + p for t, p in zip(task, penalties)])
    assert batch.metrics["reward/task_mean"] == pytest.approx(np.mean(task))
    assert batch.metrics["reward/overlong_penalty"] == pytest.approx(np.mean(penalties))
    # filtering looks at the task reward: uid 0 (task rewards 1, 1; penalties 0, -1) is dropped
    filtered = _trainer("algorithm.overlong_buffer=4", "algorithm.filter_groups=true").generate_batch(0, 0)
    assert [s.prompt_ids[0] - 100 for s in filtered.samples[::2]] == [1, 4, 6, 9]


def test_truncated_samples_are_masked_in_prepare_and_the_rollout_metrics_reach_the_step_row():
    trainer = _trainer("algorithm.mask_truncated=true", "algorithm.filter_groups=true")
    batch = trainer.generate_batch(0, 0)
    prepared = trainer._prepare(batch)
    truncated = [s.finish_reason == "length" for s in batch.samples]
    # kept uids 1, 4, 6, 9: the second sample of the odd ones ran out of tokens
    assert truncated == [False, True, False, False, False, False, False, True]
    assert [s.trained for s in prepared.samples] == [not t for t in truncated]
    assert prepared.metrics["response/masked_truncated"] == 0.25
    assert prepared.metrics["filter/kept_fraction"] == 0.5  # the rollout's metrics pass through
    # advantages come from every reward of the group, the masked samples' included
    expected = group_advantages(np.asarray(batch.rewards), 2, "grpo", trainer.cfg.algorithm.advantage_eps)
    assert [s.advantage for s in prepared.samples] == pytest.approx(expected.tolist())
    assert all(s.advantage != 0 for s in prepared.samples)

    unmasked = _trainer()._prepare(_trainer().generate_batch(0, 0))
    assert all(s.trained for s in unmasked.samples) and "response/masked_truncated" not in unmasked.metrics


def test_mask_truncated_marks_exactly_the_length_finishes():
    samples = [SimpleNamespace(trained=True) for _ in range(4)]
    rollouts = [SimpleNamespace(finish_reason=r) for r in ("stop", "length", "abort", "length")]
    assert mask_truncated(samples, rollouts) == 0.5
    assert [s.trained for s in samples] == [True, False, True, False]
    with pytest.raises(ValueError, match="4 samples for 3 rollouts"):
        mask_truncated(samples, rollouts[:3])


def test_the_async_producer_continues_where_each_batch_ended():
    asked = []

    def generate(index, uid):
        asked.append(uid)
        # batch 1 needed extra rounds, batch 3 one
        next_uid = {0: uid + 4, 1: uid + 12, 2: uid + 4, 3: uid + 8}[index]
        return RolloutBatch(index, uid, [], [], 0.0, next_uid=next_uid)

    producer = AsyncProducer(generate, first_index=0, first_uid=40, total_batches=4, max_ahead=4)
    try:
        assert [producer.take().first_uid for _ in range(4)] == [40, 44, 56, 60]
    finally:
        producer.stop()
    assert asked == [40, 44, 56, 60]


@pytest.mark.slow
def test_a_run_with_dynamic_sampling_logs_it_and_resumes_on_the_same_data_stream(tmp_path):
    """Every DAPO option on the synthetic task (an untrained model: few groups differ, so batches
    take extra rounds); a checkpoint records where the stream continues and a resumed run repeats
    the uninterrupted one's batches."""
    from megatron_vespo.train.demo import build_model
    from tests.conftest import ROOT, run_cli

    model = build_model(str(tmp_path / "model"), "reverse", log=lambda message: None, warm_start_steps=0)
    run_dir = tmp_path / "run"
    args = ["train", "--config", os.path.join(ROOT, "examples", "configs", "demo_cpu.yaml"), f"model.hf_dir={model}",
            f"run.run_dir={run_dir}", "rollout.prompts_per_batch=4", "rollout.group_size=4",
            "rollout.max_new_tokens=8", "rollout.local_dtype=float32", "rollout.local_max_batch=1",
            "algorithm.staleness=2", "algorithm.micro_batch_size=4", "run.tensorboard=false", "run.plot=false",
            "run.steps=4", "run.save_every=2", "run.resume=true", "algorithm.filter_groups=true",
            "algorithm.filter_max_rounds=30", "algorithm.overlong_buffer=4", "algorithm.mask_truncated=true"]
    proc = run_cli(*args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert 0 < row["filter/kept_fraction"] <= 1 and np.isfinite(row["policy_loss"])
        assert row["reward/mean"] == pytest.approx(row["reward/task_mean"] + row["reward/overlong_penalty"])
        assert 0 <= row["response/masked_truncated"] < 1
    assert rows[0]["filter/rounds"] > 0  # the test needs a batch that took extra rounds
    state = json.loads((run_dir / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["data_pos"] == 4 * (1 + rows[0]["filter/rounds"])  # batch 0's prompts, every round's

    shutil.rmtree(run_dir / "checkpoints" / "step-4")  # as if killed after the step-2 checkpoint
    proc = run_cli(*args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step-2'}" in proc.stderr
    resumed = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows[2:], resumed[2:], strict=True):
        for key in ("reward/mean", "filter/rounds", "filter/kept_fraction", "response/masked_truncated"):
            assert a[key] == b[key], (a["step"], key)
        assert a["policy_loss"] == pytest.approx(b["policy_loss"], rel=1e-6, abs=1e-9)

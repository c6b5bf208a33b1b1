"""Held-out evaluation (megatron_vespo/train/evaluation.py): the pass@k estimator against brute
force, avg@n, the schedule of a run (start, every K rollout batches, end, resume), the held-out
synthetic seeds, generation and scoring through a scripted client, the plot panel, the `eval`
command's errors; end to end, a tiny run's eval rows and the `eval` command reproducing them."""

import itertools
import json
import math
import os
import re
from types import SimpleNamespace

import pytest

from megatron_vespo.train import evaluation
from megatron_vespo.train.config import EvalSection, load_config
from megatron_vespo.train.evaluation import (HELDOUT_SEED_OFFSET, Schedule, avg_at_n, build_sets, evaluate,
                                             heldout_synthetic_seed, is_eval_row, pass_at_k, planned_steps,
                                             set_metrics)
from megatron_vespo.train.tasks import SyntheticTask
from tests.conftest import ROOT, run_cli

CONFIG = os.path.join(ROOT, "examples", "configs", "demo_cpu.yaml")


# -- the estimators ---------------------------------------------------------------------------


def test_pass_at_k_is_the_chance_that_k_of_n_samples_hold_a_correct_one():
    """Against enumerating every k-subset of n samples of which the first c are correct."""
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                brute = sum(any(i < c for i in subset) for subset in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)
    # large n, where the binomials are huge: the product form stays exact to rounding
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)
    assert pass_at_k(200, 3, 100) == pytest.approx(1 - math.comb(197, 100) / math.comb(200, 100), rel=1e-12)
    for bad in ((4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5), (4, 1.0, 1), (4, True, 1)):
        with pytest.raises(ValueError, match="pass_at_k"):
            pass_at_k(*bad)


def test_avg_at_n_and_the_metrics_of_a_set():
    rewards = [[1.0, 0.0, 0.5, 1.0], [0.25, 0.25, 0.25, 0.25]]  # partial credit counts in avg@n only
    assert avg_at_n(rewards) == pytest.approx((2.5 / 4 + 0.25) / 2)
    metrics = set_metrics("s", rewards, [[3, 4, 5, 6], [1, 1, 1, 1]], [2, 1, 4, 2])
    assert metrics == pytest.approx({
        "eval/s/avg@4": (2.5 / 4 + 0.25) / 2,
        "eval/s/pass@1": (2 / 4 + 0) / 2,  # two exact answers (reward 1) in the first group
        "eval/s/pass@2": (1 - math.comb(2, 2) / math.comb(4, 2)) / 2,
        "eval/s/pass@4": 0.5,
        "eval/s/response_len": (18 + 4) / 8})
    with pytest.raises(ValueError, match="avg_at_n"):
        avg_at_n([])


# -- the schedule ---------------------------------------------------------------------------------


def _eval(**kwargs):
    return EvalSection(**{"synthetic_prompts": 4, **kwargs})


def test_the_schedule_of_a_run():
    # staleness 2: a rollout batch every 2 steps; every 2 batches -> steps 4, 8; the end (6) on its own
    assert planned_steps(_eval(every=2), total_steps=6, staleness=2) == [0, 4, 6]
    assert planned_steps(_eval(every=0), 6, 2) == [0, 6]
    assert planned_steps(_eval(every=3), 12, 2) == [0, 6, 12]  # the end is the periodic one: once
    assert planned_steps(_eval(every=1), 5, 2) == [0, 2, 4, 5]  # a last batch cut short by run.steps
    assert planned_steps(_eval(every=1, at_start=False, at_end=False), 5, 2) == [2, 4, 5]
    assert planned_steps(_eval(every=4, at_end=False), 6, 2) == [0]
    assert planned_steps(_eval(every=2, synthetic_prompts=0), 6, 2) == []  # no set: off
    assert planned_steps(_eval(every=2, synthetic_prompts=0, sets=["a.jsonl"]), 6, 2) == [0, 4, 6]
    # the demo: 500 steps at staleness 4, every 25 batches, neither start nor end of their own
    demo = load_config(CONFIG).eval
    assert planned_steps(demo, 500, 4) == [100, 200, 300, 400, 500]


def test_a_resumed_run_evaluates_where_an_uninterrupted_one_does():
    ev = _eval(every=2)
    whole = planned_steps(ev, 10, 2)
    assert whole == [0, 4, 8, 10]
    # resumed from the step-6 checkpoint (3 batches): rows up to step 6 kept, no new start
    assert planned_steps(ev, 10, 2, start_step=6, start_batches=3, evaluated=(0, 4)) == [8, 10]
    # resumed from the final checkpoint: its end eval row is kept, nothing runs twice
    assert planned_steps(ev, 10, 2, start_step=10, start_batches=5, evaluated=(0, 4, 8, 10)) == []
    # no checkpoint yet, but metrics.jsonl kept the step-0 row of the first attempt: not again
    assert planned_steps(ev, 10, 2, evaluated=(0,)) == [4, 8, 10]
    schedule = Schedule(ev, 10)
    assert not schedule.due("batch", 2, 1) and schedule.due("batch", 4, 2)
    assert not schedule.due("end", 8, 4)  # a stop request before run.steps: no end evaluation
    with pytest.raises(ValueError, match="unknown evaluation moment"):
        schedule.due("middle", 0, 0)


# -- the sets -------------------------------------------------------------------------------------


def test_heldout_synthetic_prompts_never_share_a_generator_with_training():
    """SyntheticTask seeds prompt uid's generator with |seed * 1_000_003 + uid|; the training stream
    (seed data.seed, uids from 0) reaches the held-out generators only after ~1e18 prompts."""
    for data_seed in (-7, 0, 1, 1234):
        cfg = load_config(CONFIG, [f"data.seed={data_seed}", "eval.synthetic_prompts=50",
                                   "data.synthetic_max_digits=6"])
        (heldout,) = build_sets(cfg.validate(), None)
        task = heldout.source.prompts
        assert heldout.name == "synthetic" and heldout.uids == list(range(50))
        assert task.seed == heldout_synthetic_seed(data_seed) and task.seed != data_seed
        keys = [task.seed * 1_000_003 + uid for uid in heldout.uids]
        # the first training uid whose generator seed is one of them (the stream's keys only grow past |s| M)
        first_training_uid = min(keys) - abs(data_seed) * 1_000_003
        assert first_training_uid >= HELDOUT_SEED_OFFSET * 1_000_003 > 10**18
        training = SyntheticTask(cfg.data.synthetic_task, cfg.data.synthetic_min_digits, cfg.data.synthetic_max_digits,
                                 seed=data_seed)
        assert [heldout.source.prompt(u).input_ids for u in range(5)] != [training.prompt(u).input_ids
                                                                          for u in range(5)]
        # scored with the training reward: the exact answer is 1
        prompt = heldout.source.prompt(3)
        assert heldout.source.reward(prompt.answer, "", prompt) == 1.0


class CharTokenizer:
    """One token per character: prompts round-trip through decode."""

    chat_template = None

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[ord(c) for c in text] for text in texts]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


class ScriptedClient:
    """generate_sync as the RolloutClient's: n samples per prompt, ordered by prompt then sample;
    the k-th response of a prompt is its script's k-th text."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def generate_sync(self, prompts, params, n=1):
        self.calls.append((prompts, params, n))
        out = []
        for i, ids in enumerate(prompts):
            texts = self.script["".join(chr(t) for t in ids)]
            for k in range(n):
                out.append(SimpleNamespace(index=i, response_ids=[ord(c) for c in texts[k]]))
        return out


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_prompt_file_sets_are_generated_and_scored_as_training_data_is(tmp_path):
    alpha = _jsonl(tmp_path / "alpha.jsonl", [{"prompt": "2+2?", "answer": "4"}, {"prompt": "3+3?", "answer": "6"}])
    beta = _jsonl(tmp_path / "beta.jsonl", [{"prompt": "1+0?", "answer": "1"}])
    cfg = load_config(CONFIG, ["data.task=file", "data.reward=math", f"data.prompts_file={alpha}",
                               "eval.synthetic_prompts=0", f"eval.sets=[{alpha},{beta}]", "eval.n=4",
                               "eval.pass_k=[1,2,4]", "eval.temperature=0.6", "eval.top_p=0.9",
                               "rollout.max_new_tokens=9"]).validate()
    sets = build_sets(cfg, CharTokenizer())
    assert [(s.name, len(s.uids)) for s in sets] == [("alpha", 2), ("beta", 1)]
    script = {"2+2?": ["\\boxed{4}"] * 4,  # 4 of 4 right
              "3+3?": ["\\boxed{6}", "\\boxed{5}", "no", "\\boxed{7}"],  # 1 of 4
              "1+0?": ["\\boxed{0}"] * 4}  # none
    client = ScriptedClient(script)
    metrics = evaluate(client, CharTokenizer(), sets, cfg.eval, seed=5, max_new_tokens=evaluation.max_new_tokens(cfg))
    lengths = [len(t) for t in script["2+2?"] + script["3+3?"]]
    assert metrics == pytest.approx({
        "eval/alpha/avg@4": (1 + 0.25) / 2, "eval/alpha/pass@1": (1 + 0.25) / 2,
        "eval/alpha/pass@2": (1 + 0.5) / 2, "eval/alpha/pass@4": 1.0,
        "eval/alpha/response_len": sum(lengths) / 8,
        "eval/beta/avg@4": 0.0, "eval/beta/pass@1": 0.0, "eval/beta/pass@2": 0.0, "eval/beta/pass@4": 0.0,
        "eval/beta/response_len": 9.0})
    (prompts, params, n), = client.calls
    assert n == 4 and len(prompts) == 3  # one request list for every set
    assert all(p["temperature"] == 0.6 and p["top_p"] == 0.9 and p["max_new_tokens"] == 9 and p["top_k"] == -1
               for p in params)
    seeds = [p["sampling_seed"] for p in params]
    assert len(set(seeds)) == 3 and all(0 <= s < 2**56 for s in seeds)
    evaluate(client, CharTokenizer(), sets, cfg.eval, seed=5, max_new_tokens=9)
    assert [p["sampling_seed"] for p in client.calls[1][1]] == seeds  # every evaluation: the same seeds
    evaluate(client, CharTokenizer(), sets, cfg.eval, seed=6, max_new_tokens=9)
    assert not set(p["sampling_seed"] for p in client.calls[2][1]) & set(seeds)  # run.seed changes them


def test_bad_eval_sets_are_named(tmp_path):
    alpha = _jsonl(tmp_path / "alpha.jsonl", [{"prompt": "2+2?", "answer": "4"}])
    (tmp_path / "other").mkdir()
    twin = _jsonl(tmp_path / "other" / "alpha.jsonl", [{"prompt": "1+1?", "answer": "2"}])
    base = ["data.task=file", "data.reward=math", f"data.prompts_file={alpha}", "eval.synthetic_prompts=0"]
    missing = tmp_path / "aime24.jsonl"
    with pytest.raises(ValueError, match=rf"eval.sets: prompt file {missing} does not exist"):
        build_sets(load_config(CONFIG, base + [f"eval.sets=[{missing}]"]).validate(), CharTokenizer())
    with pytest.raises(ValueError, match=r"eval.sets: .* share a name: \{'alpha'"):
        build_sets(load_config(CONFIG, base + [f"eval.sets=[{alpha},{twin}]"]).validate(), CharTokenizer())


def test_the_plot_gets_an_eval_panel_only_with_eval_rows(tmp_path):
    from megatron_vespo.train.plots import eval_panels, plot_run

    training = [{"step": s, "reward/mean": 0.1 * s, "response_len/mean": 3.0} for s in (1, 2)]
    assert eval_panels(training) == ()
    evals = [{"step": s, "eval/a/avg@4": 0.2, "eval/a/pass@1": 0.1, "eval/a/response_len": 4.0, "eval/seconds": 1.0}
             for s in (0, 2)]
    (scores, _, _), (lengths, _, _) = eval_panels(training + evals)
    assert scores == ("eval/a/avg@4", "eval/a/pass@1")
    assert lengths == ("response_len/mean", "eval/a/response_len")
    assert is_eval_row(evals[0]) and not is_eval_row(training[0])
    path = plot_run(training + evals, str(tmp_path / "training.png"))
    assert os.path.getsize(path) > 10_000


def test_the_eval_command_refuses_bad_input(tmp_path, capsys):
    from megatron_vespo import cli

    model = tmp_path / "model"
    model.mkdir()
    cases = [
        (["--model", str(tmp_path / "none")], f"--model {tmp_path / 'none'} is not a directory"),
        (["--model", str(model)], f"--model {model} has no config.json"),
        (["--ckpt", str(tmp_path / "none")], f"--ckpt {tmp_path / 'none'} is not a directory"),
        (["--ckpt", str(model), "rollout.engine=sglang", "rollout.server_urls=http://127.0.0.1:9",
          "rollout.weight_sync=disk", "rollout.weight_sync_dir=/tmp/w"], "--ckpt needs rollout.engine = local"),
        (["--ckpt", str(model), "--json-out", str(tmp_path / "no" / "x.json")], "the directory .* does not exist"),
        (["--ckpt", str(model), "eval.synthetic_prompts=0"], "nothing to evaluate"),
    ]
    for extra, message in cases:
        options = [a for a in extra if "=" not in a]  # overrides come last, as on any command line
        overrides = ["eval.synthetic_prompts=2"] + [a for a in extra if "=" in a]
        assert cli.main(["eval", "--config", CONFIG, *options, *overrides]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("megatron-vespo eval: error: ") and re.search(message, err), (extra, err)


# -- end to end -----------------------------------------------------------------------------------

# small and deterministic, as tests/test_trainer.py's runs: an fp32 engine taking one request at a
# time, so a model's evaluation is bitwise reproducible
SMALL = ["rollout.prompts_per_batch=4", "rollout.group_size=4", "rollout.max_new_tokens=8",
         "rollout.local_dtype=float32", "rollout.local_max_batch=1", "algorithm.staleness=2",
         "algorithm.micro_batch_size=4", "run.tensorboard=false", "run.plot=false"]
EVAL = ["eval.synthetic_prompts=8", "eval.n=4", "eval.pass_k=[1,4]", "eval.every=2", "eval.at_start=true",
        "eval.at_end=true"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The demo's tiny Qwen3-MoE without its warm start (seconds instead of a minute of CPU)."""
    from megatron_vespo.train.demo import build_model

    return build_model(str(tmp_path_factory.mktemp("eval") / "model"), "reverse", log=lambda m: None,
                       warm_start_steps=0)


def _rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _scores(row):
    return {k: v for k, v in row.items() if k not in ("step", "eval/seconds")}


def _train(model_dir, run_dir, *extra):
    proc = run_cli("train", "--config", CONFIG, f"model.hf_dir={model_dir}", f"run.run_dir={run_dir}", *SMALL, *EVAL,
                   *extra, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_a_run_evaluates_on_its_schedule_and_the_eval_command_reproduces_it(model_dir, tmp_path, capsys):
    from megatron_vespo import cli

    run_dir = tmp_path / "run"
    proc = _train(model_dir, run_dir, "run.steps=6")
    rows = _rows(run_dir)
    evals = [r for r in rows if is_eval_row(r)]
    cfg = load_config(CONFIG, EVAL)
    assert [r["step"] for r in evals] == planned_steps(cfg.eval, 6, 2) == [0, 4, 6]
    assert [r["step"] for r in rows if not is_eval_row(r)] == [1, 2, 3, 4, 5, 6]  # training rows as before
    keys = {"step", "eval/seconds", "eval/synthetic/avg@4", "eval/synthetic/pass@1", "eval/synthetic/pass@4",
            "eval/synthetic/response_len"}
    for row in evals:
        assert set(row) == keys
        assert all(0 <= row[f"eval/synthetic/{m}"] <= 1 for m in ("avg@4", "pass@1", "pass@4"))
        assert row["eval/synthetic/pass@1"] <= row["eval/synthetic/pass@4"]
        assert 1 <= row["eval/synthetic/response_len"] <= 8
    assert "eval at step 4: synthetic: avg@4" in proc.stderr
    assert "held-out eval: synthetic/avg@4" in proc.stdout
    # the evaluation after the weight sync sees the trained weights, not the starting ones
    assert _scores(evals[0]) != _scores(evals[2])

    # resumed to step 8: the kept rows stay, the start is not evaluated again, step 8 once
    _train(model_dir, run_dir, "run.steps=8", "run.resume=true")
    resumed = [r for r in _rows(run_dir) if is_eval_row(r)]
    assert [r["step"] for r in resumed] == [0, 4, 6, 8] and resumed[:3] == evals

    # the eval command draws with the run's seeds: the starting model gives the step-0 row, the
    # step-6 checkpoint (converted to HF weights first) the step-6 row
    for which, row in ((["--model", model_dir], evals[0]),
                       (["--ckpt", str(run_dir / "checkpoints" / "step-6")], evals[2])):
        out = tmp_path / "eval.json"
        assert cli.main(["eval", *which, "--config", CONFIG, "--json-out", str(out), *SMALL, *EVAL]) == 0
        table = capsys.readouterr().out
        assert table.splitlines()[0].split() == ["set", "prompts", "avg@4", "pass@1", "pass@4", "response_len"]
        assert table.splitlines()[1].split()[:2] == ["synthetic", "8"]
        report = json.loads(out.read_text())
        assert report["metrics"] == _scores(row), which

    # rollout.engine = sglang: the configured servers (here the project's SGLang-protocol engine)
    # generate with the weights they hold, the starting model's
    from megatron_vespo.rollout.serve_local import LocalServer

    with LocalServer(model_dir, dtype="float32", max_batch=1, seed=1234) as server:
        out = tmp_path / "sglang.json"
        assert cli.main(["eval", "--model", model_dir, "--config", CONFIG, "--json-out", str(out), *SMALL, *EVAL,
                         "rollout.engine=sglang", f"rollout.server_urls=[{server.url}]", "rollout.weight_sync=disk",
                         f"rollout.weight_sync_dir={tmp_path / 'sync'}"]) == 0
    assert json.loads(out.read_text())["metrics"] == _scores(evals[0])

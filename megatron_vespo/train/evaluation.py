"""Evaluation on held-out prompts: avg@n and pass@k per set, during training and for one model.

The ``eval`` config section (``config.EvalSection``) names the sets: prompt files (``eval.sets``,
read as the training prompts are and scored with the training reward, ``data.reward``; a set is
named after its file, ``aime24.jsonl`` -> ``aime24``) or, for ``data.task = synthetic``, held-out
synthetic prompts (``eval.synthetic_prompts``, the set ``synthetic``). Every prompt gets
``eval.n`` samples at the evaluation's own sampling (``eval.temperature``, ``eval.top_p``,
``eval.max_new_tokens``; no top-k) through the same rollout client as training. Per set::

    eval/<set>/avg@<n>        mean reward of the n samples, averaged over prompts (0/1 rewards: accuracy)
    eval/<set>/pass@<k>       unbiased pass@k (Chen et al. 2021) per prompt, averaged; a sample
                              is correct when its reward reaches CORRECT (the full reward)
    eval/<set>/response_len   mean response length in tokens

Sampling seeds depend on (run.seed, set, prompt) only, so every evaluation of a run, and the
``eval`` command with the same config, draws with the same seeds: differences between points of
the curve come from the weights, not from fresh sampling noise.

In training (``Trainer._evaluate_if_due``, on the schedule of :class:`Schedule`) rank 0 generates
and writes a row ``{"step": s, "eval/...": ...}`` of its own to metrics.jsonl; ``megatron-vespo
eval`` evaluates one model (:func:`main`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import subprocess
import time

import numpy as np

CORRECT = 1.0  # pass@k counts a sample as solved when its reward is at least this (the full reward)
SYNTHETIC_SET = "synthetic"
EVAL_PREFIX = "eval/"
# Held-out synthetic prompts come from SyntheticTask(seed = |data.seed| + HELDOUT_SEED_OFFSET), uids
# 0 .. eval.synthetic_prompts - 1. SyntheticTask seeds prompt uid's generator with
# seed * 1_000_003 + uid (Python seeds by the absolute value), so the training stream (seed
# data.seed, uids 0, 1, ...) uses |data.seed * 1_000_003 + uid|; it would reach the held-out
# generators' seeds only after 2**40 * 1_000_003 (about 1e18) prompts, for any data.seed, negative
# too. The warm start of the demo (seed 10_000) is far below them as well. Held out as draws: a task
# with few distinct prompts (the demo's 2-3 digits: 1,100) shares digit strings with training.
HELDOUT_SEED_OFFSET = 2**40


# -- the estimators ---------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one prompt with ``c`` correct of ``n`` samples: the probability that
    k of the n samples drawn without replacement hold a correct one, 1 - C(n-c, k) / C(n, k),
    as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i) (no huge binomials)."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"pass_at_k: {name} must be an integer, got {value!r}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k = {k} must be from 1 to n = {n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: c = {c} correct samples must be from 0 to n = {n}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def avg_at_n(rewards) -> float:
    """Mean reward over the samples of each prompt, then over prompts (``rewards``: [prompts, n])."""
    values = np.asarray(rewards, dtype=np.float64)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"avg_at_n: rewards must be [prompts, n] with at least one of each, got shape {values.shape}")
    return float(values.mean(axis=1).mean())


def set_metrics(name: str, rewards, lengths, pass_k) -> dict[str, float]:
    """The metrics of one set from its rewards and response lengths, both [prompts, n]."""
    values = np.asarray(rewards, dtype=np.float64)
    n = values.shape[1] if values.ndim == 2 else 0
    out = {f"{EVAL_PREFIX}{name}/avg@{n}": avg_at_n(values)}
    correct = (values >= CORRECT).sum(axis=1)
    for k in sorted(set(pass_k)):
        out[f"{EVAL_PREFIX}{name}/pass@{k}"] = float(np.mean([pass_at_k(n, int(c), k) for c in correct]))
    out[f"{EVAL_PREFIX}{name}/response_len"] = float(np.mean(lengths))
    return out


# -- the schedule -----------------------------------------------------------------------------


class Schedule:
    """When training evaluates: at the start (step 0, the starting model), after every ``eval.every``
    rollout batches (after the weight sync: the engine holds the batch's weights) and at the end
    (``run.steps`` reached; not after a stop request). Never twice at one step: the trainer skips a
    due evaluation when metrics.jsonl already has an eval row at that step (the end one after a
    periodic one at the same step; a step a resumed run's checkpoint covers, evaluated before that
    checkpoint was written). A resumed run therefore evaluates at the steps an uninterrupted one
    does: the start only at step 0, the periodic ones by the checkpointed rollout-batch count."""

    def __init__(self, ev, total_steps: int):
        self.ev, self.total_steps = ev, total_steps

    @property
    def enabled(self) -> bool:
        return bool(self.ev.sets) or self.ev.synthetic_prompts > 0

    def due(self, moment: str, step: int, batches_done: int) -> bool:
        """Whether ``moment`` ("start", "batch": after a rollout batch and its weight sync, "end")
        calls for an evaluation; ``batches_done`` counts rollout batches trained so far."""
        if not self.enabled:
            return False
        if moment == "start":
            return self.ev.at_start and step == 0
        if moment == "batch":
            return bool(self.ev.every) and batches_done > 0 and batches_done % self.ev.every == 0
        if moment == "end":
            return self.ev.at_end and step >= self.total_steps
        raise ValueError(f"unknown evaluation moment {moment!r}")


def planned_steps(ev, total_steps: int, staleness: int, start_step: int = 0, start_batches: int = 0,
                  evaluated: tuple[int, ...] = ()) -> list[int]:
    """The steps a run evaluates at (as ``Trainer.run`` walks them), from ``start_step`` after
    ``start_batches`` rollout batches (a resume), skipping steps in ``evaluated`` (eval rows the
    resumed run's metrics.jsonl keeps)."""
    schedule, done = Schedule(ev, total_steps), set(evaluated)
    out = []

    def visit(moment, step, batches):
        if schedule.due(moment, step, batches) and step not in done:
            done.add(step)
            out.append(step)

    step, batches = start_step, start_batches
    visit("start", step, batches)
    while step < total_steps:
        step = min(step + staleness, total_steps)
        batches += 1
        visit("batch", step, batches)
    visit("end", step, batches)
    return out


def is_eval_row(row: dict) -> bool:
    return any(key.startswith(EVAL_PREFIX) for key in row)


# -- the sets ---------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalSet:
    name: str
    source: object  # data.PromptSource: the prompts and the training reward
    uids: list[int]  # the set's prompts are source.prompt(uid) for these


def set_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def heldout_synthetic_seed(data_seed: int) -> int:
    return abs(data_seed) + HELDOUT_SEED_OFFSET  # see HELDOUT_SEED_OFFSET


def build_sets(cfg, tokenizer) -> list[EvalSet]:
    """The evaluation sets of ``cfg`` (a validated TrainConfig): each prompt file once, in the order
    of its first epoch, scored as the training data is; or the held-out synthetic prompts."""
    from megatron_vespo.input_files import InputFileError
    from megatron_vespo.train.data import make_prompt_source

    ev, sets = cfg.eval, []
    names = {}
    for path in ev.sets:
        names.setdefault(set_name(path), []).append(path)
    clashes = {name: paths for name, paths in names.items() if len(paths) > 1}
    if clashes:
        raise ValueError(f"eval.sets: sets are named after their files, and these share a name: {clashes}; "
                         "rename or copy one")
    for path in ev.sets:
        try:
            source = make_prompt_source(dataclasses.replace(cfg.data, prompts_file=path), tokenizer)
        except InputFileError as err:
            raise InputFileError(f"eval.sets: {err}") from None
        sets.append(EvalSet(set_name(path), source, list(range(len(source.prompts)))))
    if ev.synthetic_prompts:
        source = make_prompt_source(dataclasses.replace(cfg.data, seed=heldout_synthetic_seed(cfg.data.seed)))
        sets.append(EvalSet(SYNTHETIC_SET, source, list(range(ev.synthetic_prompts))))
    return sets


# -- generation and scoring -------------------------------------------------------------------


def sampling_seed(run_seed: int, name: str, uid: int) -> int:
    """The first sample's seed of prompt ``uid`` of set ``name`` (the client adds the sample number);
    a pure function of its arguments, below 2**56 so the added sample numbers stay within 64 bits."""
    digest = hashlib.sha256(f"eval:{run_seed}:{name}:{uid}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def sampling_params(ev, max_new_tokens: int, seed: int) -> dict:
    from megatron_vespo.rollout.protocol import rollout_sampling_params

    return rollout_sampling_params(max_new_tokens, ev.temperature, ev.top_p, -1, seed)


def evaluate(client, tokenizer, sets: list[EvalSet], ev, seed: int, max_new_tokens: int) -> dict[str, float]:
    """Generate ``ev.n`` samples of every prompt of every set (one request list, so the engine
    batches across sets), score them with each set's reward and return the metrics of every set."""
    prompts, params, owner = [], [], []
    for i, s in enumerate(sets):
        for uid in s.uids:
            prompt = s.source.prompt(uid)
            prompts.append(prompt)
            params.append(sampling_params(ev, max_new_tokens, sampling_seed(seed, s.name, uid)))
            owner.append(i)
    if not prompts:
        return {}
    samples = client.generate_sync([p.input_ids for p in prompts], params, n=ev.n)
    rewards = [[[] for _ in s.uids] for s in sets]
    lengths = [[[] for _ in s.uids] for s in sets]
    first = np.cumsum([0] + [len(s.uids) for s in sets])  # index of each set's first prompt
    for sample in samples:
        i, prompt = owner[sample.index], prompts[sample.index]
        text = tokenizer.decode(sample.response_ids, skip_special_tokens=True) if tokenizer is not None else ""
        row = sample.index - first[i]
        rewards[i][row].append(sets[i].source.reward(sample.response_ids, text, prompt))
        lengths[i][row].append(len(sample.response_ids))
    out = {}
    for i, s in enumerate(sets):
        out.update(set_metrics(s.name, rewards[i], lengths[i], ev.pass_k))
    return out


def max_new_tokens(cfg) -> int:
    return cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens


def describe(metrics: dict[str, float]) -> str:
    """The metrics for the log, set by set: ``name: avg@4 0.512, pass@1 0.453, ...; other: ...``."""
    by_set: dict[str, list[str]] = {}
    for key, value in metrics.items():
        if not key.startswith(EVAL_PREFIX) or key.count("/") != 2:
            continue
        _, name, metric = key.split("/")
        shown = f"{value:.1f}" if metric == "response_len" else f"{value:.3f}"
        by_set.setdefault(name, []).append(f"{metric} {shown}")
    return "; ".join(f"{name}: {', '.join(parts)}" for name, parts in by_set.items())


def summary_line(first: dict, last: dict) -> str:
    """avg@n of every set at the first and the last evaluation of a run (eval rows of metrics.jsonl)."""
    parts = [f"{key.removeprefix(EVAL_PREFIX)} {first[key]:.3f} (step {first['step']}) -> "
             f"{last.get(key, math.nan):.3f} (step {last['step']})"
             for key in first if key.startswith(EVAL_PREFIX) and "/avg@" in key]
    return "; ".join(parts)


# -- megatron-vespo eval ----------------------------------------------------------------------


def add_arguments(parser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a Hugging Face model directory to evaluate")
    which.add_argument("--ckpt", help="a trainer checkpoint RUN/checkpoints/step-K (or a 'convert hf-to-mcore' "
                                      "checkpoint): converted first with 'megatron-vespo convert mcore-to-hf' "
                                      "(a process of its own) into a temporary directory, deleted afterwards; "
                                      "local engine only")
    parser.add_argument("--config", required=True,
                        help="the run's YAML config: its eval section (sets, n, pass_k, sampling), data "
                             "(reward, keys), rollout (engine) and run.seed (the sampling seeds) are used")
    parser.add_argument("--json-out", default=None, help="also write the metrics to this JSON file")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. eval.n=16")


def _check_json_out(path: str | None) -> None:
    if path is None:
        return
    if os.path.isdir(path):
        raise ValueError(f"--json-out {path} is a directory; name a file")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"--json-out {path}: the directory {parent} does not exist")


def _check_model_dir(path: str) -> None:
    from megatron_vespo.input_files import InputFileError

    if not os.path.isdir(path):
        raise InputFileError(f"--model {path} is not a directory (a Hugging Face model directory is needed)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise InputFileError(f"--model {path} has no config.json: not a Hugging Face model directory")


def _convert(ckpt: str, out: str) -> None:
    from megatron_vespo.launcher import log, run_module, worker_environment

    log(f"converting {ckpt} to Hugging Face weights in {out}")
    proc = run_module("megatron_vespo", 1, ["convert", "mcore-to-hf", "--ckpt", ckpt, "--out", out],
                      env=worker_environment(single_thread=False), stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
        reason = reason.removeprefix("megatron-vespo convert: error: ")
        raise ValueError(f"--ckpt {ckpt} could not be converted: {reason}")


def format_table(sets: list[EvalSet], metrics: dict[str, float], n: int, pass_k) -> str:
    columns = [f"avg@{n}"] + [f"pass@{k}" for k in sorted(set(pass_k))] + ["response_len"]
    width = max([len("set")] + [len(s.name) for s in sets])
    lines = [f"{'set':<{width}}  {'prompts':>7}  " + "  ".join(f"{c:>12}" for c in columns)]
    for s in sets:
        cells = []
        for c in columns:
            value = metrics[f"{EVAL_PREFIX}{s.name}/{c}"]
            cells.append(f"{value:>12.1f}" if c == "response_len" else f"{value:>12.4f}")
        lines.append(f"{s.name:<{width}}  {len(s.uids):>7}  " + "  ".join(cells))
    return "\n".join(lines)


def main(args) -> int:
    import json
    import shutil
    import tempfile

    from megatron_vespo.input_files import InputFileError
    from megatron_vespo.launcher import log
    from megatron_vespo.train.config import load_config

    cfg = load_config(args.config, args.overrides)
    _check_json_out(args.json_out)
    if args.ckpt is not None and cfg.rollout.engine != "local":
        raise ValueError(f"--ckpt needs rollout.engine = local (got {cfg.rollout.engine}): SGLang servers generate "
                         "with the weights they hold; convert the checkpoint (megatron-vespo convert mcore-to-hf), "
                         "serve it and pass --model")
    if args.model is not None:
        _check_model_dir(args.model)
        cfg.model.hf_dir = args.model
    elif not os.path.isdir(args.ckpt):
        raise InputFileError(f"--ckpt {args.ckpt} is not a directory (a trainer checkpoint RUN/checkpoints/step-K)")
    elif not cfg.model.hf_dir:
        cfg.model.hf_dir = args.ckpt  # a placeholder for validate(); replaced by the converted directory
    cfg.validate()
    if not Schedule(cfg.eval, cfg.run.steps).enabled:
        raise ValueError(f"{args.config}: nothing to evaluate; give prompt files in eval.sets (data.task = file) "
                         "or a count in eval.synthetic_prompts (data.task = synthetic)")
    workdir = None
    server = None
    try:
        if args.ckpt is not None:
            workdir = tempfile.mkdtemp(prefix="megatron-vespo-eval-")
            cfg.model.hf_dir = os.path.join(workdir, "hf")
            _convert(args.ckpt, cfg.model.hf_dir)
        client, server = _client(cfg, log)
        tokenizer = None
        if cfg.data.task != "synthetic":
            from megatron_vespo.input_files import load_tokenizer

            tokenizer = load_tokenizer(cfg.model.hf_dir)
        sets = build_sets(cfg, tokenizer)
        start = time.perf_counter()
        log(f"evaluating {', '.join(f'{s.name} ({len(s.uids)} prompts)' for s in sets)} x {cfg.eval.n} samples")
        metrics = evaluate(client, tokenizer, sets, cfg.eval, cfg.run.seed, max_new_tokens(cfg))
        seconds = time.perf_counter() - start
    finally:
        if server is not None:
            server.stop()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(format_table(sets, metrics, cfg.eval.n, cfg.eval.pass_k), flush=True)
    log(f"{sum(len(s.uids) for s in sets) * cfg.eval.n} samples in {seconds:.1f} s")
    if args.json_out is not None:
        report = {"model": args.model, "ckpt": args.ckpt, "config": args.config, "n": cfg.eval.n,
                  "pass_k": sorted(set(cfg.eval.pass_k)), "seed": cfg.run.seed,
                  "prompts": {s.name: len(s.uids) for s in sets}, "metrics": metrics}
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"metrics: {args.json_out}", flush=True)
    return 0


def _client(cfg, log):
    """(rollout client, the local server or None): the local engine on cfg.model.hf_dir, or the
    configured SGLang servers (which generate with whatever weights they hold)."""
    from megatron_vespo.convert.families import load_model_config
    from megatron_vespo.rollout.client import RolloutClient
    from megatron_vespo.train.trainer import start_engine

    r = cfg.rollout
    api_key = r.api_key or None
    _, m = load_model_config(cfg.model.hf_dir)
    server, urls, servers = start_engine(cfg)
    if server is None:
        log(f"SGLang servers {servers}: they generate with the weights they hold; {cfg.model.hf_dir} gives the "
            "tokenizer and vocabulary")
    client = RolloutClient(urls, api_key=api_key, max_concurrency=r.max_concurrency, timeout_s=r.timeout_s,
                           max_attempts=r.max_attempts, vocab_size=m.vocab_size, server_urls=servers)
    return client, server

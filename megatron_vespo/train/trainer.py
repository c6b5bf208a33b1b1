"""``megatron-vespo train``: VESPO RL of an MoE on Megatron-Core with SGLang-protocol rollouts.

The loop, top to bottom (``Trainer.run``):

    for each rollout batch:
        rollout       prompts -> engine (/generate, n samples each) -> responses, engine log-probs,
                      routed experts, weight version                      [global rank 0, broadcast]
        rewards       verifiable reward per response
        advantages    GRPO: (r - group mean) / group std
        pi_old        recompute with Megatron (one forward-only pass), or bypass (engine log-probs)
        N steps       the batch split into N mini-batches (staleness N), one optimizer step each,
                      through the loss hook; metrics per step -> metrics.jsonl, TensorBoard
        weight sync   Megatron -> engine as HF-named buckets; the engine's weight version advances
        eval          every eval.every rollout batches (and at the start and the end): avg@n and
                      pass@k on held-out prompts, a row of its own in metrics.jsonl (evaluation.py)
        checkpoint    at rollout-batch boundaries, every run.save_every optimizer steps
        stop          on SIGTERM/SIGINT or RUN_DIR/STOP: checkpoint at the batch boundary and exit

Async mode: a thread on rank 0 generates the next batches while the trainer trains; at most
``algorithm.max_policy_lag`` (S) batches are generated ahead, so a sample is at most S weight
versions old when trained on; each sample's version and the lag are logged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import queue
import random
import shutil
import sys
import threading
import time

import numpy as np
import torch

from megatron_vespo import comm
from megatron_vespo.batch import Sample
from megatron_vespo.launcher import log
from megatron_vespo.mismatch import routing_agreement
from megatron_vespo.rollout.protocol import rollout_sampling_params
from megatron_vespo.train.config import TrainConfig, load_config
from megatron_vespo.train.dapo import keep_groups, mask_truncated, overlong_penalty
from megatron_vespo.train.stop import StopRequest




@dataclasses.dataclass
class RolloutBatch:
    index: int  # rollout batch number
    first_uid: int  # data position of its first generated prompt
    samples: list  # RolloutSample, ordered by prompt then sample
    rewards: list[float]  # task reward plus the overlong penalty (algorithm.overlong_buffer)
    seconds: float
    # where the data stream continues: after its last generated prompt (dynamic sampling,
    # algorithm.filter_groups, consumes more prompts than the batch keeps)
    next_uid: int
    metrics: dict = dataclasses.field(default_factory=dict)  # logged with every step of the batch


@dataclasses.dataclass
class PreparedBatch:
    """A rollout batch made ready to train on: what every optimizer step of it uses."""
    samples: list[Sample]  # with advantages and pi_old
    routes: list | None  # per-sample routes replayed in training (R3: the engine's, R2: recorded); else None
    policy_lags: list[int]  # weight versions between each sample's generation and this batch's training
    metrics: dict[str, float]  # logged with every step of the batch (e.g. R2's routing agreement)


def group_advantages(rewards: np.ndarray, group_size: int, kind: str, eps: float,
                     std: str = "unbiased") -> np.ndarray:
    """GRPO: (r - group mean) / (group std + eps); ``std`` "unbiased" divides by n - 1 (as
    torch.std in the paper's reference), "population" by n. grpo_mean: r - group mean."""
    groups = rewards.reshape(-1, group_size)
    centred = groups - groups.mean(axis=1, keepdims=True)
    if kind == "grpo":
        centred = centred / (groups.std(axis=1, keepdims=True, ddof=1 if std == "unbiased" else 0) + eps)
    return centred.reshape(-1)


def _read_metrics(path: str) -> list[dict]:
    """The rows of a run's metrics.jsonl. A kill mid-write leaves a partial last line: dropped
    (the checkpoint the run resumes from never covers it); any other bad line is named."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
    rows = []
    for i, (number, line) in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not a metrics row with an integer step")
        except ValueError as err:
            if i == len(lines) - 1 and not line.endswith("\n"):
                log(f"{path}:{number}: a partial last line (the run was killed while writing it), dropped")
                break
            raise ValueError(f"{path}:{number}: {err}; fix or remove the line to resume") from None
        rows.append(row)
    return rows


def mini_batch_ids(n: int, staleness: int, order: str, seed: int) -> list[list[int]]:
    """Sample ids of each of the N mini-batches. "grouped": contiguous blocks in order, so each
    prompt's group stays together (the paper's reference); "shuffled": a seeded permutation."""
    ids = list(range(n)) if order == "grouped" else np.random.default_rng(seed).permutation(n).tolist()
    size = n // staleness
    return [sorted(ids[i:i + size]) for i in range(0, n, size)]


def version_number(version: str | None) -> int:
    """Weight versions are "v<number>"; the engine's initial "default" is version 0."""
    if version and version.startswith("v") and version[1:].isdigit():
        return int(version[1:])
    return 0


class Trainer:
    def __init__(self, cfg: TrainConfig):
        from megatron_vespo.mcore.parallel import Layout, init_distributed
        from megatron_vespo.train.policy import Policy

        m = cfg.model
        init_distributed()
        self.layout = Layout.for_world(torch.distributed.get_world_size(), tp=m.tp, pp=m.pp, vpp=m.vpp, cp=m.cp,
                                       ep=m.ep, etp=m.etp)
        self.cfg = cfg
        self.run_dir = cfg.run.run_dir
        self.policy = Policy(cfg, self.layout)
        cfg.validate(self.policy.dp_size)
        # the KL term's reference: the starting model, frozen, in the same layout (its parameters
        # again in memory; no gradients or optimizer state)
        self.reference = Policy(cfg, self.layout, trainable=False, reuse_process_groups=True) \
            if cfg.algorithm.kl_coef > 0 else None
        self.rank = torch.distributed.get_rank()
        random.seed(cfg.run.seed)
        np.random.seed(cfg.run.seed)
        self.step = 0
        self.batch_index = 0
        self.data_pos = 0
        self.version = 0
        # set up by setup(); the engine side (server, control, client) on rank 0 only
        self.source = None  # prompts and rewards
        self.tokenizer = None
        self.server = None  # the in-process local engine's HTTP server
        self.control = None  # control calls to every engine server
        self.client = None  # generation requests
        self.server_infos: list[dict] = []  # /server_info of each SGLang server
        self.sync = None  # weight sync to the engine
        self.metrics_file = None
        self.tensorboard = None
        self.wandb = None
        self.history: list[dict] = []
        self._last_saved = None
        self._eval_sets = None  # held-out evaluation sets, built on rank 0 by the first _evaluate_if_due

    # -- set-up ---------------------------------------------------------------------------------

    def setup(self) -> None:
        from megatron_vespo.train.data import make_prompt_source

        cfg = self.cfg
        if self.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
            cfg.save(os.path.join(self.run_dir, "config.yaml"))
        tokenizer = self._tokenizer()
        self.source = make_prompt_source(cfg.data, tokenizer)
        self.tokenizer = tokenizer
        if cfg.run.resume:
            self._resume()
        if self.rank == 0:
            self._open_logs(truncate_after=self.step)
            self._start_engine()
        self.sync = self._weight_sync()
        if self.version > 0:  # the engine starts from the HF weights: give it the checkpoint's
            self._sync_weights(new_version=False)

    def _resume(self) -> None:
        """Load the newest checkpoint that loads; a broken one (truncated shard, unreadable state)
        is skipped with a warning naming it, and the one before it is used. None at all: a fresh
        start. Only broken ones: an error, before anything is overwritten."""
        from megatron_vespo.train.checkpoints import CheckpointUnreadable, complete_checkpoints

        broken = []
        for checkpoint in complete_checkpoints(self.run_dir):
            try:
                state = self.policy.load(checkpoint)
            except CheckpointUnreadable as err:
                log(f"warning: checkpoint {checkpoint} cannot be loaded: {err}; trying the one before it")
                broken.append(checkpoint)
                continue
            self.step, self.batch_index = state["step"], state["batch_index"]
            self.data_pos, self.version = state["data_pos"], state["version"]
            log(f"resumed from {checkpoint}: step {self.step}, engine weight version v{self.version}")
            return
        if broken:
            raise RuntimeError(f"run.resume: none of the {len(broken)} checkpoints in "
                               f"{os.path.join(self.run_dir, 'checkpoints')} can be loaded (see the warnings above); "
                               "move them away to start afresh")

    def _tokenizer(self):
        if self.cfg.data.task == "synthetic":
            return None
        from megatron_vespo.input_files import load_tokenizer

        return load_tokenizer(self.cfg.model.hf_dir)

    def _start_engine(self) -> None:
        from megatron_vespo.rollout.client import EngineControl, RolloutClient

        r = self.cfg.rollout
        api_key = r.api_key or None
        self.server, urls, servers = start_engine(self.cfg)
        self.control = EngineControl(servers, api_key=api_key)
        if r.engine != "local":
            self.server_infos = self.control.call("/server_info", method="GET", check_success=False)
            self._check_servers()
        m = self.policy.model_cfg
        routing = (m.num_layers, m.moe_router_topk, m.num_experts) if m.num_experts else None
        self.client = RolloutClient(urls, api_key=api_key, max_concurrency=r.max_concurrency, timeout_s=r.timeout_s,
                                    max_attempts=r.max_attempts, vocab_size=m.vocab_size, routing=routing,
                                    server_urls=servers)

    def _check_servers(self) -> None:
        """Refuse SGLang servers that would serve this model wrongly without an error (a version that
        ignores some of its layers), naming the server, its version and the feature."""
        from megatron_vespo.rollout.protocol import unsupported_model_features

        for url, info in zip(self.control.urls, self.server_infos):
            problems = unsupported_model_features(self.policy.hf_config, info.get("version"))
            if problems:
                raise ValueError(f"{url} (SGLang {info.get('version', '?')}) cannot serve {self.cfg.model.hf_dir} "
                                 f"correctly: " + "; ".join(problems))

    def _weight_sync(self):
        from megatron_vespo.rollout.weight_sync import WeightSync

        r = self.cfg.rollout
        dtype = self._engine_dtype()
        return WeightSync(r.weight_sync, self.policy.model_cfg, control=self.control,
                          engine=self.server.engine if self.server is not None else None,
                          bucket_bytes=r.weight_sync_bucket_mb * 2**20, dtype=dtype,
                          hf_config=self.policy.hf_config, disk_dir=r.weight_sync_dir or None,
                          side_files_from=self.cfg.model.hf_dir,
                          backend="gloo" if r.engine == "local" else r.weight_sync_backend,
                          master_address=r.weight_sync_master_address or self._reachable_address(),
                          master_port=r.weight_sync_master_port)

    def _engine_dtype(self) -> torch.dtype:
        """The dtype the engine holds its weights in, so weight syncs send exactly that: the local
        engine's setting, or what every SGLang server reports (/server_info dtype; "auto" is the
        checkpoint's torch_dtype). Servers that disagree are an error."""
        r = self.cfg.rollout
        if r.engine == "local":
            return torch.bfloat16 if r.local_dtype == "bfloat16" else torch.float32
        names = None
        if self.rank == 0:
            names = set()
            for info in self.server_infos:  # read when the engine started (rank 0)
                name = str(info.get("dtype") or "auto")
                if name == "auto":
                    name = str(self.policy.hf_config.get("torch_dtype") or self.policy.hf_config.get("dtype")
                               or "bfloat16")
                names.add({"bf16": "bfloat16", "half": "float16", "float": "float32", "fp32": "float32"}.get(name, name))
            names = sorted(names)
        names = comm.broadcast_object(names)
        if len(names) != 1 or not isinstance(getattr(torch, names[0], None), torch.dtype):
            raise ValueError(f"the rollout servers hold weights in {names}: weight sync needs one floating-point dtype")
        return getattr(torch, names[0])

    def _reachable_address(self) -> str:
        """This host's address on the interface that routes to the first server (remote SGLang
        servers must connect back to it; 127.0.0.1 only works on one machine)."""
        import socket
        from urllib.parse import urlparse

        urls = list(self.cfg.rollout.server_urls) or [self.cfg.rollout.router_url]
        host = urlparse(urls[0]).hostname if urls and urls[0] else None
        if self.cfg.rollout.engine == "local" or not host or host in ("127.0.0.1", "localhost"):
            return "127.0.0.1"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, 9))  # UDP: no packet is sent, only the route is looked up
            return probe.getsockname()[0]

    def _open_logs(self, truncate_after: int) -> None:
        path = os.path.join(self.run_dir, "metrics.jsonl")
        kept = []
        if os.path.exists(path):  # a resumed run keeps what the checkpoint covers, nothing after it
            kept = [row for row in _read_metrics(path) if row["step"] <= truncate_after]
        with open(path, "w") as f:
            for row in kept:
                f.write(json.dumps(row) + "\n")
        self.history = kept
        self.metrics_file = open(path, "a")
        if self.cfg.run.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(os.path.join(self.run_dir, "tensorboard"))
            except ImportError:
                log("tensorboard is not installed: metrics go to metrics.jsonl only")
        if self.cfg.run.wandb_project:
            try:
                import wandb

                self.wandb = wandb.init(project=self.cfg.run.wandb_project, config=self.cfg.to_dict(),
                                        dir=self.run_dir, resume="allow")
            except ImportError:
                log("wandb is not installed: run.wandb_project ignored")

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> dict:
        cfg = self.cfg
        self._evaluate_if_due("start")                                              # held-out eval
        total_batches = math.ceil(cfg.run.steps / cfg.algorithm.staleness)
        producer = None
        if cfg.algorithm.async_rollout and self.rank == 0:
            producer = AsyncProducer(self.generate_batch, self.batch_index, self.data_pos, total_batches,
                                     cfg.algorithm.max_policy_lag)
        progress = self._progress(cfg.run.steps)
        stop = StopRequest(self.run_dir).install()
        try:
            while self.step < cfg.run.steps:
                batch = self._next_batch(producer)                                  # rollout, rewards
                prepared = self._prepare(batch)                                     # advantages, pi_old
                for mini_batch in self._mini_batches(len(prepared.samples)):        # N optimizer steps
                    if self.step >= cfg.run.steps:
                        break
                    metrics = self.policy.train_step(prepared.samples, mini_batch, prepared.routes)
                    self.step += 1
                    self._record(metrics, batch, prepared)
                    if progress is not None:
                        progress.update(1)
                        progress.set_postfix(reward=f"{np.mean(batch.rewards):.3f}")
                self.batch_index += 1
                self.data_pos = batch.next_uid
                self._sync_weights()                                                 # weight sync
                self._evaluate_if_due("batch")                                       # held-out eval
                if self.step < cfg.run.steps and stop.agreed():                      # graceful stop
                    log(f"stop requested ({stop.local_reason() or 'by another rank'}): checkpoint at "
                        f"step {self.step} of {cfg.run.steps}, then exit; resume continues from it")
                    stop.consume(self.rank)
                    break
                if self._checkpoint_due():
                    self.save()                                                      # checkpoint
        finally:
            stop.restore()
            if progress is not None:
                progress.close()
            if producer is not None:
                producer.stop()
        self._evaluate_if_due("end")
        self.save()
        return self.finish()

    # -- evaluation -----------------------------------------------------------------------------

    def _evaluate_if_due(self, moment: str) -> None:
        """Held-out evaluation (``train/evaluation.py``) when its schedule calls for one at ``moment``
        ("start", "batch": after the weight sync, so the engine has the new weights, "end"). Rank 0
        generates and scores, writes a row ``{"step", "eval/..."}`` of its own to metrics.jsonl and
        TensorBoard / W&B, and broadcasts the result, so the other ranks wait for it as for a
        rollout. The sets are built at the first call, before training: a bad file fails at once."""
        from megatron_vespo.train import evaluation

        schedule = evaluation.Schedule(self.cfg.eval, self.cfg.run.steps)
        if not schedule.enabled:
            return
        if self.rank == 0 and self._eval_sets is None:
            self._eval_sets = evaluation.build_sets(self.cfg, self.tokenizer)
        if not schedule.due(moment, self.step, self.batch_index):
            return
        metrics = None
        # never twice at a step: the end after a periodic one; a step the resumed checkpoint covers
        if self.rank == 0 and not any(r["step"] == self.step and evaluation.is_eval_row(r) for r in self.history):
            start = time.perf_counter()
            metrics = evaluation.evaluate(self.client, self.tokenizer, self._eval_sets, self.cfg.eval,
                                          self.cfg.run.seed, evaluation.max_new_tokens(self.cfg))
            row = {"step": self.step, **metrics, "eval/seconds": time.perf_counter() - start}
            self._log_row(row, to_loggers=True)  # every eval, whatever run.log_every
            log(f"eval at step {self.step}: {evaluation.describe(metrics)} ({row['eval/seconds']:.1f} s)")
        comm.broadcast_object(metrics)

    # -- rollout --------------------------------------------------------------------------------

    def _sampling_params(self, uid: int) -> dict:
        r = self.cfg.rollout
        # a pure function of (seed, prompt uid): resuming regenerates the same rollouts
        seed = (self.cfg.run.seed * 1_000_003 + uid * r.group_size) % (2**62)
        return rollout_sampling_params(r.max_new_tokens, r.temperature, r.top_p, r.top_k, seed)

    def generate_batch(self, index: int, first_uid: int) -> RolloutBatch:
        """Rollout batch ``index`` from the prompts at ``first_uid``, with rewards. Rank 0 only; the
        async producer calls it from its thread (it reads the config, the prompt source and the
        engine client, which the training thread does not change).

        ``algorithm.filter_groups`` (DAPO dynamic sampling): groups whose task rewards are all equal
        are dropped and the next prompts of the stream generated, ``prompts_per_batch`` a round,
        until ``prompts_per_batch`` groups are kept, in uid order, at most ``filter_max_rounds``
        extra rounds. Kept groups beyond those of the last round are dropped too: their prompts
        count as consumed, and ``next_uid`` is the uid after the last one generated. Each prompt's
        sampling seed depends on (run.seed, uid) only, so extra rounds are reproducible.
        ``algorithm.overlong_buffer``: the overlong penalty is added to the task reward."""
        r, a = self.cfg.rollout, self.cfg.algorithm
        start = time.perf_counter()
        per_round, size = r.prompts_per_batch, r.group_size
        samples, task = [], []  # of the kept groups
        generated_task = []  # every group generated, for filter/task_mean_generated
        timeouts = self.source.reward_timeouts
        uid, rounds, passed = first_uid, 0, 0
        while True:
            round_samples, round_task = self._rollout_prompts(uid, per_round)
            uid += per_round
            generated_task += round_task
            keep = keep_groups(round_task, size) if a.filter_groups else [True] * per_round
            passed += sum(keep)
            missing = per_round - len(samples) // size
            for group in [g for g, kept in enumerate(keep) if kept][:missing]:
                samples += round_samples[group * size:(group + 1) * size]
                task += round_task[group * size:(group + 1) * size]
            if len(samples) == per_round * size:
                break
            if rounds == a.filter_max_rounds:
                raise ValueError(
                    f"algorithm.filter_groups: after {rounds} extra rounds ({uid - first_uid} prompts from uid "
                    f"{first_uid}) only {len(samples) // size} of rollout.prompts_per_batch = {per_round} groups "
                    "have rewards that differ: the prompts are too easy or too hard for the policy; raise "
                    "algorithm.filter_max_rounds or set algorithm.filter_groups to false")
            rounds += 1
        for position, sample in enumerate(samples):
            sample.index = position // size  # its prompt's position in this batch
        penalties = [overlong_penalty(len(s.response_ids), r.max_new_tokens, a.overlong_buffer,
                                      a.overlong_penalty_factor) for s in samples]
        rewards = [t + p for t, p in zip(task, penalties)]
        # reward calls (code runs, user functions) stopped by data.reward_timeout_s: they scored 0
        metrics = {"reward/timeouts": self.source.reward_timeouts - timeouts}
        if a.overlong_buffer:
            metrics.update({"reward/task_mean": float(np.mean(task)),
                            "reward/overlong_penalty": float(np.mean(penalties))})
        if a.filter_groups:
            # kept_fraction: groups whose rewards differ / groups generated, surplus of the last round included
            metrics.update({"filter/kept_fraction": passed / (uid - first_uid), "filter/rounds": rounds,
                            "filter/task_mean_generated": float(np.mean(generated_task))})
        return RolloutBatch(index, first_uid, samples, rewards, time.perf_counter() - start, next_uid=uid,
                            metrics=metrics)

    def _rollout_prompts(self, first_uid: int, count: int) -> tuple[list, list[float]]:
        """``group_size`` samples of each prompt ``first_uid .. first_uid + count - 1`` (ordered by
        prompt, then sample) and their task rewards."""
        r, a = self.cfg.rollout, self.cfg.algorithm
        prompts = [self.source.prompt(uid) for uid in range(first_uid, first_uid + count)]
        # R3 replays the engine's routes; R2 compares them with its own when asked to
        routed = a.routing_replay == "r3" or a.routing_agreement
        samples = self.client.generate_sync([p.input_ids for p in prompts],
                                            [self._sampling_params(p.uid) for p in prompts],
                                            n=r.group_size, return_routed_experts=routed)
        rewards = []
        for sample in samples:
            prompt = prompts[sample.index]
            text = self.tokenizer.decode(sample.response_ids, skip_special_tokens=True) if self.tokenizer else ""
            rewards.append(self.source.reward(sample.response_ids, text, prompt))
        return samples, rewards

    def _next_batch(self, producer) -> RolloutBatch:
        batch = None
        if self.rank == 0:
            batch = producer.take() if producer is not None else \
                self.generate_batch(self.batch_index, self.data_pos)
        return comm.broadcast_object(batch)

    # -- samples --------------------------------------------------------------------------------

    def _prepare(self, batch: RolloutBatch) -> PreparedBatch:
        a = self.cfg.algorithm
        rewards = np.asarray(batch.rewards, dtype=np.float64)
        advantages = group_advantages(rewards, self.cfg.rollout.group_size, a.advantage, a.advantage_eps,
                                      a.advantage_std)
        samples = [Sample.from_rollout(s, adv) for s, adv in zip(batch.samples, advantages)]
        # DAPO overlong filtering: truncated responses add no gradient; the advantages above still
        # come from every reward of their group, truncated ones included, as in DAPO
        masked = mask_truncated(samples, batch.samples) if a.mask_truncated else None
        engine_routes = [s.routed_experts for s in batch.samples]
        # R3 trains (and computes pi_old) with the engine's routes; R2 records its own in this forward
        routes = engine_routes if a.routing_replay == "r3" else None
        if a.pi_old == "recompute" or a.routing_replay == "r2":
            old, recorded = self.policy.logprobs(samples, replay=routes, record=a.routing_replay == "r2")
            if recorded is not None:
                routes = recorded
            if a.pi_old == "recompute":
                for sample, values in zip(samples, old):
                    sample.old_logprobs = values
        if self.reference is not None:
            ref, _ = self.reference.logprobs(samples)
            for sample, values in zip(samples, ref):
                sample.ref_logprobs = values
        self.policy.validate(samples)
        # the hook reports the token mismatch (mismatch/abs_logp_diff, mismatch/kl_k3) per step
        metrics = dict(batch.metrics)  # the rollout's own (filter/..., reward/...)
        if masked is not None:
            metrics["response/masked_truncated"] = masked
        if a.routing_replay == "r2" and engine_routes[0] is not None:
            metrics["mismatch/routing_agreement"] = routing_agreement(
                engine_routes, routes, self.policy.model_cfg.dense_layers, [len(s.prompt_ids) for s in batch.samples])
        lags = [self.version - version_number(s.weight_version) for s in batch.samples]
        return PreparedBatch(samples, routes, lags, metrics)

    def _mini_batches(self, n: int):
        """The rollout batch (ordered by prompt, then sample) in N = staleness mini-batches."""
        return mini_batch_ids(n, self.cfg.algorithm.staleness, self.cfg.algorithm.mini_batch_order,
                              self.cfg.run.seed + self.batch_index)

    # -- bookkeeping ----------------------------------------------------------------------------

    def _record(self, metrics: dict, batch: RolloutBatch, prepared: PreparedBatch) -> None:
        if self.rank != 0:
            return
        lengths = [len(s.response_ids) for s in batch.samples]
        row = {"step": self.step, "reward/mean": float(np.mean(batch.rewards)),
               "reward/std": float(np.std(batch.rewards)), "response_len/mean": float(np.mean(lengths)),
               "response/stopped": float(np.mean([s.finish_reason == "stop" for s in batch.samples])),
               "rollout/batch": batch.index, "rollout/seconds": batch.seconds, "weight_version": self.version,
               "policy_lag/mean": float(np.mean(prepared.policy_lags)),
               "policy_lag/max": int(np.max(prepared.policy_lags))}
        row.update(prepared.metrics)
        row.update({k: float(v) for k, v in metrics.items()})
        self._log_row(row, to_loggers=self.step % self.cfg.run.log_every == 0)

    def _log_row(self, row: dict, to_loggers: bool) -> None:
        """Rank 0: ``row`` into the history and metrics.jsonl, and when ``to_loggers`` into
        TensorBoard and W&B at ``row["step"]``."""
        self.history.append(row)
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()
        if not to_loggers:
            return
        if self.tensorboard is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tensorboard.add_scalar(key, value, row["step"])
        if self.wandb is not None:
            self.wandb.log(row, step=row["step"])

    def _sync_weights(self, new_version: bool = True) -> None:
        """Send the policy to the engine; a resumed run re-sends the checkpoint's version as is."""
        if new_version:
            self.version += 1
        self.policy.synchronize_parameters()
        report = self.sync.sync(self.policy.chunks, f"v{self.version}")
        if report is not None:
            log(f"weights v{self.version} -> engine ({report.route}): {report.bytes / 2**20:.1f} MiB "
                f"in {report.seconds:.2f} s")

    def _checkpoint_due(self) -> bool:
        every = self.cfg.run.save_every
        return bool(every) and self.step % every == 0 and self.step < self.cfg.run.steps

    def save(self) -> None:
        from megatron_vespo.train.checkpoints import CHECKPOINT_PREFIX

        directory = os.path.join(self.run_dir, "checkpoints", f"{CHECKPOINT_PREFIX}{self.step}")
        if self._last_saved == self.step:
            return
        # written aside and renamed once complete: a kill mid-save never leaves a half checkpoint
        # where resume would look, and a stale one from an earlier run is replaced whole
        partial = directory + ".partial"
        if self.rank == 0 and os.path.exists(partial):
            shutil.rmtree(partial)
        comm.barrier()
        self.policy.save(partial, {"step": self.step, "batch_index": self.batch_index, "data_pos": self.data_pos,
                                   "version": self.version})
        if self.rank == 0:
            if os.path.exists(directory):
                shutil.rmtree(directory)
            os.rename(partial, directory)
        comm.barrier()
        self._last_saved = self.step
        log(f"checkpoint: {directory}")

    def _progress(self, total: int):
        if self.rank != 0:
            return None
        from tqdm import tqdm

        return tqdm(total=total, initial=self.step, desc="train", unit="step", file=sys.stderr)

    def finish(self) -> dict:
        summary = {}
        if self.rank == 0:
            from megatron_vespo.train.evaluation import is_eval_row
            from megatron_vespo.train.plots import plot_run

            if self.cfg.run.plot and self.history:
                summary["plot"] = plot_run(self.history, os.path.join(self.run_dir, "training.png"))
            rewards = [row["reward/mean"] for row in self.history if "reward/mean" in row]  # not eval rows
            evals = [row for row in self.history if is_eval_row(row)]
            if evals:
                summary["eval"] = {"first": evals[0], "last": evals[-1]}
            if rewards:
                window = max(1, len(rewards) // 5)
                summary.update(steps=self.step, reward_start=float(np.mean(rewards[:window])),
                               reward_end=float(np.mean(rewards[-window:])))
            if self.history:
                with open(os.path.join(self.run_dir, "summary.json"), "w") as f:
                    json.dump(summary, f, indent=1)
            if self.metrics_file:
                self.metrics_file.close()
            if self.tensorboard is not None:
                self.tensorboard.close()
        return summary

    def close(self) -> None:
        if self.sync is not None:
            self.sync.close()
        if self.server is not None:
            self.server.stop()
            self.server = None


def start_engine(cfg: TrainConfig):
    """(the local server or None, generation URLs, server URLs): the local engine on
    ``model.hf_dir`` started in this process, or the configured SGLang servers once healthy."""
    from megatron_vespo.rollout.client import wait_until_healthy

    r = cfg.rollout
    api_key = r.api_key or None
    if r.engine == "local":
        from megatron_vespo.rollout.serve_local import LocalServer

        server = LocalServer(cfg.model.hf_dir, port=r.local_port, api_key=api_key, dtype=r.local_dtype,
                             seed=cfg.run.seed, max_batch=r.local_max_batch).start()
        log(f"local engine ({r.local_dtype}) serving {cfg.model.hf_dir} on {server.url}")
        return server, [server.url], [server.url]
    servers = list(r.server_urls)
    urls = [r.router_url] if r.router_url else servers
    try:
        wait_until_healthy(sorted(set(urls + servers)), timeout_s=min(r.timeout_s, 120), api_key=api_key)
    except TimeoutError as err:
        raise ConnectionError(f"rollout engine unreachable: {err}") from None
    return None, urls, servers


class AsyncProducer:
    """Generates rollout batches ahead of training on a thread of rank 0; at most ``max_ahead``
    (algorithm.max_policy_lag) batches ahead, so a sample is at most that many versions old."""

    def __init__(self, generate, first_index: int, first_uid: int, total_batches: int, max_ahead: int):
        self.generate = generate  # (batch index, first prompt uid) -> RolloutBatch
        self.permits = threading.Semaphore(max_ahead)
        self.ready: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, args=(first_index, first_uid, total_batches),
                                       daemon=True, name="rollout")
        self.thread.start()

    def _loop(self, index: int, uid: int, total_batches: int) -> None:
        while index < total_batches and not self.stopping.is_set():
            self.permits.acquire()
            if self.stopping.is_set():
                break
            try:
                batch = self.generate(index, uid)
            except BaseException as err:  # handed to the training thread, which raises it
                self.ready.put(err)
                return
            uid = batch.next_uid  # dynamic sampling may consume more prompts than a batch keeps
            self.ready.put(batch)
            index += 1

    def take(self) -> RolloutBatch:
        item = self.ready.get()
        if isinstance(item, BaseException):
            raise RuntimeError(f"rollout failed: {item}") from item
        self.permits.release()  # the next batch may start: it will be at most S versions old
        return item

    def stop(self) -> None:
        self.stopping.set()
        self.permits.release()
        self.thread.join(timeout=60)


# -- command line ---------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="YAML config (see examples/configs/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. algorithm.staleness=4")


def main(args) -> int:
    cfg = load_config(args.config, args.overrides).validate()  # fail before starting anything
    m = cfg.model
    needed = m.tp * m.pp * m.cp
    if "WORLD_SIZE" not in os.environ and needed > 1:
        raise ValueError(f"the layout needs at least {needed} processes: run under torchrun "
                         f"(torchrun --nproc-per-node N -m megatron_vespo train --config ...)")
    return run_training(cfg)


def run_training(cfg: TrainConfig) -> int:
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        summary = trainer.run()
    finally:
        trainer.close()
    if trainer.rank == 0:
        if summary.get("reward_start") is not None:
            print(f"reward: {summary['reward_start']:.3f} (first steps) -> {summary['reward_end']:.3f} "
                  f"(last steps) over {summary['steps']} optimizer steps", flush=True)
        if summary.get("eval"):
            from megatron_vespo.train.evaluation import summary_line

            print(f"held-out eval: {summary_line(summary['eval']['first'], summary['eval']['last'])}", flush=True)
        if summary.get("plot"):
            print(f"plot: {summary['plot']}", flush=True)
        print(f"run directory: {os.path.abspath(trainer.run_dir)}", flush=True)
    comm.barrier()
    torch.distributed.destroy_process_group()
    return 0

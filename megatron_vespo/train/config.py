"""The trainer's typed configuration: dataclasses loaded from YAML plus ``key=value`` overrides.

Every key is checked: an unknown key (in the file or an override) is an error naming it and the
keys that do exist, a value of the wrong type is an error naming the key, and cross-field rules
(batch sizes that must divide, an engine that needs URLs) are checked in ``validate``. The
resolved config is saved with every run (``run_dir/config.yaml``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field

import yaml

from megatron_vespo import ranges
from megatron_vespo.input_files import InputFileError, read_yaml, yaml_problem
from megatron_vespo.losses import LossConfig
from megatron_vespo.train.rewards import is_function_path
from megatron_vespo.train.tasks import SYNTHETIC_TASKS


@dataclass
class ModelSection:
    hf_dir: str = ""  # Hugging Face checkpoint the policy starts from (also the engine's model)
    tp: int = 1  # tensor parallel size (sequence parallel on when > 1)
    pp: int = 1  # pipeline parallel size
    vpp: int = 1  # virtual pipeline chunks per pipeline rank (interleaved schedule)
    cp: int = 1  # context parallel size
    ep: int = 1  # expert parallel size
    etp: int = 1  # expert tensor parallel size
    params_dtype: str = "float32"  # float32 | bfloat16
    recompute: bool = False  # full activation recompute (routing replay replays during it too)


@dataclass
class DataSection:
    task: str = "synthetic"  # synthetic | file
    synthetic_task: str = "reverse"  # see megatron_vespo.train.tasks.SYNTHETIC_TASKS
    synthetic_min_digits: int = 2  # synthetic prompts: fewest digits
    synthetic_max_digits: int = 6  # synthetic prompts: most digits
    prompts_file: str = ""  # .jsonl or .parquet for task=file
    prompt_key: str = "prompt"  # column holding the prompt (string or chat messages; dotted for struct columns)
    answer_key: str = "answer"  # column holding the reference answer (string)
    # synthetic | math (math-verify on the last \boxed{}) | math_full (math-verify over the whole
    # response, the paper's reference) | code (tasks.code_reward on the prompt's tests) | package.module:function
    # (any callable reward(response_text, prompt_text, metadata) -> float; see train/rewards.py)
    reward: str = "synthetic"
    reward_timeout_s: float = 30.0  # a reward call that runs longer scores 0 and is counted (reward/timeouts)
    tests_key: str = "tests"  # code reward: column holding the tests (list of {"input", "output"})
    max_prompt_tokens: int = 512  # longer prompts are skipped (counted and warned about)
    apply_chat_template: bool = False  # plain-string prompts through the tokenizer's chat template
    seed: int = 1  # seeds the prompt stream's epoch shuffles


@dataclass
class RolloutSection:
    engine: str = "local"  # local (started by the trainer) | sglang (URLs below)
    router_url: str = ""  # sglang: /generate goes here (or to the servers when empty)
    server_urls: list = field(default_factory=list)  # sglang: control calls go to each server
    api_key: str = ""  # sent as 'Authorization: Bearer' to servers and router (SGLang --api-key)
    local_dtype: str = "bfloat16"  # the local engine's dtype (bf16 vs an fp32 trainer: real mismatch)
    local_port: int = 0  # the local engine's HTTP port (0: a free port)
    local_max_batch: int = 64  # 1: requests one at a time, so fp32 rollouts are bitwise reproducible
    prompts_per_batch: int = 8  # prompts per rollout batch
    group_size: int = 8  # samples per prompt (GRPO group)
    max_new_tokens: int = 32  # response length limit per sample
    temperature: float = 1.0  # sampling temperature (the trainer's log-probs use the same)
    top_p: float = 1.0  # nucleus sampling (1: off)
    top_k: int = -1  # top-k sampling (-1: off)
    max_concurrency: int = 64  # /generate requests in flight at once
    timeout_s: float = 600.0  # per request (and health waits); a timed-out request is retried
    max_attempts: int = 3  # tries per request before the rollout fails (on the next URL each time)
    weight_sync: str = "distributed"  # distributed | disk | inprocess (local engine only) | tensor
    weight_sync_backend: str = "nccl"  # nccl on clusters; gloo for the local engine
    weight_sync_bucket_mb: int = 512  # size of one weight-sync bucket of HF-named tensors
    weight_sync_dir: str = ""  # disk route: where checkpoints for the engine go
    # distributed route: the address the servers use to reach trainer rank 0 ("" = the local
    # address of the interface that routes to the first server)
    weight_sync_master_address: str = ""
    weight_sync_master_port: int = 0  # 0: a free port


@dataclass
class AlgorithmSection:
    loss: LossConfig = field(default_factory=LossConfig)
    staleness: int = 1  # N: optimizer steps per rollout batch (rollout batch / mini-batch)
    micro_batch_size: int = 0  # sequences per micro-batch (0: the whole mini-batch per data rank)
    # tokens per micro-batch before CP slicing (0: off, micro_batch_size decides); micro-batches are
    # packed to it (THD), balanced over data ranks by tokens, as many on every rank. The paper's
    # reference (verl's dynamic batching) counts ppo_max_token_len_per_gpu per GPU: that times model.cp
    max_tokens_per_micro_batch: int = 0
    advantage: str = "grpo"  # grpo: (r - mean) / std in the group | grpo_mean: r - mean
    advantage_eps: float = 1e-6  # added to the group std in grpo advantages
    # grpo: the group's std. unbiased (n - 1, torch.std: the paper's reference) | population (n)
    advantage_std: str = "unbiased"
    # how a rollout batch becomes N mini-batches: grouped (contiguous, in order, each prompt's group
    # together: the paper's reference) | shuffled (single samples shuffled across mini-batches)
    mini_batch_order: str = "grouped"
    pi_old: str = "recompute"  # recompute (Megatron forward before the N steps) | bypass (engine's)
    routing_replay: str = "none"  # none | r2 (record in the pi_old forward) | r3 (engine's routes)
    # r2: also ask the engine for its routes and log mismatch/routing_agreement (heavy on a large
    # MoE: [tokens, layers, top_k] per sample; the servers need --enable-return-routed-experts)
    routing_agreement: bool = False
    async_rollout: bool = False  # generate the next rollout batches while training (bounded by max_policy_lag)
    max_policy_lag: int = 1  # S: async mode, samples at most S weight versions old
    # KL penalty to the reference policy (the starting model, frozen, scored in the same layout):
    # kl_coef x the estimator per token, aggregated as the policy loss (0: no reference model)
    kl_coef: float = 0.0
    kl_estimator: str = "k3"  # k1: log(pi/ref) | k2: (log(pi/ref))^2 / 2 | k3: ref/pi - log(ref/pi) - 1
    entropy_coef: float = 0.0  # entropy bonus: minus entropy_coef x the token entropy, aggregated as the loss
    # DAPO dynamic sampling: drop groups whose rewards are all equal (no advantage) and generate
    # more prompts until the rollout batch is full, at most filter_max_rounds extra rounds
    filter_groups: bool = False
    filter_max_rounds: int = 10  # extra generation rounds per rollout batch before giving up (an error)
    # DAPO overlong reward shaping: a response longer than rollout.max_new_tokens - overlong_buffer
    # loses overlong_penalty_factor x (excess / overlong_buffer), at most the factor (0: off)
    overlong_buffer: int = 0
    overlong_penalty_factor: float = 1.0  # the penalty at rollout.max_new_tokens
    mask_truncated: bool = False  # responses cut at rollout.max_new_tokens add no gradient (DAPO overlong filtering)


@dataclass
class OptimizerSection:
    lr: float = 1e-5  # Adam learning rate (peak, after warmup)
    min_lr: float = 0.0  # cosine decay floor (0 or lr: constant)
    warmup_steps: int = 0  # linear warmup from 0 over this many optimizer steps
    weight_decay: float = 0.0  # decoupled weight decay
    adam_beta1: float = 0.9  # Adam beta1
    adam_beta2: float = 0.999  # Adam beta2
    adam_eps: float = 1e-8  # Adam epsilon
    clip_grad: float = 1.0  # global gradient-norm clip
    # Megatron's distributed optimizer: Adam's state and master weights sharded over data
    # parallelism (null: on when dp > 1)
    distributed: bool | None = None
    overlap_grad_reduce: bool = False  # distributed optimizer: reduce-scatter gradients during the backward
    overlap_param_gather: bool = False  # distributed optimizer: all-gather updated weights during the next forward
    cpu_offload: bool = False  # distributed optimizer on GPUs: state and step on the host (HybridDeviceOptimizer)


@dataclass
class EvalSection:
    # rollout batches between evaluations (0: none during the run; start and end still as below)
    every: int = 0
    at_start: bool = True  # evaluate the starting model (when any set is given)
    at_end: bool = True  # evaluate the final model
    # held-out prompt files (.jsonl / .parquet as tools/prepare_data.py writes them, with
    # data.prompt_key / data.answer_key); a set is named after its file (aime24.jsonl -> aime24)
    sets: list = field(default_factory=list)
    synthetic_prompts: int = 0  # data.task = synthetic: this many held-out prompts (a seed the training stream never uses)
    n: int = 4  # samples per prompt: avg@n and pass@k (k <= n)
    pass_k: list = field(default_factory=lambda: [1])  # k of pass@k (the unbiased estimator)
    temperature: float = 1.0  # sampling temperature of the evaluation
    top_p: float = 1.0  # nucleus sampling of the evaluation
    max_new_tokens: int = 0  # 0: rollout.max_new_tokens


@dataclass
class RunSection:
    run_dir: str = "runs/run"  # metrics, plots, TensorBoard logs and checkpoints go here
    steps: int = 20  # optimizer steps in total
    seed: int = 1234  # model-parallel RNG, sampling seeds and mini-batch shuffles
    save_every: int = 0  # optimizer steps between checkpoints (0: only at the end)
    resume: bool = True  # continue from run_dir's latest checkpoint when there is one
    log_every: int = 1  # TensorBoard / W&B every this many steps (metrics.jsonl gets every step)
    tensorboard: bool = True  # write TensorBoard logs to run_dir/tensorboard
    wandb_project: str = ""  # log to Weights & Biases when set (needs wandb installed)
    plot: bool = True  # write run_dir/training.png at the end


# The range of every numeric key, in interval notation (see megatron_vespo.ranges; docs/CONFIG.md
# shows it in the key's row). TrainConfig.validate checks each; a value outside, NaN or an infinity
# is an error naming the key. Not here: data.seed (any integer seeds the prompt stream).
BOUNDS = {
    "model.tp": "[1, inf)",
    "model.pp": "[1, inf)",
    "model.vpp": "[1, inf)",
    "model.cp": "[1, inf)",
    "model.ep": "[1, inf)",
    "model.etp": "[1, inf)",
    "data.synthetic_min_digits": "[1, inf)",
    "data.synthetic_max_digits": "[1, inf)",
    "data.max_prompt_tokens": "[1, inf)",
    "rollout.local_port": "[0, 65535]",
    "rollout.local_max_batch": "[1, inf)",
    "rollout.prompts_per_batch": "[1, inf)",
    "rollout.group_size": "[2, inf)",  # group advantages of one sample are all 0
    "rollout.max_new_tokens": "[1, inf)",
    "rollout.temperature": "(0, inf)",
    "rollout.top_p": "(0, 1]",
    "rollout.top_k": "[-1, inf)",  # and not 0
    "rollout.max_concurrency": "[1, inf)",
    "rollout.timeout_s": "(0, inf)",
    "rollout.max_attempts": "[1, inf)",
    "rollout.weight_sync_bucket_mb": "[1, inf)",
    "rollout.weight_sync_master_port": "[0, 65535]",
    "algorithm.staleness": "[1, inf)",
    "algorithm.micro_batch_size": "[0, inf)",  # 0: the whole mini-batch
    "algorithm.max_tokens_per_micro_batch": "[0, inf)",  # 0: off
    "algorithm.advantage_eps": "(0, inf)",  # grpo divides by std + eps; a group of equal rewards has std 0
    "algorithm.max_policy_lag": "[1, inf)",
    "algorithm.kl_coef": "[0, inf)",
    "algorithm.entropy_coef": "[0, inf)",
    "algorithm.filter_max_rounds": "[0, inf)",
    "algorithm.overlong_buffer": "[0, inf)",  # 0: off
    "algorithm.overlong_penalty_factor": "[0, inf)",
    "data.reward_timeout_s": "(0, inf)",
    "eval.every": "[0, inf)",  # 0: only at the start and the end
    "eval.synthetic_prompts": "[0, inf)",
    "eval.n": "[1, inf)",
    "eval.temperature": "(0, inf)",
    "eval.top_p": "(0, 1]",
    "eval.max_new_tokens": "[0, inf)",  # 0: rollout.max_new_tokens
    "optimizer.lr": "(0, inf)",  # 0 trains nothing
    "optimizer.min_lr": "[0, inf)",
    "optimizer.warmup_steps": "[0, inf)",
    "optimizer.weight_decay": "[0, inf)",
    "optimizer.adam_beta1": "[0, 1)",
    "optimizer.adam_beta2": "[0, 1)",
    "optimizer.adam_eps": "(0, inf)",  # 0 divides 0 by 0 for a parameter without gradient yet
    "optimizer.clip_grad": "(0, inf)",  # Megatron-Core reads <= 0 as "no clipping" and logs grad_norm 0
    "run.steps": "[1, inf)",
    "run.seed": "[0, 4294967295]",  # numpy's global seed
    "run.save_every": "[0, inf)",  # 0: only at the end
    "run.log_every": "[1, inf)",
}


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    algorithm: AlgorithmSection = field(default_factory=AlgorithmSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    eval: EvalSection = field(default_factory=EvalSection)
    run: RunSection = field(default_factory=RunSection)

    @property
    def rollout_samples(self) -> int:
        return self.rollout.prompts_per_batch * self.rollout.group_size

    @property
    def mini_batch_samples(self) -> int:
        return self.rollout_samples // self.algorithm.staleness

    def _get(self, key: str):
        value = self
        for part in key.split("."):
            value = getattr(value, part)
        return value

    def distributed_optimizer(self, data_parallel_size: int) -> bool:
        """Whether the run uses Megatron's distributed optimizer (null: when dp > 1)."""
        chosen = self.optimizer.distributed
        return data_parallel_size > 1 if chosen is None else chosen

    def validate(self, data_parallel_size: int = 1) -> "TrainConfig":
        r, a, m, d, o = self.rollout, self.algorithm, self.model, self.data, self.optimizer
        choices = {"rollout.engine": (r.engine, ("local", "sglang")),
                   "rollout.weight_sync": (r.weight_sync, ("distributed", "disk", "inprocess", "tensor")),
                   "rollout.weight_sync_backend": (r.weight_sync_backend, ("nccl", "gloo")),
                   "rollout.local_dtype": (r.local_dtype, ("bfloat16", "float32")),
                   "model.params_dtype": (m.params_dtype, ("bfloat16", "float32")),
                   "algorithm.advantage": (a.advantage, ("grpo", "grpo_mean")),
                   "algorithm.advantage_std": (a.advantage_std, ("unbiased", "population")),
                   "algorithm.mini_batch_order": (a.mini_batch_order, ("grouped", "shuffled")),
                   "algorithm.pi_old": (a.pi_old, ("recompute", "bypass")),
                   "algorithm.routing_replay": (a.routing_replay, ("none", "r2", "r3")),
                   "algorithm.kl_estimator": (a.kl_estimator, ("k1", "k2", "k3")),
                   "data.task": (d.task, ("synthetic", "file"))}
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{key} = {value!r}; choose one of {list(allowed)}")
        if not m.hf_dir:
            raise ValueError("model.hf_dir is required (the Hugging Face checkpoint to train)")
        if not self.run.run_dir:  # "" would scatter metrics and checkpoints over the working directory
            raise ValueError("run.run_dir is required (metrics, plots and checkpoints go there)")
        # before the generic range check, to say why: both advantage kinds subtract the group mean
        # (grpo also divides by the group std, NaN for one sample), so one sample gives 0 everywhere
        if r.group_size < 2:
            raise ValueError(f"rollout.group_size = {r.group_size}: group advantages need at least 2 samples per "
                             "prompt (with 1, every advantage is 0 and nothing is learned)")
        for key, interval in BOUNDS.items():
            ranges.check(key, self._get(key), interval)
        if r.top_k == 0:
            raise ValueError("rollout.top_k = 0: every /generate would be refused (SGLang's top_k is -1 for off, "
                             "or a count >= 1)")
        if d.synthetic_min_digits > d.synthetic_max_digits:
            raise ValueError(f"data.synthetic_min_digits = {d.synthetic_min_digits} is more than "
                             f"data.synthetic_max_digits = {d.synthetic_max_digits}")
        if d.task == "synthetic" and d.synthetic_task not in SYNTHETIC_TASKS:
            raise ValueError(f"data.synthetic_task = {d.synthetic_task!r}; choose one of {sorted(SYNTHETIC_TASKS)}")
        if d.reward not in ("synthetic", "math", "math_full", "code") and not is_function_path(d.reward):
            raise ValueError(f"data.reward = {d.reward!r}; choose one of ['synthetic', 'math', 'math_full', 'code'] or name a "
                             "function as package.module:function")
        if (d.task == "synthetic") != (d.reward == "synthetic"):
            needed = "synthetic" if d.task == "synthetic" else "math, code or package.module:function"
            raise ValueError(f"data.task = {d.task} needs data.reward = {needed} (got {d.reward!r}): synthetic "
                             "answers are token ids, file answers strings")
        ev = self.eval
        bad_k = [k for k in ev.pass_k if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= ev.n]
        if bad_k:
            raise ValueError(f"eval.pass_k = {list(ev.pass_k)}: each k must be an integer from 1 to eval.n = {ev.n}")
        if ev.synthetic_prompts and d.task != "synthetic":
            raise ValueError(f"eval.synthetic_prompts = {ev.synthetic_prompts} needs data.task = synthetic; "
                             "give held-out prompt files in eval.sets")
        if ev.sets and d.task != "file":
            raise ValueError("eval.sets are prompt files scored with data.reward; they need data.task = file "
                             "(use eval.synthetic_prompts for the synthetic task)")
        bad_sets = [f for f in ev.sets if not isinstance(f, str) or not f]
        if bad_sets:
            raise ValueError(f"eval.sets takes prompt file paths, got {bad_sets}")
        if a.overlong_buffer >= r.max_new_tokens:
            raise ValueError(f"algorithm.overlong_buffer = {a.overlong_buffer} must be below rollout.max_new_tokens = "
                             f"{r.max_new_tokens}: the penalty starts max_new_tokens - overlong_buffer tokens in")
        if a.kl_coef > 0 and a.routing_replay != "none":
            raise ValueError(f"algorithm.kl_coef = {a.kl_coef} with algorithm.routing_replay = {a.routing_replay}: "
                             "the reference model's routes are not replayed; use routing_replay = none with a KL term")
        wanted = [k for k in ("overlap_grad_reduce", "overlap_param_gather", "cpu_offload") if getattr(o, k)]
        if wanted and o.distributed is False:  # left null, the Policy checks it once dp is known
            raise ValueError(f"optimizer.{wanted[0]} needs the distributed optimizer; optimizer.distributed is false")
        if o.min_lr > o.lr:
            raise ValueError(f"optimizer.min_lr = {o.min_lr} is above optimizer.lr = {o.lr}: the cosine decays "
                             "from lr down to min_lr")
        urls = list(r.server_urls) + ([r.router_url] if r.router_url else [])
        bad = [u for u in urls if not (isinstance(u, str) and u.startswith(("http://", "https://")))]
        if bad:
            raise ValueError(f"rollout.server_urls and rollout.router_url take http:// or https:// URLs, got {bad}")
        if self.rollout_samples % a.staleness:
            raise ValueError(f"algorithm.staleness = {a.staleness} does not divide the rollout batch of "
                             f"{self.rollout_samples} samples (rollout.prompts_per_batch x rollout.group_size)")
        if self.mini_batch_samples % data_parallel_size:
            raise ValueError(f"the mini-batch of {self.mini_batch_samples} samples does not divide over "
                             f"{data_parallel_size} data-parallel ranks")
        if a.max_tokens_per_micro_batch and a.micro_batch_size:
            raise ValueError(f"algorithm.max_tokens_per_micro_batch = {a.max_tokens_per_micro_batch} and "
                             f"algorithm.micro_batch_size = {a.micro_batch_size}: the token budget forms the "
                             "micro-batches; set micro_batch_size = 0")
        if a.max_tokens_per_micro_batch:  # a full-length response must fit (prompts vary, responses hit the limit)
            multiple = (2 * m.cp if m.cp > 1 else 1) * m.tp
            shortest = -(-(r.max_new_tokens + 1) // multiple) * multiple  # after a one-token prompt, padded for CP/TP
            if shortest > a.max_tokens_per_micro_batch:
                raise ValueError(f"algorithm.max_tokens_per_micro_batch = {a.max_tokens_per_micro_batch} cannot hold a "
                                 f"response of rollout.max_new_tokens = {r.max_new_tokens} tokens ({shortest} with a "
                                 "one-token prompt, padded for model.cp and model.tp); raise the budget")
        per_rank = self.mini_batch_samples // data_parallel_size
        if a.micro_batch_size and per_rank % a.micro_batch_size:
            raise ValueError(f"algorithm.micro_batch_size = {a.micro_batch_size} does not divide the "
                             f"{per_rank} samples each data-parallel rank gets per mini-batch")
        if self.run.save_every and self.run.save_every % a.staleness:
            raise ValueError(f"run.save_every = {self.run.save_every} must be a multiple of algorithm.staleness = "
                             f"{a.staleness}: checkpoints are taken between rollout batches")
        if a.routing_agreement and a.routing_replay != "r2":
            raise ValueError(f"algorithm.routing_agreement compares the engine's routes with those R2 records; "
                             f"it needs algorithm.routing_replay = r2 (got {a.routing_replay!r})")
        if r.engine == "sglang" and not r.server_urls:
            # every weight sync route (disk too) pauses, updates and resumes each server itself
            raise ValueError("rollout.engine = sglang needs rollout.server_urls: weight updates, pause and "
                             "continue go to every server directly (the router routes /generate only)")
        if r.weight_sync == "inprocess" and r.engine != "local":
            raise ValueError("rollout.weight_sync = inprocess works only with the local engine")
        if r.weight_sync == "disk" and not r.weight_sync_dir:
            raise ValueError("rollout.weight_sync = disk needs rollout.weight_sync_dir")
        if a.pi_old == "bypass" and a.loss.correction != "none":
            raise ValueError("algorithm.pi_old = bypass uses the engine's log-probs as pi_old, so a mismatch "
                             f"correction ({a.loss.correction}) has nothing to correct; set loss.correction = none")
        if d.task == "file" and not d.prompts_file:
            raise ValueError("data.task = file needs data.prompts_file (.jsonl or .parquet)")
        try:
            a.loss = dataclasses.replace(a.loss, bypass=(a.pi_old == "bypass"), temperature=r.temperature,
                                         kl_coef=a.kl_coef, kl_estimator=a.kl_estimator,
                                         entropy_coef=a.entropy_coef).validate()
        except ValueError as err:  # LossConfig names its fields; say which section they are in
            raise ValueError(f"algorithm.loss: {err}") from None
        return self

    # -- (de)serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)


def _coerce(value, annotation, key: str):
    """Check/convert a YAML or override value to the field's type; errors name the key."""
    if isinstance(annotation, str):
        annotation = {"int": int, "float": float, "str": str, "bool": bool, "list": list,
                      "float | None": typing.Optional[float],
                      "bool | None": typing.Optional[bool]}.get(annotation, annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, options[0], key)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{key} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{key} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{key} must be a string, got {value!r}")
    if annotation is list or origin is list:
        if isinstance(value, list):
            return value
        if isinstance(value, str):  # override: urls=a,b
            return [v for v in value.split(",") if v]
        raise ValueError(f"{key} must be a list, got {value!r}")
    return value


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ValueError(f"{'section ' + prefix.rstrip('.') if prefix else 'the config'} must be a mapping of "
                         f"keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names), key=str)  # YAML keys need not be strings
    if unknown:
        where = f"section {prefix.rstrip('.')}" if prefix else "the top level"
        raise ValueError(f"unknown config key(s) {[f'{prefix}{u}' for u in unknown]} in {where}; "
                         f"known: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            # an empty section (`model:`) keeps the defaults; `model: 0` or `model: []` is an error
            kwargs[name] = _build(hint, {} if value is None else value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


def _parse_override(text: str):
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ValueError(f"override {text!r}: the value is not valid YAML ({yaml_problem(err)}); quote it, "
                         f"e.g. {key}=\"'{raw}'\"") from None
    return key.strip(), value


def load_config(path: str | None, overrides: list[str] = ()) -> TrainConfig:
    """YAML file (or none) plus ``section.key=value`` overrides -> TrainConfig (not yet validated)."""
    data: dict = {}
    if path:
        data = read_yaml(path, "config file")
        if data is None:  # an empty file (or only comments): all defaults
            data = {}
        if not isinstance(data, dict):
            raise InputFileError(f"config file {path} must be a YAML mapping of sections, got "
                                 f"{type(data).__name__}")
    for text in overrides:
        key, value = _parse_override(text)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if node.get(part) is None:  # absent, or an empty section in the file
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ValueError(f"override {text!r}: {part} is not a section")
        node[parts[-1]] = value
    return _build(TrainConfig, data)

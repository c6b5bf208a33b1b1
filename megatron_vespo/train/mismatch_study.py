"""``megatron-vespo mismatch``: measure the training-inference mismatch of an MoE policy.

1. Rollouts: the engine (SGLang servers, or the local engine started here) samples ``n``
   responses per prompt with routed experts on; each sample keeps the engine's per-token
   log-probs and the experts every token was sent to.            [global rank 0, broadcast]
2. Scoring: the same tokens through the Megatron-Core model in the requested layout (tensor,
   pipeline, virtual pipeline, context, expert parallel), recording the experts its own routers
   choose (``Policy.logprobs(record=True)``); with ``--r3`` a second pass replays the
   engine's experts (``Policy.logprobs(replay=engine_routes)``).
3. Report (``megatron_vespo.mismatch``): per-token |log pi - log mu| distribution, k1/k2/k3
   KL(engine || trainer), sequence log W against response length with the fraction of sequences
   whose VESPO phi(W) is effectively zero, and routing agreement per MoE layer; all of it again
   under R3. ``report.json``, PNG plots and a terminal summary in ``--out``.

On a cluster point ``--engine`` at the SGLang servers themselves, not the router: sglang-router
0.3.2 drops ``return_routed_experts`` from /generate bodies. Real SGLang is not run in this
project's tests; the local engine (bf16 against an fp32 trainer) is.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch

from megatron_vespo import comm, mismatch
from megatron_vespo.launcher import log

SYNTHETIC_PREFIX = "synthetic:"




# -- prompts ------------------------------------------------------------------------------------


def load_prompts(args, vocab_size: int) -> list[list[int]]:
    """Prompt token ids: ``synthetic:<task>``, a .jsonl/.parquet file with an ``input_ids``
    column, or a prompt file the trainer reads (string or chat prompts, tokenized with the model's
    tokenizer)."""
    if args.prompts.startswith(SYNTHETIC_PREFIX):
        from megatron_vespo.train.tasks import SyntheticTask

        task = SyntheticTask(name=args.prompts[len(SYNTHETIC_PREFIX):], seed=args.seed)
        prompts = [task.prompt(uid).input_ids for uid in range(args.num_prompts)]
    else:
        from megatron_vespo.input_files import load_tokenizer
        from megatron_vespo.train.data import PromptFile, read_token_prompts

        prompts = read_token_prompts(args.prompts)
        if prompts is None:
            try:
                tokenizer = load_tokenizer(args.model)
            except ValueError as err:
                raise ValueError(f"{args.prompts} holds text prompts, so they need the model's tokenizer: {err}; "
                                 "or give token ids (an 'input_ids' column)") from None
            file = PromptFile(args.prompts, prompt_key=args.prompt_key, answer_key=args.answer_key,
                              tokenizer=tokenizer, max_prompt_tokens=args.max_prompt_tokens,
                              apply_chat_template=args.apply_chat_template, seed=args.seed)
            prompts = [file.prompt(uid).input_ids for uid in range(min(args.num_prompts, len(file)))]
        prompts = prompts[:args.num_prompts]
    if not prompts:
        raise ValueError(f"{args.prompts}: no prompts")
    for i, ids in enumerate(prompts):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{args.prompts}: prompt {i} has token ids {bad[:5]} outside the vocabulary "
                             f"[0, {vocab_size})")
    return prompts


# -- rollouts -----------------------------------------------------------------------------------


def generate(args, prompts: list[list[int]], m) -> tuple[list, dict]:
    """Engine samples with log-probs and routed experts (rank 0), and facts about the engine."""
    from tqdm import tqdm

    from megatron_vespo.rollout.client import EngineControl, RolloutClient, wait_until_healthy
    from megatron_vespo.rollout.protocol import rollout_sampling_params

    server = None
    api_key = args.api_key or os.environ.get("SGLANG_API_KEY") or None
    if args.engine == "local":
        from megatron_vespo.rollout.serve_local import LocalServer

        server = LocalServer(args.model, dtype=args.engine_dtype, seed=args.seed, api_key=api_key,
                             max_batch=args.max_concurrency).start()
        urls = [server.url]
        log(f"local engine ({args.engine_dtype}) on {server.url}")
    else:
        urls = [u.strip().rstrip("/") for u in args.engine.split(",") if u.strip()]
        wait_until_healthy(urls, timeout_s=120, api_key=api_key)
    try:
        info = EngineControl(urls, api_key=api_key).call("/server_info", method="GET", urls=urls[:1])[0]
        engine = {"urls": urls, "local": server is not None,
                  "dtype": args.engine_dtype if server is not None else info.get("dtype"),
                  "version": info.get("version"), "model_path": info.get("model_path")}
        routing = (m.num_layers, m.moe_router_topk, m.num_experts) if m.num_experts else None
        client = RolloutClient(urls, api_key=api_key, max_concurrency=args.max_concurrency,
                               vocab_size=m.vocab_size, routing=routing)
        params = rollout_sampling_params(args.max_new_tokens, args.temperature, args.top_p, args.top_k)
        per_call = max(1, args.max_concurrency // args.n)
        samples = []
        with tqdm(total=len(prompts) * args.n, desc="rollout", unit="sample", file=sys.stderr) as bar:
            for start in range(0, len(prompts), per_call):
                chunk = prompts[start:start + per_call]
                chunk_params = [{**params, "sampling_seed": args.seed + (start + i) * args.n}
                                for i in range(len(chunk))]
                got = client.generate_sync(chunk, chunk_params, n=args.n, return_routed_experts=routing is not None)
                for s in got:
                    s.index += start
                samples.extend(got)
                bar.update(len(got))
    finally:
        if server is not None:
            server.stop()
    return samples, engine


# -- scoring ------------------------------------------------------------------------------------


def _policy(args, layout):
    from megatron_vespo.losses import LossConfig
    from megatron_vespo.train.config import TrainConfig
    from megatron_vespo.train.policy import Policy

    cfg = TrainConfig()
    cfg.model.hf_dir = args.model
    cfg.model.params_dtype = args.dtype
    cfg.run.seed = args.seed
    cfg.algorithm.micro_batch_size = args.micro_batch_size
    # routing replay is built in whenever the model has experts: "record" gives the trainer's own
    # routes, "replay" forces the engine's (R3)
    cfg.algorithm.routing_replay = "r2"
    cfg.algorithm.loss = LossConfig(temperature=args.temperature).validate()
    from megatron_vespo.convert.families import load_model_config

    if not load_model_config(args.model)[1].num_experts:
        cfg.algorithm.routing_replay = "none"
    return Policy(cfg, layout, trainable=False)


def score(policy, samples, chunk_size: int, desc: str, replay: list | None = None, record: bool = False):
    """Per-sample trainer log-probs and, when ``record``, the trainer's routes, in chunks of
    samples; ``replay``: per-sample routes to route by (R3)."""
    from tqdm import tqdm

    logprobs, routes = [], []
    bar = tqdm(total=len(samples), desc=desc, unit="sample", file=sys.stderr,
               disable=torch.distributed.get_rank() != 0)
    for start in range(0, len(samples), chunk_size):
        chunk = samples[start:start + chunk_size]
        chunk_replay = None if replay is None else replay[start:start + chunk_size]
        values, chosen = policy.logprobs(chunk, replay=chunk_replay, record=record)
        logprobs.extend(values)
        if record:
            routes.extend(chosen)
        bar.update(len(chunk))
    bar.close()
    return logprobs, routes


def run_study(args, layout) -> dict | None:
    from megatron_vespo.batch import Sample

    policy = _policy(args, layout)
    m = policy.model_cfg
    rollouts, engine = None, None
    started = time.perf_counter()
    if torch.distributed.get_rank() == 0:
        prompts = load_prompts(args, m.vocab_size)
        log(f"{len(prompts)} prompts x {args.n} samples, max {args.max_new_tokens} new tokens")
        rollouts, engine = generate(args, prompts, m)
    rollouts, engine = comm.broadcast_object((rollouts, engine))
    rollout_seconds = time.perf_counter() - started

    # whole micro-batches on every data-parallel rank: drop the remainder (said in the report)
    per_step = policy.dp_size * args.micro_batch_size
    kept = len(rollouts) // per_step * per_step
    if kept == 0:
        raise ValueError(f"{len(rollouts)} samples are fewer than data-parallel size {policy.dp_size} x "
                         f"--micro-batch-size {args.micro_batch_size}; lower --micro-batch-size or raise --n")
    dropped = len(rollouts) - kept
    rollouts = rollouts[:kept]
    samples = [Sample.from_rollout(s) for s in rollouts]
    engine_logprobs = [np.asarray(s.engine_logprobs, dtype=np.float64) for s in rollouts]
    engine_routes = [s.routed_experts for s in rollouts]
    chunk_size = per_step * 4
    moe_layers = [layer for layer in range(m.num_layers) if layer not in set(m.dense_layers)] if m.num_experts else []
    prompt_lens = [len(s.prompt_ids) for s in rollouts]
    loss_cfg = policy.loss_cfg

    def pass_report(logprobs, routing) -> dict:
        deltas = mismatch.token_deltas([lp.numpy() for lp in logprobs], engine_logprobs)
        return {"token": mismatch.token_report(deltas),
                "sequence": mismatch.sequence_report(deltas, loss_cfg, n_bins=args.length_bins,
                                                     phi_zero=args.phi_zero),
                "routing": routing}

    passes = {}
    t0 = time.perf_counter()
    logprobs, trainer_routes = score(policy, samples, chunk_size, "score", record=bool(m.num_experts))
    routing = (mismatch.routing_agreement_per_layer(engine_routes, trainer_routes, prompt_lens, moe_layers)
               if m.num_experts else "dense model: no experts")
    passes["no_replay"] = pass_report(logprobs, routing)
    passes["no_replay"]["seconds"] = time.perf_counter() - t0
    if args.r3:
        t0 = time.perf_counter()
        logprobs_r3, _ = score(policy, samples, chunk_size, "score R3", replay=engine_routes)
        passes["r3"] = pass_report(logprobs_r3, "replayed: every token used the engine's experts")
        passes["r3"]["seconds"] = time.perf_counter() - t0
    if torch.distributed.get_rank() != 0:
        return None
    lengths = [len(s.response_ids) for s in rollouts]
    finish = {}
    for s in rollouts:
        finish[s.finish_reason] = finish.get(s.finish_reason, 0) + 1
    return {
        "model": os.path.abspath(args.model), "engine": engine, "layout": str(layout),
        "trainer_dtype": args.dtype, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
        "prompts": len({s.index for s in rollouts}), "samples_per_prompt": args.n, "samples": len(rollouts),
        "samples_dropped": dropped, "response_len_mean": float(np.mean(lengths)), "finish_reasons": finish,
        "rollout_seconds": rollout_seconds, "loss": dataclasses.asdict(loss_cfg),
        "passes": passes,
        "_samples": [{"prompt_ids": s.prompt_ids, "response_ids": s.response_ids, "finish_reason": s.finish_reason,
                      "engine_logprobs": engine_logprobs[i].tolist(), "trainer_logprobs": logprobs[i].tolist(),
                      **({"trainer_logprobs_r3": logprobs_r3[i].tolist()} if args.r3 else {})}
                     for i, s in enumerate(rollouts)],
    }


# -- output -------------------------------------------------------------------------------------


def plot_report(report: dict, out_dir: str) -> list[str]:
    """PNG plots of the passes side by side; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    passes = report["passes"]
    labels = {"no_replay": "trainer's own routing", "r3": "R3: engine routes replayed"}
    colors = {"no_replay": "tab:blue", "r3": "tab:orange"}
    files = []

    fig, (ax, ax_cdf) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, p in passes.items():
        h = p["token"]["histogram"]
        edges, counts = np.asarray(h["edges"]), np.asarray(h["counts"], dtype=float)
        total = max(counts.sum(), 1)
        centres = np.sqrt(np.maximum(edges[:-1], 1e-9) * edges[1:])
        ax.step(centres, counts / total, where="mid", label=labels[name], color=colors[name])
        # the tail decides the sequence weights: fraction of tokens beyond each edge, log-log
        beyond = 1.0 - np.cumsum(counts) / total
        ax_cdf.step(edges[1:], np.where(beyond > 0, beyond, np.nan), where="post", label=labels[name],
                    color=colors[name])
    for a in (ax, ax_cdf):
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xlabel("|log pi_trainer - log mu_engine| per response token")
        a.grid(alpha=0.3)
        a.legend()
    ax.set_ylabel("fraction of tokens")
    ax.set_title("per-token log-prob mismatch")
    ax_cdf.set_ylabel("fraction of tokens with a larger |delta|")
    ax_cdf.set_title(f"{report['samples']} samples, engine {report['engine'].get('dtype')}, "
                     f"trainer {report['trainer_dtype']}")
    fig.tight_layout()
    files.append(os.path.join(out_dir, "token_mismatch.png"))
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    fig, (ax, ax_zero) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, p in passes.items():
        seq = p["sequence"]
        lengths = np.asarray(seq["per_sequence"]["response_len"])
        log_w = np.asarray(seq["per_sequence"]["log_w"])
        ax.scatter(lengths, log_w, s=8, alpha=0.4, color=colors[name], label=labels[name])
        mids = [(b["len_from"] + b["len_to"]) / 2 for b in seq["by_length"]]
        ax.plot(mids, [b["log_w"]["mean"] for b in seq["by_length"]], color=colors[name], lw=2)
        ax_zero.plot(mids, [b["phi_zero_frac"]["adv_pos"] for b in seq["by_length"]], "o-", color=colors[name],
                     label=f"{labels[name]}, A>0")
        ax_zero.plot(mids, [b["phi_zero_frac"]["adv_neg"] for b in seq["by_length"]], "s--", color=colors[name],
                     label=f"{labels[name]}, A<0")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("response length (tokens)")
    ax.set_ylabel("sequence log W = sum log pi/mu")
    ax.set_title("sequence log weight against length (line: bin mean)")
    ax.legend()
    ax.grid(alpha=0.3)
    threshold = next(iter(passes.values()))["sequence"]["phi_zero_threshold"]
    ax_zero.set_xlabel("response length (tokens)")
    ax_zero.set_ylabel(f"fraction with phi(W) < {threshold:g}")
    ax_zero.set_ylim(-0.02, 1.02)
    ax_zero.set_title("VESPO phi effectively zero")
    ax_zero.legend(fontsize=8)
    ax_zero.grid(alpha=0.3)
    fig.tight_layout()
    files.append(os.path.join(out_dir, "log_w_vs_length.png"))
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    routing = passes["no_replay"]["routing"]
    if isinstance(routing, dict):
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(routing["moe_layers"]) + 3), 4))
        x = np.arange(len(routing["moe_layers"]))
        ax.bar(x - 0.2, routing["response"]["exact"], 0.4, label=f"same top-{routing['top_k']} set")
        ax.bar(x + 0.2, routing["response"]["overlap"], 0.4, label="expert overlap")
        ax.set_xticks(x, [str(layer) for layer in routing["moe_layers"]])
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("agreement (response tokens)")
        ax.set_ylim(0, 1.05)
        ax.set_title("engine vs trainer routing (without replay)")
        ax.legend(loc="lower left")
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        files.append(os.path.join(out_dir, "routing_agreement.png"))
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    return files


def summary_text(report: dict) -> str:
    lines = [f"mismatch study: {report['samples']} samples ({report['prompts']} prompts x "
             f"{report['samples_per_prompt']}), engine {report['engine'].get('dtype')} vs trainer "
             f"{report['trainer_dtype']}, layout {report['layout']}"]
    titles = {"no_replay": "without routing replay", "r3": "with R3 routing replay"}
    for name, p in report["passes"].items():
        lines.append(f"-- {titles[name]}")
        lines.extend("   " + line for line in mismatch.summary_lines(p))
    return "\n".join(lines)


def write_outputs(report: dict, out_dir: str) -> list[str]:
    """report.json, samples.jsonl (tokens and all three log-prob arrays, for further analysis)
    and the plots."""
    os.makedirs(out_dir, exist_ok=True)
    report = dict(report)
    samples = report.pop("_samples")
    files = [os.path.join(out_dir, "report.json"), os.path.join(out_dir, "samples.jsonl")]
    with open(files[0], "w") as f:
        json.dump(report, f, indent=1)
    with open(files[1], "w") as f:
        for row in samples:
            f.write(json.dumps(row) + "\n")
    return files + plot_report(report, out_dir)


# -- command line -------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("--engine", required=True,
                        help="'local' (start the local engine on --model) or SGLang server URLs, comma-separated "
                             "(the servers, not the router: the router drops return_routed_experts)")
    parser.add_argument("--model", required=True, help="Hugging Face model directory (the engine's weights)")
    parser.add_argument("--prompts", required=True,
                        help="prompt file (.jsonl/.parquet, as the trainer reads), a .jsonl/.parquet with an 'input_ids' "
                             "column of token ids, or synthetic:<task>")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--r3", action="store_true", help="also score with R3 routing replay (the engine's experts)")
    parser.add_argument("--out", default="runs/mismatch", help="directory for report.json and the plots")
    parser.add_argument("--num-prompts", type=int, default=32, help="at most this many prompts")
    parser.add_argument("--prompt-key", default="prompt")
    parser.add_argument("--answer-key", default="answer")
    parser.add_argument("--max-prompt-tokens", type=int, default=1024)
    parser.add_argument("--apply-chat-template", action="store_true")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--engine-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="the local engine's dtype (bf16 against the fp32 trainer is a real mismatch)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the trainer's dtype")
    parser.add_argument("--api-key", default="", help="SGLang API key (default: $SGLANG_API_KEY)")
    parser.add_argument("--max-concurrency", type=int, default=32)
    parser.add_argument("--micro-batch-size", type=int, default=4, help="sequences per micro-batch when scoring")
    parser.add_argument("--length-bins", type=int, default=6, help="response-length bins of the log W report")
    parser.add_argument("--phi-zero", type=float, default=None,
                        help="phi below this counts as effectively zero (default: the trainer's metric, 1e-6)")
    for key in ("tp", "pp", "vpp", "cp", "ep"):
        parser.add_argument(f"--{key}", type=int, default=1)
    parser.add_argument("--etp", type=int, default=None, help="expert tensor parallel (default: tp)")


def check_args(args, layout) -> None:
    """Bad input fails here, before any process or engine starts."""
    from megatron_vespo.convert.families import load_model_config
    from megatron_vespo.kernel import PHI_ZERO
    from megatron_vespo.train.data import read_token_prompts
    from megatron_vespo.train.tasks import SyntheticTask

    if args.phi_zero is None:
        args.phi_zero = PHI_ZERO
    for name in ("n", "num_prompts", "max_new_tokens", "micro_batch_size", "length_bins", "max_concurrency",
                 "max_prompt_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.temperature < float("inf") or not 0 < args.top_p <= 1:
        raise ValueError(f"need --temperature > 0 and 0 < --top-p <= 1 (got {args.temperature}, {args.top_p})")
    if args.top_k == 0 or args.top_k < -1:
        raise ValueError(f"--top-k must be -1 (off) or >= 1, got {args.top_k}")
    if not 0 < args.phi_zero < 1:
        raise ValueError(f"--phi-zero must lie in (0, 1), got {args.phi_zero}")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise FileNotFoundError(f"--model {args.model}: no config.json (a Hugging Face model directory is needed)")
    m = load_model_config(args.model)[1]
    m.check_layout(layout)
    if args.r3 and not m.num_experts:
        raise ValueError(f"--r3 replays expert routes but {args.model} is a dense model")
    if args.prompts.startswith(SYNTHETIC_PREFIX):
        SyntheticTask(name=args.prompts[len(SYNTHETIC_PREFIX):])  # an unknown task name fails here
    elif not os.path.isfile(args.prompts):
        raise FileNotFoundError(f"--prompts {args.prompts}: no such file")
    else:
        read_token_prompts(args.prompts)  # unreadable or malformed files fail here, named (text prompts: later)
    if args.engine != "local" and not all(u.strip().startswith(("http://", "https://"))
                                          for u in args.engine.split(",")):
        raise ValueError(f"--engine must be 'local' or http(s):// server URLs, got {args.engine!r}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise FileExistsError(f"--out {args.out} exists and is not a directory")


def main(args) -> int:
    from megatron_vespo.launcher import run_distributed

    def body(args, layout):
        check_args(args, layout)  # again on every rank: sets defaults the ranks need
        report = run_study(args, layout)
        if report is not None:
            files = write_outputs(report, args.out)
            print(summary_text(report), flush=True)
            for path in files:
                print(f"wrote {path}", flush=True)

    return run_distributed(args, args.argv, body, precheck=check_args)

#!/usr/bin/env python
"""Staleness study: the CPU demo task for staleness N in {1, 4, 16, 64} x policy losses x seeds.

Every configuration trains the same warm-started tiny Qwen3-MoE (built once, shared through
``model.hf_dir``) on the same number K of rollout batches, so each sees the same prompt stream
and the same number of samples; only the number of optimizer steps per rollout batch changes
(N steps of rollout_batch / N samples each, so steps = K x N). The rollout batch (prompts_per_batch
x group_size) must be divisible by every N; micro-batches follow the mini-batch
(algorithm.micro_batch_size = 0).

Each configuration runs as its own process (``python -m megatron_vespo demo ...``: the trainer
initialises torch.distributed once per process), with its own run directory
OUT/runs/<loss>_N<n>_s<seed>. A run whose summary.json exists and whose recorded settings match is
skipped, so an interrupted study continues where it stopped.

Frozen code: the study first copies the package and the base config to OUT/code and runs every
configuration (and the model build) with that copy, so edits to the working tree during a long
study cannot change some runs and not others; a resumed study reuses the copy (--refresh-code
takes a new one, and runs made with other code are then rerun). Relative paths in overrides are
relative to the project root, as for the demo.

Mismatch correction: the trainer's fp32 policy and the bf16 local engine differ, and the losses
handle it differently. VESPO folds it into its sequence weight (correction = fold, VESPO only);
the others get token-level truncated importance sampling (correction = tis), the usual companion
of GRPO-style losses. Both are set per loss (--vespo-correction, --other-correction).

Final evaluation: with --final-eval (the default) each run trains K x N + 1 steps; the extra step
makes the trainer draw rollout batch K+1 from the policy after all K x N updates, and its mean
reward is reported as "reward after" (it is measured before that extra step changes anything).
The training statistics (phi, W, KL, skipped updates) cover the first K x N steps only.

Outputs: OUT/results.json (settings, per-run curves and statistics, rows per loss x N),
OUT/table.md (one row per loss x N, averaged over seeds) and OUT/staleness.png (one panel per N
of reward against rollout batch, one line per loss, and a last panel of reward against N).

    python tools/staleness_study.py --out runs/staleness --rollout-batches 10
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "examples", "configs", "demo_cpu.yaml")
SETTINGS_FILE = "study_run.json"  # what a run directory was run with (for the resume check)
_print_lock = threading.Lock()


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (runs, results.json, table.md, staleness.png)")
    parser.add_argument("--staleness", type=_ints, default=[1, 4, 16, 64], help="comma-separated N (default 1,4,16,64)")
    parser.add_argument("--losses", type=_names, default=["vespo", "grpo", "gspo", "sapo"],
                        help="comma-separated loss names (default vespo,grpo,gspo,sapo)")
    parser.add_argument("--rollout-batches", type=int, default=10,
                        help="K: rollout batches per run, the same for every N (steps = K x N)")
    parser.add_argument("--seeds", type=_ints, default=[1],
                        help="comma-separated seeds; seed s sets run.seed = data.seed = s")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="base config (default: the CPU demo's)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each uses the machine's cores)")
    parser.add_argument("--model-dir", default=None,
                        help="the shared warm-started model (default: OUT/model; built once if absent)")
    parser.add_argument("--vespo-correction", default="fold", help="algorithm.loss.correction for vespo")
    parser.add_argument("--other-correction", default="tis",
                        help="algorithm.loss.correction for every other loss (fold is VESPO-only)")
    parser.add_argument("--final-eval", action=argparse.BooleanOptionalAction, default=True,
                        help="one extra step so rollout batch K+1 measures the final policy (default on)")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep each run's end-of-run checkpoint (deleted by default to save disk)")
    parser.add_argument("--refresh-code", action="store_true",
                        help="re-take the snapshot of the package and config in OUT/code (finished runs "
                             "made with other code are then rerun)")
    parser.add_argument("--code-rev", default=None,
                        help="take the package and the config from this git revision (committed code) "
                             "instead of the working tree")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per run")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides passed to every run")
    args = parser.parse_args(argv)
    if args.rollout_batches < 1:
        parser.error("--rollout-batches must be >= 1")
    if not args.staleness or min(args.staleness) < 1:
        parser.error("--staleness needs positive integers")
    if not args.seeds or not args.losses:
        parser.error("--seeds and --losses need at least one value")
    for text in args.overrides:
        if "=" not in text:
            parser.error(f"override {text!r} must look like section.key=value")
    return args


# -- configurations -------------------------------------------------------------------------------


def run_name(loss: str, n: int, seed: int) -> str:
    return f"{loss}_N{n}_s{seed}"


def run_overrides(args, model_dir: str, loss: str, n: int, seed: int, run_dir: str) -> list[str]:
    """The demo's command-line overrides for one configuration (user overrides first, ours win)."""
    correction = args.vespo_correction if loss == "vespo" else args.other_correction
    steps = args.rollout_batches * n + (1 if args.final_eval else 0)
    return [*args.overrides,
            f"model.hf_dir={model_dir}",
            f"algorithm.loss.name={loss}",
            f"algorithm.loss.correction={correction}",
            f"algorithm.staleness={n}",
            "algorithm.micro_batch_size=0",
            "algorithm.async_rollout=false",
            f"run.seed={seed}",
            f"data.seed={seed}",
            f"run.run_dir={run_dir}",
            f"run.steps={steps}",
            "run.save_every=0",
            "run.resume=false",
            "run.plot=false",
            "run.tensorboard=false",
            "run.wandb_project="]


def snapshot_code(out: str, config: str, refresh: bool, rev: str | None = None) -> dict:
    """Freeze the package and the base config in OUT/code, once: every run of the study (and of a
    resumed study) uses this copy, so edits to the working tree while a study runs (the demo
    config, the trainer) cannot make its runs incomparable. Returns the snapshot's description."""
    code = os.path.join(out, "code")
    info_path = os.path.join(code, "SOURCE.json")
    if os.path.exists(info_path) and not refresh:
        with open(info_path) as f:
            return json.load(f)
    if os.path.exists(code):
        shutil.rmtree(code)
    os.makedirs(code)
    if rev:  # the committed package and config of a git revision
        relative = os.path.relpath(config, ROOT)
        commit = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
        if not commit or relative.startswith(".."):
            raise SystemExit(f"--code-rev {rev}: not a commit of {ROOT}, or the config is outside it")
        archive = subprocess.run(["git", "archive", "--format=tar", commit, "megatron_vespo"], cwd=ROOT,
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", code], input=archive, check=True)
        shown = subprocess.run(["git", "show", f"{commit}:{relative}"], cwd=ROOT, capture_output=True)
        if shown.returncode != 0:
            raise SystemExit(f"--code-rev {rev}: {relative} is not in that commit")
        with open(os.path.join(code, "config.yaml"), "wb") as f:
            f.write(shown.stdout)
    else:  # the working tree as it is now
        shutil.copytree(os.path.join(ROOT, "megatron_vespo"), os.path.join(code, "megatron_vespo"),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        shutil.copyfile(config, os.path.join(code, "config.yaml"))
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(code)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, code).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read())
    info = {"dir": code, "config": os.path.join(code, "config.yaml"), "config_source": config,
            "sha256": digest.hexdigest()[:16],
            "git_commit": commit if rev else _git("rev-parse", "HEAD"),
            "git_dirty": "" if rev else _git("status", "--porcelain", "--", "megatron_vespo",
                                               os.path.relpath(config, ROOT)),
            "from": f"git {rev}" if rev else "working tree",
            "taken": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    with open(info_path, "w") as f:
        json.dump(info, f, indent=1)
    return info


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def check_configs(code_dir: str, plan: list[dict]) -> dict:
    """Load and validate every configuration (with the snapshot's code) before running anything;
    return the settings they share."""
    sys.path.insert(0, code_dir)
    from megatron_vespo.train.config import load_config

    base = None
    for item in plan:
        cfg = load_config(item["config"], item["overrides"])
        if cfg.data.task != "synthetic":
            raise SystemExit("the study runs the demo's synthetic task (data.task = synthetic)")
        try:
            cfg.validate()
        except ValueError as err:
            raise SystemExit(f"{item['name']}: invalid configuration: {err}") from None
        if base is None:
            base = cfg
    return {"synthetic_task": base.data.synthetic_task,
            "digits": [getattr(base.data, "synthetic_min_digits", 2), getattr(base.data, "synthetic_max_digits", 6)],
            "prompts_per_batch": base.rollout.prompts_per_batch, "group_size": base.rollout.group_size,
            "rollout_samples": base.rollout_samples, "max_new_tokens": base.rollout.max_new_tokens,
            "temperature": base.rollout.temperature, "lr": base.optimizer.lr,
            "adam_betas": [base.optimizer.adam_beta1, base.optimizer.adam_beta2],
            "clip_grad": base.optimizer.clip_grad, "params_dtype": base.model.params_dtype,
            "engine_dtype": base.rollout.local_dtype, "pi_old": base.algorithm.pi_old,
            "advantage": base.algorithm.advantage, "aggregation": base.algorithm.loss.aggregation}


# the demo's model builder, run with the snapshot's code (newer builders take the digit range)
_BUILD = """import inspect, sys
sys.path.insert(0, sys.argv[1])
from megatron_vespo.train import demo
kwargs = {"digits": (int(sys.argv[4]), int(sys.argv[5]))} if "digits" in inspect.signature(demo.build_model).parameters else {}
demo.build_model(sys.argv[2], sys.argv[3], log=lambda m: print(m, flush=True), **kwargs)
"""

# one run: the demo command line with the snapshot's code first on the path (cwd stays the
# project root, so relative paths in overrides mean what they mean for the demo)
_DEMO = """import sys
sys.path.insert(0, sys.argv[1])
import megatron_vespo
print("code:", megatron_vespo.__file__, file=sys.stderr, flush=True)
from megatron_vespo.cli import main
sys.exit(main(["demo", *sys.argv[2:]]))
"""


def ensure_model(code_dir: str, model_dir: str, task: str, digits) -> None:
    """Build (or reuse) the warm-started model once, in a child process (keeps this one light)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _BUILD, code_dir, model_dir, task, str(digits[0]), str(digits[1])],
                          cwd=ROOT, env=_env(code_dir), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"building the model in {model_dir} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}")
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    print(f"{last} ({time.perf_counter() - start:.0f} s)", flush=True)


def _env(code_dir: str) -> dict:
    env = dict(os.environ)
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    env.setdefault("PYTHONWARNINGS", "ignore")
    env["PYTHONPATH"] = code_dir + os.pathsep + env.get("PYTHONPATH", "")
    return env


# -- running --------------------------------------------------------------------------------------


def is_done(item: dict) -> bool:
    run_dir = item["run_dir"]
    settings = os.path.join(run_dir, SETTINGS_FILE)
    if not (os.path.exists(os.path.join(run_dir, "summary.json")) and os.path.exists(settings)):
        return False
    with open(settings) as f:
        recorded = json.load(f)
    return recorded.get("overrides") == item["overrides"] and recorded.get("config") == item["config"] \
        and recorded.get("code_sha256") == item["code_sha256"] and recorded.get("returncode") == 0


def run_one(item: dict, index: int, total: int, timeout: float, keep_checkpoints: bool) -> dict:
    label = f"[{index}/{total}] {item['loss']:<6} N={item['n']:<3} seed={item['seed']}"
    run_dir = item["run_dir"]
    if is_done(item):
        _say(f"{label}: done before, skipped ({run_dir})")
        return {"skipped": True, "returncode": 0}
    if os.path.exists(run_dir):  # an interrupted or different earlier run: start it afresh
        shutil.rmtree(run_dir)
    os.makedirs(run_dir)
    cmd = [sys.executable, "-c", _DEMO, item["code_dir"], "--config", item["config"], *item["overrides"]]
    _say(f"{label}: running {item['steps']} steps ...")
    start = time.perf_counter()
    for attempt in range(3):
        env = _env(item["code_dir"])
        env["MASTER_PORT"] = str(_free_port())  # the trainer's default port is a function of its pid
        with open(os.path.join(run_dir, "stdout.log"), "w") as out, \
                open(os.path.join(run_dir, "stderr.log"), "w") as err:
            try:
                code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                code = -1
        if code == 0 or "EADDRINUSE" not in _tail(os.path.join(run_dir, "stderr.log"), 40):
            break
        _say(f"{label}: its port was taken by another process; starting it again")
    seconds = time.perf_counter() - start
    if not keep_checkpoints:
        shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    ok = code == 0 and os.path.exists(os.path.join(run_dir, "summary.json"))
    with open(os.path.join(run_dir, SETTINGS_FILE), "w") as f:
        json.dump({"config": item["config"], "overrides": item["overrides"], "code_sha256": item["code_sha256"],
                   "command": ["python", "-m", "megatron_vespo", "demo", "--config", item["config"], *item["overrides"]],
                   "code_dir": item["code_dir"],
                   "returncode": code if ok else (code or 1), "seconds": seconds}, f, indent=1)
    if ok:
        _say(f"{label}: finished in {seconds:.0f} s")
    else:
        tail = _tail(os.path.join(run_dir, "stderr.log"))
        _say(f"{label}: FAILED (exit {code}) after {seconds:.0f} s; see {run_dir}/stderr.log\n{tail}")
    return {"skipped": False, "returncode": code if ok else (code or 1), "seconds": seconds}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _say(message: str) -> None:
    with _print_lock:
        print(message, flush=True)


def _tail(path: str, lines: int = 8) -> str:
    try:
        with open(path) as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


# -- analysis -------------------------------------------------------------------------------------


def _mean(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def _median(values):
    values = sorted(v for v in values if v is not None and math.isfinite(v))
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def analyse_run(item: dict, k: int, final_eval: bool) -> dict:
    """Per-run statistics from metrics.jsonl."""
    with open(os.path.join(item["run_dir"], "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if "rollout/batch" in r]  # training steps; held-out eval rows have their own
    train_steps = k * item["n"]
    train = [r for r in rows if r["step"] <= train_steps]
    by_batch: dict[int, float] = {}
    for r in rows:  # reward/mean is the rollout batch's: the same on its N steps
        by_batch.setdefault(int(r["rollout/batch"]), float(r["reward/mean"]))
    curve = [by_batch[b] for b in sorted(by_batch) if b < k]
    window = max(1, k // 5)
    bad = [not (r.get("update_skipped", 0.0) == 0.0 and _finite(r.get("policy_loss"))
                and _finite(r.get("grad_norm"))) for r in train]
    settings_path = os.path.join(item["run_dir"], SETTINGS_FILE)
    seconds = None
    if os.path.exists(settings_path):
        with open(settings_path) as f:
            seconds = json.load(f).get("seconds")
    return {
        "loss": item["loss"], "n": item["n"], "seed": item["seed"], "run_dir": item["run_dir"],
        "steps": len(rows), "train_steps": len(train), "rollout_batches": len(curve),
        "reward_per_batch": curve,
        "reward_start": curve[0] if curve else None,
        "reward_final": _mean(curve[-window:]),
        "reward_best": max(curve) if curve else None,
        "reward_after": by_batch.get(k) if final_eval else None,
        "phi_mean": _mean([r.get("phi") for r in train]),
        "w_seq_mean": _mean([r.get("w_seq") for r in train]),
        "kl_k3_median": _median([r.get("kl_k3") for r in train]),
        "clip_frac_mean": _mean([r.get("clip_frac") for r in train]),
        "mismatch_abs_logp_diff_mean": _mean([r.get("mismatch/abs_logp_diff") for r in train]),
        "bad_step_frac": (sum(bad) / len(bad)) if bad else None,
        "by_quarter": _by_quarter(train, item["n"]),
        "seconds": seconds,
    }


def _by_quarter(train: list[dict], n: int) -> dict | None:
    """How the N steps on one rollout batch differ from first to last: medians of the grad norm
    and KL, mean phi / W, over the steps in each quarter of the N (N >= 4)."""
    if n < 4:
        return None
    parts = [[r for r in train if ((r["step"] - 1) % n) * 4 // n == q] for q in range(4)]
    return {"grad_norm_median": [_median([r.get("grad_norm") for r in p]) for p in parts],
            "kl_k3_median": [_median([r.get("kl_k3") for r in p]) for p in parts],
            "phi_mean": [_mean([r.get("phi") for r in p]) for p in parts],
            "w_seq_mean": [_mean([r.get("w_seq") for r in p]) for p in parts]}


ROW_KEYS = ("reward_start", "reward_final", "reward_best", "reward_after", "phi_mean", "w_seq_mean",
            "kl_k3_median", "clip_frac_mean", "bad_step_frac")


def aggregate(runs: list[dict], losses: list[str], ns: list[int]) -> list[dict]:
    """One row per loss x N: the mean over seeds (and the spread when there are several)."""
    rows = []
    for loss in losses:
        for n in ns:
            group = [r for r in runs if r["loss"] == loss and r["n"] == n]
            if not group:
                continue
            row = {"loss": loss, "n": n, "seeds": [r["seed"] for r in group]}
            for key in ROW_KEYS:
                values = [r[key] for r in group if _finite(r[key])]
                row[key] = _mean(values)
                row[key + "_std"] = _std(values) if len(values) > 1 else None
            rows.append(row)
    return rows


def _std(values):
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _cell(row: dict, key: str, digits: int = 3) -> str:
    value = row.get(key)
    if value is None:
        return "–"
    text = f"{value:.{digits}f}"
    if row.get(key + "_std") is not None:
        text += f" ± {row[key + '_std']:.{digits}f}"
    return text


def write_table(rows: list[dict], path: str, k: int, final_eval: bool, n_seeds: int) -> str:
    window = max(1, k // 5)
    head = ["loss", "N", "steps", "reward start", f"reward final (last {window} of {k} batches)", "best reward"]
    if final_eval:
        head.append("reward after (batch K+1)")
    head += ["mean phi", "mean W", "median KL k3 (pi_old‖pi)", "clip frac", "bad steps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["loss"], str(row["n"]), str(k * row["n"]), _cell(row, "reward_start"),
                 _cell(row, "reward_final"), _cell(row, "reward_best")]
        if final_eval:
            cells.append(_cell(row, "reward_after"))
        cells += [_cell(row, "phi_mean"), _cell(row, "w_seq_mean"), _cell(row, "kl_k3_median", 4),
                  _cell(row, "clip_frac_mean"), _cell(row, "bad_step_frac", 2)]
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"\nRewards are rollout-batch means (1 = exact answer, partial credit for the digits right at their place). "
            f"'reward final' is the mean over the last {window} of the K = {k} training rollout batches; "
            f"'reward after' is rollout batch K+1, sampled from the policy after all K x N updates. "
            f"phi (VESPO only) and W (VESPO: exp of the summed sequence log-ratio, folded mismatch included; "
            f"GSPO: the geometric-mean sequence ratio) are means over sequences and steps; KL k3 is the "
            f"per-token k3 estimate of KL(pi_old || pi_theta) during the update (mean over a step's tokens, "
            f"median over steps: a few tokens whose probability collapsed dominate a mean); clip frac is the "
            f"fraction of clipped tokens (GRPO/GSPO); 'bad steps' is the fraction of optimizer steps skipped "
            f"or with a non-finite loss or gradient norm. '–': not defined for that loss. "
            f"{'Mean ± std over ' + str(n_seeds) + ' seeds.' if n_seeds > 1 else 'One seed.'}\n")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n" + note)
    return path


def write_plot(runs: list[dict], rows: list[dict], losses: list[str], ns: list[int], k: int,
               final_eval: bool, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {loss: plt.get_cmap("tab10")(i) for i, loss in enumerate(losses)}
    fig, axes = plt.subplots(1, len(ns) + 1, figsize=(3.4 * (len(ns) + 1), 3.6), sharey=True)
    for ax, n in zip(axes, ns):
        for loss in losses:
            curves = [r["reward_per_batch"] for r in runs if r["loss"] == loss and r["n"] == n]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            x = list(range(length))
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(length)]
            ax.plot(x, mean, marker="o", markersize=3, color=colors[loss], label=loss)
            if len(curves) > 1:
                ax.fill_between(x, [min(c[i] for c in curves) for i in x], [max(c[i] for c in curves) for i in x],
                                color=colors[loss], alpha=0.15)
            after = [r["reward_after"] for r in runs if r["loss"] == loss and r["n"] == n and _finite(r["reward_after"])]
            if after:
                ax.plot([length], [sum(after) / len(after)], marker="*", markersize=9, color=colors[loss],
                        linestyle="none")
        ax.set_title(f"N = {n} ({k * n} steps)", fontsize=10)
        ax.set_xlabel("rollout batch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("reward (rollout batch mean)")
    labelled = [a for a in axes if a.get_legend_handles_labels()[0]]
    if labelled:
        labelled[0].legend(fontsize=8)
    ax = axes[-1]
    key = "reward_after" if final_eval else "reward_final"
    for loss in losses:
        points = [(r["n"], r[key]) for r in rows if r["loss"] == loss and _finite(r[key])]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=colors[loss], label=loss)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.set_xlabel("staleness N (steps per rollout batch)")
    ax.set_title("after training (batch K+1)" if final_eval else f"final (last {max(1, k // 5)} batches)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    fig.suptitle(f"CPU demo task, same {k} rollout batches for every N" +
                 (" (stars: batch K+1, from the final policy)" if final_eval else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- main -----------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    snapshot = snapshot_code(out, os.path.abspath(args.config), args.refresh_code, args.code_rev)
    config = snapshot["config"]
    model_dir = os.path.abspath(args.model_dir or os.path.join(out, "model"))
    plan = []
    for loss in args.losses:
        for n in args.staleness:
            for seed in args.seeds:
                run_dir = os.path.join(out, "runs", run_name(loss, n, seed))
                overrides = run_overrides(args, model_dir, loss, n, seed, run_dir)
                plan.append({"loss": loss, "n": n, "seed": seed, "run_dir": run_dir, "config": config,
                             "code_dir": snapshot["dir"], "code_sha256": snapshot["sha256"],
                             "overrides": overrides, "name": run_name(loss, n, seed),
                             "steps": args.rollout_batches * n + (1 if args.final_eval else 0)})
    base = check_configs(snapshot["dir"], plan)
    print(f"staleness study: {len(args.losses)} losses x N in {args.staleness} x {len(args.seeds)} seed(s) = "
          f"{len(plan)} runs, K = {args.rollout_batches} rollout batches of {base['rollout_samples']} samples each",
          flush=True)
    print(f"code: {snapshot['dir']} (sha256 {snapshot['sha256']}; {snapshot.get('from', 'working tree')}, "
          f"commit {snapshot['git_commit'][:10]}{' with local changes' if snapshot['git_dirty'] else ''}; "
          f"taken {snapshot['taken']})", flush=True)
    ensure_model(snapshot["dir"], model_dir, base["synthetic_task"], base["digits"])
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(run_one, item, i + 1, len(plan), args.timeout, args.keep_checkpoints)
                   for i, item in enumerate(plan)]
        outcomes = [f.result() for f in futures]
    failed = [item["name"] for item, o in zip(plan, outcomes) if o["returncode"] != 0]
    runs = [analyse_run(item, args.rollout_batches, args.final_eval)
            for item, o in zip(plan, outcomes) if o["returncode"] == 0]
    rows = aggregate(runs, args.losses, args.staleness)
    results = {
        "command": [os.path.relpath(sys.argv[0], ROOT) if argv is None else "tools/staleness_study.py",
                    *(sys.argv[1:] if argv is None else argv)],
        "code": snapshot,
        "settings": {"config": snapshot["config_source"], "model_dir": model_dir, "staleness": args.staleness, "losses": args.losses,
                     "seeds": args.seeds, "rollout_batches": args.rollout_batches, "final_eval": args.final_eval,
                     "vespo_correction": args.vespo_correction, "other_correction": args.other_correction,
                     "overrides": args.overrides, **base},
        "failed": failed, "runs": runs, "rows": rows,
        "wall_seconds_this_invocation": time.perf_counter() - start,
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_table(rows, os.path.join(out, "table.md"), args.rollout_batches, args.final_eval, len(args.seeds))
    if runs:
        write_plot(runs, rows, args.losses, args.staleness, args.rollout_batches, args.final_eval,
                   os.path.join(out, "staleness.png"))
    print(f"results: {out}/results.json, {out}/table.md" + (f", {out}/staleness.png" if runs else ""), flush=True)
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The trainer end to end on CPU: config errors, a short run's outputs, resume after a kill giving
the same losses as an uninterrupted run, and the same losses under a data-parallel layout."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from megatron_vespo.train.config import load_config
from megatron_vespo.train.trainer import AsyncProducer, RolloutBatch, group_advantages, mini_batch_ids, version_number
from tests.conftest import ROOT, _env, run_cli

CONFIG = os.path.join(ROOT, "examples", "configs", "demo_cpu.yaml")
# small and deterministic: an fp32 engine taking one request at a time, so rollouts and their
# log-probs are bitwise reproducible (batched fp32 matmuls round differently with the batch)
SMALL = ["rollout.prompts_per_batch=4", "rollout.group_size=4", "rollout.max_new_tokens=8",
         "rollout.local_dtype=float32", "rollout.local_max_batch=1", "algorithm.staleness=2", "algorithm.micro_batch_size=4",
         "run.tensorboard=false"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from megatron_vespo.train.demo import build_model

    path = str(tmp_path_factory.mktemp("trainer") / "model")
    build_model(path, "reverse", log=lambda message: None)
    return path


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _train_args(model_dir, run_dir, *extra):
    return ["train", "--config", CONFIG, f"model.hf_dir={model_dir}", f"run.run_dir={run_dir}", *SMALL, *extra]


@pytest.mark.slow
def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['rollout.max_tokens'\]"):
        load_config(CONFIG, ["rollout.max_tokens=3"])
    with pytest.raises(ValueError, match="algorithm.staleness = 3 does not divide the rollout batch of 64"):
        load_config(CONFIG, ["algorithm.staleness=3", "rollout.prompts_per_batch=8", "rollout.group_size=8"]).validate()
    with pytest.raises(ValueError, match="run.save_every = 3 must be a multiple of algorithm.staleness = 2"):
        load_config(CONFIG, ["run.save_every=3", "algorithm.staleness=2"]).validate()
    with pytest.raises(ValueError, match="algorithm.kl_coef = 0.1 with algorithm.routing_replay = r3: the reference"):
        load_config(CONFIG, ["algorithm.kl_coef=0.1", "algorithm.routing_replay=r3"]).validate()
    with pytest.raises(ValueError, match=r"algorithm.kl_estimator = 'k4'; choose one of \['k1', 'k2', 'k3'\]"):
        load_config(CONFIG, ["algorithm.kl_estimator=k4"]).validate()
    assert load_config(CONFIG, ["algorithm.kl_coef=0.1", "algorithm.entropy_coef=0.01"]).validate().algorithm.loss \
        .kl_coef == 0.1
    with pytest.raises(ValueError, match="rollout.weight_sync = 'ncl'"):
        load_config(CONFIG, ["rollout.weight_sync=ncl"]).validate()
    with pytest.raises(ValueError, match="optimizer.lr must be a number"):
        load_config(CONFIG, ["optimizer.lr=fast"])
    with pytest.raises(ValueError, match="does not divide over 3 data-parallel ranks"):
        load_config(CONFIG, ["rollout.prompts_per_batch=8", "rollout.group_size=8"]).validate(data_parallel_size=3)
    with pytest.raises(ValueError, match="algorithm.routing_agreement compares .* needs algorithm.routing_replay = r2"):
        load_config(CONFIG, ["algorithm.routing_agreement=true"]).validate()
    with pytest.raises(ValueError, match="rollout.engine = sglang needs rollout.server_urls"):
        load_config(CONFIG, ["rollout.engine=sglang", "rollout.router_url=http://r:1", "rollout.weight_sync=disk",
                             "rollout.weight_sync_dir=/tmp/w"]).validate()
    proc = run_cli("train", "--config", CONFIG, "algorithm.loss.name=ppo")
    assert proc.returncode == 2 and "unknown loss 'ppo'" in proc.stderr


def test_group_advantages_and_versions():
    rewards = np.array([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    adv = group_advantages(rewards, 4, "grpo", 1e-6)
    assert np.allclose(adv[:4].mean(), 0) and adv[0] > 0 > adv[1] and np.allclose(adv[4:], 0)
    # the default is the reference's unbiased std (torch.std): 0.75 / 0.5; population: 0.75 / 0.433
    assert adv[0] == pytest.approx(0.75 / (0.5 + 1e-6))
    population = group_advantages(rewards, 4, "grpo", 1e-6, std="population")
    assert population[0] == pytest.approx(0.75 / (np.sqrt(0.75 / 4) + 1e-6))
    assert adv[0] / population[0] == pytest.approx(np.sqrt(3 / 4), rel=1e-5)
    assert np.allclose(group_advantages(rewards, 4, "grpo_mean", 1e-6)[:4], [0.75, -0.25, -0.25, -0.25])
    assert [version_number(v) for v in ("default", "v0", "v12", None)] == [0, 0, 12, 0]


def test_mini_batches_grouped_in_order_or_shuffled():
    grouped = mini_batch_ids(16, 4, "grouped", seed=3)
    assert grouped == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]  # a group of 4 each
    shuffled = mini_batch_ids(16, 4, "shuffled", seed=3)
    assert sorted(i for ids in shuffled for i in ids) == list(range(16)) and shuffled != grouped
    assert shuffled == mini_batch_ids(16, 4, "shuffled", seed=3) != mini_batch_ids(16, 4, "shuffled", seed=4)
    with pytest.raises(ValueError, match="algorithm.mini_batch_order = 'random'"):
        load_config(CONFIG, ["algorithm.mini_batch_order=random"]).validate()
    with pytest.raises(ValueError, match="rollout.group_size = 1: group advantages need at least 2"):
        load_config(CONFIG, ["rollout.group_size=1"]).validate()


def test_metrics_of_a_killed_run_read_back_without_the_partial_line(tmp_path):
    from megatron_vespo.train.trainer import _read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "x": 0.5}\n{"step": 2, "x": 0.25}\n{"step": 3, "x"')  # killed mid-write
    assert [row["step"] for row in _read_metrics(str(path))] == [1, 2]
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=f"{path}:2: .*fix or remove the line"):
        _read_metrics(str(path))
    path.write_text('{"step": "one"}\n{"step": 2}\n')
    with pytest.raises(ValueError, match=f"{path}:1: not a metrics row"):
        _read_metrics(str(path))


def test_a_sample_from_a_rollout_holds_prompt_then_response():
    from types import SimpleNamespace

    from megatron_vespo.batch import Sample

    rollout = SimpleNamespace(prompt_ids=[5, 6, 7], response_ids=[8, 9],
                              engine_logprobs=np.array([-0.5, -1.25], dtype=np.float32))
    sample = Sample.from_rollout(rollout, advantage=-0.75)
    assert sample.tokens.tolist() == [5, 6, 7, 8, 9] and sample.tokens.dtype == torch.long
    assert sample.prompt_len == 3 and sample.response_len == 2 and sample.advantage == -0.75
    assert sample.engine_logprobs.tolist() == [-0.5, -1.25] and sample.engine_logprobs.dtype == torch.float32
    assert sample.old_logprobs is None


def test_the_async_producer_stays_at_most_max_ahead_and_hands_on_errors():
    import threading

    generated, lock = [], threading.Lock()

    def generate(index, uid):
        with lock:
            generated.append((index, uid))
        if index == 3:
            raise ValueError("engine gone")
        return RolloutBatch(index, uid, [], [], 0.0, next_uid=uid + 8)

    def take():
        batch = producer.take()
        return (batch.index, batch.first_uid)

    producer = AsyncProducer(generate, first_index=1, first_uid=40, total_batches=5, max_ahead=2)
    try:
        deadline = time.time() + 10
        while len(generated) < 2 and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert generated == [(1, 40), (2, 48)]  # two ahead, then it waits for training to take one
        assert take() == (1, 40)
        assert take() == (2, 48)
        with pytest.raises(RuntimeError, match="rollout failed: engine gone"):
            take()
        assert generated == [(1, 40), (2, 48), (3, 56)]  # nothing generated after the failure
    finally:
        producer.stop()
    assert not producer.thread.is_alive()


def test_policy_routes_are_checked_before_any_work():
    from megatron_vespo.train.policy import Policy

    policy = Policy.__new__(Policy)  # the checks need no model
    policy.replay, policy.trainable = None, True
    with pytest.raises(ValueError, match="either replays routes or records them"):
        policy.logprobs([], replay=[], record=True)
    with pytest.raises(ValueError, match="built without it"):
        policy.logprobs([], record=True)
    with pytest.raises(ValueError, match="built without it"):
        policy.train_step([], [], routes=[])
    policy.replay = object()
    with pytest.raises(ValueError, match="needs the routes to replay"):
        policy.train_step([], [])
    with pytest.raises(ValueError, match="2 route sets for 1 samples"):
        policy.train_step([object()], [0], routes=[None, None])


@pytest.mark.slow
def test_an_unreachable_engine_is_a_clear_error(model_dir, tmp_path):
    proc = run_cli(*_train_args(model_dir, tmp_path / "run", "rollout.engine=sglang", "rollout.weight_sync=distributed",
                                "rollout.server_urls=http://127.0.0.1:9", "rollout.timeout_s=2"), timeout=300)
    assert proc.returncode != 0 and "rollout engine unreachable" in proc.stderr


@pytest.mark.slow
def test_a_short_run_writes_metrics_checkpoint_and_plot(model_dir, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(*_train_args(model_dir, run_dir, "run.steps=4"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"run directory: {run_dir}"
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # two optimizer steps per rollout batch (staleness 2): they share the batch and its reward
    assert rows[0]["reward/mean"] == rows[1]["reward/mean"] and rows[0]["rollout/batch"] == 0
    assert rows[2]["rollout/batch"] == 1 and rows[2]["weight_version"] == 1
    for row in rows:
        assert all(np.isfinite(row[k]) for k in ("policy_loss", "phi", "w_seq", "grad_norm", "reward/mean"))
    # the first step of a batch is on-policy up to the engine mismatch: W is 1 up to it
    assert abs(rows[0]["log_w"]) < 1e-3
    assert os.path.exists(run_dir / "checkpoints" / "step-4" / "complete")
    assert os.path.getsize(run_dir / "training.png") > 10_000
    assert (run_dir / "config.yaml").exists()


RESUME_STEPS = ["run.steps=6", "run.save_every=2", "run.plot=false"]


@pytest.fixture(scope="module")
def uninterrupted(model_dir, tmp_path_factory):
    """The metrics of a 6-step run that nothing interrupts."""
    whole = tmp_path_factory.mktemp("whole") / "run"
    proc = run_cli(*_train_args(model_dir, whole, *RESUME_STEPS), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _metrics(whole)


def _assert_same_run(reference, resumed):
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(reference, resumed):
        assert a["reward/mean"] == b["reward/mean"], (a["step"], a["reward/mean"], b["reward/mean"])
        assert a["weight_version"] == b["weight_version"], a["step"]
        assert a["policy_loss"] == pytest.approx(b["policy_loss"], rel=1e-6, abs=1e-9), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6), a["step"]


@pytest.mark.slow
def test_resume_after_a_kill_gives_the_same_losses(model_dir, tmp_path, uninterrupted):
    steps = RESUME_STEPS
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "megatron_vespo", *_train_args(model_dir, killed, *steps, "run.resume=true")]
    victim = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.monotonic() + 300
    # kill once the step-2 checkpoint is complete and step 3 has been trained (then lost)
    while time.monotonic() < deadline and victim.poll() is None:
        if (killed / "checkpoints" / "step-2" / "complete").exists() and os.path.exists(killed / "metrics.jsonl") \
                and any(r["step"] >= 3 for r in _metrics(killed)):
            break
        time.sleep(0.05)
    assert victim.poll() is None, "the run finished before it could be killed"
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (killed / "checkpoints" / "step-6").exists()

    proc = run_cli(*_train_args(model_dir, killed, *steps, "run.resume=true"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr
    _assert_same_run(uninterrupted, _metrics(killed))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "stop file"])
def test_a_stop_request_checkpoints_at_the_batch_boundary_and_resumes_exactly(model_dir, tmp_path, uninterrupted,
                                                                              how):
    """What the SLURM scripts rely on before the time limit: SIGTERM (or RUN_DIR/STOP) in the middle
    of a rollout batch ends the batch, writes its checkpoint and exits 0; resume loses nothing."""
    run_dir = tmp_path / "stopped"
    args = _train_args(model_dir, run_dir, *RESUME_STEPS, "run.resume=true", "run.save_every=0")
    proc = subprocess.Popen([sys.executable, "-m", "megatron_vespo", *args], env=_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    # step 1 done: the request arrives inside rollout batch 0 (steps 1-2)
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.exists(run_dir / "metrics.jsonl") and _metrics(run_dir):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be stopped"
    if how == "SIGTERM":
        proc.send_signal(signal.SIGTERM)
    else:
        (run_dir / "STOP").touch()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    # at the end of the batch the request arrived in: batch 0 unless the machine was slow to send it
    stopped_at = re.search(r"stop requested \((SIGTERM|stop file .*)\): checkpoint at step (\d+) of 6", err)
    assert stopped_at, err[-2000:]
    assert stopped_at.group(2) in ("2", "4")
    assert sorted(os.listdir(run_dir / "checkpoints")) == [f"step-{stopped_at.group(2)}"]
    assert not (run_dir / "STOP").exists()  # consumed: the resumed run must not stop again
    proc = run_cli(*args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "stop requested" not in proc.stderr
    _assert_same_run(uninterrupted, _metrics(run_dir))


def _break_checkpoint(checkpoint, how: str, marker) -> str:
    """Damage a checkpoint as a disk or a hostile user would; returns the file a warning must name."""
    if how == "truncated shard":
        shard = max((checkpoint / "mcore").glob("*.distcp"), key=lambda p: p.stat().st_size)
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 3)
        return str(shard)
    if how == "empty trainer state":
        (checkpoint / "trainer_state.json").write_text("")
        return str(checkpoint / "trainer_state.json")
    # an earlier release's scheduler.pt, crafted to create a directory when unpickled
    from tests.test_checkpoints import Payload

    (checkpoint / "scheduler.json").unlink()
    torch.save({"num_steps": 4, "max_lr": Payload(marker)}, checkpoint / "scheduler.pt")
    return str(checkpoint / "scheduler.pt")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated shard", "crafted scheduler.pt"])
def test_a_broken_newest_checkpoint_falls_back_to_the_previous_one(model_dir, tmp_path, uninterrupted, how):
    """Resume skips a checkpoint that cannot be loaded, with a warning naming the file, runs no code
    from it, and continues from the one before: the run still equals the uninterrupted one."""
    run_dir = tmp_path / "run"
    proc = run_cli(*_train_args(model_dir, run_dir, *RESUME_STEPS), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.rmtree(run_dir / "checkpoints" / "step-6")  # as if killed after step 4's checkpoint
    marker = tmp_path / "code-ran"
    named = _break_checkpoint(run_dir / "checkpoints" / "step-4", how, marker)

    proc = run_cli(*_train_args(model_dir, run_dir, *RESUME_STEPS, "run.resume=true"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warning = next(line for line in proc.stderr.splitlines() if line.startswith("warning: checkpoint"))
    assert "step-4" in warning and named in warning, warning
    assert f"resumed from {run_dir / 'checkpoints' / 'step-2'}" in proc.stderr
    assert not marker.exists()
    _assert_same_run(uninterrupted, _metrics(run_dir))


@pytest.mark.slow
def test_resume_stops_clearly_when_no_checkpoint_loads(model_dir, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(*_train_args(model_dir, run_dir, "run.steps=4", "run.save_every=2", "run.plot=false"),
                   timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in (2, 4):
        _break_checkpoint(run_dir / "checkpoints" / f"step-{step}", "empty trainer state", None)
    before = (run_dir / "metrics.jsonl").read_text()
    proc = run_cli(*_train_args(model_dir, run_dir, "run.steps=6", "run.save_every=2", "run.resume=true"),
                   timeout=600)
    assert proc.returncode != 0
    assert "none of the 2 checkpoints" in proc.stderr and "move them away" in proc.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before  # nothing overwritten
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-2", "step-4"]


@pytest.mark.slow
def test_data_parallel_training_matches_one_process(model_dir, tmp_path):
    """ep2 (data-parallel 2, experts split) under torchrun: the same rollouts, the same losses."""
    steps = ["run.steps=2", "run.plot=false"]
    single = tmp_path / "single"
    proc = run_cli(*_train_args(model_dir, single, *steps), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parallel = tmp_path / "ep2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "megatron_vespo", *_train_args(model_dir, parallel, *steps, "model.ep=2")]
    proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for a, b in zip(_metrics(single), _metrics(parallel)):
        assert a["reward/mean"] == b["reward/mean"]
        assert a["policy_loss"] == pytest.approx(b["policy_loss"], rel=1e-4, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def _torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "megatron_vespo", *args]
    return subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_distributed_optimizer_checkpoints_reshard_across_data_parallel_sizes(model_dir, tmp_path):
    """Saved at dp2 with the distributed optimizer (its default there), resumed at dp1 and dp4: the
    steps after the checkpoint equal those of the uninterrupted dp2 run; resuming with the other
    optimizer form is refused by name."""
    steps = ["run.steps=4", "run.save_every=2", "run.plot=false", "algorithm.micro_batch_size=2"]
    whole = tmp_path / "dp2"
    proc = _torchrun(2, _train_args(model_dir, whole, *steps))
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((whole / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["distributed_optimizer"] is True
    reference = _metrics(whole)
    for nproc, extra in ((1, ["optimizer.distributed=true"]), (4, [])):
        run_dir = tmp_path / f"dp{nproc}"
        shutil.copytree(whole / "checkpoints" / "step-2", run_dir / "checkpoints" / "step-2")
        shutil.copy(whole / "metrics.jsonl", run_dir / "metrics.jsonl")
        args = _train_args(model_dir, run_dir, *steps, "run.resume=true", *extra)
        proc = run_cli(*args, timeout=600) if nproc == 1 else _torchrun(nproc, args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "resumed from" in proc.stderr
        for a, b in zip(reference[2:], _metrics(run_dir)[2:]):
            assert a["step"] == b["step"] and a["reward/mean"] == b["reward/mean"]
            assert a["policy_loss"] == pytest.approx(b["policy_loss"], rel=1e-4, abs=1e-6), (nproc, a["step"])
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (nproc, a["step"])
        assert [r["step"] for r in _metrics(run_dir)] == [1, 2, 3, 4]
    plain = tmp_path / "plain"
    shutil.copytree(whole / "checkpoints" / "step-2", plain / "checkpoints" / "step-2")
    proc = run_cli(*_train_args(model_dir, plain, *steps, "run.resume=true"), timeout=600)
    assert proc.returncode != 0 and "written with the distributed optimizer" in proc.stderr
    assert "optimizer.distributed: true" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["r2", "r3"])
def test_routing_replay_runs_in_the_loop(model_dir, tmp_path, mode):
    """R3 trains on the engine's routes, R2 on those recorded in the pi_old forward; the replay
    module asserts inside every step that each route was consumed (tests/test_routing_replay.py
    checks the replay itself against the reference)."""
    run_dir = tmp_path / mode
    agreement = ["algorithm.routing_agreement=true"] if mode == "r2" else []
    proc = run_cli(*_train_args(model_dir, run_dir, "run.steps=2", "run.plot=false",
                                f"algorithm.routing_replay={mode}", *agreement), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["policy_loss"]) for r in rows)
    if mode == "r2":
        # fp32 engine and fp32 trainer on the same weights: they route almost every token alike
        agreement = rows[0]["mismatch/routing_agreement"]
        assert 0.9 <= agreement <= 1.0
    else:
        assert "mismatch/routing_agreement" not in rows[0]


@pytest.mark.slow
def test_async_rollouts_stay_within_the_policy_lag_bound(model_dir, tmp_path):
    run_dir = tmp_path / "async"
    proc = run_cli(*_train_args(model_dir, run_dir, "run.steps=6", "run.plot=false", "algorithm.async_rollout=true",
                                "algorithm.max_policy_lag=1"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(r["policy_lag/max"] <= 1 for r in rows)
    # generation overlapped training: later batches were generated one weight version behind
    assert any(r["policy_lag/mean"] > 0 for r in rows[2:])


def _serve(model_dir, port):
    from megatron_vespo.rollout.client import wait_until_healthy

    proc = subprocess.Popen([sys.executable, "-m", "megatron_vespo", "serve-local", "--model", model_dir,
                             "--port", str(port), "--dtype", "float32"], env=_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_until_healthy([f"http://127.0.0.1:{port}"], timeout_s=120, processes=[proc])
    return proc


@pytest.mark.slow
def test_an_engine_dying_mid_run_leaves_a_checkpoint_to_resume_from(model_dir, tmp_path):
    """SGLang-protocol servers over HTTP with the distributed weight-sync route (gloo here): the
    server is killed after the step-2 checkpoint; the run fails with the rollout error, the
    checkpoint is intact, and a resumed run against a new server finishes."""
    from megatron_vespo.rollout.weight_sync import _free_port

    port = _free_port()
    run_dir = tmp_path / "remote"
    args = _train_args(model_dir, run_dir, "run.steps=6", "run.save_every=2", "run.plot=false", "run.resume=true",
                       "rollout.engine=sglang", f"rollout.server_urls=http://127.0.0.1:{port}",
                       "rollout.weight_sync=distributed", "rollout.weight_sync_backend=gloo",
                       "rollout.max_attempts=2", "rollout.timeout_s=30")
    server = _serve(model_dir, port)
    trainer = subprocess.Popen([sys.executable, "-m", "megatron_vespo", *args], env=_env(), cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and trainer.poll() is None \
                and not (run_dir / "checkpoints" / "step-2" / "complete").exists():
            time.sleep(0.05)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        _, err = trainer.communicate(timeout=300)
    finally:
        if trainer.poll() is None:
            trainer.kill()
    assert trainer.returncode != 0 and ("rollout" in err.lower() or "weight" in err.lower()), err[-2000:]
    assert (run_dir / "checkpoints" / "step-2" / "complete").exists()
    assert not (run_dir / "checkpoints" / "step-6").exists()
    server = _serve(model_dir, port)
    try:
        proc = run_cli(*args, timeout=600)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and [r["step"] for r in _metrics(run_dir)] == list(range(1, 7))


def _safetensors(directory):
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("train_layout", ["single", "pp2vpp2"])
def test_trainer_checkpoint_exports_to_hf(model_dir, tmp_path, train_layout):
    """``convert mcore-to-hf`` reads a trainer checkpoint (saved by one process, or by pp2 with two
    virtual chunks per stage): its HF weights equal the ones the disk weight sync handed the engine
    after the last step (an independent export of the live model), exported from one process and
    from tp2."""
    run_dir, sync = tmp_path / "run", tmp_path / "sync"
    args = _train_args(model_dir, run_dir, "run.steps=2", "run.plot=false", "rollout.weight_sync=disk",
                       f"rollout.weight_sync_dir={sync}")
    if train_layout == "single":
        proc = run_cli(*args, timeout=600)
    else:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "megatron_vespo", *args, "model.pp=2", "model.vpp=2"],
                              env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sent = _safetensors(sync / "weights-v1")
    start = _safetensors(model_dir)
    assert any(not torch.equal(sent[k], start[k]) for k in sent), "training left every weight unchanged"
    checkpoint = run_dir / "checkpoints" / "step-2"
    for layout in ([], ["--tp", "2"]):
        out = tmp_path / f"hf{''.join(layout)}"
        proc = run_cli("convert", "mcore-to-hf", "--ckpt", str(checkpoint), "--out", str(out), *layout)
        assert proc.returncode == 0, proc.stderr[-3000:]
        exported = _safetensors(out)
        assert exported.keys() == sent.keys()
        for key, value in sent.items():
            assert torch.equal(exported[key], value), key
        assert (out / "config.json").exists()
    proc = run_cli("convert", "mcore-to-hf", "--ckpt", str(run_dir), "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "neither a 'convert hf-to-mcore' checkpoint" in proc.stderr
    proc = run_cli("convert", "mcore-to-hf", "--ckpt", str(checkpoint), "--out", str(tmp_path / "hf"))
    assert proc.returncode == 2 and "is not empty" in proc.stderr

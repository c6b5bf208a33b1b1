"""The SLURM scripts under a real SLURM (Debian's slurm-wlm 22.05 and munge): a cluster of 3 nodes
on this machine (tools/slurm_localhost.sh: each node with its own hostname, network namespace and
address), real sbatch submissions of examples/slurm/ with the CPU demo config, the project's local
engine in place of SGLang (``ROLLOUT_ENGINE=local``: a CPU cannot run SGLang's kernels) behind the
real sglang-router, and weight sync over gloo between the nodes' own addresses.

(a) 2 training nodes + 1 rollout node; (b) the vespo_n8 wrapper on a GPU-less job; (c) the single-node
script; (d) the async wrapper; (e) the time-limit path: ``scancel --batch --signal=TERM`` mid-training,
a checkpoint, clean servers, nothing left running, and a resubmission that resumes from it; (f) the
rollout step killed mid-job: a clear failure and an intact checkpoint.

The cluster needs root, unshare/nsenter/ip and slurm-wlm + munge (``make test`` installs them with
apt when it can). Without them these tests are skipped and say why; with
MEGATRON_VESPO_REQUIRE_SLURM=1 (set by .ci/run) a missing cluster is a failure instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_vespo.train.checkpoints import latest_checkpoint
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # every test here starts processes (conftest: the fast tier)

TOOL = ROOT / "tools" / "slurm_localhost.sh"
SLURM = ROOT / "examples" / "slurm"
DEMO = ROOT / "examples" / "configs" / "demo_cpu.yaml"
VENV_BIN = Path(sys.executable).parent
# a small run: 4 prompts x 4 samples per rollout batch, 2 optimizer steps per batch, a checkpoint
# at every batch; the trainer talks to servers it did not start, and syncs weights over gloo
SMALL = ("rollout.engine=sglang rollout.weight_sync=distributed rollout.weight_sync_backend=gloo "
         "rollout.prompts_per_batch=4 rollout.group_size=4 rollout.max_new_tokens=8 algorithm.staleness=2 "
         "algorithm.micro_batch_size=4 run.save_every=2 run.tensorboard=false run.plot=false")
JOB_TIMEOUT_S = 300


def _unavailable() -> str | None:
    if not sys.platform.startswith("linux"):
        return "a localhost SLURM cluster needs Linux namespaces"
    if os.geteuid() != 0:
        return "a localhost SLURM cluster needs root (namespaces, a bind mount, the daemons)"
    missing = [n for n in ("munged", "slurmctld", "slurmd", "sbatch", "unshare", "nsenter", "ip", "runuser")
               if shutil.which(n) is None]
    if missing:
        return (f"not installed: {', '.join(missing)} (as root with apt: tools/slurm_localhost.sh install; "
                "make test does it)")
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = _unavailable()
    if reason:
        if os.environ.get("MEGATRON_VESPO_REQUIRE_SLURM") == "1":
            pytest.fail(f"MEGATRON_VESPO_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    directory = tmp_path_factory.mktemp("slurm")
    # the port also names the namespaces: two clusters (two test runs) never meet
    env = dict(os.environ, SLURM_LOCALHOST_PORT=str(_free_port()), SLURM_LOCALHOST_NODES="3")
    start = subprocess.run(["bash", str(TOOL), "start", str(directory)], env=env, capture_output=True, text=True,
                           timeout=120)
    assert start.returncode == 0, f"the localhost cluster did not start:\n{start.stderr[-4000:]}"
    try:
        yield Cluster(directory)
    finally:
        subprocess.run(["bash", str(TOOL), "stop", str(directory)], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from megatron_vespo.train.demo import build_model

    path = str(tmp_path_factory.mktemp("slurm-model") / "model")
    build_model(path, "reverse", log=lambda message: None)
    return path


class Cluster:
    def __init__(self, directory: Path):
        self.dir = directory
        self.bin = directory / "bin"

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(self.bin / args[0]), *args[1:]], capture_output=True, text=True, timeout=60,
                              cwd=ROOT)
        if check and proc.returncode:
            raise AssertionError(f"{' '.join(args)}: {proc.stderr}")
        return proc

    def submit(self, script: str, run_root: Path, *, sbatch_args=(), trainer_args=(), **env) -> "Job":
        run_root.mkdir(parents=True, exist_ok=True)
        job_env = dict(os.environ)
        job_env.update(
            PATH=f"{self.bin}:{VENV_BIN}:{os.environ['PATH']}", PYTHON=sys.executable, HOST_PYTHON=sys.executable,
            MEGATRON_VESPO=str(VENV_BIN / "megatron-vespo"), TORCHRUN=str(VENV_BIN / "torchrun"),
            CONFIG=str(DEMO), DATA="/dev/null", RUN_ROOT=str(run_root), GPUS_PER_NODE="1", ROLLOUT_TP="1",
            ROLLOUT_ENGINE="local", OMP_NUM_THREADS="1", POLL_S="0.5", STOP_GRACE_S="20", SERVER_WAIT_S="180",
            CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore", TRAIN_OVERRIDES=SMALL)
        job_env.update(env)
        out = run_root / "job-%j.out"
        proc = subprocess.run([str(self.bin / "sbatch"), "--parsable", f"--output={out}", *sbatch_args,
                               str(SLURM / script), *trainer_args], env=job_env, capture_output=True, text=True,
                              cwd=ROOT, timeout=60)
        assert proc.returncode == 0, f"sbatch {script}: {proc.stderr}"
        job_id = proc.stdout.strip().split(";")[0]
        return Job(self, job_id, run_root / f"job-{job_id}.out", run_root / "demo_cpu")


class Job:
    def __init__(self, cluster: Cluster, job_id: str, output: Path, run_dir: Path):
        self.cluster, self.id, self.output, self.run_dir = cluster, job_id, output, run_dir

    def running(self) -> bool:
        return bool(self.cluster.run("squeue", "--noheader", f"--jobs={self.id}", check=False).stdout.strip())

    def wait(self, timeout: float = JOB_TIMEOUT_S) -> tuple[str, str]:
        """(state, exit code) once the job has ended; polling squeue ends a test sooner than --wait."""
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() > deadline:
                self.cluster.run("scancel", self.id, check=False)
                pytest.fail(f"job {self.id} still running after {timeout} s:\n{self.text()[-4000:]}")
            time.sleep(0.5)
        info = self.cluster.run("scontrol", "show", "job", self.id).stdout
        state = re.search(r"JobState=(\S+)", info).group(1)
        exit_code = re.search(r"\bExitCode=(\S+)", info).group(1)
        return state, exit_code

    def text(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else "(no job output)"

    def metrics(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def wait_for_steps(self, steps: int, timeout: float = JOB_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while len(self.metrics()) < steps:
            assert self.running(), f"job {self.id} ended before step {steps}:\n{self.text()[-4000:]}"
            assert time.monotonic() < deadline, f"no step {steps} after {timeout} s:\n{self.text()[-4000:]}"
            time.sleep(0.2)

    def step_id(self, name: str) -> str:
        lines = self.cluster.run("squeue", "--steps", f"--jobs={self.id}", "--noheader", "--format=%i %j").stdout
        for line in lines.splitlines():
            step, step_name = line.split()
            if step_name == name:
                return step
        raise AssertionError(f"no step {name} in job {self.id}: {lines}")

    def leftover_processes(self) -> list[str]:
        """Processes of this machine that still name the run directory (every step's command does)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(self.run_dir) in cmdline:
                found.append(f"{entry.name}: {cmdline[:200]}")
        return found


def _assert_completed(job: Job, steps: int) -> str:
    state, exit_code = job.wait()
    text = job.text()
    assert (state, exit_code) == ("COMPLETED", "0:0"), text[-4000:]
    assert [row["step"] for row in job.metrics()] == list(range(1, steps + 1))
    checkpoint = latest_checkpoint(str(job.run_dir))
    assert checkpoint is not None and checkpoint.endswith(f"step-{steps}"), checkpoint
    assert re.search(r"weights v\d+ -> engine \(distributed\)", text)  # across the nodes' own addresses
    assert not (job.run_dir / "servers.json").exists()  # the launcher shut down cleanly
    _assert_nothing_left(job)
    return text


def _assert_nothing_left(job: Job) -> None:
    deadline = time.monotonic() + 20  # slurmstepd reaps asynchronously
    while job.leftover_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job.leftover_processes() == []


def test_a_training_nodes_and_a_rollout_node(cluster, model_dir, tmp_path):
    """(a) 2 training nodes (torchrun, data-parallel 2) and 1 rollout node (serve-local behind the
    sglang-router); the weights go from training rank 0 on n1 to the server on n3 over gloo."""
    job = cluster.submit("train_rollout_multinode.sbatch", tmp_path, sbatch_args=["--nodes=3"],
                         trainer_args=["run.steps=4"], MODEL=model_dir, TRAIN_NODES="2")
    text = _assert_completed(job, 4)
    assert "training on 2 node(s) x 1 processes: n1,n2" in text and "rollout on 1 node(s): n3" in text
    assert "world 2 = tp 1 x pp 1 x cp 1 x dp 2" in text
    assert "router: http://n3:29900; servers: http://n3:30000" in text
    router_log = (job.run_dir / "rollout_logs" / "router.log").read_text(errors="replace")
    assert "n3" in router_log or "10.77.0.3" in router_log or "30000" in router_log


def test_b_the_paper_wrapper_on_a_gpu_less_job(cluster, model_dir, tmp_path):
    """(b) vespo_n8.sbatch with the CPU config; GPUS_PER_NODE=0: no step asks for GPUs."""
    job = cluster.submit("vespo_n8.sbatch", tmp_path, sbatch_args=["--nodes=3", "--gpus-per-node=0"],
                         trainer_args=["run.steps=2"], MODEL=model_dir, TRAIN_NODES="2", GPUS_PER_NODE="0")
    text = _assert_completed(job, 2)
    assert "training on 2 node(s) x 1 processes" in text


def test_c_the_single_node_script(cluster, model_dir, tmp_path):
    """(c) one node: the launcher and the trainer as children of the batch script."""
    job = cluster.submit("single_node_8gpu.sbatch", tmp_path, trainer_args=["run.steps=2"], MODEL=model_dir,
                         ROLLOUT_GPUS="0", TRAIN_GPUS="1")
    text = _assert_completed(job, 2)
    assert "rollout on GPUs 0" in text and "training on GPUs 1" in text


def test_d_the_async_wrapper(cluster, model_dir, tmp_path):
    """(d) vespo_async.sbatch: generation of the next batch overlaps training, lag <= 1."""
    job = cluster.submit("vespo_async.sbatch", tmp_path, sbatch_args=["--nodes=3"],
                         trainer_args=["run.steps=4", "algorithm.async_rollout=true", "algorithm.max_policy_lag=1"],
                         MODEL=model_dir)
    text = _assert_completed(job, 4)
    assert "async True" in text
    assert max(row["policy_lag/max"] for row in job.metrics()) <= 1


def test_e_the_time_limit_checkpoints_and_a_resubmission_resumes(cluster, model_dir, tmp_path):
    """(e) what --signal=B:TERM@300 does before the time limit: SIGTERM to the batch script asks
    the trainer to end its rollout batch and checkpoint, then the servers stop cleanly."""
    job = cluster.submit("train_rollout_multinode.sbatch", tmp_path, sbatch_args=["--nodes=3"],
                         trainer_args=["run.steps=400", "run.resume=true"], MODEL=model_dir, TRAIN_NODES="2")
    job.wait_for_steps(3)
    cluster.run("scancel", "--batch", "--signal=TERM", job.id)
    state, exit_code = job.wait()
    text = job.text()
    assert exit_code == "143:0", text[-4000:]  # the batch script's SIGTERM exit
    stopped = re.search(r"stop requested \(stop file .*\): checkpoint at step (\d+) of 400", text)
    assert stopped, text[-4000:]
    step = int(stopped.group(1))
    assert latest_checkpoint(str(job.run_dir)).endswith(f"step-{step}")
    assert [row["step"] for row in job.metrics()] == list(range(1, step + 1))
    assert "stopping vespo-rollout" in text and "did not stop in" not in text  # no SIGKILL needed
    assert not (job.run_dir / "servers.json").exists() and not (job.run_dir / "STOP").exists()
    launch_log = next((job.run_dir / "rollout_logs").glob("launch-*.log")).read_text()
    assert launch_log.rstrip().endswith("stopping")  # SIGTERM reached the launcher: it stopped its servers
    _assert_nothing_left(job)

    resumed = cluster.submit("train_rollout_multinode.sbatch", tmp_path, sbatch_args=["--nodes=3"],
                             trainer_args=[f"run.steps={step + 2}", "run.resume=true"], MODEL=model_dir,
                             TRAIN_NODES="2")
    text = _assert_completed(resumed, step + 2)
    assert f"resumed from {job.run_dir}/checkpoints/step-{step}: step {step}" in text


def test_f_the_rollout_step_killed_mid_job(cluster, model_dir, tmp_path):
    """(f) the servers' step dies: the job fails, saying so, and the last checkpoint is whole."""
    job = cluster.submit("train_rollout_multinode.sbatch", tmp_path, sbatch_args=["--nodes=3"],
                         trainer_args=["run.steps=400"], MODEL=model_dir, TRAIN_NODES="2")
    job.wait_for_steps(3)
    cluster.run("scancel", "--signal=KILL", job.step_id("vespo-rollout"), check=False)
    state, exit_code = job.wait()
    text = job.text()
    assert state == "FAILED" and exit_code != "0:0", text[-4000:]
    assert re.search(r"error: the rollout servers \(vespo-rollout\) exited", text), text[-4000:]
    checkpoint = latest_checkpoint(str(job.run_dir))
    assert checkpoint is not None, text[-4000:]
    with open(os.path.join(checkpoint, "trainer_state.json")) as f:
        assert json.load(f)["step"] == int(checkpoint.rsplit("-", 1)[1])
    _assert_nothing_left(job)

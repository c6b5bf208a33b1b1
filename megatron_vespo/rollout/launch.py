"""``megatron-vespo sglang launch``: SGLang servers (SLURM-aware) with an sglang-router in front.

Pieces, each usable on its own:

* ``expand_hostlist`` / ``read_cluster_env``: the nodes of the job, this node's rank and its GPUs,
  from SLURM's environment (or ``--nodes``/``--node-rank``/``--gpus-per-node``).
* ``plan_servers``: a pure function from cluster shape and parallel sizes to ``ServerSpec``s
  (one per server: its nodes, HTTP host and port, GPUs, multi-node rendezvous address).
* ``sglang_server_command`` / ``local_server_command`` / ``router_command``: argv lists.
* ``EngineCluster``: starts this node's share of the plan, waits for health, starts the router on
  the first node, and stops every process group it started.

Launch runs once per node (``srun --ntasks-per-node=1 megatron-vespo sglang launch ...``); each node
starts its own servers, and the first node also waits for every server of the job before starting
the router. The router only routes generation: pause/continue, weight updates, abort and memory
release must go to each server directly, which is why the state file lists every server URL.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from megatron_vespo.rollout.client import auth_headers

WILDCARD_HOSTS = ("0.0.0.0", "::", "")
# SGLang's multi-node rendezvous takes dist_init_port and reserves the next 6 (+ DP ranks) ports
# (server_args.py PortArgs.init_new, 0.5.23); this stride keeps servers' reservations apart.
DIST_INIT_PORT_STRIDE = 50


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------


@dataclass
class LaunchOptions:
    model: str | None = None
    engine: str = "sglang"
    tp_size: int = 1
    ep_size: int = 1
    dp_size: int = 1
    pp_size: int = 1
    mem_fraction_static: float | None = None
    enable_return_routed_experts: bool = False
    deterministic: bool = False
    api_key: str | None = None
    host: str | None = None
    port: int = 30000
    port_stride: int = 1
    dist_init_port: int = 25000
    router_port: int = 29900
    router_policy: str = "round_robin"
    router_prometheus_port: int | None = None
    router_log_level: str = "warn"
    num_servers: int | None = None
    gpus_per_node: int | None = None
    nodes: str | None = None
    node_rank: int | None = None
    dtype: str | None = None
    weight_version: str | None = None
    random_seed: int | None = None
    extra_server_args: str = ""
    extra_router_args: str = ""
    log_dir: str | None = None
    health_timeout: float = 1800.0
    shutdown_timeout: float = 30.0
    no_router: bool = False
    dry_run: bool = False
    state_file: str | None = None
    server_python: str = sys.executable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = LaunchOptions()
    parser.description = (
        "Start SGLang servers and an sglang-router in front of them; print one line per URL and run "
        "until SIGINT/SIGTERM or until a process dies, then stop every process group. Under SLURM "
        "run it once per node (srun --ntasks-per-node=1): each node starts its own servers and the "
        "first node starts the router once every server of the job is healthy.")
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    a = parser.add_argument
    a("--model", required=True, help="model path (a Hugging Face checkpoint directory or repo id)")
    a("--engine", choices=("sglang", "local"), default=d.engine,
      help="sglang: python -m sglang.launch_server; local: the project's CPU engine "
      "(python -m megatron_vespo serve-local), same HTTP protocol, no GPUs (GPU-only server "
      "options such as --mem-fraction-static are not passed to it)")
    g = parser.add_argument_group("parallelism (per server; a server uses tp*pp*dp GPUs)")
    g.add_argument("--tp-size", type=int, default=d.tp_size)
    g.add_argument("--ep-size", type=int, default=d.ep_size, help="expert parallel size; must divide --tp-size")
    g.add_argument("--dp-size", type=int, default=d.dp_size, help="data-parallel replicas inside one server")
    g.add_argument("--pp-size", type=int, default=d.pp_size)
    g = parser.add_argument_group("placement")
    g.add_argument("--num-servers", type=int, default=d.num_servers,
                   help="servers in total, filling the first nodes first (default: as many as the "
                   "GPUs of all nodes hold; local engine: one per node)")
    g.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node,
                   help="default: SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE, CUDA_VISIBLE_DEVICES or nvidia-smi")
    g.add_argument("--nodes", default=d.nodes,
                   help="host list such as 'gpu[01-04]' (default: SLURM_JOB_NODELIST, else this machine only)")
    g.add_argument("--node-rank", type=int, default=d.node_rank,
                   help="this node's index in the host list (default: SLURM_NODEID)")
    g = parser.add_argument_group("server")
    g.add_argument("--mem-fraction-static", type=float, default=d.mem_fraction_static)
    g.add_argument("--enable-return-routed-experts", action="store_true",
                   help="needed for rollouts that return MoE routing (R3)")
    g.add_argument("--deterministic", action="store_true",
                   help="pass --enable-deterministic-inference (batch-invariant kernels)")
    g.add_argument("--dtype", default=d.dtype, help="model dtype (default: the engine's own default)")
    g.add_argument("--weight-version", default=d.weight_version)
    g.add_argument("--random-seed", type=int, default=d.random_seed)
    g.add_argument("--api-key", default=d.api_key,
                   help="required as a Bearer token by every server and by the router (the router "
                   "also sends it to the servers)")
    g.add_argument("--server-python", default=d.server_python,
                   help="Python interpreter of the servers (one whose environment has SGLang)")
    g.add_argument("--extra-server-args", default=d.extra_server_args,
                   help="appended to every server command, one shell-quoted string; write it with "
                   "'=' since it starts with a dash: --extra-server-args='--disable-radix-cache'")
    g = parser.add_argument_group("network")
    g.add_argument("--host", default=d.host,
                   help="bind address of servers and router (default: 0.0.0.0 with several nodes or "
                   "under SLURM, else 127.0.0.1)")
    g.add_argument("--port", type=int, default=d.port, help="port of the first server (server i: port + i*stride)")
    g.add_argument("--port-stride", type=int, default=d.port_stride,
                   help="port spacing of servers; with attention-DP a single-node SGLang server also "
                   "takes port+233..port+239 (or more), so use >= 8 there")
    g.add_argument("--dist-init-port", type=int, default=d.dist_init_port,
                   help=f"rendezvous port of servers spanning nodes (server i: +{DIST_INIT_PORT_STRIDE}*i)")
    g = parser.add_argument_group("router")
    g.add_argument("--no-router", action="store_true", help="start the servers only")
    g.add_argument("--router-port", type=int, default=d.router_port)
    g.add_argument("--router-policy", default=d.router_policy,
                   choices=("round_robin", "cache_aware", "random", "power_of_two"))
    g.add_argument("--router-prometheus-port", type=int, default=d.router_prometheus_port,
                   help="the router's metrics port (default: a free port; the router dies if its "
                   "metrics port is taken)")
    g.add_argument("--router-log-level", default=d.router_log_level, choices=("debug", "info", "warn", "error"))
    g.add_argument("--extra-router-args", default=d.extra_router_args,
                   help="appended to the router command, e.g. --extra-router-args='--request-timeout-secs 600'")
    g = parser.add_argument_group("lifecycle")
    g.add_argument("--log-dir", default=d.log_dir,
                   help="one log file per server and one for the router (default: a new temporary directory)")
    g.add_argument("--health-timeout", type=float, default=d.health_timeout, help="seconds")
    g.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout,
                   help="seconds between SIGTERM and SIGKILL")
    g.add_argument("--state-file", default=d.state_file,
                   help="JSON {router_url, server_urls, api_key_set, pids, ...} written by the first "
                   "node once everything is healthy, removed at shutdown")
    g.add_argument("--dry-run", action="store_true", help="print the commands of every node and exit")


def options_from_args(args: argparse.Namespace) -> LaunchOptions:
    names = {f.name for f in dataclasses.fields(LaunchOptions)}
    return LaunchOptions(**{k: v for k, v in vars(args).items() if k in names})


# ---------------------------------------------------------------------------------------------
# Cluster environment
# ---------------------------------------------------------------------------------------------


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' in host list {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in host list {text!r}")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_one(name: str, whole: str) -> list[str]:
    open_at = name.find("[")
    if open_at < 0:
        return [name]
    close_at = name.index("]", open_at)
    prefix, body, rest = name[:open_at], name[open_at + 1:close_at], name[close_at + 1:]
    values: list[str] = []
    for item in body.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise ValueError(f"bad range {item!r} in host list {whole!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in host list {whole!r}")
        # SLURM pads every number to the width of the range's first bound: gpu[08-10].
        width = len(lo)
        values.extend(str(v).zfill(width) for v in range(int(lo), int(hi) + 1))
    # Later bracket groups (rack[1-2]-gpu[01-02]) expand recursively: a cartesian product.
    return [host for v in values for host in _expand_one(prefix + v + rest, whole)]


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compact host list to names, in order: ``gpu[01-03,07],cpu5`` ->
    ``['gpu01', 'gpu02', 'gpu03', 'gpu07', 'cpu5']``."""
    hosts = [h for part in _split_top_level(hostlist) for h in _expand_one(part, hostlist)]
    if not hosts:
        raise ValueError(f"empty host list {hostlist!r}")
    return hosts


def _env_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"{name}={env[name]!r} is not an integer") from None


def _parse_gpu_count(value: str, name: str) -> int:
    """SLURM_GPUS_PER_NODE is '8', 'h100:8', 'gpu:h100:4(IDX:0-3)' or 'a100:2,v100:2' (summed)."""
    total = 0
    for part in value.split(","):
        part = re.sub(r"\(.*?\)", "", part).strip()
        if not part:
            continue
        tail = part.rsplit(":", 1)[-1]
        if not tail.isdigit():
            raise ValueError(f"cannot read a GPU count from {name}={value!r}")
        total += int(tail)
    return total


@dataclass(frozen=True)
class ClusterEnv:
    nodes: tuple[str, ...]        # every node of the job, in SLURM's order
    node_rank: int                # this node's index in ``nodes``
    gpus_per_node: int | None     # None: not known from options or environment
    gpu_source: str               # the setting the GPU count came from (for error messages)
    visible_gpus: int | None      # CUDA_VISIBLE_DEVICES count, None when unset
    in_slurm: bool

    @property
    def node(self) -> str:
        return self.nodes[self.node_rank]


def read_cluster_env(env: Mapping[str, str] | None = None, *, nodes: str | None = None,
                     node_rank: int | None = None, gpus_per_node: int | None = None,
                     default_host: str = "127.0.0.1") -> ClusterEnv:
    """Nodes, this node's rank and GPUs per node from options, then SLURM, then this machine."""
    env = os.environ if env is None else env
    # Inside srun the step's nodes are the ones running launch (and SLURM_NODEID counts within
    # them), which may be fewer than the job's; outside a step the job's list is all there is.
    if env.get("SLURM_STEP_NODELIST"):
        list_name, count_names = "SLURM_STEP_NODELIST", ("SLURM_STEP_NUM_NODES",)
    elif env.get("SLURM_JOB_NODELIST"):
        list_name, count_names = "SLURM_JOB_NODELIST", ("SLURM_JOB_NUM_NODES", "SLURM_NNODES")
    else:
        list_name, count_names = "SLURM_NODELIST", ("SLURM_NNODES",)
    hostlist = env.get(list_name)
    in_slurm = bool(hostlist) and nodes is None
    if nodes is not None:
        node_list = expand_hostlist(nodes)
    elif hostlist:
        node_list = expand_hostlist(hostlist)
        for count_name in count_names:
            if env.get(count_name):
                if _env_int(env, count_name) != len(node_list):
                    raise ValueError(f"{count_name}={env[count_name]} but {list_name}={hostlist!r} "
                                     f"names {len(node_list)} nodes")
                break
    else:
        node_list = [default_host]

    if node_rank is None:
        if in_slurm:
            # Each node must run exactly one launch: a second task on a node would start the
            # node's servers again on the same GPUs and ports.
            local_id = env.get("SLURM_LOCALID")
            if local_id not in (None, "", "0"):
                raise ValueError(f"SLURM_LOCALID={local_id}: run one launch per node "
                                 "(srun --ntasks-per-node=1)")
            if env.get("SLURM_NODEID"):
                node_rank, source = _env_int(env, "SLURM_NODEID"), "SLURM_NODEID"
            elif env.get("SLURM_PROCID"):
                node_rank, source = _env_int(env, "SLURM_PROCID"), "SLURM_PROCID"
            else:
                short = socket.gethostname().split(".")[0]
                if short not in node_list:
                    raise ValueError(f"neither SLURM_NODEID nor SLURM_PROCID is set and this host "
                                     f"{short!r} is not in {list_name}={hostlist!r}; set --node-rank")
                node_rank, source = node_list.index(short), "hostname"
        else:
            source = "--node-rank"
            node_rank = 0
    else:
        source = "--node-rank"
    if not 0 <= node_rank < len(node_list):
        raise ValueError(f"{source}={node_rank} is outside the {len(node_list)} nodes {node_list}")

    visible = env.get("CUDA_VISIBLE_DEVICES")
    visible_gpus = None if visible is None else len([d for d in visible.split(",") if d.strip()])
    if gpus_per_node is not None:
        gpus, gpu_source = gpus_per_node, "--gpus-per-node"
    elif env.get("SLURM_GPUS_ON_NODE"):
        gpus, gpu_source = _parse_gpu_count(env["SLURM_GPUS_ON_NODE"], "SLURM_GPUS_ON_NODE"), "SLURM_GPUS_ON_NODE"
    elif env.get("SLURM_GPUS_PER_NODE"):
        gpus, gpu_source = _parse_gpu_count(env["SLURM_GPUS_PER_NODE"], "SLURM_GPUS_PER_NODE"), "SLURM_GPUS_PER_NODE"
    elif visible_gpus is not None:
        gpus, gpu_source = visible_gpus, "CUDA_VISIBLE_DEVICES"
    else:
        gpus, gpu_source = None, "none"
    return ClusterEnv(tuple(node_list), node_rank, gpus, gpu_source, visible_gpus, in_slurm)


def detect_gpus() -> int | None:
    """GPU count from nvidia-smi, None without it (only used when nothing else says)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


# ---------------------------------------------------------------------------------------------
# Placement
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSpec:
    index: int
    nodes: tuple[str, ...]          # nodes the server spans; nodes[0] (node rank 0) serves HTTP
    node_ids: tuple[int, ...]       # their indices in the job's node list
    port: int
    gpu_ids: tuple[int, ...]        # device indices on each node (relative to CUDA_VISIBLE_DEVICES)
    dist_init_addr: str | None      # FIRSTNODE:PORT when the server spans nodes

    @property
    def host(self) -> str:
        return self.nodes[0]

    @property
    def url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.port}"

    @property
    def nnodes(self) -> int:
        return len(self.nodes)

    @property
    def base_gpu_id(self) -> int | None:
        return self.gpu_ids[0] if self.gpu_ids else None

    def placement_args(self, node_rank: int = 0) -> list[str]:
        """SGLang flags that put this server (its ``node_rank``-th node) on its GPUs and nodes."""
        args = []
        if self.gpu_ids:
            args += ["--base-gpu-id", str(self.base_gpu_id)]
        if self.nnodes > 1:
            args += ["--nnodes", str(self.nnodes), "--node-rank", str(node_rank),
                     "--dist-init-addr", self.dist_init_addr]
        return args


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def gpus_per_server(tp_size: int = 1, pp_size: int = 1, dp_size: int = 1, ep_size: int = 1) -> int:
    for name, value in (("--tp-size", tp_size), ("--pp-size", pp_size), ("--dp-size", dp_size),
                        ("--ep-size", ep_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    # SGLang's expert parallelism lives inside the TP group (ep_size * moe_dp_size == tp_size).
    if tp_size % ep_size:
        raise ValueError(f"--ep-size {ep_size} must divide --tp-size {tp_size}: SGLang shards "
                         "experts over the tensor-parallel group")
    return tp_size * pp_size * dp_size


def plan_servers(nodes: Sequence[str], gpus_per_node: int | None, *, tp_size: int = 1,
                 pp_size: int = 1, dp_size: int = 1, ep_size: int = 1, num_servers: int | None = None,
                 port: int = 30000, port_stride: int = 1, dist_init_port: int = 25000,
                 engine: str = "sglang", gpu_source: str = "--gpus-per-node") -> list[ServerSpec]:
    """Servers of the whole job. A server needs G = tp*pp*dp GPUs; with g GPUs per node, G <= g
    gives g // G servers per node (each from --base-gpu-id i*G), G > g a server over G // g nodes.
    The local engine uses no GPUs: ``num_servers`` (default one per node) spread evenly."""
    nodes = list(nodes)
    if not nodes:
        raise ValueError("no nodes to place servers on")
    if num_servers is not None and num_servers < 1:
        raise ValueError(f"--num-servers must be >= 1, got {num_servers}")
    if port_stride < 1:
        raise ValueError(f"--port-stride must be >= 1, got {port_stride}")

    def spec(i: int, node_ids: list[int], gpu_ids) -> ServerSpec:
        span = tuple(nodes[k] for k in node_ids)
        addr = f"{_url_host(span[0])}:{dist_init_port + DIST_INIT_PORT_STRIDE * i}" if len(span) > 1 else None
        return ServerSpec(i, span, tuple(node_ids), port + i * port_stride, tuple(gpu_ids), addr)

    if engine == "local":
        if (tp_size, pp_size, dp_size, ep_size) != (1, 1, 1, 1):
            raise ValueError("--engine local runs one process per server on CPU: --tp-size, --pp-size, "
                             "--dp-size and --ep-size must be 1")
        total = len(nodes) if num_servers is None else num_servers
        if total % len(nodes):
            raise ValueError(f"--num-servers {total} does not divide evenly over {len(nodes)} nodes")
        per_node = total // len(nodes)
        return [spec(i, [i // per_node], ()) for i in range(total)]

    if engine != "sglang":
        raise ValueError(f"--engine must be sglang or local, got {engine!r}")
    need = gpus_per_server(tp_size, pp_size, dp_size, ep_size)
    sizes = f"tp {tp_size} x pp {pp_size} x dp {dp_size} = {need} GPUs per server"
    if gpus_per_node is None:
        raise ValueError("cannot tell how many GPUs each node has: set --gpus-per-node (or run under "
                         "SLURM with --gpus-per-node, or set CUDA_VISIBLE_DEVICES)")
    if gpus_per_node < 1:
        raise ValueError(f"{gpu_source} gives {gpus_per_node} GPUs per node; SGLang needs GPUs "
                         "(use --engine local on CPU)")

    if need <= gpus_per_node:
        per_node = gpus_per_node // need
        capacity = per_node * len(nodes)
        if gpus_per_node % need and num_servers is None:
            raise ValueError(f"{sizes} does not divide the {gpus_per_node} GPUs per node "
                             f"({gpu_source}); change --tp-size/--pp-size/--dp-size or set "
                             "--num-servers to leave GPUs idle on purpose")
        total = capacity if num_servers is None else num_servers
        if total > capacity:
            raise ValueError(f"--num-servers {total} needs {total * need} GPUs but {len(nodes)} "
                             f"node(s) x {gpus_per_node} GPUs ({gpu_source}) hold {capacity} servers "
                             f"of {need} GPUs")
        return [spec(i, [i // per_node], range((i % per_node) * need, (i % per_node + 1) * need))
                for i in range(total)]

    if need % gpus_per_node:
        raise ValueError(f"{sizes} is more than one node holds but not a multiple of the "
                         f"{gpus_per_node} GPUs per node ({gpu_source}); change --tp-size/--pp-size/--dp-size")
    span = need // gpus_per_node
    if len(nodes) % span:
        raise ValueError(f"each server spans {span} nodes ({sizes}, {gpus_per_node} per node) but the "
                         f"job has {len(nodes)} nodes (SLURM_NNODES / --nodes): not a multiple of {span}")
    capacity = len(nodes) // span
    total = capacity if num_servers is None else num_servers
    if total > capacity:
        raise ValueError(f"--num-servers {total} needs {total * span} nodes of {gpus_per_node} GPUs "
                         f"({sizes}); the job has {len(nodes)}")
    return [spec(i, list(range(i * span, (i + 1) * span)), range(gpus_per_node)) for i in range(total)]


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def check_model_for_sglang(model: str) -> None:
    """Refuse a local model SGLang would build wrongly without an error (protocol.unsupported_model_features);
    a hub id or a directory without config.json is left to SGLang."""
    from megatron_vespo.rollout.protocol import unsupported_model_features

    config_file = os.path.join(model, "config.json")
    if not os.path.isfile(config_file):
        return
    from megatron_vespo.convert.families import load_hf_config

    problems = unsupported_model_features(load_hf_config(model))  # a broken config.json: named
    if problems:
        raise ValueError(f"{model}: SGLang cannot serve this model correctly: " + "; ".join(problems)
                         + ". Serve it with --engine local, or convert it so that every layer is MoE")


def default_bind_host(options: LaunchOptions, cluster: ClusterEnv) -> str:
    if options.host is not None:
        return options.host
    return "0.0.0.0" if cluster.in_slurm or len(cluster.nodes) > 1 else "127.0.0.1"


def sglang_server_command(spec: ServerSpec, options: LaunchOptions, node_rank: int = 0,
                          bind_host: str | None = None) -> list[str]:
    """``python -m sglang.launch_server`` for one node of ``spec`` (SGLang 0.5.23 flag names)."""
    if not options.model:
        raise ValueError("--model is required")
    cmd = [options.server_python, "-m", "sglang.launch_server", "--model-path", options.model,
           "--host", bind_host or options.host or "127.0.0.1", "--port", str(spec.port),
           "--tp-size", str(options.tp_size)]
    for flag, value in (("--ep-size", options.ep_size), ("--dp-size", options.dp_size),
                        ("--pp-size", options.pp_size)):
        if value != 1:
            cmd += [flag, str(value)]
    cmd += spec.placement_args(node_rank)
    if options.mem_fraction_static is not None:
        cmd += ["--mem-fraction-static", str(options.mem_fraction_static)]
    if options.enable_return_routed_experts:
        cmd.append("--enable-return-routed-experts")
    if options.deterministic:
        cmd.append("--enable-deterministic-inference")
    if options.dtype:
        cmd += ["--dtype", options.dtype]
    if options.random_seed is not None:
        cmd += ["--random-seed", str(options.random_seed)]
    if options.weight_version:
        cmd += ["--weight-version", options.weight_version]
    if options.api_key:
        cmd += ["--api-key", options.api_key]
    return cmd + shlex.split(options.extra_server_args or "")


def local_server_command(spec: ServerSpec, options: LaunchOptions, bind_host: str | None = None) -> list[str]:
    """The project's CPU engine with the same HTTP protocol (``megatron-vespo serve-local``)."""
    if not options.model:
        raise ValueError("--model is required")
    cmd = [options.server_python, "-m", "megatron_vespo", "serve-local", "--model", options.model,
           "--host", bind_host or options.host or "127.0.0.1", "--port", str(spec.port)]
    if options.dtype:
        cmd += ["--dtype", options.dtype]
    if options.random_seed is not None:
        cmd += ["--seed", str(options.random_seed)]
    if options.weight_version:
        cmd += ["--weight-version", options.weight_version]
    if options.api_key:
        cmd += ["--api-key", options.api_key]
    return cmd + shlex.split(options.extra_server_args or "")


def server_command(spec: ServerSpec, options: LaunchOptions, node_rank: int = 0,
                   bind_host: str | None = None) -> list[str]:
    if options.engine == "local":
        return local_server_command(spec, options, bind_host)
    return sglang_server_command(spec, options, node_rank, bind_host)


def router_command(worker_urls: Sequence[str], options: LaunchOptions, bind_host: str,
                   prometheus_port: int) -> list[str]:
    """``python -m sglang_router.launch_router`` (sglang-router 0.3.x flags), with this
    interpreter: the router is a dependency of this package, not of the servers. Its --api-key is
    both required from clients and sent to the workers; worker health checks carry no key, which
    SGLang accepts (/health* is exempt from its key check)."""
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *worker_urls,
           "--host", bind_host, "--port", str(options.router_port), "--policy", options.router_policy,
           "--prometheus-host", bind_host, "--prometheus-port", str(prometheus_port),
           "--log-level", options.router_log_level,
           # Bounded so that our SIGTERM-then-SIGKILL grace period is what decides.
           "--shutdown-grace-period-secs", str(max(1, int(options.shutdown_timeout) - 1))]
    if options.api_key:
        cmd += ["--api-key", options.api_key]
    return cmd + shlex.split(options.extra_router_args or "")


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host if host not in WILDCARD_HOSTS else "", 0))
        return s.getsockname()[1]


def _redact(cmd: Sequence[str], secret: str | None) -> list[str]:
    return ["<api-key>" if secret and part == secret else part for part in cmd]


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


class LaunchError(RuntimeError):
    """A process exited or never became healthy; the message names it and has its log tail."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived (``stop_event`` was set) while starting or running."""


def log_tail(path: str | os.PathLike | None, max_lines: int = 40, max_chars: int = 6000) -> str:
    if not path:
        return ""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-max_lines:])[-max_chars:]


def _libc_prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


# Looked up once in the parent, so the forked child does not load libraries before exec.
_PRCTL = _libc_prctl()
_PR_SET_PDEATHSIG = 1


def _set_parent_death_signal(parent_pid: int) -> None:
    # Runs in the child between fork and exec: if the launcher is killed with SIGKILL it cannot
    # clean up, so the kernel sends the server SIGTERM instead.
    if _PRCTL is None:
        return
    _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group; /proc keeps zombies visible that a
    container without a reaping init never clears, so they must not count as alive."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except ProcessLookupError:
            return []
        except PermissionError:
            return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state ppid pgrp ...
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


@dataclass
class ManagedProcess:
    name: str
    argv: list[str]
    log_path: str
    url: str | None = None              # None: a non-zero node rank of a multi-node server
    popen: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def exited(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def failure(self, what: str) -> LaunchError:
        tail = log_tail(self.log_path)
        return LaunchError(f"{self.name} {what} (exit code {self.exited()}); log {self.log_path}"
                           + (f", last lines:\n{tail}" if tail else ", which is empty"))


def _http_ok(url: str, api_key: str | None, timeout: float = 5.0) -> tuple[bool, str, bytes]:
    request = urllib.request.Request(url, headers=auth_headers(api_key))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status == 200, f"HTTP {answer.status}", answer.read()
    except urllib.error.HTTPError as err:
        return False, f"HTTP {err.code}", b""
    except (OSError, urllib.error.URLError) as err:
        return False, str(getattr(err, "reason", err)), b""


class EngineCluster:
    """This node's share of the servers (and, on the first node, the router).

    ``EngineCluster.start(options)`` returns once every server and the router are healthy (or
    raises after stopping whatever it started); ``stop()`` sends SIGTERM to every process group,
    then SIGKILL after ``options.shutdown_timeout``. Use as a context manager.
    """

    def __init__(self, options: LaunchOptions, cluster: ClusterEnv, plan: list[ServerSpec],
                 log_dir: str, bind_host: str):
        self.options = options
        self.cluster = cluster
        self.plan = plan
        self.log_dir = log_dir
        self.bind_host = bind_host
        self.api_key = options.api_key
        self.server_urls = [s.url for s in plan]
        self.router_url: str | None = None
        self.servers: list[ManagedProcess] = []
        self.router: ManagedProcess | None = None
        self.state_file = options.state_file
        self._state_written = False
        self._stopped = False
        self._hurry = threading.Event()
        self._out = None
        self.env: dict = dict(os.environ)  # what servers inherit; prepare() sets the one given

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def prepare(cls, options: LaunchOptions | argparse.Namespace,
                env: Mapping[str, str] | None = None) -> "EngineCluster":
        """Resolve cluster and plan without starting anything (what --dry-run prints)."""
        if isinstance(options, argparse.Namespace):
            options = options_from_args(options)
        if not options.model:
            raise ValueError("--model is required")
        loopback = options.host if options.host not in (None, *WILDCARD_HOSTS) else "127.0.0.1"
        cluster = read_cluster_env(env, nodes=options.nodes, node_rank=options.node_rank,
                                   gpus_per_node=options.gpus_per_node, default_host=loopback)
        gpus = cluster.gpus_per_node
        if options.engine == "sglang":
            check_model_for_sglang(options.model)
            if gpus is None:
                detected = detect_gpus()
                if detected is not None:
                    cluster = dataclasses.replace(cluster, gpus_per_node=detected, gpu_source="nvidia-smi")
                    gpus = detected
            if (gpus is not None and cluster.visible_gpus is not None and cluster.visible_gpus < gpus):
                raise ValueError(f"{cluster.gpu_source} says {gpus} GPUs per node but "
                                 f"CUDA_VISIBLE_DEVICES lists only {cluster.visible_gpus}")
        plan = plan_servers(cluster.nodes, gpus, tp_size=options.tp_size, pp_size=options.pp_size,
                            dp_size=options.dp_size, ep_size=options.ep_size,
                            num_servers=options.num_servers, port=options.port,
                            port_stride=options.port_stride, dist_init_port=options.dist_init_port,
                            engine=options.engine, gpu_source=cluster.gpu_source)
        bind_host = default_bind_host(options, cluster)
        log_dir = options.log_dir or ""
        self = cls(options, cluster, plan, log_dir, bind_host)
        self.env = dict(os.environ if env is None else env)
        return self

    def local_processes(self, node_rank: int | None = None) -> list[ManagedProcess]:
        """The server processes a node (default: this one) runs: one per server it takes part in."""
        node_rank = self.cluster.node_rank if node_rank is None else node_rank
        out = []
        for spec in self.plan:
            if node_rank not in spec.node_ids:
                continue
            rank = spec.node_ids.index(node_rank)
            name = f"server {spec.index}" + (f" node-rank {rank}" if spec.nnodes > 1 else "")
            stem = f"server{spec.index}" + (f"-rank{rank}" if spec.nnodes > 1 else "")
            log = os.path.join(self.log_dir, stem + ".log")
            out.append(ManagedProcess(name, server_command(spec, self.options, rank, self.bind_host),
                                      log, spec.url if rank == 0 else None))
        return out

    @property
    def runs_router(self) -> bool:
        return not self.options.no_router and self.cluster.node_rank == 0

    def router_process(self, prometheus_port: int | None = None) -> ManagedProcess:
        host = self.cluster.nodes[0]
        port = prometheus_port if prometheus_port is not None else (
            self.options.router_prometheus_port or _free_port(self.bind_host))
        return ManagedProcess("router", router_command(self.server_urls, self.options, self.bind_host, port),
                              os.path.join(self.log_dir, "router.log"),
                              f"http://{_url_host(host)}:{self.options.router_port}")

    def dry_run_lines(self) -> list[str]:
        lines = []
        for rank, node in enumerate(self.cluster.nodes):
            procs = self.local_processes(rank)
            lines.append(f"# node {rank}: {node} ({len(procs)} server process(es))")
            lines += [shlex.join(_redact(p.argv, self.api_key)) for p in procs]
        if not self.options.no_router:
            router = self.router_process()
            lines.append(f"# router on node 0 ({self.cluster.nodes[0]}), once every server is healthy")
            lines.append(shlex.join(_redact(router.argv, self.api_key)))
        return lines

    # -- lifecycle ------------------------------------------------------------------------
    @classmethod
    def start(cls, options: LaunchOptions | argparse.Namespace, env: Mapping[str, str] | None = None,
              stop_event: threading.Event | None = None, out=None) -> "EngineCluster":
        """Start this node's servers, wait for health, start the router (first node), wait for it
        to list every server. On any failure (or ``stop_event`` set) stop everything and raise.
        ``env`` (default os.environ) is read for SLURM settings and inherited by the processes."""
        self = cls.prepare(options, env)
        if not self.log_dir:
            self.log_dir = tempfile.mkdtemp(prefix="megatron-vespo-sglang-")
        os.makedirs(self.log_dir, exist_ok=True)
        self._out = out
        atexit.register(self.stop)
        try:
            self._start(stop_event)
        except BaseException:
            self.stop()
            raise
        return self

    def _say(self, message: str) -> None:
        if self._out is not None:
            print(message, file=self._out, flush=True)

    def _spawn(self, proc: ManagedProcess, env: dict) -> None:
        die_with_parent = threading.current_thread() is threading.main_thread()
        parent = os.getpid()
        with open(proc.log_path, "ab") as log:
            log.write(f"$ {shlex.join(_redact(proc.argv, self.api_key))}\n".encode())
            log.flush()
            proc.popen = subprocess.Popen(
                proc.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,  # own process group: stop() signals the server's whole tree
                preexec_fn=(lambda: _set_parent_death_signal(parent)) if die_with_parent else None)

    def _process_env(self) -> dict:
        env = dict(self.env)
        if self.options.engine == "local":
            # The local engine is this package: make it importable whatever the working directory.
            root = str(Path(__file__).resolve().parents[2])
            env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        return env

    def _wait_healthy(self, targets: list[tuple[str, str | None]], watched: list[ManagedProcess],
                      timeout: float, stop_event: threading.Event | None, what: str,
                      check=None) -> None:
        """Poll ``url`` of each (name, url) until it answers 200 (and ``check(body)`` holds),
        failing at once when a watched process exits."""
        deadline = time.monotonic() + timeout
        pending = [(n, u) for n, u in targets if u]
        last: dict[str, str] = {}
        while True:
            if stop_event is not None and stop_event.is_set():
                raise Interrupted()
            for proc in watched:
                if proc.exited() is not None:
                    raise proc.failure(f"exited before {what} was healthy")
            still = []
            for name, url in pending:
                ok, reason, body = _http_ok(url, self.api_key, timeout=5.0)
                if ok and check is not None:
                    ok, reason = check(body)
                if not ok:
                    last[name] = f"{url}: {reason}"
                    still.append((name, url))
            pending = still
            if not pending:
                return
            if time.monotonic() > deadline:
                raise LaunchError(f"{what} not healthy after {timeout:.0f} s: " + "; ".join(
                    f"{n} ({last.get(n)})" for n, _ in pending)
                    + "".join(f"\n--- {p.name} log {p.log_path}:\n{log_tail(p.log_path, 15)}" for p in watched))
            time.sleep(0.25)

    def _start(self, stop_event: threading.Event | None) -> None:
        env = self._process_env()
        self.servers = self.local_processes()
        self._say(f"logs: {self.log_dir}")
        for proc in self.servers:
            self._spawn(proc, env)
        timeout = self.options.health_timeout
        self._wait_healthy([(p.name, p.url and p.url + "/health") for p in self.servers], self.servers,
                           timeout, stop_event, "every server of this node")
        for proc in self.servers:
            if proc.url:
                self._say(f"server {proc.url}")
        if self.cluster.node_rank != 0:
            return  # the first node waits for the whole job, starts the router, writes the state
        remote = [(f"server {s.index}", s.url + "/health") for s in self.plan
                  if s.node_ids[0] != self.cluster.node_rank]
        if remote:
            self._say(f"waiting for {len(remote)} server(s) on other nodes (each node must run this launch)")
            self._wait_healthy(remote, self.servers, timeout, stop_event, "every server of the job")
        if self.runs_router:
            self._start_router(env, timeout, stop_event)
        if self.state_file:
            self._write_state()

    def _start_router(self, env: dict, timeout: float, stop_event: threading.Event | None) -> None:
        self.router = self.router_process()
        self._spawn(self.router, env)
        wanted = {u.rstrip("/") for u in self.server_urls}

        def all_workers_listed(body: bytes):
            # The router answers /health before it has registered its workers (it checks them in
            # the background), so ready means: /workers lists every server as healthy.
            try:
                workers = json.loads(body).get("workers", [])
            except (ValueError, AttributeError):
                return False, "unreadable /workers answer"
            healthy = {w.get("url", "").rstrip("/") for w in workers if w.get("is_healthy", True)}
            missing = wanted - healthy
            return (not missing), f"workers not registered yet: {sorted(missing)}"

        self._wait_healthy([("router", self.router.url + "/health")], [self.router, *self.servers],
                           timeout, stop_event, "the router", check=None)
        self._wait_healthy([("router", self.router.url + "/workers")], [self.router, *self.servers],
                           timeout, stop_event, "the router's worker list", check=all_workers_listed)
        self.router_url = self.router.url
        self._say(f"router {self.router_url}")

    def _write_state(self) -> None:
        state = {
            "router_url": self.router_url,
            "server_urls": self.server_urls,
            "api_key_set": bool(self.api_key),
            "engine": self.options.engine,
            "model": self.options.model,
            "log_dir": self.log_dir,
            "pids": {"launcher": os.getpid(),
                     "router": self.router.pid if self.router else None,
                     "servers": [p.pid for p in self.servers]},
            # Each pid leads its own process group (the server's children are in it too).
            "processes": [{"name": p.name, "url": p.url, "pid": p.pid, "log": p.log_path}
                          for p in ([self.router] if self.router else []) + self.servers],
        }
        path = Path(self.state_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, path)  # readers never see a half-written file
        self._state_written = True

    @property
    def processes(self) -> list[ManagedProcess]:
        return [p for p in ([self.router] if self.router else []) + self.servers if p.popen is not None]

    def pgids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def poll(self) -> ManagedProcess | None:
        """The first started process that has exited, or None."""
        for proc in self.processes:
            if proc.exited() is not None:
                return proc
        return None

    def wait(self, stop_event: threading.Event | None = None, interval_s: float = 0.5) -> None:
        """Block until ``stop_event`` is set (return) or a process exits (raise LaunchError)."""
        while stop_event is None or not stop_event.is_set():
            dead = self.poll()
            if dead is not None:
                raise dead.failure("exited")
            if stop_event is not None:
                stop_event.wait(interval_s)
            else:
                time.sleep(interval_s)

    def hurry(self) -> None:
        """Make a running or coming stop() skip the rest of its grace period."""
        self._hurry.set()

    def stop(self, grace_s: float | None = None) -> None:
        """SIGTERM to every process group (router first), SIGKILL what is left after the grace
        period, and wait until no process of those groups is alive. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        grace = self.options.shutdown_timeout if grace_s is None else grace_s
        if self._state_written:
            try:
                os.unlink(self.state_file)
            except OSError:
                pass
        procs = self.processes
        for proc in procs:
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and not self._hurry.is_set():
            for proc in procs:
                proc.popen.poll()
            if all(not _group_members(proc.pid) for proc in procs):
                break
            time.sleep(0.1)
        for proc in procs:
            if _group_members(proc.pid):
                _signal_group(proc.pid, signal.SIGKILL)
        for proc in procs:
            try:
                proc.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
                pass
        # Members that left the leader behind (reparented to init) need a moment to disappear.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_group_members(p.pid) for p in procs):
            time.sleep(0.05)

    def __enter__(self) -> "EngineCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    if options.dry_run:
        cluster = EngineCluster.prepare(options)
        print("\n".join(cluster.dry_run_lines()))
        return 0

    stop_event = threading.Event()
    holder: dict[str, EngineCluster] = {}

    def on_signal(signum, frame):
        # A second signal while shutting down means: do not wait out the grace period.
        if stop_event.is_set() and "cluster" in holder:
            holder["cluster"].hurry()
        stop_event.set()

    signals = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
    previous = {s: signal.signal(s, on_signal) for s in signals}
    cluster = None
    try:
        try:
            cluster = EngineCluster.start(options, stop_event=stop_event, out=sys.stdout)
            holder["cluster"] = cluster
        except Interrupted:
            print("interrupted while starting; stopped", file=sys.stderr)
            return 0
        except LaunchError as err:
            print(f"megatron-vespo sglang launch: error: {err}", file=sys.stderr)
            return 1
        print("ready" + (f" (state file {options.state_file})" if cluster._state_written else ""), flush=True)
        try:
            cluster.wait(stop_event)
        except LaunchError as err:
            print(f"megatron-vespo sglang launch: error (stopping everything): {err}", file=sys.stderr)
            return 1
        print("stopping", file=sys.stderr, flush=True)
        return 0
    finally:
        if cluster is not None:
            cluster.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)

"""Rollout engines for the tests: the project's local engine, or real SGLang 0.5.23 on the CPU.

Real SGLang lives in its own venv (``.venv-sglang``, set up once by ``make test`` /
``make sglang-venv``: it pins torch 2.14.1) and starts through the project's own launcher
(``EngineCluster``, what ``megatron-vespo sglang launch`` runs), with:

* ``--device cpu --attention-backend torch_native``: SGLang's CPU path (plain PyTorch layers on a
  CPU without AMX); ``--disable-overlap-schedule`` (it needs CUDA streams); ``--skip-tokenizer-init``
  (the tiny test models have no tokenizer: token ids in and out);
* ``SGLANG_USE_CPU_ENGINE=1`` and, on the servers' PYTHONPATH, ``tests/sglang_cpu``: a test-only
  stand-in for the compiled ``sgl_kernel`` (CUDA-only on the registry) and a ``sitecustomize`` that
  adds the "cpu" entry SGLang's host allocator lacks (``--enable-return-routed-experts`` on CPU).

Servers are stopped by process group (``EngineCluster.stop``)."""

from __future__ import annotations

import json
import os
import random
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from megatron_vespo.rollout.launch import EngineCluster, LaunchOptions

ROOT = Path(__file__).resolve().parents[1]
SGLANG_PYTHON = ROOT / ".venv-sglang" / "bin" / "python"
SGLANG_CPU = ROOT / "tests" / "sglang_cpu"
# --sleep-on-idle: an idle scheduler otherwise polls without pause, a whole core per server (half
# of this 2-core machine), slowing every test that runs beside a server
SGLANG_CPU_ARGS = ("--device cpu --attention-backend torch_native --disable-overlap-schedule --skip-tokenizer-init "
                   "--max-total-tokens 8192 --sleep-on-idle")
ENGINES = ("local", "sglang")


def require_sglang() -> None:
    if not SGLANG_PYTHON.exists():
        pytest.fail(f"real SGLang is not set up ({SGLANG_PYTHON} is missing): run `make sglang-venv` "
                    "(`make test` does it)")


def sglang_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    # SGLang's venv has its own packages: only the stand-in and the allocator fix go on its path
    env["PYTHONPATH"] = os.pathsep.join([str(SGLANG_CPU), str(SGLANG_CPU / "site")])
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.update(extra or {})
    return env


def start_cluster(engine: str, model_dir, log_dir, *, num_servers: int = 1, router: bool = False,
                  api_key: str | None = None, routed_experts: bool = True, dtype: str = "float32",
                  extra_server_args: str = "", dp_size: int = 1, env: dict | None = None) -> EngineCluster:
    """``num_servers`` servers of ``engine`` on 127.0.0.1 (free ports), and the real sglang-router in
    front of them when ``router``; returns once every one answers /health_generate."""
    stride = 17 if engine == "sglang" else 1  # SGLang takes ports next to its own for internal use
    base = _free_block(num_servers * stride + 1)
    options = LaunchOptions(model=str(model_dir), engine=engine, num_servers=num_servers, dtype=dtype,
                            port=base, port_stride=stride, router_port=base + num_servers * stride, api_key=api_key,
                            log_dir=str(log_dir), health_timeout=300, no_router=not router, shutdown_timeout=10,
                            enable_return_routed_experts=routed_experts, dp_size=dp_size,
                            extra_server_args=extra_server_args)
    if engine == "sglang":
        require_sglang()
        options.server_python = str(SGLANG_PYTHON)
        options.gpus_per_node = num_servers * dp_size  # placement only: the servers run on the CPU
        options.extra_server_args = f"{SGLANG_CPU_ARGS} {extra_server_args}".strip()
        # SGLang binds each CPU rank to the bind group of its global GPU id (the launcher's placement
        # gives server i GPU i): one group per GPU id, all cores each, or a core per rank of a dp server
        groups = num_servers * dp_size
        cores = "|".join([f"0-{os.cpu_count() - 1}"] * groups) if dp_size == 1 else \
            "|".join(str(i % os.cpu_count()) for i in range(groups))
        env = sglang_env({"SGLANG_CPU_OMP_THREADS_BIND": cores, **(env or {})})
    return EngineCluster.start(options, env=env)


def _free_block(count: int) -> int:
    """The first of ``count`` consecutive ports that are all free now (servers and the router get
    ports of one block, so none collides with another's), below both the kernel's ephemeral range
    (outgoing connections take ports there at any time) and SGLang's own pick of 22000-29999."""
    for _ in range(200):
        base = random.randrange(12000, 21000 - count)
        try:
            for port in range(base, base + count):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {count} consecutive free ports found")


def http(url, path, body=None, method=None, timeout=30, raw=None, headers=None, api_key=None):
    """(status, decoded JSON or text) of one HTTP call to an engine. ``raw``: bytes (or an iterable
    of bytes: sent chunked) as is, instead of ``body`` as JSON."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    sent = {"Content-Type": "application/json", **(headers or {})}
    if api_key:
        sent["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url + path, data=data, method=method or ("GET" if data is None else "POST"),
                                     headers=sent)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            status, text = answer.status, answer.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    try:
        return status, json.loads(text) if text else None
    except json.JSONDecodeError:
        return status, text


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and OpenMP threads stall when other
    processes share the cores; restore the setting for the rest of the session."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

import contextlib
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIST = Path(__file__).resolve().parent / "dist"

warnings.filterwarnings("ignore", module=r"megatron\.")


def _env():
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONWARNINGS"] = "ignore"
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def torchrun(script: str, nproc: int, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run tests/dist/<script> on ``nproc`` gloo processes; fail the test with its output on error."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(DIST / script), *args]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        errors = "\n".join(line for line in proc.stderr.splitlines()
                           if "Error" in line or "error" in line or "assert" in line)[-4000:]
        pytest.fail(f"{script} {' '.join(args)} failed (exit {proc.returncode}):\n"
                    f"{proc.stdout[-3000:]}\n--- error lines ---\n{errors}\n--- stderr tail ---\n"
                    f"{proc.stderr[-3000:]}")
    return proc


def find_executable(name: str, env_var: str) -> str | None:
    """A command-line tool: ``$env_var``, else next to this Python (installed by the test extra),
    else on PATH; None when absent."""
    for candidate in (os.environ.get(env_var), str(Path(sys.executable).parent / name), shutil.which(name)):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def run_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_vespo", *args], env=_env(),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


# -- the fast tier ------------------------------------------------------------------------------
# `make test-fast` runs `pytest -m "not slow"`: unit tests in this process only. A test (or a
# fixture it sets up) that starts a Python interpreter, torchrun, a CLI of the project or SLURM
# must be marked slow; unmarked, it fails here at once, naming itself, so the tier stays honest.

PROCESS_WORDS = ("python", "torchrun", "torch.distributed.run", "megatron_vespo", "megatron-vespo", "sbatch",
                 "slurm_localhost", "sglang", "bash")


def _starts_a_heavy_process(args) -> bool:
    argv = [str(a) for a in args] if isinstance(args, (list, tuple)) else str(args).split()
    return any(word in os.path.basename(argv[0]) or word in " ".join(argv[:3]) for word in PROCESS_WORDS) \
        if argv else False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with _processes_refused_unless_slow(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with _processes_refused_unless_slow(item):
        yield


class _Refused(contextlib.ContextDecorator):
    def __init__(self, item):
        self.item = item

    def __enter__(self):
        self.real = subprocess.Popen.__init__
        real, nodeid = self.real, self.item.nodeid

        def guarded(popen, args, *rest, **kwargs):
            if _starts_a_heavy_process(args):
                raise RuntimeError(f"{nodeid} starts {args if isinstance(args, str) else list(args)[:4]} but is not "
                                   "marked slow (pytest.mark.slow): the fast tier runs no subprocesses")
            real(popen, args, *rest, **kwargs)

        subprocess.Popen.__init__ = guarded
        return self

    def __exit__(self, *exc):
        subprocess.Popen.__init__ = self.real
        return False


def _processes_refused_unless_slow(item):
    if item.get_closest_marker("slow") is not None:
        return contextlib.nullcontext()
    return _Refused(item)

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

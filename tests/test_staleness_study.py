"""tools/staleness_study.py end to end on a tiny budget: 2 losses x N in {1, 2}, one rollout batch of
4 samples each. Checks the plumbing (one run per configuration with the study's frozen copy of the code,
results.json / table.md / the plot, finite statistics, the per-loss correction) and that a rerun
skips the finished runs.

The warm-started demo model is cached in pytest's cache directory (its build is the slow part;
``build_model`` stamps it, so a stale or partial copy is rebuilt); the runs go to tmp_path.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, _env

pytestmark = pytest.mark.slow  # every test here starts processes (conftest: the fast tier)

TOOL = os.path.join(ROOT, "tools", "staleness_study.py")
TINY = ["rollout.prompts_per_batch=2", "rollout.group_size=2", "rollout.max_new_tokens=4"]


@pytest.fixture(scope="module")
def model_dir(request, tmp_path_factory):
    cache = getattr(request.config, "cache", None)
    base = cache.mkdir("staleness_study") if cache is not None else tmp_path_factory.mktemp("staleness_study")
    return str(base / "model")


def _study(out, model_dir, *extra, timeout=600):
    cmd = [sys.executable, TOOL, "--out", str(out), "--model-dir", model_dir, "--staleness", "1,2",
           "--losses", "vespo,grpo", "--rollout-batches", "1", "--seeds", "1", "--jobs", "2", *extra, *TINY]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_study_plumbing_and_resume(tmp_path, model_dir):
    out = tmp_path / "study"
    proc = _study(out, model_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    configs = {("vespo", 1), ("vespo", 2), ("grpo", 1), ("grpo", 2)}

    results = json.loads((out / "results.json").read_text())
    assert results["failed"] == []
    assert {(r["loss"], r["n"]) for r in results["runs"]} == configs and len(results["runs"]) == 4
    assert {(r["loss"], r["n"]) for r in results["rows"]} == configs and len(results["rows"]) == 4
    for run in results["runs"]:
        # the same K = 1 rollout batch for every N: N training steps, plus the final-eval step
        assert run["train_steps"] == run["n"] and run["steps"] == run["n"] + 1
        assert len(run["reward_per_batch"]) == 1
        for key in ("reward_start", "reward_final", "reward_best", "reward_after", "bad_step_frac"):
            assert _finite(run[key]), (run["loss"], run["n"], key, run[key])
        assert 0.0 <= run["bad_step_frac"] <= 1.0
        assert (run["phi_mean"] is not None) == (run["loss"] == "vespo")  # phi is VESPO's alone
        if run["phi_mean"] is not None:
            assert _finite(run["phi_mean"])
        run_dir = out / "runs" / f"{run['loss']}_N{run['n']}_s1"
        config = (run_dir / "config.yaml").read_text()
        # every run used the study's frozen copy of the package, not the working tree
        assert f"code: {out / 'code' / 'megatron_vespo' / '__init__.py'}" in (run_dir / "stderr.log").read_text()
        assert f"staleness: {run['n']}" in config and "micro_batch_size: 0" in config
        assert ("correction: fold" if run["loss"] == "vespo" else "correction: tis") in config
    assert not any((out / "runs").glob("*/checkpoints"))  # deleted unless --keep-checkpoints

    table = (out / "table.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| vespo |") or line.startswith("| grpo |")]
    assert len(rows) == 4
    assert {tuple(c.strip() for c in line.split("|")[1:3]) for line in rows} == {(l, str(n)) for l, n in configs}
    png = (out / "staleness.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # a rerun skips every finished run and rewrites the same statistics
    summaries = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}
    assert len(summaries) == 4
    again = _study(out, model_dir)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("skipped") == 4 and "running" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in summaries} == summaries
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]


def test_a_staleness_that_does_not_divide_the_rollout_batch_fails_before_running(tmp_path, model_dir):
    out = tmp_path / "bad"
    cmd = [sys.executable, TOOL, "--out", str(out), "--model-dir", model_dir, "--staleness", "1,3",
           "--losses", "vespo", "--rollout-batches", "1", *TINY]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "vespo_N3_s1" in proc.stderr and "does not divide the rollout batch of 4 samples" in proc.stderr
    assert not any((out / "runs").iterdir())

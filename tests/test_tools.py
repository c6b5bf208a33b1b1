"""tools/plot_kernel.py and tools/metrics_to_csv.py.

The effective-weight checks compare the plot tool's autograd measurement through the real losses
against closed forms read off losses.py / kernel.py, so a change to either side shows up here.
"""

import csv
import importlib.util
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from megatron_vespo import kernel, losses
from megatron_vespo.losses import LossConfig, TokenBatch
from tests.conftest import ROOT, _env

PLOT_TOOL = os.path.join(ROOT, "tools", "plot_kernel.py")
CSV_TOOL = os.path.join(ROOT, "tools", "metrics_to_csv.py")


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pk():
    return _load(PLOT_TOOL, "plot_kernel_tool")


def _run(tool, *args, cwd=ROOT):
    return subprocess.run([sys.executable, tool, *args], env=_env(), capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def _weights(pk, cfg, w, sign, name, tokens=1):
    return pk.effective_weights(cfg, w, sign, [name], tokens)[name].tolist()


# -- plot_kernel: effective weights -------------------------------------------------------------

@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("sign", [1, -1])
def test_vespo_weight_is_phi(pk, sign, tokens):
    cfg = LossConfig(k_pos=1.5, lambda_pos=2.5, k_neg=3.5, lambda_neg=1.2)
    w = torch.linspace(0.01, 5.0, 300, dtype=torch.float64)
    got = pk.effective_weights(cfg, w, sign, ["vespo"], tokens)["vespo"]
    k, lam = (cfg.k_pos, cfg.lambda_pos) if sign > 0 else (cfg.k_neg, cfg.lambda_neg)
    torch.testing.assert_close(got, kernel.phi_of_w(w, k, lam), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("sign", [1, -1])
def test_every_loss_has_weight_one_on_policy(pk, sign):
    got = pk.effective_weights(LossConfig(), [1.0], sign, None, tokens=2)
    assert set(got) == set(losses.LOSSES)
    for name, value in got.items():
        assert float(value[0]) == pytest.approx(1.0, abs=1e-9), name


def test_grpo_weight_is_ratio_inside_and_zero_where_clip_stops(pk):
    # d(-A r)/d log pi = -A r: the weight on grad log pi is the token ratio r itself, not 1.
    cfg = LossConfig()  # eps 0.2 / 0.28, dual clip c = 3
    w = [0.5, 0.9, 1.1, 1.2, 1.5, 2.5, 4.0]
    assert _weights(pk, cfg, w, 1, "grpo") == pytest.approx([0.5, 0.9, 1.1, 1.2, 0, 0, 0], abs=1e-9)
    assert _weights(pk, cfg, w, -1, "grpo") == pytest.approx([0, 0.9, 1.1, 1.2, 1.5, 2.5, 0], abs=1e-9)
    no_dual = cfg.replace(dual_clip_c=None)
    assert _weights(pk, no_dual, [4.0], -1, "grpo") == pytest.approx([4.0])
    # Two tokens: each sees W^(1/2), so the clip acts at W = 1.28^2.
    assert _weights(pk, cfg, [1.44, 1.69], 1, "grpo", tokens=2) == pytest.approx([1.2, 0.0], abs=1e-9)


def test_cispo_weight_is_clipped_ratio_for_both_signs(pk):
    cfg = LossConfig()  # low bound max(0, 1 - 1) = 0, high 1.28
    w = [0.3, 0.9, 1.2, 2.0, 5.0]
    for sign in (1, -1):
        assert _weights(pk, cfg, w, sign, "cispo") == pytest.approx([0.3, 0.9, 1.2, 1.28, 1.28])
    assert _weights(pk, cfg.replace(cispo_eps_low=0.5), [0.3], 1, "cispo") == pytest.approx([0.5])


def test_gspo_weight_uses_geometric_mean_ratio(pk):
    cfg = LossConfig()  # clip of s = W^(1/T) to [1 - 3e-4, 1 + 4e-4]
    w_in, w_out = 1.0002 ** 4, 1.01
    s_out = w_out ** 0.25
    assert _weights(pk, cfg, [w_in, w_out], 1, "gspo", tokens=4) == pytest.approx([1.0002, 0.0], abs=1e-9)
    assert _weights(pk, cfg, [w_in, w_out], -1, "gspo", tokens=4) == pytest.approx([1.0002, s_out], abs=1e-9)


def test_sapo_weight_is_soft_gate_derivative(pk):
    cfg = LossConfig(sapo_tau_pos=1.0, sapo_tau_neg=2.0)
    w = [0.5, 1.5, 3.0]
    for sign, tau in ((1, 1.0), (-1, 2.0)):
        expected = []
        for r in w:
            s = 1 / (1 + math.exp(-tau * (r - 1)))
            expected.append(4 * s * (1 - s) * r)  # d/d log pi of sigmoid(tau (r-1)) * 4 / tau
        assert _weights(pk, cfg, w, sign, "sapo") == pytest.approx(expected, rel=1e-9)


def test_gmpo_weight_clips_in_log_space(pk):
    cfg = LossConfig()  # |log r| clip 0.4
    w = [0.5, 1.3, 2.0]
    assert _weights(pk, cfg, w, 1, "gmpo") == pytest.approx([0.5, 1.3, 0.0], abs=1e-9)
    assert _weights(pk, cfg, w, -1, "gmpo") == pytest.approx([0.0, 1.3, 2.0], abs=1e-9)


@pytest.mark.slow
def test_plot_cli_writes_png_json_and_table(tmp_path):
    png, js = tmp_path / "kernel.png", tmp_path / "weights.json"
    proc = _run(PLOT_TOOL, "--k-pos", "2", "--lambda-pos", "4", "--w-max", "2.5", "--points", "80",
                "--out", str(png), "--json", str(js))
    assert proc.returncode == 0, proc.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    out = json.loads(js.read_text())
    assert {"params", "normalisation", "w", "bounds", "phi", "surrogate", "weights"} <= set(out)
    assert len(out["w"]) == 80 and out["w"][-1] == pytest.approx(2.5)
    for sign in ("pos", "neg"):
        assert set(out["weights"][sign]) == set(losses.LOSSES)
        assert all(len(v) == 80 for v in out["weights"][sign].values())
        assert len(out["phi"][sign]) == len(out["surrogate"][sign]) == 80
    assert out["bounds"]["pos"]["w_star"] == pytest.approx(0.5)
    assert out["bounds"]["neg"]["w_star"] == pytest.approx(kernel.DEFAULT_K_NEG / kernel.DEFAULT_LAMBDA_NEG)
    assert out["weights"]["pos"]["vespo"] == pytest.approx(out["phi"]["pos"], rel=1e-6)
    assert out["params"]["clip_eps_high"] == LossConfig().clip_eps_high
    assert "A > 0" in proc.stdout and "A < 0" in proc.stdout and "vespo" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args, flag", [
    (["--k-pos", "0"], "--k-pos"),
    (["--out", "/nonexistent-dir/k.png"], "--out"),
])
def test_plot_cli_bad_input_subprocess(tmp_path, args, flag):
    proc = _run(PLOT_TOOL, *(["--out", str(tmp_path / "k.png")] if flag != "--out" else []), *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], proc.stderr
    assert not (tmp_path / "k.png").exists()


@pytest.mark.parametrize("args, flag", [
    (["--k-pos", "-1"], "--k-pos"),
    (["--k-pos", "abc"], "--k-pos"),
    (["--lambda-neg", "0"], "--lambda-neg"),
    (["--k-neg", "nan"], "--k-neg"),
    (["--w-max", "-3"], "--w-max"),
    (["--sapo-tau-neg", "0"], "--sapo-tau-neg"),
    (["--dual-clip-c", "0.5"], "--dual-clip-c"),
    (["--losses", "vespo,ppo"], "--losses"),
])
def test_plot_cli_bad_input_in_process(pk, tmp_path, capsys, args, flag):
    try:
        code = pk.main(["--out", str(tmp_path / "k.png"), *args])
    except SystemExit as exc:  # argparse's own type errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0]


def test_plot_cli_out_is_directory(pk, tmp_path, capsys):
    assert pk.main(["--out", str(tmp_path)]) == 2
    assert "--out" in capsys.readouterr().err


# -- metrics_to_csv -----------------------------------------------------------------------------

ROWS = [
    {"step": 1, "reward/mean": 0.5, "policy_loss": -0.25, "lr": 1e-3},
    {"step": 2, "reward/mean": 0.75, "timing": {"fwd": 1.5, "bwd": {"total": 2.0}}, "lags": [0, 1],
     "update_skipped": True},
    {"policy_loss": 0.125, "step": 3, "lr": None, "note": "a,b"},
]


def _write_jsonl(path, rows, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


def _csv(text):
    return list(csv.reader(io.StringIO(text)))


@pytest.mark.slow
def test_csv_union_of_columns_and_cells(tmp_path):
    src = _write_jsonl(tmp_path / "metrics.jsonl", ROWS)
    proc = _run(CSV_TOOL, str(tmp_path))  # a run directory resolves to its metrics.jsonl
    assert proc.returncode == 0, proc.stderr
    table = _csv(proc.stdout)
    header = table[0]
    assert header == ["step", "reward/mean", "policy_loss", "lr", "timing/fwd", "timing/bwd/total",
                      "lags", "update_skipped", "note"]
    rows = [dict(zip(header, r)) for r in table[1:]]
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["timing/fwd"] == "" and rows[1]["policy_loss"] == "" and rows[2]["reward/mean"] == ""
    assert float(rows[0]["lr"]) == 1e-3 and rows[2]["lr"] == ""  # JSON null -> empty
    assert rows[1]["timing/bwd/total"] == "2.0" and json.loads(rows[1]["lags"]) == [0, 1]
    assert rows[1]["update_skipped"] == "true" and rows[2]["note"] == "a,b"
    assert float(rows[2]["policy_loss"]) == 0.125

    out = tmp_path / "sel.csv"
    proc = _run(CSV_TOOL, str(src), "--columns", "policy_loss, step", "--out", str(out))
    assert proc.returncode == 0 and proc.stdout == ""
    assert _csv(out.read_text()) == [["policy_loss", "step"], ["-0.25", "1"], ["", "2"], ["0.125", "3"]]

    proc = _run(CSV_TOOL, str(src), "--sort")
    header = _csv(proc.stdout)[0]
    assert header[0] == "step" and header[1:] == sorted(header[1:])


@pytest.mark.slow
def test_csv_truncated_last_line_is_a_warning(tmp_path):
    src = _write_jsonl(tmp_path / "metrics.jsonl", ROWS[:2], tail='{"step": 3, "reward/me')
    proc = _run(CSV_TOOL, str(src))
    assert proc.returncode == 0
    assert "warning" in proc.stderr and "metrics.jsonl:3" in proc.stderr
    assert [r[0] for r in _csv(proc.stdout)[1:]] == ["1", "2"]


@pytest.mark.slow
def test_csv_malformed_middle_line_is_an_error(tmp_path):
    src = tmp_path / "metrics.jsonl"
    src.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"step": 2, oops}\n' + json.dumps(ROWS[2]) + "\n")
    out = tmp_path / "x.csv"
    proc = _run(CSV_TOOL, str(src), "--out", str(out))
    assert proc.returncode == 1
    assert f"{src}:3" in proc.stderr and "malformed" in proc.stderr
    assert not out.exists()
    src.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n" + json.dumps(ROWS[2]) + "\n")
    proc = _run(CSV_TOOL, str(src))
    assert proc.returncode == 1 and f"{src}:2" in proc.stderr and "object" in proc.stderr


@pytest.mark.slow
def test_csv_argument_errors(tmp_path):
    src = _write_jsonl(tmp_path / "metrics.jsonl", ROWS)
    proc = _run(CSV_TOOL, str(src), "--columns", "step,reward/mean,nope")
    assert proc.returncode == 2
    assert "nope" in proc.stderr and "available: step, reward/mean" in proc.stderr
    assert proc.stdout == ""
    proc = _run(CSV_TOOL, str(tmp_path / "missing"))
    assert proc.returncode == 2 and "missing" in proc.stderr
    (tmp_path / "empty_run").mkdir()
    proc = _run(CSV_TOOL, str(tmp_path / "empty_run"))
    assert proc.returncode == 2 and "metrics.jsonl" in proc.stderr

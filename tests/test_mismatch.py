"""The mismatch statistics (megatron_vespo/mismatch.py) on constructed inputs, and
``megatron-vespo mismatch`` end to end against the local engine: the trainer's log-probs equal a
transformers fp32 forward, every layout gives the single-process numbers, a bf16 engine shows a
real mismatch that an fp32 engine does not, and bad input fails before anything starts."""

import json
import math

import numpy as np
import pytest
import torch

from megatron_vespo import kernel, mismatch
from megatron_vespo.losses import LossConfig
from megatron_vespo.train.trainer import routing_agreement
from tests.conftest import run_cli
from tests.hf_models import make_hf_model

PROMPTS = [[5, 6, 7, 8, 9, 10], [3, 4, 50], [20, 21, 22, 23, 24, 25, 26, 27], [100, 1, 2, 3]]


# ----------------------------------------------------------------------------- statistics
def test_token_report_kl_estimators_and_histogram():
    deltas = [np.array([0.1, -0.2, 0.0]), np.array([0.5]), np.array([-1e-5, 30.0])]
    report = mismatch.token_report(mismatch.token_deltas(
        [np.zeros(3), np.zeros(1), np.zeros(2)], [-d for d in deltas]))
    d = np.array([0.1, -0.2, 0.0, 0.5, -1e-5, kernel.LOG_RATIO_CLAMP])  # the loss's clamp applies
    assert report["tokens"] == 6
    assert report["kl"]["k1"] == pytest.approx(float(np.mean(-d)))
    assert report["kl"]["k2"] == pytest.approx(float(np.mean(d * d / 2)))
    assert report["kl"]["k3"] == pytest.approx(float(np.mean(np.exp(d) - 1 - d)))
    assert report["abs_delta"]["max"] == pytest.approx(kernel.LOG_RATIO_CLAMP)
    assert report["abs_delta"]["p50"] == pytest.approx(float(np.quantile(np.abs(d), 0.5)))
    counts = report["histogram"]["counts"]
    assert sum(counts) == 6 and counts[0] == 1  # the exact zero has its own bin
    assert report["frac_abs_delta_above"]["0.1"] == pytest.approx(3 / 6)  # 0.2, 0.5, 20 (0.1 is not above)


def test_token_deltas_name_the_bad_sample():
    with pytest.raises(ValueError, match="sample 1: trainer log-probs have shape"):
        mismatch.token_deltas([np.zeros(2), np.zeros(3)], [np.zeros(2), np.zeros(2)])
    with pytest.raises(ValueError, match="sample 0: log-probs are not finite"):
        mismatch.token_deltas([np.array([np.nan])], [np.zeros(1)])
    with pytest.raises(ValueError, match="2 trainer log-prob arrays for 1 engine"):
        mismatch.token_deltas([np.zeros(1)] * 2, [np.zeros(1)])


def test_sequence_report_phi_zero_and_length_bins():
    cfg = LossConfig()
    # 6 short sequences on-policy (W = 1, phi = 1) and 4 long ones far off (phi ~ 0 for either sign)
    deltas = [np.zeros(3)] * 6 + [np.full(40, -1.0)] * 4
    report = mismatch.sequence_report(deltas, cfg, n_bins=2)
    assert report["sequences"] == 10
    assert report["phi_zero_frac"] == {"adv_pos": pytest.approx(0.4), "adv_neg": pytest.approx(0.4)}
    assert report["phi_below"]["0.5"]["adv_pos"] == pytest.approx(0.4)
    assert report["log_w"]["min"] == pytest.approx(-40.0)
    assert sum(b["sequences"] for b in report["by_length"]) == 10
    long_bin = report["by_length"][-1]
    assert long_bin["len_to"] == 40 and long_bin["phi_zero_frac"]["adv_pos"] == 1.0
    assert report["by_length"][0]["phi_zero_frac"]["adv_pos"] == 0.0
    assert report["corr_len_abs_log_w"] == pytest.approx(1.0)
    # phi as the trainer computes it, for both signs of the advantage
    w = torch.tensor([math.log(0.5)], dtype=torch.float64)
    half = mismatch.sequence_report([np.array([math.log(0.5)])], cfg)
    assert half["phi_mean"]["adv_pos"] == pytest.approx(float(kernel.phi(w, torch.ones(1))))
    assert half["phi_mean"]["adv_neg"] == pytest.approx(float(kernel.phi(w, -torch.ones(1))))


def _routes(rows, layers=4, k=2, experts=8, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([np.stack([rng.choice(experts, k, replace=False) for _ in range(layers)]) for _ in range(rows)])


def test_routing_agreement_per_layer():
    prompt_len, length = 5, 9  # 4 prompt rows (0..3) compute prompt tokens, rows 4..8 the response
    trainer = _routes(length).astype(np.int32)
    engine = trainer[:length - 1].copy()  # the engine has no row for the last token
    engine[:, 1] = engine[:, 1, ::-1]  # the same set in another order is agreement
    engine[4:6, 2, 0] = 99  # layer 2: two response rows change one of their two experts
    engine[0, 3] = [98, 97]  # layer 3: one prompt row changes both experts
    out = mismatch.routing_agreement_per_layer([engine], [trainer], [prompt_len], moe_layers=[1, 2, 3])
    response_rows = length - 1 - (prompt_len - 1)  # rows 4..7: the engine's response rows
    assert out["response"]["tokens"] == response_rows and out["prompt"]["tokens"] == prompt_len - 1
    assert out["response"]["exact"] == pytest.approx([1.0, 1 - 2 / response_rows, 1.0])
    assert out["response"]["overlap"] == pytest.approx([1.0, 1 - 0.5 * 2 / response_rows, 1.0])
    assert out["prompt"]["exact"] == pytest.approx([1.0, 1.0, 1 - 1 / (prompt_len - 1)])
    assert out["prompt"]["overlap"] == pytest.approx([1.0, 1.0, 1 - 1 / (prompt_len - 1)])
    # the trainer's logged number: the mean over MoE layers of the response agreement
    assert routing_agreement([engine], [trainer], dense_layers=(0,), prompt_lens=[prompt_len]) == \
        pytest.approx(np.mean(out["response"]["exact"]))
    with pytest.raises(ValueError, match="sample 0: routes of shape"):
        mismatch.routing_agreement_per_layer([engine[:, :2]], [trainer], [prompt_len], [1])


# ----------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mismatch")
    make_hf_model("qwen3_moe", str(root / "moe"))
    make_hf_model("llama", str(root / "dense"))
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in PROMPTS))
    return root


def _study(setup, out, *extra):
    proc = run_cli("mismatch", "--engine", "local", "--model", str(setup / "moe"), "--prompts",
                   str(setup / "prompts.jsonl"), "--n", "2", "--max-new-tokens", "8", "--micro-batch-size", "2",
                   "--out", str(out), *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return proc, report, samples


def _hf_logprobs(model_dir, samples):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for s in samples:
            tokens = torch.tensor([s["prompt_ids"] + s["response_ids"]])
            logp = torch.log_softmax(model(tokens).logits[0, :-1].float(), -1)
            logp = logp.gather(1, tokens[0, 1:, None]).squeeze(1)
            out.append(logp[len(s["prompt_ids"]) - 1:].numpy())
    return out


@pytest.mark.slow
def test_bf16_engine_study_with_r3(setup, tmp_path):
    proc, report, samples = _study(setup, tmp_path / "bf16", "--r3")
    assert report["samples"] == len(samples) == 2 * len(PROMPTS) and report["engine"]["dtype"] == "bfloat16"
    # the trainer scored exactly the engine's tokens, as a transformers fp32 forward does
    for s, ref in zip(samples, _hf_logprobs(setup / "moe", samples)):
        assert len(s["engine_logprobs"]) == len(s["response_ids"])
        np.testing.assert_allclose(s["trainer_logprobs"], ref, atol=1e-4)
    for name in ("no_replay", "r3"):
        p = report["passes"][name]
        deltas = [np.asarray(s["trainer_logprobs" if name == "no_replay" else "trainer_logprobs_r3"])
                  - np.asarray(s["engine_logprobs"]) for s in samples]
        assert p["token"]["tokens"] == sum(d.size for d in deltas)
        assert p["token"]["abs_delta"]["mean"] == pytest.approx(np.mean(np.abs(np.concatenate(deltas))))
        np.testing.assert_allclose(p["sequence"]["per_sequence"]["log_w"], [d.sum() for d in deltas], atol=1e-9)
        # bf16 rounding against fp32: a real, visible mismatch
        assert p["token"]["abs_delta"]["mean"] > 1e-3
    routing = report["passes"]["no_replay"]["routing"]
    assert routing["moe_layers"] == [1, 2, 3] and len(routing["response"]["exact"]) == 3
    assert "replayed" in report["passes"]["r3"]["routing"]
    for name in ("token_mismatch.png", "log_w_vs_length.png", "routing_agreement.png"):
        data = (tmp_path / "bf16" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert "with R3 routing replay" in proc.stdout and "KL(engine||trainer)" in proc.stdout


@pytest.fixture(scope="module")
def fp32_single(setup, tmp_path_factory):
    # one request at a time: fp32 rollouts are bitwise reproducible, so layouts see the same tokens
    return _study(setup, tmp_path_factory.mktemp("fp32") / "single", "--engine-dtype", "float32",
                  "--max-concurrency", "1", "--r3")


@pytest.mark.slow
def test_fp32_engine_matches_the_trainer(fp32_single):
    _, report, _ = fp32_single
    for p in report["passes"].values():
        assert p["token"]["abs_delta"]["max"] < 1e-4
        assert p["sequence"]["phi_zero_frac"] == {"adv_pos": 0.0, "adv_neg": 0.0}
    assert report["passes"]["no_replay"]["routing"]["response"]["exact_mean"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--ep", "2"], ["--tp", "2"], ["--pp", "2"], ["--cp", "2"]],
                         ids=["ep2", "tp2", "pp2", "cp2"])
def test_layouts_equal_single_process(setup, tmp_path, fp32_single, layout):
    _, ref_report, ref = fp32_single
    _, report, samples = _study(setup, tmp_path / "layout", "--engine-dtype", "float32", "--max-concurrency", "1",
                                "--r3", *layout)
    assert [s["response_ids"] for s in samples] == [s["response_ids"] for s in ref]
    for s, r in zip(samples, ref):
        np.testing.assert_allclose(s["trainer_logprobs"], r["trainer_logprobs"], atol=1e-5)
        np.testing.assert_allclose(s["trainer_logprobs_r3"], r["trainer_logprobs_r3"], atol=1e-5)
    assert report["passes"]["no_replay"]["routing"]["response"]["exact"] == \
        ref_report["passes"]["no_replay"]["routing"]["response"]["exact"]


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--engine", "ftp://host:1"], "--engine must be 'local' or http"),
    (["--n", "0"], "--n must be >= 1"),
    (["--prompts", "/nonexistent.jsonl"], "--prompts /nonexistent.jsonl: no such file"),
    (["--tp", "3"], "not divisible by tp = 3"),
    (["--phi-zero", "2"], "--phi-zero must lie in"),
])
def test_bad_input_fails_before_starting(setup, tmp_path, args, message):
    base = {"--engine": "local", "--model": str(setup / "moe"), "--prompts": str(setup / "prompts.jsonl"),
            "--out": str(tmp_path / "o")}
    for key, value in zip(args[::2], args[1::2]):
        base[key] = value
    proc = run_cli("mismatch", *[x for kv in base.items() for x in kv])
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "starting" not in proc.stderr and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_r3_needs_a_moe_model(setup, tmp_path):
    proc = run_cli("mismatch", "--engine", "local", "--model", str(setup / "dense"), "--prompts",
                   str(setup / "prompts.jsonl"), "--r3", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "dense model" in proc.stderr, proc.stderr[-2000:]

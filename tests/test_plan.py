"""``megatron-vespo plan``: the formulas on hand-computed cases, the command, and docs/PLAN.md's
worked example; the slow test compares one layout with a real CPU training step."""

from __future__ import annotations

import dataclasses

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_vespo.mcore.model import MoEModelConfig
from megatron_vespo.mcore.parallel import Layout
from megatron_vespo.parity.worker import tiny_model_config
from megatron_vespo.plan import (GIB, PlanInput, in_flight, layer_activations, layer_transient, logprob_parts,
                                 make_plan, rank_parameters, total_parameters)

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "PLAN.md"


def qwen3_30b() -> MoEModelConfig:
    return MoEModelConfig(family="qwen3_moe", vocab_size=151936, hidden_size=2048, num_layers=48,
                          num_attention_heads=32, num_query_groups=4, head_dim=128, ffn_hidden_size=6144,
                          moe_ffn_hidden_size=768, num_experts=128, moe_router_topk=8)


def local(m, layout: Layout) -> int:
    counts = rank_parameters(m, layout, 0)
    return counts["dense"] + counts["expert"]


# -- parameters ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral", "qwen3", "llama"])
def test_parameter_count_is_the_hugging_face_models(tmp_path, family):
    import transformers

    from megatron_vespo.convert.families import load_model_config
    from tests.hf_models import make_hf_model

    make_hf_model(family, str(tmp_path))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert total_parameters(load_model_config(str(tmp_path))[1]) == sum(p.numel() for p in model.parameters())


def test_parameters_split_by_tp_pp_ep_by_hand():
    """The parity model: vocab 256, hidden 48, 4 layers (layer 0 dense), 4 heads of 12, 2 KV groups,
    FFN 64, 8 experts of 24, q/k norms. Per layer: attention QKV 96 x 48 + proj 48 x 48 + norms 96 +
    q/k norms 24 = 7032; dense MLP 3 x 64 x 48 = 9216; router 8 x 48 = 384; experts 8 x 3 x 24 x 48."""
    m = tiny_model_config()
    attention, dense_mlp, router, experts, vocab = 7032, 9216, 384, 27648, 256 * 48
    assert total_parameters(m) == attention * 4 + dense_mlp + 3 * (router + experts) + 2 * vocab + 48
    # tp2 (sequence parallel, etp = tp): QKV, proj, MLPs, experts' FFN and the vocabulary halve
    tp2 = rank_parameters(m, Layout(tp=2), 0)
    half_attention = 48 * 48 + 48 * 24 + 96 + 24
    assert tp2["dense"] == 4 * half_attention + dense_mlp // 2 + 3 * router + vocab + 48
    assert tp2["expert"] == 3 * experts // 2
    # pp2: layers 0-1 and the embedding on rank 0, layers 2-3, the final norm and the output layer on 1
    assert rank_parameters(m, Layout(pp=2), 0)["dense"] == 2 * attention + dense_mlp + router + vocab
    assert rank_parameters(m, Layout(pp=2), 0)["expert"] == experts
    assert rank_parameters(m, Layout(pp=2), 1)["dense"] == 2 * (attention + router) + vocab + 48
    assert rank_parameters(m, Layout(pp=2), 1)["expert"] == 2 * experts
    # ep2 (etp 1): half the experts, everything dense whole
    ep2 = rank_parameters(m, Layout(ep=2, etp=1), 0)
    assert (ep2["dense"], ep2["expert"]) == (total_parameters(m) - 3 * experts, 3 * experts // 2)
    # vpp2 on pp2: rank 0 holds layers 0 and 2 (stages 0 and 2), rank 1 layers 1 and 3
    assert rank_parameters(m, Layout(pp=2, vpp=2), 0)["expert"] == experts
    assert rank_parameters(m, Layout(pp=2, vpp=2), 1)["dense"] == 2 * (attention + router) + vocab + 48


def test_tied_embeddings_are_one_weight_on_one_stage_and_a_copy_across_stages():
    m = MoEModelConfig(family="qwen3", vocab_size=100, hidden_size=8, num_layers=2, num_attention_heads=2,
                       num_query_groups=1, head_dim=4, ffn_hidden_size=16, num_experts=0, moe_router_topk=0,
                       moe_ffn_hidden_size=0, tie_word_embeddings=True)
    assert rank_parameters(m, Layout(), 0)["output_layer"] == 0
    assert rank_parameters(m, Layout(pp=2), 1)["output_layer"] == 800


def test_qwen3_30b_as_in_the_doc():
    m = qwen3_30b()
    assert total_parameters(m) == 30_532_122_624  # Qwen3-30B-A3B's published 30.5 B
    layout = Layout.for_world(64, tp=2, ep=8)
    counts = rank_parameters(m, layout, 0)
    assert counts["expert"] == 1_811_939_328
    assert counts["dense"] == 776_943_616
    p = make_plan(PlanInput(model=m, layout=layout, max_tokens=16384, distributed_optimizer=True,
                            recompute="full")).worst
    assert p.parameters == 2 * 2_588_882_944 and p.gradients == 4 * 2_588_882_944
    assert p.optimizer == pytest.approx(12 * (776_943_616 / 32 + 1_811_939_328 / 4))
    assert p.activations == 48 * 8192 * 2048 * 2 + 2 * 8192 * 2048 * 2
    assert p.logprob_parts["logits"] == 16384 * 75968 * 2
    assert p.peak_phase == "loss" and round(p.peak / GIB, 2) == 24.22


def test_the_kl_terms_reference_model_adds_its_parameters():
    m = qwen3_30b()
    layout = Layout.for_world(64, tp=2, ep=8)
    base = PlanInput(model=m, layout=layout, max_tokens=16384, distributed_optimizer=True, recompute="full")
    plain = make_plan(base).worst
    with_ref = make_plan(dataclasses.replace(base, reference_model=True)).worst
    assert with_ref.reference_parameters == plain.parameters == 2 * 2_588_882_944
    assert with_ref.peak - plain.peak == plain.parameters  # frozen: no gradients, no optimizer state


# -- gradients and optimizer ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype, per_param", [("bfloat16", 12), ("float32", 8)])
def test_optimizer_sharding_over_data_and_expert_data_parallel(dtype, per_param):
    m = tiny_model_config()
    layout = Layout.for_world(8, ep=2)  # dp 8, expert data parallel 8 / 2 = 4
    counts = rank_parameters(m, layout, 0)
    whole = make_plan(PlanInput(model=m, layout=layout, max_tokens=64, params_dtype=dtype)).worst
    sharded = make_plan(PlanInput(model=m, layout=layout, max_tokens=64, params_dtype=dtype,
                                  distributed_optimizer=True)).worst
    n = counts["dense"] + counts["expert"]
    assert whole.gradients == sharded.gradients == 4 * n  # fp32 main grads whatever the dtype
    assert whole.parameters == (2 if dtype == "bfloat16" else 4) * n
    assert whole.optimizer == per_param * n
    assert sharded.optimizer == pytest.approx(per_param * (counts["dense"] / 8 + counts["expert"] / 4))
    # context parallelism joins the dense data-parallel group
    cp = Layout.for_world(8, cp=2, ep=2)  # dp 4 x cp 2
    cp_plan = make_plan(PlanInput(model=m, layout=cp, max_tokens=64, params_dtype=dtype,
                                  distributed_optimizer=True)).worst
    cp_counts = rank_parameters(m, cp, 0)
    assert cp_plan.optimizer == pytest.approx(per_param * (cp_counts["dense"] / 8 + cp_counts["expert"] / 4))


# -- activations ----------------------------------------------------------------------------------


def test_te_activations_of_a_dense_layer_by_hand():
    m = tiny_model_config()
    p = PlanInput(model=m, layout=Layout(), max_tokens=10)
    # attention: 2 s H + t (nq + 2 nkv) d + t (nq + nkv) d (q/k norms) + t (nq + nkv) d (RoPE)
    # + t nq d elements, + 4 t nq bytes; MLP: 2 s H + 3 t F elements; bf16
    attention = (2 * 10 * 48 + 10 * 8 * 12 + 2 * 10 * 6 * 12 + 10 * 4 * 12) * 2 + 4 * 10 * 4
    mlp = (2 * 10 * 48 + 3 * 10 * 64) * 2
    assert sum(layer_activations(p, 0).values()) == attention + mlp
    # every term of a dense layer is split by tp (sequence parallelism) and by cp
    for layout in (Layout(tp=2), Layout(cp=2)):
        split = PlanInput(model=m, layout=layout, max_tokens=10)
        assert sum(layer_activations(split, 0).values()) == (attention + mlp) / 2


def test_moe_activations_follow_the_token_copies():
    m = tiny_model_config()

    def moe(layout, spec="te"):
        p = PlanInput(model=m, layout=layout, max_tokens=64, spec=spec)
        return layer_activations(p, 1)["experts"]

    # c = s k etp copies of (H + 3 Fm / etp) elements + a 4-byte probability; the te spec in bf16
    assert moe(Layout()) == 64 * 2 * (48 * 2 + 3 * 24 * 2 + 4)
    assert moe(Layout(ep=2)) == moe(Layout())  # balanced: ep moves tokens, not their number
    assert moe(Layout(tp=2)) == 64 * 2 * (48 * 2 + 3 * 12 * 2 + 4)  # s halves, etp = 2 gathers them
    assert moe(Layout(tp=2, etp=1)) == 32 * 2 * (48 * 2 + 3 * 24 * 2 + 4)
    assert moe(Layout(), "local") == 64 * 2 * (48 * 2 + 6 * 24 * 2 + 4)  # the unfused SwiGLU keeps 6 Fm


def test_recompute_keeps_layer_inputs_and_one_layer():
    m = tiny_model_config()
    p = PlanInput(model=m, layout=Layout(tp=2), max_tokens=64, recompute="full")
    rank = make_plan(p).worst
    s = 64 / 2
    assert rank.activation_parts["layer_inputs"] == 4 * s * 48 * 2
    assert rank.recompute_working_set == max(sum(layer_activations(p, i).values()) for i in range(4))
    assert rank.step_phases["layer"] == pytest.approx(
        rank.activations + rank.recompute_working_set + rank.layer_transient + rank.logprob_parts["workspace"])


@pytest.mark.parametrize("pp, vpp, micro_batches, expected", [
    (1, 1, None, [1]),
    (4, 1, None, [4, 3, 2, 1]),
    (4, 1, 2, [2, 2, 2, 1]),
    (2, 2, None, [2.0, 1.5]),  # chunk forwards: min(4, 2 (pp - r - 1) + (vpp - 1) pp + 1) / vpp
])
def test_micro_batches_in_flight(pp, vpp, micro_batches, expected):
    m = tiny_model_config()
    p = PlanInput(model=m, layout=Layout(pp=pp, vpp=vpp), max_tokens=64, micro_batches=micro_batches)
    assert [in_flight(p, r) for r in range(pp)] == expected
    plan = make_plan(p)
    for rank, flight in zip(plan.ranks, expected):
        assert rank.activations == pytest.approx(flight * rank.activations_per_micro_batch)


# -- the log-prob path and the peak ---------------------------------------------------------------


def test_logprob_path_by_hand():
    m = qwen3_30b()
    p = PlanInput(model=m, layout=Layout(tp=2), max_tokens=16384)
    rows = 64 * 2**20 // (4 * 75968)  # a 64 MiB fp32 chunk of the 75968-column shard
    assert logprob_parts(p) == {
        "logits": 16384 * 75968 * 2,
        "workspace": rows * 75968 * 4 * 2,  # bf16 logits: the fp32 copy and exp
        "transient": 75968 * 2048 * 2 + 2 * 16384 * 2048 * 2,  # output-layer weight + input grads
    }
    # a chunk ends with each sequence, unless CP joins the sequences' middle pieces
    short = PlanInput(model=m, layout=Layout(tp=2), max_tokens=16384, sequence_length=100)
    assert logprob_parts(short)["workspace"] == 100 * 75968 * 4 * 2
    cp = PlanInput(model=m, layout=Layout(tp=2, cp=2), max_tokens=16384, sequence_length=100)
    assert logprob_parts(cp)["workspace"] == rows * 75968 * 4 * 2


def test_layer_transient_by_hand():
    m = tiny_model_config()
    p = PlanInput(model=m, layout=Layout(), max_tokens=64)
    assert layer_transient(p, 1) == (2 * 64 * 2 * 48 + 64 * 48) * 2  # MoE: 2 c H + s H
    assert layer_transient(p, 0) == max(3 * 64 * 64, 2 * 64 * 8 * 12) * 2 + 64 * 48 * 2  # dense


def test_verdict_and_reserve():
    m = qwen3_30b()
    p = PlanInput(model=m, layout=Layout.for_world(64, tp=2, ep=8), max_tokens=16384,
                  distributed_optimizer=True, recompute="full")
    plan = make_plan(p)
    assert plan.needed_gib == pytest.approx(plan.worst.peak * 1.1 / GIB + 4)
    assert plan.fits
    assert not make_plan(p, gpu_memory_gib=24).fits
    tight = make_plan(p, gpu_memory_gib=plan.worst.peak / GIB, reserve_gib=0, fragmentation=0)
    assert tight.fits  # exactly the peak, nothing kept free
    with pytest.raises(ValueError, match="fragmentation"):
        make_plan(p, fragmentation=-0.1)


@pytest.mark.parametrize("field, value, message", [
    ("max_tokens", 0, "max-tokens must be an integer >= 1"),
    ("spec", "tex", "spec 'tex'"),
    ("recompute", "selective", "recompute 'selective'"),
    ("params_dtype", "int8", "params dtype 'int8'"),
])
def test_bad_input_is_named(field, value, message):
    p = dict(model=tiny_model_config(), layout=Layout(), max_tokens=64)
    p[field] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        make_plan(PlanInput(**p))


# -- the command ----------------------------------------------------------------------------------


def _config_json(directory: Path) -> Path:
    """docs/PLAN.md's Qwen3-30B-A3B config.json, written to ``directory``."""
    config = json.loads(re.search(r"```json\n(.*?)```", DOC.read_text(), flags=re.S).group(1))
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def _run(capsys, *argv) -> tuple[int, str, str]:
    from megatron_vespo import cli

    code = cli.main(["plan", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_doc_example_is_what_the_command_prints(tmp_path, capsys):
    text = DOC.read_text()
    command = next(b for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
                   if "--distributed-optimizer --recompute full" in b and "[" not in b)
    argv = shlex.split(command.replace("\\\n", " "))[2:]
    argv[argv.index("HF_DIR")] = str(_config_json(tmp_path))
    code, out, _ = _run(capsys, *argv)
    assert code == 0
    expected = re.search(r"```text\n(.*?)```", text, flags=re.S).group(1)
    assert out == expected


def test_json_output_and_errors(tmp_path, capsys):
    model = str(_config_json(tmp_path))
    code, out, _ = _run(capsys, "--model", model, "--layout", "tp2ep8", "--nodes", "8", "--max-tokens", "16384",
                        "--json")
    assert code == 0
    report = json.loads(out)
    assert report["layout"] == "tp2ep8dp32" and report["expert_data_parallel"] == 4
    assert report["fits"] is False  # no recompute: the activations alone are 57.6 GiB
    assert report["ranks"][0]["peak"] == report["peak_bytes"]
    for argv, message in [
        (["--layout", "tp2ep16", "--nodes", "1"], "layout 'tp2ep16' on 8 GPUs"),
        (["--layout", "tp3", "--nodes", "8"], "not a multiple of tp 3"),
        (["--layout", "tpx"], "cannot parse layout"),
        (["--layout", "tp2ep8", "--nodes", "0"], "--nodes must be >= 1"),
        (["--layout", "tp2ep8", "--nodes", "8", "--max-tokens", "0"], "max-tokens must be an integer >= 1"),
    ]:
        args = ["--model", model, "--max-tokens", "64", *argv]
        code, out, err = _run(capsys, *args)
        assert code == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    code, _, err = _run(capsys, "--model", str(tmp_path / "missing"), "--max-tokens", "64")
    assert code == 2 and "no config.json" in err


# -- against a real step --------------------------------------------------------------------------


@pytest.mark.slow
def test_plan_matches_a_real_cpu_step(tmp_path):
    """One layout of benchmarks/bench_plan.py: a 62 M-parameter Qwen3-MoE, one process, one step."""
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_plan.py"), "--layouts", "single",
                           "--tokens", "1024", "--json", str(out)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = json.loads(out.read_text())["results"]
    for quantity in ("parameters", "gradients", "optimizer"):
        assert result["ratio"][quantity] == pytest.approx(1.0, abs=0.01), quantity
    for quantity in ("activations", "step_extra", "peak"):
        assert 0.85 <= result["ratio"][quantity] <= 1.15, (quantity, result["ratio"])

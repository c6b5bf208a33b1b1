"""The scoring step's two paths under one layout: log-probs from the logits Megatron returns and,
on Megatron-Core >= 0.18, from the last hidden states through GPTModel's ``output_processor``.
Both against the fp64 plain-PyTorch reference, and against each other.

Usage: torchrun --nproc_per_node=N scoring_paths.py --layout tp2 [--tied] [--temperature 0.7]
Prints ``SCORING_OK {json}`` on rank 0.
"""

import argparse
import json
import warnings
from types import SimpleNamespace

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from megatron_vespo import comm  # noqa: E402
from megatron_vespo.batch import build_micro_batch, partition, slice_for_cp  # noqa: E402
from megatron_vespo.hook import SP_TAG, HookGroups, make_scoring_step  # noqa: E402
from megatron_vespo.mcore import versions  # noqa: E402
from megatron_vespo.parity.reference import ReferenceMoE, init_hf_state  # noqa: E402
from megatron_vespo.parity.worker import build_megatron, make_samples, tiny_model_config  # noqa: E402

SEED = 99


def reference_state(m, dtype) -> dict:
    state = {k: v.to(dtype) for k, v in init_hf_state(m, SEED).items()}
    if m.tie_word_embeddings:  # the reference reads the output layer by its untied name
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def main() -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_vespo.mcore.parallel import Layout, initialize_model_parallel

    parser = argparse.ArgumentParser()
    parser.add_argument("--layout", required=True)
    parser.add_argument("--tied", action="store_true")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--format", default="packed")
    args = parser.parse_args()

    m = tiny_model_config()
    m.tie_word_embeddings = args.tied
    torch.distributed.init_process_group("gloo")
    layout = Layout.parse(args.layout)
    assert layout.world_size == torch.distributed.get_world_size(), (str(layout), layout.world_size)
    initialize_model_parallel(layout, seed=SEED)
    gpt, ddp, _ = build_megatron(SimpleNamespace(dispatcher="alltoall", seed=SEED, negative_control=False), layout, m)
    ddp.eval()

    samples = make_samples(ReferenceMoE(m, reference_state(m, torch.float32)), 12, SEED)
    plan = partition(len(samples), ps.get_data_parallel_world_size(), 2)[ps.get_data_parallel_rank()]
    seq_multiple = 2 * layout.cp if layout.cp > 1 else 1
    micro_batches = [slice_for_cp(build_micro_batch([samples[i] for i in ids], args.format, seq_multiple,
                                                    seq_multiple * layout.tp, ids),
                                  layout.cp, ps.get_context_parallel_rank()) for ids in plan]
    groups = HookGroups.from_parallel_state()

    def score(from_hidden: bool) -> dict:
        found = {}

        def keep(mb, rows, logp):
            seq = mb.seq_index.reshape(-1)[rows].cpu()
            pos = mb.position_ids.reshape(-1)[rows].cpu()
            for local in seq.unique().tolist():
                sample = mb.sample_ids[local]
                take = seq == local
                for p, v in zip((pos[take] + 1 - samples[sample].prompt_len).tolist(), logp[take].cpu().tolist()):
                    found[(sample, p)] = v

        step = make_scoring_step(keep, temperature=args.temperature, groups=groups, from_hidden=from_hidden)
        before = comm.COUNTER[SP_TAG]
        with torch.no_grad():
            get_forward_backward_func()(forward_step_func=step, data_iterator=iter(micro_batches), model=[ddp],
                                        num_microbatches=len(micro_batches),
                                        seq_length=micro_batches[0].tokens.shape[1] * layout.cp,
                                        micro_batch_size=micro_batches[0].tokens.shape[0], forward_only=True)
        found["sp_gathers"] = comm.COUNTER[SP_TAG] - before
        return found

    paths = {"logits": score(False)}
    if versions.has_output_processor():
        paths["hidden"] = score(True)
    else:
        try:
            score(True)
        except RuntimeError as err:
            assert "output_processor" in str(err), err
        else:
            raise AssertionError("scoring from hidden states ran on a Megatron-Core without output_processor")
    gathered = comm.gather_objects(paths)
    if torch.distributed.get_rank() != 0:
        torch.distributed.destroy_process_group()
        return

    ref = ReferenceMoE(m, reference_state(m, torch.float64))
    with torch.no_grad():
        expected = {(i, p): float(v) for i, s in enumerate(samples)
                    for p, v in enumerate(ref.response_logprobs(s, args.temperature))}
    report = {"layout": str(layout), "paths": sorted(paths)}
    for name in paths:
        merged, sp_gathers = {}, 0
        for rank_paths in gathered:
            values = dict(rank_paths[name])
            sp_gathers = max(sp_gathers, values.pop("sp_gathers"))
            merged.update(values)
        assert set(merged) == set(expected), f"{name}: {len(merged)} positions scored, {len(expected)} expected"
        report[f"{name}_vs_fp64"] = max(abs(merged[k] - expected[k]) for k in expected)
        report[f"{name}_sp_gathers"] = sp_gathers
        paths[name] = merged
    if "hidden" in paths:
        report["hidden_vs_logits"] = max(abs(paths["hidden"][k] - paths["logits"][k]) for k in expected)
    print("SCORING_OK", json.dumps(report), flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

"""Megatron-Core model (loaded from HF model --hf under --layout) -> an engine serving another
model, by WeightSync --route, as --version. Every trainer rank takes part (export is collective).
Prints one JSON line on rank 0: the sync report. Route inprocess: the engine is a LocalEngine
serving --engine-model inside this process; rank 0 then prints, as CHECK, the largest difference
between its log-probs and transformers' own forward of --hf, before and after the sync."""

import argparse
import json
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402


def engine_error(engine, hf_dir):
    """Largest |engine log-prob - transformers log-prob| over a sampled continuation."""
    import transformers as tf

    prompt = [1, 2, 3, 9]
    answer = engine.generate(prompt, {"max_new_tokens": 6, "sampling_seed": 3}, return_logprob=True)
    output = answer["output_ids"]
    model = tf.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + output])).logits[0].float(), -1)
    ref = logp[len(prompt) - 1:-1].gather(1, torch.tensor(output)[:, None])[:, 0]
    got = torch.tensor([entry[0] for entry in answer["meta_info"]["output_token_logprobs"]])
    return (ref - got).abs().max().item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", required=True)
    parser.add_argument("--layout", default="single")
    parser.add_argument("--route", required=True)
    parser.add_argument("--servers", default="", help="comma-separated server URLs")
    parser.add_argument("--engine-model", help="inprocess route: the model the LocalEngine starts with")
    parser.add_argument("--version", required=True)
    parser.add_argument("--disk-dir")
    parser.add_argument("--api-key")
    parser.add_argument("--bucket-bytes", type=int, default=64 * 1024)
    parser.add_argument("--backend", default="gloo", help="distributed route: the weight-update group's backend")
    args = parser.parse_args()

    from megatron_vespo.convert.cli import load_from_hf
    from megatron_vespo.mcore.parallel import Layout, initialize_model_parallel
    from megatron_vespo.rollout.client import EngineControl
    from megatron_vespo.rollout.weight_sync import WeightSync

    layout = Layout.parse(args.layout)
    initialize_model_parallel(layout)
    m, hf_config, gpt, _ = load_from_hf(args.hf, layout)
    rank = torch.distributed.get_rank()
    engine = control = None
    if args.route == "inprocess":
        if rank == 0:
            from megatron_vespo.rollout.local_engine import LocalEngine

            engine = LocalEngine(args.engine_model, dtype="float32")
    elif rank == 0:
        control = EngineControl(args.servers.split(","), api_key=args.api_key)
    before = engine_error(engine, args.hf) if engine is not None else None
    sync = WeightSync(args.route, m, control=control, engine=engine, backend=args.backend,
                      bucket_bytes=args.bucket_bytes, dtype=torch.float32, hf_config=hf_config,
                      disk_dir=args.disk_dir, side_files_from=args.hf)
    report = sync.sync(gpt, args.version)
    sync.close()
    if report is not None:
        print("SYNC", json.dumps(report.__dict__), flush=True)
    if engine is not None:
        after = engine_error(engine, args.hf)
        print("CHECK", json.dumps({"before": before, "after": after, "version": engine.weight_version}), flush=True)
        engine.close()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

"""``megatron-vespo score``: per-token log-probs of token sequences from a Hugging Face model,
scored by Megatron-Core in any layout (``--backend mcore``) or by transformers (``--backend hf``,
the reference). JSON lines on stdout, one ``{"logprobs": [...]}`` per input line; logs on stderr.
"""

from __future__ import annotations

import json

import torch

from megatron_vespo import comm
from megatron_vespo.convert.cli import DTYPES, check_hf_layout, load_from_hf
from megatron_vespo.input_files import text_lines
from megatron_vespo.launcher import add_layout_arguments, run_distributed


def read_score_inputs(path: str, vocab_size: int) -> list[list[int]]:
    rows = []
    for number, line in text_lines(path, "score input"):
        try:
            ids = json.loads(line)["input_ids"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{number}: expected a JSON object with 'input_ids' ({err})") from None
        if not isinstance(ids, list) or len(ids) < 2 or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError(f"{path}:{number}: input_ids must be a list of at least 2 integers")
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"{path}:{number}: token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
        rows.append(ids)
    if not rows:
        raise ValueError(f"score input {path} has no rows (one JSON object with 'input_ids' a line)")
    return rows


def _vocab_size(model: str) -> int:
    """config.json's vocab_size (any causal LM for the hf backend, not only the families mcore builds)."""
    from megatron_vespo.convert.families import load_hf_config

    vocab = load_hf_config(model).get("vocab_size")
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise ValueError(f"model config of {model}: vocab_size must be an integer >= 1, got {vocab!r}")
    return vocab


def check_score(args, layout) -> None:
    from megatron_vespo.convert.families import load_model_config

    check_hf_layout(args.model, layout)
    read_score_inputs(args.input, load_model_config(args.model)[1].vocab_size)  # every line, before torchrun


def score_hf(args) -> int:
    from transformers import AutoModelForCausalLM

    inputs = read_score_inputs(args.input, _vocab_size(args.model))
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for ids in inputs:
            tokens = torch.tensor([ids])
            logp = torch.log_softmax(model(tokens).logits[0, :-1].float(), dim=-1)
            print(json.dumps({"logprobs": logp.gather(1, tokens[0, 1:, None]).squeeze(1).tolist()}), flush=True)
    return 0


def score_mcore(args, layout) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_vespo.batch import Sample, build_micro_batch
    from megatron_vespo.hook import make_scoring_step

    m, _, gpt, _ = load_from_hf(args.model, layout, DTYPES[args.dtype])
    inputs = read_score_inputs(args.input, m.vocab_size)
    gpt.eval()
    results = []
    forward_step = make_scoring_step(lambda mb, rows, logp: results.append(logp.float().cpu().tolist()))
    with torch.no_grad():
        for ids in inputs:
            # every next token is scored: a "response" from position 1; sequence parallelism splits
            # the tokens over TP, so the packed sequence is padded to a multiple of tp at its end
            sample = Sample(tokens=torch.tensor(ids), prompt_len=1, advantage=0.0, old_logprobs=None)
            mb = build_micro_batch([sample], "packed", 1, layout.tp)
            get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([mb]), model=[gpt],
                                        num_microbatches=1, seq_length=mb.tokens.shape[1], micro_batch_size=1,
                                        forward_only=True)
    # the last pipeline stage has the results; send them to global rank 0, which prints
    if ps.get_pipeline_model_parallel_world_size() > 1:
        results = comm.broadcast_object(results, src=ps.get_pipeline_model_parallel_last_rank(),
                                        group=ps.get_pipeline_model_parallel_group())
    if torch.distributed.get_rank() == 0:
        for logprobs in results:
            print(json.dumps({"logprobs": logprobs}), flush=True)


def add_command(sub) -> None:
    score = sub.add_parser("score", help="per-token log-probs of token sequences (JSON lines)")
    score.add_argument("--model", required=True, help="Hugging Face model directory")
    score.add_argument("--backend", choices=["mcore", "hf"], default="mcore")
    score.add_argument("--input", required=True, help='JSONL: {"input_ids": [...]} per line')
    score.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                       help="the Megatron model's parameter dtype (mcore backend)")
    add_layout_arguments(score)
    score.set_defaults(func=lambda args: score_hf(args) if args.backend == "hf"
                       else run_distributed(args, args.argv, score_mcore, check_score))

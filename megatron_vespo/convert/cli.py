"""``megatron-vespo convert hf-to-mcore|mcore-to-hf`` and ``megatron-vespo score``.

Each command runs on ``tp * pp * ep * etp``-compatible ranks: under torchrun it uses the ranks it
was started with; started plainly with a layout of more than one rank, it starts torchrun on this
machine itself (gloo without CUDA). Logs go to stderr; ``score`` writes JSON lines to stdout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import torch

from megatron_vespo import comm

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "generation_config.json", "chat_template.jinja")
META = "megatron_vespo.json"
ARGV_ENV = "MEGATRON_VESPO_ARGV"  # the command line of ranks started by run_distributed
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # --dtype of mcore-to-hf and score


def log(message: str) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(message, file=sys.stderr, flush=True)


def layout_from_args(args):
    """The command's layout. Under a launcher (WORLD_SIZE set: torchrun, srun) data parallelism takes
    the processes the model layout leaves, as in the trainer; otherwise the fewest processes."""
    from megatron_vespo.mcore.parallel import Layout

    sizes = dict(tp=args.tp, pp=args.pp, vpp=getattr(args, "vpp", 1), cp=getattr(args, "cp", 1), ep=args.ep,
                 etp=args.etp)
    if "WORLD_SIZE" in os.environ:
        return Layout.for_world(int(os.environ["WORLD_SIZE"]), **sizes)
    return Layout(**sizes).validate()


def run_distributed(args, argv: list[str], body, precheck=None) -> int:
    """Run ``body(args, layout)`` on the layout's ranks, starting torchrun here when needed;
    ``precheck(args, layout)`` runs first, so bad input fails before any process starts."""
    layout = layout_from_args(args)
    if precheck is not None:
        precheck(args, layout)
    if "WORLD_SIZE" not in os.environ and layout.world_size > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={layout.world_size}", "-m", "megatron_vespo"]
        # the arguments travel in the environment: torchrun's own parser would take an option of
        # ours that abbreviates one of its own (--n: --nnodes, --node-rank, ...) as ambiguous
        env = dict(os.environ, PYTHONWARNINGS=os.environ.get("PYTHONWARNINGS", "ignore"),
                   **{ARGV_ENV: json.dumps(argv)})
        if not torch.cuda.is_available():
            env.setdefault("OMP_NUM_THREADS", "1")
        log(f"starting {layout.world_size} processes ({layout})")
        return subprocess.run(cmd, env=env).returncode
    from megatron_vespo.mcore.parallel import initialize_model_parallel

    initialize_model_parallel(layout)
    try:
        body(args, layout)
    finally:
        if torch.distributed.is_initialized():
            comm.barrier()
            torch.distributed.destroy_process_group()
    return 0


def _progress(total: int, desc: str):
    from tqdm import tqdm

    disable = torch.distributed.is_initialized() and torch.distributed.get_rank() != 0
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=disable)


def _copy_tokenizer(src: str, dst: str) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
            copied.append(name)
    return copied


def _build(m, layout, params_dtype: torch.dtype = torch.float32):
    from megatron_vespo.mcore.model import build_gpt_model, transformer_config
    from megatron_vespo.mcore.weights import ShardContext

    gpt = build_gpt_model(m, transformer_config(m, layout, params_dtype=params_dtype))
    return gpt, ShardContext.from_model(gpt, m)


def load_from_hf(hf_dir: str, layout, params_dtype: torch.dtype = torch.float32):
    """(model config, Megatron model of this rank loaded from HF safetensors, bytes read)."""
    from megatron_vespo.convert.families import load_hf_config, model_config_from_hf
    from megatron_vespo.mcore.weights import SafetensorsSource, load_hf_state

    hf_config = load_hf_config(hf_dir)
    m = model_config_from_hf(hf_config)
    m.check_layout(layout)
    gpt, ctx = _build(m, layout, params_dtype)
    source = SafetensorsSource(hf_dir)
    with _progress(len(list(gpt.parameters())), "load") as bar:
        load_hf_state(gpt, source, ctx, progress=bar.update)
    return m, hf_config, gpt, source.bytes_read


def check_hf_layout(args, layout) -> None:
    from megatron_vespo.convert.families import load_hf_config, model_config_from_hf

    model_config_from_hf(load_hf_config(getattr(args, "hf", None) or args.model)).check_layout(layout)
    out = getattr(args, "out", None)
    if getattr(args, "hf", None) and out and os.path.isdir(out) and os.listdir(out):
        raise FileExistsError(f"{out} is not empty; choose a new directory")
    if getattr(args, "input", None) and not os.path.exists(args.input):
        raise FileNotFoundError(f"no input file {args.input}")


def hf_to_mcore(args, layout) -> None:
    from megatron.core import dist_checkpointing

    m, hf_config, gpt, bytes_read = load_from_hf(args.hf, layout)
    log(f"read {bytes_read / 2**20:.1f} MiB of safetensors on rank 0")
    rank = torch.distributed.get_rank()
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        if os.listdir(args.out):
            raise FileExistsError(f"{args.out} is not empty; choose a new directory")
    comm.barrier()
    dist_checkpointing.save(gpt.sharded_state_dict(), args.out)
    if rank == 0:
        with open(os.path.join(args.out, META), "w") as f:
            json.dump({"model": dataclasses.asdict(m), "hf_config": hf_config, "layout": str(layout)}, f, indent=1)
        extra = os.path.join(args.out, "hf_files")
        os.makedirs(extra, exist_ok=True)
        copied = _copy_tokenizer(args.hf, extra)
        log(f"wrote Megatron checkpoint {args.out} ({layout}); kept {len(copied)} tokenizer/config files")


def checkpoint_source(ckpt: str, base_model: str | None = None):
    """What ``mcore-to-hf`` reads from ``ckpt``: (model config, HF config, dist checkpoint
    directory, path of the model's state in it, directory with tokenizer/config files).

    Two kinds: a ``convert hf-to-mcore`` checkpoint (``megatron_vespo.json`` beside the shards) or a
    trainer checkpoint ``RUN/checkpoints/step-K`` (``mcore/`` + ``trainer_state.json``), whose
    architecture comes from the run's ``config.yaml`` (``model.hf_dir``) or ``base_model``."""
    from megatron_vespo.convert.families import load_hf_config, model_config_from_hf
    from megatron_vespo.mcore.model import MoEModelConfig

    meta_file = os.path.join(ckpt, META)
    if os.path.exists(meta_file):
        with open(meta_file) as f:
            meta = json.load(f)
        model = meta["model"]
        m = MoEModelConfig(**{**model, "dense_layers": tuple(model["dense_layers"])})
        return m, meta["hf_config"], ckpt, (), os.path.join(ckpt, "hf_files")
    if os.path.exists(os.path.join(ckpt, "trainer_state.json")) and os.path.isdir(os.path.join(ckpt, "mcore")):
        if base_model is None:
            from megatron_vespo.train.config import load_config

            run_config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ckpt))), "config.yaml")
            if not os.path.exists(run_config):
                raise FileNotFoundError(f"{ckpt} is a trainer checkpoint but its run's config.yaml ({run_config}) is "
                                        f"missing: pass --base-model (the Hugging Face model the run started from)")
            base_model = load_config(run_config).model.hf_dir
        hf_config = load_hf_config(base_model)
        if not os.path.isfile(os.path.join(ckpt, "complete")):
            raise ValueError(f"{ckpt} has no 'complete' marker: the trainer was stopped while writing it")
        # the trainer saves {"model": {"model<chunk>": ...}, "optimizer": ...}: the model alone is read
        return model_config_from_hf(hf_config), hf_config, os.path.join(ckpt, "mcore"), ("model", "model0"), base_model
    raise FileNotFoundError(f"{ckpt}: neither a 'convert hf-to-mcore' checkpoint ({META} missing) nor a trainer "
                            f"checkpoint (RUN/checkpoints/step-K with mcore/ and trainer_state.json)")


def check_export(args, layout) -> None:
    m = checkpoint_source(args.ckpt, args.base_model)[0]
    m.check_layout(layout)
    if os.path.isdir(args.out) and os.listdir(args.out):
        raise FileExistsError(f"{args.out} is not empty; choose a new directory")


def mcore_to_hf(args, layout) -> None:
    from megatron.core import dist_checkpointing

    from megatron_vespo.convert.export import plan_buckets, save_hf_checkpoint
    from megatron_vespo.mcore import versions
    from megatron_vespo.mcore.checkpoint_keys import align_keys_to_checkpoint

    m, hf_config, directory, state_path, side_files = checkpoint_source(args.ckpt, args.base_model)
    m.check_layout(layout)
    versions.check_checkpoint_readable(directory)
    gpt, _ = _build(m, layout)
    request = gpt.sharded_state_dict()
    align_keys_to_checkpoint(request, directory)  # saved under the other layer spec (TE <-> local)
    for key in reversed(state_path):
        request = {key: request}
    state = dist_checkpointing.load(request, directory)
    for key in state_path:
        state = state[key]
    gpt.load_state_dict(state)
    dtype = DTYPES.get(args.dtype)  # None: the checkpoint's own
    n = len(plan_buckets(m, dtype or torch.float32, args.bucket_mib * 2**20))
    with _progress(n, "export") as bar:
        files = save_hf_checkpoint(gpt, m, args.out, hf_config, bucket_bytes=args.bucket_mib * 2**20,
                                   dtype=dtype, progress=lambda i, total: bar.update())
    if torch.distributed.get_rank() == 0:
        copied = _copy_tokenizer(side_files, args.out)
        log(f"wrote {len(files)} safetensors file(s), config.json and {len(copied)} tokenizer/config files to {args.out}")


def read_score_inputs(path: str, vocab_size: int) -> list[list[int]]:
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ids = json.loads(line)["input_ids"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{number}: expected a JSON object with 'input_ids' ({err})") from None
            if not isinstance(ids, list) or len(ids) < 2 or not all(isinstance(i, int) for i in ids):
                raise ValueError(f"{path}:{number}: input_ids must be a list of at least 2 integers")
            bad = [i for i in ids if not 0 <= i < vocab_size]
            if bad:
                raise ValueError(f"{path}:{number}: token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
            rows.append(ids)
    return rows


def score_hf(args) -> int:
    from transformers import AutoModelForCausalLM

    from megatron_vespo.convert.families import load_hf_config

    vocab = int(load_hf_config(args.model)["vocab_size"])
    inputs = read_score_inputs(args.input, vocab)
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


def add_layout_arguments(parser) -> None:
    for key in ("tp", "pp", "ep"):
        parser.add_argument(f"--{key}", type=int, default=1)
    parser.add_argument("--etp", type=int, default=None, help="expert tensor parallel (default: tp)")


def add_commands(sub) -> None:
    convert = sub.add_parser("convert", help="Hugging Face <-> Megatron-Core checkpoints")
    kinds = convert.add_subparsers(dest="direction", required=True)
    to_mcore = kinds.add_parser("hf-to-mcore", help="HF safetensors -> Megatron dist_checkpointing")
    to_mcore.add_argument("--hf", required=True, help="Hugging Face model directory")
    to_mcore.add_argument("--out", required=True, help="new checkpoint directory")
    add_layout_arguments(to_mcore)
    to_mcore.set_defaults(func=lambda args: run_distributed(args, args.argv, hf_to_mcore, check_hf_layout))
    to_hf = kinds.add_parser("mcore-to-hf", help="Megatron dist_checkpointing -> HF safetensors")
    to_hf.add_argument("--ckpt", required=True,
                       help="a 'convert hf-to-mcore' checkpoint or a trainer checkpoint RUN/checkpoints/step-K")
    to_hf.add_argument("--base-model", default=None,
                       help="trainer checkpoints: the HF model the run started from (default: the run's "
                            "config.yaml model.hf_dir)")
    to_hf.add_argument("--out", required=True)
    to_hf.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: as trained")
    to_hf.add_argument("--bucket-mib", type=int, default=2048, help="bytes per safetensors file (MiB)")
    add_layout_arguments(to_hf)
    to_hf.set_defaults(func=lambda args: run_distributed(args, args.argv, mcore_to_hf, check_export))

    score = sub.add_parser("score", help="per-token log-probs of token sequences (JSON lines)")
    score.add_argument("--model", required=True, help="Hugging Face model directory")
    score.add_argument("--backend", choices=["mcore", "hf"], default="mcore")
    score.add_argument("--input", required=True, help='JSONL: {"input_ids": [...]} per line')
    score.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                       help="the Megatron model's parameter dtype (mcore backend)")
    add_layout_arguments(score)
    score.set_defaults(func=lambda args: score_hf(args) if args.backend == "hf"
                       else run_distributed(args, args.argv, score_mcore, check_hf_layout))

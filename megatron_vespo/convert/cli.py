"""``megatron-vespo convert hf-to-mcore|mcore-to-hf``, and loading a Hugging Face model into Megatron-Core.

Each command runs on ``tp * pp * ep * etp``-compatible ranks: under torchrun it uses the ranks it
was started with; started plainly with a layout of more than one rank, it starts torchrun on this
machine itself (gloo without CUDA; ``launcher.run_distributed``). Logs go to stderr.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import sys

import torch

from megatron_vespo import comm
from megatron_vespo.launcher import add_layout_arguments, log, run_distributed

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "generation_config.json", "chat_template.jinja")
META = "megatron_vespo.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # --dtype of mcore-to-hf and score


def _progress(total: int, desc: str):
    from tqdm import tqdm

    disable = torch.distributed.is_initialized() and torch.distributed.get_rank() != 0
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=disable)


def _copy_tokenizer(src: str, dst: str) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
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
    from megatron_vespo.convert.families import load_model_config
    from megatron_vespo.mcore.weights import SafetensorsSource, load_hf_state

    hf_config, m = load_model_config(hf_dir)
    m.check_layout(layout)
    gpt, ctx = _build(m, layout, params_dtype)
    source = SafetensorsSource(hf_dir)
    with _progress(len(list(gpt.parameters())), "load") as bar:
        load_hf_state(gpt, source, ctx, progress=bar.update)
    return m, hf_config, gpt, source.bytes_read


def check_hf_layout(hf_dir: str, layout) -> None:
    """The model in ``hf_dir`` is supported and splits over ``layout``: checked before any process starts."""
    from megatron_vespo.convert.families import load_model_config
    from megatron_vespo.mcore.weights import SafetensorsSource

    load_model_config(hf_dir)[1].check_layout(layout)
    SafetensorsSource(hf_dir)  # the weights' index (or single file) is readable: checked before any process starts


def _check_out(out: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{out} exists and is not a directory; choose a new directory")
    if os.path.isdir(out) and os.listdir(out):
        raise FileExistsError(f"{out} is not empty; choose a new directory")


def check_import(args, layout) -> None:
    if not os.path.isdir(args.hf):
        raise FileNotFoundError(f"--hf {args.hf} is not a directory (a Hugging Face model directory is needed)")
    check_hf_layout(args.hf, layout)
    _check_out(args.out)


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


def checkpoint_source(ckpt: str, base_model: str | None = None, trainer_checkpoint=None):
    """What ``mcore-to-hf`` reads from ``ckpt``: (model config, HF config, dist checkpoint
    directory, path of the model's state in it, directory with tokenizer/config files).

    Two kinds: a ``convert hf-to-mcore`` checkpoint (``megatron_vespo.json`` beside the shards) or a
    trainer checkpoint, which ``trainer_checkpoint(ckpt, base_model)`` recognises and locates
    (``train.checkpoints.model_checkpoint``: the trainer owns its layout; passed in, so that convert
    does not depend on the trainer); its architecture is that of the run's base model."""
    from megatron_vespo.convert.families import load_model_config
    from megatron_vespo.input_files import InputFileError, read_json_object
    from megatron_vespo.mcore.model import MoEModelConfig

    meta_file = os.path.join(ckpt, META)
    if os.path.exists(meta_file):
        meta = read_json_object(meta_file, "checkpoint metadata")
        try:
            model = meta["model"]
            m = MoEModelConfig(**{**model, "dense_layers": tuple(model["dense_layers"])}).validate()
            if not isinstance(meta["hf_config"], dict):
                raise TypeError("hf_config is not an object")
        except (KeyError, TypeError, ValueError) as err:  # written by hf-to-mcore: edited, or another version's
            raise InputFileError(f"checkpoint metadata {meta_file} is not what 'convert hf-to-mcore' writes "
                                 f"({type(err).__name__}: {err})") from None
        return m, meta["hf_config"], ckpt, (), os.path.join(ckpt, "hf_files")
    found = trainer_checkpoint(ckpt, base_model) if trainer_checkpoint is not None else None
    if found is not None:
        hf_config, m = load_model_config(found.base_model)
        return m, hf_config, found.directory, tuple(found.state_path), found.base_model
    raise FileNotFoundError(f"{ckpt}: neither a 'convert hf-to-mcore' checkpoint ({META} missing) nor a trainer "
                            f"checkpoint (RUN/checkpoints/step-K with mcore/ and trainer_state.json)")


def check_export(args, layout, trainer_checkpoint=None) -> None:
    from megatron_vespo.mcore import versions

    if args.bucket_mib < 1:
        raise ValueError(f"--bucket-mib must be >= 1, got {args.bucket_mib}")
    m, _, directory, _, _ = checkpoint_source(args.ckpt, args.base_model, trainer_checkpoint)
    m.check_layout(layout)
    versions.checkpoint_writer(directory)  # a dist checkpoint with readable metadata.json
    _check_out(args.out)


def mcore_to_hf(args, layout, trainer_checkpoint=None) -> None:
    from megatron.core import dist_checkpointing

    from megatron_vespo.convert.export import plan_buckets, save_hf_checkpoint
    from megatron_vespo.mcore import versions
    from megatron_vespo.mcore.checkpoint_keys import align_keys_to_checkpoint

    m, hf_config, directory, state_path, side_files = checkpoint_source(args.ckpt, args.base_model,
                                                                        trainer_checkpoint)
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


def add_commands(sub, trainer_checkpoint=None) -> None:
    """``convert``. ``trainer_checkpoint``: the trainer's reader of its checkpoints for ``mcore-to-hf``
    (see ``checkpoint_source``); without it only ``hf-to-mcore`` checkpoints are read."""
    export = functools.partial(mcore_to_hf, trainer_checkpoint=trainer_checkpoint)
    check = functools.partial(check_export, trainer_checkpoint=trainer_checkpoint)
    convert = sub.add_parser("convert", help="Hugging Face <-> Megatron-Core checkpoints")
    kinds = convert.add_subparsers(dest="direction", required=True)
    to_mcore = kinds.add_parser("hf-to-mcore", help="HF safetensors -> Megatron dist_checkpointing")
    to_mcore.add_argument("--hf", required=True, help="Hugging Face model directory")
    to_mcore.add_argument("--out", required=True, help="new checkpoint directory")
    add_layout_arguments(to_mcore)
    to_mcore.set_defaults(func=lambda args: run_distributed(args, args.argv, hf_to_mcore, check_import))
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
    to_hf.set_defaults(func=lambda args: run_distributed(args, args.argv, export, check))

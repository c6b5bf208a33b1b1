#!/usr/bin/env python
"""Check a trainer config against the job's shape before any GPU starts (the sbatch scripts run it).

    python examples/slurm/check_config.py --config CONFIG --nodes N --gpus-per-node G \
        [--placeholder-urls] [section.key=value ...]

Loads CONFIG with the overrides exactly as ``megatron-vespo train`` will, takes the world size
(nodes x GPUs per node) and the layout in ``model.*``, and checks, naming what fails:

* tp * pp * cp divides the world; the data-parallel size is dp = world / (tp * pp * cp);
* the layout itself (``Layout.validate``): ep * etp divides tp * cp * dp (experts live inside a
  pipeline stage), vpp needs pp > 1;
* the model, when ``model.hf_dir`` holds a config.json (or ``--hf-config FILE`` names one): heads,
  KV groups, layers, experts and FFN sizes divide by the layout (the trainer's own check);
* ``TrainConfig.validate(dp)``: batch sizes divide over N and the data-parallel ranks, engine and
  weight-sync settings agree, the loss settings are valid.

The rollout URLs exist only once the servers run; ``--placeholder-urls`` fills empty
``rollout.router_url``/``rollout.server_urls`` with a placeholder for this check only.
Prints one summary line on success; exits 2 with the reason otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys

PLACEHOLDER_URL = "http://placeholder.invalid:1"


def check(cfg, world: int, hf_config: dict | None = None) -> str:
    """Validate ``cfg`` (a TrainConfig) for ``world`` GPUs; returns a one-line summary."""
    from megatron_vespo.mcore.parallel import Layout

    m = cfg.model
    layout = Layout.for_world(world, tp=m.tp, pp=m.pp, vpp=m.vpp, cp=m.cp, ep=m.ep, etp=m.etp)
    dp = layout.data_parallel
    if hf_config is not None:
        from megatron_vespo.convert.families import model_config_from_hf

        model_config_from_hf(hf_config).check_layout(layout)
    cfg.validate(dp)
    a, r = cfg.algorithm, cfg.rollout
    return (f"world {world} = tp {m.tp} x pp {m.pp} x cp {m.cp} x dp {dp} (ep {m.ep}, etp {m.etp}"
            + ("" if hf_config is None else f", checked against {hf_config.get('model_type')} config.json")
            + f"); rollout batch {r.prompts_per_batch} prompts x {r.group_size} = {cfg.rollout_samples} samples, "
            f"N = {a.staleness} -> {cfg.mini_batch_samples} samples per optimizer step "
            f"({cfg.mini_batch_samples // dp} per data rank); loss {a.loss.name}, async {a.async_rollout}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--nodes", type=int, required=True, help="training nodes")
    p.add_argument("--gpus-per-node", type=int, required=True, help="training processes per node")
    p.add_argument("--hf-config", help="config.json to check the layout against (default: model.hf_dir's)")
    p.add_argument("--placeholder-urls", action="store_true",
                   help="fill empty rollout URLs with a placeholder (they are known only at run time)")
    p.add_argument("overrides", nargs="*", help="section.key=value, as given to megatron-vespo train")
    args = p.parse_args(argv)
    try:
        from megatron_vespo.train.config import load_config

        cfg = load_config(args.config, args.overrides)
        r = cfg.rollout
        if args.placeholder_urls and r.engine == "sglang" and not r.server_urls:
            r.server_urls = [PLACEHOLDER_URL]
            r.router_url = r.router_url or PLACEHOLDER_URL
        hf_file = args.hf_config or os.path.join(cfg.model.hf_dir, "config.json")
        hf_config = None
        if os.path.exists(hf_file):
            from megatron_vespo.convert.families import load_hf_config

            hf_config = load_hf_config(hf_file)  # errors name the file: not JSON, not UTF-8, a directory
        elif args.hf_config:
            raise FileNotFoundError(f"--hf-config {args.hf_config} does not exist")
        summary = check(cfg, args.nodes * args.gpus_per_node, hf_config)
    except (ValueError, KeyError, FileNotFoundError) as err:
        print(f"check_config: {args.config}: {err}", file=sys.stderr)
        return 2
    print(f"config ok: {args.config}: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

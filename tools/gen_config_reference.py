#!/usr/bin/env python
"""Generate docs/CONFIG.md, the reference of every trainer config key, from the source.

Everything in the tables is read from the config dataclasses with ``ast`` and ``tokenize`` (no
import of the package, so it runs in a second and works on a modified copy of the sources):

* the keys: the fields of ``TrainConfig``'s sections in ``megatron_vespo/train/config.py``, and of
  ``LossConfig`` (``algorithm.loss``) in ``megatron_vespo/losses.py``, in source order;
* type and default: the annotation and the default as written (``field(default_factory=...)``
  and module constants such as ``kernel.DEFAULT_K_POS`` are resolved);
* the description: the comment lines directly above a field plus the trailing ``# comment`` on
  its line;
* allowed values: the ``choices`` table of ``TrainConfig.validate`` and the ``self.X not in NAME``
  checks of ``LossConfig.validate``;
* loss fields: the functions of ``losses.py`` and ``hook.py`` that read them, and the fields
  ``TrainConfig.validate`` overwrites (``dataclasses.replace(a.loss, ...)``).

The cross-field rules are a hand-written summary of ``TrainConfig.validate`` and
``LossConfig.validate`` (``RULES`` below); ``--check`` fails when ``validate`` names a config key
that the summary does not mention, so a new rule cannot go unnoticed.

    python tools/gen_config_reference.py            # write docs/CONFIG.md
    python tools/gen_config_reference.py --check    # exit 1 when docs/CONFIG.md is out of date

Fields without a description are listed on stderr.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import io
import re
import sys
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG_SRC = ROOT / "megatron_vespo" / "train" / "config.py"
LOSSES_SRC = ROOT / "megatron_vespo" / "losses.py"
HOOK_SRC = ROOT / "megatron_vespo" / "hook.py"
DOC = ROOT / "docs" / "CONFIG.md"
ROOT_CLASS = "TrainConfig"

# One line of context per section (the field comments say the rest).
SECTION_NOTES = {
    "model": "The policy's checkpoint and its Megatron-Core parallel layout: `tp` tensor, `pp` "
             "pipeline, `vpp` virtual-pipeline chunks per pipeline rank, `cp` context, `ep` expert and "
             "`etp` expert-tensor parallel size. The data-parallel size is what the world leaves: "
             "world / (tp x pp x cp). `etp` is 1 unless set (experts not tensor-parallel), not "
             "Megatron-Core's default of `tp`. The layout must divide the model (heads, KV groups, "
             "vocabulary and FFN sizes by tp, layers by pp x vpp, experts by ep, the expert FFN by etp) "
             "and ep x etp must divide tp x cp x data-parallel size; see "
             "[ARCHITECTURE.md](ARCHITECTURE.md#parallel-layouts).",
    "data": "Where prompts come from and how responses are rewarded.",
    "rollout": "The rollout engine, the sampling parameters sent with every `/generate` "
               "(`max_new_tokens`, `temperature`, `top_p`, `top_k`; a seed per prompt derived from "
               "`run.seed`), the rollout client's limits, and the weight sync back to the engine "
               "(see [CLUSTER.md](CLUSTER.md) for servers, ports and the API key).",
    "algorithm": "The RL algorithm around the loss: staleness, advantages, pi_old, routing replay, async mode.",
    "algorithm.loss": "The policy loss (`megatron_vespo.losses.LossConfig`); the formulas are in "
                      "[LOSSES.md](LOSSES.md).",
    "optimizer": "Adam through Megatron-Core's optimizer (no distributed optimizer), gradients clipped "
                 "to the global norm `clip_grad`. The learning rate warms up linearly from 0 over "
                 "`warmup_steps`, then stays at `lr` when `min_lr` is 0 or equal to `lr`, and otherwise "
                 "decays to `min_lr` on a cosine over `run.steps`.",
    "run": "Run directory, length, checkpoints and logging. A run directory holds `config.yaml`, "
           "`metrics.jsonl`, `tensorboard/`, `training.png`, `summary.json` and `checkpoints/step-K`.",
}

# A summary of TrainConfig.validate and LossConfig.validate, in prose. Keep it in step with them:
# --check fails when validate names a key this text does not.
RULES = """\
`TrainConfig.validate(data_parallel_size)` runs before anything starts (the trainer calls it
again once the data-parallel size is known); each violation is a `ValueError` naming the key.

* **Choices.** Every key with a fixed set of values (listed as "one of" in the tables) must take
  one of them.
* **Required.** `model.hf_dir` and `run.run_dir` must be set. With `data.task: file`, `data.prompts_file` must be
  set. With `rollout.engine: sglang`, `rollout.server_urls` must be set (whatever the weight
  sync route): weight updates (and pause, flush, continue) go to every server directly, the router
  (`rollout.router_url`, optional) routes /generate only.
  `rollout.weight_sync: disk` needs `rollout.weight_sync_dir`; `rollout.weight_sync: inprocess`
  works only with `rollout.engine: local`. `rollout.server_urls` and `rollout.router_url` take
  `http://` or `https://` URLs.
* **Ranges.** Every numeric key must lie in the range its row below gives, in interval notation
  (`[1, inf)`: 1 or more; `(0, 1]`: above 0, at most 1); NaN and infinities lie outside every
  range. Why some are what they are: `rollout.group_size` must be at least 2, since both
  advantage kinds subtract the group's mean reward (grpo also divides by its standard deviation),
  so a group of one sample has advantage 0 and trains nothing; `algorithm.advantage_eps` must be
  above 0, since a group whose rewards are all equal has standard deviation 0; `optimizer.lr` 0
  trains nothing; `optimizer.clip_grad` must be above 0 (Megatron-Core takes 0 as "no clipping"
  and then logs a gradient norm of 0); `run.seed` seeds numpy, which takes [0, 2^32). Also
  `rollout.top_k` is -1 (off) or 1 or more, never 0 (SGLang refuses it); `data.seed` takes any
  integer.
* **Pairs.** `data.synthetic_min_digits` <= `data.synthetic_max_digits`, and `optimizer.min_lr` <=
  `optimizer.lr` (the cosine decays from `lr` to `min_lr`). `data.task: synthetic` needs
  `data.reward: synthetic` and a known `data.synthetic_task`; `data.task: file` needs
  another reward (`math`, `math_full`, `code` or a function). `algorithm.overlong_buffer` < `rollout.max_new_tokens` (the overlong
  penalty starts `max_new_tokens - overlong_buffer` tokens into a response; [DAPO.md](DAPO.md)).
* **Batches divide.** The rollout batch is `rollout.prompts_per_batch x rollout.group_size`
  samples; `algorithm.staleness` (N) must divide it, giving mini-batches of rollout batch / N
  samples (one optimizer step each). The mini-batch must divide over the data-parallel ranks, and
  `algorithm.micro_batch_size`, when not 0, must divide each rank's share of a mini-batch.
* **Token budget.** `algorithm.max_tokens_per_micro_batch`, when not 0, forms the micro-batches, so
  `algorithm.micro_batch_size` must be 0; it must hold a response of `rollout.max_new_tokens`
  after a one-token prompt, padded to a multiple of `model.tp` x 2 `model.cp` (of `model.tp` when
  `model.cp` is 1).
  A longer sequence in a batch is an error naming the sample, at the step.
* **Distributed optimizer.** `optimizer.distributed` null means on when data parallelism > 1;
  `optimizer.overlap_grad_reduce`, `optimizer.overlap_param_gather` and `optimizer.cpu_offload`
  need it on (false with any of them is an error; null at data parallel size 1 is an error when
  the trainer starts).
* **Checkpoints.** `run.save_every`, when not 0, must be a multiple of `algorithm.staleness`:
  checkpoints are taken between rollout batches.
* **KL and entropy.** `algorithm.kl_coef` > 0 builds the reference model (the starting
  checkpoint, frozen, in the training layout) and needs `algorithm.routing_replay: none` (the
  reference's routes are not replayed); `algorithm.kl_estimator` is `k1`, `k2` or `k3`.
  `algorithm.entropy_coef` > 0 adds the entropy bonus. Both are aggregated with the policy loss
  (same normaliser, no TIS/MIS weights) and copied into `algorithm.loss` by `validate`.
* **Rewards.** `data.reward` is `synthetic`, `math`, `math_full`, `code` or `package.module:function`; with
  `data.task: file` any but `synthetic` ([REWARDS.md](REWARDS.md)).
* **Evaluation.** `eval.sets` (prompt files) need `data.task: file`, `eval.synthetic_prompts`
  need `data.task: synthetic`; every k of `eval.pass_k` lies in 1..`eval.n` ([EVAL.md](EVAL.md)).
* **Routing agreement.** `algorithm.routing_agreement: true` needs `algorithm.routing_replay: r2`
  (it compares the engine's routes with those R2 records).
* **Bypass.** `algorithm.pi_old: bypass` takes the engine's log-probs as pi_old, so the mismatch
  is zero by construction: `algorithm.loss.correction` must be `none`.
* **Derived loss fields.** `validate` then overwrites `algorithm.loss.bypass` (true exactly when
  `algorithm.pi_old` is `bypass`) and `algorithm.loss.temperature` (= `rollout.temperature`, so the
  trainer's log-probs use the sampling temperature): values given for them in the YAML file are
  replaced.
* **Loss.** `LossConfig.validate` (its errors start with `algorithm.loss:`):
  `algorithm.loss.correction: fold` is defined for `vespo` only (the other losses take `tis` or
  `mis`); every numeric field lies in the range its row gives; `algorithm.loss.mis_low` <
  `algorithm.loss.mis_high`; `algorithm.loss.dual_clip_c` > 1 or `null` (no dual clip).

`examples/slurm/check_config.py` runs the same validation for a SLURM job's shape (nodes x GPUs)
before any GPU starts, and also checks the layout against the model's `config.json`.
"""

HEADER = """\
# Configuration reference

<!-- Generated by tools/gen_config_reference.py from the comments on the fields of
megatron_vespo/train/config.py and megatron_vespo/losses.py. Edit those and rerun the script;
tests/test_docs.py fails when this file is out of date. -->

`megatron-vespo train` (and `megatron-vespo demo`) read one YAML file plus command-line overrides:

```bash
megatron-vespo train --config examples/configs/demo_cpu.yaml algorithm.staleness=4 optimizer.lr=3e-4
torchrun --nproc-per-node 8 -m megatron_vespo train --config CONFIG.yaml model.tp=2 model.ep=4 \\
    algorithm.loss.name=grpo rollout.server_urls=http://h1:30000,http://h2:30000
```

* **The file** is a mapping of sections (`model`, `data`, `rollout`, `algorithm`, `optimizer`,
  `run`) to keys; `algorithm.loss` is a nested section. Any section or key may be left out: it
  keeps its default. `--config` itself may be left out (all defaults plus overrides).
* **Overrides** are `section.key=value` (nested: `algorithm.loss.name=grpo`), applied after the
  file, left to right (a later one wins). The value is read as YAML (`true`, `1e-6`, `[a, b]`,
  `null`); `key=` with nothing after `=` sets the empty string. Quote values that YAML would turn
  into something else, e.g. `run.wandb_project="'yes'"`.
* **Types are checked**, and errors name the key: an unknown section or key is an error that
  lists the keys that exist; `bool` accepts only `true`/`false`; `int` rejects `2.0` and booleans;
  `float` accepts integers and numeric strings (YAML 1.1 reads `5e-4`, without a dot, as a
  string); a `list` key also accepts one comma-separated string (`a,b`); `float | None` accepts
  `null`.
* **The resolved config** (every key, after overrides and validation) is saved as
  `RUN_DIR/config.yaml` at the start of each run; it can be given back as `--config`.

The loader is `megatron_vespo.train.config.load_config`; the rules between keys are checked by
`TrainConfig.validate` (next section).
"""

SECTION_KEY = re.compile(r"\b(?:model|data|rollout|algorithm|optimizer|run)\.[a-z_]+(?:\.[a-z_]+)?\b")


# ------------------------------------------------------------------------------------------------
# Reading the sources
# ------------------------------------------------------------------------------------------------

class Unresolved:
    """A default that is not a constant expression (shown as its source text)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return f"Unresolved({self.text!r})"


@dataclass
class Source:
    path: Path
    text: str
    tree: ast.Module
    comments: dict[int, str]          # line -> text of its comment (without '#')
    comment_only: set[int]            # lines holding nothing but a comment
    blank: set[int]                   # empty lines
    classes: dict[str, ast.ClassDef]
    constants: dict[str, object]      # module-level constant assignments
    modules: dict[str, Path]          # `from megatron_vespo import kernel` -> kernel: its file
    imported_classes: dict[str, Path]  # `from megatron_vespo.losses import LossConfig`

    @classmethod
    def read(cls, path: Path) -> "Source":
        text = path.read_text()
        tree = ast.parse(text, filename=str(path))
        comments, comment_only = {}, set()
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.COMMENT:
                line = tok.start[0]
                comments[line] = tok.string.lstrip("#").strip()
                if not tok.line[: tok.start[1]].strip():
                    comment_only.add(line)
        lines = text.splitlines()
        blank = {i + 1 for i, line in enumerate(lines) if not line.strip()}
        classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
        constants: dict[str, object] = {}
        for node in tree.body:
            targets = []
            if isinstance(node, ast.Assign):
                targets, value = node.targets, node.value
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                targets, value = [node.target], node.value
            for target in targets:
                if isinstance(target, ast.Name):
                    constants[target.id] = _literal(value, constants)
                elif isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple):
                    for t, v in zip(target.elts, value.elts):
                        if isinstance(t, ast.Name):
                            constants[t.id] = _literal(v, constants)
        modules, imported = {}, {}
        package_root = ROOT
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    name = alias.asname or alias.name
                    as_module = package_root / (node.module.replace(".", "/") + "/" + alias.name + ".py")
                    if as_module.exists():
                        modules[name] = as_module
                    else:
                        imported[name] = package_root / (node.module.replace(".", "/") + ".py")
        return cls(path, text, tree, comments, comment_only, blank, classes, constants, modules, imported)

    def segment(self, node: ast.AST) -> str:
        return ast.get_source_segment(self.text, node) or ast.unparse(node)


def _literal(node: ast.AST, constants: dict[str, object]):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError):
        pass
    if isinstance(node, ast.Name) and node.id in constants:
        return constants[node.id]
    if isinstance(node, ast.Dict):  # e.g. LOSSES = {"vespo": LossSpec(...), ...}: the keys matter
        keys = [k.value for k in node.keys if isinstance(k, ast.Constant)]
        if len(keys) == len(node.keys):
            return {k: None for k in keys}
    return Unresolved(ast.unparse(node))


_SOURCES: dict[Path, Source] = {}
# canonical path (under ROOT) -> the file actually read (--config-src and friends)
_SUBSTITUTE: dict[Path, Path] = {}


def source(path: Path) -> Source:
    """The parsed source of the module at canonical ``path`` (imports resolve under ROOT)."""
    path = Path(path)
    if path not in _SOURCES:
        src = Source.read(_SUBSTITUTE.get(path, path))
        src.path = path
        _SOURCES[path] = src
    return _SOURCES[path]


@dataclass
class Field:
    key: str                     # dotted: rollout.group_size
    name: str
    annotation: str
    default_text: str            # as shown in the doc
    default: object              # the Python value (Unresolved when not a constant)
    description: str             # from the comments; "" when there is none
    choices: tuple = ()
    notes: list[str] = field(default_factory=list)
    section: "Section | None" = None  # for a nested dataclass field


@dataclass
class Section:
    key: str                     # "" for the root, "algorithm", "algorithm.loss"
    class_name: str
    path: Path
    fields: list[Field]


def _yaml_text(value, written: str | None) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return '""' if value == "" else f'"{value}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_text(v, None) for v in value) + "]"
    if isinstance(value, (int, float)) and written is not None and re.fullmatch(r"[-+0-9.eE_]+", written):
        return written  # 3e-4 as written, not 0.0003
    if isinstance(value, Unresolved):
        return value.text
    return repr(value)


def _description(src: Source, node: ast.AST) -> str:
    parts = []
    line = node.lineno - 1
    above = []
    while line in src.comment_only:
        above.append(src.comments[line])
        line -= 1
    parts.extend(reversed(above))
    end = node.end_lineno
    if end in src.comments and end not in src.comment_only:
        parts.append(src.comments[end])
    text = " ".join(p for p in parts if p)
    return text


def _resolve_default(src: Source, value: ast.AST | None):
    """(python value, text, nested dataclass (class name, path) or None)."""
    if value is None:
        return Unresolved("(required)"), "(required)", None
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "field":
        for kw in value.keywords:
            if kw.arg == "default_factory" and isinstance(kw.value, ast.Name):
                factory = kw.value.id
                if factory in ("list", "dict", "tuple", "set"):
                    empty = {"list": [], "dict": {}, "tuple": (), "set": set()}[factory]
                    return empty, {"list": "[]", "dict": "{}", "tuple": "[]", "set": "[]"}[factory], None
                if factory in src.classes:
                    return None, "", (factory, src.path)
                if factory in src.imported_classes:
                    return None, "", (factory, src.imported_classes[factory])
                return Unresolved(factory + "()"), factory + "()", None
            if kw.arg == "default_factory" and isinstance(kw.value, ast.Lambda):  # lambda: [1]
                try:
                    literal = ast.literal_eval(kw.value.body)
                except ValueError:
                    break
                return literal, src.segment(kw.value.body), None
            if kw.arg == "default":
                return _resolve_default(src, kw.value)
        return Unresolved(src.segment(value)), src.segment(value), None
    if isinstance(value, ast.Attribute) and isinstance(value.value, ast.Name) and value.value.id in src.modules:
        other = source(src.modules[value.value.id])
        resolved = other.constants.get(value.attr, Unresolved(src.segment(value)))
        return resolved, _yaml_text(resolved, None), None
    resolved = _literal(value, src.constants)
    return resolved, _yaml_text(resolved, src.segment(value)), None


def read_section(class_name: str, path: Path, key: str = "") -> Section:
    src = source(path)
    if class_name not in src.classes:
        raise SystemExit(f"{path}: no class {class_name}")
    cls = src.classes[class_name]
    fields = []
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name = node.target.id
        dotted = f"{key}.{name}" if key else name
        value, text, nested = _resolve_default(src, node.value)
        item = Field(dotted, name, src.segment(node.annotation), text, value, _description(src, node))
        if nested is not None:
            item.section = read_section(nested[0], nested[1], dotted)
        fields.append(item)
    return Section(key, class_name, path, fields)


def _validate_fn(cls: ast.ClassDef) -> ast.FunctionDef | None:
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and node.name == "validate":
            return node
    return None


def _section_aliases(fn: ast.FunctionDef) -> dict[str, str]:
    """``r, a, m = self.rollout, self.algorithm, self.model`` -> {"r": "rollout", ...}."""
    aliases = {}
    for node in ast.walk(fn):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
            pairs = []
            if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple):
                pairs = list(zip(target.elts, value.elts))
            elif isinstance(target, ast.Name):
                pairs = [(target, value)]
            for t, v in pairs:
                if (isinstance(t, ast.Name) and isinstance(v, ast.Attribute)
                        and isinstance(v.value, ast.Name) and v.value.id == "self"):
                    aliases[t.id] = v.attr
    return aliases


class _Dotted(ast.NodeTransformer):
    """``a.pi_old`` -> ``algorithm.pi_old`` for display."""

    def __init__(self, aliases):
        self.aliases = aliases

    def visit_Attribute(self, node):
        if isinstance(node.value, ast.Name) and node.value.id in self.aliases:
            return ast.Name(id=f"{self.aliases[node.value.id]}.{node.attr}")
        if isinstance(node.value, ast.Name) and node.value.id == "self":
            return ast.Name(id=node.attr)
        return self.generic_visit(node)


@dataclass
class ValidateInfo:
    choices: dict[str, tuple]          # dotted key -> allowed values
    derived: dict[str, str]            # dotted key -> expression that overwrites it
    keys_named: set[str]               # dotted keys that appear in validate's messages/code
    bounds: dict[str, str] = field(default_factory=dict)  # dotted key -> its range, e.g. "[1, inf)"


def read_validate(root: Section) -> ValidateInfo:
    info = ValidateInfo({}, {}, set())
    sections = {root.key: root}
    stack = [root]
    while stack:
        sec = stack.pop()
        sections[sec.key] = sec
        stack.extend(f.section for f in sec.fields if f.section is not None)
    for key, sec in sections.items():
        src = source(sec.path)
        fn = _validate_fn(src.classes[sec.class_name])
        if fn is None:
            continue
        prefix = f"{key}." if key else ""
        aliases = _section_aliases(fn)
        for node in ast.walk(fn):
            # choices = {"rollout.engine": (r.engine, ("local", "sglang")), ...}
            if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                    and node.targets[0].id == "choices" and isinstance(node.value, ast.Dict)):
                for k, v in zip(node.value.keys, node.value.values):
                    if isinstance(k, ast.Constant) and isinstance(v, ast.Tuple) and len(v.elts) == 2:
                        info.choices[prefix + k.value] = tuple(ast.literal_eval(v.elts[1]))
            # for key, interval in BOUNDS.items(): ... (BOUNDS: a module constant {key: interval})
            if isinstance(node, ast.Name) and node.id == "BOUNDS" and isinstance(src.constants.get("BOUNDS"), dict):
                info.bounds.update({prefix + k: v for k, v in src.constants["BOUNDS"].items()})
            # if self.X not in NAME: ...
            if (isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.NotIn)
                    and isinstance(node.left, ast.Attribute) and isinstance(node.left.value, ast.Name)
                    and node.left.value.id == "self" and isinstance(node.comparators[0], ast.Name)):
                allowed = src.constants.get(node.comparators[0].id)
                if isinstance(allowed, (tuple, list, dict)):
                    info.choices[prefix + node.left.attr] = tuple(allowed)
            # dataclasses.replace(a.loss, bypass=..., temperature=...)
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "replace"
                    and node.args and isinstance(node.args[0], ast.Attribute)
                    and isinstance(node.args[0].value, ast.Name) and node.args[0].value.id in aliases):
                target = f"{prefix}{aliases[node.args[0].value.id]}.{node.args[0].attr}"
                for kw in node.keywords:
                    shown = ast.unparse(_Dotted(aliases).visit(ast.parse(ast.unparse(kw.value), mode="eval")))
                    info.derived[f"{target}.{kw.arg}"] = shown
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                info.keys_named.update(SECTION_KEY.findall(node.value))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                info.keys_named.add(f"{prefix}{aliases[node.value.id]}.{node.attr}")
            if (prefix and isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "self"):
                info.keys_named.add(prefix + node.attr)
    known = {f.key for sec in sections.values() for f in sec.fields}
    info.keys_named &= known
    return info


def readers(loss_section: Section, paths: list[Path]) -> dict[str, list[str]]:
    """Loss field -> the functions (``module.function``) that read ``cfg.<field>``."""
    names = {f.name for f in loss_section.fields}
    out: dict[str, list[str]] = {n: [] for n in names}
    for path in paths:
        src = source(path)
        module = path.stem
        for fn in ast.walk(src.tree):
            if not isinstance(fn, ast.FunctionDef) or fn.name == "validate":
                continue
            for node in ast.walk(fn):
                if (isinstance(node, ast.Attribute) and node.attr in names and isinstance(node.value, ast.Name)
                        and node.value.id == "cfg"):
                    label = f"{module}.{fn.name}"
                    if label not in out[node.attr]:
                        out[node.attr].append(label)
    return out


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------

def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _sections(root: Section) -> list[Section]:
    out = []
    for f in root.fields:
        if f.section is not None:
            out.append(f.section)
            out.extend(s for s in _sections(f.section))
    return out


def collect(config_src: Path = CONFIG_SRC, losses_src: Path = LOSSES_SRC, hook_src: Path = HOOK_SRC):
    """(root section, validate info, loss readers)."""
    _SOURCES.clear()
    _SUBSTITUTE.clear()
    _SUBSTITUTE.update({CONFIG_SRC: Path(config_src), LOSSES_SRC: Path(losses_src), HOOK_SRC: Path(hook_src)})
    root = read_section(ROOT_CLASS, CONFIG_SRC)
    info = read_validate(root)
    loss = next((s for s in _sections(root) if s.key == "algorithm.loss"), None)
    reads = readers(loss, [LOSSES_SRC, HOOK_SRC]) if loss is not None else {}
    for sec in _sections(root):
        for f in sec.fields:
            f.choices = info.choices.get(f.key, ())
            if f.key in info.bounds:
                f.notes.insert(0, f"Range `{info.bounds[f.key]}`.")
            if sec.key == "algorithm.loss" and reads.get(f.name):
                f.notes.append("Read by " + ", ".join(f"`{r}`" for r in sorted(reads[f.name])) + ".")
            if f.key in info.derived:
                f.notes.append(f"Set by `TrainConfig.validate`: `{f.name} = {info.derived[f.key]}` "
                               "(a value in the file is replaced).")
    return root, info, reads


def all_fields(root: Section) -> list[Field]:
    return [f for sec in _sections(root) for f in sec.fields]


def render(root: Section, info: ValidateInfo) -> str:
    out = [HEADER, "## Cross-field rules\n", RULES]
    for sec in _sections(root):
        out.append(f"## `{sec.key}`\n")
        note = SECTION_NOTES.get(sec.key)
        out.append((note + " " if note else "") + f"Class `{sec.class_name}` in "
                   f"`{sec.path.relative_to(ROOT).as_posix()}`.\n")
        out.append("| key | type | default | description |")
        out.append("|---|---|---|---|")
        for f in sec.fields:
            if f.section is not None:
                desc = f"the section [`{f.key}`](#{f.key.replace('.', '')}) below"
                out.append(f"| `{f.key}` | section | | {_cell(desc)} |")
                continue
            desc = f.description
            if desc and desc[-1] not in ".!?":
                desc += "."
            extra = []
            if f.choices:
                extra.append("One of " + ", ".join(f"`{c}`" for c in f.choices) + ".")
            extra += f.notes
            cell = " ".join([desc or "*(no description yet)*"] + extra)
            out.append(f"| `{f.key}` | `{_cell(f.annotation)}` | `{_cell(f.default_text)}` | {_cell(cell)} |")
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def missing_rules(info: ValidateInfo, root: Section) -> list[str]:
    """Keys that validate() names but RULES does not (keys with choices are covered by the
    "Choices" rule, sections are not keys)."""
    sections = {sec.key for sec in _sections(root)}
    named = info.keys_named - set(info.choices) - sections
    return sorted(k for k in named if not re.search("`" + re.escape(k) + r"[`:= ]", RULES))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Generate docs/CONFIG.md from the config dataclasses.")
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if the file differs from what would be generated")
    parser.add_argument("--out", type=Path, default=DOC, help="the Markdown file (default: docs/CONFIG.md)")
    parser.add_argument("--config-src", type=Path, default=CONFIG_SRC, help="config.py to read")
    parser.add_argument("--losses-src", type=Path, default=LOSSES_SRC, help="losses.py to read")
    parser.add_argument("--hook-src", type=Path, default=HOOK_SRC, help="hook.py to read")
    args = parser.parse_args(argv)

    root, info, _ = collect(args.config_src, args.losses_src, args.hook_src)
    text = render(root, info)
    undocumented = [f.key for f in all_fields(root) if f.section is None and not f.description]
    if undocumented:
        print(f"{len(undocumented)} config field(s) without a description (add a comment on the field's line "
              "or directly above it):\n  " + "\n  ".join(undocumented), file=sys.stderr)
    unmentioned = missing_rules(info, root)
    if unmentioned:
        print("validate() names config keys that RULES in tools/gen_config_reference.py does not mention: "
              + ", ".join(unmentioned), file=sys.stderr)

    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text or unmentioned:
            if current != text:
                diff = list(difflib.unified_diff(current.splitlines(), text.splitlines(),
                                                 f"{args.out} (committed)", f"{args.out} (generated)", lineterm=""))
                shown = "\n".join(diff[:60]) + ("\n..." if len(diff) > 60 else "")
                print(f"{args.out} is out of date:\n{shown}\n"
                      "regenerate it: python tools/gen_config_reference.py", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date", file=sys.stderr)
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

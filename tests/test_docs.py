"""docs/: the reference pages agree with the code.

* CONFIG.md is exactly what ``tools/gen_config_reference.py`` generates (``--check``), names every
  config field, and its parsed defaults equal the dataclasses' real defaults; negative controls:
  an edited copy of the page, a changed field comment and a new validate() rule each make the
  check fail.
* LOSSES.md documents every loss (with the function implementing it), every correction and
  aggregation mode, and exactly the metrics the hook produces; every backticked name in it exists
  (LossConfig fields, config keys, module attributes, metric names).
* CLUSTER.md and ARCHITECTURE.md: every ``megatron-vespo <command>`` exists in the real parser
  (``mismatch`` included) and takes the flags written after it; environment variables exist in
  examples/slurm/ or the package; module paths exist.
* All four pages: config keys are real fields, relative links and their anchors resolve, named
  files exist.
* tools/draw_architecture.py redraws docs/architecture.png: both decode, same size; the files,
  config keys and code names the drawing shows exist.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import io
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GEN = ROOT / "tools" / "gen_config_reference.py"
DRAW = ROOT / "tools" / "draw_architecture.py"
MY_DOCS = ("CONFIG.md", "LOSSES.md", "CLUSTER.md", "ARCHITECTURE.md")
SECTIONS = ("model", "data", "rollout", "algorithm", "optimizer", "run")


def _gen():
    if "gen_config_reference" in sys.modules:
        return sys.modules["gen_config_reference"]
    spec = importlib.util.spec_from_file_location("gen_config_reference", GEN)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_config_reference"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _text(name: str) -> str:
    return (DOCS / name).read_text()


def _code_spans(text: str) -> list[str]:
    """Inline code spans outside fenced blocks."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.findall(r"`([^`\n]+)`", prose)


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S)


def _config_keys() -> dict[str, object]:
    from megatron_vespo.train.config import TrainConfig

    keys = {}

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                keys[prefix + f.name] = "section"
                walk(type(default), f"{prefix}{f.name}.")
            else:
                keys[prefix + f.name] = default

    walk(TrainConfig, "")
    return keys


# ------------------------------------------------------------------------------------------------
# CONFIG.md
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_config_reference_is_up_to_date():
    proc = subprocess.run([sys.executable, str(GEN), "--check"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, f"docs/CONFIG.md is stale:\n{proc.stderr[-4000:]}"


def test_config_reference_names_every_field():
    text = _text("CONFIG.md")
    rows = set(re.findall(r"^\| `([\w.]+)` \|", text, flags=re.M))
    keys = _config_keys()
    missing = sorted(k for k in keys if "." in k and k not in rows)
    assert not missing, f"config fields missing from docs/CONFIG.md: {missing}"
    unknown = sorted(r for r in rows if r not in keys)
    assert not unknown, f"docs/CONFIG.md documents keys that do not exist: {unknown}"


def test_config_reference_defaults_are_the_real_ones():
    gen = _gen()
    root, _, _ = gen.collect()
    keys = _config_keys()
    parsed = {f.key: f for f in gen.all_fields(root)}
    assert set(parsed) == {k for k in keys if "." in k}
    for key, f in parsed.items():
        if keys[key] == "section":
            assert f.section is not None, key
            continue
        assert not isinstance(f.default, gen.Unresolved), f"{key}: default not resolved ({f.default.text})"
        assert f.default == keys[key] and type(f.default) is type(keys[key]), \
            f"{key}: the generator reads {f.default!r}, the dataclass has {keys[key]!r}"


def test_config_reference_lists_choices_and_derived_fields():
    text = _text("CONFIG.md")
    from megatron_vespo import losses

    row = next(line for line in text.splitlines() if line.startswith("| `algorithm.loss.name` |"))
    for name in losses.LOSSES:
        assert f"`{name}`" in row
    row = next(line for line in text.splitlines() if line.startswith("| `algorithm.loss.temperature` |"))
    assert "rollout.temperature" in row and "TrainConfig.validate" in row


def test_config_check_fails_on_an_edited_doc(tmp_path, capsys):
    gen = _gen()
    edited = tmp_path / "CONFIG.md"
    text = _text("CONFIG.md")
    changed, n = re.subn(r"^(\| `rollout.group_size` \| `int` \| `)(\d+)`", lambda m: f"{m[1]}{int(m[2]) + 1}`",
                         text, flags=re.M)
    assert n == 1
    edited.write_text(changed)
    assert gen.main(["--check", "--out", str(edited)]) == 1
    err = capsys.readouterr().err
    assert "out of date" in err and "rollout.group_size" in err
    edited.write_text(text)  # positive control: the unedited copy passes
    assert gen.main(["--check", "--out", str(edited)]) == 0


def test_config_check_fails_on_a_changed_field_comment(tmp_path, capsys):
    gen = _gen()
    source = (ROOT / "megatron_vespo" / "train" / "config.py").read_text()
    copy = tmp_path / "config.py"
    copy.write_text(source)  # positive control: the same source in another place passes
    assert gen.main(["--check", "--config-src", str(copy)]) == 0
    changed, n = re.subn(r"^(\s+group_size: int = \d+  #).*$", r"\1 responses sampled for each prompt", source,
                         flags=re.M)
    assert n == 1
    copy.write_text(changed)
    capsys.readouterr()
    assert gen.main(["--check", "--config-src", str(copy)]) == 1
    assert "responses sampled for each prompt" in capsys.readouterr().err


def test_config_check_fails_on_an_unsummarised_rule(tmp_path, capsys):
    gen = _gen()
    source = (ROOT / "megatron_vespo" / "train" / "config.py").read_text()
    assert "`rollout.top_p`" not in gen.RULES
    start = source.index("    def validate(self, data_parallel_size")
    end = source.index("        return self\n", start)
    rule = ("        if not 0 < self.rollout.top_p <= 1:\n"
            "            raise ValueError(f\"rollout.top_p = {self.rollout.top_p} must lie in (0, 1]\")\n")
    copy = tmp_path / "config.py"
    copy.write_text(source[:end] + rule + source[end:])
    capsys.readouterr()
    assert gen.main(["--check", "--config-src", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "RULES" in err and "rollout.top_p" in err


# ------------------------------------------------------------------------------------------------
# LOSSES.md
# ------------------------------------------------------------------------------------------------


def _hook_metric_names() -> set[str]:
    """Every metric name the hook produces, over all losses, corrections, bypass and dual clip."""
    import torch

    from megatron_vespo import hook, losses
    from megatron_vespo.losses import LossConfig, TokenBatch

    names = set()
    for name in losses.LOSSES:
        for correction in losses.CORRECTIONS:
            for bypass in (False, True):
                for dual in (3.0, None):
                    if (correction == "fold" and name != "vespo") or (bypass and correction != "none"):
                        continue
                    cfg = LossConfig(name=name, correction=correction, bypass=bypass, dual_clip_c=dual).validate()
                    logp = torch.randn(6, requires_grad=True)
                    old, engine = torch.randn(6).clamp(max=0), torch.randn(6).clamp(max=0)
                    if bypass:
                        old, engine = engine, None
                    tokens = TokenBatch(logp, old, engine, torch.ones(6), torch.tensor([0, 0, 0, 1, 1, 1]))
                    stats = hook.sequence_statistics(tokens, torch.tensor([1.0, -1.0]), 2, cfg, None)
                    out, weights, corr = losses.compute_loss(stats, tokens, cfg)
                    loss_sum, norm = losses.aggregate(out.per_token_loss, weights, tokens, stats,
                                                      cfg.aggregation, True)
                    names |= set(hook._metrics(tokens, stats, out, corr, torch.zeros(6), loss_sum, norm, True))
    return names


def test_losses_doc_covers_every_loss_correction_and_aggregation():
    from megatron_vespo import losses

    text = _text("LOSSES.md")
    headings = re.findall(r"^#+ (.*)$", text, flags=re.M)
    for name, spec in losses.LOSSES.items():
        assert any(f"(`{name}`)" in h for h in headings), f"no heading for loss {name!r}"
        assert f"`losses.{spec.fn.__name__}`" in text, f"LOSSES.md does not name losses.{spec.fn.__name__}"
        if spec.sequence_sums is not None:
            assert f"`losses.{spec.sequence_sums.__name__}`" in text
    rows = set(re.findall(r"^\| `(\w+)`", text, flags=re.M))
    for mode in losses.CORRECTIONS:
        assert mode in rows, f"correction {mode!r} has no row in LOSSES.md"
    for mode in losses.AGGREGATIONS:
        assert mode in rows, f"aggregation {mode!r} has no row in LOSSES.md"
    for function in ("kernel.phi", "kernel.bounds", "kernel.surrogate", "losses.correction_weights",
                     "losses.aggregate", "losses.sequence_log_w", "hook.sequence_statistics",
                     "logprobs.vocab_parallel_logprobs"):
        assert f"`{function}`" in text, function


def test_losses_doc_metrics_are_exactly_the_hooks():
    text = _text("LOSSES.md")
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([\w/]+)` \|", section, flags=re.M))
    produced = _hook_metric_names()
    assert documented == produced, (f"undocumented metrics: {sorted(produced - documented)}; "
                                    f"documented but never produced: {sorted(documented - produced)}")


def test_losses_doc_kernel_numbers():
    from megatron_vespo import kernel

    text = _text("LOSSES.md")
    for k, lam in ((kernel.DEFAULT_K_POS, kernel.DEFAULT_LAMBDA_POS),
                   (kernel.DEFAULT_K_NEG, kernel.DEFAULT_LAMBDA_NEG)):
        b = kernel.bounds(k, lam)
        row = next(line for line in text.splitlines() if line.startswith(f"| $({k:g}, {lam:g})$ |"))
        for value in (b.w_star, b.sup_phi, b.k_const):
            assert f"${value:.4g}$" in row or f"${value:.3f}$" in row or f"${value:g}$" in row, (row, value)


_MODULES = {
    "kernel": "megatron_vespo.kernel", "losses": "megatron_vespo.losses", "hook": "megatron_vespo.hook",
    "logprobs": "megatron_vespo.logprobs", "comm": "megatron_vespo.comm", "batch": "megatron_vespo.batch",
    "routing_replay": "megatron_vespo.routing_replay", "mismatch": "megatron_vespo.mismatch",
    "trainer": "megatron_vespo.train.trainer", "policy": "megatron_vespo.train.policy",
    "config": "megatron_vespo.train.config", "client": "megatron_vespo.rollout.client",
    "launch": "megatron_vespo.rollout.launch", "weight_sync": "megatron_vespo.rollout.weight_sync",
    "protocol": "megatron_vespo.rollout.protocol", "export": "megatron_vespo.convert.export",
    "parallel": "megatron_vespo.mcore.parallel", "model": "megatron_vespo.mcore.model",
}


def _modules() -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {short: importlib.import_module(name) for short, name in _MODULES.items()}


def _has(obj, name: str):
    """(found, the attribute or None): class attributes and dataclass fields without defaults."""
    if hasattr(obj, name):
        return True, getattr(obj, name)
    if dataclasses.is_dataclass(obj) and name in {f.name for f in dataclasses.fields(obj)}:
        return True, None
    return False, None


def _resolves(token: str, modules: dict) -> bool:
    """``module.attr[.attr]``, ``Class.attr`` or ``Name`` found in one of the modules."""
    parts = token.split(".")
    if parts[0] in modules:
        obj, rest = modules[parts[0]], parts[1:]
    else:
        owner = next((m for m in modules.values() if hasattr(m, parts[0])), None)
        if owner is None:
            return False
        obj, rest = getattr(owner, parts[0]), parts[1:]
    for part in rest:
        if obj is None:
            return True  # a dataclass field: nothing further to look into
        found, obj = _has(obj, part)
        if not found:
            return False
    return True


def test_losses_doc_names_exist():
    """Every backticked name in LOSSES.md is a LossConfig field, a config key, a loss, mode or
    metric name, or an attribute of the package's modules."""
    from megatron_vespo import losses

    modules = _modules()
    keys = _config_keys()
    fields = {f.name for f in dataclasses.fields(losses.LossConfig)}
    choices = {str(c) for values in _gen().collect()[1].choices.values() for c in values}
    from megatron_vespo.train.grad_norms import METRIC_NAMES

    known = (fields | set(losses.LOSSES) | set(losses.CORRECTIONS) | set(losses.AGGREGATIONS)
             | _hook_metric_names() | choices | {k.rsplit(".", 1)[-1] for k in keys} | set(METRIC_NAMES))
    source = _searchable_source()
    external = {"calculate_per_token_loss", "finalize_model_grads", "loss_func", "index_add_", "FloatingPointError",
                "ValueError", "null", "true"}
    bad = []
    for token in _code_spans(_text("LOSSES.md")):
        token = token.strip()
        if not re.fullmatch(r"[A-Za-z_][\w./]*", token) or token.endswith(("/", ".md", ".py", ".jsonl", "...")):
            continue
        head = token.split(".")[0]
        if token.startswith("algorithm.loss."):
            ok = token.split(".")[2] in fields
        elif head in SECTIONS and "." in token:
            ok = token in keys
        elif "/" in token:  # a metric: the hook's, or one the trainer adds to each row
            ok = token in known or f'"{token}"' in source
        elif "." in token:
            ok = _resolves(token, modules)
        else:
            ok = token in known or token in external or _resolves(token, modules) or f'"{token}"' in source
        if not ok:
            bad.append(token)
    assert not bad, f"LOSSES.md names things that do not exist: {sorted(set(bad))}"


# ------------------------------------------------------------------------------------------------
# CLUSTER.md, ARCHITECTURE.md: commands, flags, variables, paths
# ------------------------------------------------------------------------------------------------


def _command_lines(text: str) -> list[str]:
    """``megatron-vespo ...`` invocations in code spans and code blocks (continuations joined)."""
    lines = []
    for block in _code_blocks(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        lines += [line for line in joined.splitlines() if "megatron-vespo " in line]
    lines += [span for span in _code_spans(text) if span.startswith("megatron-vespo ")]
    out = []
    for line in lines:
        out.append(line[line.index("megatron-vespo "):])
    return out


def _help(command: list[str]) -> str:
    from megatron_vespo import cli

    buffer = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*command, "--help"])
    assert exit_info.value.code == 0, f"megatron-vespo {' '.join(command)} --help exited {exit_info.value.code}"
    return buffer.getvalue()


@pytest.mark.parametrize("doc", ["CLUSTER.md", "ARCHITECTURE.md"])
def test_commands_and_flags_exist(doc):
    commands: dict[tuple, set] = {}
    for line in _command_lines(_text(doc)):
        words = line.split()[1:]
        command = []
        for word in words:
            if not re.fullmatch(r"[a-z][a-z0-9-]*", word):
                break
            command.append(word)
        if not command:
            continue
        flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", line))
        commands.setdefault(tuple(command), set()).update(flags)
    assert commands, f"{doc} names no megatron-vespo command"
    if doc == "CLUSTER.md":
        assert ("mismatch",) in commands
    cache: dict[tuple, str] = {}
    for command, flags in commands.items():
        # the longest prefix that is a real (sub)command: 'sglang launch', 'convert hf-to-mcore', 'train'
        for n in range(len(command), 0, -1):
            try:
                text = cache.get(command[:n]) or _help(list(command[:n]))
            except AssertionError:
                if n == 1:
                    raise
                continue
            cache[command[:n]] = text
            break
        missing = sorted(f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text))
        assert not missing, f"{doc}: megatron-vespo {' '.join(command[:n])} has no {missing}"


def test_architecture_names_every_command():
    text = _text("ARCHITECTURE.md")
    from megatron_vespo import cli

    parser_source = Path(cli.__file__).read_text()
    for name in re.findall(r'add_parser\(\s*"([\w-]+)"', parser_source):
        if name in ("convert",):
            continue
        assert f"megatron-vespo {name}" in text or f"megatron-vespo sglang {name}" in text \
            or f"megatron-vespo convert {name}" in text, f"ARCHITECTURE.md does not name the command {name!r}"


def _searchable_source() -> str:
    parts = [p.read_text(errors="replace") for p in sorted((ROOT / "megatron_vespo").rglob("*.py"))]
    parts += [p.read_text(errors="replace") for p in sorted((ROOT / "examples" / "slurm").iterdir()) if p.is_file()]
    return "\n".join(parts)


@pytest.mark.parametrize("doc", ["CLUSTER.md", "ARCHITECTURE.md"])
def test_environment_variables_exist(doc):
    source = _searchable_source()
    names = {t for t in _code_spans(_text(doc)) if re.fullmatch(r"[A-Z][A-Z0-9_]{2,}", t)}
    missing = sorted(n for n in names if not re.search(rf"\b{n}\b", source))
    assert not missing, f"{doc} names variables or constants found nowhere in the code or examples/slurm: {missing}"


@pytest.mark.parametrize("doc", ["CLUSTER.md", "ARCHITECTURE.md"])
def test_identifiers_exist_in_the_code(doc):
    """Backticked identifiers (functions, classes, keys of state files) appear in the code."""
    source = _searchable_source()
    modules = _modules()
    bad = []
    for token in _code_spans(_text(doc)):
        if not re.fullmatch(r"[A-Za-z_][\w.]*", token) or token.endswith((".py", ".json", ".jsonl", ".yaml", ".md",
                                                                         ".sh", ".png", ".log", ".pt")):
            continue
        if token.split(".")[0] in SECTIONS and "." in token:
            continue  # config keys: test_config_keys_exist
        if "." in token and token.split(".")[0] in modules or (token[:1].isupper() and "." in token):
            ok = _resolves(token, modules)
        else:
            ok = bool(re.search(rf"(?<![\w]){re.escape(token)}(?![\w])", source))
        if not ok:
            bad.append(token)
    assert not bad, f"{doc} names things the code does not have: {sorted(set(bad))}"


@pytest.mark.parametrize("doc", MY_DOCS)
def test_config_keys_exist(doc):
    keys = _config_keys()
    text = _text(doc)
    candidates = set()
    for span in _code_spans(text):
        for part in re.split(r"[\s,]+", span):
            part = re.split(r"[=:]", part, maxsplit=1)[0]
            if re.search(r"\.(py|md|json|jsonl|yaml|png|sh|log|pt)$", part):
                continue
            if re.fullmatch(r"(?:%s)\.[a-z_]+(?:\.[a-z_]+)?" % "|".join(SECTIONS), part):
                candidates.add(part)
    for block in _code_blocks(text):
        candidates |= set(re.findall(r"(?<![\w.])((?:%s)\.[a-z_]+(?:\.[a-z_]+)?)=" % "|".join(SECTIONS), block))
    unknown = sorted(c for c in candidates if c not in keys)
    assert not unknown, f"{doc} names config keys that do not exist: {unknown}"


@pytest.mark.parametrize("doc", MY_DOCS)
def test_named_files_exist(doc):
    top = {p.name for p in ROOT.iterdir()} | {p.name for p in (ROOT / "megatron_vespo").iterdir()}
    missing = []
    for span in _code_spans(_text(doc)):
        if not re.fullmatch(r"[\w./-]+(?:\.py|/)", span):
            continue
        if span.split("/")[0] not in top and not span.endswith(".py"):
            continue  # not a path in the repository (e.g. a directory of a run)
        candidates = [ROOT / span, ROOT / "megatron_vespo" / span]
        if "/" not in span.rstrip("/"):
            candidates += list((ROOT / "megatron_vespo").rglob(span.rstrip("/")))
        if not any(c.exists() for c in candidates):
            missing.append(span)
    assert not missing, f"{doc} names files that do not exist: {missing}"


def test_architecture_module_table_is_complete():
    """Every module and subpackage of megatron_vespo has a row in ARCHITECTURE.md's table."""
    text = _text("ARCHITECTURE.md")
    rows = set(re.findall(r"^\| `(megatron_vespo/[\w./]+)` \|", text, flags=re.M))
    package = ROOT / "megatron_vespo"
    expected = {f"megatron_vespo/{p.name}" for p in package.glob("*.py")
                if p.name not in ("__init__.py", "__main__.py")}
    expected |= {f"megatron_vespo/{p.name}/" for p in package.iterdir() if (p / "__init__.py").exists()}
    assert expected <= rows, f"modules without a row in ARCHITECTURE.md: {sorted(expected - rows)}"
    for row in rows:
        assert (ROOT / row).exists(), row


def _slug(heading: str) -> str:
    heading = heading.strip().lower().replace("`", "")
    heading = re.sub(r"[^\w\- ]", "", heading)
    return heading.replace(" ", "-")


@pytest.mark.parametrize("doc", MY_DOCS)
def test_links_resolve(doc):
    text = _text(doc)
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (DOCS / path).resolve() if path else DOCS / doc
        if not file.exists():
            problems.append(f"{target}: no file {file}")
            continue
        if anchor and file.suffix == ".md":
            slugs = {_slug(h) for h in re.findall(r"^#+ (.*)$", file.read_text(), flags=re.M)}
            if anchor not in slugs:
                problems.append(f"{target}: no heading #{anchor} in {file.name}")
    assert not problems, f"{doc}: " + "; ".join(problems)


# ------------------------------------------------------------------------------------------------
# The picture
# ------------------------------------------------------------------------------------------------


def test_architecture_picture_is_the_tools_drawing(tmp_path, monkeypatch):
    """tools/draw_architecture.py redraws docs/architecture.png: both decode as images, of the same
    size; every file, config key and name of the code the drawing shows exists; ARCHITECTURE.md
    shows the picture. (Pixels are not compared: they change with matplotlib's text rendering.)"""
    import matplotlib.image
    import matplotlib.text

    spec = importlib.util.spec_from_file_location("draw_architecture", DRAW)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    figures, close = [], tool.plt.close
    monkeypatch.setattr(tool.plt, "close", figures.append)  # keep the figure to read what it shows
    out = tmp_path / "architecture.png"
    assert tool.main(["--out", str(out)]) == 0
    monkeypatch.undo()
    try:
        texts = [t.get_text() for figure in figures for t in figure.findobj(matplotlib.text.Text)]
    finally:
        for figure in figures:
            close(figure)
    drawn, committed = matplotlib.image.imread(out), matplotlib.image.imread(DOCS / "architecture.png")
    assert committed.shape == drawn.shape, \
        f"docs/architecture.png is {committed.shape}, the tool draws {drawn.shape}: rerun tools/draw_architecture.py"

    names = set()
    for text in texts:  # paths, dotted names, snake_case and CamelCase identifiers
        names |= set(re.findall(r"[A-Za-z_][\w/]*(?:\.[A-Za-z_]\w*)+|\b[A-Za-z]+_\w+|\b[A-Z][a-z]+[A-Z]\w*", text))
    assert len(names) >= 10, names  # the picture's labels were read
    source, modules, keys = _searchable_source(), _modules(), _config_keys()
    external = {"forward_backward"}  # Megatron-Core's schedule (get_forward_backward_func), named short
    bad = []
    for name in sorted(names - external):
        if name.endswith(".py"):
            ok = (ROOT / "megatron_vespo" / name).is_file() or (ROOT / name).is_file()
        elif name.split(".")[0] in SECTIONS and "." in name:
            ok = name in keys
        elif "." in name and (name.split(".")[0] in modules or name[:1].isupper()):
            ok = _resolves(name, modules)
        else:
            ok = bool(re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", source))
        if not ok:
            bad.append(name)
    assert not bad, f"docs/architecture.png names what does not exist: {bad}"
    assert "(architecture.png)" in _text("ARCHITECTURE.md")

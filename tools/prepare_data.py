#!/usr/bin/env python
"""Prepare math RL prompt files (DAPO-Math-17k, AIME 2024/2025, AMC 2023, MATH-500, GSM8K).

Reads LOCAL copies of the Hugging Face dataset repos (no network: download them beforehand, e.g.
``huggingface-cli download --repo-type dataset <repo> --local-dir SRC/<name>``) and writes one
parquet per dataset to OUT/<dataset>.parquet with the columns

    prompt  list<struct<role, content>>  one user message: the problem wrapped in a DAPO-style
                                         instruction to end with the answer in \\boxed{}
    answer  string                       the reference answer (GSM8K: the number after "####")
    source  string                       the dataset key (dapo_math_17k, aime24, ...)
    id      string                       the source's id, or <file stem>-<row> when it has none

which ``megatron_vespo.train.data.PromptFile`` reads with its defaults (data.task=file,
data.reward=math). Rows are deduplicated on the whitespace-normalised problem text (DAPO-Math-17k
ships each of its ~17.9k problems about 100 times); the first occurrence is kept and problems seen
again with a different answer are counted as conflicts. Progress and counts go to stderr.

A dataset's directory is looked up, in order, as: the --dataset-dir KEY=PATH override,
SRC/<key>, SRC/<owner>/<name>, SRC/<name>, and a Hugging Face hub cache entry
SRC/datasets--<owner>--<name>/snapshots/<revision> (for each accepted repo below). Inside it the
file patterns are tried in order and the first that matches is used.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

INSTRUCTION_HEAD = ("Solve the following math problem step by step. The last line of your response should "
                    "be of the form \\boxed{ANSWER} where ANSWER is the answer to the problem.")
INSTRUCTION_TAIL = "Remember to put your final answer within \\boxed{}."

# DAPO-Math-17k's own prompt asks for "Answer: $Answer"; the problem is stripped out of it.
DAPO_HEAD = ("Solve the following math problem step by step. The last line of your response should be of the "
             "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.")
DAPO_TAIL = 'Remember to put your answer on its own line after "Answer:".'


def make_prompt(problem: str) -> list[dict]:
    return [{"role": "user", "content": f"{INSTRUCTION_HEAD}\n\n{problem.strip()}\n\n{INSTRUCTION_TAIL}"}]


@dataclass(frozen=True)
class Layout:
    repo: str  # Hugging Face dataset repo (owner/name)
    files: tuple[str, ...]  # glob patterns inside the repo directory, tried in order
    question: tuple[str, ...] = ("problem",)  # candidate column names, first present wins
    answer: tuple[str, ...] = ("answer",)
    ids: tuple[str, ...] = ("id",)  # optional


@dataclass(frozen=True)
class Spec:
    key: str
    title: str
    kind: str  # dapo | plain | gsm8k
    layouts: tuple[Layout, ...]


SPECS = {s.key: s for s in (
    Spec("dapo_math_17k", "DAPO-Math-17k (train)", "dapo", (
        Layout("BytedTsinghua-SIA/DAPO-Math-17k", ("data/dapo-math-17k.parquet", "data/*.parquet", "*.parquet"),
               question=("prompt",), answer=("reward_model",), ids=("extra_info",)),)),
    Spec("aime24", "AIME 2024", "plain", (
        Layout("HuggingFaceH4/aime_2024", ("data/train-*.parquet", "*.parquet", "*.jsonl"),
               question=("problem", "Problem"), answer=("answer", "Answer"), ids=("id", "ID")),
        Layout("Maxwell-Jia/AIME_2024", ("*.parquet", "*.jsonl"),
               question=("Problem", "problem"), answer=("Answer", "answer"), ids=("ID", "id")))),
    Spec("aime25", "AIME 2025", "plain", (
        Layout("opencompass/AIME2025", ("aime2025-*.jsonl",), question=("question", "problem")),
        Layout("yentinglin/aime_2025", ("data/train-*.parquet", "*.parquet"), question=("problem", "question")),
        Layout("math-ai/aime25", ("test.jsonl", "data/test-*.parquet", "*.jsonl"),
               question=("problem", "question")))),
    Spec("amc23", "AMC 2023", "plain", (
        Layout("math-ai/amc23", ("test-*.parquet", "data/test-*.parquet", "test.jsonl", "*.parquet", "*.jsonl"),
               question=("question", "problem")),)),
    Spec("math500", "MATH-500", "plain", (
        Layout("HuggingFaceH4/MATH-500", ("test.jsonl",), ids=("unique_id",)),)),
    Spec("gsm8k", "GSM8K (split from --gsm8k-split)", "gsm8k", (
        Layout("openai/gsm8k", ("main/{split}-*.parquet",), question=("question",), ids=()),)),
)}


class PrepError(Exception):
    """A dataset that cannot be prepared; the message names the file/row."""


class MissingDataset(PrepError):
    pass


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- locating ----------------------------------------------------------------------------------


def candidate_dirs(spec: Spec, source_dir: Path, override: str | None) -> list[Path]:
    if override:
        return [Path(override)]
    dirs = [source_dir / spec.key]
    for layout in spec.layouts:
        owner, name = layout.repo.split("/")
        dirs += [source_dir / owner / name, source_dir / name]
        snapshots = source_dir / f"datasets--{owner}--{name}" / "snapshots"
        if snapshots.is_dir():
            dirs += sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime,
                           reverse=True)
    seen, out = set(), []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def expected_layout(spec: Spec, split: str) -> str:
    lines = []
    for layout in spec.layouts:
        files = " | ".join(f.format(split=split) for f in layout.files)
        lines.append(f"{layout.repo}: {files}")
    return "; ".join(lines)


def locate(spec: Spec, source_dir: Path, override: str | None, split: str) -> tuple[Layout, list[Path]]:
    dirs = candidate_dirs(spec, source_dir, override)
    existing = [d for d in dirs if d.is_dir()]
    for d in existing:
        for layout in spec.layouts:
            for pattern in layout.files:
                files = sorted(p for p in d.glob(pattern.format(split=split)) if p.is_file())
                if files:
                    return layout, files
    where = ", ".join(str(d) for d in dirs)
    if existing:
        raise MissingDataset(f"{spec.key}: no data file in {', '.join(map(str, existing))}; expected "
                             f"{expected_layout(spec, split)}")
    raise MissingDataset(f"{spec.key}: no directory found (looked for {where}); expected a local copy of "
                         f"{expected_layout(spec, split)}")


# -- reading -----------------------------------------------------------------------------------


def iter_rows(path: Path, columns: list[str] | None = None):
    """(row index, dict) for each row of a .parquet or .jsonl file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            f = pq.ParquetFile(path)
        except Exception as err:
            raise PrepError(f"{path}: cannot read as parquet ({err}); is it a Git LFS pointer? "
                            f"(run git lfs pull)") from err
        names = f.schema_arrow.names
        cols = [c for c in columns if c in names] if columns else None
        i = 0
        batches = f.iter_batches(batch_size=65536, columns=cols)
        while True:
            try:  # the footer parsed; a data page can still be truncated or corrupt
                batch = next(batches)
            except StopIteration:
                break
            except Exception as err:
                raise PrepError(f"{path}: cannot read rows from {i} on ({err})") from None
            for row in batch.to_pylist():
                yield i, row
                i += 1
            if f.metadata.num_rows > 200_000:
                log(f"  {path.name}: {i}/{f.metadata.num_rows} rows")
        return
    if path.suffix == ".jsonl":
        try:
            data = path.read_bytes()
        except OSError as err:
            raise PrepError(f"{path}: cannot read ({err.strerror or err})") from None
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            line = data.count(b"\n", 0, err.start) + 1
            raise PrepError(f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); "
                            f"is it a Git LFS pointer or a binary file?") from None
        i = 0
        for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise PrepError(f"{path}: line {lineno} is not valid JSON ({err})") from err
            if not isinstance(row, dict):
                raise PrepError(f"{path}: line {lineno} is not a JSON object")
            yield i, row
            i += 1
        return
    raise PrepError(f"{path}: unsupported file type (expected .parquet or .jsonl)")


def file_columns(path: Path) -> list[str]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names)
        except Exception as err:
            raise PrepError(f"{path}: cannot read as parquet ({err}); is it a Git LFS pointer? "
                            f"(run git lfs pull)") from err
    for _, row in iter_rows(path):
        return list(row)
    return []


def pick(columns: list[str], candidates: tuple[str, ...], path: Path, what: str, required: bool = True):
    for c in candidates:
        if c in columns:
            return c
    if required:
        raise PrepError(f"{path}: no {what} column (tried {list(candidates)}); the file has columns {columns}")
    return None


def answer_str(value, where: str) -> str:
    if isinstance(value, bool) or value is None:
        raise PrepError(f"{where}: the answer is {value!r}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if not isinstance(value, str):
        raise PrepError(f"{where}: the answer must be a string or a number, got {type(value).__name__}")
    value = value.strip()
    if not value:
        raise PrepError(f"{where}: the answer is empty")
    return value


def gsm8k_answer(text, where: str) -> str:
    if not isinstance(text, str):
        raise PrepError(f"{where}: the answer must be a string, got {type(text).__name__}")
    m = re.search(r"####\s*(.+?)\s*$", text.strip())
    if not m:
        raise PrepError(f"{where}: no '#### <answer>' line in the answer {text[-80:]!r}")
    return re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", m.group(1)).strip()


def dapo_problem(prompt, where: str) -> str:
    if not isinstance(prompt, list) or not prompt:
        raise PrepError(f"{where}: column 'prompt' must be a chat message list, got {type(prompt).__name__}")
    users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    if not users or not isinstance(users[-1].get("content"), str):
        raise PrepError(f"{where}: column 'prompt' has no user message with string content")
    text = users[-1]["content"].strip()
    if text.startswith(DAPO_HEAD):
        text = text[len(DAPO_HEAD):]
    if text.rstrip().endswith(DAPO_TAIL):
        text = text.rstrip()[: -len(DAPO_TAIL)]
    return text.strip()


def read_dataset(spec: Spec, layout: Layout, files: list[Path], split: str):
    """(problem, answer, id) per source row."""
    for path in files:
        stem = path.name.split(".")[0]
        columns = file_columns(path)
        if spec.kind == "dapo":
            for c in ("prompt", "reward_model"):
                pick(columns, (c,), path, c)
            for i, row in iter_rows(path, ["prompt", "reward_model", "extra_info"]):
                where = f"{path} row {i}"
                rm = row.get("reward_model")
                if not isinstance(rm, dict) or "ground_truth" not in rm:
                    raise PrepError(f"{where}: column 'reward_model' has no ground_truth (got {rm!r:.80})")
                extra = row.get("extra_info") or {}
                rid = extra.get("index") if isinstance(extra, dict) else None
                yield (dapo_problem(row["prompt"], where), answer_str(rm["ground_truth"], where + " reward_model"),
                       str(rid) if rid not in (None, "") else f"{stem}-{i}")
            continue
        qcol = pick(columns, layout.question, path, "question")
        acol = pick(columns, layout.answer, path, "answer")
        icol = pick(columns, layout.ids, path, "id", required=False) if layout.ids else None
        for i, row in iter_rows(path, [c for c in (qcol, acol, icol) if c]):
            where = f"{path} row {i}"
            problem = row.get(qcol)
            if not isinstance(problem, str) or not problem.strip():
                raise PrepError(f"{where}: column {qcol!r} must be a non-empty string, got {problem!r:.80}")
            if spec.kind == "gsm8k":
                answer = gsm8k_answer(row.get(acol), f"{where} column {acol!r}")
                rid = f"{split}-{i}"
            else:
                answer = answer_str(row.get(acol), f"{where} column {acol!r}")
                rid = row.get(icol) if icol else None
                rid = str(rid) if rid not in (None, "") else f"{stem}-{i}"
            yield problem, answer, rid


# -- writing -----------------------------------------------------------------------------------


def prepare(spec: Spec, layout: Layout, files: list[Path], out_dir: Path, split: str) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    log(f"{spec.key}: reading {', '.join(str(f) for f in files)} (as {layout.repo})")
    seen: dict[str, str] = {}
    ids: set[str] = set()
    prompts, answers, out_ids = [], [], []
    rows = duplicates = conflicts = 0
    for problem, answer, rid in read_dataset(spec, layout, files, split):
        rows += 1
        key = " ".join(problem.split())
        if not key:
            raise PrepError(f"{spec.key}: row {rows - 1} has an empty problem")
        if key in seen:
            duplicates += 1
            conflicts += seen[key] != answer
            continue
        seen[key] = answer
        uid, n = rid, 1
        while uid in ids:
            n += 1
            uid = f"{rid}#{n}"
        ids.add(uid)
        prompts.append(make_prompt(problem))
        answers.append(answer)
        out_ids.append(uid)
    if not prompts:
        raise PrepError(f"{spec.key}: {', '.join(map(str, files))} has no rows")
    schema = pa.schema([("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
                        ("answer", pa.string()), ("source", pa.string()), ("id", pa.string())])
    table = pa.table({"prompt": prompts, "answer": answers, "source": [spec.key] * len(prompts), "id": out_ids},
                     schema=schema)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{spec.key}.parquet"
    tmp = out.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, out)
    counts = {"dataset": spec.key, "rows": rows, "duplicates": duplicates, "conflicts": conflicts,
              "written": len(prompts), "path": str(out)}
    log(f"{spec.key}: {rows} rows read, {duplicates} duplicates dropped"
        + (f" ({conflicts} with a different answer; the first answer kept)" if conflicts else "")
        + f", {len(prompts)} written -> {out}")
    return counts


def build_parser() -> argparse.ArgumentParser:
    layouts = "\n".join(f"  {s.key:14s} {s.title}\n" + "\n".join(
        f"  {'':14s}   {l.repo}: {' | '.join(l.files)}  (question: {'/'.join(l.question)}, "
        f"answer: {'/'.join(l.answer)})" for l in s.layouts) for s in SPECS.values())
    p = argparse.ArgumentParser(
        prog="prepare_data.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="datasets and the local layouts accepted (files relative to the dataset's directory):\n"
               + layouts + "\n  DAPO-Math-17k: prompt is a message list, the answer reward_model.ground_truth, "
               "the id extra_info.index.\n  GSM8K: the answer is the number after '####'; {split} is "
               "--gsm8k-split.")
    p.add_argument("--source-dir", required=True, type=Path, help="directory holding the local dataset copies")
    p.add_argument("--out-dir", required=True, type=Path, help="where <dataset>.parquet files are written")
    p.add_argument("--datasets", default=",".join(SPECS),
                   help=f"comma-separated subset of {','.join(SPECS)} (default: all)")
    p.add_argument("--dataset-dir", action="append", default=[], metavar="KEY=PATH",
                   help="directory of one dataset, overriding the lookup under --source-dir (repeatable)")
    p.add_argument("--gsm8k-split", default="test", choices=("test", "train"))
    p.add_argument("--skip-missing", action="store_true",
                   help="warn about datasets not found and prepare the others (default: error, write nothing)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keys = [k.strip() for k in args.datasets.split(",") if k.strip()]
    unknown = [k for k in keys if k not in SPECS]
    if unknown or not keys:
        log(f"error: unknown dataset(s) {unknown}; choose from {list(SPECS)}")
        return 2
    overrides = {}
    for item in args.dataset_dir:
        key, sep, path = item.partition("=")
        if not sep or key not in SPECS:
            log(f"error: --dataset-dir {item!r} must be KEY=PATH with KEY one of {list(SPECS)}")
            return 2
        overrides[key] = path
    if not args.source_dir.is_dir() and not overrides:
        log(f"error: --source-dir {args.source_dir} is not a directory")
        return 2

    found, missing = {}, []
    for key in keys:
        try:
            found[key] = locate(SPECS[key], args.source_dir, overrides.get(key), args.gsm8k_split)
        except (MissingDataset, PrepError) as err:
            missing.append(str(err))
    for msg in missing:
        log(("warning (skipped): " if args.skip_missing else "error: ") + msg)
    if missing and not args.skip_missing:
        log("nothing written; pass --skip-missing to prepare the datasets that were found")
        return 2
    if not found:
        log("error: none of the requested datasets was found")
        return 2

    summary = []
    for key, (layout, files) in found.items():
        try:
            summary.append(prepare(SPECS[key], layout, files, args.out_dir, args.gsm8k_split))
        except PrepError as err:
            log(f"error: {err}")
            return 1
        except OSError as err:  # --out-dir not writable, a disk full, ...
            log(f"error: {key}: cannot write to {args.out_dir}: {err}")
            return 2
    log("summary: " + "; ".join(f"{c['dataset']} {c['written']}/{c['rows']}" for c in summary)
        + (f"; skipped {len(missing)} missing" if missing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

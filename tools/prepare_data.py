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
``--template reference --no-dedupe`` writes the prompts of the paper's reference runs instead
(docs/REFERENCE_RECIPE.md): every row kept, the problem followed by the reference's instruction.

A dataset's directory is looked up, in order, as: the --dataset-dir KEY=PATH override,
SRC/<key>, SRC/<owner>/<name>, SRC/<name>, and a Hugging Face hub cache entry
SRC/datasets--<owner>--<name>/snapshots/<revision> (for each accepted repo below). Inside it the
file patterns are tried in order and the first that matches is used.

Code tasks (data.reward=code, docs/REWARDS.md): ``--tiny-code OUT.jsonl`` writes a tiny built-in
task (8 small stdin/stdout problems); ``--code-file PATH --code-out OUT.jsonl`` converts a local code
dataset (``--code-file PATH --help`` lists the field-name options). Rows: prompt, tests [{input,
output}], id, source.
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


# --template reference: the prompts of the paper's reference runs (recipe/vespo/tools/preprocess_datasets.py
# in github.com/FloyedShen/VESPO): the problem as the dataset has it, one space, the dataset's instruction.
REFERENCE_BOXED = "Please reason step by step, and put your final answer within \\boxed{}."
REFERENCE_THINK = "Let's think step by step and output the final answer within \\boxed{}."
REFERENCE_INSTRUCTION = {"dapo_math_17k": REFERENCE_BOXED, "amc23": REFERENCE_BOXED, "aime24": REFERENCE_THINK,
                         "aime25": REFERENCE_THINK, "math500": REFERENCE_THINK,
                         "gsm8k": REFERENCE_BOXED}  # GSM8K: not in the reference; its training instruction
TEMPLATES = ("default", "reference")


def make_prompt(problem: str, template: str = "default", dataset: str = "") -> list[dict]:
    if template == "reference":
        return [{"role": "user", "content": f"{problem} {REFERENCE_INSTRUCTION[dataset]}"}]
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


def prepare(spec: Spec, layout: Layout, files: list[Path], out_dir: Path, split: str, template: str = "default",
            dedupe: bool = True) -> dict:
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
        if dedupe and key in seen:
            duplicates += 1
            conflicts += seen[key] != answer
            continue
        if dedupe:
            seen[key] = answer
        uid, n = rid, 1
        while uid in ids:
            n += 1
            uid = f"{rid}#{n}"
        ids.add(uid)
        prompts.append(make_prompt(problem, template, spec.key))
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


# -- code tasks (data.task=file, data.reward=code) ---------------------------------------------
# Rows {"prompt": [one user message], "tests": [{"input": stdin, "output": expected stdout}, ...],
# "id", "source"} in a .jsonl, read by PromptFile with data.tests_key=tests (docs/REWARDS.md).

CODE_FLAGS = ("--tiny-code", "--code-file")
CODE_INSTRUCTION = ("Write a Python 3 program that reads the input from standard input and prints the answer "
                    "to standard output. Put the complete program in one ```python code block.")

# The built-in tiny task: (id, problem, [(stdin, expected stdout), ...], a reference solution).
TINY_CODE = (
    ("sum", "Read two integers on one line, separated by a space, and print their sum.",
     [("1 2\n", "3\n"), ("-5 12\n", "7\n"), ("1000000000 1000000000\n", "2000000000\n")],
     "a, b = map(int, input().split())\nprint(a + b)\n"),
    ("reverse", "Read one line of text and print it reversed.",
     [("hello\n", "olleh\n"), ("ab c\n", "c ba\n"), ("x\n", "x\n")],
     "print(input()[::-1])\n"),
    ("maximum", "The first line holds n, the second n integers separated by spaces. Print the largest of them.",
     [("3\n1 7 4\n", "7\n"), ("1\n-2\n", "-2\n"), ("5\n-1 -9 -3 -1 -4\n", "-1\n")],
     "input()\nprint(max(map(int, input().split())))\n"),
    ("vowels", "Read one line of lowercase letters and spaces and print how many of its letters are vowels "
               "(a, e, i, o, u).",
     [("hello world\n", "3\n"), ("rhythm\n", "0\n"), ("aeiou aeiou\n", "10\n")],
     "print(sum(c in 'aeiou' for c in input()))\n"),
    ("factorial", "Read an integer n (0 <= n <= 20) and print n! (the product 1 x 2 x ... x n; 0! is 1).",
     [("0\n", "1\n"), ("5\n", "120\n"), ("20\n", "2432902008176640000\n")],
     "import math\nprint(math.factorial(int(input())))\n"),
    ("fizzbuzz", "Read an integer n and print the numbers from 1 to n, one a line, but print Fizz instead of "
                 "multiples of 3, Buzz instead of multiples of 5 and FizzBuzz instead of multiples of both.",
     [("5\n", "1\n2\nFizz\n4\nBuzz\n"), ("1\n", "1\n"), ("15\n", "1\n2\nFizz\n4\nBuzz\nFizz\n7\n8\nFizz\nBuzz\n11\n"
                                                          "Fizz\n13\n14\nFizzBuzz\n")],
     "n = int(input())\nfor i in range(1, n + 1):\n"
     "    print('FizzBuzz' if i % 15 == 0 else 'Fizz' if i % 3 == 0 else 'Buzz' if i % 5 == 0 else i)\n"),
    ("prime", "Read an integer n (1 <= n <= 10^9) and print YES if n is a prime number, otherwise NO.",
     [("2\n", "YES\n"), ("1\n", "NO\n"), ("999999937\n", "YES\n"), ("1000000000\n", "NO\n")],
     "n = int(input())\nprint('YES' if n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1)) else 'NO')\n"),
    ("sort", "Read one line of integers separated by spaces and print them in increasing order, separated by "
             "single spaces.",
     [("3 1 2\n", "1 2 3\n"), ("5\n", "5\n"), ("-1 10 -7 0 0\n", "-7 -1 0 0 10\n")],
     "print(*sorted(map(int, input().split())))\n"),
)


def make_code_prompt(problem: str) -> list[dict]:
    return [{"role": "user", "content": f"{problem.strip()}\n\n{CODE_INSTRUCTION}"}]


def tiny_code_rows() -> list[dict]:
    return [{"prompt": make_code_prompt(problem), "tests": [{"input": i, "output": o} for i, o in tests],
             "id": f"tiny-{key}", "source": "tiny_code"} for key, problem, tests, _ in TINY_CODE]


def code_tests(value, where: str, input_key: str = "input", output_key: str = "output") -> list[dict]:
    """A dataset's tests as ``[{"input", "output"}]``. Accepted: a list of objects with
    ``input_key``/``output_key``, an object of parallel lists ``{"inputs": [...], "outputs": [...]}``
    (APPS/TACO style), or either as a JSON string. Inputs and outputs must be strings."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as err:
            raise PrepError(f"{where}: the tests are a string but not JSON ({err})") from None
    if isinstance(value, dict) and isinstance(value.get("inputs"), list) and isinstance(value.get("outputs"), list):
        if len(value["inputs"]) != len(value["outputs"]):
            raise PrepError(f"{where}: {len(value['inputs'])} inputs but {len(value['outputs'])} outputs")
        value = [{input_key: i, output_key: o} for i, o in zip(value["inputs"], value["outputs"])]
    if not isinstance(value, list):
        raise PrepError(f"{where}: the tests must be a list of {{{input_key!r}, {output_key!r}}} objects or "
                        f"{{'inputs': [...], 'outputs': [...]}}, got {type(value).__name__}")
    tests = []
    for j, t in enumerate(value):
        if not isinstance(t, dict) or not isinstance(t.get(input_key), str) or not isinstance(t.get(output_key), str):
            raise PrepError(f"{where}: test {j} must be an object with string {input_key!r} and {output_key!r}, "
                            f"got {str(t)[:80]!r}")
        tests.append({"input": t[input_key], "output": t[output_key]})
    return tests


def convert_code_file(path: Path, problem_key: str = "problem", tests_key: str = "tests", id_key: str = "id",
                      input_key: str = "input", output_key: str = "output", source: str = "") -> tuple[list[dict], int]:
    """(rows in the code task format, rows skipped for having no tests) from a .jsonl/.parquet file."""
    rows, skipped, ids = [], 0, set()
    stem = path.name.split(".")[0]
    for i, row in iter_rows(path):
        where = f"{path} row {i}"
        for key in (problem_key, tests_key):
            if key not in row:
                raise PrepError(f"{where}: no field {key!r}; the row has {sorted(row)}")
        problem = row[problem_key]
        if not isinstance(problem, str) or not problem.strip():
            raise PrepError(f"{where}: field {problem_key!r} must be a non-empty string, got {str(problem)[:80]!r}")
        tests = code_tests(row[tests_key], f"{where} field {tests_key!r}", input_key, output_key)
        if not tests:
            skipped += 1
            continue
        rid = row.get(id_key)
        rid = str(rid) if rid not in (None, "") else f"{stem}-{i}"
        uid, n = rid, 1
        while uid in ids:
            n += 1
            uid = f"{rid}#{n}"
        ids.add(uid)
        rows.append({"prompt": make_code_prompt(problem), "tests": tests, "id": uid, "source": source or stem})
    return rows, skipped


def write_code_jsonl(rows: list[dict], out: Path) -> None:
    if out.suffix != ".jsonl":
        raise PrepError(f"{out}: code task files are written as .jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, out)


def build_code_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prepare_data.py (code tasks)",
        description="Write a code task for data.task=file, data.reward=code, data.tests_key=tests: a .jsonl of "
                    "{prompt (one user message asking for a ```python block), tests [{input, output}], id, "
                    "source}. Either the built-in tiny task (--tiny-code) or a local dataset file converted "
                    "(--code-file, .jsonl or .parquet; rows without tests are skipped and counted).")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--tiny-code", type=Path, metavar="OUT.jsonl",
                      help=f"write the built-in tiny task ({len(TINY_CODE)} small stdin/stdout problems)")
    mode.add_argument("--code-file", type=Path, metavar="PATH", help="a local code dataset to convert")
    p.add_argument("--code-out", type=Path, metavar="OUT.jsonl", help="where --code-file's rows go")
    p.add_argument("--code-problem-key", default="problem", help="field holding the problem statement")
    p.add_argument("--code-tests-key", default="tests",
                   help="field holding the tests: a list of {input, output} objects, {inputs: [..], outputs: "
                        "[..]}, or either as a JSON string")
    p.add_argument("--code-input-key", default="input", help="key of a test's stdin in a list of objects")
    p.add_argument("--code-output-key", default="output", help="key of a test's expected stdout")
    p.add_argument("--code-id-key", default="id", help="field holding the row id (<file stem>-<row> when absent)")
    p.add_argument("--code-source", default="", help="the rows' source (default: the file stem)")
    return p


def code_main(argv: list[str]) -> int:
    args = build_code_parser().parse_args(argv)
    try:
        if args.tiny_code:
            rows, skipped, out = tiny_code_rows(), 0, args.tiny_code
        else:
            if not args.code_out:
                log("error: --code-file needs --code-out OUT.jsonl")
                return 2
            if not args.code_file.is_file():
                log(f"error: --code-file {args.code_file} is not a file")
                return 2
            rows, skipped = convert_code_file(args.code_file, args.code_problem_key, args.code_tests_key,
                                              args.code_id_key, args.code_input_key, args.code_output_key,
                                              args.code_source)
            out = args.code_out
            if not rows:
                log(f"error: {args.code_file}: no row has tests ({skipped} skipped)")
                return 1
        write_code_jsonl(rows, out)
    except PrepError as err:
        log(f"error: {err}")
        return 1
    except OSError as err:
        log(f"error: cannot write: {err}")
        return 2
    log(f"code task: {len(rows)} rows written -> {out}" + (f" ({skipped} without tests skipped)" if skipped else ""))
    return 0


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
    p.add_argument("--template", default="default", choices=TEMPLATES,
                   help="default: the problem inside the instruction above; reference: the paper's reference "
                        "runs' prompts, the problem then ' ' and the dataset's instruction (DAPO-Math-17k, "
                        f"AMC 2023: '{REFERENCE_BOXED}'; AIME, MATH-500: '{REFERENCE_THINK}')")
    p.add_argument("--no-dedupe", dest="dedupe", action="store_false",
                   help="keep every row as shipped (DAPO-Math-17k: ~1.79 M rows, each problem ~100 times; the "
                        "paper's reference trains on them so)")
    p.add_argument("--skip-missing", action="store_true",
                   help="warn about datasets not found and prepare the others (default: error, write nothing)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a.split("=")[0] in CODE_FLAGS for a in argv):  # the code task modes have their own options
        return code_main(argv)
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
            summary.append(prepare(SPECS[key], layout, files, args.out_dir, args.gsm8k_split, args.template,
                                   args.dedupe))
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

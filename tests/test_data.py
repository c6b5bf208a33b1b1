"""Prompt files, the prompt stream, rewards, and tools/prepare_data.py on tiny local dataset copies.

The dataset copies are written in the formats of the real Hugging Face repos (file names and
columns as the repos store them); nothing is downloaded.
"""

import json
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_vespo.train.config import DataSection
from megatron_vespo.train.data import (PromptFile, PromptFileError, PromptSource, RewardError,
                                       make_prompt_source)
from megatron_vespo.train.tasks import EOS, Prompt, SyntheticTask, last_boxed, math_reward

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "prepare_data.py"
DAPO_HEAD = ("Solve the following math problem step by step. The last line of your response should be of the "
             "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n")
DAPO_TAIL = '\n\nRemember to put your answer on its own line after "Answer:".'


# -- a tiny local tokenizer ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = ["user assistant system what is the sum of and problem number word answer boxed",
              " ".join(str(i) for i in range(100))]
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>", "</s>", "<pad>"]))
    t = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>",
                                pad_token="<pad>")
    t.chat_template = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                       "{% if add_generation_prompt %}<s> assistant {% endif %}")
    return t


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer):
    import copy

    t = copy.deepcopy(tokenizer)
    t.chat_template = None
    return t


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows, schema=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


# -- math reward --------------------------------------------------------------------------------


@pytest.mark.parametrize("response, answer, expected", [
    ("so the answer is \\boxed{1/2}", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("$\\boxed{\\dfrac{1}{2}}$", "1/2", 1.0),
    ("\\boxed{1,234}", "1234", 1.0),
    ("\\boxed{1234}", "1,234", 1.0),
    ("\\boxed{72}", "72", 1.0),
    ("\\boxed{72}", "\\boxed{72}", 1.0),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", 1.0),
    ("\\fbox{72}", "72", 1.0),
    ("first \\boxed{5}, finally \\boxed{72}", "72", 1.0),  # the last boxed answer counts
    ("first \\boxed{72}, finally \\boxed{5}", "72", 0.0),
    ("\\boxed{71}", "72", 0.0),
    ("\\boxed{0.49}", "1/2", 0.0),
    ("The answer is 72.", "72", 0.0),  # no boxed answer
    ("Answer: 72", "72", 0.0),
    ("", "72", 0.0),
    ("\\boxed{72} but then \\boxed{7", "72", 0.0),  # truncated last box
    ("\\boxed{}", "72", 0.0),
])
def test_math_reward(response, answer, expected):
    assert math_reward(response, answer) == expected


def test_last_boxed_nested_braces():
    assert last_boxed("x \\boxed{\\frac{a}{b^{2}}} y") == "\\frac{a}{b^{2}}"
    assert last_boxed("$\\boxed 5$") == "5"
    assert last_boxed("none") is None


def test_math_reward_in_a_thread():
    out = []
    t = threading.Thread(target=lambda: out.append(math_reward("\\boxed{\\frac12}", "0.5")))
    t.start()
    t.join()
    assert out == [1.0]


# -- tools/prepare_data.py on tiny copies of the real repos -------------------------------------


def dapo_row(problem, answer, index):
    return {"data_source": "math_dapo",
            "prompt": [{"content": DAPO_HEAD + problem + DAPO_TAIL, "role": "user"}],
            "ability": "MATH",
            "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": index}}


def make_sources(src: Path) -> None:
    # BytedTsinghua-SIA/DAPO-Math-17k: data/dapo-math-17k.parquet, each problem repeated (as the real
    # file repeats each ~100 times), uuid indexes
    rows = []
    for rep in range(3):
        rows += [dapo_row("What is the sum of 2 and 3?", "5", f"uuid-a-{rep}"),
                 dapo_row("Let $x$ be the number of ways ... Find $x$.", "34", f"uuid-b-{rep}")]
    rows.append(dapo_row("What is the sum of 2 and 3?", "6", "uuid-conflict"))
    write_parquet(src / "DAPO-Math-17k" / "data" / "dapo-math-17k.parquet", rows)
    # HuggingFaceH4/aime_2024: data/train-00000-of-00001.parquet (id, problem, solution, answer, url, year)
    write_parquet(src / "HuggingFaceH4" / "aime_2024" / "data" / "train-00000-of-00001.parquet", [
        {"id": 60, "problem": "Every morning Aya goes for a $9$-kilometer-long walk ...", "solution": "...",
         "answer": "204", "url": "https://artofproblemsolving.com/wiki/...", "year": "2024"},
        {"id": 61, "problem": "Let $ABC$ be a triangle inscribed in circle $\\omega$ ...", "solution": "...",
         "answer": "113", "url": "https://artofproblemsolving.com/wiki/...", "year": "2024"}])
    # opencompass/AIME2025: aime2025-I.jsonl and aime2025-II.jsonl (question, answer)
    write_jsonl(src / "AIME2025" / "aime2025-I.jsonl", [
        {"question": "Find the sum of all integer bases $b>9$ ...", "answer": "70"},
        {"question": "On $\\triangle ABC$ points $A,D,E$ ...", "answer": "588"}])
    write_jsonl(src / "AIME2025" / "aime2025-II.jsonl", [
        {"question": "Six points $A, B, C, D, E,$ and $F$ lie in a straight line ...", "answer": "468"}])
    # math-ai/amc23: test-00000-of-00001.parquet (id, question, answer as float64, url)
    write_parquet(src / "amc23" / "test-00000-of-00001.parquet", [
        {"id": 0, "question": "Cities $A$ and $B$ are $45$ miles apart ...", "answer": 27.0, "url": "..."},
        {"id": 1, "question": "Positive real numbers $x$ and $y$ satisfy ...", "answer": 36.0, "url": "..."},
        {"id": 2, "question": "Cities $A$ and $B$ are  $45$ miles apart ...", "answer": 27.0, "url": "..."}])
    # HuggingFaceH4/MATH-500: test.jsonl (problem, solution, answer, subject, level, unique_id)
    write_jsonl(src / "MATH-500" / "test.jsonl", [
        {"problem": "Convert the point $(0,3)$ in rectangular coordinates to polar coordinates.",
         "solution": "... $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$",
         "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "subject": "Precalculus", "level": 2,
         "unique_id": "test/precalculus/807.json"},
        {"problem": "What is $\\frac{1}{2}+\\frac{1}{4}$?", "solution": "...", "answer": "\\frac{3}{4}",
         "subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/1.json"}])
    # openai/gsm8k in a Hugging Face hub cache: main/test-00000-of-00001.parquet (question, answer "#### N")
    snap = src / "datasets--openai--gsm8k" / "snapshots" / "e53f048856ff4f594e959d75785d2c2d37b678ee"
    write_parquet(snap / "main" / "test-00000-of-00001.parquet", [
        {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                     "clips in May. How many clips did Natalia sell altogether in April and May?",
         "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 "
                   "clips altogether in April and May.\n#### 72"},
        {"question": "A company pays $1,000 ... How much?", "answer": "It pays 1000.\n#### 1,000"}])
    write_parquet(snap / "main" / "train-00000-of-00001.parquet", [
        {"question": "Weng earns $12 an hour for babysitting ...", "answer": "...\n#### 10"}])


def run_tool(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    out = tmp_path_factory.mktemp("out")
    make_sources(src)
    proc = run_tool("--source-dir", src, "--out-dir", out)
    assert proc.returncode == 0, proc.stderr
    return src, out, proc


def read(out: Path, key: str) -> list[dict]:
    return pq.read_table(out / f"{key}.parquet").to_pylist()


@pytest.mark.slow
def test_tool_writes_every_dataset(prepared):
    src, out, proc = prepared
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{k}.parquet" for k in ("dapo_math_17k", "aime24", "aime25", "amc23", "math500", "gsm8k"))
    schema = pq.read_schema(out / "aime24.parquet")
    assert schema.names == ["prompt", "answer", "source", "id"]
    prompt_type = schema.field("prompt").type
    assert pa.types.is_list(prompt_type) and prompt_type.value_type == pa.struct(
        [("role", pa.string()), ("content", pa.string())])
    assert schema.field("answer").type == pa.string() and schema.field("id").type == pa.string()
    for key in ("dapo_math_17k", "aime24", "aime25", "amc23", "math500", "gsm8k"):
        for row in read(out, key):
            assert row["source"] == key
            assert isinstance(row["answer"], str) and row["answer"]
            (msg,) = row["prompt"]
            assert msg["role"] == "user" and "\\boxed{}" in msg["content"]
            assert "Answer:" not in msg["content"]
        ids = [r["id"] for r in read(out, key)]
        assert len(ids) == len(set(ids))
    assert "summary:" in proc.stderr and proc.stdout == ""


@pytest.mark.slow
def test_tool_dapo_dedup_and_problem(prepared):
    _, out, proc = prepared
    rows = read(out, "dapo_math_17k")
    assert [(r["answer"], r["id"]) for r in rows] == [("5", "uuid-a-0"), ("34", "uuid-b-0")]
    content = rows[0]["prompt"][0]["content"]
    assert "What is the sum of 2 and 3?" in content and "$Answer" not in content
    assert "7 rows read, 5 duplicates dropped (1 with a different answer" in proc.stderr


@pytest.mark.slow
def test_tool_benchmarks(prepared):
    _, out, _ = prepared
    aime24 = read(out, "aime24")
    assert [(r["id"], r["answer"]) for r in aime24] == [("60", "204"), ("61", "113")]
    aime25 = read(out, "aime25")
    assert [(r["id"], r["answer"]) for r in aime25] == [("aime2025-I-0", "70"), ("aime2025-I-1", "588"),
                                                        ("aime2025-II-0", "468")]
    amc = read(out, "amc23")  # float answers -> integers; the third row repeats the first (extra space)
    assert [(r["id"], r["answer"]) for r in amc] == [("0", "27"), ("1", "36")]
    math500 = read(out, "math500")
    assert math500[0]["id"] == "test/precalculus/807.json"
    assert math500[1]["answer"] == "\\frac{3}{4}"
    assert "Convert the point $(0,3)$" in math500[0]["prompt"][0]["content"]


@pytest.mark.slow
def test_tool_gsm8k_final_answer(prepared, tmp_path):
    src, out, _ = prepared
    gsm = read(out, "gsm8k")
    assert [r["answer"] for r in gsm] == ["72", "1000"]  # "#### 72", "#### 1,000"
    assert [r["id"] for r in gsm] == ["test-0", "test-1"]
    assert math_reward("... so \\boxed{72}", gsm[0]["answer"]) == 1.0
    proc = run_tool("--source-dir", src, "--out-dir", tmp_path, "--datasets", "gsm8k", "--gsm8k-split", "train")
    assert proc.returncode == 0, proc.stderr
    assert [r["answer"] for r in read(tmp_path, "gsm8k")] == ["10"]


@pytest.mark.slow
def test_tool_missing_dataset(tmp_path):
    src = tmp_path / "src"
    write_jsonl(src / "MATH-500" / "test.jsonl", [{"problem": "What is $1+1$?", "answer": "2", "unique_id": "u"}])
    out = tmp_path / "out"
    proc = run_tool("--source-dir", src, "--out-dir", out, "--datasets", "math500,aime24")
    assert proc.returncode == 2
    assert "aime24" in proc.stderr and str(src / "HuggingFaceH4" / "aime_2024") in proc.stderr
    assert "data/train-*.parquet" in proc.stderr
    assert not out.exists()  # nothing written without --skip-missing
    proc = run_tool("--source-dir", src, "--out-dir", out, "--datasets", "math500,aime24", "--skip-missing")
    assert proc.returncode == 0, proc.stderr
    assert "warning (skipped): aime24" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["math500.parquet"]


@pytest.mark.slow
def test_tool_bad_files(tmp_path):
    src = tmp_path / "src"
    write_jsonl(src / "MATH-500" / "test.jsonl", [{"problem": "x", "solution": "y"}])  # no answer column
    proc = run_tool("--source-dir", src, "--out-dir", tmp_path / "o", "--datasets", "math500")
    assert proc.returncode == 1 and "test.jsonl: no answer column" in proc.stderr
    write_parquet(src / "gsm8k" / "main" / "test-00000-of-00001.parquet",
                  [{"question": "q0", "answer": "#### 1"}, {"question": "q1", "answer": "no final line"}])
    proc = run_tool("--source-dir", src, "--out-dir", tmp_path / "o", "--datasets", "gsm8k")
    assert proc.returncode == 1 and "test-00000-of-00001.parquet row 1" in proc.stderr and "####" in proc.stderr
    (src / "amc23").mkdir()
    proc = run_tool("--source-dir", src, "--out-dir", tmp_path / "o", "--datasets", "amc23")
    assert proc.returncode == 2 and "no data file in" in proc.stderr and "test-*.parquet" in proc.stderr


@pytest.mark.slow
def test_tool_help_names_layouts():
    proc = run_tool("--help")
    assert proc.returncode == 0
    for text in ("BytedTsinghua-SIA/DAPO-Math-17k", "data/dapo-math-17k.parquet", "opencompass/AIME2025",
                 "main/{split}-*.parquet", "--skip-missing"):
        assert text in proc.stdout


# -- PromptFile -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_prompt_file_reads_tool_output(prepared, tokenizer):
    _, out, _ = prepared
    pf = PromptFile(str(out / "math500.parquet"), tokenizer=tokenizer, max_prompt_tokens=512)
    assert len(pf) == 2 and pf.num_skipped == 0
    p = pf.prompt(0)
    assert isinstance(p, Prompt) and p.uid == 0
    text = tokenizer.decode(p.input_ids)
    assert text.startswith("<s> user") and text.rstrip().endswith("<s> assistant")  # chat template applied
    assert p.answer in {"\\left( 3, \\frac{\\pi}{2} \\right)", "\\frac{3}{4}"}


def numbered_rows(n):
    return [{"prompt": f"what is the sum of {i} and {i}", "answer": str(2 * i)} for i in range(n)]


def test_prompt_file_jsonl_and_parquet_agree(tmp_path, tokenizer):
    rows = numbered_rows(12)
    a = PromptFile(str(write_jsonl(tmp_path / "p.jsonl", rows)), tokenizer=tokenizer, seed=3)
    b = PromptFile(str(write_parquet(tmp_path / "p.parquet", rows)), tokenizer=tokenizer, seed=3)
    for uid in range(30):
        pa_, pb = a.prompt(uid), b.prompt(uid)
        assert (pa_.uid, pa_.input_ids, pa_.answer) == (pb.uid, pb.input_ids, pb.answer)
    # a string prompt is tokenized as it is (with the tokenizer's special tokens), no template
    p = a.prompt(0)
    assert tokenizer.decode(p.input_ids) == rows[a.row_of(0)]["prompt"]
    assert p.answer == rows[a.row_of(0)]["answer"]


def test_prompt_stream_epochs_deterministic_and_resumable(tmp_path, tokenizer):
    path = str(write_jsonl(tmp_path / "p.jsonl", numbered_rows(10)))
    pf = PromptFile(path, tokenizer=tokenizer, seed=7)
    stream = [pf.row_of(uid) for uid in range(40)]
    epochs = [stream[i:i + 10] for i in range(0, 40, 10)]
    for e in epochs:  # each epoch visits every row once
        assert sorted(e) == list(range(10))
    assert len({tuple(e) for e in epochs}) == 4  # and in a different order each epoch
    assert epochs[0] != list(range(10))
    # a fresh instance (a resumed run) reproduces the stream from any uid, in any order of calls
    again = PromptFile(path, tokenizer=tokenizer, seed=7)
    assert [again.row_of(uid) for uid in range(25, 40)] == stream[25:]
    assert [again.row_of(uid) for uid in range(0, 25)] == stream[:25]
    assert again.prompt(33).input_ids == pf.prompt(33).input_ids
    # epoch e's order is a function of (seed, e): a big uid needs no walk through earlier epochs
    assert pf.row_of(10 * 1000 + 3) == again.row_of(10 * 1000 + 3)
    other = PromptFile(path, tokenizer=tokenizer, seed=8)
    assert [other.row_of(uid) for uid in range(40)] != stream
    with pytest.raises(ValueError, match="non-negative"):
        pf.prompt(-1)


def test_prompt_file_skips_long_prompts(tmp_path, tokenizer, caplog):
    rows = numbered_rows(6)
    rows[2]["prompt"] = " ".join(["word"] * 50)
    rows[4]["prompt"] = " ".join(["word"] * 30)
    path = str(write_jsonl(tmp_path / "p.jsonl", rows))
    with caplog.at_level("WARNING"):
        pf = PromptFile(path, tokenizer=tokenizer, max_prompt_tokens=20)
    assert pf.num_skipped == 2 and pf.skipped_rows == [2, 4] and len(pf) == 4
    assert "skipped 2 of 6 prompts" in caplog.text
    seen = {pf.row_of(uid) for uid in range(40)}
    assert seen == {0, 1, 3, 5}
    assert all(len(pf.prompt(uid).input_ids) <= 20 for uid in range(40))
    with pytest.raises(PromptFileError, match="all 6 prompts are longer than max_prompt_tokens = 5"):
        PromptFile(path, tokenizer=tokenizer, max_prompt_tokens=5)


def test_prompt_file_chat_template_and_nested_keys(tmp_path, tokenizer, plain_tokenizer):
    rows = [dapo_row("What is the sum of 2 and 3?", "5", "u0")]  # DAPO-Math-17k's own format
    path = str(write_parquet(tmp_path / "dapo.parquet", rows))
    pf = PromptFile(path, answer_key="reward_model.ground_truth", tokenizer=tokenizer, max_prompt_tokens=4096)
    assert pf.prompt(0).answer == "5"
    assert tokenizer.decode(pf.prompt(0).input_ids).startswith("<s> user")
    with pytest.raises(PromptFileError, match="no chat template"):
        PromptFile(path, answer_key="reward_model.ground_truth", tokenizer=plain_tokenizer)
    # a string prompt goes through the template only when asked
    spath = str(write_jsonl(tmp_path / "s.jsonl", numbered_rows(2)))
    templated = PromptFile(spath, tokenizer=tokenizer, apply_chat_template=True)
    assert tokenizer.decode(templated.prompt(0).input_ids).startswith("<s> user what is the sum")


def test_prompt_file_errors(tmp_path, tokenizer):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": "1"}])
    with pytest.raises(PromptFileError, match=r"a\.jsonl: no column 'prompt' in row 0.*\['answer', 'question'\]"):
        PromptFile(str(jsonl), tokenizer=tokenizer)
    parquet = write_parquet(tmp_path / "a.parquet", [{"question": "q", "answer": "1"}])
    with pytest.raises(PromptFileError, match=r"a\.parquet: no column 'prompt'; the file has columns"):
        PromptFile(str(parquet), tokenizer=tokenizer)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(PromptFileError, match="empty.jsonl is empty"):
        PromptFile(str(empty), tokenizer=tokenizer)
    empty_pq = write_parquet(tmp_path / "empty.parquet", [],
                             schema=pa.schema([("prompt", pa.string()), ("answer", pa.string())]))
    with pytest.raises(PromptFileError, match="empty.parquet is empty"):
        PromptFile(str(empty_pq), tokenizer=tokenizer)
    ints = write_jsonl(tmp_path / "ints.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": 2}])
    with pytest.raises(PromptFileError, match=r"ints.jsonl: column 'answer' row 1: the answer must be a string, got int"):
        PromptFile(str(ints), tokenizer=tokenizer)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": 5, "answer": "1"}])
    with pytest.raises(PromptFileError, match=r"bad.jsonl: column 'prompt' row 0"):
        PromptFile(str(bad), tokenizer=tokenizer)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": \n')
    with pytest.raises(PromptFileError, match="broken.jsonl: line 2 is not valid JSON"):
        PromptFile(str(broken), tokenizer=tokenizer)
    (tmp_path / "x.csv").write_text("prompt,answer\na,1\n")
    with pytest.raises(PromptFileError, match="unsupported extension '.csv'"):
        PromptFile(str(tmp_path / "x.csv"), tokenizer=tokenizer)
    with pytest.raises(PromptFileError, match="does not exist"):
        PromptFile(str(tmp_path / "nope.jsonl"), tokenizer=tokenizer)


# -- make_prompt_source --------------------------------------------------------------------------


def test_synthetic_source():
    src = make_prompt_source(DataSection(task="synthetic", synthetic_task="reverse", reward="synthetic", seed=5))
    task = SyntheticTask("reverse", seed=5)
    p = src.prompt(11)
    assert p.input_ids == task.prompt(11).input_ids
    assert src.reward(p.answer, "", p) == 1.0
    assert src.reward(p.answer[:-1], "", p) == 0.0  # never stops
    assert 0.0 < src.reward(p.answer[:1] + [EOS], "", p) < 1.0


def test_synthetic_reward_credits_digits_by_position_and_length():
    from megatron_vespo.train.tasks import DIGIT0, PAD, SyntheticTask

    d = [DIGIT0 + i for i in range(10)]
    answer = [d[3], d[2], d[1], EOS]  # reverse of 1 2 3
    reward = SyntheticTask.reward
    assert reward(answer, answer) == 1.0
    assert reward([d[3], d[2], d[1]], answer) == 0.0  # never stops
    assert reward([d[3], d[9], d[1], EOS], answer) == pytest.approx(0.5 * 2 / 3)  # a wrong middle digit
    assert reward([d[3], PAD, d[1], EOS], answer) == pytest.approx(0.5 * 2 / 3)  # PAD is a wrong token
    assert reward([d[3], d[2], EOS], answer) == pytest.approx(0.5 * 2 / 3 * 0.5)  # stopped one digit early
    assert reward([d[3], d[2], d[1], d[0], EOS], answer) == pytest.approx(0.5 * 0.5)  # one digit too many
    assert reward([EOS], answer) == 0.0


def test_file_source_math_reward(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"problem": "what is the sum of 1 and 1", "gold": "1/2"}])
    data = DataSection(task="file", prompts_file=str(path), prompt_key="problem", answer_key="gold",
                       reward="math", max_prompt_tokens=64)
    src = make_prompt_source(data, tokenizer)
    p = src.prompt(3)
    assert p.uid == 3 and p.answer == "1/2"
    assert src.reward([], "so \\boxed{0.5}", p) == 1.0
    assert src.reward([], "so \\boxed{0.6}", p) == 0.0
    assert src.reward([], "0.5", p) == 0.0
    with pytest.raises(RewardError, match=r"reward 'math' failed on prompt uid 3 .*TypeError"):
        src.reward([], None, p)


def test_reward_errors_name_the_uid(monkeypatch, tmp_path, tokenizer):
    import megatron_vespo.train.data as data_mod

    def broken(text, answer):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(data_mod, "math_reward", broken)
    path = write_jsonl(tmp_path / "p.jsonl", numbered_rows(3))
    src = make_prompt_source(DataSection(task="file", prompts_file=str(path), reward="math"), tokenizer)
    with pytest.raises(RewardError, match=r"reward 'math' failed on prompt uid 42 .*ZeroDivisionError: boom"):
        src.reward([], "\\boxed{1}", src.prompt(42))
    nan = PromptSource(SyntheticTask(), "nan", lambda ids, text, prompt: float("nan"))
    with pytest.raises(RewardError, match="returned nan on prompt uid 0"):
        nan.reward([], "", nan.prompt(0))


def test_make_prompt_source_config_errors(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="set data.reward = synthetic"):
        make_prompt_source(DataSection(task="synthetic", reward="math"))
    with pytest.raises(ValueError, match="set data.reward = math"):
        make_prompt_source(DataSection(task="file", prompts_file="x.jsonl", reward="synthetic"), tokenizer)
    with pytest.raises(ValueError, match="needs data.prompts_file"):
        make_prompt_source(DataSection(task="file", reward="math"), tokenizer)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        make_prompt_source(DataSection(task="file", prompts_file="x.jsonl", reward="math"))
    with pytest.raises(ValueError, match="unknown synthetic task"):
        make_prompt_source(DataSection(task="synthetic", synthetic_task="nope", reward="synthetic"))


def test_token_id_prompts_from_jsonl_and_parquet(tmp_path):
    from megatron_vespo.train.data import read_token_prompts

    rows = [{"input_ids": [1, 2, 3]}, {"input_ids": [7]}]
    assert read_token_prompts(str(write_jsonl(tmp_path / "t.jsonl", rows))) == [[1, 2, 3], [7]]
    assert read_token_prompts(str(write_parquet(tmp_path / "t.parquet", rows))) == [[1, 2, 3], [7]]
    # text prompts: not token ids, left to PromptFile
    assert read_token_prompts(str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x", "answer": "1"}]))) is None
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"input_ids": [1]}, {"input_ids": ["a"]}])
    with pytest.raises(PromptFileError, match=r"bad.jsonl: column 'input_ids' row 1: expected a non-empty list"):
        read_token_prompts(str(bad))
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"input_ids": [1]}, {"prompt": "x"}])
    with pytest.raises(PromptFileError, match=r"no column 'input_ids' in row 1 \(line 2\)"):
        read_token_prompts(str(missing))

"""Rewards beyond math: prompt-file metadata, a user function as the reward (``data.reward:
package.module:function``: resolution errors at start, timeouts counted, errors naming the function
and uid), the code reward through ``make_prompt_source``, and tools/prepare_data.py's code tasks
(the tiny built-in task and a converted dataset file), scored end to end with a tokenizer."""

import importlib.util
import json
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_vespo.train.config import DataSection
from megatron_vespo.train.data import PromptFile, PromptFileError, RewardError, make_prompt_source
from megatron_vespo.train.rewards import resolve
from megatron_vespo.train.tasks import code_reward

ROOT = Path(__file__).resolve().parents[1]

REWARD_MODULE = '''
import os, time

def judged(response_text, prompt_text, metadata):
    ok = response_text == "yes" and "what is" in prompt_text and metadata["id"] == "r1" and metadata["level"] == 2
    return 1.0 if ok else 0.25

def slow(response_text, prompt_text, metadata):
    time.sleep(float(response_text))
    print("slept")  # prints go to stderr, not into the results channel
    return 1.0

def broken(response_text, prompt_text, metadata):
    return 1 / 0

def words(response_text, prompt_text, metadata):
    return "high"

def dies(response_text, prompt_text, metadata):
    os._exit(3)

class Scorer:
    @staticmethod
    def score(response_text, prompt_text, metadata):
        return len(response_text)

NOT_CALLABLE = 3
'''


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["user assistant what is the sum of read two integers print"],
                            trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>", "</s>"]))
    t = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    t.chat_template = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                       "{% if add_generation_prompt %}<s> assistant {% endif %}")
    return t


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    name = f"user_rewards_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))  # the worker gets the trainer's sys.path
    yield name
    sys.modules.pop(name, None)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load_tool():
    if "prepare_data_tool" in sys.modules:
        return sys.modules["prepare_data_tool"]
    spec = importlib.util.spec_from_file_location("prepare_data_tool", ROOT / "tools" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["prepare_data_tool"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ROWS = [{"prompt": "what is 1", "id": "r1", "level": 2, "source": "s"},
        {"prompt": "what is 2", "id": "r2", "level": 3, "source": "s"}]


# -- metadata and resolution: no processes ----------------------------------------------------------


def test_prompt_file_metadata_and_text(tmp_path, tokenizer):
    rows = [{"prompt": [{"role": "user", "content": "what is 1"}], "answer": "1", "id": "a", "extra": {"k": [1, 2]}},
            {"prompt": [{"role": "user", "content": "what is 2"}], "answer": "2", "id": "b", "extra": {"k": []}}]
    for path in (write_jsonl(tmp_path / "p.jsonl", rows), tmp_path / "p.parquet"):
        if path.suffix == ".parquet":
            pq.write_table(pa.Table.from_pylist(rows), path)
        pf = PromptFile(str(path), tokenizer=tokenizer)
        for uid in range(4):
            p, row = pf.prompt(uid), rows[pf.row_of(uid)]
            assert p.metadata == {k: v for k, v in row.items() if k != "prompt"}, path
            assert p.text.startswith("<s> user " + row["prompt"][0]["content"]) and p.answer == row["answer"]
        pf.prompt(0).metadata["id"] = "changed"  # a fresh dict each time
        assert pf.prompt(0).metadata["id"] != "changed"


def test_code_prompt_files_check_their_tests(tmp_path, tokenizer):
    good = [{"prompt": "read two integers", "tests": [{"input": "1 2", "output": "3", "why": "x"}]}]
    pf = PromptFile(str(write_jsonl(tmp_path / "ok.jsonl", good)), tokenizer=tokenizer, answer_required=False,
                    tests_key="tests")
    p = pf.prompt(0)
    assert p.answer is None and p.metadata["tests"] == [{"input": "1 2", "output": "3"}]
    for rows, message in (([{"prompt": "x", "tests": []}], r"column 'tests' row 0: the tests must be a non-empty"),
                          ([{"prompt": "x", "tests": [{"input": 1, "output": "2"}]}], "row 0: test 0 must be"),
                          ([{"prompt": "x"}], r"no column 'tests' in row 0")):
        with pytest.raises(PromptFileError, match=message):
            PromptFile(str(write_jsonl(tmp_path / "bad.jsonl", rows)), tokenizer=tokenizer, answer_required=False,
                       tests_key="tests")


def test_reward_function_resolution_errors(tmp_path, reward_module, tokenizer):
    assert resolve(f"{reward_module}:Scorer.score")("abc", "", {}) == 3
    path = str(write_jsonl(tmp_path / "p.jsonl", ROWS))
    for reward, message in (("no_such_module_xyz:fn", r"data.reward = 'no_such_module_xyz:fn': cannot import module"),
                            (f"{reward_module}:missing", rf"'{reward_module}' has no attribute 'missing'"),
                            (f"{reward_module}:NOT_CALLABLE", r"'NOT_CALLABLE' is a int, not a callable"),
                            (f"{reward_module}:", "name a function as package.module:function"),
                            ("math_typo", r"set data.reward = math, math_full, code or package.module:function")):
        with pytest.raises(ValueError, match=message):
            make_prompt_source(DataSection(task="file", prompts_file=path, reward=reward), tokenizer)
    with pytest.raises(ValueError, match="data.reward_timeout_s must be a positive number"):
        make_prompt_source(DataSection(task="file", prompts_file=path, reward=f"{reward_module}:judged",
                                       reward_timeout_s=0.0), tokenizer)


def test_tool_code_conversion(tmp_path):
    tool = load_tool()
    rows = tool.tiny_code_rows()
    assert len(rows) == len(tool.TINY_CODE) >= 8 and len({r["id"] for r in rows}) == len(rows)
    assert all(set(r) == {"prompt", "tests", "id", "source"} and r["tests"] for r in rows)
    src = write_jsonl(tmp_path / "apps.jsonl", [
        {"question": "Print the sum.", "io": json.dumps({"inputs": ["1 2\n"], "outputs": ["3\n"]}), "pid": 7},
        {"question": "Echo.", "io": [{"stdin": "a\n", "stdout": "a\n"}]},
        {"question": "No tests.", "io": ""}])
    converted, skipped = tool.convert_code_file(src, problem_key="question", tests_key="io", id_key="pid",
                                                input_key="stdin", output_key="stdout")
    assert skipped == 1 and [r["id"] for r in converted] == ["7", "apps-1"]
    assert [r["tests"] for r in converted] == [[{"input": "1 2\n", "output": "3\n"}],
                                               [{"input": "a\n", "output": "a\n"}]]
    assert converted[0]["prompt"][0]["content"].startswith("Print the sum.") and converted[0]["source"] == "apps"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "io": [{"stdin": 1, "stdout": "1"}]}])
    with pytest.raises(tool.PrepError, match=r"bad.jsonl row 0 field 'io': test 0 must be an object with string"):
        tool.convert_code_file(bad, problem_key="question", tests_key="io", input_key="stdin", output_key="stdout")
    assert tool.main(["--code-file", str(src), "--code-problem-key", "question", "--code-tests-key", "io",
                      "--code-input-key", "stdin", "--code-output-key", "stdout", "--code-out",
                      str(tmp_path / "out.jsonl")]) == 0
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in written] == ["apps-0", "apps-1"]
    assert tool.main(["--code-file", str(src)]) == 2  # no --code-out


# -- in processes: the function's worker, the sandbox ---------------------------------------------------


@pytest.mark.slow
def test_reward_function_gets_text_and_metadata(tmp_path, reward_module, tokenizer):
    path = str(write_jsonl(tmp_path / "p.jsonl", ROWS))
    src = make_prompt_source(DataSection(task="file", prompts_file=path, reward=f"{reward_module}:judged",
                                         apply_chat_template=True), tokenizer)
    by_id = {src.prompt(uid).metadata["id"]: src.prompt(uid) for uid in range(2)}
    assert src.reward([], "yes", by_id["r1"]) == 1.0
    assert src.reward([], "no", by_id["r1"]) == 0.25
    assert src.reward([], "yes", by_id["r2"]) == 0.25  # other metadata
    assert src.reward_timeouts == 0


@pytest.mark.slow
def test_reward_function_timeouts_score_zero_and_are_counted(tmp_path, reward_module, tokenizer):
    path = str(write_jsonl(tmp_path / "p.jsonl", ROWS))
    src = make_prompt_source(DataSection(task="file", prompts_file=path, reward=f"{reward_module}:slow",
                                         reward_timeout_s=0.5), tokenizer)
    p = src.prompt(0)
    assert src.reward([], "0", p) == 1.0  # the first call starts the worker: its import is not timed
    start = time.monotonic()
    assert src.reward([], "30", p) == 0.0
    assert time.monotonic() - start < 5.0 and src.reward_timeouts == 1
    assert src.reward([], "0", p) == 1.0  # a new worker took over
    assert src.reward_timeouts == 1


@pytest.mark.slow
def test_reward_function_failures_name_the_function_and_uid(tmp_path, reward_module, tokenizer):
    path = str(write_jsonl(tmp_path / "p.jsonl", ROWS))
    for fn, message in (("broken", r"ZeroDivisionError: division by zero"),
                        ("words", r"returned str 'high', not a number"),
                        ("dies", r"killed its worker process \(exit status 3\)")):
        src = make_prompt_source(DataSection(task="file", prompts_file=path, reward=f"{reward_module}:{fn}"), tokenizer)
        with pytest.raises(RewardError, match=rf"reward '{reward_module}:{fn}' failed on prompt uid 5 .*{message}"):
            src.reward([], "x", src.prompt(5))


@pytest.mark.slow
def test_tiny_code_task_end_to_end(tmp_path, tokenizer):
    tool = load_tool()
    out = tmp_path / "tiny.jsonl"
    assert tool.main(["--tiny-code", str(out)]) == 0
    for key, _, tests, solution in tool.TINY_CODE:  # the reference solutions pass their own tests
        assert code_reward(solution, [{"input": i, "output": o} for i, o in tests], 10.0) == 1.0, key
    src = make_prompt_source(DataSection(task="file", prompts_file=str(out), reward="code", tests_key="tests",
                                         reward_timeout_s=1.5), tokenizer)
    solutions = {f"tiny-{key}": solution for key, _, _, solution in tool.TINY_CODE}
    p = src.prompt(0)
    right = f"Here it is:\n```python\n{solutions[p.metadata['id']]}```\nDone."
    assert p.text.startswith("<s> user") and src.reward([], right, p) == 1.0
    assert src.reward([], "```python\nprint('no idea')\n```", p) == 0.0
    assert src.reward([], "```python\nwhile True:\n    pass\n```", p) == 0.0
    assert src.reward_timeouts == 1  # the loop
    with pytest.raises(RewardError, match=r"reward 'code' failed on prompt uid 0 .*TypeError"):
        src.reward([], None, p)


@pytest.mark.slow
def test_converted_code_file_end_to_end(tmp_path, tokenizer):
    tool = load_tool()
    src_file = tmp_path / "src.parquet"
    tests = json.dumps({"inputs": ["1 2\n", "5 5\n"], "outputs": ["3", "10"]})  # APPS style, as a JSON string
    pq.write_table(pa.Table.from_pylist([{"problem": "Read two integers, print the sum.", "tests": tests}]), src_file)
    out = tmp_path / "sum.jsonl"
    assert tool.main(["--code-file", str(src_file), "--code-out", str(out)]) == 0
    src = make_prompt_source(DataSection(task="file", prompts_file=str(out), reward="code", reward_timeout_s=5.0),
                             tokenizer)
    p = src.prompt(0)
    assert p.metadata["tests"] == [{"input": "1 2\n", "output": "3"}, {"input": "5 5\n", "output": "10"}]
    assert src.reward([], "```python\na, b = map(int, input().split())\nprint(a + b)\n```", p) == 1.0
    assert src.reward([], "```python\na, b = map(int, input().split())\nprint(a * b)\n```", p) == 0.0
    assert src.reward([], "```python\na, b = map(int, input().split())\nprint(a + b if a < 5 else 0)\n```", p) == 0.5


@pytest.mark.slow
def test_math_full_reads_the_whole_response_like_the_reference(tmp_path, tokenizer):
    """reward=math_full: an answer math-verify finds anywhere in the response scores, not only the
    last \\boxed{} (reward=math scores these 0)."""
    path = str(write_jsonl(tmp_path / "m.jsonl", [{"prompt": "What is 6 x 7?", "answer": "42"}]))
    full = make_prompt_source(DataSection(task="file", prompts_file=path, reward="math_full"), tokenizer)
    boxed = make_prompt_source(DataSection(task="file", prompts_file=path, reward="math"), tokenizer)
    prompt = full.prompt(0)
    for text in ("The answer is 42.", "Answer: 42", "$42$"):
        assert full.reward([], text, prompt) == 1.0 and boxed.reward([], text, prompt) == 0.0, text
    assert full.reward([], "so \\boxed{42}", prompt) == boxed.reward([], "so \\boxed{42}", prompt) == 1.0
    assert full.reward([], "\\boxed{41}", prompt) == 0.0 and full.reward([], "no idea", prompt) == 0.0
    assert full.reward_timeouts == 0

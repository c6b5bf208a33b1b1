"""Prompts and verifiable rewards: synthetic token tasks for the CPU demo, math answers, and code
run against tests (``code_reward``; the sandbox is ``megatron_vespo.train.sandbox``).

Synthetic tasks work on token ids directly (no tokenizer): ``PAD BOS EOS SEP`` then ten digit
tokens. A prompt is ``BOS d1 .. dn SEP``; the answer is digits followed by EOS, of a length that
varies with the prompt, so the policy must learn when to stop. PAD only pads batches (the demo's
warm start); it is never part of an answer, so a PAD inside a response is a wrong token like any
other (it matches no answer digit). The engine samples from the whole vocabulary, so the
demo model embeds PAD like every other token (no zero padding row). The reward is 1 for an exact
answer (EOS included), partial credit for the digits right at their positions (less when the
number of digits is wrong), so early learning has a gradient, and 0 for an answer that never stops.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

PAD, BOS, EOS, SEP = 0, 1, 2, 3
DIGIT0 = 4
SYNTHETIC_VOCAB = 16  # 4 specials + 10 digits, rounded up


def digits_to_tokens(digits: list[int]) -> list[int]:
    return [DIGIT0 + d for d in digits]


def _reverse(digits):
    return digits[::-1]


def _sort(digits):
    return sorted(digits)


def _add(digits):
    half = len(digits) // 2
    a = int("".join(map(str, digits[:half])) or "0")
    b = int("".join(map(str, digits[half:])) or "0")
    return [int(c) for c in str(a + b)]


def _dedupe(digits):
    out = []
    for d in digits:
        if not out or out[-1] != d:
            out.append(d)
    return out


SYNTHETIC_TASKS = {"reverse": _reverse, "sort": _sort, "add": _add, "dedupe": _dedupe}


@dataclass
class Prompt:
    uid: int  # position in the data stream (checkpointed, so resuming continues the same stream)
    input_ids: list[int]
    answer: object  # token list (synthetic), answer string (math), None when a file has no answer column
    # prompt files: the row's other fields (JSON values: id, source, answer, tests, ...); see data.PromptFile
    metadata: dict = field(default_factory=dict)
    text: str = ""  # prompt files: the prompt as tokenized (after the chat template); "" for synthetic tasks


class SyntheticTask:
    def __init__(self, name: str = "reverse", min_digits: int = 2, max_digits: int = 6, seed: int = 1):
        if name not in SYNTHETIC_TASKS:
            raise ValueError(f"unknown synthetic task {name!r}; choose one of {sorted(SYNTHETIC_TASKS)}")
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
        self.name, self.fn = name, SYNTHETIC_TASKS[name]
        self.min_digits, self.max_digits, self.seed = min_digits, max_digits, seed

    def prompt(self, uid: int) -> Prompt:
        rng = random.Random(self.seed * 1_000_003 + uid)  # a pure function of uid: resumable
        digits = [rng.randrange(10) for _ in range(rng.randint(self.min_digits, self.max_digits))]
        answer = digits_to_tokens(self.fn(digits)) + [EOS]
        return Prompt(uid, [BOS] + digits_to_tokens(digits) + [SEP], answer)

    def max_answer_tokens(self) -> int:
        return self.max_digits + 2

    @staticmethod
    def reward(response_ids: list[int], answer: list[int]) -> float:
        """1 for the exact answer (EOS included); 0 for a response that never stops; otherwise
        partial credit: 0.5 x the fraction of answer digits right at their positions, halved
        again when the response has the wrong number of digits. Credit per position (not for a
        correct prefix only) rewards each digit the policy gets right, and the length factor keeps
        "stop after two digits" from paying as much as a full-length attempt."""
        if response_ids == answer:
            return 1.0
        if EOS not in response_ids:
            return 0.0
        digits, wanted = response_ids[:response_ids.index(EOS)], answer[:-1]
        right = sum(got == want for got, want in zip(digits, wanted))
        return 0.5 * right / len(wanted) * (1.0 if len(digits) == len(wanted) else 0.5)


def math_reward(response_text: str, answer: str) -> float:
    r"""1.0 when the response's last ``\boxed{...}`` equals ``answer`` (math-verify), else 0.0.

    Only the last boxed expression counts (as DAPO-Math's boxed reward): a response without one,
    or whose last ``\boxed{`` is never closed (a truncated response), gets 0. ``answer`` may be
    bare (``1/2``, ``\frac{1}{2}``, ``1,234``) or boxed itself. math-verify's timeouts use
    ``signal.alarm``, which works only in the main thread; elsewhere it runs without them.
    """
    try:
        from math_verify import parse, verify
    except ImportError as err:
        raise ImportError("the math reward needs the math-verify package (pip install math-verify)") from err
    import threading

    predicted_text = last_boxed(response_text)
    if predicted_text is None or not predicted_text.strip():
        return 0.0
    gold_text = str(answer)
    if "\\boxed" in gold_text or "\\fbox" in gold_text:
        gold_text = last_boxed(gold_text) or ""
    if not gold_text.strip():
        raise ValueError(f"math_reward: empty reference answer {answer!r}")
    seconds = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(f"\\boxed{{{gold_text}}}", parsing_timeout=seconds)
    predicted = parse(f"\\boxed{{{predicted_text}}}", parsing_timeout=seconds)
    if not gold or not predicted:
        return 0.0
    return 1.0 if verify(gold, predicted, timeout_seconds=seconds) else 0.0


def math_full_reward(response_text: str, prompt_text: str, metadata: dict) -> float:
    """reward=math_full, the paper's reference reward: math-verify's default extraction over the
    WHOLE response (the last ``\\boxed{}``, else the last answer-like expression: "The answer is
    42." scores) against the bare reference answer, with ``metadata["timeout_s"]`` for its parse
    and verify timeouts; 0 when either side does not parse or math-verify raises. Runs in a reward
    worker process (``data.FullMathReward``): math-verify's timeouts use ``signal.alarm``, which
    works only in a main thread, and the worker is killed past twice that time."""
    try:
        from math_verify import parse, verify
    except ImportError as err:
        raise ImportError("the math_full reward needs the math-verify package (pip install math-verify)") from err
    seconds = max(1, math.ceil(metadata["timeout_s"]))  # signal.alarm takes whole seconds
    try:
        gold = parse(str(metadata["answer"]), parsing_timeout=seconds)
        predicted = parse(response_text, parsing_timeout=seconds)
        return 1.0 if gold and predicted and verify(gold, predicted, timeout_seconds=seconds) else 0.0
    except Exception:  # the reference scores any failure of math-verify 0
        return 0.0


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{|\\boxed +(?=[^\s{])")


def last_boxed(text: str) -> str | None:
    r"""The content of the last ``\boxed{...}`` / ``\fbox{...}`` (braces matched) or ``\boxed x``.

    None when there is none or the last one is never closed.
    """
    matches = list(_BOXED.finditer(text or ""))
    if not matches:
        return None
    m = matches[-1]
    if not m.group(0).endswith("{"):  # "\boxed 5": up to the next whitespace or '$'
        return re.match(r"[^\s$]+", text[m.end():]).group(0)
    depth = 1
    for i in range(m.end(), len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[m.end():i]
    return None


# -- code -----------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\r?\n(.*?)```", re.S | re.I)


def extract_program(response_text: str) -> str:
    """The program in a response: its last closed ```python (or ```py / ```python3) fenced block,
    else the whole response (a bare program)."""
    blocks = _FENCE.findall(response_text or "")
    return blocks[-1] if blocks else (response_text or "")


def normalize_output(text: str) -> str:
    """What is compared: trailing whitespace stripped from every line, then trailing blank lines
    (so ``"3 \r\n"`` matches ``"3"``; leading whitespace and inner blank lines still count)."""
    return "\n".join(line.rstrip() for line in text.split("\n")).rstrip()


def check_tests(tests, where: str = "tests") -> list[dict]:
    """``tests`` as a non-empty list of ``{"input": str, "output": str}`` (extra keys dropped);
    a ValueError naming ``where`` and the test otherwise."""
    if not isinstance(tests, (list, tuple)) or not tests:
        raise ValueError(f"{where}: the tests must be a non-empty list of {{'input', 'output'}} objects, "
                         f"got {type(tests).__name__} {str(tests)[:80]!r}")
    out = []
    for i, t in enumerate(tests):
        if not isinstance(t, dict) or not isinstance(t.get("input"), str) or not isinstance(t.get("output"), str):
            raise ValueError(f"{where}: test {i} must be an object with string 'input' (stdin) and 'output' "
                             f"(expected stdout), got {str(t)[:80]!r}")
        out.append({"input": t["input"], "output": t["output"]})
    return out


@dataclass
class CodeResult:
    passed: int
    total: int
    timed_out: bool  # a test hit the time limit (the tests after it were not run: failed)

    @property
    def reward(self) -> float:
        return self.passed / self.total


def run_code_tests(program: str, tests: list[dict], timeout_s: float, limits=None) -> CodeResult:
    """Run ``program`` on each test's input in the sandbox; a test passes when the program exits 0
    and its stdout equals the expected output after ``normalize_output``. ``timeout_s`` limits each
    test; the first test to exceed it ends the run and the tests after it count as failed. An empty
    program scores 0 without running."""
    from megatron_vespo.train.sandbox import run_program

    tests = check_tests(tests)
    if not program.strip():
        return CodeResult(0, len(tests), False)
    results = run_program(program, [t["input"] for t in tests], timeout_s, limits=limits)
    passed = sum(r.status == "exited" and r.returncode == 0
                 and normalize_output(r.stdout) == normalize_output(t["output"]) for r, t in zip(results, tests))
    return CodeResult(passed, len(tests), any(r.status == "timeout" for r in results))


def code_reward(program: str, tests: list[dict], timeout_s: float) -> float:
    """The fraction of ``tests`` (``[{"input": stdin, "output": expected stdout}, ...]``) that the
    Python ``program`` passes, run in the sandbox with ``timeout_s`` seconds per test (see
    ``run_code_tests``)."""
    return run_code_tests(program, tests, timeout_s).reward

"""Prompt sources for the trainer: the synthetic tasks, or prompts read from a .jsonl/.parquet file.

A prompt source has one interface whatever it reads::

    source = make_prompt_source(cfg.data, tokenizer)
    prompt = source.prompt(uid)                               # Prompt(uid, input_ids, answer, metadata, text)
    r = source.reward(response_ids, response_text, prompt)    # float
    source.reward_timeouts                                    # reward calls stopped by the time limit so far

``uid`` indexes an infinite stream and the prompt at a uid is a pure function of (file, tokenizer,
seed, uid), so a trainer that checkpoints the next uid resumes on exactly the same data.

Prompt files (``PromptFile``)
    * ``.jsonl`` (one JSON object a line) or ``.parquet`` (read with pyarrow).
    * The prompt column holds a string or a chat message list ``[{"role", "content"}, ...]`` (as
      DAPO-Math-17k and ``tools/prepare_data.py``'s outputs store it). A message list is rendered
      with the tokenizer's chat template (with the generation prompt); a string is tokenized as it
      is, or wrapped as one user message and templated when ``apply_chat_template=True``.
    * The answer column must hold strings (reward=math; for the other rewards it is optional and
      taken as it is). Keys may be dotted to reach into a struct column
      (``answer_key="reward_model.ground_truth"`` reads DAPO-Math-17k's own parquet).
    * ``Prompt.metadata`` is the row without its prompt column, as JSON values (values pyarrow
      gives as other types, such as dates or bytes, become their ``str()``), read when the prompt
      is drawn; with ``tests_key`` (reward=code), ``metadata[tests_key]`` holds the row's checked
      tests. ``Prompt.text`` is the prompt as tokenized (after the chat template when one applied).
    * The stream: epoch ``e = uid // n`` visits the ``n`` usable rows in a permutation seeded by
      ``(seed, e)``; position ``uid % n`` in it gives the row.
    * Prompts longer than ``max_prompt_tokens`` are SKIPPED (not an error): they are dropped from
      the stream before shuffling, so which rows are skipped depends only on the file and the
      tokenizer; ``num_skipped`` / ``skipped_rows`` say which, and a warning gives the count. A
      file where every prompt is too long is an error.
    * Errors name the file, the column and the row (0-based data row; jsonl errors also give the
      line): a missing file, a directory, another extension, bytes that are not UTF-8 (jsonl) or
      not parquet, a missing column, an empty file, a prompt that is neither a string nor a
      message list, an answer that is not a string.

Rewards (``data.reward``; docs/REWARDS.md): ``synthetic`` scores token ids with
``SyntheticTask.reward``; ``math`` scores the response text with ``tasks.math_reward`` (math-verify
on the last ``\\boxed{}``); ``code`` runs the program in the response (its last ```python block,
else all of it) on the row's tests (column ``data.tests_key``, checked when the file is read) in the
sandbox, ``data.reward_timeout_s`` per test, and scores the fraction passed; ``package.module:function``
calls a user function ``fn(response_text, prompt_text, metadata)`` (``rewards.CallableReward``), at
most ``data.reward_timeout_s`` per call. ``reward_timeouts`` counts code runs that hit the time
limit and function calls stopped by it (scored 0). A reward function that raises becomes a
``RewardError`` naming the reward, the prompt uid and the answer.
"""

from __future__ import annotations

import json
import logging
import math
import operator
import os
import random
from collections import OrderedDict
from typing import Callable

from megatron_vespo.input_files import InputFileError, check_file, text_lines
from megatron_vespo.train.tasks import Prompt, SyntheticTask, check_tests, extract_program, math_reward, run_code_tests

log = logging.getLogger(__name__)


class PromptFileError(InputFileError):
    """A prompt file that cannot be used; the message names the file (and column/row)."""


class RewardError(RuntimeError):
    """A reward function raised; the message names the reward and the prompt uid."""


# -- reading -----------------------------------------------------------------------------------


def _split_key(key: str, columns: list[str]) -> tuple[str, list[str]]:
    """``a.b.c`` -> top-level column and the path inside it (a column named ``a.b.c`` wins)."""
    if key in columns or "." not in key:
        return key, []
    head, *rest = key.split(".")
    return head, rest


def _dig(value, path: list[str], where: str):
    for part in path:
        if not isinstance(value, dict) or part not in value:
            raise PromptFileError(f"{where}: no field {part!r} inside the column (got {_short(value)})")
        value = value[part]
    return value


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


SUFFIXES = (".jsonl", ".parquet")


def _check_prompt_file(path: str) -> str:
    """The file's suffix, once it is known to exist, not to be a directory and to be supported."""
    check_file(path, "prompt file", PromptFileError)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SUFFIXES:
        raise PromptFileError(f"prompt file {path}: unsupported extension {suffix!r}; use .jsonl or .parquet")
    return suffix


def _parquet_schema(path: str):
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path)
    except Exception as err:  # pyarrow's errors (ArrowInvalid, OSError, ...) share no narrower base
        raise PromptFileError(f"{path}: cannot read as parquet ({err})") from None


def _jsonl_lines(path: str) -> list[tuple[int, str]]:
    return text_lines(path, "prompt file", PromptFileError)


def _read_columns(path: str, keys: list[str]) -> tuple[list[list], int]:
    """Read the columns named by ``keys`` (dotted paths allowed) -> (one list per key, rows)."""
    suffix = _check_prompt_file(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        columns = list(_parquet_schema(path).names)
        heads = []
        for key in keys:
            head, _ = _split_key(key, columns)
            if head not in columns:
                raise PromptFileError(f"{path}: no column {key!r}; the file has columns {columns}")
            heads.append(head)
        try:  # the schema is in the footer; the data pages can still be truncated or corrupt
            table = pq.read_table(path, columns=sorted(set(heads)))
        except Exception as err:
            raise PromptFileError(f"{path}: cannot read as parquet ({err})") from None
        n = table.num_rows
        raw = {h: table.column(h).to_pylist() for h in set(heads)}
        out = []
        for key, head in zip(keys, heads):
            _, sub = _split_key(key, columns)
            values = raw[head]
            if sub:
                values = [_dig(v, sub, f"{path}: column {key!r} row {i}") for i, v in enumerate(values)]
            out.append(values)
        return out, n
    if suffix == ".jsonl":
        rows, lines = [], []
        for lineno, line in _jsonl_lines(path):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise PromptFileError(f"{path}: line {lineno} is not valid JSON ({err})") from err
            if not isinstance(row, dict):
                raise PromptFileError(f"{path}: line {lineno} is not a JSON object (got {_short(row)})")
            rows.append(row)
            lines.append(lineno)
        out = []
        for key in keys:
            values = []
            for i, (row, lineno) in enumerate(zip(rows, lines)):
                head, sub = _split_key(key, list(row))
                if head not in row:
                    raise PromptFileError(f"{path}: no column {key!r} in row {i} (line {lineno}); "
                                          f"that row has keys {sorted(row)}")
                values.append(_dig(row[head], sub, f"{path}: column {key!r} row {i} (line {lineno})"))
            out.append(values)
        return out, len(rows)
    raise AssertionError(suffix)  # _check_prompt_file admits only SUFFIXES


def _has_column(path: str, key: str) -> bool:
    """Whether the file's schema (parquet) or first row (jsonl) has the column ``key``."""
    if _check_prompt_file(path) == ".parquet":
        return key in _parquet_schema(path).names
    for _, line in _jsonl_lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            return False  # _read_columns names the bad line
        return isinstance(row, dict) and key in row
    return False


def _jsonable(value):
    """``value`` with JSON types only (dict keys as strings; anything else as its ``str()``)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


class _Rows:
    """Each row of the file without the prompt column (the top-level column holding ``prompt_key``),
    as a fresh dict of JSON values, read on demand (a parquet keeps its columns in Arrow, a jsonl its
    lines: no dict per row held)."""

    def __init__(self, path: str, prompt_key: str):
        self.prompt_key = prompt_key
        if _check_prompt_file(path) == ".parquet":
            import pyarrow.parquet as pq

            names = _parquet_schema(path).names
            exclude = _split_key(prompt_key, names)[0]
            names = [c for c in names if c != exclude]
            try:
                self._table = pq.read_table(path, columns=names)
            except Exception as err:
                raise PromptFileError(f"{path}: cannot read as parquet ({err})") from None
            self._lines = None
        else:
            self._table, self._lines = None, [line for _, line in _jsonl_lines(path)]

    def __getitem__(self, i: int) -> dict:
        if self._table is not None:
            row = self._table.slice(i, 1).to_pylist()[0] if self._table.num_columns else {}
        else:
            row = json.loads(self._lines[i])  # checked when the file was read
            row.pop(_split_key(self.prompt_key, list(row))[0], None)
        return _jsonable(row)


def _lookup(row: dict, key: str):
    """``row[key]`` (a dotted key digs into dicts); None when absent."""
    if key in row:
        return row[key]
    value = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def read_token_prompts(path: str, key: str = "input_ids") -> list[list[int]] | None:
    """Prompts given as token ids (a column ``key`` of non-empty integer lists), or None when the
    file has no such column (then it holds text prompts for ``PromptFile``)."""
    if not _has_column(path, key):
        return None
    (values,), _ = _read_columns(path, [key])
    for i, ids in enumerate(values):
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise PromptFileError(f"{path}: column {key!r} row {i}: expected a non-empty list of token ids, "
                                  f"got {_short(ids)}")
    return values


def _as_messages(value, where: str) -> list[dict] | None:
    """A chat message list -> list of {"role", "content"} dicts; None for a string."""
    if isinstance(value, str):
        return None
    if isinstance(value, dict) and "role" in value and "content" in value:
        value = [value]  # a single message
    if not isinstance(value, (list, tuple)) or not value:
        raise PromptFileError(f"{where}: the prompt must be a string or a non-empty list of "
                              f"{{'role', 'content'}} messages, got {_short(value)}")
    messages = []
    for j, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise PromptFileError(f"{where}: message {j} must be a dict with string 'role' and 'content', "
                                  f"got {_short(m)}")
        messages.append({"role": m["role"], "content": m["content"]})
    return messages


# -- the prompt file ---------------------------------------------------------------------------


class PromptFile:
    """Prompts and string answers from a .jsonl/.parquet file, as an infinite epoch-shuffled stream.

    ``prompt(uid)`` -> ``Prompt(uid, input_ids, answer, metadata, text)``; see the module docstring
    for the stream, the skipping of long prompts, the metadata and the errors. With
    ``answer_required=False`` the answer column may be missing (answer None) and may hold any value;
    ``tests_key`` names a column of code tests, each row's checked as ``tasks.check_tests`` does.
    """

    def __init__(self, path: str, prompt_key: str = "prompt", answer_key: str = "answer", tokenizer=None,
                 max_prompt_tokens: int = 512, apply_chat_template: bool = False, seed: int = 1,
                 answer_required: bool = True, tests_key: str | None = None):
        if tokenizer is None:
            raise ValueError(f"PromptFile({path}) needs a tokenizer (the policy's Hugging Face tokenizer)")
        if max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
        self.path, self.prompt_key, self.answer_key = path, prompt_key, answer_key
        self.max_prompt_tokens, self.seed = max_prompt_tokens, seed
        self.apply_chat_template = apply_chat_template
        self.answer_required, self.tests_key = answer_required, tests_key
        keys = [prompt_key] + [answer_key] * answer_required + [tests_key] * bool(tests_key)
        columns, n = _read_columns(path, keys)
        prompts = columns[0]
        answers = columns[1] if answer_required else [None] * n
        if n == 0:
            raise PromptFileError(f"prompt file {path} is empty (no rows)")
        self._tests = None
        if tests_key:
            self._tests = []
            for i, tests in enumerate(columns[-1]):
                try:
                    self._tests.append(check_tests(tests, f"{path}: column {tests_key!r} row {i}"))
                except ValueError as err:
                    raise PromptFileError(str(err)) from None

        texts, plain = [], []  # rendered text per row; whether to add the tokenizer's special tokens
        for i, (p, a) in enumerate(zip(prompts, answers)):
            where = f"{path}: column {prompt_key!r} row {i}"
            if answer_required and not isinstance(a, str):
                raise PromptFileError(f"{path}: column {answer_key!r} row {i}: the answer must be a string, "
                                      f"got {type(a).__name__} {_short(a)} (tools/prepare_data.py writes "
                                      f"string answers)")
            if answer_required and not a.strip():
                raise PromptFileError(f"{path}: column {answer_key!r} row {i}: the answer is empty")
            messages = _as_messages(p, where)
            if messages is None:
                if not p.strip():
                    raise PromptFileError(f"{where}: the prompt is empty")
                if not apply_chat_template:
                    texts.append(p)
                    plain.append(True)
                    continue
                messages = [{"role": "user", "content": p}]
            texts.append(self._render(tokenizer, messages, where))
            plain.append(False)

        ids: list[list[int] | None] = [None] * n
        for flag in (True, False):  # plain strings get the tokenizer's BOS etc.; templates carry their own
            rows = [i for i in range(n) if plain[i] == flag]
            if rows:
                enc = tokenizer([texts[i] for i in rows], add_special_tokens=flag)["input_ids"]
                for i, e in zip(rows, enc):
                    ids[i] = list(e)
        self._ids = ids
        self._answers = answers
        self._texts = texts
        self._row_data = _Rows(path, prompt_key)
        self.skipped_rows = [i for i in range(n) if len(ids[i]) > max_prompt_tokens or not ids[i]]
        skipped = set(self.skipped_rows)
        self._rows = [i for i in range(n) if i not in skipped]
        self.num_rows = n
        self.num_skipped = len(self.skipped_rows)
        if not self._rows:
            longest = max(len(x) for x in ids)
            raise PromptFileError(f"{path}: all {n} prompts are longer than max_prompt_tokens = "
                                  f"{max_prompt_tokens} tokens (the longest has {longest}); raise "
                                  f"data.max_prompt_tokens")
        if self.num_skipped:
            log.warning("%s: skipped %d of %d prompts longer than max_prompt_tokens = %d (rows %s%s)",
                        path, self.num_skipped, n, max_prompt_tokens, self.skipped_rows[:10],
                        " ..." if self.num_skipped > 10 else "")
        self._perms: OrderedDict[int, list[int]] = OrderedDict()

    @staticmethod
    def _render(tokenizer, messages: list[dict], where: str) -> str:
        if not getattr(tokenizer, "chat_template", None):
            raise PromptFileError(f"{where}: the prompt is a chat message list (or apply_chat_template is "
                                  f"set) but the tokenizer has no chat template")
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:
            raise PromptFileError(f"{where}: the tokenizer's chat template failed: {err}") from err

    def __len__(self) -> int:
        """Usable prompts (one epoch of the stream)."""
        return len(self._rows)

    def _permutation(self, epoch: int) -> list[int]:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = list(range(len(self._rows)))
            random.Random(f"prompt-file:{self.seed}:{epoch}").shuffle(perm)  # str seeds: stable across runs
            self._perms[epoch] = perm
            while len(self._perms) > 2:
                self._perms.popitem(last=False)
        return perm

    def row_of(self, uid: int) -> int:
        """The file row (0-based) that ``prompt(uid)`` returns."""
        if isinstance(uid, bool):
            raise ValueError(f"uid must be a non-negative integer, got {uid!r}")
        try:
            uid = operator.index(uid)
        except TypeError:
            raise ValueError(f"uid must be a non-negative integer, got {uid!r}") from None
        if uid < 0:
            raise ValueError(f"uid must be a non-negative integer, got {uid!r}")
        epoch, pos = divmod(uid, len(self._rows))
        return self._rows[self._permutation(epoch)[pos]]

    def prompt(self, uid: int) -> Prompt:
        row = self.row_of(uid)
        metadata = self._row_data[row]
        answer = self._answers[row] if self.answer_required else _lookup(metadata, self.answer_key)
        if self._tests is not None:
            metadata[self.tests_key] = [dict(t) for t in self._tests[row]]
        return Prompt(operator.index(uid), list(self._ids[row]), answer, metadata, self._texts[row])


# -- the common interface ----------------------------------------------------------------------


class PromptSource:
    """``prompt(uid) -> Prompt`` and ``reward(response_ids, response_text, prompt) -> float``.

    ``prompts`` is the underlying SyntheticTask or PromptFile. ``reward_timeouts`` is the number of
    reward calls so far that hit ``data.reward_timeout_s`` (a reward function with a ``timeouts``
    attribute counts them; the others never time out).
    """

    def __init__(self, prompts, reward_name: str, reward_fn: Callable[[list, str, Prompt], float]):
        self.prompts, self.reward_name, self._reward_fn = prompts, reward_name, reward_fn

    @property
    def reward_timeouts(self) -> int:
        return int(getattr(self._reward_fn, "timeouts", 0))

    def prompt(self, uid: int) -> Prompt:
        return self.prompts.prompt(uid)

    def reward(self, response_ids: list[int], response_text: str, prompt: Prompt) -> float:
        try:
            value = float(self._reward_fn(response_ids, response_text, prompt))
        except Exception as err:
            raise RewardError(f"reward {self.reward_name!r} failed on prompt uid {prompt.uid} (answer "
                              f"{_short(prompt.answer)}, response {_short(response_text)}): "
                              f"{type(err).__name__}: {err}") from err
        if not math.isfinite(value):
            raise RewardError(f"reward {self.reward_name!r} returned {value} on prompt uid {prompt.uid}")
        return value


def _synthetic_reward(response_ids, response_text, prompt):
    return SyntheticTask.reward(list(response_ids), prompt.answer)


def _math_reward(response_ids, response_text, prompt):
    if not isinstance(response_text, str):
        raise TypeError(f"the math reward needs the response text, got {type(response_text).__name__}")
    return math_reward(response_text, prompt.answer)


class CodeReward:
    """reward=code: the program in the response, run in the sandbox on ``prompt.metadata[tests_key]``;
    the fraction of tests passed. ``timeouts`` counts runs stopped by the per-test limit."""

    def __init__(self, tests_key: str, timeout_s: float):
        self.tests_key, self.timeout_s, self.timeouts = tests_key, timeout_s, 0

    def __call__(self, response_ids, response_text, prompt) -> float:
        if not isinstance(response_text, str):
            raise TypeError(f"the code reward needs the response text, got {type(response_text).__name__}")
        tests = prompt.metadata.get(self.tests_key)
        if tests is None:
            raise KeyError(f"the prompt has no tests in metadata[{self.tests_key!r}] (data.tests_key)")
        result = run_code_tests(extract_program(response_text), tests, self.timeout_s)
        self.timeouts += result.timed_out
        return result.reward


class FunctionReward:
    """reward=package.module:function: ``fn(response_text, prompt.text, prompt.metadata)`` in a
    worker process (``rewards.CallableReward``); ``timeouts`` counts calls stopped by the limit."""

    what = "the reward function"  # in the error for a response without text

    def __init__(self, path: str, timeout_s: float):
        from megatron_vespo.train.rewards import CallableReward

        self.fn = CallableReward(path, timeout_s)

    @property
    def timeouts(self) -> int:
        return self.fn.timeouts

    def metadata(self, prompt) -> dict:
        """The function's third argument."""
        return prompt.metadata

    def __call__(self, response_ids, response_text, prompt) -> float:
        if not isinstance(response_text, str):
            raise TypeError(f"{self.what} needs the response text, got {type(response_text).__name__}")
        return self.fn(response_text, prompt.text, self.metadata(prompt))


class FullMathReward(FunctionReward):
    """reward=math_full (``tasks.math_full_reward``): math-verify over the whole response with
    ``data.reward_timeout_s`` for its parse and verify timeouts, in a worker process killed past
    twice that (the reference's 30 s and 60 s); ``timeouts`` counts those kills."""

    what = "the math_full reward"

    def __init__(self, timeout_s: float):
        super().__init__("megatron_vespo.train.tasks:math_full_reward", 2 * timeout_s)
        self.timeout_s = timeout_s

    def metadata(self, prompt) -> dict:
        return {"answer": prompt.answer, "timeout_s": self.timeout_s}


_SANDBOX_CHECKED = False


def _check_sandbox() -> None:
    """Once per process, before training: the sandbox runs a known program right (a clear error at
    start instead of every code reward failing, or scoring 0, later)."""
    global _SANDBOX_CHECKED
    if _SANDBOX_CHECKED:
        return
    from megatron_vespo.train.sandbox import SandboxError, run_program

    try:
        got = run_program("print(input()[::-1])", ["abc"], 30.0)
    except SandboxError as err:
        raise SandboxError(f"data.reward = code needs the program sandbox, which does not work here: {err}") from None
    if got[0].status != "exited" or got[0].returncode != 0 or got[0].stdout != "cba\n":
        raise SandboxError(f"data.reward = code: the sandbox ran a known program wrongly ({got[0]}); "
                           "is the interpreter's installation readable?")
    _SANDBOX_CHECKED = True


def make_prompt_source(data, tokenizer=None) -> PromptSource:
    """The trainer's prompts and reward from its ``data`` config section (``config.DataSection``).

    ``task=synthetic`` needs ``reward=synthetic`` (answers are token ids); ``task=file`` needs
    ``reward`` = ``math`` (string answers), ``code`` (tests in ``data.tests_key``) or
    ``package.module:function``, and a tokenizer. A function is imported, and the code sandbox
    tried once, before the prompt file is read, so either fails at start.
    """
    if data.task == "synthetic":
        if data.reward != "synthetic":
            raise ValueError(f"data.task = synthetic scores token ids: set data.reward = synthetic "
                             f"(got {data.reward!r})")
        return PromptSource(SyntheticTask(name=data.synthetic_task, seed=data.seed,
                                            min_digits=getattr(data, "synthetic_min_digits", 2),
                                            max_digits=getattr(data, "synthetic_max_digits", 6)), "synthetic",
                            _synthetic_reward)
    if data.task == "file":
        reward = data.reward
        if reward in ("synthetic", "") or (reward not in ("math", "math_full", "code") and ":" not in reward):
            raise ValueError(f"data.task = file has string answers: set data.reward = math, math_full, code or "
                             f"package.module:function (got {reward!r})")
        if not data.prompts_file:
            raise ValueError("data.task = file needs data.prompts_file (.jsonl or .parquet)")
        if tokenizer is None:
            raise ValueError("data.task = file needs the model's tokenizer")
        timeout_s = data.reward_timeout_s
        if reward != "math" and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                 or not 0 < timeout_s < math.inf):
            raise ValueError(f"data.reward_timeout_s must be a positive number of seconds, got {timeout_s!r}")
        if reward == "code":
            if not data.tests_key:
                raise ValueError("data.reward = code needs data.tests_key (the column holding the tests)")
            _check_sandbox()
            reward_fn = CodeReward(data.tests_key, float(timeout_s))
        elif reward == "math":
            reward_fn = _math_reward
        elif reward == "math_full":
            reward_fn = FullMathReward(float(timeout_s))
        else:
            reward_fn = FunctionReward(reward, float(timeout_s))
        prompts = PromptFile(data.prompts_file, prompt_key=data.prompt_key, answer_key=data.answer_key,
                             tokenizer=tokenizer, max_prompt_tokens=data.max_prompt_tokens, seed=data.seed,
                             apply_chat_template=bool(getattr(data, "apply_chat_template", False)),
                             answer_required=reward in ("math", "math_full"), tests_key=data.tests_key if reward == "code" else None)
        return PromptSource(prompts, reward, reward_fn)
    raise ValueError(f"data.task = {data.task!r}; choose one of ['synthetic', 'file']")

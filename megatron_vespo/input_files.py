"""Reading the files a command is given, with errors that name the file and say what is wrong.

The readers of user input (configs, prompt files, score inputs, model ``config.json``, safetensors
indexes, checkpoint metadata) go through these: a missing path, a directory where a file belongs,
an unreadable file, bytes that are not UTF-8, JSON or YAML that does not parse, each becomes an
``InputFileError`` naming the file (and the line where there is one). It is a ``ValueError``, which
the CLI prints as one line with exit status 2, instead of a raw ``OSError``, ``UnicodeDecodeError``
or parser traceback.
"""

from __future__ import annotations

import json
import os


class InputFileError(ValueError):
    """A file given to a command that cannot be read as what it should be; the message names it."""


def check_file(path: str, what: str = "file", error: type[Exception] = InputFileError) -> None:
    """``path`` exists and is not a directory (pipes such as /dev/stdin are fine)."""
    if not os.path.exists(path):
        raise error(f"{what} {path} does not exist")
    if os.path.isdir(path):
        raise error(f"{what} {path} is a directory, not a file")


def read_text(path: str, what: str = "file", error: type[Exception] = InputFileError) -> str:
    """The file's text, decoded as UTF-8 (a leading byte-order mark is dropped)."""
    check_file(path, what, error)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise error(f"{what} {path} cannot be read: {err.strerror or err}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise error(f"{what} {path} is not UTF-8 text: byte 0x{data[err.start]:02x} on line {line} "
                    f"({err.reason}); is it a binary file?") from None


def text_lines(path: str, what: str = "file", error: type[Exception] = InputFileError) -> list[tuple[int, str]]:
    """(1-based line number, line) for every non-blank line. Splits on newlines only: JSON strings
    may hold U+2028 and friends, which ``str.splitlines`` would split on."""
    text = read_text(path, what, error)
    return [(number, line) for number, line in enumerate(text.split("\n"), 1) if line.strip()]


def read_json(path: str, what: str = "JSON file", error: type[Exception] = InputFileError):
    text = read_text(path, what, error)
    if not text.strip():
        raise error(f"{what} {path} is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{what} {path} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None


def read_json_object(path: str, what: str = "JSON file", error: type[Exception] = InputFileError) -> dict:
    value = read_json(path, what, error)
    if not isinstance(value, dict):
        raise error(f"{what} {path} must hold a JSON object, got {type(value).__name__}")
    return value


def read_yaml(path: str, what: str = "YAML file", error: type[Exception] = InputFileError):
    import yaml

    text = read_text(path, what, error)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise error(f"{what} {path} is not valid YAML: {yaml_problem(err)}") from None


def yaml_problem(err) -> str:
    """A YAML parser error in one line: what is wrong and where (1-based line and column)."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
    context = getattr(err, "context", None)
    return f"{problem}{where}" + (f" ({context})" if context else "")


# -- the tokenizer -----------------------------------------------------------------------------

TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                        "added_tokens.json")


def load_tokenizer(model_dir: str):
    """The Hugging Face tokenizer of ``model_dir``. Its JSON files are read first, so a broken one
    is an error naming the file (transformers raises the bare JSON or UTF-8 error); any other
    failure names the directory."""
    from transformers import AutoTokenizer

    for name in TOKENIZER_JSON_FILES:
        path = os.path.join(model_dir, name)
        if os.path.exists(path):
            read_json_object(path, "tokenizer file")
    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)  # never a hub download
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds; named for the user
        raise InputFileError(f"the tokenizer of {model_dir} could not be loaded ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''})") from None

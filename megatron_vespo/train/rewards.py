"""User reward functions: ``data.reward: package.module:function``.

The function is called as ``fn(response_text, prompt_text, metadata) -> float``:

* ``response_text``: the decoded response (special tokens skipped);
* ``prompt_text``: the prompt as it was tokenized (after the chat template when one applied);
* ``metadata``: the prompt row's other fields as JSON values (``id``, ``source``, ``answer``,
  ``tests``, ...; see ``data.PromptFile``), a fresh dict per call.

``resolve`` imports the module once when the prompt source is made, so a missing module, a missing
attribute or something that is not callable is an error at start naming ``data.reward``.

Calls run in one worker process (``python -m megatron_vespo.train.rewards package.module:function``,
started at the first call, with the trainer's environment and ``sys.path``), not in a thread: a call
that runs past ``data.reward_timeout_s`` is stopped by killing the worker (a thread could only be
abandoned, still running and holding the GIL), scores 0 and is counted in ``timeouts``; the next
call starts a new worker. Start-up (the import) is not timed against the limit. Arguments and
results cross as JSON (no pickle), which is why metadata holds JSON values. What the function
prints goes to the trainer's stderr. A function that raises, returns something that is not a
number, or kills its worker raises ``RewardFunctionError`` (``PromptSource.reward`` turns it into
a ``RewardError`` naming the function and the prompt uid). The worker is not a sandbox: the
function is the user's own trusted code (untrusted programs go through ``code_reward``).
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
import weakref

STARTUP_LIMIT_S = 120.0  # the worker's import of the module (not counted against the per-call limit)
_HEADER = struct.Struct(">Q")  # frame length, then that many bytes of UTF-8 JSON


class RewardFunctionError(RuntimeError):
    """The user's reward function raised, returned a non-number, or its worker died."""


def is_function_path(text: str) -> bool:
    """``package.module:function`` (dotted identifiers on both sides of one colon)."""
    module_name, sep, attr = str(text).partition(":")
    return bool(sep) and all(part.isidentifier() for part in module_name.split(".") + attr.split("."))


def resolve(path: str, key: str = "data.reward"):
    """Import ``package.module:function`` (the function may be dotted: ``module:Class.method``)
    and return it; a ValueError naming ``key`` when it cannot be found or is not callable."""
    if not is_function_path(path):
        raise ValueError(f"{key} = {path!r}: name a function as package.module:function")
    module_name, _, attr = str(path).partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{key} = {path!r}: cannot import module {module_name!r} ({type(err).__name__}: {err}); "
                         "is its package installed or on PYTHONPATH?") from err
    except Exception as err:  # the module itself failed while importing
        raise ValueError(f"{key} = {path!r}: importing module {module_name!r} failed: "
                         f"{type(err).__name__}: {err}") from err
    for i, name in enumerate(attr.split(".")):
        if not hasattr(obj, name):
            owner = module_name if i == 0 else f"{module_name}:{'.'.join(attr.split('.')[:i])}"
            raise ValueError(f"{key} = {path!r}: {owner!r} has no attribute {name!r}")
        obj = getattr(obj, name)
    if not callable(obj):
        raise ValueError(f"{key} = {path!r}: {attr!r} is a {type(obj).__name__}, not a callable")
    return obj


def _write_frame(stream, obj) -> None:
    data = json.dumps(obj, default=str).encode()
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _read_exactly(fd: int, n: int, deadline: float | None) -> bytes | None:
    """``n`` bytes from ``fd``; None at EOF; TimeoutError past ``deadline`` (monotonic)."""
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError
        chunk = os.read(fd, n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _read_frame(fd: int, deadline: float | None = None):
    header = _read_exactly(fd, _HEADER.size, deadline)
    if header is None:
        return None
    body = _read_exactly(fd, _HEADER.unpack(header)[0], deadline)
    return None if body is None else json.loads(body)


class CallableReward:
    """``reward(response_text, prompt_text, metadata) -> float`` through a worker process, each call
    limited to ``timeout_s`` seconds (0 and ``timeouts += 1`` past it)."""

    def __init__(self, path: str, timeout_s: float, key: str = "data.reward"):
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise ValueError(f"data.reward_timeout_s must be a positive number of seconds, got {timeout_s!r}")
        resolve(path, key)  # fail now, at start, rather than at the first reward
        self.path, self.timeout_s = path, float(timeout_s)
        self.timeouts = 0
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, CallableReward._stop, [None])

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ)
        # the trainer's sys.path, so the worker imports the module the trainer resolved
        env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")]).strip(os.pathsep)
        proc = subprocess.Popen([sys.executable, "-m", "megatron_vespo.train.rewards", self.path],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True)
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, CallableReward._stop, [proc])
        try:
            ready = _read_frame(proc.stdout.fileno(), time.monotonic() + STARTUP_LIMIT_S)
        except TimeoutError:
            ready = {"error": f"the worker did not import {self.path} within {STARTUP_LIMIT_S:.0f} s"}
        if not isinstance(ready, dict) or "ready" not in ready:
            CallableReward._stop([proc])
            detail = ready.get("error") if isinstance(ready, dict) else f"it exited with status {proc.returncode}"
            raise RewardFunctionError(f"the reward worker for {self.path} did not start: {detail}")
        return proc

    @staticmethod
    def _stop(holder: list) -> None:
        proc = holder[0]
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # with anything the function started
            except ProcessLookupError:
                pass
            proc.wait()
        if proc is not None:
            for f in (proc.stdin, proc.stdout):
                if f and not f.closed:
                    f.close()

    def close(self) -> None:
        with self._lock:
            self._finalizer()
            self._proc = None

    def __call__(self, response_text: str, prompt_text: str, metadata: dict) -> float:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            proc = self._proc
            try:
                _write_frame(proc.stdin, {"response": response_text, "prompt": prompt_text, "metadata": metadata})
                reply = _read_frame(proc.stdout.fileno(), time.monotonic() + self.timeout_s)
            except TimeoutError:
                self._finalizer()
                self._proc = None
                self.timeouts += 1
                return 0.0
            except BrokenPipeError:
                reply = None
            if reply is None:  # EOF: the worker died inside the call
                status = proc.wait()
                self._finalizer()
                self._proc = None
                raise RewardFunctionError(f"{self.path} killed its worker process (exit status {status})")
            if "error" in reply:
                raise RewardFunctionError(reply["error"])
            return reply["value"]


def _worker(path: str) -> None:
    # the protocol gets private copies of stdin/stdout; fds 0 and 1 become /dev/null and stderr, so
    # a function that reads stdin or prints cannot corrupt it
    protocol, requests = os.fdopen(os.dup(1), "wb"), os.dup(0)
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    try:
        fn = resolve(path)
    except ValueError as err:
        _write_frame(protocol, {"error": str(err)})
        return
    _write_frame(protocol, {"ready": True})
    while True:
        request = _read_frame(requests)
        if request is None:  # the trainer closed the pipe (or exited)
            return
        try:
            value = fn(request["response"], request["prompt"], request["metadata"])
        except Exception as err:  # noqa: BLE001 - reported to the trainer with its traceback
            where = "".join(traceback.format_tb(err.__traceback__)[-2:]).rstrip()  # the innermost frames
            _write_frame(protocol, {"error": f"{type(err).__name__}: {err}\n{where}"})
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                value = float(value)  # numpy scalars and the like
            except (TypeError, ValueError):
                _write_frame(protocol, {"error": f"{path} returned {type(value).__name__} {str(value)[:80]!r}, "
                                                 "not a number"})
                continue
        _write_frame(protocol, {"value": float(value)})


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m megatron_vespo.train.rewards package.module:function (the trainer starts this)")
    _worker(sys.argv[1])

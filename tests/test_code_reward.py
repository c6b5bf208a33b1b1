"""The code reward and its sandbox: scoring (fraction of tests passed, trailing whitespace, exit
status), then one hostile program per attack, each checked from outside the sandbox: it is stopped
in bounded time, scores 0, and leaves the machine as it was (no process, no file, no connection,
no secret reaching it, the caller alive)."""

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from megatron_vespo.train.sandbox import Limits, run_program
from megatron_vespo.train.tasks import check_tests, code_reward, extract_program, normalize_output, run_code_tests

ROOT = Path(__file__).resolve().parents[1]
SUM = "a, b = map(int, input().split())\nprint(a + b)\nexit(0)\n"  # exit(): -S leaves it out, BOOT restores it
SUM_TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "-4 9\n", "output": "5"},
             {"input": "10 10", "output": "20\n"}, {"input": "-1 -1\n", "output": "-2\n"}]
ONE = [{"input": "", "output": "done\n"}]


def foreign_pid_ns_processes() -> set[int]:
    """Processes this one can see that live in another PID namespace (a sandbox's)."""
    mine, found = os.readlink("/proc/self/ns/pid"), set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") != mine:
                    found.add(int(entry))
            except OSError:  # gone, or not ours to inspect
                pass
    return found


# -- scoring, no processes ---------------------------------------------------------------------


def test_normalize_output_and_extract_program():
    assert normalize_output("3  \r\n\n\n") == normalize_output("3") == "3"
    assert normalize_output("a \nb\t\n") == "a\nb"
    assert normalize_output(" 3") != normalize_output("3")  # leading whitespace counts
    assert normalize_output("a\n\nb") != normalize_output("a\nb")  # so do inner blank lines
    response = "First try:\n```python\nprint(1)\n```\nBetter:\n```Python3\nprint(2)\n```\nDone."
    assert extract_program(response) == "print(2)\n"  # the last python block
    assert extract_program("```py\nprint(3)\n```") == "print(3)\n"
    assert extract_program("print(4)") == "print(4)"  # no block: the whole response
    assert extract_program("```\nprint(5)\n```") == "```\nprint(5)\n```"  # an untagged fence is not python
    assert extract_program("```python\nprint(6)") == "```python\nprint(6)"  # never closed (truncated)


def test_bad_tests_and_arguments_are_named():
    with pytest.raises(ValueError, match="row 3: the tests must be a non-empty list"):
        check_tests([], "row 3")
    with pytest.raises(ValueError, match="test 1 must be an object with string 'input'"):
        check_tests([{"input": "", "output": "1"}, {"input": 1, "output": "1"}])
    assert check_tests([{"input": "x", "output": "y", "note": 1}]) == [{"input": "x", "output": "y"}]
    with pytest.raises(ValueError, match="timeout_s must be a positive number"):
        run_program("print(1)", [""], 0)
    with pytest.raises(TypeError, match="inputs must be a list of strings"):
        run_program("print(1)", "abc", 1.0)
    with pytest.raises(ValueError, match="memory_mb must be a positive integer"):
        run_program("print(1)", [""], 1.0, limits=Limits(memory_mb=0))
    assert run_code_tests("   \n", SUM_TESTS, 1.0).reward == 0.0  # no program: 0 without running anything


# -- scoring in the sandbox --------------------------------------------------------------------


@pytest.mark.slow
def test_correct_half_correct_and_whitespace():
    assert code_reward(SUM, SUM_TESTS, 5.0) == 1.0
    # right output, but a non-zero exit status for negative a: those tests fail
    half = "a, b = map(int, input().split())\nprint(a + b)\nif a < 0:\n    raise SystemExit(1)\n"
    assert code_reward(half, SUM_TESTS, 5.0) == 0.5
    # trailing spaces, \r\n and trailing blank lines are tolerated; a leading space is not
    ragged = "import sys\nsys.stdout.write({'1': '3   \\r\\n\\n\\n', '2': 'a \\r\\nb\\t', '3': ' 3\\n'}[input()])\n"
    tests = [{"input": "1", "output": "3\n"}, {"input": "2", "output": "a\nb\n"}, {"input": "3", "output": "3\n"}]
    assert code_reward(ragged, tests, 5.0) == pytest.approx(2 / 3)


# -- attacks -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_infinite_loop_is_stopped_after_the_first_timeout():
    start = time.monotonic()
    results = run_program("while True:\n    pass\n", [""] * 10, 1.0)
    elapsed = time.monotonic() - start
    assert [r.status for r in results] == ["timeout"] + ["skipped"] * 9
    assert elapsed < 8.0, elapsed  # one limit (+ start-up on a loaded machine), not ten
    assert code_reward("while True:\n    pass\n", SUM_TESTS, 1.0) == 0.0
    # passes the first two tests, then loops: the fraction passed still counts
    late = "a, b = map(int, input().split())\nwhile a == -1:\n    pass\nprint(a + b)\n"
    tests = SUM_TESTS[:2] + [{"input": "-1 0\n", "output": "-1\n"}] + SUM_TESTS[2:] * 3
    result = run_code_tests(late, tests, 2.0)
    assert (result.passed, result.total, result.timed_out) == (2, 9, True), result


@pytest.mark.slow
def test_fork_bomb_is_contained():
    before = foreign_pid_ns_processes()
    # forking is refused at the process limit (a program told so passes) ...
    limited = ("import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
               "            time.sleep(60)\n        n += 1\nexcept OSError:\n    print('done')\n")
    assert code_reward(limited, ONE, 5.0) == 1.0
    # ... and a bomb that retries forever is stopped at the limit, with everything it forked
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    assert code_reward(bomb, ONE * 3, 1.0) == 0.0
    assert time.monotonic() - start < 8.0
    assert foreign_pid_ns_processes() <= before  # nothing left running anywhere
    assert code_reward(SUM, SUM_TESTS, 5.0) == 1.0  # and the next program runs normally


@pytest.mark.slow
def test_allocating_10_gb_fails_fast():
    [r] = run_program("x = bytearray(10 * 2**30)\nprint('done')\n", [""], 5.0)
    assert r.status == "exited" and r.returncode != 0 and r.stdout == ""
    assert r.seconds < 2.0  # refused at once (RLIMIT_AS), not swapped or killed at the limit
    assert code_reward("try:\n    x = bytearray(10 * 2**30)\nexcept MemoryError:\n    print('done')\n", ONE, 5.0) == 1.0


@pytest.mark.slow
def test_writes_land_nowhere_outside(tmp_path):
    cache = ROOT / ".cache"  # git-ignored; outside /tmp and home, which the sandbox hides anyway
    made = not cache.exists()
    cache.mkdir(exist_ok=True)
    probe = Path(tempfile.mkdtemp(prefix="sandbox-probe-", dir=cache))
    try:
        probe.chmod(0o777)  # writable by anyone: only the read-only mounts stop the program here
        existing = probe / "existing.txt"
        existing.write_text("original\n")
        existing.chmod(0o666)
        targets = [tmp_path / "escape.txt", Path(f"/tmp/escape-{uuid.uuid4().hex}"), probe / "new.txt", existing]
        program = ("import os, sys\n"
                   f"for i, path in enumerate({[str(t) for t in targets]!r}):\n"
                   "    try:\n"
                   "        os.makedirs(os.path.dirname(path), exist_ok=True)\n"
                   "        with open(path, 'a') as f:\n"
                   "            f.write('escaped\\n')\n"
                   "        print(i, 'written')\n"
                   "    except OSError as err:\n"
                   "        print(i, 'blocked', err.errno)\n"
                   "with open('mine.txt', 'w') as f:\n"
                   "    f.write('ok')\n"
                   "print('cwd', open('mine.txt').read(), os.getcwd() == os.environ['HOME'])\n")
        [r] = run_program(program, [""], 5.0)
        assert r.status == "exited" and r.returncode == 0, r
        lines = r.stdout.splitlines()
        assert lines[2].startswith("2 blocked") and lines[3].startswith("3 blocked"), lines  # read-only mounts
        assert lines[-1] == "cwd ok True"  # its own working directory is writable
        assert not targets[0].exists() and not targets[1].exists() and not targets[2].exists()
        assert existing.read_text() == "original\n"
        assert sorted(p.name for p in probe.iterdir()) == ["existing.txt"]
    finally:
        for p in probe.iterdir():
            p.unlink()
        probe.rmdir()
        if made:
            cache.rmdir()


@pytest.mark.slow
def test_network_is_unreachable():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        program = ("import socket\ntry:\n"
                   f"    socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')\n"
                   "    print('connected')\nexcept OSError:\n    print('done')\n")
        assert code_reward(program, ONE, 5.0) == 1.0
        with pytest.raises(BlockingIOError):  # no connection ever reached the server
            server.accept()
    finally:
        server.close()


@pytest.mark.slow
def test_environment_is_scrubbed(monkeypatch):
    name, secret = f"MEGATRON_VESPO_TEST_SECRET_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    monkeypatch.setenv(name, secret)
    program = ("import os\n"
               f"seen = os.environ.get({name!r}) is not None or any({secret!r} in v for v in os.environ.values())\n"
               "for pid in os.listdir('/proc'):\n"
               "    try:\n"
               f"        seen = seen or {secret!r}.encode() in open(f'/proc/{{pid}}/environ', 'rb').read()\n"
               "    except OSError:\n"
               "        pass\n"
               "print('leaked' if seen else 'done')\n")
    assert code_reward(program, ONE, 5.0) == 1.0
    [r] = run_program("import os\nprint(sorted(os.environ))\n", [""], 5.0)
    assert name not in r.stdout and "HOME" in r.stdout


@pytest.mark.slow
def test_killing_the_parent_reaches_nothing():
    bystander = subprocess.Popen(["sleep", "60"])  # one of ours that kill(-1) would reach unsandboxed
    try:
        program = ("import os, signal\n"
                   "for pid, sig in ((os.getppid(), signal.SIGKILL), (-1, signal.SIGKILL), (1, signal.SIGTERM),\n"
                   "                 (1, signal.SIGINT), (os.getppid(), signal.SIGSTOP)):\n"
                   "    try:\n"
                   "        os.kill(pid, sig)\n"
                   "    except OSError:\n"
                   "        pass\n"
                   "print(input())\n")
        # both tests pass: the supervisor outlived the first program's attempts and ran the second
        assert code_reward(program, [{"input": "a", "output": "a"}, {"input": "b", "output": "b"}], 5.0) == 1.0
        assert bystander.poll() is None  # still running; and so is this test process
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.slow
def test_output_flood_is_cut():
    [r] = run_program("while True:\n    print('x' * 1000)\n", [""], 5.0, limits=Limits(max_output_bytes=4096))
    assert r.status == "output_limit" and len(r.stdout) == 4096 and r.seconds < 3.0
    assert code_reward("while True:\n    print('done')\n", ONE, 1.0) == 0.0


@pytest.mark.slow
def test_no_namespaces_is_an_error_not_an_unsandboxed_run():
    # a user namespace whose quota of user namespaces is 0: the sandbox cannot make its own
    code = ("from megatron_vespo.train.sandbox import run_program, SandboxError\n"
            "try:\n    run_program('print(1)', [''], 1.0)\nexcept SandboxError as err:\n    print(err)\n")
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "sh", "-c",
                           'echo 0 > /proc/sys/user/max_user_namespaces && exec "$0" -c "$1"', sys.executable, code],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "cannot create Linux namespaces" in proc.stdout and "never run without it" in proc.stdout, proc.stdout


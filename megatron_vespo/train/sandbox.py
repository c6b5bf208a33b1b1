"""Run an untrusted Python program on test inputs inside a throwaway Linux sandbox (the code reward).

``run_program(program, inputs, timeout_s)`` runs ``program`` once per input (as its stdin) and
returns what each run printed. The program is a policy's response, so it is treated as hostile:

* **Namespaces.** Every call gets new PID, network, mount, IPC and UTS namespaces (plus a user
  namespace when the caller is not root, or is root of a user namespace without uid 65534). The program sees only its own processes: its parent is
  the sandbox's PID 1, which signals from inside cannot kill, so ``os.kill(os.getppid(), 9)`` or
  ``os.kill(-1, 9)`` reach nothing outside. The network namespace has a loopback device that is down
  and nothing else: every connection fails. When the namespaces cannot be created the call raises
  ``SandboxError``; a program is never run unsandboxed.
* **File system.** Every mount is remounted read-only (checked before any program runs). ``/tmp``
  is a fresh size-limited tmpfs holding the working directory (cwd, ``HOME`` and ``TMPDIR``): the
  only writable place, gone with the namespace. ``/var/tmp``, ``/dev/shm``, ``/dev/pts``, ``/run``
  and the caller's home directory are covered by empty read-only tmpfs mounts (sockets and secrets
  usually live there); ``/proc`` is the namespace's own. The interpreter's installation is mounted
  read-only at ``/tmp/python``, so it runs even from a directory the program may not read.
* **The program's process.** Limits on CPU time, address space, processes, file size, open files
  and core dumps (``RLIMIT_*``, hard limits too), no capabilities (bounding set emptied,
  ``no_new_privs``), uid/gid 65534 when the caller is root (so it cannot raise its limits; other
  callers' programs are root of their user namespace without capabilities, which cannot either), a
  minimal environment (nothing of the caller's), ``python -I -S`` (no site-packages, no
  ``PYTHON*`` variables), stdout capped, stderr discarded.
* **Time.** Each input has a wall-clock limit; the first run that exceeds it ends the call (the
  remaining inputs are not run, reported as ``skipped``), so a program that never stops costs one
  limit, not one per input. After each run every process left in the namespace is killed.

Not covered (see docs/REWARDS.md): the file system stays readable outside the hidden directories;
memory is limited per process (``RLIMIT_AS``), so a program forking to its process limit can use
that many times the memory; CPU is not shared fairly with the trainer while it runs;
``RLIMIT_NPROC`` counts every process of uid 65534 on the machine (root) or of the caller's user
namespace; kernel exploits are out of scope.

Mechanics: the caller starts ``python -I -S sandbox.py`` (the *launcher*) with a JSON spec on stdin.
The launcher ``unshare``s the namespaces and forks the *supervisor*, PID 1 of the new PID
namespace, which sets up the mounts and runs each test: fork, drop privileges, exec the program,
feed stdin, read stdout, kill what is left. Results come back as JSON on stdout. The launcher
dies with its caller and the supervisor with the launcher (``PR_SET_PDEATHSIG``), and the kernel
kills everything in a PID namespace when its PID 1 dies, so nothing outlives the call. This file
imports only the standard library, all at the top: it is also the launcher's script, and the
supervisor's own interpreter may sit in a directory the mounts then hide.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import re
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

NOBODY = 65534  # the program's uid/gid when the caller is root
WORK = "/tmp/work"  # inside the sandbox: the program's cwd, HOME and TMPDIR
PYTHON_MOUNT = "/tmp/python"  # inside the sandbox: the interpreter's installation, read-only
PROGRAM = "/tmp/program/main.py"  # inside the sandbox: the program, on a read-only tmpfs of its own
HIDDEN = ("/var/tmp", "/dev/shm", "/dev/pts", "/run", "/root")  # plus the caller's home directory
SETUP_SLACK_S = 30.0  # on top of the per-test limits: interpreter starts, mounts (a loaded machine)

# <sched.h>, <sys/mount.h>, <sys/prctl.h>
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 4, 24, 38

# The program's environment, complete: nothing of the caller's environment reaches it.
BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": WORK,
            "TMPDIR": WORK}

# Runs the program as __main__ under -S, restoring exit()/quit() (site's helpers, which -S leaves
# out and solutions often call).
BOOT = ("import builtins, sys\n"
        "builtins.exit = builtins.quit = sys.exit\n"
        "path = sys.argv[1]\n"
        "sys.argv = sys.argv[1:]\n"
        "with open(path, encoding='utf-8') as f:\n"
        "    code = compile(f.read(), path, 'exec')\n"
        "del f\n"
        "exec(code, {'__name__': '__main__', '__file__': path, '__builtins__': builtins})\n")


class SandboxError(RuntimeError):
    """The sandbox could not be set up or did not answer; no program ran unsandboxed."""


@dataclass
class Limits:
    memory_mb: int = 512  # RLIMIT_AS of each process (MemoryError beyond)
    max_processes: int = 16  # RLIMIT_NPROC (threads count too)
    max_file_mb: int = 16  # RLIMIT_FSIZE: largest file the program may write
    max_open_files: int = 64  # RLIMIT_NOFILE
    scratch_mb: int = 64  # size of the tmpfs at /tmp (the only writable place)
    max_output_bytes: int = 1 << 20  # stdout kept per test; more fails that test

    def check(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"sandbox limit {name} must be a positive integer, got {value!r}")


@dataclass
class RunResult:
    status: str  # exited | timeout | output_limit | skipped (not run: an earlier test timed out)
    returncode: int | None  # exit status (negative: killed by that signal); None unless exited
    stdout: str  # what the program printed (UTF-8, undecodable bytes replaced)
    seconds: float  # wall-clock time of the run


# -- the caller's side --------------------------------------------------------------------------


def run_program(program: str, inputs: list[str], timeout_s: float, *, limits: Limits | None = None,
                stop_on_timeout: bool = True) -> list[RunResult]:
    """Run ``program`` (Python source) once per stdin text in ``inputs``; one ``RunResult`` each.

    ``timeout_s`` is the wall-clock limit of each run (CPU time is limited to it too, rounded up).
    With ``stop_on_timeout`` the first run that times out ends the call and the remaining inputs
    are ``skipped``. Raises ``SandboxError`` when the sandbox cannot be set up (no namespaces, ...)
    or does not answer within the limits plus ``SETUP_SLACK_S``.
    """
    if not isinstance(program, str):
        raise TypeError(f"run_program: the program must be a string, got {type(program).__name__}")
    if not isinstance(inputs, (list, tuple)) or not all(isinstance(x, str) for x in inputs):
        raise TypeError("run_program: inputs must be a list of strings (one stdin text per run)")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf:
        raise ValueError(f"run_program: timeout_s must be a positive number of seconds, got {timeout_s!r}")
    limits = limits or Limits()
    limits.check()
    if not inputs:
        return []
    # programs run with the caller's base interpreter (a venv's python may be a copy outside it)
    prefix = os.path.realpath(sys.base_prefix)
    exe = os.path.realpath(sys.executable)
    base = os.path.realpath(getattr(sys, "_base_executable", None) or exe)
    python = next((p for p in (base, exe) if os.path.commonpath([prefix, p]) == prefix), None)
    if python is None:
        raise SandboxError(f"the interpreter {exe} is not inside its installation {prefix}; the sandbox "
                           "mounts that installation to run programs")
    spec = {"program": program, "inputs": list(inputs), "timeout_s": float(timeout_s), "limits": asdict(limits),
            "stop_on_timeout": bool(stop_on_timeout), "prefix": prefix, "python": os.path.relpath(python, prefix),
            "hide": [os.path.realpath(os.path.expanduser("~"))], "caller": os.getpid()}
    budget = len(inputs) * (timeout_s + 1.0) + SETUP_SLACK_S
    # The launcher runs this file with the caller's interpreter; its environment is minimal too.
    proc = subprocess.Popen([exe, "-I", "-S", os.path.abspath(__file__)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={"PATH": BASE_ENV["PATH"]},
                            cwd="/", close_fds=True, start_new_session=True)
    try:
        out, err = proc.communicate(json.dumps(spec).encode(), timeout=budget)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the supervisor and the program die with the launcher
        proc.communicate()
        raise SandboxError(f"the sandbox did not answer within {budget:.0f} s ({len(inputs)} tests of at most "
                           f"{timeout_s} s each plus {SETUP_SLACK_S:.0f} s); it was killed") from None
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    try:
        answer = json.loads(out)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or ("error" not in answer and "results" not in answer):
        tail = err.decode(errors="replace")[-2000:]
        raise SandboxError(f"the sandbox failed (exit status {proc.returncode}) without a result: {tail}")
    if "error" in answer:
        raise SandboxError(answer["error"])
    return [RunResult(r["status"], r["returncode"], r["stdout"], r["seconds"]) for r in answer["results"]]


# -- inside: the launcher and the supervisor ------------------------------------------------------

_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        libc.unshare.argtypes = [ctypes.c_int]
        _LIBC = libc
    return _LIBC


def _check(rc: int, what: str) -> None:
    if rc != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def _prctl(option: int, arg: int = 0) -> None:
    _check(_libc().prctl(option, arg, 0, 0, 0), f"prctl({option}, {arg})")


def _mount(source, target, fstype, flags: int, data=None) -> None:
    enc = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
    _check(_libc().mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _fail(message: str, status: int = 3) -> None:
    sys.stdout.write(json.dumps({"error": message}))
    sys.stdout.flush()
    os._exit(status)


def _launcher() -> None:
    spec = json.loads(sys.stdin.buffer.read())
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # die with the caller ...
    if os.getppid() != spec["caller"]:  # ... even if it died before the line above
        os._exit(1)
    # root drops the program to uid 65534; root of a user namespace that has no 65534 (unshare -r,
    # some containers) cannot, and goes the unprivileged way like any other user
    root = os.geteuid() == 0 and _maps_nobody()
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    uid, gid = os.geteuid(), os.getegid()
    if not root:  # an unprivileged user namespace gives the rights to make the others
        flags |= CLONE_NEWUSER
    if _libc().unshare(flags) != 0:
        code = ctypes.get_errno()
        kinds = "pid, network, mount" if root else "user, pid, network, mount"
        _fail(f"the code sandbox cannot create Linux namespaces ({kinds}): {os.strerror(code)}. It needs root "
              "or unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1 where it exists, "
              "user.max_user_namespaces > 0, no seccomp/AppArmor profile refusing unshare); programs are never "
              "run without it")
    if not root:
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    pid = os.fork()
    if pid == 0:
        try:
            _supervise(spec, root)
        except BaseException as err:  # noqa: BLE001 - any failure is reported, never a half-set-up run
            _fail(f"the code sandbox failed to set up or run: {type(err).__name__}: {err}")
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def _maps_nobody() -> bool:
    """Whether uid and gid 65534 exist in this user namespace (always true outside containers)."""
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/self/{name}") as f:
            ranges = [tuple(map(int, line.split())) for line in f if line.strip()]
        if not any(inside <= NOBODY < inside + count for inside, _, count in ranges):
            return False
    return True


def _mount_points() -> list[str]:
    points = set()
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            raw = line.split()[4]  # the mount point, with \040-style escapes
            points.add(os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), raw)))
    return sorted(points)


def _readonly_everywhere() -> None:
    """Remount every mount read-only (bind remounts change this namespace's view only), then check."""
    unreachable = (errno.ENOENT, errno.EACCES, errno.ENOTDIR)
    points = _mount_points()
    for path in points:
        try:
            st = os.statvfs(path)
        except OSError as err:
            if err.errno in unreachable:  # hidden or not ours to reach: nor the program's
                continue
            raise
        # a user namespace may not clear nosuid/nodev/noexec inherited from outside: keep them
        keep = st.f_flag & (os.ST_NOSUID | os.ST_NODEV | os.ST_NOEXEC)
        try:
            _mount(None, path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | keep)
        except OSError as err:
            if err.errno not in unreachable + (errno.EINVAL,):  # EINVAL: overmounted, not a mount here
                raise
    for path in points:
        try:
            writable = not os.statvfs(path).f_flag & os.ST_RDONLY
        except OSError as err:
            if err.errno in unreachable:
                continue
            raise
        if writable:
            raise OSError(errno.EPERM, f"{path} is still writable after remounting it read-only")


def _setup_filesystem(spec: dict, root: bool) -> None:
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done below propagates outside
    _readonly_everywhere()
    lim = spec["limits"]
    prefix = os.open(spec["prefix"], os.O_PATH | os.O_DIRECTORY)  # still reachable if /tmp hides it
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={lim['scratch_mb']}m,nr_inodes=4096,mode=755")
    os.mkdir(PYTHON_MOUNT)
    _mount(f"/proc/self/fd/{prefix}", PYTHON_MOUNT, None, MS_BIND | MS_REC)
    os.close(prefix)
    keep = os.statvfs(PYTHON_MOUNT).f_flag & (os.ST_NODEV | os.ST_NOEXEC)
    _mount(None, PYTHON_MOUNT, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | keep)
    # the program on a tmpfs of its own, read-only once written: the program cannot change it, and
    # filling the scratch space cannot stop the next test from starting
    folder = os.path.dirname(PROGRAM)
    os.mkdir(folder)
    _mount("tmpfs", folder, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
           f"size={len(spec['program'].encode('utf-8', 'surrogatepass')) // 1024 + 64}k,mode=755")
    with open(PROGRAM, "wb") as f:
        f.write(spec["program"].encode("utf-8", errors="surrogatepass"))
    os.chmod(PROGRAM, 0o444)
    _mount(None, folder, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.mkdir(WORK, 0o700)
    if root:
        os.chown(WORK, NOBODY, NOBODY)
    for path in sorted({os.path.realpath(p) for p in list(HIDDEN) + spec["hide"]}):
        if os.path.isdir(path) and path not in ("/", "/tmp") and not path.startswith("/tmp/"):
            _mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=755")
    try:  # this PID namespace's own /proc
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:  # a user namespace may not mount proc (a container masking parts of it): none at all
        _mount("tmpfs", "/proc", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=755")


def _kill_all(reap: bool = True) -> None:
    """SIGKILL every process in this PID namespace but the supervisor; with ``reap``, reap them all."""
    if os.getpid() != 1:  # kill(-1) outside a PID namespace would reach the whole machine
        raise RuntimeError("refusing kill(-1): the supervisor is not PID 1 of its own PID namespace")
    while True:
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if not reap:
            return
        try:
            while True:
                os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _demote(spec: dict, root: bool):
    """The program's preexec: limits, no capabilities, no privileges (runs in the forked child)."""
    lim, libc = spec["limits"], _libc()
    cpu = math.ceil(spec["timeout_s"])
    settings = ((resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, lim["memory_mb"] << 20),
                (resource.RLIMIT_NPROC, lim["max_processes"]), (resource.RLIMIT_FSIZE, lim["max_file_mb"] << 20),
                (resource.RLIMIT_NOFILE, lim["max_open_files"]), (resource.RLIMIT_CORE, 0))

    def preexec():
        for res, value in settings:
            resource.setrlimit(res, value if isinstance(value, tuple) else (value, value))
        for cap in range(64):  # empty the bounding set: exec grants no capability, even to uid 0
            if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                if ctypes.get_errno() != errno.EINVAL or cap == 0:  # EINVAL: past the last capability
                    raise OSError(ctypes.get_errno(), "cannot drop capabilities")
                break
        if root:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        _prctl(PR_SET_NO_NEW_PRIVS, 1)

    return preexec


def _clear_work() -> None:
    """Empty the working directory between tests (best effort: what stays is the program's own mess)."""
    for name in os.listdir(WORK):
        path = os.path.join(WORK, name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
        except OSError:
            pass


def _run_one(argv: list[str], env: dict, stdin: bytes, spec: dict, preexec) -> dict:
    timeout_s, cap = spec["timeout_s"], spec["limits"]["max_output_bytes"]
    start = time.monotonic()
    deadline = start + timeout_s
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            cwd=WORK, env=env, preexec_fn=preexec, close_fds=True)
    sel = selectors.DefaultSelector()
    os.set_blocking(proc.stdout.fileno(), False)
    sel.register(proc.stdout, selectors.EVENT_READ)
    pending = memoryview(stdin)
    if pending:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    out, status, exited = bytearray(), None, False
    while status is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            status = "timeout"
            break
        if not exited and proc.poll() is not None:  # reaped by Popen: its status is kept
            exited = True
            _kill_all(reap=False)  # leftovers may hold stdout open: kill them, EOF follows
        for key, _ in sel.select(min(remaining, 0.02)):
            if key.fileobj is proc.stdin:
                try:
                    n = os.write(proc.stdin.fileno(), pending[:65536])
                except (BrokenPipeError, BlockingIOError) as err:
                    n = len(pending) if isinstance(err, BrokenPipeError) else 0
                pending = pending[n:]
                if not pending:
                    sel.unregister(proc.stdin)
                    proc.stdin.close()
                continue
            try:
                chunk = os.read(proc.stdout.fileno(), 65536)
            except BlockingIOError:
                continue
            if not chunk:
                sel.unregister(proc.stdout)
                if proc.poll() is not None or exited:
                    status = "exited"
                else:  # stdout closed but still running: wait for it within the limit
                    try:
                        proc.wait(timeout=max(deadline - time.monotonic(), 0))
                        status = "exited"
                    except subprocess.TimeoutExpired:
                        status = "timeout"
                break
            out += chunk
            if len(out) > cap:
                status = "output_limit"
                break
    seconds = time.monotonic() - start
    if status != "exited":
        _kill_all(reap=False)  # the program and all it forked at once, before it forks more
    returncode = proc.wait()
    _kill_all()
    for f in (proc.stdin, proc.stdout):
        if not f.closed:
            f.close()
    sel.close()
    return {"status": status, "returncode": returncode if status == "exited" else None,
            "stdout": bytes(out[:cap]).decode("utf-8", errors="replace"), "seconds": round(seconds, 4)}


def _supervise(spec: dict, root: bool) -> None:
    # PID 1 gets only the signals it has handlers for: drop Python's SIGINT handler so a program
    # sending SIGINT to its parent cannot stop the supervisor.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # die with the launcher; the namespace dies with us
    _prctl(PR_SET_DUMPABLE, 0)  # no ptrace, no /proc/1/fd or environ for a same-uid program
    if os.getpid() != 1:
        raise RuntimeError("the supervisor is not PID 1 of a new PID namespace")
    _setup_filesystem(spec, root)
    python = os.path.join(PYTHON_MOUNT, spec["python"])
    env = dict(BASE_ENV)
    libdirs = [os.path.join(PYTHON_MOUNT, d) for d in ("lib", "lib64") if os.path.isdir(os.path.join(PYTHON_MOUNT, d))]
    if libdirs:  # a shared libpython found through an absolute RUNPATH the program cannot reach
        env["LD_LIBRARY_PATH"] = ":".join(libdirs)
    argv = [python, "-I", "-S", "-c", BOOT, PROGRAM]
    preexec = _demote(spec, root)
    results, stopped = [], False
    for i, text in enumerate(spec["inputs"]):
        if stopped:
            results.append({"status": "skipped", "returncode": None, "stdout": "", "seconds": 0.0})
            continue
        if i:
            _clear_work()
        result = _run_one(argv, env, text.encode("utf-8", errors="surrogatepass"), spec, preexec)
        results.append(result)
        stopped = spec["stop_on_timeout"] and result["status"] == "timeout"
    sys.stdout.write(json.dumps({"results": results}))
    sys.stdout.flush()


if __name__ == "__main__":
    _launcher()

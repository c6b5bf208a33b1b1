# Both targets do all set-up themselves on a fresh machine: each creates its venvs when missing.
# Two Megatron-Core releases are supported (setup.py: >=0.16.1,<0.20), each with its own Python:
#   .venv      Python 3.11, megatron-core 0.16.1 (its last release for 3.11), torch 2.13.0 CPU build:
#              the demo, and the compatibility leg of `make test`
#   .venv-new  Python 3.12, megatron-core 0.19.2, torch 2.14.1 (the registry has only CUDA builds
#              for 3.12; they run on a CPU): the full suite of `make test`
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)
TORCH_CPU := torch==2.13.0
# a Python 3.12: python3.12 when it runs, else pyenv's (its shim fails when 3.12 is not selected)
PYTHON_NEW ?= $(shell for p in python3.12 $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.12*/bin/python3.12 2>/dev/null); do \
	$$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && echo $$p && break; done)
NEW_VENV := .venv-new
NEW_PY := $(NEW_VENV)/bin/python
NEW_PINS := torch==2.14.1 megatron-core==0.19.2
NEW_STAMP := $(NEW_VENV)/.installed-$(shell cat setup.py Makefile | cksum | cut -d' ' -f1)

.PHONY: demo parity test test-fast install new-venv sglang-venv benchmark gpu-check clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# Without a GPU install the pinned local CPU build first, so pip never pulls CUDA wheels.
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
		echo "no GPU found: installing $(TORCH_CPU) (CPU build)"; \
		$(PY) -m pip install --quiet $(TORCH_CPU); \
	fi
	$(PY) -m pip install --quiet -e ".[test]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

$(NEW_STAMP): setup.py Makefile
	@test -n "$(PYTHON_NEW)" || { echo "no Python 3.12 found: set PYTHON_NEW=/path/to/python3.12"; exit 2; }
	$(PYTHON_NEW) -m venv $(NEW_VENV)
	$(NEW_PY) -m pip install --quiet --upgrade pip
	$(NEW_PY) -m pip install --quiet $(NEW_PINS)
	$(NEW_PY) -m pip install --quiet -e ".[test]" $(NEW_PINS)
	rm -f $(NEW_VENV)/.installed-*
	touch $(NEW_STAMP)

new-venv: $(NEW_STAMP)

demo: $(STAMP)
	$(PY) -m megatron_vespo demo

parity: $(STAMP)
	$(PY) -m megatron_vespo parity --layouts "dp2,tp2,pp2,cp2,ep2" --losses vespo,grpo

# Real SGLang 0.5.23 for the tests, in its own venv (it pins torch 2.14.1): CPU servers, with the
# project's test-only stand-in for the compiled sgl_kernel and an allocator fix (tests/sglang_cpu).
SGLANG_VENV := .venv-sglang
SGLANG_REQS := tests/sglang_cpu/requirements.txt tests/sglang_cpu/constraints.txt
SGLANG_STAMP := $(SGLANG_VENV)/.installed-$(shell cat $(SGLANG_REQS) | cksum | cut -d' ' -f1)

$(SGLANG_STAMP): $(SGLANG_REQS)
	$(PYTHON) -m venv $(SGLANG_VENV)
	$(SGLANG_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SGLANG_VENV)/bin/python -m pip install --quiet -c tests/sglang_cpu/constraints.txt torch torchvision
	$(SGLANG_VENV)/bin/python -m pip install --quiet --no-deps sglang==0.5.23
	$(SGLANG_VENV)/bin/python -m pip install --quiet -c tests/sglang_cpu/constraints.txt -r tests/sglang_cpu/requirements.txt
	rm -f $(SGLANG_VENV)/.installed-*
	touch $(SGLANG_STAMP)

sglang-venv: $(SGLANG_STAMP)

# SGLang's own request/response schema (sglang/api/v1/api_types.py) is read from its wheel, not
# installed: SGLang needs CUDA kernels. Without the wheel the tests use a recorded field list.
SGLANG_WHEELS := .cache/wheels

# The SLURM tests start a localhost cluster (tools/slurm_localhost.sh): slurm-wlm and munge from apt
# when missing and this is root; otherwise those tests say why and are skipped (.ci/run fails then).
test: $(STAMP) $(NEW_STAMP) $(SGLANG_STAMP)
	@echo "== venvs ready ($$(date +%T)) =="
	@bash tools/slurm_localhost.sh install || echo "slurm-wlm/munge not installed: the SLURM cluster tests will be skipped"
	@ls $(SGLANG_WHEELS)/sglang-0.5.23-*.whl >/dev/null 2>&1 || \
		$(PY) -m pip download --quiet --no-deps sglang==0.5.23 -d $(SGLANG_WHEELS) || \
		echo "sglang 0.5.23 wheel not available: schema tests use the recorded field list"
	@echo "== full suite: Python 3.12, megatron-core 0.19.2 ($$(date +%T)) =="
	MEGATRON_VESPO_OTHER_MCORE_PYTHON=$(CURDIR)/$(PY) MEGATRON_VESPO_REQUIRE_OTHER_MCORE=1 $(NEW_PY) -m pytest -q tests
	@echo "== compatibility: Python 3.11, megatron-core 0.16.1 ($$(date +%T)) =="
	MEGATRON_VESPO_OTHER_MCORE_PYTHON=$(CURDIR)/$(NEW_PY) MEGATRON_VESPO_REQUIRE_OTHER_MCORE=1 $(PY) -m pytest -q $(COMPAT_TESTS)

# The compatibility leg: what differs between releases, parity on 5 layouts (dp2, tp2, pp2, cp2,
# ep2), routing replay, train + checkpoint + resume, the convert round trip.
COMPAT_TESTS := tests/test_mcore_versions.py \
	tests/test_parity.py::test_basic_layouts_vespo_and_baselines \
	tests/test_routing_replay.py \
	tests/test_trainer.py::test_resume_after_a_kill_gives_the_same_losses \
	tests/test_convert_cli.py::test_hf_to_mcore_to_hf_round_trip_across_layouts

# Unit tests only (no torchrun, no CLI subprocess, no servers), on the newest pair.
test-fast: $(NEW_STAMP)
	$(NEW_PY) -m pytest -q -m "not slow" tests

benchmark: $(STAMP) $(NEW_STAMP)
	$(PY) benchmarks/bench_hook.py
	$(NEW_PY) benchmarks/bench_scoring.py

clean:
	rm -rf $(VENV) $(NEW_VENV) $(SGLANG_VENV) build *.egg-info

# On a GPU machine: install the GPU extras and SGLang, run every CUDA path, print one table.
gpu-check:
	bash tools/gpu_check.sh

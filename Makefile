# Both targets do all set-up themselves on a fresh machine: each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)
TORCH_CPU := torch==2.13.0

.PHONY: demo parity test install sglang-venv benchmark gpu-check clean

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
test: $(STAMP) $(SGLANG_STAMP)
	@bash tools/slurm_localhost.sh install || echo "slurm-wlm/munge not installed: the SLURM cluster tests will be skipped"
	@ls $(SGLANG_WHEELS)/sglang-0.5.23-*.whl >/dev/null 2>&1 || \
		$(PY) -m pip download --quiet --no-deps sglang==0.5.23 -d $(SGLANG_WHEELS) || \
		echo "sglang 0.5.23 wheel not available: schema tests use the recorded field list"
	$(PY) -m pytest -q tests

benchmark: $(STAMP)
	$(PY) benchmarks/bench_hook.py

clean:
	rm -rf $(VENV) $(SGLANG_VENV) build *.egg-info

# On a GPU machine: install the GPU extras and SGLang, run every CUDA path, print one table.
gpu-check:
	bash tools/gpu_check.sh

# Both targets do all set-up themselves on a fresh machine: each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)
TORCH_CPU := torch==2.13.0

.PHONY: demo parity test install benchmark clean

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

# SGLang's own request/response schema (sglang/api/v1/api_types.py) is read from its wheel, not
# installed: SGLang needs CUDA kernels. Without the wheel the tests use a recorded field list.
SGLANG_WHEELS := .cache/wheels

test: $(STAMP)
	@ls $(SGLANG_WHEELS)/sglang-0.5.23-*.whl >/dev/null 2>&1 || \
		$(PY) -m pip download --quiet --no-deps sglang==0.5.23 -d $(SGLANG_WHEELS) || \
		echo "sglang 0.5.23 wheel not available: schema tests use the recorded field list"
	$(PY) -m pytest -q tests

benchmark: $(STAMP)
	$(PY) benchmarks/bench_hook.py

clean:
	rm -rf $(VENV) build *.egg-info

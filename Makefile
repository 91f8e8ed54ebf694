# Two commands on a fresh machine:  make demo   and   make test
# Each creates the virtualenv (.venv) and installs the project when needed.

VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# On a machine without CUDA, the pinned CPU wheel is installed first (an open range would pull a
# multi-GB CUDA build). A GPU machine keeps whatever torch the resolver picks for it. Every
# other package installs at the version CI ran (constraints.txt).
TORCH_CPU ?= torch==2.13.0
RUN_DIR ?= runs/gpt-debug
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test soak lint gpu-check venv clean espeak

venv: $(STAMP)

# The speech task synthesises its audio locally with espeak-ng (a Debian package): installed here
# when missing, as root or through sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
espeak:
	@command -v espeak-ng >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
	    $(SUDO) apt-get install -y -qq espeak-ng >/dev/null; }

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" 2>/dev/null; then \
	    $(PY) -m pip install -q "$(TORCH_CPU)"; fi
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/seqtrain train configs/gpt/debug.yaml --run-dir $(RUN_DIR) $(DEMO_ARGS)
	$(VENV)/bin/seqtrain generate $(RUN_DIR) --prompt "def " --max-new-tokens 120

# The 25 slowest tests are listed at the end: the suite is kept under 40 minutes on 2 vCPUs.
test: $(STAMP) espeak
	$(PY) -m pytest -m "not gpu and not soak" --durations=25 $(PYTEST_ARGS)

# Long fault-injection runs (minutes): the chaos run of tools/chaos.py.
soak: $(STAMP)
	$(PY) -m pytest -m soak $(PYTEST_ARGS)

# What a session lent a GPU runs first, in one call (at most 8 minutes): throughput with and
# without compile, ZeRO-2, planner vs measured memory, SDPA, fused AdamW and HF export parity.
# Results: $(GPU_OUT)/gpu_check.json. The test suite runs the same script on the CPU (--dry-run).
GPU_OUT ?= runs/gpu-check
gpu-check: $(STAMP)
	$(PY) -m tools.gpu_check --out $(GPU_OUT)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs mlflow.db

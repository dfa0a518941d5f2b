# Two entry points a newcomer needs: `make study` (the default study) and `make test` (the suite).
# Both create .venv and install loopscope on first use (with the hf extra, so its tests run). The test path pins the CPU wheel of torch
# (2.13.0 lies on these machines' disk); for CUDA, install a CUDA torch into the venv first
# (see README "Installing for a GPU") and the pin below is then left alone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH ?= torch==2.13.0

.PHONY: study test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev,hf]'
	touch $(STAMP)

study: $(STAMP)
	$(VENV)/bin/loopscope $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -n 2

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(VENV)/bin/loopscope-bench $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache

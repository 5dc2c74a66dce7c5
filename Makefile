# zllm: `make run` streams an answer from the default model, `make test` runs the suite.
# Everything goes through $(VENV)/bin/...: no activation needed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch lies on local disk; a bare `torch` would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.zllm-installed
PROMPT ?= What is the capital of France?

.PHONY: run test lint install model clean-venv

run: install model
	$(VENV)/bin/zllm generate --chat "$(PROMPT)"

test: install model
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

install: $(STAMP)

# Re-done only when pyproject.toml changes (the install is editable: code changes need nothing).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --disable-pip-version-check "$(TORCH)"
	$(PIP) install --disable-pip-version-check -e '.[test]'
	touch $@

# Fetches and converts the default model once (cached under ~/.cache/zllm or $$ZLLM_CACHE).
model: install
	$(VENV)/bin/zllm download-default

clean-venv:
	rm -rf $(VENV)

# Two entry points for a fresh machine: `make demo` (the main job on bundled data) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1  # the tested pair (2.11 / 0.26 passes too)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/vilbert-demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-extended: $(VENV)/.installed  # the longer proofs (pyproject.toml's `extended` marker); CI runs them after `make test`
	$(PY) -m pytest -q -m extended

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

bench: $(VENV)/.installed
	$(PY) benchmarks/model_benchmark.py

.PHONY: install demo test test-extended lint bench

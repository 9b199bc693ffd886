# Two commands do all their own set-up: `make run` and `make test`.
# `make run` installs only what `peftcalc estimate` needs (the base dependencies: no torch); `make test`
# installs everything, the pinned CPU wheel of torch first so nothing resolves to the multi-GB CUDA build.
# Both use the same venv; each has its own stamp (the full install stamps both, so `make test` then
# `make run` installs nothing more).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
RUN_STAMP := $(VENV)/.run-stamp
TEST_STAMP := $(VENV)/.test-stamp
TORCH_PIN ?= torch==2.13.0
# Where torch comes from. Empty: pip's configured index (fine where it resolves the CPU wheel). Where
# pip would pick the CUDA build: make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
TORCH_INDEX_ARGS := $(if $(strip $(TORCH_INDEX)),--index-url $(strip $(TORCH_INDEX)))
PYTEST_ARGS ?=
# pytest-xdist workers (auto: one per core); PYTEST_WORKERS=0 runs in one process
PYTEST_WORKERS ?= auto
CI_SLICE ?= 24
DIST_SLICE ?= 4

.PHONY: run test env readme bench report clean gpu-wheels

$(RUN_STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) -e .
	@touch $@

$(TEST_STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) $(TORCH_INDEX_ARGS) $(TORCH_PIN)
	$(PIP) -e '.[all]'
	@touch $@ $(RUN_STAMP)

env: $(TEST_STAMP)

run: $(RUN_STAMP)
	$(VENV)/bin/peftcalc estimate

test: $(TEST_STAMP)
	$(PY) -m pytest -q -m "not gpu" -n $(PYTEST_WORKERS) $(PYTEST_ARGS)
	@rm -f build/ci-slice.jsonl
	$(VENV)/bin/peftcalc measure --matrix ci --limit $(CI_SLICE) --out build/ci-slice.jsonl
	@rm -f build/dist-slice.jsonl
	$(VENV)/bin/peftcalc measure --matrix dist --limit $(DIST_SLICE) --out build/dist-slice.jsonl
	$(PY) -m reports.ci_report build/ci-slice.jsonl build/dist-slice.jsonl

# Re-run every command README.md shows and rewrite its output blocks (tools/readme.py; the tests check them).
readme: $(RUN_STAMP)
	$(PY) tools/readme.py

bench: $(TEST_STAMP)
	$(PY) benchmarks/bench_estimate.py

clean:
	rm -rf build .pytest_cache

# Wheels the lent GPU machine lacks (its image has Python 3.12, torch, transformers 5.17, no
# bitsandbytes); carried as .whl/ (git-ignored). See the README, "GPU validation".
WHEEL_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
gpu-wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(WHEEL_PLATFORMS) -d .whl transformers==5.23.0 peft==0.21.2 bitsandbytes==0.50.2

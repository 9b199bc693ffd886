# Two commands do all their own set-up: `make run` and `make test`.
# The pinned CPU wheel of torch goes in first so nothing resolves to the multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?=
CI_SLICE ?= 24

.PHONY: run test env bench report clean gpu-wheels

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_PIN)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[all]'
	@touch $(STAMP)

env: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/peftcalc estimate

test: $(STAMP)
	$(PY) -m pytest -q -m "not gpu" $(PYTEST_ARGS)
	@rm -f build/ci-slice.jsonl
	$(VENV)/bin/peftcalc measure --matrix ci --limit $(CI_SLICE) --out build/ci-slice.jsonl
	$(PY) -m reports.ci_report build/ci-slice.jsonl

bench: $(STAMP)
	$(PY) benchmarks/bench_estimate.py

clean:
	rm -rf build .pytest_cache

# Wheels the lent GPU machine lacks (its image has Python 3.12, torch, transformers 5.17, no
# bitsandbytes); carried as .whl/ (git-ignored). See the README, "GPU validation".
WHEEL_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
gpu-wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(WHEEL_PLATFORMS) -d .whl transformers==5.23.0 peft==0.21.2 bitsandbytes==0.50.2

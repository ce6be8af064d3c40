# misp-dpo: `make mine` runs the demo pipeline, `make train` fits the demo VLM and trains it on the
# mined negatives, `make eval` compares base and trained, `make test` runs the tests.
# Every target that needs Python depends on `install`, which builds .venv from nothing (idempotent).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIPELINE ?= configs/demo.toml
RUNS ?= runs/demo
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install mine train eval report test test-fast lint bench gpu-check clean

install: $(STAMP)

# torch + torchvision first: on a CPU machine a bare CPU torch breaks torchvision (and open_clip).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch torchvision
	$(BIN)/python -m pip install --quiet -e '.[cpu,train,dev,ray]'
	touch $(STAMP)

# Headless Chromium renders the HTML report in tests (Debian package; skipped where apt is unavailable).
$(VENV)/.chromium: | $(STAMP)
	command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  { [ "$$(id -u)" = 0 ] && SUDO= || SUDO=sudo; $$SUDO apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }; } || true
	touch $@

mine: install
	$(BIN)/misp-dpo run $(PIPELINE) --until report

# First fits the demo's small LLaVA that sees (fit-vlm, skipped once done), then trains it on the
# mined negatives: the same settings as configs/demo.toml's [fit-vlm] and [train].
train: install
	$(BIN)/misp-dpo fit-vlm --corpus $(RUNS)/synth --clip $(RUNS)/clip --out $(RUNS)/vlm
	$(BIN)/misp-dpo train --negatives $(RUNS)/negatives --model $(RUNS)/vlm --out $(RUNS)/dpo \
	  --lr 1e-3 --max-steps 100 --batch-size 4

# Base vs trained on the demo's held-out POPE probes and preference pairs (after `make train`);
# the adapter names its base model, so no --model is needed. Then the demo report is rendered again
# with an Evaluation section, into report-eval/ (report/ stays as `make mine` made it, so a rerun
# of `make mine` still finds it complete).
eval: install
	$(BIN)/misp-dpo eval --adapter $(RUNS)/dpo/adapter --probes $(RUNS)/synth/probes.parquet \
	  --pairs $(RUNS)/synth/heldout_pairs.parquet --out $(RUNS)/eval
	$(BIN)/misp-dpo report --negatives $(RUNS)/negatives --attributes $(RUNS)/synth/attributes.parquet \
	  --limit 50 --eval $(RUNS)/eval --out $(RUNS)/report-eval --overwrite

test: install $(VENV)/.chromium
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check misp_dpo tests bench
	$(BIN)/ruff format --check misp_dpo tests bench
	$(BIN)/mypy

bench: install
	$(BIN)/python -m pip install --quiet -e '.[cpu,train,dev,bench]'
	for script in $(filter-out bench/gpu_check.py,$(wildcard bench/*.py)); do \
	  echo "== $$script"; $(BIN)/python $$script || exit 1; done

# The CUDA paths on an NVIDIA GPU machine (exits 2 without one; `--cpu-smoke` runs them on the CPU).
gpu-check: install
	$(BIN)/python bench/gpu_check.py

clean:
	rm -rf runs .pytest_cache .ruff_cache .mypy_cache build *.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +

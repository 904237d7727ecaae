# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.petctl-installed
BENCH_STAMP := $(VENV)/.petctl-bench-installed
# The CUDA builds run on the CPU too; pip resolves them from the local wheel cache on dev machines.
TORCH   ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv demo test test-fast bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH) -e '.[test]'
	touch $(STAMP)

# The main job: the whole method end to end on the embedded synthetic cohort (report in demo-out/).
demo: $(STAMP)
	$(BIN)/petctl demo --out demo-out

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m 'not slow and not slurm'

# The bench extra (nnU-Net v2, the patch_sampling baseline) is installed on first use.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	@for b in bench/[!_]*.py; do echo "== $$b"; $(BIN)/python $$b --quick || exit 1; done

clean:
	rm -rf $(VENV) demo-out

# Two commands a newcomer needs: `make demo` and `make test`. Each sets up .venv itself.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# torch first, pinned: an unpinned torch (or one pulled in by a dependency) resolves to a multi-GB CUDA build.
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: venv demo test clean bench-solver bench-importance

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# The demo: train a ResNet-20 on scikit-learn's digits (reused if already trained), then compress it
# for the `cpu` target to half its measured latency. Prints the before/after table and the report path.
DEMO_WEIGHTS := runs/demo/resnet20-digits.pt
demo: $(STAMP)
	@test -f $(DEMO_WEIGHTS) || $(BIN)/compress train --model resnet20 --data digits --epochs 8 --out $(DEMO_WEIGHTS)
	$(BIN)/compress --model resnet20 --weights $(DEMO_WEIGHTS) --data digits --target cpu --speedup 2 \
		--out runs/demo/compress-$$(date -u +%Y%m%dT%H%M%SZ)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Issue 3's benches (results committed in bench/results/). Trained weights are cached in runs/bench/.
bench-solver: $(STAMP)
	$(BIN)/python bench/solver_resnet56.py --epochs 12

bench-importance: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python bench/importance_accuracy.py

clean:
	rm -rf $(VENV) runs .pytest_cache

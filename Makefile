# Two commands a newcomer needs: `make demo` and `make test`. Each sets up .venv itself.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# torch first, pinned: an unpinned torch (or one pulled in by a dependency) resolves to a multi-GB CUDA build.
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: venv demo test clean bench bench-quick bench-solver bench-importance bench-shapley bench-ranking bench-latency \
	bench-teacher

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

# The peer benchmark (issue 6): compressor vs uniform-l1, torch-pruning-global, halp-knapsack, itpruner at
# measured latency budgets. The full grid's rows are kept in bench/results/rows/ (committed; a stopped run
# resumes, from a fresh clone too; delete the folder to start over); bench-quick's rows in runs/bench/peers/.
# Tables and Pareto plots land in bench/results/ (quick: bench/results/quick/). bench-quick: ResNet-20 on digits,
# seed 0, both budgets, all six methods (4.2 min from a fresh clone on 2 cores, measured).
bench: $(STAMP)
	$(BIN)/python -m bench.peers

bench-quick: $(STAMP)
	$(BIN)/python -m bench.peers --quick

# Other benches (results committed in bench/results/). Trained weights are cached in runs/bench/.
# Run them alone: another process on a 2-core machine distorts both timings and threads.
bench-solver: $(STAMP)
	$(BIN)/python bench/solver_resnet56.py --epochs 12

bench-importance: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python bench/importance_accuracy.py

# Shapley values: fast path vs the naive estimator, same permutations (ResNet-56, ~7 min on 2 cores).
bench-shapley: $(STAMP)
	$(BIN)/python bench/shapley_speed.py

# Accuracy kept by shapley / taylor / l1 / random under one plan, no fine-tune (~30 min on 2 cores).
bench-ranking: $(STAMP)
	$(BIN)/python bench/ranking_quality.py

# Latency model fidelity (held-out MAPE) and the closed loop at 50%/70% budgets on the cpu target (~15 min).
bench-latency: $(STAMP)
	$(BIN)/python bench/latency_model.py

# Fine-tuning with the teacher's logits replayed from the cache vs run on every batch, side by side
# (ResNet-56 and MobileNetV2 on shapes, 2 rounds; ~20 min on 2 cores).
bench-teacher: $(STAMP)
	$(BIN)/python bench/teacher_logits.py

clean:
	rm -rf $(VENV) runs .pytest_cache

"""The peer benchmark (issue 6): this project against the methods users would pick instead.

Every method gets the same trained network, the same *measured* latency budget on the same
target, the same fine-tuning recipe and epochs, and the same final measurement, side by side in
one run. Layout:

- ``context.py``: what one (model, data, seed) cell shares: data, trained weights, groups, the
  backend, the measured baseline, and the measure/prune/fine-tune helpers every method uses.
- ``bisection.py``: the measured search most peers need (a knob bisected until the measured
  latency meets the budget).
- ``methods.py``: the registry, name -> method (``compressor``, ``uniform-l1``, ...), one small
  function per peer; HALP's knapsack lives in ``halp.py``, torch-pruning's pruner in
  ``torch_pruning_global.py``.
- ``grid.py``: which rows a run covers (``--quick`` or the full grid) and the resumable row cache.
- ``results.py``: ``bench/results/summary.json`` (the contract), README.md tables, Pareto plots.
- ``findings.md``: the written reading of the committed rows, embedded in bench/results/README.md;
  rewrite it when the rows change.

Run from the repository root: ``python -m bench.peers [--quick]`` (``make bench`` / ``make bench-quick``).
"""

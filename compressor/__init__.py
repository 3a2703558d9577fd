"""Prune a trained CNN until its latency, measured on the target device, fits a budget.

Public API (DESIGN.md):
    nhsic(x, y)                                normalised HSIC with a linear kernel (linear CKA)
    shapley_values(value_fn, n, permutations)  batched permutation-sampling Shapley estimator
    compress(...)                              the whole job; returns the report dict
    load_pruned_model(plan)                    reload a pruned model from its plan + safetensors
"""
from compressor.api import compress, load_pruned_model
from compressor.importance import nhsic
from compressor.shapley import shapley_values

__all__ = ["compress", "load_pruned_model", "nhsic", "shapley_values"]
__version__ = "0.1.0"

"""Shared by the bench scripts: trained weights (cached), run folders, result files.

Bench scripts are plain programs (``python bench/NAME.py``); each writes
``bench/results/NAME.json`` (the numbers) and ``NAME.md`` (the table) atomically.
Everything they need is generated or trained here from fixed seeds: no downloads.
"""
from __future__ import annotations

import importlib.metadata
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python bench/x.py` from a checkout without installing
    sys.path.insert(0, str(REPO))

from deploy.atomic_io import atomic_write_text  # noqa: E402
from deploy.cpu_info import cpu_model, usable_cores  # noqa: E402

RESULTS = REPO / "bench" / "results"
WORK = REPO / "runs" / "bench"   # ignored by git: weights and run folders


DEFAULT_TRAIN_LR = 0.05


@dataclass(frozen=True)
class TrainRecipe:
    """How a bench network is trained from scratch. The defaults are the recipe the first cached
    weights were trained with (no warm-up, every BN scale at 1), so their file names stay valid."""

    lr: float = DEFAULT_TRAIN_LR
    warmup_epochs: float = 0.0
    zero_init_residual: bool = False

    def tag(self) -> str:
        """This recipe's part of a cache or row name: empty at the defaults (those names predate it)."""
        return ("" if self.lr == DEFAULT_TRAIN_LR else f"-lr{self.lr:g}") + \
            (f"-wu{self.warmup_epochs:g}" if self.warmup_epochs else "") + ("-zi" if self.zero_init_residual else "")


def trained_weights(model: str, data: str, *, epochs: int, seed: int = 0,
                    recipe: TrainRecipe = TrainRecipe()) -> Path:
    """Train ``model`` on ``data`` once and reuse the state_dict on later bench runs."""
    import torch

    from compressor.data import load_data
    from compressor.model_loading import build_model, save_weights
    from compressor.models.initialisation import zero_init_residuals_
    from compressor.training import evaluate, train

    path = weights_path(model, data, epochs=epochs, seed=seed, recipe=recipe)
    if path.exists():
        return path
    torch.manual_seed(seed)
    splits = load_data(data, seed=seed)
    net = build_model(model, num_classes=splits.num_classes, in_channels=splits.in_channels)
    if recipe.zero_init_residual:
        zero_init_residuals_(net)
    started = time.perf_counter()
    train(net, splits, epochs=epochs, lr=recipe.lr, seed=seed, warmup_epochs=recipe.warmup_epochs)
    seconds = time.perf_counter() - started
    accuracy = evaluate(net, splits.val_x, splits.val_y)
    print(f"trained {model} on {data} for {epochs} epochs in {seconds:.0f} s: val accuracy {accuracy:.2%}", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(net, path)
    # How long training took, for benches that report their time from scratch (weights cached before
    # this sidecar existed have none: their training time is unknown, not zero).
    atomic_write_text(training_record_path(path), json.dumps(
        {"train_s": round(seconds, 2), "val_accuracy": accuracy, "threads": torch.get_num_threads(),
         "trained_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2) + "\n")
    return path


def weights_path(model: str, data: str, *, epochs: int, seed: int = 0, recipe: TrainRecipe = TrainRecipe()) -> Path:
    """Where `trained_weights` keeps (model, data, epochs, seed, recipe)'s state_dict."""
    return WORK / "weights" / f"{model}-{data.replace(':', '_')}-e{epochs}-s{seed}{recipe.tag()}.pt"


def training_record_path(weights: Path) -> Path:
    """The JSON beside trained weights that says how long they took to train."""
    return weights.with_suffix(".train.json")


def machine() -> dict[str, Any]:
    """This host: the CPU, its usable cores and the versions that decide what a bench trains and times
    (a second sitting may resolve newer ones, so results record them)."""
    return {"cpu": cpu_model(), "cores": usable_cores(), "python": platform.python_version(),
            **{key: _version(package) for key, package in (("torch", "torch"), ("onnxruntime", "onnxruntime"),
                                                           ("onnx", "onnx"), ("torch_pruning", "torch-pruning"),
                                                           ("numpy", "numpy"))}}


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def write_result(name: str, payload: dict, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"bench": name, "generated_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "machine": machine(), **payload}
    atomic_write_text(RESULTS / f"{name}.json", json.dumps(payload, indent=2) + "\n")
    atomic_write_text(RESULTS / f"{name}.md", markdown)
    print(f"wrote {RESULTS / name}.json and .md", flush=True)

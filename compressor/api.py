"""The job as Python functions: `compress(...)` and `load_pruned_model(...)`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from compressor.errors import BadInput


def compress(*, model: str, data: str, target: str = "cpu", latency_ms: float | str | None = None,
             speedup: float | str | None = None, flops: float | str | None = None,
             params: float | str | None = None, out: str | Path | None = None, quiet: bool = True,
             config_file: str | Path | None = None, **options: Any) -> dict:
    """Run the compression job and return the report (the same dict as report.json).

    Keyword options are the CLI's long options with underscores: weights, input_size,
    finetune_epochs, calib_size, seed, importance, beta_per_layer, nhsic_estimator,
    concentration_weight, ranking, utility, max_iterations, batch_size,
    warmup, iterations, min_keep_ratio, force, resume. Unlike the CLI, no ./compress.yaml
    is read unless `config_file` names one. `report["met"]` says whether the budget was met.

        >>> report = compress(model="resnet20", weights="w.pt", data="digits", speedup=2)
    """
    from compressor.console import StageConsole
    from compressor.job_config import build_job_config
    from compressor.pipeline import run_job

    flags = {"model": model, "data": data, "target": target, "latency_ms": latency_ms, "speedup": speedup,
             "flops": flops, "params": params, "out": out, **options}
    config_path = Path(config_file) if config_file else Path("/nonexistent/compress.yaml")
    config = build_job_config(flags, config_path=config_path)
    return run_job(config, StageConsole(quiet=quiet))


def load_pruned_model(plan_file: str | Path) -> torch.nn.Module:
    """Rebuild a pruned model from `pruned.plan.json` + `pruned.safetensors` (no pickle).

    The plan names the original architecture; it is built fresh, pruned to the saved
    channel plan, and the saved state_dict is loaded strictly.

        >>> model = load_pruned_model("runs/x/pruned.plan.json").eval()
    """
    from compressor.model_loading import build_model
    from compressor.pruning import load_pruned

    plan_file = Path(plan_file)
    if not plan_file.exists():
        raise BadInput(f"pruned plan not found: {plan_file}")
    try:
        meta = json.loads(plan_file.read_text())
        spec, num_classes, in_channels = meta["model_spec"], meta["num_classes"], meta["in_channels"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise BadInput(f"{plan_file}: not a pruned-model plan") from None
    base = build_model(spec, num_classes=num_classes, in_channels=in_channels)
    return load_pruned(base, plan_file)

"""Physical pruning with torch-pruning, and saving / reloading the pruned network.

A pruned checkpoint is two files, no pickle anywhere:

* ``pruned.plan.json``: format version, model spec, num_classes, in_channels,
  input shape and the `ChannelPlan` (kept channel indices per group);
* ``pruned.safetensors``: the pruned state_dict (BN running stats included).

To reload, build the *original* architecture and let `load_pruned` cut it the
same way before loading the weights strictly::

    from compressor.models import create_model
    from compressor.pruning import load_pruned
    m = load_pruned(create_model("resnet20", num_classes=10, in_channels=1), "runs/x/pruned")

(``"runs/x/pruned"`` may also be the folder holding the two files, or either file.)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from compressor.channel_plan import ChannelPlan
from compressor.errors import BadInput
from compressor.groups import groups_from_graph, root_pruning_group, trace
from deploy.atomic_io import atomic_path, atomic_write_text

FORMAT_VERSION = 1
PLAN_SUFFIX = ".plan.json"
WEIGHTS_SUFFIX = ".safetensors"
DEFAULT_STEM = "pruned"


def apply_plan(model: nn.Module, example_input: Any, plan: ChannelPlan) -> nn.Module:
    """Prune `model` in place to the channels `plan` keeps and return it (deep-copy first to keep the original).

    Groups absent from the plan are kept whole. Indices are in each group's original
    index space. One dependency graph serves all groups: groups never share an
    output-channel space, and torch-pruning re-derives concat offsets from the
    current sizes before each group, so cutting one group never shifts another's
    indices (tests/test_pruning.py checks this on a concat net).
    """
    if not isinstance(plan, ChannelPlan):
        raise BadInput(f"apply_plan needs a ChannelPlan, got {type(plan).__name__}")
    dg, order = trace(model, example_input)
    groups = {g.name: g for g in groups_from_graph(dg, order)}
    plan.validate({name: g.channels for name, g in groups.items()})
    modules = dict(model.named_modules())
    pending = []
    for name, kept in plan.kept.items():
        g = groups[name]
        drop = sorted(set(range(g.channels)) - set(kept))
        if not drop:
            continue
        if not g.prunable:
            raise BadInput(f"group {name!r} cannot be pruned ({g.reason})")
        pending.append((order.get(modules[name], 0), name, drop))
    for _, name, drop in sorted(pending):
        root_pruning_group(dg, modules[name], drop).prune()
    for name, kept in plan.kept.items():  # torch-pruning must have cut exactly what was asked
        width = dg.get_pruner_of_module(modules[name]).get_out_channels(modules[name])
        if width != len(kept):
            raise RuntimeError(f"pruning group {name!r} left {width} channels instead of {len(kept)}")
    return model


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share storage (tied weights, views)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_pruned(
    model_pruned: nn.Module,
    plan: ChannelPlan,
    out_dir: str | Path,
    *,
    model_spec: str,
    num_classes: int,
    in_channels: int,
    input_shape: tuple[int, ...] | list[int],
    extra: dict | None = None,
    stem: str = DEFAULT_STEM,
) -> dict[str, Path]:
    """Write ``<stem>.plan.json`` and ``<stem>.safetensors`` into `out_dir`; returns {"plan", "weights"} paths."""
    out = Path(out_dir)
    shape = [int(v) for v in input_shape]
    if len(shape) != 3 or min(shape) < 1:
        raise BadInput(f"input_shape must be [C, H, W], got {list(input_shape)}")
    doc = {
        "format_version": FORMAT_VERSION,
        "model_spec": str(model_spec),
        "num_classes": int(num_classes),
        "in_channels": int(in_channels),
        "input_shape": shape,
        "plan": plan.to_dict(),
        "extra": dict(extra or {}),
    }
    weights = out / f"{stem}{WEIGHTS_SUFFIX}"
    with atomic_path(weights) as tmp:
        save_file(_state_tensors(model_pruned), str(tmp), metadata={"format": "pt"})
    plan_path = atomic_write_text(out / f"{stem}{PLAN_SUFFIX}", json.dumps(doc, indent=1) + "\n")
    return {"plan": plan_path, "weights": weights}


def _resolve(path_prefix_or_dir: str | Path) -> tuple[Path, Path]:
    p = Path(path_prefix_or_dir)
    if p.is_dir():
        p = p / DEFAULT_STEM
    else:
        for suffix in (PLAN_SUFFIX, WEIGHTS_SUFFIX):
            if p.name.endswith(suffix):
                p = p.with_name(p.name[: -len(suffix)])
                break
    return p.with_name(p.name + PLAN_SUFFIX), p.with_name(p.name + WEIGHTS_SUFFIX)


def read_plan_file(path_prefix_or_dir: str | Path) -> dict:
    """The saved plan document (format version checked, plan parsed into a ChannelPlan under "plan")."""
    plan_path, _ = _resolve(path_prefix_or_dir)
    if not plan_path.is_file():
        raise BadInput(f"pruned-model plan not found: {plan_path}")
    try:
        doc = json.loads(plan_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BadInput(f"{plan_path} is not a readable JSON plan: {exc}") from exc
    if not isinstance(doc, dict) or "plan" not in doc:
        raise BadInput(f"{plan_path} is not a pruned-model plan (no 'plan' key)")
    if doc.get("format_version") != FORMAT_VERSION:
        raise BadInput(f"{plan_path}: unsupported format_version {doc.get('format_version')!r}")
    shape = doc.get("input_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape)):
        raise BadInput(f"{plan_path}: input_shape must be [C, H, W], got {shape!r}")
    doc = dict(doc)
    doc["plan"] = ChannelPlan.from_dict(doc["plan"])
    return doc


def load_pruned(base_model: nn.Module, path_prefix_or_dir: str | Path, *, example_input: Any = None) -> nn.Module:
    """Cut the freshly built original architecture `base_model` by the saved plan and load the saved weights.

    The model is modified in place and returned, in the train/eval mode it came in.
    """
    doc = read_plan_file(path_prefix_or_dir)
    _, weights_path = _resolve(path_prefix_or_dir)
    if not weights_path.is_file():
        raise BadInput(f"pruned-model weights not found: {weights_path}")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BadInput(f"{weights_path} is not a readable safetensors file: {exc}") from exc
    if example_input is None:
        example_input = torch.zeros(1, *doc["input_shape"])
    try:
        apply_plan(base_model, example_input, doc["plan"])
    except BadInput as exc:
        raise BadInput(f"saved plan does not fit this architecture: {exc}") from exc
    try:
        base_model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise BadInput(f"saved weights do not match this architecture: {detail}") from exc
    return base_model


__all__ = ["apply_plan", "save_pruned", "load_pruned", "read_plan_file", "FORMAT_VERSION"]

"""Turn a `--model` spec and a `--weights` file into a ready nn.Module.

Spec forms (see `build_model`): a zoo name, `path/to/file.py:factory`,
`pkg.module:factory`, `torchvision:NAME`, `timm:NAME`. Every failure a user can
cause is a one-line BadInput, because the CLI turns it into exit code 2.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from compressor.errors import BadInput
from compressor.models import create_model, is_zoo_model, list_models
from deploy.atomic_io import atomic_path

SPEC_FORMS = "a zoo name, path/to/file.py:factory, pkg.module:factory, torchvision:NAME or timm:NAME"


def first_line(exc: BaseException | str, limit: int = 200) -> str:
    """The first non-empty line of an error, shortened: BadInput messages must stay one line."""
    text = str(exc).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def describe_exception(exc: BaseException) -> str:
    msg = first_line(exc)
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _looks_like_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def _import_file(path_text: str) -> Any:
    """Import a .py file by path under a module name unique to its resolved path.

    The file's folder is on sys.path only while it executes, so it can import its
    own siblings without changing the import path for the rest of the run.
    """
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise BadInput(f"file not found: {path_text}")
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    name = f"_compressor_user_{resolved.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise BadInput(f"cannot import {path_text}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up while it executes
    folder = str(resolved.parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:  # SyntaxError, ImportError, SystemExit from a script...
        sys.modules.pop(name, None)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise BadInput(f"cannot import {path_text}: {describe_exception(exc)}") from exc
    finally:
        try:
            sys.path.remove(folder)
        except ValueError:
            pass
    return module


def _import_module(module_name: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise BadInput(f"cannot import module {module_name}: {describe_exception(exc)}") from exc


def resolve_callable(spec: str, *, what: str, forms: str) -> Callable[..., Any]:
    """Resolve `path/to/file.py:name` or `pkg.module:name` (dotted attribute allowed) to a callable.

    `what` names the thing in messages ("model", "data"); `forms` lists accepted spec forms.
    """
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise BadInput(f"malformed {what} spec {spec!r}; expected {forms}")
    if _looks_like_file(target):
        module = _import_file(target)
    elif all(part.isidentifier() for part in target.split(".")):
        module = _import_module(target)
    else:
        raise BadInput(f"malformed {what} spec {spec!r}; expected {forms}")
    obj: Any = module
    for part in attr.split("."):
        if not part.isidentifier():
            raise BadInput(f"malformed {what} spec {spec!r}: {attr!r} is not a Python name")
        if not hasattr(obj, part):
            raise BadInput(f"{target} has no attribute {attr!r} (from {what} spec {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise BadInput(f"{target}:{attr} is not callable (got {type(obj).__name__})")
    return obj


def call_with_accepted(factory: Callable[..., Any], candidates: Mapping[str, Any]) -> Any:
    """Call `factory` with those keyword arguments from `candidates` that its signature accepts."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature: offer everything
        return factory(**candidates)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return factory(**candidates)
    accepted = {
        k: v for k, v in candidates.items()
        if k in params and params[k].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return factory(**accepted)


def _build_torchvision(name: str, num_classes: int, in_channels: int) -> nn.Module:
    try:
        import torchvision.models  # noqa: PLC0415 - optional dependency, only on this branch
    except ImportError as exc:
        raise BadInput("torchvision is not installed (pip install torchvision)") from exc
    if in_channels != 3:
        raise BadInput(f"torchvision:{name} takes 3 input channels, the data has {in_channels}")
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise BadInput(f"torchvision:{name} failed: {describe_exception(exc)}") from exc


def _build_timm(name: str, num_classes: int, in_channels: int) -> nn.Module:
    try:
        import timm  # noqa: PLC0415 - optional dependency, only on this branch
    except ImportError as exc:
        raise BadInput("timm is not installed (pip install timm)") from exc
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise BadInput(f"timm:{name} failed: {describe_exception(exc)}") from exc


def build_model(spec: str, *, num_classes: int, in_channels: int) -> nn.Module:
    """Build the model named by `spec` for `num_classes` outputs and `in_channels` inputs.

    A factory is called with whichever of num_classes / in_channels it accepts, so
    plain `def build(): ...` factories work too (their output is checked later by
    `check_input_shape`). Weights are not loaded here (see `load_weights`).
    """
    spec = (spec or "").strip()
    if not spec:
        raise BadInput(f"empty model spec; expected {SPEC_FORMS}")
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in ("torchvision", "timm"):
        if not rest:
            raise BadInput(f"malformed model spec {spec!r}: missing model name after {prefix}:")
        builder = _build_torchvision if prefix == "torchvision" else _build_timm
        model = builder(rest, num_classes, in_channels)
    elif ":" not in spec:
        if _looks_like_file(spec):
            raise BadInput(f"model spec {spec!r} names a file but no factory; use {spec}:FACTORY")
        if not is_zoo_model(spec):
            raise BadInput(f"unknown zoo model {spec!r}; known models: {', '.join(list_models())} "
                           f"(or use path/to/file.py:factory, pkg.module:factory)")
        model = create_model(spec, num_classes=num_classes, in_channels=in_channels)
    else:
        factory = resolve_callable(spec, what="model", forms=SPEC_FORMS)
        try:
            model = call_with_accepted(factory, {"num_classes": num_classes, "in_channels": in_channels})
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise BadInput(f"model factory {spec} raised {describe_exception(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise BadInput(f"model factory {spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _extract_state_dict(obj: Any, path: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise BadInput(f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict (a dict of tensors)")
    for key in ("state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            obj = inner
            break
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise BadInput(f"checkpoint {path} is not a state_dict: non-tensor entries {', '.join(bad[:3])}"
                       + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""))
    return dict(obj)


def _strip_common_prefix(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Drop a `module.` prefix left by DataParallel/DDP when the model does not use it."""
    prefix = "module."
    if state and not (set(state) & expected) and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _few(keys: list[str]) -> str:
    shown = ", ".join(keys[:3])
    return shown + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def _checkpoint_problem(exc: BaseException) -> str:
    """Why torch.load refused a file, in one line.

    torch's weights_only refusal is a long, multi-paragraph text suggesting weights_only=False,
    which we never do; the useful part is the WeightsUnpickler reason after it.
    """
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        reason = first_line(text.split(marker, 1)[1], limit=120)
        found = re.search(r"GLOBAL ([\w.]+)", reason)
        if found:
            return (f"it pickles Python objects ({found.group(1)}), not just tensors; save model.state_dict() "
                    "instead (weights are loaded with weights_only=True, never running pickled code)")
        return f"not a PyTorch state_dict checkpoint, or a corrupt one ({reason})"
    if isinstance(exc, EOFError):
        return "the file is empty or truncated"
    return f"not a loadable PyTorch checkpoint ({describe_exception(exc)})"


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a state_dict checkpoint into `model` in place (strict: every key and shape must match).

    Accepts a plain state_dict or a dict with a "state_dict" / "model" entry, saved
    by torch.save (read with weights_only=True, never unpickling code) or a
    .safetensors file.
    """
    path_text = str(path)
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"weights file not found: {path_text}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file  # noqa: PLC0415

            obj: Any = load_file(str(p), device="cpu")
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise BadInput(f"cannot read weights {path_text}: {_checkpoint_problem(exc)}") from exc
    expected = model.state_dict()
    state = _strip_common_prefix(_extract_state_dict(obj, path_text), set(expected))
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        raise BadInput(f"weights {path_text} do not match the model: {'; '.join(parts)}")
    mismatched = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if tuple(state[k].shape) != tuple(v.shape)]
    if mismatched:
        raise BadInput(f"weights {path_text} do not match the model: shape mismatch for {_few(mismatched)}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BadInput(f"weights {path_text} do not match the model: {first_line(exc)}") from exc


def save_weights(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save `model.state_dict()` atomically (a crash never leaves half a checkpoint)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def check_input_shape(model: nn.Module, input_shape: tuple[int, int, int]) -> None:
    """Fail early, with one line, when the model cannot classify a [1, C, H, W] input."""
    c, h, w = (int(v) for v in input_shape)
    shape_text = f"{c}x{h}x{w}"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, c, h, w))
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise BadInput(f"model rejects input shape {shape_text}: {describe_exception(exc)}") from exc
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BadInput(f"model rejects input shape {shape_text}: output is {got}, expected a [1, num_classes] tensor")


__all__ = ["build_model", "load_weights", "save_weights", "check_input_shape", "resolve_callable",
           "call_with_accepted", "SPEC_FORMS"]

"""The torch-side deployable artifact: a `torch.export` ExportedProgram saved as `.pt2`.

The torch-cuda backend runs this file, not the ONNX one: it is the same network as the ONNX
export (both are traced from the same pruned model), but runs on PyTorch's own kernels.

Batch dimension: dynamic (any batch >= 1) for plain CNNs. torch.export specialises a traced
size of 1, so a batch-1 example is traced at batch 2; a model that cannot be traced with a
symbolic batch is saved with the example's static shape instead (the metadata says which).

Safety: `torch.export.load` is NOT safe on untrusted files. In torch 2.13 it unpickles payloads
flagged `use_pickle` (torch.load with weights_only=False), custom/opaque constants (pickle.loads),
falls back to weights_only=False for the sample inputs, evaluates symbolic-shape strings with
sympy (eval) and compiles the stored guard code. So `load_program` only opens files this tool
wrote: the archive must carry our metadata entry, contain no other entries than a plain program
has, no pickled payloads, empty sample inputs, no guard code, only aten operators and only
symbolic-shape strings from a small allow-list. Anything else is refused before torch reads it.
"""
from __future__ import annotations

import copy
import io
import json
import logging
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deploy.atomic_io import atomic_path
from deploy.errors import BadInput

log = logging.getLogger("deploy.torch_program")

PROGRAM_FORMAT = "deploy-torch-program"
PROGRAM_VERSION = 1
METADATA_ENTRY = "deploy_program.json"  # stored by torch.export.save under <archive>/extra/

# Entries a program saved by `save_program` consists of (relative to the archive's top folder).
_FIXED_ENTRIES = {
    "archive_format", "archive_version", ".data/version", "byteorder", ".data/serialization_id",
    "models/model.json", "data/weights/model_weights_config.json",
    "data/constants/model_constants_config.json", "data/sample_inputs/model.pt", f"extra/{METADATA_ENTRY}",
}
_PAYLOAD_ENTRY = re.compile(r"data/(weights/weight|constants/tensor)_\d+")
_SYMBOL = r"Symbol\('[a-z]+\d+'(?:, [a-z_]+=(?:True|False))*\)"
_SAFE_EXPR_NAMES = {"FloorDiv", "Mod", "PythonMod", "CleanDiv", "CeilDiv", "Max", "Min", "Integer",
                    "Add", "Mul", "Pow", "True", "False"}
_ALLOWED_TARGET = re.compile(r"torch\.ops\.aten\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+|_operator\.getitem")


@dataclass(frozen=True)
class ProgramInfo:
    """What `save_program` recorded: the input the program takes and how it was traced."""

    input_shape: list[int | str]  # ["batch", C, H, W] when the batch is dynamic
    dynamic_batch: bool
    torch_version: str


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _export(model: torch.nn.Module, example: torch.Tensor, dynamic: bool) -> torch.export.ExportedProgram:
    if not dynamic:
        return torch.export.export(model, (example,))
    # A traced size of 1 is specialised by torch.export; trace at batch >= 2 and declare min 1.
    trace = example if example.shape[0] >= 2 else example.expand(2, *example.shape[1:]).contiguous()
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(model, (trace,), dynamic_shapes=({0: batch},))


def save_program(model: torch.nn.Module, example_input: torch.Tensor, path: str | os.PathLike,
                 *, dynamic_batch: bool = True) -> Path:
    """Export `model` (in eval mode, on the CPU) with torch.export and save it to `path` atomically.

    The batch dimension is dynamic when `dynamic_batch` and the model traces that way, else the
    example's static shape (logged). BadInput if the model cannot be exported at all.
    """
    if not isinstance(example_input, torch.Tensor) or example_input.ndim < 1 or example_input.shape[0] < 1:
        raise BadInput("example_input must be a batched torch.Tensor")
    if not isinstance(model, torch.nn.Module):
        raise BadInput(f"model must be a torch.nn.Module, got {type(model).__name__}")
    final = Path(path)
    # Export a CPU copy when needed so the file loads on any host (weights record their device).
    if any(t.device.type != "cpu" for t in [*model.parameters(), *model.buffers()]):
        model = copy.deepcopy(model).cpu()
    example = example_input.detach().cpu().float()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            dynamic = False
            if dynamic_batch:
                try:
                    program, dynamic = _export(model, example, True), True
                except Exception as exc:  # data-dependent batch handling: fall back to a static shape
                    log.info("dynamic-batch export of %s failed (%s); saving a static batch of %d",
                             type(model).__name__, _one_line(exc), example.shape[0])
            if not dynamic:
                try:
                    program = _export(model, example, False)
                except Exception as exc:
                    raise BadInput(f"torch.export of {type(model).__name__} failed ({_one_line(exc)})") from None
    finally:
        model.train(was_training)
    program.example_inputs = None  # nothing pickled in the file: sample inputs would be
    shape: list[int | str] = ["batch" if dynamic else int(example.shape[0]), *(int(d) for d in example.shape[1:])]
    meta = {"format": PROGRAM_FORMAT, "version": PROGRAM_VERSION, "input_shape": shape,
            "dynamic_batch": dynamic, "torch": torch.__version__}
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={METADATA_ENTRY: json.dumps(meta)})
    with atomic_path(final) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return final


def _safe_expr(expr: str) -> bool:
    """A symbolic-shape string torch would hand to sympy (eval): symbols, integers, arithmetic only."""
    rest = re.sub(_SYMBOL, "s0", expr)
    if not re.fullmatch(r"[A-Za-z0-9_+\-*/(), ]*", rest):
        return False
    return all(name in _SAFE_EXPR_NAMES or re.fullmatch(r"[a-z]+\d+", name)
               for name in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", rest)) and "__" not in rest


def _walk(node: Any, key: str | None = None):
    """(key, value) for every value in a JSON tree, with the key it is stored under."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)
    else:
        yield key, node


def _check_program_json(model: dict) -> str | None:
    """Why the serialized program is not one `save_program` writes, or None."""
    if model.get("guards_code"):
        return "it carries guard code"
    graph = model.get("graph_module", {}).get("graph", {})
    if graph.get("custom_obj_values"):
        return "it carries custom objects"
    for name in model.get("range_constraints", {}):
        if not re.fullmatch(r"[a-z]+\d+", name):
            return f"unexpected symbol {name[:40]!r}"
    for key, value in _walk(model):
        if key == "target" and isinstance(value, str) and not _ALLOWED_TARGET.fullmatch(value):
            return f"operator {value[:60]!r} is not an aten operator"
        if key == "expr_str" and isinstance(value, str) and not _safe_expr(value):
            return f"unexpected shape expression {value[:60]!r}"
    return None


def _check_archive(path: Path) -> ProgramInfo:
    """Validate the archive (see the module docstring) without letting torch read it."""
    refuse = f"{path}: not a torch program written by this tool"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            tops = {n.split("/", 1)[0] for n in names}
            if len(tops) != 1 or len(set(names)) != len(names) or any("/" not in n for n in names):
                raise BadInput(f"{refuse} (unexpected archive layout)")
            top = tops.pop() + "/"
            rel = {n[len(top):]: n for n in names}
            for entry in rel:
                if entry not in _FIXED_ENTRIES and not _PAYLOAD_ENTRY.fullmatch(entry):
                    raise BadInput(f"{refuse} (unexpected entry {entry[:60]!r})")
            if f"extra/{METADATA_ENTRY}" not in rel or "models/model.json" not in rel:
                raise BadInput(f"{refuse} (no {METADATA_ENTRY})")
            meta = json.loads(archive.read(rel[f"extra/{METADATA_ENTRY}"]))
            if not isinstance(meta, dict) or meta.get("format") != PROGRAM_FORMAT:
                raise BadInput(f"{refuse} (bad {METADATA_ENTRY})")
            if meta.get("version") != PROGRAM_VERSION:
                raise BadInput(f"{path}: torch program version {meta.get('version')!r} is not supported "
                               f"(expected {PROGRAM_VERSION}); export it again")
            sample = rel.get("data/sample_inputs/model.pt")
            if sample is not None and archive.getinfo(sample).file_size != 0:
                raise BadInput(f"{refuse} (it stores pickled sample inputs)")
            for config in ("data/weights/model_weights_config.json", "data/constants/model_constants_config.json"):
                if config not in rel:
                    raise BadInput(f"{refuse} (no {config})")
                payloads = json.loads(archive.read(rel[config])).get("config", {})
                for fqn, payload in payloads.items():
                    if payload.get("use_pickle") or not re.fullmatch(r"(weight|tensor)_\d+", str(payload.get("path_name"))):
                        raise BadInput(f"{refuse} ({fqn[:60]} is a pickled object)")
            reason = _check_program_json(json.loads(archive.read(rel["models/model.json"])))
            if reason:
                raise BadInput(f"{refuse} ({reason})")
    except BadInput:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
        raise BadInput(f"{path}: not a readable torch program ({_one_line(exc)})") from None
    shape = meta.get("input_shape")
    if not isinstance(shape, list) or not shape or not all(
            (isinstance(d, int) and d > 0) or d == "batch" for d in shape):
        raise BadInput(f"{refuse} (bad input_shape in {METADATA_ENTRY})")
    return ProgramInfo(input_shape=shape, dynamic_batch=bool(meta.get("dynamic_batch")),
                       torch_version=str(meta.get("torch", "")))


def read_program_info(path: str | os.PathLike) -> ProgramInfo:
    """The metadata of a program written by `save_program`; BadInput if missing, corrupt or foreign."""
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"torch program not found: {p}")
    return _check_archive(p)


def open_program(path: str | os.PathLike) -> tuple[torch.nn.Module, ProgramInfo]:
    """(`.module()` of the saved program, its metadata). Only files `save_program` wrote are loaded."""
    info = read_program_info(path)
    try:
        program = torch.export.load(os.fspath(path))
        module = program.module()
    except Exception as exc:
        raise BadInput(f"{path}: torch cannot load the program ({_one_line(exc)})") from None
    return module, info


def load_program(path: str | os.PathLike) -> torch.nn.Module:
    """The runnable module of a program written by `save_program` (inference-only graph: it was
    exported in eval mode; exported modules do not support .eval()/.train())."""
    return open_program(path)[0]

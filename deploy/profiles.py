"""Target profiles: one YAML file per device, saying how to build and measure there.

A profile is configuration a user can edit, so every field is validated here and a
mistake is reported as one line naming the file and the field, before any work starts.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deploy.errors import BadInput

BACKENDS = ("onnxruntime-cpu", "onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt", "torch-cuda")
PRECISIONS = ("fp32", "fp16", "int8")
TELEMETRY_SOURCES = ("none", "nvml", "jetson")
DEVICE_KINDS = ("cpu", "jetson", "nvidia-gpu")
# Keys a device_match may use besides "kind"; each is a case-insensitive whole-word test
# (see name_matches), so "A10" does not match "A100" and "L4" does not match "L40S".
DEVICE_MATCH_KEYS = ("model_contains", "name_contains")
GPU_BACKENDS = ("onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt", "torch-cuda")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class TargetProfile:
    """Everything the pipeline needs to know about one target device."""

    name: str
    description: str
    device_match: dict[str, str]
    backend: str
    precision: str
    batch_size: int
    input_shape: tuple[int, int, int] | None  # [C, H, W]; None means "take it from the data"
    channel_alignment: int
    warmup: int
    iterations: int
    max_cv: float
    telemetry: str
    power_mode: str | None = None  # Jetson nvpmodel mode name, e.g. "MAXN"
    power_mode_id: int | None = None  # its nvpmodel number where known
    datasheet: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    threads: int | None = None  # CPU backends: intra-op threads; None = all physical cores
    # Backend-specific switches passed to its factory (e.g. torch-cuda: cuda_graph, channels_last;
    # tensorrt: cuda_graph, workspace_mb). Each backend validates its own.
    backend_options: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (lists instead of tuples, source as a string)."""
        d = asdict(self)
        d["input_shape"] = list(self.input_shape) if self.input_shape is not None else None
        d["aliases"] = list(self.aliases)
        d["source"] = str(self.source) if self.source is not None else None
        return d


# Defaults for optional fields; name, device_match, backend and precision are required.
_DEFAULTS: dict[str, Any] = {
    "description": "",
    "batch_size": 1,
    "input_shape": None,
    "channel_alignment": 1,
    "warmup": 50,
    "iterations": 300,
    "max_cv": 0.1,
    "telemetry": "none",
    "power_mode": None,
    "power_mode_id": None,
    "datasheet": {},
    "aliases": [],
    "threads": None,
    "backend_options": {},
}
_REQUIRED = ("name", "device_match", "backend", "precision")
_KNOWN = set(_REQUIRED) | set(_DEFAULTS)


def profiles_dir() -> Path:
    """Folder of the shipped profiles (repo-root `profiles/`), or $COMPRESS_PROFILES_DIR."""
    env = os.environ.get("COMPRESS_PROFILES_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "profiles"


def name_matches(needle: str, haystack: str) -> bool:
    """True when `needle` occurs in `haystack` as whole words (case-insensitive)."""
    pattern = r"(?<![A-Za-z0-9])" + re.escape(needle.strip()) + r"(?![A-Za-z0-9])"
    return re.search(pattern, haystack, flags=re.IGNORECASE) is not None


def _is_path_spec(spec: str) -> bool:
    return spec.lower().endswith((".yaml", ".yml")) or os.sep in spec or "/" in spec


def load_profile(name_or_path: str) -> TargetProfile:
    """Load a profile by name (or alias) from profiles_dir(), or from an explicit YAML path."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise BadInput("target must be a profile name or a path to a .yaml file")
    spec = name_or_path.strip()
    if _is_path_spec(spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise BadInput(f"target profile file not found: {path}")
        return _load_file(path)
    folder = profiles_dir()
    direct = folder / f"{spec}.yaml"
    if direct.is_file():
        return _load_file(direct)
    profiles = list_profiles()
    for profile in profiles:
        if spec in profile.aliases:
            return profile
    names = sorted(p.name for p in profiles)
    aliases = sorted(a for p in profiles for a in p.aliases)
    known = ", ".join(names) + (f" (aliases: {', '.join(aliases)})" if aliases else "")
    raise BadInput(f"unknown target '{spec}'; available: {known or f'none in {folder}'}")


def list_profiles() -> list[TargetProfile]:
    """All profiles in profiles_dir(), sorted by name. A malformed one raises BadInput."""
    folder = profiles_dir()
    if not folder.is_dir():
        return []
    files = sorted({*folder.glob("*.yaml"), *folder.glob("*.yml")})
    return sorted((_load_file(f) for f in files), key=lambda p: p.name)


def _load_file(path: Path) -> TargetProfile:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BadInput(f"{path}: cannot read target profile ({exc.strerror or exc})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise BadInput(f"{path}: malformed YAML{where}") from None
    return parse_profile(raw, source=path)


def parse_profile(raw: Any, *, source: Path | None = None) -> TargetProfile:
    """Validate a profile mapping field by field and build the dataclass."""
    where = str(source) if source is not None else "<profile>"

    def fail(field_name: str, why: str) -> BadInput:
        return BadInput(f"{where}: field '{field_name}' {why}")

    if not isinstance(raw, dict):
        raise BadInput(f"{where}: a target profile must be a YAML mapping")
    unknown = sorted(set(map(str, raw)) - _KNOWN)
    if unknown:
        raise fail(unknown[0], f"is not a profile field (known: {', '.join(sorted(_KNOWN))})")
    for key in _REQUIRED:
        if raw.get(key) is None:
            raise fail(key, "is missing")
    data = {**_DEFAULTS, **{k: v for k, v in raw.items() if v is not None or k in ("input_shape", "power_mode")}}

    name = data["name"]
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise fail("name", "must be a name of letters, digits, '.', '_' or '-'")
    if not isinstance(data["description"], str):
        raise fail("description", "must be a string")

    device_match = _parse_device_match(data["device_match"], fail)
    backend = _choice(data["backend"], BACKENDS, "backend", fail)
    precision = _choice(data["precision"], PRECISIONS, "precision", fail)
    telemetry = _choice(data["telemetry"], TELEMETRY_SOURCES, "telemetry", fail)
    if backend in GPU_BACKENDS and device_match["kind"] == "cpu":
        raise fail("backend", f"{backend} needs an NVIDIA device, but device_match.kind is cpu")
    if telemetry == "nvml" and device_match["kind"] != "nvidia-gpu":
        raise fail("telemetry", "nvml needs device_match.kind nvidia-gpu")
    if telemetry == "jetson" and device_match["kind"] != "jetson":
        raise fail("telemetry", "jetson needs device_match.kind jetson")

    batch_size = _positive_int(data["batch_size"], "batch_size", fail)
    channel_alignment = _positive_int(data["channel_alignment"], "channel_alignment", fail)
    iterations = _positive_int(data["iterations"], "iterations", fail)
    warmup = data["warmup"]
    if not _is_int(warmup) or warmup < 0:
        raise fail("warmup", f"must be a non-negative integer (got {warmup!r})")

    input_shape = data["input_shape"]
    if input_shape is not None:
        if not isinstance(input_shape, list) or len(input_shape) != 3 or not all(_is_int(v) and v > 0 for v in input_shape):
            raise fail("input_shape", f"must be [C, H, W] of positive integers or null (got {input_shape!r})")
        input_shape = tuple(input_shape)

    max_cv = data["max_cv"]
    if isinstance(max_cv, bool) or not isinstance(max_cv, (int, float)) or not 0 < max_cv <= 1:
        raise fail("max_cv", f"must be a number in (0, 1] (got {max_cv!r})")

    power_mode = data["power_mode"]
    if power_mode is not None and (not isinstance(power_mode, str) or not power_mode.strip()):
        raise fail("power_mode", "must be an nvpmodel mode name or null")
    power_mode_id = data["power_mode_id"]
    if power_mode_id is not None and (not _is_int(power_mode_id) or power_mode_id < 0):
        raise fail("power_mode_id", "must be a non-negative integer or null")
    if (power_mode is not None or power_mode_id is not None) and device_match["kind"] != "jetson":
        raise fail("power_mode", "applies only to device_match.kind jetson")

    datasheet = _parse_datasheet(data["datasheet"], fail)
    backend_options = data["backend_options"]
    if not isinstance(backend_options, dict) or not all(
            isinstance(k, str) and (v is None or isinstance(v, (bool, int, float, str))) for k, v in backend_options.items()):
        raise fail("backend_options", "must be a mapping of names to plain values (true/false, numbers, strings)")

    threads = data["threads"]
    if threads is not None:
        threads = _positive_int(threads, "threads", fail)
        if backend != "onnxruntime-cpu":
            raise fail("threads", "applies only to the onnxruntime-cpu backend")

    aliases = data["aliases"]
    if not isinstance(aliases, list) or not all(isinstance(a, str) and _NAME_RE.match(a) for a in aliases):
        raise fail("aliases", "must be a list of names")
    if name in aliases:
        raise fail("aliases", f"repeats the profile's own name '{name}'")

    return TargetProfile(
        name=name,
        description=data["description"],
        device_match=device_match,
        backend=backend,
        precision=precision,
        batch_size=batch_size,
        input_shape=input_shape,
        channel_alignment=channel_alignment,
        warmup=warmup,
        iterations=iterations,
        max_cv=float(max_cv),
        telemetry=telemetry,
        power_mode=power_mode,
        power_mode_id=power_mode_id,
        datasheet=datasheet,
        aliases=tuple(aliases),
        threads=threads,
        backend_options=dict(backend_options),
        source=source,
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: Any, name: str, fail) -> int:
    if not _is_int(value) or value <= 0:
        raise fail(name, f"must be a positive integer (got {value!r})")
    return value


def _choice(value: Any, allowed: tuple[str, ...], name: str, fail) -> str:
    if value not in allowed:
        raise fail(name, f"must be one of {', '.join(allowed)} (got {value!r})")
    return value


def _parse_device_match(value: Any, fail) -> dict[str, str]:
    if not isinstance(value, dict):
        raise fail("device_match", "must be a mapping with at least 'kind'")
    kind = value.get("kind")
    if kind not in DEVICE_KINDS:
        raise fail("device_match", f"kind must be one of {', '.join(DEVICE_KINDS)} (got {kind!r})")
    out = {"kind": kind}
    for key, val in value.items():
        if key == "kind":
            continue
        if key not in DEVICE_MATCH_KEYS:
            raise fail("device_match", f"has unknown key '{key}' (known: kind, {', '.join(DEVICE_MATCH_KEYS)})")
        if not isinstance(val, str) or not val.strip():
            raise fail("device_match", f"{key} must be a non-empty string")
        out[key] = val
    if kind == "jetson" and "name_contains" in out:
        raise fail("device_match", "a jetson is matched by model_contains, not name_contains")
    if kind == "nvidia-gpu" and "model_contains" in out:
        raise fail("device_match", "an nvidia-gpu is matched by name_contains, not model_contains")
    if kind == "cpu" and len(out) > 1:
        raise fail("device_match", "kind cpu takes no other keys")
    return out


def _parse_datasheet(value: Any, fail) -> dict[str, Any]:
    """Numbers (or null where unknown) plus free-text strings such as note and source."""
    if not isinstance(value, dict):
        raise fail("datasheet", "must be a mapping")
    for key, val in value.items():
        if not isinstance(key, str):
            raise fail("datasheet", f"has a non-string key {key!r}")
        if val is None or isinstance(val, str):
            continue
        if isinstance(val, bool) or not isinstance(val, (int, float)) or val < 0:
            raise fail("datasheet", f"{key} must be a non-negative number, a string or null (got {val!r})")
    if value and not isinstance(value.get("note"), str):
        raise fail("datasheet", "needs a 'note' saying these figures are for labelled estimates only")
    return dict(value)

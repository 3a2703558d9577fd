"""The job: what to compress, for which target, under which budget.

A `JobConfig` is built from `./compress.yaml` (if present) overlaid with command-line
flags; flags win. It is validated here, once, so every later stage can trust it.

`compress.yaml` uses the same names as the flags, with dashes or underscores:

    model: resnet56
    weights: weights/resnet56.pt
    data: imagefolder:data/parts
    target: jetson-orin
    latency_ms: 5            # or: budget: {latency_ms: 5}
    finetune_epochs: 3
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from compressor.errors import BadInput
from compressor.quantities import parse_quantity

BUDGET_KINDS = ("latency_ms", "speedup", "flops", "params")
IMPORTANCE_METHODS = ("nhsic", "concentration", "fused", "uniform")
NHSIC_ESTIMATORS = ("biased", "debiased")
RANKING_METHODS = ("l1", "taylor", "shapley")
UTILITIES = ("log", "linear")
# Shapley refinement cap per group (coalition evaluations). On ResNet-56/shapes (bench/peers/findings.md)
# 300 took 385 s per plan and left 24 of 30 groups unresolved; 30 took 34 s and left 25: past the first
# few dozen evaluations the channels still straddling the cut are statistical ties.
SHAPLEY_EVALUATIONS = 30
# Groups wider than this are ranked by Taylor, the channel game's first-order linearisation: the
# permutation estimator costs permutations x (channels + 1) suffix passes per group: MobileNetV2 has
# 9,128 prunable channels (ResNet-56: 1,120) and its initial pass had not finished after 16 minutes
# on the 2-core CPU. 0: no limit.
SHAPLEY_MAX_CHANNELS = 128
# nHSIC sharpness per scored layer (beta = this x layers), by the solver's utility. `linear` is
# ITPruner's program and keeps its published 18.5 (ResNet-56: 500 / 27); a linear objective only
# orders groups by alpha / cost. Under `log`, the default, the solver keeps x_g in proportion to
# alpha_g / cost, so alpha must span about the keep range (0.1 to 1). At 18.5 it spanned 1e4 on
# ResNet-20/shapes and 3e5 on ResNet-56/shapes, and pinned whole residual stages to the floor
# (bench/peers/findings.md); at 2 it spans 3-4x there. ResNet-20/shapes at half the latency, seeds
# 0-2, 3-epoch fine-tune: 63.0% at 18.5, 75.4% at 5, 77.9% at 2 (digits, seeds 0-1: 98.7% at all three).
BETA_PER_LAYER = {"linear": 18.5, "log": 2.0}


@dataclass(frozen=True)
class Budget:
    """One budget. `speedup` is a relative latency budget: baseline latency / value."""

    kind: str
    value: float

    def describe(self) -> str:
        if self.kind == "latency_ms":
            return f"latency <= {self.value:g} ms"
        if self.kind == "speedup":
            return f"speedup >= {self.value:g}x (latency <= baseline / {self.value:g})"
        return f"{self.kind} <= {_human(self.value)}"


def _default_if_none(value: int | None, default: int) -> int:
    return default if value is None else value


def _human(value: float) -> str:
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.4g}{suffix}"
    return f"{value:g}"


@dataclass(frozen=True)
class JobConfig:
    model: str
    data: str
    budget: Budget
    out: Path
    weights: Path | None = None
    target: str = "cpu"
    input_size: tuple[int, int] | None = None
    finetune_epochs: int = 5
    finetune_lr: float = 0.01
    calib_size: int = 256
    seed: int = 0
    importance: str = "nhsic"
    beta_per_layer: float = BETA_PER_LAYER["log"]
    nhsic_estimator: str = "biased"
    concentration_weight: float = 0.5
    ranking: str = "shapley"
    shapley_samples: int = 64
    shapley_permutations: int = 8
    shapley_evaluations: int = SHAPLEY_EVALUATIONS
    shapley_max_channels: int = SHAPLEY_MAX_CHANNELS
    utility: str = "log"
    max_iterations: int = 4
    batch_size: int | None = None
    warmup: int | None = None
    iterations: int | None = None
    min_keep_ratio: float = 0.1
    latency_table: Path | None = None  # a table measured earlier (on the device) instead of building one
    latency_variants: int = 18  # random width variants the table is built from (plus full and smallest)
    lock_clocks: bool = False  # Jetson only: run jetson_clocks before measuring
    force: bool = False
    resume: bool = False
    source: dict = field(default_factory=dict, compare=False)

    def fingerprint(self) -> dict:
        """What must match for `--resume` to continue an earlier run in the same folder."""
        keys = ("model", "data", "target", "input_size", "finetune_epochs", "finetune_lr", "calib_size",
                "seed", "importance", "beta_per_layer", "nhsic_estimator", "concentration_weight", "ranking",
                "shapley_samples", "shapley_permutations", "shapley_evaluations", "shapley_max_channels",
                "utility", "batch_size", "min_keep_ratio", "latency_variants")
        fp = {k: _jsonable(getattr(self, k)) for k in keys}
        fp["latency_table"] = str(self.latency_table) if self.latency_table else None
        fp["weights"] = str(self.weights) if self.weights else None
        fp["budget"] = dataclasses.asdict(self.budget)
        return fp


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return value


# Keys a compress.yaml may hold (dashes normalised to underscores).
_YAML_KEYS = {"model", "weights", "data", "target", "out", "input_size", "finetune_epochs", "finetune_lr",
              "calib_size", "seed", "importance", "beta_per_layer", "nhsic_estimator", "concentration_weight",
              "ranking", "shapley_samples", "shapley_permutations", "shapley_evaluations", "shapley_max_channels",
              "utility", "max_iterations", "batch_size", "warmup", "latency_table", "latency_variants", "lock_clocks",
              "iterations", "min_keep_ratio", "budget", *BUDGET_KINDS}


def read_config_file(path: Path) -> dict:
    """Read compress.yaml (safe_load). Missing file -> {}."""
    if not path.exists():
        return {}
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise BadInput(f"{path}: not valid YAML{where}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise BadInput(f"{path}: expected a mapping of option: value, got {type(loaded).__name__}")
    normalised = {str(k).replace("-", "_"): v for k, v in loaded.items()}
    unknown = sorted(set(normalised) - _YAML_KEYS)
    if unknown:
        raise BadInput(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_YAML_KEYS))}")
    budget = normalised.pop("budget", None)
    if budget is not None:
        if not isinstance(budget, dict):
            raise BadInput(f"{path}: 'budget' must be a mapping such as {{latency_ms: 5}}")
        for k, v in budget.items():
            key = str(k).replace("-", "_")
            if key not in BUDGET_KINDS:
                raise BadInput(f"{path}: unknown budget kind {k!r}; use one of {', '.join(BUDGET_KINDS)}")
            if key in normalised:
                raise BadInput(f"{path}: budget {key} given twice")
            normalised[key] = v
    return normalised


def pick_budget(values: Mapping[str, Any], *, where: str) -> Budget | None:
    """Exactly one budget among `values`; None if there is none."""
    given = [(k, values[k]) for k in BUDGET_KINDS if values.get(k) is not None]
    if len(given) > 1:
        names = " and ".join("--" + k.replace("_", "-") for k, _ in given)
        raise BadInput(f"{where}: give exactly one budget, got {names}")
    if not given:
        return None
    kind, raw = given[0]
    value = parse_quantity(raw, what="--" + kind.replace("_", "-"))
    if value <= 0:
        raise BadInput(f"--{kind.replace('_', '-')} must be > 0, got {raw}")
    if kind == "speedup" and value < 1:
        raise BadInput(f"--speedup must be >= 1 (a speedup below 1 asks for a slower model), got {raw}")
    return Budget(kind, value)


def parse_input_size(value: Any) -> tuple[int, int] | None:
    """`32`, `32x40`, [32, 40] -> (H, W)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and len(value) == 2:
        parts = list(value)
    elif isinstance(value, int):
        parts = [value, value]
    else:
        text = str(value).lower().replace(" ", "")
        parts = text.split("x") if "x" in text else [text, text]
    try:
        h, w = (int(p) for p in parts)
    except (TypeError, ValueError):
        raise BadInput(f"--input-size: expected N or HxW (e.g. 32 or 32x48), got {value!r}") from None
    if h < 8 or w < 8:
        raise BadInput(f"--input-size: models need at least 8x8 inputs, got {h}x{w}")
    return h, w


def _number(values: Mapping[str, Any], key: str, default: float, *, low: float,
            high: float | None = None) -> float:
    """A finite float option within [low, high]; BadInput naming the flag otherwise."""
    raw = values.get(key, default)
    flag = "--" + key.replace("_", "-")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise BadInput(f"{flag}: expected a number, got {raw!r}") from None
    if not (value >= low and (high is None or value <= high)) or value != value or value == float("inf"):
        span = f"[{low:g}, {high:g}]" if high is not None else f">= {low:g}"
        raise BadInput(f"{flag} must be a finite number {span}, got {raw!r}")
    return value


def default_out_dir(now: _dt.datetime | None = None) -> Path:
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return Path("runs") / now.strftime("%Y%m%dT%H%M%SZ")


def build_job_config(flags: Mapping[str, Any], *, config_path: Path = Path("compress.yaml")) -> JobConfig:
    """Merge compress.yaml and flags (flags win; None means 'not given') and validate."""
    file_values = read_config_file(config_path)
    merged: dict[str, Any] = dict(file_values)
    flag_budget = pick_budget(flags, where="command line")
    if flag_budget is not None:  # a budget on the command line replaces the file's budget
        for k in BUDGET_KINDS:
            merged.pop(k, None)
    for key, value in flags.items():
        if value is not None:
            if isinstance(value, str) and not value.strip():
                raise BadInput(f"--{key.replace('_', '-')} is empty")
            merged[key] = value
    budget = flag_budget or pick_budget(merged, where=str(config_path))
    if budget is None:
        raise BadInput("no budget: give one of --latency-ms, --speedup, --flops, --params")
    for required in ("model", "data"):
        if not merged.get(required):
            raise BadInput(f"--{required} is required (on the command line or in {config_path})")

    def positive_int(name: str, minimum: int = 1) -> int | None:
        value = merged.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise BadInput(f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {value!r}")
        return value

    importance = str(merged.get("importance", "nhsic"))
    if importance not in IMPORTANCE_METHODS:
        raise BadInput(f"--importance: unknown {importance!r}; choose from {', '.join(IMPORTANCE_METHODS)}")
    nhsic_estimator = str(merged.get("nhsic_estimator", "biased"))
    if nhsic_estimator not in NHSIC_ESTIMATORS:
        raise BadInput(f"--nhsic-estimator: unknown {nhsic_estimator!r}; choose from {', '.join(NHSIC_ESTIMATORS)}")
    concentration_weight = _number(merged, "concentration_weight", 0.5, low=0.0, high=1.0)
    ranking = str(merged.get("ranking", "shapley"))
    if ranking not in RANKING_METHODS:
        raise BadInput(f"--ranking: unknown {ranking!r}; choose from {', '.join(RANKING_METHODS)}")
    utility = str(merged.get("utility", "log"))
    if utility not in UTILITIES:
        raise BadInput(f"--utility: unknown {utility!r}; choose from {', '.join(UTILITIES)}")
    beta_per_layer = _number(merged, "beta_per_layer", BETA_PER_LAYER[utility], low=0.0)
    min_keep_ratio = float(merged.get("min_keep_ratio", 0.1))
    if not 0 < min_keep_ratio <= 1:
        raise BadInput(f"--min-keep-ratio must be in (0, 1], got {min_keep_ratio}")
    finetune_lr = float(merged.get("finetune_lr", 0.01))
    if finetune_lr <= 0:
        raise BadInput(f"--finetune-lr must be > 0, got {finetune_lr}")
    weights = merged.get("weights")
    out = merged.get("out")
    return JobConfig(
        model=str(merged["model"]),
        data=str(merged["data"]),
        budget=budget,
        out=Path(out) if out else default_out_dir(),
        weights=Path(weights) if weights else None,
        target=str(merged.get("target") or "cpu"),
        input_size=parse_input_size(merged.get("input_size")),
        finetune_epochs=positive_int("finetune_epochs", 0) if merged.get("finetune_epochs") is not None else 5,
        finetune_lr=finetune_lr,
        calib_size=positive_int("calib_size", 2) or 256,
        seed=positive_int("seed", 0) if merged.get("seed") is not None else 0,
        importance=importance,
        beta_per_layer=beta_per_layer,
        nhsic_estimator=nhsic_estimator,
        concentration_weight=concentration_weight,
        ranking=ranking,
        shapley_samples=positive_int("shapley_samples") or 64,
        shapley_permutations=positive_int("shapley_permutations", 2) or 8,
        shapley_evaluations=_default_if_none(positive_int("shapley_evaluations", 0), SHAPLEY_EVALUATIONS),
        shapley_max_channels=_default_if_none(positive_int("shapley_max_channels", 0), SHAPLEY_MAX_CHANNELS),
        utility=utility,
        max_iterations=positive_int("max_iterations") or 4,
        batch_size=positive_int("batch_size"),
        warmup=positive_int("warmup", 0),
        iterations=positive_int("iterations", 5),
        min_keep_ratio=min_keep_ratio,
        latency_table=Path(merged["latency_table"]) if merged.get("latency_table") else None,
        latency_variants=positive_int("latency_variants", 3) or 18,
        lock_clocks=bool(merged.get("lock_clocks", False)),
        force=bool(merged.get("force", False)),
        resume=bool(merged.get("resume", False)),
        source={"config_file": str(config_path) if file_values else None},
    )

"""report.json (schema_version 1, DESIGN.md) and its human summary report.md.

report.json is a contract CI pipelines gate on: keys never change meaning; new keys may
be added. Every latency in it is a measurement on the target unless labelled otherwise.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich.table import Table

from compressor.channel_grid import ChannelGrid
from deploy.atomic_io import atomic_write_text
from deploy.telemetry import collect_environment

if TYPE_CHECKING:  # only for type hints: the pipeline imports this module
    from compressor.cost_model import CostModel
    from compressor.groups import PrunableGroup
    from compressor.pipeline import JobContext
    from deploy.backends.base import Measurement

SCHEMA_VERSION = 1


def build_report(*, ctx: "JobContext", budget: dict, met: bool, baseline: dict, compressed: dict, loop: list[dict],
                 groups: "list[PrunableGroup]", keep: dict[str, int], importance: dict[str, float],
                 importance_details: dict, allocation: dict | None, ranking: dict, cost_model: "CostModel", artifacts: dict, notes: list[str], started: float,
                 baseline_measurement: "Measurement | None", final_measurement: "Measurement | None",
                 latency_model: dict | None = None, finetune: dict | None = None) -> dict:
    keep_vec = np.array([keep[n] for n in cost_model.group_names])
    shares = cost_model.per_group_share(keep_vec, "macs")
    param_shares = cost_model.per_group_share(keep_vec, "params")
    components = importance_details.get("per_group", {})
    ctx.timings["total"] = time.perf_counter() - started
    environment = collect_environment(ctx.backend)
    measured_here = ctx.backend is not None
    environment.update({"backend": ctx.profile.backend,
                        "backend_versions": ctx.backend.versions() if measured_here else None,
                        "device": ctx.backend.device_name() if measured_here else None, "machine": platform.machine(),
                        "measurement_settings": baseline_measurement.settings if baseline_measurement else None,
                        "telemetry": {"baseline": baseline_measurement.telemetry if baseline_measurement else None,
                                      "compressed": final_measurement.telemetry if final_measurement else None},
                        "clocks_locked": ctx.clocks})
    config = ctx.config
    if measured_here:
        latency_label = f"measured with {ctx.backend.name} on {ctx.backend.device_name()}"
    else:
        p = (latency_model or {}).get("provenance", {})
        latency_label = (f"predicted from a table measured on {p.get('device', '?')} at {p.get('measured_at', '?')}; "
                         f"not measured on this host")
    return {
        "schema_version": SCHEMA_VERSION,
        "target": {"name": ctx.profile.name, "backend": ctx.profile.backend, "precision": ctx.profile.precision,
                   "batch_size": ctx.batch_size, "input_shape": list(ctx.input_shape),
                   "channel_alignment": ctx.profile.channel_alignment, "channel_grid": ctx.grid.to_dict()},
        "budget": budget,
        "met": bool(met),
        "baseline": baseline,
        "compressed": compressed,
        "loop": loop,
        "latency_source": "measured" if measured_here else "predicted",
        "latency_model": latency_model,
        "groups": [{"name": g.name, "channels": g.channels, "kept": int(keep[g.name]), "prunable": g.prunable,
                    "importance": float(importance.get(g.name, 1.0)) if g.prunable else None,
                    "importance_components": components.get(g.name) if g.prunable else None,
                    "macs_share": shares.get(g.name), "params_share": param_shares.get(g.name)} for g in groups],
        "importance": {k: v for k, v in importance_details.items() if k != "per_group"},
        "allocation": allocation,
        "ranking": ranking,
        "finetune": finetune,
        "timings_s": {k: round(v, 3) for k, v in ctx.timings.items()},
        "artifacts": artifacts,
        "environment": environment,
        "preprocess": {"mean": list(ctx.data.mean), "std": list(ctx.data.std),
                       "formula": "input = (rgb / 255 - mean) / std, NCHW float32"},
        "job": {"model": config.model, "weights": str(config.weights) if config.weights else None,
                "data": config.data, "data_summary": ctx.data.describe(), "importance": config.importance,
                "ranking": config.ranking, "utility": config.utility, "finetune_epochs": config.finetune_epochs, "seed": config.seed,
                "measurement": {"warmup": ctx.warmup, "iterations": ctx.iterations}},
        "notes": notes,
        "labels": {"latency": latency_label,
                   "flops": "multiply-accumulates (MACs), exact count of the network",
                   "accuracy": "top-1 on the validation split; compressed accuracy from the exported ONNX "
                               "file run by ONNX Runtime, baseline from torch"},
    }


def _ms(summary: dict | None) -> str:
    if not summary or not summary.get("latency_ms"):
        return "n/a"
    median = summary["latency_ms"].get("median")
    return f"{median:.4g}" if median is not None else "n/a"


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def _mega(value) -> str:
    return "n/a" if value is None else f"{value / 1e6:.4g}M"


def summary_rows(report: dict) -> list[tuple[str, str, str, str]]:
    """(metric, baseline, compressed, change) rows shared by the terminal table and report.md."""
    b, c = report["baseline"], report["compressed"]

    def ratio(key_fn):
        try:
            return f"{key_fn(b) / key_fn(c):.2f}x smaller"
        except (TypeError, ZeroDivisionError, KeyError):
            return ""

    lat_change = ""
    if b.get("latency_ms") and c.get("latency_ms") and c["latency_ms"].get("median"):
        lat_change = f"{b['latency_ms']['median'] / c['latency_ms']['median']:.2f}x faster"
    acc_change = ""
    if b.get("accuracy") is not None and c.get("accuracy") is not None:
        acc_change = f"{(c['accuracy'] - b['accuracy']) * 100:+.2f} pts"
    rows = [("latency median (ms)", _ms(b), _ms(c), lat_change)]
    if b.get("latency_ms") and c.get("latency_ms") and "p90" in c["latency_ms"]:
        rows.append(("latency p90 / p99 (ms)", f"{b['latency_ms']['p90']:.4g} / {b['latency_ms']['p99']:.4g}",
                     f"{c['latency_ms']['p90']:.4g} / {c['latency_ms']['p99']:.4g}", ""))
    rows += [("accuracy", _pct(b.get("accuracy")), _pct(c.get("accuracy")), acc_change),
             ("MACs", _mega(b.get("flops")), _mega(c.get("flops")), ratio(lambda s: s["flops"])),
             ("params", _mega(b.get("params")), _mega(c.get("params")), ratio(lambda s: s["params"]))]
    return rows


def budget_line(report: dict) -> str:
    budget = report["budget"]
    value = budget["value"]
    text = f"{value:.4g} ms" if budget["kind"] == "latency_ms" else f"{value / 1e6:.4g}M {budget['kind']}"
    if "requested" in budget:
        text += f" (speedup {budget['requested']['value']:g}x over the measured baseline)"
        measured = (report.get("compressed") or {}).get("speedup")
        if measured:  # the verdict of a speedup budget: timed side by side with the baseline
            text += f", measured {measured['speedup']:.3g}x side by side"
    return f"budget {text}: {'MET' if report['met'] else 'NOT MET'}"


def summary_table(report: dict) -> Table:
    table = Table(title=f"{report['target']['name']} ({report['target']['backend']}) - {budget_line(report)}")
    for column in ("", "baseline", "compressed", "change"):
        table.add_column(column, justify="left" if not column else "right")
    for row in summary_rows(report):
        table.add_row(*row)
    return table


def render_markdown(report: dict) -> str:
    t = report["target"]
    lines = [f"# Compression report: {report['job']['model']} for {t['name']}", "",
             f"**{budget_line(report)}**", "",
             f"- target: {t['name']}, backend {t['backend']}, {t['precision']}, batch {t['batch_size']}, "
             f"input {'x'.join(map(str, t['input_shape']))}",
             f"- device: {report['environment'].get('device')}",
             f"- data: {report['job']['data_summary']}",
             f"- latency: {report['labels']['latency']}", "",
             "| metric | baseline | compressed | change |", "|---|---:|---:|---:|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in summary_rows(report)]
    if report["loop"]:
        def ms(value) -> str:
            return "" if value is None else f"{value:.4g}"

        # host drift: the baseline re-timed right after the reading, over its first reading (1.00 = steady host)
        lines += ["", "## Closed loop", "",
                  "| iteration | predicted ms | measured ms | host drift | error | MACs |",
                  "|---|---:|---:|---:|---:|---:|"]
        for it in report["loop"]:
            error, drift = it.get("error_pct"), it.get("host_drift")
            measured = ms(it.get("measured_latency_ms"))
            if it.get("normalised_latency_ms") is not None:
                measured += f" (normalised {ms(it['normalised_latency_ms'])})"
            kept = " (kept)" if it.get("chosen") else ""
            lines.append(f"| {it['iteration']}{kept} | {ms(it.get('predicted_latency_ms'))} | {measured} | "
                         f"{'' if drift is None else f'{drift:.2f}'} | {'' if error is None else f'{error:+.1f}%'} | "
                         f"{_mega(it.get('macs'))} |")
    model = report.get("latency_model")
    if model:
        fit = model.get("fit", {})
        steps = ", ".join(f"{g} {v['step']}" for g, v in model.get("group_steps", {}).items()) or "none found"
        loo = fit.get("leave_one_out_mape_pct")
        lines += ["", "## Latency model", "",
                  f"- {model['kind']}, {model['source']}; measured on {model['provenance'].get('device')} "
                  f"at {model['provenance'].get('measured_at')} from {model['provenance'].get('variants')} variants",
                  f"- fit: in-sample MAPE {fit.get('in_sample_mape_pct', float('nan')):.1f}%"
                  + (f", leave-one-out {loo:.1f}%" if loo is not None else ""),
                  f"- channel steps seen (alignment staircase): {steps}"]
    allocation = report.get("allocation")
    if allocation:
        grid = ChannelGrid.from_dict(report["target"].get("channel_grid"))
        lines += ["", "## Allocation", "", f"- channel counts: {grid.describe()}",
                  f"- solver: {allocation['solver']} ({allocation['utility']} utility), "
                  f"{allocation['budget_used']:.2%} of the budget it was given, {allocation['seconds']:.3f} s",
                  f"- {allocation['message']}"]
    lines += ["", "## Channels per group", "",
              "| group | channels | kept | importance | nHSIC share t | rank | entropy | share of MACs | share of params |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for g in report["groups"]:
        imp = "fixed" if g["importance"] is None else f"{g['importance']:.4g}"
        parts = g.get("importance_components") or {}
        comp = [_fmt(parts.get(key)) for key in ("nhsic_t", "rank", "entropy")]
        shares = [_share(g.get(key)) for key in ("macs_share", "params_share")]
        lines.append(f"| {g['name']} | {g['channels']} | {g['kept']} | {imp} | " + " | ".join(comp + shares) + " |")
    lines += ["", "## Timings (s)", "", "| " + " | ".join(report["timings_s"]) + " |",
              "|" + "---:|" * len(report["timings_s"]), "| " + " | ".join(f"{v:.1f}" for v in report["timings_s"].values()) + " |"]
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    arts = report["artifacts"]
    lines += ["", "## Artifacts", ""] + [f"- {k}: `{v}`" for k, v in arts.items() if v]
    if arts.get("weights"):
        lines += ["", "Reload the pruned weights (no pickle involved):", "", "```python",
                  "from compressor import load_pruned_model",
                  f"model = load_pruned_model(\"{arts['plan']}\")  # path relative to this report", "```"]
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4g}"


def _share(value) -> str:
    return "" if value is None else f"{value:.1%}"


def write_report(report: dict, out_dir: Path) -> None:
    atomic_write_text(Path(out_dir) / "report.json", json.dumps(report, indent=2, default=_json_default))
    atomic_write_text(Path(out_dir) / "report.md", render_markdown(report))


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")

"""The peer benchmark's outputs: summary.json (the contract other tools read), README.md, Pareto PNGs.

summary.json holds one row per (method, model, data, budget), aggregated over seeds:
    {"rows": [{"method", "model", "data", "target", "budget_ms", "latency_ms", "accuracy_mean",
               "accuracy_std", "seeds", "flops", "params", "wall_s", ...}], ...}
`latency_ms`, `flops`, `params` and `wall_s` are means over the seeds; extra keys (the budget as a
fraction, whether every seed met it, measurements, stage times, per-seed accuracies) follow.
"""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Iterable

from deploy.atomic_io import atomic_write_text

ORDER = ("compressor", "compressor-concentration", "uniform-l1", "torch-pruning-global", "halp-knapsack", "itpruner")


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)


def summarise(rows: list[dict]) -> list[dict]:
    """Seeds folded into mean +- std per (method, model, data, budget)."""
    buckets: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        buckets[(r["method"], r["model"], r["data"], r["target"], r["budget_fraction"])].append(r)
    out = []
    for (method, model, data, target, fraction), group in buckets.items():
        ok = [r for r in group if "error" not in r and r.get("latency_ms") is not None]
        acc = [r["accuracy"] for r in ok]
        stages: dict[str, list[float]] = defaultdict(list)
        for r in group:
            for k, v in (r.get("stage_s") or {}).items():
                stages[k].append(v)
        out.append({
            "method": method, "model": model, "data": data, "target": target,
            "budget_ms": _mean([r["budget_ms"] for r in group]),
            "latency_ms": _mean([r["latency_ms"] for r in ok]),
            "accuracy_mean": _mean(acc), "accuracy_std": _std(acc),
            "seeds": sorted(r["seed"] for r in ok),
            "flops": _mean([r["flops"] for r in ok]), "params": _mean([r["params"] for r in ok]),
            "wall_s": _mean([r["wall_s"] for r in group]),
            "budget_fraction": fraction, "baseline_ms": group[0]["baseline_ms"],
            "dense_accuracy_mean": _mean([r["dense_accuracy"] for r in group]),
            "latency_std": _std([r["latency_ms"] for r in ok]),
            "met_all": bool(ok) and len(ok) == len(group) and all(r["met"] for r in ok),
            "met_seeds": sum(1 for r in ok if r["met"]),
            "measurements": _mean([r["measurements"] for r in group if "measurements" in r]),
            "stage_s": {k: round(statistics.fmean(v), 2) for k, v in stages.items()},
            "accuracy_per_seed": {str(r["seed"]): r["accuracy"] for r in ok},
            "failures": [{"seed": r["seed"], "why": r.get("error") or "; ".join(r.get("notes") or [])}
                         for r in group if r not in ok],
        })
    rank = {m: i for i, m in enumerate(ORDER)}
    out.sort(key=lambda s: (s["model"], s["data"], s["budget_fraction"], rank.get(s["method"], 99)))
    return out


def finished_cells(rows: list[dict], methods: Iterable[str], budgets: Iterable[float]) -> tuple[list[dict], list[dict]]:
    """(rows of the (model, data, seed) cells that every method has run at every budget, the others).

    Methods are compared on the same seeds only: while a cell is unfinished, a method that has run
    it would average one more seed than one that has not."""
    wanted = {(m, float(b)) for m in methods for b in budgets}
    have: dict[tuple, set] = defaultdict(set)
    for r in rows:
        have[(r["model"], r["data"], r["seed"])].add((r["method"], float(r["budget_fraction"])))
    done = {cell for cell, runs in have.items() if wanted <= runs}
    finished = [r for r in rows if (r["model"], r["data"], r["seed"]) in done]
    return finished, [r for r in rows if (r["model"], r["data"], r["seed"]) not in done]


def _eligible(s: dict) -> bool:
    """A summary row that competes for "best": it met the budget on every seed and has an accuracy."""
    return s["met_all"] and s["accuracy_mean"] is not None


def _best(rows: Iterable[dict]) -> float | None:
    return max((s["accuracy_mean"] for s in rows if _eligible(s)), default=None)


def _is_best(s: dict, best: float | None) -> bool:
    return _eligible(s) and s["accuracy_mean"] == best


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def table_markdown(summary: list[dict], model: str, data: str) -> list[str]:
    rows = [s for s in summary if s["model"] == model and s["data"] == data]
    if not rows:
        return []
    dense = statistics.fmean([s["dense_accuracy_mean"] for s in rows])
    lines = [f"### {model} on {data}", "",
             f"Dense: {rows[0]['baseline_ms']:.4g} ms, accuracy {100 * dense:.2f}%.", "",
             "| budget | method | latency ms | met | accuracy % (mean ± std) | MMACs | params K | measurements | wall s |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for fraction in sorted({s["budget_fraction"] for s in rows}):
        group = [s for s in rows if s["budget_fraction"] == fraction]
        best = _best(group)
        for s in group:
            acc = "—" if s["accuracy_mean"] is None else f"{_pct(s['accuracy_mean'])} ± {_pct(s['accuracy_std'])}"
            if _is_best(s, best):
                acc = f"**{acc}**"
            n = len(s["seeds"])
            met = f"{s['met_seeds']}/{n + len(s['failures'])}"
            lat = "—" if s["latency_ms"] is None else f"{s['latency_ms']:.4g}"
            macs = "—" if s["flops"] is None else f"{s['flops'] / 1e6:.3g}"
            params = "—" if s["params"] is None else f"{s['params'] / 1e3:.4g}"
            meas = "—" if s["measurements"] is None else f"{s['measurements']:.0f}"
            lines.append(f"| {fraction:.0%} ({s['budget_ms']:.4g} ms) | {s['method']} | {lat} | {met} | {acc} | "
                         f"{macs} | {params} | {meas} | {s['wall_s']:.0f} |")
    return lines + [""]


def headline_markdown(summary: list[dict]) -> list[str]:
    """One line per setting, one column per method: accuracy (mean over seeds) at the budget, with
    a dagger where some seed's final latency missed the budget. The README's headline table."""
    methods = [m for m in ORDER if any(s["method"] == m for s in summary)]
    by_setting: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for s in summary:
        by_setting[(s["model"], s["data"], s["budget_fraction"])][s["method"]] = s
    lines = ["| model | data | budget | seeds | dense | " + " | ".join(methods) + " |",
             "|---|---|---|---:|---:|" + "---:|" * len(methods)]
    for (model, data, fraction), row in sorted(by_setting.items()):
        best = _best(row.values())
        cells = []
        for m in methods:
            s = row.get(m)
            if s is None or s["accuracy_mean"] is None:
                cells.append("—")
                continue
            text = f"{100 * s['accuracy_mean']:.1f}" + ("" if s["met_all"] else " †")
            cells.append(f"**{text}**" if _is_best(s, best) else text)
        budget = next(iter(row.values()))["budget_ms"]
        seeds = len({seed for s in row.values() for seed in s["seeds"]} | {f["seed"] for s in row.values()
                                                                             for f in s["failures"]})
        dense = statistics.fmean(s["dense_accuracy_mean"] for s in row.values())
        lines.append(f"| {model} | {data} | {fraction:.0%} ({budget:.3g} ms) | {seeds} | {100 * dense:.1f} | "
                     + " | ".join(cells) + " |")
    return lines + ["", "Accuracy %, mean over seeds; dense: the unpruned network's accuracy (mean over seeds); "
                        "**bold**: best among methods that met the budget on every seed; †: some seed's final "
                        "latency missed the budget.", ""]


def wins_markdown(summary: list[dict]) -> list[str]:
    """Per method: settings won (best accuracy among methods meeting the budget on every seed),
    settings where it met the budget, and its mean accuracy gap to each setting's best."""
    settings = defaultdict(list)
    for s in summary:
        settings[(s["model"], s["data"], s["budget_fraction"])].append(s)
    tally = {m: {"won": 0, "met": 0, "gaps": []} for m in ORDER if any(s["method"] == m for s in summary)}
    for group in settings.values():
        best = _best(group)
        for s in group:
            t = tally.setdefault(s["method"], {"won": 0, "met": 0, "gaps": []})
            if _eligible(s):
                t["met"] += 1
                t["gaps"].append(best - s["accuracy_mean"])
                t["won"] += int(_is_best(s, best))
    lines = ["## Wins and losses", "", f"{len(settings)} settings (model x data x budget).", "",
             "| method | best accuracy (settings) | met the budget on every seed (settings) | mean gap to the best, points |",
             "|---|---:|---:|---:|"]
    for m, t in tally.items():
        gap = f"{100 * statistics.fmean(t['gaps']):.2f}" if t["gaps"] else "—"
        lines.append(f"| {m} | {t['won']} | {t['met']} | {gap} |")
    return lines + [""]


def plot_pareto(summary: list[dict], model: str, data: str, path: Path) -> bool:
    """Accuracy against measured latency, one marker per method and budget, budgets as dashed lines."""
    rows = [s for s in summary if s["model"] == model and s["data"] == data and s["latency_ms"] is not None]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    markers = dict(zip(ORDER, "o*sDv^"))
    for method in ORDER:
        mine = sorted((s for s in rows if s["method"] == method), key=lambda s: s["latency_ms"])
        if not mine:
            continue
        ax.errorbar([s["latency_ms"] for s in mine], [100 * s["accuracy_mean"] for s in mine],
                    xerr=[s["latency_std"] or 0 for s in mine], yerr=[100 * (s["accuracy_std"] or 0) for s in mine],
                    marker=markers.get(method, "o"), markersize=9 if method.startswith("compressor") else 6,
                    capsize=3, linestyle="-", linewidth=0.8, label=method)
    for budget in sorted({s["budget_ms"] for s in rows}):
        ax.axvline(budget, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("measured latency, ms (cpu target, ONNX Runtime, 1 thread)")
    ax.set_ylabel("validation accuracy, %")
    ax.set_title(f"{model} on {data}: accuracy at the measured latency budgets")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return True


def time_summary(rows: list[dict], training: list[dict]) -> dict:
    """What the run cost, from the rows' own clocks and the training records (`grid.training_records`).

    `rows_s` sums every row's wall time (a row's stages: ranking, search, fine-tune, measurements);
    `training_s` sums the dense networks' training. `total_s` is their sum, and None while any cell's
    training time is unknown: an unknown is not counted as zero."""
    stages: dict[str, float] = defaultdict(float)
    for r in rows:
        for k, v in (r.get("stage_s") or {}).items():
            stages[k] += v
    rows_s = sum(r.get("wall_s") or 0.0 for r in rows)
    known = [t["train_s"] for t in training if t.get("train_s") is not None]
    training_s = sum(known)
    unknown = len(training) - len(known)
    return {"rows_s": round(rows_s, 1), "stage_s": {k: round(v, 1) for k, v in sorted(stages.items())},
            "training_s": round(training_s, 1), "cells_trained": len(known), "cells_training_unknown": unknown,
            "total_s": round(rows_s + training_s, 1) if unknown == 0 else None,
            "teacher_logits_replayed_rows": sum(1 for r in rows if r.get("teacher_logits") == "replayed")}


def time_markdown(cost: dict) -> list[str]:
    rows_h = cost["rows_s"] / 3600
    shares = ", ".join(f"{k} {v / cost['rows_s']:.0%}" for k, v in sorted(cost["stage_s"].items(), key=lambda kv: -kv[1])
                       if cost["rows_s"] and v / cost["rows_s"] >= 0.05)
    lines = ["## Time", "", f"- Rows: {rows_h:.2f} h of wall time ({shares}); "
             f"{cost['teacher_logits_replayed_rows']} rows replayed the distillation teacher's logits."]
    if cost["cells_trained"]:
        lines.append(f"- Training the dense networks: {cost['training_s'] / 3600:.2f} h "
                     f"({cost['cells_trained']} cells).")
    if cost["total_s"] is not None:
        lines.append(f"- **Total: {cost['total_s'] / 3600:.2f} h** on this machine (rows + training, as measured).")
    else:
        lines.append(f"- Total: unknown; {cost['cells_training_unknown']} cells have no training record (not trained "
                     "yet, or trained before the bench recorded training time).")
    return lines + [""]


NOT_RECORDED = "not recorded"


def _row_machine(row: dict) -> dict | None:
    """What a row recorded of the host that ran it: `machine` (bench.common.machine()), or the
    `device` + `software` of rows from before that; None for rows that recorded neither."""
    if "machine" in row:
        return row["machine"]
    if "device" in row:
        return {"cpu": row["device"], **{k.replace("-", "_"): v for k, v in row.get("software", {}).items()}}
    return None


def measured_on(rows: list[dict], baselines: dict | None = None) -> dict:
    """The machine the rows ran on, from the rows themselves, not from the host writing the report (a
    report rebuilt elsewhere would otherwise relabel every number). A field the rows disagree on is a
    sorted list of its values. Rows that recorded no machine get their CPU from the store's baselines
    (`baselines.json`: every row's budget and latency hang on the (model, data) baseline, timed on the
    store's one machine); their versions count as not recorded."""
    seen: dict[str, set] = defaultdict(set)
    unrecorded = 0
    for r in rows:
        m = _row_machine(r)
        if m is None:
            unrecorded += 1
            base = (baselines or {}).get(f"{r['model']}--{r['data']}--{r['target']}", {})
            seen["cpu"].add(base.get("device", NOT_RECORDED))
            continue
        for key, value in m.items():
            seen[key].add(value)
    if unrecorded:
        for key in set(seen) - {"cpu"}:
            seen[key].add(NOT_RECORDED)
        for key in ("cores", "torch", "onnxruntime"):  # the page's machine line names these
            seen.setdefault(key, {NOT_RECORDED})
    out: dict = {k: (next(iter(v)) if len(v) == 1 else sorted(v, key=str)) for k, v in seen.items()}
    if unrecorded:
        out["rows_without_machine"] = unrecorded
    return out


def machine_line(m: dict) -> str:
    """The page's "Machine:" sentence for `measured_on`'s dict; fields no row recorded are left out."""
    def show(key: str) -> str | None:
        values = [v for v in (m.get(key) if isinstance(m.get(key), list) else [m.get(key)]) if v != NOT_RECORDED]
        return " / ".join(map(str, values)) if values and None not in values else None
    parts = [(show("cpu") or NOT_RECORDED) + (" (from the stored baselines)" if m.get("rows_without_machine") else "")]
    for key, template in (("cores", "{} cores"), ("onnxruntime", "ONNX Runtime {}"), ("torch", "torch {}")):
        if show(key):
            parts.append(template.format(show(key)))
    unrecorded = m.get("rows_without_machine")
    return ("Machine: " + ", ".join(parts)
            + (f"; {unrecorded} rows did not record their cores and versions" if unrecorded else "") + ".")


def write_outputs(rows: list[dict], out: Path, *, grid_description: dict, expected_rows: int,
                  command: str, recipe: dict, findings: str | None = None,
                  training: list[dict] | None = None, baselines: dict | None = None) -> list[dict]:
    """Write summary.json, README.md and the PNGs. With the grid's methods and budgets in
    `grid_description`, rows of unfinished cells are counted but left out of the tables.
    `training`: per-cell training records, for the time section. `baselines`: the row store's
    baselines.json, for the machine of rows that did not record one (`measured_on`)."""
    cost = time_summary(rows, training or [])
    host = measured_on(rows, baselines)
    waiting: list[dict] = []
    if "methods" in grid_description and "budgets" in grid_description:
        rows, waiting = finished_cells(rows, grid_description["methods"], grid_description["budgets"])
    summary = summarise(rows)
    pairs = sorted({(s["model"], s["data"]) for s in summary})
    payload = {"rows": summary, "generated_utc": rows[-1]["finished_utc"] if rows else None, "machine": host,
               "command": command, "grid": grid_description, "recipe": recipe,
               "complete": len(rows) == expected_rows, "row_runs": len(rows) + len(waiting),
               "rows_waiting": len(waiting), "expected_row_runs": expected_rows,
               "commits": sorted({r["commit"] for r in rows}), "time": cost}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "summary.json", json.dumps(payload, indent=2) + "\n")
    plots = [(m, d) for m, d in pairs if plot_pareto(summary, m, d, out / f"pareto-{m}-{d}.png")]
    lines = [f"# Peer benchmark: accuracy at a measured latency budget ({'complete' if payload['complete'] else 'PARTIAL'})",
             "", f"Reproduce: `{command}`. {machine_line(host)}",
             f"Rows run: {payload['row_runs']} of {expected_rows} (method x model x data x budget x seed)"
             + (f"; {len(waiting)} of them are in (model, data, seed) cells not every method has finished, "
                "and wait outside the tables so that every method is averaged over the same seeds"
                if waiting else "") + f". Commits: {', '.join(payload['commits'])}.", "",
             "Every method starts from the same trained network, meets the same budget measured on the `cpu` target "
             "(ONNX Runtime, 1 thread, 50 warm-up + 300 timed runs, median), and gets the same fine-tune "
             f"({recipe['finetune_epochs']} epochs of distillation from the dense network after BatchNorm "
             "re-estimation). The final latency is measured after fine-tuning, in turn with the dense network "
             "(blocks of 10 runs each, alternating, 300 runs each; the median of 3 such readings), and reported "
             "as that ratio times the baseline the budget was set from: this VM's speed moves by 10-30% within "
             "seconds, and a ratio taken in alternating blocks cancels it. The peers' bisections read every plan "
             "the same way; `compress` gets the budget as a speed-up over its own baseline, and its closed "
             "loop times every plan side by side with that baseline. `met` counts the "
             "seeds whose final latency is within the budget. Accuracy: validation split, mean ± std over "
             "seeds; **bold** is the best among methods that met the budget on every seed.", ""]
    lines += ["## Headline", ""] + headline_markdown(summary) + wins_markdown(summary) + time_markdown(cost)
    if findings:  # the written reading of these numbers (bench/peers/findings.md), for the full grid only
        lines += [findings.strip(), ""]
    for m, d in pairs:
        lines += table_markdown(summary, m, d)
        if (m, d) in plots:
            lines += [f"![{m} on {d}](pareto-{m}-{d}.png)", ""]
    others = sorted(p.name for p in out.glob("*.md") if p.name != "README.md")
    if others:  # the folder's other benches, so this page is its index too
        lines += ["## Other benches in this folder", ""] + [f"- [{name}]({name})" for name in others] + [""]
    atomic_write_text(out / "README.md", "\n".join(lines) + "\n")
    return summary

"""Issue 3 bench: accuracy after the same short fine-tune, by layer-importance criterion.

Every run is the real job (`compressor.compress`) on a model trained on `shapes`, under a
FLOPs budget given as a fraction of the baseline MACs, with the same distillation
fine-tune. Only the allocation differs:

* ``nhsic``, ``concentration``, ``fused``, ``uniform`` importance, each with the default
  ``log`` utility (a concave per-group objective);
* ``nhsic-linear``: nHSIC with ITPruner's own linear objective, to show what the concave
  utility changes.

Seeds change the calibration batch, the fine-tune order and the generated `shapes` split
(same distribution; the teacher is the same network). Reported: mean ± std over seeds.

    python bench/importance_accuracy.py [--model resnet20] [--budgets 0.4] [--seeds 0,1]
"""
from __future__ import annotations

import argparse
import time

from common import WORK, mean_std, trained_weights, write_result

VARIANTS = {  # name: (importance, utility)
    "nhsic": ("nhsic", "log"),
    "concentration": ("concentration", "log"),
    "fused": ("fused", "log"),
    "uniform": ("uniform", "log"),
    "nhsic-linear": ("nhsic", "linear"),
}


def baseline_macs(model: str, data: str) -> float:
    import torch

    from compressor.cost_model import CostModel
    from compressor.data import load_data
    from compressor.groups import discover_groups
    from compressor.model_loading import build_model

    splits = load_data(data, seed=0)
    net = build_model(model, num_classes=splits.num_classes, in_channels=splits.in_channels).eval()
    x = torch.zeros(1, splits.in_channels, *splits.input_size)
    groups = discover_groups(net, x)
    cm = CostModel.build(net, x, groups)
    return cm.macs(cm.full_keep)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--data", default="shapes")
    parser.add_argument("--train-epochs", type=int, default=8, help="training of the dense model (cached)")
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--budgets", default="0.4", help="FLOPs budgets as fractions of the baseline MACs")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [v for v in args.variants.split(",") if v]

    from compressor import compress

    weights = trained_weights(args.model, args.data, epochs=args.train_epochs)
    full = baseline_macs(args.model, args.data)
    runs = []
    for fraction in budgets:
        for seed in seeds:
            for name in variants:
                importance, utility = VARIANTS[name]
                t = time.perf_counter()
                report = compress(model=args.model, weights=str(weights), data=args.data, flops=fraction * full,
                                  importance=importance, utility=utility, finetune_epochs=args.finetune_epochs,
                                  seed=seed, out=WORK / "importance_accuracy" / f"{name}-{fraction}-{seed}",
                                  force=True)
                kept = [g["kept"] / g["channels"] for g in report["groups"] if g["prunable"]]
                runs.append({"variant": name, "budget_fraction": fraction, "seed": seed,
                             "accuracy": report["compressed"]["accuracy"],
                             "accuracy_baseline": report["baseline"]["accuracy"],
                             "macs": report["compressed"]["flops"], "budget_used": report["compressed"]["flops"] / (fraction * full),
                             "min_group_keep": min(kept), "solve_s": report["timings_s"]["solve"],
                             "importance_s": report["timings_s"]["importance"], "job_s": time.perf_counter() - t})
                r = runs[-1]
                print(f"{fraction:.0%} seed {seed} {name}: accuracy {r['accuracy']:.2%} "
                      f"(baseline {r['accuracy_baseline']:.2%}), narrowest group keeps {r['min_group_keep']:.0%}",
                      flush=True)

    table = []
    for fraction in budgets:
        for name in variants:
            rows = [r for r in runs if r["variant"] == name and r["budget_fraction"] == fraction]
            acc_m, acc_s = mean_std([r["accuracy"] for r in rows])
            table.append({"variant": name, "budget_fraction": fraction, "accuracy_mean": acc_m, "accuracy_std": acc_s,
                          "seeds": [r["seed"] for r in rows],
                          "min_group_keep_mean": mean_std([r["min_group_keep"] for r in rows])[0],
                          "budget_used_min": min(r["budget_used"] for r in rows)})
    base_m, base_s = mean_std([r["accuracy_baseline"] for r in runs if r["variant"] == variants[0]
                               and r["budget_fraction"] == budgets[0]])
    lines = [f"# Layer importance: accuracy after a {args.finetune_epochs}-epoch fine-tune ({args.model} on {args.data})",
             "", f"Reproduce: `python bench/importance_accuracy.py --model {args.model} --budgets {args.budgets} "
             f"--seeds {args.seeds}`.", "",
             f"Dense model: trained {args.train_epochs} epochs, {full / 1e6:.2f}M MACs, val accuracy "
             f"{base_m:.2%} ± {base_s:.2%} over the seeds' splits. Mean ± std over seeds {args.seeds}; "
             "every method gets the same fine-tune (knowledge distillation from the dense model).", "",
             "| budget (MACs) | " + " | ".join(variants) + " |", "|---|" + "---:|" * len(variants)]
    for fraction in budgets:
        cells = []
        for name in variants:
            row = next(t for t in table if t["variant"] == name and t["budget_fraction"] == fraction)
            cells.append(f"{row['accuracy_mean']:.2%} ± {row['accuracy_std']:.2%}")
        lines.append(f"| {fraction:.0%} | " + " | ".join(cells) + " |")
    lines += ["", "Narrowest group's keep ratio (mean over seeds): a starved layer shows up here.", "",
              "| budget (MACs) | " + " | ".join(variants) + " |", "|---|" + "---:|" * len(variants)]
    for fraction in budgets:
        cells = [f"{next(t for t in table if t['variant'] == n and t['budget_fraction'] == fraction)['min_group_keep_mean']:.0%}"
                 for n in variants]
        lines.append(f"| {fraction:.0%} | " + " | ".join(cells) + " |")
    lines.append("")
    write_result("importance_accuracy", {"model": args.model, "data": args.data, "train_epochs": args.train_epochs,
                                         "finetune_epochs": args.finetune_epochs, "baseline_macs": full,
                                         "table": table, "runs": runs}, "\n".join(lines))


if __name__ == "__main__":
    main()

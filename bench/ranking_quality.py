"""Issue 4 bench: accuracy kept by each channel ranking under the same layer-wise plan, no fine-tune.

For a trained ResNet-20 on each data set, every prunable group keeps the same fraction of its
channels (30%, 50%, 70%); only *which* channels differ:

* ``shapley``: ``ShapleyRanker`` with ``compress``'s defaults (KD game on 64 calibration samples,
  8 antithetic permutations, then refinement around the cut, at most 300 evaluations per group);
* ``taylor``: |activation x gradient| summed, on the same 64 calibration samples (with labels);
* ``l1``: filter L1 norm (data-free, so the same for every seed);
* ``random``.

Accuracy on the validation split with no fine-tuning, as pruned ("raw") and after re-estimating
the BatchNorm statistics on the training split ("BN recal.", what ``compress`` does before its
fine-tune). A seed picks the 64 calibration samples, the permutations and the random ranking; the
trained network is the same (trained once, seed 0, cached in runs/bench/weights).

    python bench/ranking_quality.py [--data digits,shapes] [--seeds 0,1,2] [--keep 0.3,0.5,0.7]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import time

from common import mean_std, trained_weights, write_result

METHODS = ("shapley", "taylor", "l1", "random")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--data", default="digits,shapes")
    parser.add_argument("--train-epochs", type=int, default=8)
    parser.add_argument("--keep", default="0.3,0.5,0.7", help="fraction of channels every group keeps")
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()

    import torch

    from compressor.channel_game import ShapleyRanker
    from compressor.channel_ranking import channel_scores, select_top
    from compressor.data import load_data
    from compressor.groups import discover_groups
    from compressor.job_config import JobConfig
    from compressor.model_loading import build_model, load_weights
    from compressor.pipeline import SHAPLEY_INDIFFERENCE
    from compressor.pruning import apply_plan
    from compressor.training import evaluate, recalibrate_bn

    defaults = {f.name: f.default for f in dataclasses.fields(JobConfig)}
    samples = defaults["shapley_samples"]
    fractions = [float(f) for f in args.keep.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    results: list[dict] = []
    dense: dict[str, float] = {}
    for data in args.data.split(","):
        splits = load_data(data, seed=0)
        net = build_model(args.model, num_classes=splits.num_classes, in_channels=splits.in_channels)
        load_weights(net, trained_weights(args.model, data, epochs=args.train_epochs))
        net.eval()
        example = splits.calib_x[:1]
        groups = discover_groups(net, example)
        prunable = [g for g in groups if g.prunable]
        dense[data] = evaluate(net, splits.val_x, splits.val_y)
        print(f"{args.model} on {data}: dense val accuracy {dense[data]:.2%}, {len(prunable)} prunable groups", flush=True)
        for seed in seeds:
            gen = torch.Generator().manual_seed(seed)
            pick = torch.randperm(splits.calib_x.shape[0], generator=gen)[:samples]
            cx, cy = splits.calib_x[pick], splits.calib_y[pick]
            started = time.perf_counter()
            fixed = {"l1": channel_scores(net, groups, method="l1"),
                     "taylor": channel_scores(net, groups, method="taylor", calib_x=cx, calib_y=cy),
                     "random": {g.name: torch.rand(g.channels, generator=gen) for g in groups}}
            fixed_s = time.perf_counter() - started
            ranker = ShapleyRanker(net, prunable, cx, loss="kd", seed=seed,
                                   initial_permutations=defaults["shapley_permutations"],
                                   max_evaluations_per_group=defaults["shapley_evaluations"],
                                   indifference=SHAPLEY_INDIFFERENCE)
            for frac in fractions:
                keep = {g.name: max(1, round(frac * g.channels)) for g in prunable}
                t = time.perf_counter()
                scores = {"shapley": ranker.scores(keep), **fixed}
                shapley_s = time.perf_counter() - t
                row_base = {"data": data, "seed": seed, "keep": frac}
                for method in METHODS:
                    plan = select_top({n: scores[method][n] for n in keep}, keep)
                    pruned = apply_plan(copy.deepcopy(net), example, plan).eval()
                    raw = evaluate(pruned, splits.val_x, splits.val_y)
                    recalibrate_bn(pruned, splits.train_x)
                    recal = evaluate(pruned.eval(), splits.val_x, splits.val_y)
                    row = {**row_base, "method": method, "accuracy": raw, "accuracy_bn_recal": recal}
                    if method == "shapley":
                        row["seconds"] = shapley_s
                        row["evaluations"] = sum(r["evaluations"] for r in ranker.report.values())
                        row["stable_groups"] = sum(bool(r["stable"]) for r in ranker.report.values())
                    elif method == "taylor":
                        row["seconds"] = fixed_s
                    results.append(row)
                line = "  ".join(f"{r['method']} {r['accuracy']:.1%}/{r['accuracy_bn_recal']:.1%}"
                                 for r in results[-len(METHODS):])
                print(f"  {data} seed {seed} keep {frac:.0%}: {line}  (shapley {shapley_s:.0f} s)", flush=True)

    def stats(data: str, frac: float, method: str, key: str) -> tuple[float, float]:
        return mean_std([100 * r[key] for r in results
                         if r["data"] == data and r["keep"] == frac and r["method"] == method])

    md = [f"# Channel ranking quality: same layer-wise plan, no fine-tuning ({args.model})", "",
          f"Every prunable group keeps the same fraction of its channels; only which channels differ. "
          f"Validation accuracy (%), mean ± std over seeds {args.seeds} (seed: calibration samples, "
          f"permutations, random ranking; l1 is data-free). Shapley uses compress's defaults: "
          f"{samples} samples, {defaults['shapley_permutations']} permutations, "
          f"<= {defaults['shapley_evaluations']} refinement evaluations per group.", ""]
    for key, title in (("accuracy", "As pruned"), ("accuracy_bn_recal", "After BatchNorm re-estimation")):
        md += [f"## {title}", "", "| data | kept | dense | " + " | ".join(METHODS) + " |",
               "|---|---|---|" + "---|" * len(METHODS)]
        for data in dense:
            for frac in fractions:
                means = [stats(data, frac, m, key) for m in METHODS]
                cells = [f"{mean:.1f} ± {std:.1f}" for mean, std in means]
                best = max(range(len(METHODS)), key=lambda i: means[i][0])
                cells[best] = f"**{cells[best]}**"
                md.append(f"| {data} | {frac:.0%} | {100 * dense[data]:.1f} | " + " | ".join(cells) + " |")
        md.append("")
    sh = [r for r in results if r["method"] == "shapley"]
    md += [f"Shapley ranking time per plan: {min(r['seconds'] for r in sh):.0f}-{max(r['seconds'] for r in sh):.0f} s "
           f"on this CPU (first plan of a seed includes the initial permutations).", "",
           "Reproduce: `make bench-ranking` (`python bench/ranking_quality.py`).", ""]
    write_result("ranking_quality", {"settings": vars(args), "dense_accuracy": dense, "rows": results},
                 "\n".join(md))


if __name__ == "__main__":
    main()

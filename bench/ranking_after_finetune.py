"""Which channels to keep, after fine-tuning: the peer bench's own plans re-ranked by L1 and Taylor.

For each seed, the `compressor*` job of the peer bench at one budget left its plan in
``runs/bench/peers/work/<cell>/<method>-<budget>ms/pruned.plan.json``: kept channel indices per group,
chosen by Shapley values. This script keeps the same number of channels per group and picks them
three ways (the job's Shapley picks, L1, Taylor on the calibration set), then gives each the peer
bench's fine-tune (BN re-estimation, 3 epochs of distillation, the cell's seed) and prints the
validation accuracy. The allocation is fixed, so any difference is the ranking's.

Run it after the peer bench has run the cell (it reads the jobs' plans):

    python bench/ranking_after_finetune.py --model resnet56 --data shapes --budget-ms 1.128409 \\
        --method compressor-concentration --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

from common import WORK, trained_weights

from bench.peers.context import Cell  # noqa: E402
from bench.peers.grid import FINETUNE_EPOCHS, ROOT, TRAIN_EPOCHS, train_recipe  # noqa: E402
from compressor.channel_plan import ChannelPlan  # noqa: E402
from compressor.channel_ranking import channel_scores  # noqa: E402
from compressor.pruning import apply_plan  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--data", default="shapes")
    parser.add_argument("--budget-ms", default="1.128409", help="as in the job folder's name")
    parser.add_argument("--method", default="compressor-concentration")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    os.environ.setdefault("COMPRESS_CACHE_DIR", str(ROOT / "cache"))  # the peer bench's: teacher logits replay
    recipe = train_recipe(args.model, args.data)
    for seed in args.seeds:
        weights = trained_weights(args.model, args.data, epochs=TRAIN_EPOCHS[args.data], seed=seed, recipe=recipe)
        cell = Cell.open(args.model, args.data, seed, weights, target="cpu", workdir=WORK / "ranking_after_finetune",
                         finetune_epochs=FINETUNE_EPOCHS)
        job = ROOT / "work" / f"{args.model}-{args.data}-s{seed}{recipe.tag()}" / f"{args.method}-{args.budget_ms}ms"
        plan = json.loads(Path(job / "pruned.plan.json").read_text())["plan"]
        keep = {name: len(kept) for name, kept in plan.items()}
        nets = {"shapley (job)": apply_plan(copy.deepcopy(cell.dense), cell.example_input,
                                            ChannelPlan({n: list(v) for n, v in plan.items()}))}
        nets["l1"] = cell.prune(keep, channel_scores(cell.dense, cell.groups, method="l1"))
        nets["taylor"] = cell.prune(keep, channel_scores(cell.dense, cell.groups, method="taylor",
                                                         calib_x=cell.data.calib_x, calib_y=cell.data.calib_y))
        accuracy = {}
        for name, net in nets.items():
            net, _ = cell.finetune(net)
            accuracy[name] = round(cell.accuracy(net) * 100, 1)
        print(seed, args.method, accuracy, flush=True)


if __name__ == "__main__":
    main()

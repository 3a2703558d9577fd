"""Fine-tuning with the teacher's logits replayed from the cache, against running the teacher, side by side.

For each network (trained weights of the peer bench, seed 0), a student is pruned to the same width in
every group (L1 ranking; `--keep`, default 0.7 of each group's channels, which lands near the peer
bench's 50% latency budget) and fine-tuned with distillation for the peer bench's 3 epochs, three ways
per round:

* ``plain``: the teacher runs forward on every batch (no cache);
* ``record``: the same, recording the teacher's logits into an empty cache folder;
* ``replay``: a second run against that folder: the teacher runs on the first batch only (the check).

Rounds alternate the three, so a slow spell of this shared VM hits all of them. The bench fails unless
the three students end with bit-identical weights. Reported: seconds per run (median over rounds), the
replay's saving over ``plain``, and the cache entry's size.

    python bench/teacher_logits.py                               # ResNet-56 and MobileNetV2 on shapes
    python bench/teacher_logits.py --models resnet20 --data digits --rounds 1
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

from common import TrainRecipe, trained_weights, write_result

import torch  # noqa: E402  (after common: it puts the checkout on sys.path)

from bench.peers.context import FINETUNE_LR, Cell  # noqa: E402
from bench.peers.grid import FINETUNE_EPOCHS, TRAIN_EPOCHS, train_recipe  # noqa: E402
from compressor.channel_ranking import channel_scores  # noqa: E402
from compressor.training import finetune_with_distillation, recalibrate_bn  # noqa: E402

MODES = ("plain", "record", "replay")


def bench_one(model: str, data: str, *, keep_ratio: float, rounds: int, seed: int) -> dict:
    recipe: TrainRecipe = train_recipe(model, data)
    weights = trained_weights(model, data, epochs=TRAIN_EPOCHS[data], seed=seed, recipe=recipe)
    with tempfile.TemporaryDirectory() as workdir:
        cell = Cell.open(model, data, seed, weights, target="cpu", workdir=Path(workdir),
                         finetune_epochs=FINETUNE_EPOCHS)
    splits, dense = cell.data, cell.dense
    # the same width in every group, L1 ranking: the peer bench's uniform-l1 student at this ratio
    keep = {g.name: max(g.min_keep, 1, round(keep_ratio * g.channels)) for g in cell.prunable}
    student0 = cell.prune(keep, channel_scores(dense, cell.groups, method="l1"))
    recalibrate_bn(student0, splits.train_x)

    seconds: dict[str, list[float]] = {m: [] for m in MODES}
    finals: dict[str, list[torch.Tensor]] = {}
    entry_bytes = 0
    for r in range(rounds):
        with tempfile.TemporaryDirectory() as cache:
            for mode in MODES:
                student = copy.deepcopy(student0)
                started = time.perf_counter()
                result = finetune_with_distillation(student, dense, splits, epochs=FINETUNE_EPOCHS, lr=FINETUNE_LR,
                                                    seed=seed, teacher_cache=None if mode == "plain" else cache)
                seconds[mode].append(time.perf_counter() - started)
                source = result.teacher_logits or "no cache"
                assert (mode != "replay") or source.startswith("cache:"), source
                state = [t.clone() for t in student.state_dict().values()]
                if mode in finals and not all(torch.equal(a, b) for a, b in zip(finals[mode], state)):
                    raise SystemExit(f"{model}/{data}: {mode} is not deterministic across rounds")
                finals[mode] = state
                print(f"  {model}/{data} round {r + 1} {mode:6s} {seconds[mode][-1]:6.1f} s  ({source.split(',')[0]})",
                      flush=True)
            entry_bytes = sum(p.stat().st_size for p in Path(cache).rglob("*.pt"))
    same = all(all(torch.equal(a, b) for a, b in zip(finals["plain"], finals[m])) for m in ("record", "replay"))
    if not same:
        raise SystemExit(f"{model}/{data}: the students differ between plain, record and replay")
    median = {m: statistics.median(v) for m, v in seconds.items()}
    return {"model": model, "data": data, "seed": seed, "keep_ratio": keep_ratio, "epochs": FINETUNE_EPOCHS,
            "train_samples": int(splits.train_x.shape[0]), "rounds": rounds,
            "seconds": {m: [round(s, 2) for s in v] for m, v in seconds.items()},
            "median_s": {m: round(v, 2) for m, v in median.items()},
            "replay_saving": round(1 - median["replay"] / median["plain"], 4),
            "record_overhead": round(median["record"] / median["plain"] - 1, 4),
            "entry_bytes": entry_bytes, "bit_identical": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet56", "mobilenetv2"])
    parser.add_argument("--data", default="shapes")
    parser.add_argument("--keep", type=float, default=0.7, help="kept fraction of every group's channels")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = [bench_one(m, args.data, keep_ratio=args.keep, rounds=args.rounds, seed=args.seed) for m in args.models]
    lines = ["# Fine-tuning: teacher logits replayed from the cache vs the teacher run on every batch", "",
             f"Distillation fine-tune, {FINETUNE_EPOCHS} epochs, students at {args.keep:.0%} of every group's "
             f"channels (L1), seed {args.seed}; median of {args.rounds} alternating rounds. The three students "
             f"end bit-identical (checked). Reproduce: `python bench/teacher_logits.py`.", "",
             "| model | data | plain (s) | record (s) | replay (s) | saving | entry |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        m = r["median_s"]
        lines.append(f"| {r['model']} | {r['data']} | {m['plain']:.1f} | {m['record']:.1f} | {m['replay']:.1f} | "
                     f"{r['replay_saving']:.0%} | {r['entry_bytes'] / 1e6:.2f} MB |")
    write_result(f"teacher_logits_{args.data}", {"rows": rows}, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

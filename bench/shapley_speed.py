"""Issue 4 bench: Shapley channel values, fast path vs the naive estimator, same permutations.

For every prunable group of the model, the same antithetic permutations (same seed) and the same
calibration batch go through

* ``naive``: what common open implementations do: one full forward of the calibration batch per
  marginal contribution, channels zeroed by forward hooks (``reference_value_fn``, one coalition per
  ``value_fn`` call; v(none) and v(all) shared, as in our estimator);
* ``fast``: ``ChannelGame`` (activations cached at the group's input, only the network after it
  re-run, many coalitions per batched forward), build time included;
* ``fast+trunc``: the fast path with truncated Monte Carlo (``truncation_tol``), which skips the
  prefixes of a permutation once its value is within the tolerance of v(all). Its values differ
  from the exact permutation estimate; the bench reports by how much and whether the kept half
  changes.

The values of ``naive`` and ``fast`` must agree (same coalitions, same float32 forwards up to
rounding); the bench fails if they do not. It also prints the *MAC bound*: where time is
proportional to MACs (a CPU), re-running only the suffix can be at most
sum(evals x full MACs) / sum(evals x suffix MACs) faster than the naive path.

    python bench/shapley_speed.py                      # ResNet-56 on shapes, CPU
    python bench/shapley_speed.py --model resnet50 --synthetic --input-size 224 --device cuda
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

from common import trained_weights, write_result


def _suffix_macs(net, x, groups) -> tuple[float, dict[str, float]]:
    """Full-network MACs and, per group, the MACs from the first call of an out-member on."""
    import torch
    import torch.nn as nn

    calls: list[tuple[str, int]] = []

    def hook(name):
        def record(module, inputs, output):
            if isinstance(module, nn.modules.conv._ConvNd):
                k = module.in_channels // module.groups * math.prod(module.kernel_size)
                calls.append((name, output.numel() * k))
            elif isinstance(module, nn.Linear):
                calls.append((name, output.numel() * module.in_features))
            else:
                calls.append((name, 0))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in net.named_modules() if n and not list(m.children())]
    try:
        with torch.no_grad():
            net(x[:1])
    finally:
        for h in handles:
            h.remove()
    total = float(sum(m for _, m in calls))
    suffix = {}
    for g in groups:
        outs = set(g.out_members())
        first = next(i for i, (n, _) in enumerate(calls) if n in outs)
        suffix[g.name] = float(sum(m for _, m in calls[first:]))
    return total, suffix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--data", default="shapes")
    parser.add_argument("--train-epochs", type=int, default=12, help="training of the dense model (cached)")
    parser.add_argument("--synthetic", action="store_true", help="random-init model, Gaussian input (no training)")
    parser.add_argument("--input-size", type=int, default=None, help="synthetic input side (default 32)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=64, help="calibration batch")
    parser.add_argument("--permutations", type=int, default=2, help="per group (one antithetic pair = 2)")
    parser.add_argument("--truncation-tol", type=float, default=0.02)
    parser.add_argument("--naive-every", type=int, default=1,
                        help="time the naive path on every N-th group only (its total is then an estimate "
                             "scaled by evaluations); 1 = every group, measured")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="result file name (default shapley_speed_<model>_<device>)")
    args = parser.parse_args()

    import torch

    from compressor.channel_game import ChannelGame, reference_value_fn
    from compressor.data import load_data
    from compressor.groups import discover_groups
    from compressor.model_loading import build_model, load_weights
    from compressor.shapley import shapley_values

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if args.synthetic:
        side = args.input_size or 32
        net = build_model(args.model, num_classes=1000 if side >= 224 else 10, in_channels=3)
        x = torch.randn(args.samples, 3, side, side, generator=torch.Generator().manual_seed(args.seed))
        source = f"random-init {args.model}, Gaussian input {side}x{side}"
    else:
        splits = load_data(args.data, seed=0)
        net = build_model(args.model, num_classes=splits.num_classes, in_channels=splits.in_channels)
        load_weights(net, trained_weights(args.model, args.data, epochs=args.train_epochs))
        x = splits.calib_x[:args.samples]
        source = f"{args.model} trained {args.train_epochs} epochs on {args.data}"
    net = net.to(device).eval()
    x = x.to(device)
    groups = [g for g in discover_groups(net, x[:1]) if g.prunable]
    total_macs, suffix_macs = _suffix_macs(net, x, groups)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    rows = []
    print(f"{source}: {len(groups)} prunable groups, {args.samples} calibration samples, "
          f"{args.permutations} permutations, device {device}", flush=True)
    for i, g in enumerate(groups):
        n = g.channels
        sync()
        t = time.perf_counter()
        game = ChannelGame.build(net, g, x)
        fast = shapley_values(game.value_fn, n, permutations=args.permutations, seed=args.seed)
        sync()
        fast_s = time.perf_counter() - t
        evaluations = 2 + args.permutations * (n - 1)

        t = time.perf_counter()
        game_t = ChannelGame.build(net, g, x)
        trunc = shapley_values(game_t.value_fn, n, permutations=args.permutations, seed=args.seed,
                               truncation_tol=args.truncation_tol)
        sync()
        trunc_s = time.perf_counter() - t
        trunc_rows = game_t.forward_rows // x.shape[0]

        row = {"group": g.name, "channels": n, "evaluations": evaluations, "fast_s": fast_s,
               "fast_path": game.fast_path, "trunc_s": trunc_s, "trunc_evaluations": trunc_rows,
               "suffix_macs_share": suffix_macs[g.name] / total_macs}
        half = max(1, n // 2)
        order_fast = set(torch.argsort(-fast, stable=True)[:half].tolist())
        order_trunc = set(torch.argsort(-trunc, stable=True)[:half].tolist())
        scale = float(fast.abs().max()) or 1.0
        row["trunc_max_rel_error"] = float((trunc - fast).abs().max()) / scale
        row["trunc_kept_half_same"] = order_fast == order_trunc
        if i % args.naive_every == 0:
            ref = reference_value_fn(net, g, x)
            sync()
            t = time.perf_counter()
            naive = shapley_values(ref, n, permutations=args.permutations, seed=args.seed, max_batch=1)
            sync()
            row["naive_s"] = time.perf_counter() - t
            row["naive_forwards"] = ref.forward_calls
            diff = float((naive - fast).abs().max())
            row["max_abs_diff_vs_naive"] = diff
            if diff > 1e-4 * scale + 1e-7:
                raise SystemExit(f"group {g.name}: fast and naive values differ by {diff:.3g} (scale {scale:.3g})")
        rows.append(row)
        print(f"  {g.name:28s} C={n:5d} evals {evaluations:6d}  fast {fast_s:8.2f} s  "
              f"naive {row.get('naive_s', float('nan')):8.2f} s  trunc {trunc_s:7.2f} s "
              f"({trunc_rows} evals)  suffix {row['suffix_macs_share']:.2f}", flush=True)

    timed = [r for r in rows if "naive_s" in r]
    # naive time per evaluation on the timed groups, scaled to every group's evaluations when sampled
    per_eval = statistics.fmean(r["naive_s"] / r["evaluations"] for r in timed)
    naive_total = sum(r.get("naive_s", per_eval * r["evaluations"]) for r in rows)
    fast_total = sum(r["fast_s"] for r in rows)
    trunc_total = sum(r["trunc_s"] for r in rows)
    evals = sum(r["evaluations"] for r in rows)
    bound = evals * total_macs / sum(r["evaluations"] * r["suffix_macs_share"] * total_macs for r in rows)
    summary = {
        "naive_s": naive_total, "naive_measured": args.naive_every == 1,
        "fast_s": fast_total, "fast_trunc_s": trunc_total,
        "speedup_exact": naive_total / fast_total, "speedup_truncated": naive_total / trunc_total,
        "mac_bound": bound, "evaluations": evals,
        "trunc_evaluations": sum(r["trunc_evaluations"] for r in rows),
        "trunc_kept_half_same_groups": sum(r["trunc_kept_half_same"] for r in rows),
        "trunc_max_rel_error": max(r["trunc_max_rel_error"] for r in rows),
    }
    name = args.name or f"shapley_speed_{args.model}_{device.type}"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    md = [f"# Shapley channel values: fast path vs naive ({args.model}, {device_name})", "",
          f"{source}; {len(groups)} prunable groups; calibration batch {args.samples}; "
          f"{args.permutations} antithetic permutations per group, seed {args.seed}; KD loss.", "",
          "| path | time (s) | value_fn rows | speed-up vs naive |", "|---|---|---|---|",
          f"| naive (full forward per marginal, hooks){'' if args.naive_every == 1 else ' *estimated*'} "
          f"| {naive_total:.1f} | {evals} | 1.0x |",
          f"| fast (cached prefix, batched suffix) | {fast_total:.1f} | {evals} | "
          f"**{summary['speedup_exact']:.2f}x** |",
          f"| fast + truncation (tol {args.truncation_tol}) | {trunc_total:.1f} | {summary['trunc_evaluations']} | "
          f"{summary['speedup_truncated']:.2f}x |", "",
          f"MAC bound for any exact suffix re-use (time proportional to MACs): **{bound:.2f}x**. "
          f"Truncation keeps the same top half of channels in {summary['trunc_kept_half_same_groups']}/{len(rows)} "
          f"groups; largest value error {summary['trunc_max_rel_error']:.3f} of the group's largest |value|.", "",
          "| group | C | evals | suffix MACs | naive (s) | fast (s) | ratio |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        naive_cell = f"{r['naive_s']:.2f}" if "naive_s" in r else "-"
        ratio = f"{r['naive_s'] / r['fast_s']:.1f}x" if "naive_s" in r else "-"
        md.append(f"| {r['group']} | {r['channels']} | {r['evaluations']} | {r['suffix_macs_share']:.0%} | "
                  f"{naive_cell} | {r['fast_s']:.2f} | {ratio} |")
    md += ["", f"Reproduce: `python bench/shapley_speed.py --model {args.model} --device {args.device}"
           f"{' --synthetic' if args.synthetic else ''}`", ""]
    write_result(name, {"settings": vars(args), "summary": summary, "groups": rows}, "\n".join(md))
    print(f"naive {naive_total:.1f} s, fast {fast_total:.1f} s ({summary['speedup_exact']:.2f}x), "
          f"truncated {trunc_total:.1f} s ({summary['speedup_truncated']:.2f}x), MAC bound {bound:.2f}x")


if __name__ == "__main__":
    main()

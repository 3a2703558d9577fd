"""The `compress` command line.

Exit codes (DESIGN.md): 0 done and budget met / gate passed; 3 budget not met or gate
failed (report still written); 2 bad input or usage (one line, no traceback); 1 internal
error (one line here, the traceback in the run's log or with --debug).
"""
from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from compressor.errors import BadInput

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_NOT_MET = 0, 1, 2, 3

MAIN_HELP = """Prune a trained CNN until its latency, measured on the target, fits a budget.

Reads defaults from ./compress.yaml; flags override it. Give exactly one budget.

\b
Examples:
  compress --model resnet20 --weights w.pt --data digits --speedup 2
  compress --target jetson-orin --latency-ms 5          # model/data from compress.yaml
  compress --model nets.py:build --data imagefolder:parts --flops 59.5M --out runs/parts

\b
Subcommands: train, measure, gate, targets, doctor (each has --help).
"""


class _Group(click.Group):
    """A group that also runs the main job when no subcommand is given."""

    def format_usage(self, ctx, formatter):
        formatter.write_usage("compress", "[OPTIONS] | compress COMMAND [ARGS]...")


def _stdout() -> Console:
    return Console(highlight=False, soft_wrap=True)


@click.group(cls=_Group, invoke_without_command=True, help=MAIN_HELP,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--model", help="zoo name | path/to/file.py:factory | pkg.module:factory | torchvision:NAME | timm:NAME")
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path),
              help="state_dict checkpoint (loaded with weights_only=True)")
@click.option("--data", help="digits | shapes | imagefolder:DIR | path/to/file.py:factory | pkg.module:factory")
@click.option("--target", help="profile name or FILE.yaml (default: cpu); see `compress targets`")
@click.option("--latency-ms", help="budget: median latency on the target, in ms")
@click.option("--speedup", help="budget: measured baseline latency / X")
@click.option("--flops", help="budget: multiply-accumulates, e.g. 59.5M")
@click.option("--params", help="budget: parameter count, e.g. 0.5M")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="run folder (default runs/<UTC time>)")
@click.option("--input-size", help="resize the data to N or HxW (default: the data's own size)")
@click.option("--finetune-epochs", type=int, help="distillation fine-tune epochs after pruning (default 5; 0 allowed)")
@click.option("--finetune-lr", type=float, help="fine-tune learning rate (default 0.01)")
@click.option("--calib-size", type=int, help="calibration samples for importance (default 256)")
@click.option("--seed", type=int, help="seed for splits, calibration and fine-tuning (default 0)")
@click.option("--importance", type=click.Choice(["nhsic", "concentration", "fused", "uniform"]),
              help="layer importance: nhsic (ITPruner, default), concentration (rank + entropy), fused (both), uniform")
@click.option("--beta-per-layer", type=float,
              help="nHSIC sharpness per scored layer: beta = this x layers (default 2 with "
                   "--utility log; 18.5, ITPruner's 500 / 27, with linear)")
@click.option("--nhsic-estimator", type=click.Choice(["biased", "debiased"]),
              help="nHSIC estimator: biased (ITPruner's, default) or debiased (unbiased HSIC)")
@click.option("--concentration-weight", type=float,
              help="weight of rank vs entropy in the concentration score, in [0, 1] (default 0.5)")
@click.option("--ranking", type=click.Choice(["l1", "taylor", "shapley"]),
              help="channel ranking inside a group: shapley (default: Shapley values of a distillation game, "
                   "refined around the final cut), taylor (|activation x gradient|), l1 (filter norm)")
@click.option("--shapley-samples", type=int,
              help="calibration samples each Shapley coalition is scored on (default 64)")
@click.option("--shapley-permutations", type=int,
              help="antithetic permutations every group gets before refinement, >= 2 (default 8)")
@click.option("--shapley-evaluations", type=int,
              help="cap on coalition evaluations per group for refining the final cut (default 30; 0: no refinement)")
@click.option("--shapley-max-channels", type=int,
              help="groups wider than this are ranked by taylor instead of Shapley values (default 128; 0: no limit)")
@click.option("--utility", type=click.Choice(["log", "linear"]),
              help="allocation objective per group: log (default, no layer starved) or linear (ITPruner's)")
@click.option("--max-iterations", type=int, help="closed-loop iterations for a latency budget (default 4)")
@click.option("--batch-size", type=int, help="batch size to measure at (default: the profile's)")
@click.option("--warmup", type=int, help="warm-up runs per measurement (default: the profile's)")
@click.option("--iterations", type=int, help="timed runs per measurement (default: the profile's)")
@click.option("--min-keep-ratio", type=float, help="smallest fraction of a group's channels to keep (default 0.1)")
@click.option("--latency-table", type=click.Path(dir_okay=False, path_type=Path),
              help="use this latency table (latency_table.json of an earlier run on the device) instead of building "
                   "one; on a host without the device, latencies are then predicted and labelled so")
@click.option("--latency-variants", type=int,
              help="width variants profiled to build the latency table, besides the full and smallest (default 18)")
@click.option("--lock-clocks", is_flag=True, default=None,
              help="Jetson only: run jetson_clocks (needs root) before measuring; clocks are never changed otherwise")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("compress.yaml"), show_default=True, help="defaults file")
@click.option("--force", is_flag=True, default=None, help="start over in an existing run folder")
@click.option("--resume", is_flag=True, default=None, help="continue an interrupted run in --out")
@click.option("--quiet", "-q", is_flag=True, help="no progress output")
@click.option("--json", "as_json", is_flag=True, help="print report.json to stdout")
@click.option("--debug", is_flag=True, help="show tracebacks of internal errors")
@click.pass_context
def cli(ctx: click.Context, config_path: Path, quiet: bool, as_json: bool, debug: bool, **flags) -> None:
    ctx.ensure_object(dict)["debug"] = debug
    if ctx.invoked_subcommand is not None:
        given = [k for k, v in flags.items() if v is not None]
        if given:
            raise click.UsageError(f"--{given[0].replace('_', '-')} belongs to the main job, not to "
                                   f"`compress {ctx.invoked_subcommand}`; put it after the subcommand")
        return
    from compressor.console import StageConsole
    from compressor.job_config import build_job_config
    from compressor.pipeline import run_job
    from compressor.report import summary_table

    config = build_job_config(flags, config_path=config_path)
    report = run_job(config, StageConsole(quiet=quiet or as_json))
    if as_json:
        click.echo(json.dumps(report, indent=2))
    elif not quiet:
        out = _stdout()
        out.print(summary_table(report))
        for note in report["notes"]:
            out.print(f"note: {note}")
        out.print(f"report: {config.out / 'report.json'} (and report.md, model.onnx)")
    ctx.exit(EXIT_OK if report["met"] else EXIT_NOT_MET)


@cli.command(help="""Train a model on a data set and save its state_dict.

The recipe: SGD with Nesterov momentum, a linear learning-rate warm-up then cosine decay, and
random-crop augmentation.

\b
Examples:
  compress train --model resnet20 --data digits --epochs 10 --out weights/resnet20-digits.pt
  compress train --model resnet56 --data shapes --epochs 12 --zero-init-residual --out weights/r56.pt
""")
@click.option("--model", required=True, help="zoo name | file.py:factory | pkg.module:factory")
@click.option("--data", required=True, help="digits | shapes | imagefolder:DIR | file.py:factory")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="weights file to write")
@click.option("--lr", type=float, default=0.05, show_default=True, help="peak learning rate (cosine decay after warm-up)")
@click.option("--warmup-epochs", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="linear learning-rate warm-up, in epochs (at most half the run)")
@click.option("--zero-init-residual", is_flag=True,
              help="start every residual block as the identity (last BN scale 0): for deep ResNets that stall "
                   "at chance (ResNet-56 on shapes, 12 epochs: 84%% against 56%%); slows short runs of shallow ones")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--input-size", help="resize the data to N or HxW")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="overwrite an existing weights file")
@click.option("--quiet", "-q", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def train(model: str, data: str, epochs: int, out: Path, lr: float, warmup_epochs: float, zero_init_residual: bool,
          batch_size: int, input_size: str | None, seed: int, force: bool, quiet: bool, as_json: bool) -> None:
    from compressor.console import StageConsole
    from compressor.data import load_data
    from compressor.job_config import parse_input_size
    from compressor.model_loading import build_model, check_input_shape, save_weights
    from compressor.models.initialisation import zero_init_residuals_
    from compressor.training import evaluate, train as train_model

    if out.exists() and not force:
        raise BadInput(f"--out {out} exists; pass --force to overwrite it")
    console = StageConsole(quiet=quiet or as_json)
    splits = load_data(data, input_size=parse_input_size(input_size), seed=seed)
    net = build_model(model, num_classes=splits.num_classes, in_channels=splits.in_channels)
    check_input_shape(net, (splits.in_channels, *splits.input_size))
    zeroed = zero_init_residuals_(net) if zero_init_residual else 0
    console.info(f"training {model} on {splits.describe()}"
                 + (f"; {zeroed} residual blocks start as the identity" if zeroed else ""))
    with console.stage("training", total=epochs) as advance:
        result = train_model(net, splits, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                             warmup_epochs=warmup_epochs, progress=lambda done, total, info: advance(1, f"val {info['val_accuracy']:.2%}"))
    accuracy = evaluate(net, splits.val_x, splits.val_y)
    save_weights(net, out)
    summary = {"weights": str(out), "model": model, "data": data, "epochs": epochs, "lr": lr,
               "warmup_epochs": warmup_epochs, "zero_init_residual_blocks": zeroed, "val_accuracy": accuracy,
               "history": result.history}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    elif not quiet:
        _stdout().print(f"val accuracy {accuracy:.2%}; weights written to {out}")


@cli.command(help="""Measure an ONNX file (or engine) on a target and print latency statistics.

\b
Example:
  compress measure runs/x/model.onnx --target cpu --iterations 500
""")
@click.argument("model_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--target", default="cpu", show_default=True, help="profile name or FILE.yaml")
@click.option("--batch-size", type=click.IntRange(min=1), help="default: the profile's")
@click.option("--input-shape", help="CxHxW when the file's input shape is not static")
@click.option("--warmup", type=click.IntRange(min=0))
@click.option("--iterations", type=click.IntRange(min=5))
@click.option("--json", "as_json", is_flag=True)
def measure(model_file: Path, target: str, batch_size: int | None, input_shape: str | None, warmup: int | None,
            iterations: int | None, as_json: bool) -> None:
    from deploy.backends import backend_for_profile
    from deploy.onnx_export import onnx_input_shape
    from deploy.profiles import load_profile
    from deploy.target_check import check_target_available

    profile = load_profile(target)
    check_target_available(profile)
    backend = backend_for_profile(profile)
    chw = _parse_chw(input_shape) if input_shape else onnx_input_shape(model_file)
    shape = (batch_size or profile.batch_size, *chw)
    m = backend.measure(model_file, shape, warmup=profile.warmup if warmup is None else warmup,
                        iterations=iterations or profile.iterations, max_cv=profile.max_cv,
                        telemetry=profile.telemetry, expected_power_mode=profile.power_mode)
    result = {"model": str(model_file), "target": profile.name, "input_shape": list(shape), **m.to_report()}
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    lat = m.latency
    table = Table(title=f"{model_file.name} on {profile.name} ({m.backend}, {m.device})")
    for col in ("median ms", "p90 ms", "p99 ms", "mean ms", "min ms", "CV", "runs"):
        table.add_column(col, justify="right")
    table.add_row(f"{lat.median_ms:.4g}", f"{lat.p90_ms:.4g}", f"{lat.p99_ms:.4g}", f"{lat.mean_ms:.4g}",
                  f"{lat.min_ms:.4g}", f"{lat.cv:.1%}", str(lat.n))
    _stdout().print(table)
    if lat.noisy:
        _stdout().print("warning: the CV stayed high after re-measuring; the machine is noisy")


def _parse_chw(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(p) for p in text.lower().split("x"))
    except ValueError:
        raise BadInput(f"--input-shape: expected CxHxW such as 3x32x32, got {text!r}") from None
    return c, h, w


@cli.command(help="""Check a report.json against deployment thresholds (exit 0 pass, 3 fail).

Accuracy is in 0..1; --max-accuracy-drop is absolute in the same unit (0.01 = one point).

\b
Example:
  compress gate runs/x/report.json --max-latency-ms 5 --max-accuracy-drop 0.01 --junit gate.xml
""")
@click.argument("report_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--max-latency-ms", type=float, help="compressed median latency must be <= this")
@click.option("--min-accuracy", type=float, help="compressed accuracy must be >= this (0..1)")
@click.option("--max-accuracy-drop", type=float, help="baseline - compressed accuracy must be <= this (0..1)")
@click.option("--junit", type=click.Path(dir_okay=False, path_type=Path), help="write JUnit XML here")
@click.option("--allow-predicted", is_flag=True,
              help="pass a report whose latencies were predicted from --latency-table (default: such a report fails)")
@click.option("--json", "as_json", is_flag=True)
def gate(report_file: Path, max_latency_ms: float | None, min_accuracy: float | None,
         max_accuracy_drop: float | None, junit: Path | None, allow_predicted: bool, as_json: bool) -> None:
    from deploy.gate import evaluate_gate, load_report, write_junit

    for name, value in (("--min-accuracy", min_accuracy), ("--max-accuracy-drop", max_accuracy_drop)):
        if value is not None and not 0 <= value <= 1:
            raise BadInput(f"{name} is a fraction in 0..1 (0.01 = one point), got {value}")
    if max_latency_ms is not None and not 0 < max_latency_ms < float("inf"):
        raise BadInput(f"--max-latency-ms must be a positive number of milliseconds, got {max_latency_ms}")
    report = load_report(report_file)
    try:
        result = evaluate_gate(report, max_latency_ms=max_latency_ms, min_accuracy=min_accuracy,
                               max_accuracy_drop=max_accuracy_drop, allow_predicted=allow_predicted)
    except BadInput as exc:  # name the file: "report has no 'met'" alone does not say which report
        raise BadInput(f"{report_file}: not a compress report: {exc}") from None
    if junit:
        write_junit(result, junit)
    if as_json:
        click.echo(json.dumps({"passed": result.passed, "checks": [vars(c) for c in result.checks]}, indent=2))
    else:
        out = _stdout()
        for check in result.checks:
            out.print(f"{'PASS' if check.passed else 'FAIL'}  {check.name}: {check.message}")
        out.print("gate passed" if result.passed else "gate FAILED")
    click.get_current_context().exit(EXIT_OK if result.passed else EXIT_NOT_MET)


@cli.command(help="""List the target profiles and whether each can run on this host.

\b
Example:
  compress targets --json
""")
@click.option("--json", "as_json", is_flag=True)
def targets(as_json: bool) -> None:
    from deploy.errors import DeviceUnavailable
    from deploy.profiles import list_profiles
    from deploy.target_check import check_target_available

    rows = []
    for p in list_profiles():
        try:
            check_target_available(p)
            here, why = True, ""
        except DeviceUnavailable as exc:
            here, why = False, str(exc).split(";")[0].replace(f"target {p.name} ", "")
        rows.append({"name": p.name, "backend": p.backend, "precision": p.precision, "alignment": p.channel_alignment,
                     "batch_size": p.batch_size, "description": p.description, "available_here": here, "why": why})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="targets (profiles/*.yaml)")
    table.add_column("name", no_wrap=True)
    for col in ("backend", "precision", "align"):
        table.add_column(col, no_wrap=True)
    table.add_column("usable here")
    for r in rows:
        table.add_row(r["name"], r["backend"], r["precision"], str(r["alignment"]),
                      "yes" if r["available_here"] else f"no: {r['why']}")
    _stdout().print(table)


@cli.command(help="""Check this host: versions, backends usable or not (and why), targets that can run here.

\b
Example:
  compress doctor --json
""")
@click.option("--json", "as_json", is_flag=True)
def doctor(as_json: bool) -> None:
    from deploy.backends import backend_status
    from deploy.telemetry import collect_environment

    env = collect_environment()
    backends = [vars(s) for s in backend_status()]
    if as_json:
        click.echo(json.dumps({"environment": env, "backends": backends}, indent=2, default=str))
        return
    out = _stdout()
    table = Table(title="environment")
    table.add_column("item")
    table.add_column("value")
    for key, value in env.items():
        table.add_row(str(key), str(value))
    out.print(table)
    table = Table(title="backends")
    for col in ("backend", "usable", "why"):
        table.add_column(col)
    for b in backends:
        table.add_row(b["name"], "yes" if b["usable"] else "no", b["reason"])
    out.print(table)


def main(argv: list[str] | None = None) -> int:
    """Entry point: map every failure to the DESIGN.md exit codes, one line on stderr."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        # With standalone_mode=False click returns ctx.exit()'s code instead of raising.
        code = cli.main(args=argv, prog_name="compress", standalone_mode=False)
        return code if isinstance(code, int) else EXIT_OK
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except BadInput as exc:
        click.echo(f"error: {exc}", err=True)
        return EXIT_BAD_INPUT
    except click.ClickException as exc:  # usage errors: unknown option, bad choice, missing argument
        click.echo(f"error: {exc.format_message()} (see compress --help)", err=True)
        return EXIT_BAD_INPUT
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence
        logging.getLogger("compressor").error("internal error", exc_info=True)
        if debug:
            traceback.print_exc()
        click.echo(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", err=True)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())

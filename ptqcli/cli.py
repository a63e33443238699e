"""The `ptq` command line: parse options into config dataclasses, call a stage, render tables."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .config import (ActFormat, DataConfig, Granularity, Method, QuantConfig, ReduceRange, WeightMethod,
                     merge)
from .errors import PtqError
from .parallel import Workers

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Post-training quantization for ONNX models.")
out = Console()
err = Console(stderr=True)

# ---- shared option aliases --------------------------------------------------------------------
ModelArg = Annotated[Path, typer.Argument(help="ONNX model file.", show_default=False)]
RunArg = Annotated[Path, typer.Argument(help="Run directory written by `ptq calibrate`.", show_default=False)]
DataOpt = Annotated[Optional[str], typer.Option("--data", help="Calibration data: .npy, .npz, image folder, or folder of arrays.")]
SyntheticBackendOpt = Annotated[Optional[str], typer.Option("--synthetic-backend", help="What computes the gradients of --synthetic bn: auto (jax when installed, pip install 'ptqcli[jax]', and covering the model; else numpy), numpy or jax [default: auto].")]
SyntheticOpt = Annotated[Optional[str], typer.Option("--synthetic", help="No data: bn (fitted to the model's BatchNorm statistics), gaussian or uniform.")]
NumSamplesOpt = Annotated[Optional[int], typer.Option("--num-samples", help="Calibration samples to read [default: 256].")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", help="Samples per ORT run (models with a fixed batch use theirs) [default: 16].")]
ResizeOpt = Annotated[Optional[int], typer.Option("--resize", help="Images: resize the shorter side to this, then centre-crop.")]
MeanOpt = Annotated[Optional[str], typer.Option("--mean", help="Images: per-channel mean on 0..255, comma-separated [default: 0].")]
StdOpt = Annotated[Optional[str], typer.Option("--std", help="Images: per-channel std on 0..255, comma-separated [default: 255].")]
LayoutOpt = Annotated[Optional[str], typer.Option("--layout", help="Images: auto, NCHW or NHWC.")]
ColorOpt = Annotated[Optional[str], typer.Option("--color", help="Images: auto, rgb, bgr or gray.")]
WholeFeedsOpt = Annotated[Optional[bool], typer.Option("--whole-feeds", help="Each data file is one complete feed, fed as it is (no input split into samples).")]
FeedbackOpt = Annotated[Optional[str], typer.Option("--feedback", help="Streaming models: OUTPUT=INPUT[,...]; each data file is a stream of steps, and each step's INPUT is the float model's OUTPUT of the step before.")]
WeightsOpt = Annotated[Optional[str], typer.Option("--weights", help="Weight format: int8, int4, int3, int2, binary, ternary, pow2:B, exp:B [default: int8].")]
ActsOpt = Annotated[Optional[ActFormat], typer.Option("--acts", help="Activation format [default: uint8].")]
GranularityOpt = Annotated[Optional[Granularity], typer.Option("--granularity", help="Weight scales per channel or per tensor [default: channel].")]
ActSymOpt = Annotated[Optional[bool], typer.Option("--act-symmetric/--act-asymmetric", help="Symmetric int8 activations.")]
MethodOpt = Annotated[Optional[Method], typer.Option("--method", help="Activation range method [default: minmax].")]
WeightMethodOpt = Annotated[Optional[WeightMethod], typer.Option("--weight-method", help="Weight range: minmax, or mse (per-channel clipping; with --block-size each block's grid refined without data: least squares, or with --float-zero-points an HQQ-style robust zero point) [default: minmax].")]
RoundingOpt = Annotated[Optional[str], typer.Option("--rounding", help="Weight rounding: auto, nearest, adaround, adaquant, gptq [default: auto: with data and weights below 8 bits, gptq for weight-only MatMul models, adaround otherwise; nearest else].")]
BlockOpt = Annotated[Optional[int], typer.Option("--block-size", help="Block-wise weight scales for MatMul/Gemm layers: one per this many input channels (16, 32, 64, 128, ...); weight-only MatMuls export as MatMulNBits.")]
FloatZeroOpt = Annotated[Optional[bool], typer.Option("--float-zero-points", help="Weight-only block-wise MatMuls (MatMulNBits): each block's zero point in float, unrounded, so the grid fits the block's range exactly (implies --weight-zero-points).")]
WeightZeroOpt = Annotated[Optional[bool], typer.Option("--weight-zero-points/--symmetric-weights", help="Give each weight channel or block a zero point [default: symmetric].")]
RayOpt = Annotated[Optional[str], typer.Option("--ray", help="Run independent work as Ray tasks: auto (a local Ray of --workers CPUs) or a running cluster's address host:port; needs pip install 'ptqcli[ray]'.")]
WorkersOpt = Annotated[int, typer.Option("--workers", help="With --ray auto: CPUs of the local Ray (each task one CPU, one ORT thread).")]
ActOrderOpt = Annotated[Optional[bool], typer.Option("--act-order/--no-act-order", help="GPTQ: round input channels in order of decreasing Hessian diagonal, block scales fitted first [default: on].")]
AccuracyOpt = Annotated[Optional[int], typer.Option("--accuracy-level", help="MatMulNBits compute type: 0 as the input, 4 int8 (fastest on CPU) [default: 4].")]
RoundingItersOpt = Annotated[Optional[int], typer.Option("--iters", help="Optimisation steps: per layer for adaround/adaquant [default: 200], per batch for --synthetic bn [default: 500].")]
BiasCorrOpt = Annotated[Optional[bool], typer.Option("--bias-correction/--no-bias-correction", help="Remove the output mean shift of weight quantization [default: on below 8 bits].")]
PercentileOpt = Annotated[Optional[float], typer.Option("--percentile", help="Percentile for --method percentile [default: 99.999].")]
ReduceOpt = Annotated[Optional[ReduceRange], typer.Option("--reduce-range", help="7-bit weights for ORT's int8 kernels; auto = on for x86 without VNNI.")]
BinaryActsOpt = Annotated[Optional[str], typer.Option("--binary-acts", help="Binarize the inputs of these layers too (fully binary layers): 'all' (every binary-weight layer but the first and last) or comma-separated node names.")]
ExcludeNodesOpt = Annotated[Optional[str], typer.Option("--exclude-nodes", help="Comma-separated node names to keep in float.")]
ExcludeOpsOpt = Annotated[Optional[str], typer.Option("--exclude-ops", help="Comma-separated op types to keep in float.")]
KeepOpt = Annotated[Optional[str], typer.Option("--keep", help="Layers kept on a wider integer grid, comma-separated: first, last, lm_head (the last layer writing a model output) or node names, each =BITS (default 8), e.g. lm_head=8.")]
ActDamageOpt = Annotated[Optional[float], typer.Option("--act-damage-limit", help="An activation no Conv/Gemm/MatMul reads stays float when quantizing it alone costs more than this output error (squared error over signal power); inf quantizes every one [default: 3e-4].")]
EmbeddingsOpt = Annotated[Optional[str], typer.Option("--embeddings", help="Embedding tables (read only by Gather): int8 with one scale per row, int4 in blocks of --block-size (32 without it) along each row, looked up by ORT's GatherBlockQuantized, float, or tied: a table that is the transpose of a block-wise MatMul weight (tied input and output embeddings) takes that weight's grid and, exported as MatMulNBits, is looked up in its codes, so the file holds them once (int8 rows where there is no such weight) [default: int8].")]
FloatStemOpt = Annotated[Optional[bool], typer.Option("--float-stem/--no-float-stem", help="Keep a stem Conv with fewer than 27 multiply-accumulates per output (one input channel, 3x3 or 5x5) in float, where ORT runs it faster than its integer kernel; --no-float-stem quantizes it too, for runtimes that want every layer on integers [default: on].")]
SmoothConvsOpt = Annotated[Optional[bool], typer.Option("--smooth-convs/--no-smooth-convs", help="Smoothing for Conv inputs written by a Mul by a constant (the end of a hard-swish): evens out the channels of depthwise-separable CNNs (MobileNetV3, PP-LCNet, PicoDet), at the cost of running those hard-swishes in float [default: off].")]
SmoothOpt = Annotated[Optional[bool], typer.Option("--smooth/--no-smooth", help="SmoothQuant: move activation outliers of normalized tensors into the weights of the GEMMs that read them, strength chosen per tensor [default: on].")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed [default: 0].")]
RecipeOpt = Annotated[Optional[Path], typer.Option("--recipe", help="TOML file with [quant] and [data] tables holding any of these options.")]
EvalDataOpt = Annotated[Optional[str], typer.Option("--eval-data", help="Held-out data for fidelity (an .npz may carry `labels`).")]
EvalSamplesOpt = Annotated[int, typer.Option("--eval-samples", help="Samples to measure fidelity on.")]
StreamOpt = Annotated[Optional[bool], typer.Option("--stream/--no-stream", help="Weight-only int2/4/8 blocks (--acts none --block-size B) read, quantized and written one tensor at a time, for models larger than memory; with --data, rounded by GPTQ as the data runs through the model a segment at a time [default: on for models over 2 GiB when the options allow it].")]
LatencyOpt = Annotated[bool, typer.Option("--latency/--no-latency", help="Time the float and quantized models at batch 1 for the card, taking turns on the same real samples (about 3 s).")]
ContainerOpt = Annotated[str, typer.Option(
    "--container", help="How weight codes are stored: auto (sub-8-bit codes stay small in the file; ORT widens them to "
                        "int8 when it loads the model where its integer kernels run the layer, and decodes the weights "
                        "of weight-only Conv/Gemm/recurrent layers to float then), int8 (widened in the file, for "
                        "runtimes that do not fold constants), or int4 (nothing widened or decoded at load).")]
NativeLayersOpt = Annotated[str, typer.Option(
    "--native-layers", help="With --format native: fastest (layers reading an 8-bit quantized activation go to ORT's "
                            "integer kernels, which run them faster, the rest to ptqcli's operators) or all (every "
                            "layer a ptqcli operator takes).")]
FormatOpt = Annotated[str, typer.Option(
    "--format", help="qdq: QuantizeLinear/DequantizeLinear pairs any ONNX Runtime runs (block-wise weight-only MatMuls "
                     "as its MatMulNBits); onnx: standard ONNX ops only (block-wise DequantizeLinear, opset 21); native: int2-int4, "
                     "binary, ternary and pow2 layers as ptqcli custom operators (packed weights, integer kernels).")]


def user_errors(fn):
    """Domain errors become one red line and exit code 1; never a traceback unless PTQ_DEBUG is set."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PtqError as exc:
            err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("[red]interrupted[/red]")
            raise typer.Exit(130) from None
        except Exception as exc:  # a bug, not bad input: still one line, with a way to see more
            if os.environ.get("PTQ_DEBUG"):
                raise
            err.print(f"[red]error:[/red] internal error: {type(exc).__name__}: {escape(str(exc))} (set PTQ_DEBUG=1 for a traceback)",
                      highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


@contextlib.contextmanager
def rich_progress(description: str, total: int | None):
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn()]
    with Progress(*columns, console=err, transient=False, disable=not err.is_terminal and "PTQ_PROGRESS" not in os.environ) as bar:
        task = bar.add_task(description, total=total)

        def advance(n: int, note: str | None = None) -> None:
            bar.update(task, advance=n, description=f"{description}: {note}" if note else description)

        yield advance


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise PtqError(f"{flag} takes comma-separated numbers (got {text!r})") from None


def _names(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(v.strip() for v in text.split(",") if v.strip())


def _configs(recipe, data, synthetic, num_samples, batch_size, resize, mean, std, layout, color, weights, acts, granularity,
             act_symmetric, method, weight_method, rounding, iters, bias_correction, percentile, reduce_range, exclude_nodes, exclude_ops, seed, binary_acts=None,
             act_damage_limit=None, smooth=None, block_size=None, weight_zero_points=None, accuracy_level=None,
             feedback=None, whole_feeds=None, embeddings=None, keep=None, float_zero_points=None, act_order=None,
             synthetic_backend=None, smooth_convs=None, float_stem=None):
    from .export.card import load_recipe

    doc = load_recipe(str(recipe) if recipe else None)
    quant = merge(QuantConfig, doc.get("quant", {}), dict(
        weights=weights, acts=acts, granularity=granularity, act_symmetric=act_symmetric, method=method,
        weight_method=weight_method, rounding=rounding, rounding_iters=iters, bias_correction=bias_correction,
        percentile=percentile, reduce_range=reduce_range, exclude_nodes=_names(exclude_nodes),
        exclude_ops=_names(exclude_ops), seed=seed, binary_acts=_names(binary_acts),
        act_damage_limit=act_damage_limit, smooth=smooth, smooth_convs=smooth_convs, block_size=block_size,
        embeddings=embeddings,
        weight_symmetric=None if weight_zero_points is None else not weight_zero_points,
        accuracy_level=accuracy_level, keep=_names(keep), float_zero_points=float_zero_points,
        act_order=act_order, float_stem=float_stem), "quant options")
    data_cfg = merge(DataConfig, doc.get("data", {}), dict(
        path=data, synthetic=synthetic, synthetic_iters=iters if synthetic else None, synthetic_backend=synthetic_backend, num_samples=num_samples, batch_size=batch_size, resize=resize, mean=_floats(mean, "--mean"),
        std=_floats(std, "--std"), layout=layout, color=color, feedback=feedback,
        whole_feeds=whole_feeds), "data options")
    return quant, data_cfg


@app.command()
@user_errors
def inspect(model: ModelArg):
    """Layers, parameters, quantizable ops, and whether BatchNorm is present or folded."""
    from .report import inspect_tables

    for table in inspect_tables(model):
        out.print(table)


@app.command()
@user_errors
def calibrate(model: ModelArg, output: Annotated[Path, typer.Option("-o", "--output", help="Run directory.")],
              data: DataOpt = None, synthetic: SyntheticOpt = None, synthetic_backend: SyntheticBackendOpt = None,
              num_samples: NumSamplesOpt = None,
              batch_size: BatchOpt = None,
              resize: ResizeOpt = None, mean: MeanOpt = None, std: StdOpt = None, layout: LayoutOpt = None,
              color: ColorOpt = None, feedback: FeedbackOpt = None, whole_feeds: WholeFeedsOpt = None, weights: WeightsOpt = None, acts: ActsOpt = None,
              granularity: GranularityOpt = None, act_symmetric: ActSymOpt = None, method: MethodOpt = None,
              weight_method: WeightMethodOpt = None, rounding: RoundingOpt = None, iters: RoundingItersOpt = None,
              bias_correction: BiasCorrOpt = None, percentile: PercentileOpt = None, reduce_range: ReduceOpt = None, exclude_nodes: ExcludeNodesOpt = None,
              exclude_ops: ExcludeOpsOpt = None, binary_acts: BinaryActsOpt = None, seed: SeedOpt = None, recipe: RecipeOpt = None,
              act_damage_limit: ActDamageOpt = None, smooth: SmoothOpt = None, smooth_convs: SmoothConvsOpt = None,
             float_stem: FloatStemOpt = None,
             embeddings: EmbeddingsOpt = None,
             block_size: BlockOpt = None, weight_zero_points: WeightZeroOpt = None, accuracy_level: AccuracyOpt = None, keep: KeepOpt = None,
             float_zero_points: FloatZeroOpt = None, act_order: ActOrderOpt = None, ray: RayOpt = None,
             workers: WorkersOpt = 2):
    """Observe activations on calibration data; write statistics and a plan to a run directory."""
    from . import stages
    from .report import plan_table

    quant, data_cfg = _configs(recipe, data, synthetic, num_samples, batch_size, resize, mean, std, layout, color, weights, acts,
                               granularity, act_symmetric, method, weight_method, rounding, iters, bias_correction, percentile,
                               reduce_range, exclude_nodes,
                               exclude_ops, seed, binary_acts, act_damage_limit, smooth,
                               block_size, weight_zero_points, accuracy_level, feedback, whole_feeds, embeddings, keep,
                               float_zero_points, act_order, synthetic_backend, smooth_convs, float_stem)
    plan = stages.calibrate(model, quant, data_cfg, output, rich_progress, Workers(ray, workers))
    out.print(plan_table(plan))
    out.print(f"run directory: [bold]{output}[/bold]")


@app.command()
@user_errors
def export(run: RunArg, output: Annotated[Path, typer.Option("-o", "--output", help="Quantized model to write.")],
           eval_data: EvalDataOpt = None, eval_samples: EvalSamplesOpt = 1000, fmt: FormatOpt = "qdq",
           latency: LatencyOpt = True, container: ContainerOpt = "auto", native_layers: NativeLayersOpt = "fastest"):
    """Write the quantized model from a run directory and measure its fidelity against the float model."""
    from . import stages

    _, fidelity = stages.export(run, output, eval_data, eval_samples, rich_progress, fmt, latency, container,
                                native_layers)
    _print_export(output, fidelity)
    out.print(f"wrote [bold]{output}[/bold]")


def _streams(model: Path, quant, data_cfg, fmt: str, stream: bool | None, run_dir) -> bool:
    """Whether `ptq quantize` goes weight by weight (export/stream.py): when asked, or by default
    for a model over 2 GiB whose options allow it."""
    from .export.stream import STREAM_BYTES, stored_bytes, streaming_problem

    if stream is False:
        return False
    problem = streaming_problem(quant, data_cfg, fmt)
    if stream is None:
        size = stored_bytes(model)
        if size <= STREAM_BYTES or problem is not None:
            return False
        out.print(f"{model.name} holds {size / 2**30:.1f} GiB: quantizing weight by weight (--no-stream to hold it in memory)")
    if problem is not None:
        raise PtqError(f"--stream cannot take {problem}")
    if run_dir is not None:
        raise PtqError("--stream writes no run directory (it would hold the float model whole): drop --run-dir, "
                       "or use --no-stream")
    return True


def _print_native(output: Path) -> None:
    """Which layers a native export turned into ptqcli operators, and why the others stayed QDQ
    (layers kept for one reason listed together)."""
    import json
    from collections import Counter

    from .export.card import card_paths

    native = json.loads(card_paths(output)["json"].read_text())["model"].get("native")
    if not native:
        return
    ops = Counter(native["replaced"].values())
    out.print("native operators: " + (", ".join(f"{op} x{n}" for op, n in sorted(ops.items())) or "none"))
    by_reason: dict[str, list[str]] = {}
    for node, why in native["kept"].items():
        by_reason.setdefault(why, []).append(node)
    for why, nodes in by_reason.items():
        named = ", ".join(nodes[:3]) + (f" and {len(nodes) - 3} more" if len(nodes) > 3 else "")
        out.print(f"  kept as QDQ: {named} ({why})")


def _print_export(output: Path, fidelity) -> None:
    """What an export measured and chose: fidelity, native operators, weight containers, speed."""
    _print_fidelity(fidelity)
    _print_native(output)
    _print_container(output)
    _print_latency(output)


def _print_latency(output: Path) -> None:
    """The batch-1 speed-up the card measured, and a warning when the quantized model is the slower."""
    import json

    from .export.card import card_paths
    from .export.card_render import ops_summary

    results = json.loads(card_paths(output)["json"].read_text())["results"]
    lat = results.get("latency") or {}
    if lat.get("speedup") is None:
        return
    line = (f"batch-1 latency on {lat['cpu']}: float {lat['float_ms']:.3f} ms, quantized {lat['quantized_ms']:.3f} ms, "
            f"speed-up {lat['speedup']:.2f}x")
    if lat["speedup"] < 1.0:
        between = results.get("float_between_qdq") or {}
        why = (f"; ORT runs these in float between a DequantizeLinear and a QuantizeLinear: {ops_summary(between)}"
               if between else "")
        line = f"[yellow]{line}: slower than float here{why}[/yellow]"
    out.print(line)


def _print_container(output: Path) -> None:
    """Which sub-8-bit layers are read as int8 codes by ORT's integer kernels, and which of them did not fuse."""
    import json

    from .export.card import card_paths
    from .export.card_render import container_summary

    container = json.loads(card_paths(output)["json"].read_text())["model"].get("container")
    if not container or not any(container.get(key) for key in ("int8", "indexed", "decoded", "bias_fused")):
        return
    out.print(container_summary(container))
    for node, kernel in container.get("not_fused", {}).items():
        out.print(f"  [yellow]read as int8 but not fused:[/yellow] {node} ({kernel})")


@app.command("run")
@user_errors
def run_command(model: ModelArg,
                data: Annotated[str, typer.Option("--data", help="Samples: .npy, .npz (with labels for top-1), image folder.")],
                num_samples: Annotated[int, typer.Option("--num-samples", help="Samples to run.")] = 1000,
                batch_size: BatchOpt = None, resize: ResizeOpt = None, mean: MeanOpt = None, std: StdOpt = None,
                layout: LayoutOpt = None, color: ColorOpt = None, feedback: FeedbackOpt = None,
                whole_feeds: WholeFeedsOpt = None,
                save: Annotated[Optional[Path], typer.Option("--save-outputs", help="Write the outputs to this .npz.")] = None):
    """Run a model (float, QDQ, or with ptqcli's native operators) on data: top-1 and latency."""
    from rich.table import Table

    import numpy as np

    from . import stages
    from .files import check_writable, write_atomic

    if save is not None:
        check_writable(save)
    cfg = merge(DataConfig, {}, dict(path=data, num_samples=num_samples, batch_size=batch_size, resize=resize,
                                     mean=_floats(mean, "--mean"), std=_floats(std, "--std"), layout=layout,
                                     color=color, feedback=feedback, whole_feeds=whole_feeds), "data options")
    result = stages.run_model(model, cfg, rich_progress)
    table = Table(title=f"{model.name} on {result.samples} samples")
    for column in ("top-1", "ms per batch", "batch"):
        table.add_column(column, justify="right")
    table.add_row("-" if result.top1 is None else f"{100 * result.top1:.2f}%", f"{result.ms_per_batch:.3f}",
                  str(result.batch_size))
    out.print(table)
    if save is not None:
        import io

        buffer = io.BytesIO()
        np.savez(buffer, **result.outputs)
        write_atomic(save, buffer.getvalue())
        out.print(f"wrote [bold]{save}[/bold]")


@app.command()
@user_errors
def quantize(model: ModelArg, output: Annotated[Path, typer.Option("-o", "--output", help="Quantized model to write.")],
             run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Run directory [default: OUTPUT.run/].")] = None,
             data: DataOpt = None, synthetic: SyntheticOpt = None, synthetic_backend: SyntheticBackendOpt = None,
              num_samples: NumSamplesOpt = None,
             batch_size: BatchOpt = None,
             resize: ResizeOpt = None, mean: MeanOpt = None, std: StdOpt = None, layout: LayoutOpt = None,
             color: ColorOpt = None, feedback: FeedbackOpt = None, whole_feeds: WholeFeedsOpt = None, weights: WeightsOpt = None, acts: ActsOpt = None,
             granularity: GranularityOpt = None, act_symmetric: ActSymOpt = None, method: MethodOpt = None,
             weight_method: WeightMethodOpt = None, rounding: RoundingOpt = None, iters: RoundingItersOpt = None,
              bias_correction: BiasCorrOpt = None, percentile: PercentileOpt = None, reduce_range: ReduceOpt = None, exclude_nodes: ExcludeNodesOpt = None,
             exclude_ops: ExcludeOpsOpt = None, binary_acts: BinaryActsOpt = None, seed: SeedOpt = None, recipe: RecipeOpt = None,
             act_damage_limit: ActDamageOpt = None, smooth: SmoothOpt = None, smooth_convs: SmoothConvsOpt = None,
             float_stem: FloatStemOpt = None,
             embeddings: EmbeddingsOpt = None,
             block_size: BlockOpt = None, weight_zero_points: WeightZeroOpt = None, accuracy_level: AccuracyOpt = None, keep: KeepOpt = None,
             float_zero_points: FloatZeroOpt = None, act_order: ActOrderOpt = None,
             eval_data: EvalDataOpt = None, eval_samples: EvalSamplesOpt = 1000, fmt: FormatOpt = "qdq",
             latency: LatencyOpt = True, container: ContainerOpt = "auto", stream: StreamOpt = None,
             native_layers: NativeLayersOpt = "fastest"):
    """Calibrate and export in one go."""
    from dataclasses import replace

    from . import stages
    from .files import check_writable
    from .report import plan_table

    quant, data_cfg = _configs(recipe, data, synthetic, num_samples, batch_size, resize, mean, std, layout, color, weights, acts,
                               granularity, act_symmetric, method, weight_method, rounding, iters, bias_correction, percentile,
                               reduce_range, exclude_nodes,
                               exclude_ops, seed, binary_acts, act_damage_limit, smooth,
                               block_size, weight_zero_points, accuracy_level, feedback, whole_feeds, embeddings, keep,
                               float_zero_points, act_order, synthetic_backend, smooth_convs, float_stem)
    if _streams(model, quant, data_cfg, fmt, stream, run_dir):
        check_writable(output)
        plan, fidelity = stages.quantize_streaming(model, output, quant, data_cfg, rich_progress, eval_data, eval_samples)
        out.print(plan_table(plan))
        _print_fidelity(fidelity)
        out.print(f"wrote [bold]{output}[/bold] and {output.name}.data, one tensor at a time (no run directory; "
                  "latency not measured: it would load the float model whole)")
        return
    run = run_dir or output.with_name(output.name + ".run")
    check_writable(output)
    if eval_data is not None:
        stages.check_data(model, eval_data, replace(data_cfg, path=eval_data), eval_samples)
    stages.check_export_options(fmt, container, native_layers)
    plan = stages.calibrate(model, quant, data_cfg, run, rich_progress)
    out.print(plan_table(plan))
    _, fidelity = stages.export(run, output, eval_data, eval_samples, rich_progress, fmt, latency, container,
                                native_layers)
    _print_export(output, fidelity)
    out.print(f"wrote [bold]{output}[/bold] (run directory {run})")


@app.command()
@user_errors
def allocate(run: RunArg,
             budget: Annotated[Optional[str], typer.Option("--budget", help="Weight size budget, e.g. 3.5MB, 700KiB.")] = None,
             budget_bits: Annotated[Optional[float], typer.Option("--budget-bits", help="Average weight bits over the layers.")] = None,
             budget_bops: Annotated[Optional[float], typer.Option("--budget-bops", help="Bit-operations per sample.")] = None,
             max_damage: Annotated[Optional[float], typer.Option("--max-damage", help="Least size whose summed damage stays under this.")] = None,
             weight_candidates: Annotated[str, typer.Option("--weight-candidates", help="Weight formats to choose from: bit-widths (8,4,3,2) or formats (int4, pow2:4, exp:3, ternary, binary).")] = "8,4,3,2",
             act_candidates: Annotated[str, typer.Option("--act-candidates", help="Activation bit-widths to choose from (8, 4).")] = "8",
             keep: Annotated[Optional[str], typer.Option("--keep", help="Pinned layers: first, last, node names, each =BITS (default 8).")] = None,
             samples: Annotated[int, typer.Option("--samples", help="Calibration samples for the sensitivity runs.")] = 64,
             ray: RayOpt = None, workers: WorkersOpt = 2,
             time_limit: Annotated[Optional[float], typer.Option("--time-limit", help="Seconds the solver may take.")] = None,
             pareto: Annotated[bool, typer.Option("--pareto", help="Sweep budgets; export and evaluate every plan; write a CSV and PNG.")] = False,
             max_drop: Annotated[Optional[float], typer.Option("--max-drop", help="Move the fewest layers or activations back to float, most harmful first, until the exported model is within this of float on --eval-data: accuracy points with labels, else 1 - mean output cosine, or --metric's drop.")] = None,
             metric: Annotated[Optional[str], typer.Option("--metric", help="With --max-drop: module:function or path/to/file.py:function, called as function(float_outputs, quant_outputs) -> float, higher is better (each a dict of output name -> array over the evaluation samples); drop = function(float, float) - function(float, quantized).")] = None,
             move: Annotated[Optional[str], typer.Option("--move", help="With --max-drop: what may go back to float: layers, activations, or both (default: both, as layers,activations).")] = None,
             proof_evals: Annotated[Optional[int], typer.Option("--proof-evals", help="With --max-drop: try every set smaller than the one found when that takes at most this many more evaluations, proving it the fewest (default 64).")] = None,
             to: Annotated[Optional[str], typer.Option("--to", help="With --max-drop: where moved layers and activations go: float (default), or int16 (symmetric 16-bit grids, for runtimes such as NPUs that run int16 in integers).")] = None,
             eval_data: EvalDataOpt = None, eval_samples: EvalSamplesOpt = 1000):
    """Choose per-layer bit-widths under a budget by integer programming, or move layers to float until
    an accuracy target holds (--max-drop)."""
    from rich.table import Table

    from .allocate.costs import parse_size
    from .allocate.stage import AllocationConfig, Budget, load_context
    from .stages import allocate as run_allocation

    budgets = (budget, budget_bits, budget_bops, max_damage)
    if max_drop is not None:
        if pareto or any(v is not None for v in budgets):
            raise PtqError("give --max-drop alone, without a budget or --pareto")
        _fall_back(run, max_drop, eval_data, eval_samples, metric, move, proof_evals, to or "float")
        return
    if metric is not None or move is not None or proof_evals is not None or to is not None:
        raise PtqError("--metric, --move, --proof-evals and --to go with --max-drop")
    cfg = AllocationConfig(weight_formats=tuple(f"int{v}" if v.strip().isdigit() else v.strip()
                                                for v in weight_candidates.split(",") if v.strip()),
                           act_bits=_ints(act_candidates, "--act-candidates"),
                           keep=_names(keep) or (), samples=samples, time_limit=time_limit,
                           workers=Workers(ray, workers))
    if pareto:
        _pareto(load_context(run), cfg, eval_data, eval_samples)
        return
    given = [(k, v) for k, v in (("size", budget), ("bits", budget_bits), ("bops", budget_bops), ("damage", max_damage))
             if v is not None]
    if len(given) != 1:
        raise PtqError("give exactly one of --budget, --budget-bits, --budget-bops, --max-damage, --max-drop "
                       "(or --pareto)")
    kind, value = given[0]
    target = Budget(kind, parse_size(value) if kind == "size" else float(value))
    plan, solution, rows = run_allocation(run, target, cfg, rich_progress)
    table = Table(title=f"allocation ({solution.solver}: {solution.status})")
    for col in ("node", "format", "params", "damage", "cost"):
        table.add_column(col, justify="left" if col in ("node", "format") else "right")
    for row in rows:
        table.add_row(row["node"], row["option"], f"{row['params']:,}", f"{row['damage']:.5f}", f"{row['cost']:,.0f}")
    table.caption = f"objective (summed damage) {solution.damage:.5f}; total {kind} {solution.cost:,.0f}"
    out.print(table)
    out.print(f"plan written to [bold]{run}[/bold]; `ptq export {run} -o OUT.onnx` builds the mixed-precision model")


def _fall_back(run: Path, max_drop: float, eval_data, eval_samples: int, metric, move, proof_evals,
               destination: str) -> None:
    from rich.table import Table

    from .allocate.fallback import KINDS, PROOF_BUDGET
    from .allocate.target import fall_back

    result = fall_back(run, max_drop, eval_data, eval_samples, metric, _names(move) or KINDS,
                       PROOF_BUDGET if proof_evals is None else proof_evals, rich_progress, destination)
    search, show, evaluation = result.search, result.score.describe, result.record["evaluation"]
    table = Table(title=f"moved to {destination} to meet --max-drop {max_drop:g}")
    for col in ("moved", "kind", "drop recovered alone"):
        table.add_column(col, justify="right" if col.startswith("drop") else "left")
    for m in search.moved:
        table.add_row(m.label, m.kind, show(search.harm[m]))
    if not search.moved:
        outcome = "the target already holds: nothing moved"
    elif search.proven_fewest:
        outcome = f"{len(search.moved)} of {len(search.harm)} moved, the fewest possible (every smaller set tried)"
    else:
        outcome = (f"{len(search.moved)} of {len(search.harm)} moved; not proven the fewest (trying every smaller "
                   "set would take more than --proof-evals evaluations)")
    table.caption = (f"measure: {result.score.description}; drop {show(search.drop_before)} -> "
                     f"{show(search.drop_after)}, target {show(max_drop)}; {outcome}; {search.evaluations} plans "
                     f"exported and run on {evaluation['samples']} samples of {evaluation['source']}")
    out.print(table)
    out.print(f"plan written to [bold]{run}[/bold]; `ptq export {run} -o OUT.onnx` builds the model")


def _pareto(ctx, cfg, eval_data, eval_samples) -> None:
    from rich.table import Table

    from .allocate.pareto import sweep, sweep_size, to_csv, to_png
    from .rundir import write_atomic

    with rich_progress("exporting and evaluating plans", sweep_size(cfg, 6)) as advance:
        points = sweep(ctx, cfg, eval_data, eval_samples, advance=advance)
    write_atomic(ctx.path / "pareto.csv", to_csv(points).encode())
    write_atomic(ctx.path / "pareto.png", to_png(points, f"{ctx.path}: measured quality vs weight size"))
    table = Table(title=f"Pareto sweep ({points[0].metric})")
    for col in ("method", "budget", "size bytes", "damage proxy", "quality"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for p in sorted(points, key=lambda p: (p.size_bytes, p.method)):
        table.add_row(p.method, p.label, f"{p.size_bytes:,}", f"{p.damage:.4f}", f"{p.quality:.2f}")
    out.print(table)
    out.print(f"wrote {ctx.path / 'pareto.csv'} and {ctx.path / 'pareto.png'}")


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise PtqError(f"{flag} takes comma-separated whole numbers (got {text!r})") from None


@app.command()
@user_errors
def mask(target: Annotated[Path, typer.Argument(help="An ONNX model, or a run directory from `ptq calibrate`.")],
         nm: Annotated[str, typer.Option("--nm", help="N:M sparsity, e.g. 2:4.")],
         output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Run directory to write (a model input needs one; a run directory is updated in place).")] = None,
         transposable: Annotated[bool, typer.Option("--transposable", help="Masks whose transpose is N:M too (min-cost flow per block).")] = False,
         method: Annotated[str, typer.Option("--method", help="Transposable masks: exact or approx.")] = "exact",
         layers: Annotated[Optional[str], typer.Option("--layers", help="Comma-separated node names [default: every weighted layer].")] = None,
         refit: Annotated[bool, typer.Option("--refit/--no-refit", help="Re-fit the kept weights on calibration data (--data, or a run's own), where it helps on held-out samples.")] = True,
         data: DataOpt = None,
         samples: Annotated[int, typer.Option("--samples", help="Calibration samples for the re-fit.")] = 256):
    """N:M sparsity masks (optionally transposable), applied to the weights before quantization."""
    from rich.table import Table

    from .masks.stage import MaskConfig, mask_model, parse_nm

    n, m = parse_nm(nm)
    cfg = MaskConfig(n, m, transposable, method, _names(layers) or (), refit, samples)
    if target.is_dir():
        if output is not None and output.resolve() != target.resolve():
            raise PtqError("a run directory is masked in place: drop -o or give the same directory")
        from .stages import mask as mask_in_place

        _, report = mask_in_place(target, cfg, rich_progress)
        where = target
    else:
        if output is None:
            raise PtqError("masking a model needs -o RUN_DIR")
        from .stages import load_prepared, refuse_quantized
        from .calibrate.select import select
        from .config import QuantConfig

        refuse_quantized(target)
        g = load_prepared(target)
        if refit and data is None:
            out.print("no --data: masks without a re-fit")
        report = mask_model(g, select(g, QuantConfig()).layers, cfg, DataConfig(path=data) if data else None, output)
        where = output
    table = Table(title=f"{nm}{' transposable' if transposable else ''} masks ({method})")
    for col in ("node", "density", "held-out MSE masked", "held-out MSE re-fit", "re-fit strength",
                "log10 diversity / weight"):
        table.add_column(col, justify="left" if col == "node" else "right")
    fmt = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
    for row in report:
        strength = row.get("refit_strength")
        kept_plain = row["output_mse_masked"] is not None and strength is None
        table.add_row(row["node"], f"{row['density']:.3f}", fmt(row["output_mse_masked"]), fmt(row["output_mse_refit"]),
                      "plain mask kept" if kept_plain else fmt(strength), fmt(row["log10_diversity_per_weight"]))
    out.print(table)
    out.print(f"masks written to [bold]{where}[/bold]")


@app.command()
@user_errors
def gate(card: Annotated[Path, typer.Argument(help="Quantization card (JSON) written by `ptq export`.")],
         max_drop: Annotated[Optional[float], typer.Option("--max-drop", help="Largest accuracy drop vs float, in points.")] = None,
         min_agreement: Annotated[Optional[float], typer.Option("--min-agreement", help="Smallest top-1 agreement with float, in %.")] = None,
         min_compression: Annotated[Optional[float], typer.Option("--min-compression", help="Smallest weight compression ratio.")] = None,
         max_latency_ms: Annotated[Optional[float], typer.Option("--max-latency-ms", help="Largest batch-1 latency of the quantized model.")] = None,
         min_speedup: Annotated[Optional[float], typer.Option("--min-speedup", help="Smallest batch-1 speed-up over float the card measured (float ms / quantized ms).")] = None,
         max_ppl_increase: Annotated[Optional[float], typer.Option("--max-ppl-increase", help="Largest rise of a language model's next-token perplexity over float, in %.")] = None,
         baseline: Annotated[Optional[Path], typer.Option("--baseline", help="An older card to compare against.")] = None,
         max_regression: Annotated[Optional[float], typer.Option("--max-regression", help="Largest quality loss vs --baseline, in points [default: 0].")] = None,
         limits: Annotated[Optional[Path], typer.Option("--limits", help="TOML file with a [gate] table of these limits.")] = None):
    """Pass or fail a quantization card against limits; exit 0 on pass, 1 on failure."""
    from rich.table import Table

    from .export.card import read_card
    from .export.gate import limits_from, run_gate
    from .config import load_toml_table

    doc = read_card(card)
    base = read_card(baseline) if baseline else None
    given = dict(max_drop=max_drop, min_agreement=min_agreement, min_compression=min_compression,
                 max_latency_ms=max_latency_ms, max_regression=max_regression, max_ppl_increase=max_ppl_increase,
                 min_speedup=min_speedup)
    table_values = {k.replace("-", "_"): v for k, v in load_toml_table(str(limits), "gate").items()} if limits else {}
    checks = run_gate(doc, limits_from({**table_values, **{k: v for k, v in given.items() if v is not None}}), base)
    table = Table(title=f"gate: {card}")
    for col in ("check", "limit", "actual", "result"):
        table.add_column(col)
    for c in checks:
        table.add_row(c.name, c.limit, c.actual, "[green]pass[/green]" if c.passed else "[red]FAIL[/red]")
    out.print(table)
    failed = [c for c in checks if not c.passed]
    if failed:
        raise PtqError("gate failed: " + "; ".join(f"{c.name}: {c.actual} (limit {c.limit})" for c in failed))


card_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Work with quantization cards.")
app.add_typer(card_app, name="card")


@card_app.command("diff")
@user_errors
def card_diff(a: Annotated[Path, typer.Argument(help="Older card.")], b: Annotated[Path, typer.Argument(help="Newer card.")]):
    """Show every field that differs between two cards."""
    from rich.table import Table

    from .export.card import read_card
    from .export.gate import diff_cards

    rows = diff_cards(read_card(a), read_card(b))
    if not rows:
        out.print("the cards are identical (paths aside)")
        return
    table = Table(title=f"{a} -> {b}")
    for col in ("field", str(a), str(b)):
        table.add_column(col, overflow="fold")
    for key, va, vb in rows:
        table.add_row(key, str(va), str(vb))
    out.print(table)


@app.command()
@user_errors
def doctor():
    """Whether ptqcli's native operators run here: the library file, its kernels and ONNX Runtime C API,
    where its headers came from, and why not when they do not. Exit 1 when they are unavailable."""
    from rich.table import Table

    from . import nativelib

    s = nativelib.status()
    table = Table(title="native operators: " + ("[green]available[/green]" if s.available else "[red]unavailable[/red]"),
                  show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("library", str(s.library) if s.library else "-")
    if s.reason:
        table.add_row("why not", s.reason)
    if s.api_version is not None:
        table.add_row("ORT C API", f"{s.api_version} (asked of the runtime: onnxruntime >= 1.{s.api_version})")
    table.add_row("onnxruntime", s.runtime)
    if s.isa:
        table.add_row("kernels", s.isa)
    headers = (s.build or {}).get("headers")
    if headers:
        release = f"ONNX Runtime {headers['ort_version']} " if headers.get("ort_version") else ""
        table.add_row("built with", f"{release}headers (C API {headers['api_version']}) from {headers['source']}: "
                                    f"{headers['include']}")
    out.print(table)
    if not s.available:
        raise PtqError(f"native operators unavailable: {s.reason}")


def _print_fidelity(fidelity) -> None:
    from .report import fidelity_tables

    if fidelity is None:
        out.print("[yellow]no evaluation data: pass --eval-data to measure fidelity[/yellow]")
        return
    for table in fidelity_tables(fidelity):
        out.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())

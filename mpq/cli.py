"""The `mpq` command line: thin click commands over the library.

Exit codes: 0 success, 1 user error (bad input, unsupported model, budget not met), 2 usage
error (unknown option, missing argument — click's own code).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from mpq import __version__
from mpq.errors import MpqError

EPILOG = "Exit codes: 0 success, 1 user error (bad input, unsupported model), 2 usage error."

# Not a terminal (a pipe, a log, CI): do not squeeze tables into 80 columns.
out = Console(highlight=False, soft_wrap=False,
              width=None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", 160)))
err = Console(stderr=True, highlight=False)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn MpqError (and any unexpected exception) into one line on stderr and exit 1.

    Set MPQ_DEBUG=1 to see the traceback of an unexpected exception.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MpqError as exc:
            err.print(f"[red]error:[/red] {exc}", markup=True, highlight=False, soft_wrap=True)
            sys.exit(1)
        except (click.exceptions.Exit, click.ClickException, KeyboardInterrupt):
            raise
        except Exception as exc:
            if os.environ.get("MPQ_DEBUG"):
                raise
            line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            err.print(f"[red]internal error:[/red] {type(exc).__name__}: {line} "
                      "(set MPQ_DEBUG=1 for details)", soft_wrap=True)
            sys.exit(1)

    return wrapper


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mpq")
def main() -> None:
    """mpq: fit a neural network onto a Cortex-M board with mixed-precision quantisation
    and patch-based inference, and emit the firmware sources."""


# -- boards -------------------------------------------------------------------------------------

@main.command(epilog=EPILOG)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@user_errors
def boards(as_json: bool) -> None:
    """List the boards mpq knows and their memory budgets."""
    from mpq.boards import list_boards

    found = list_boards()
    if as_json:
        click.echo(json.dumps([b.to_dict() for b in found], indent=2, sort_keys=True))
        return
    table = Table(title="Boards (budgets = region − reserves)")
    for col, justify in (("board", "left"), ("mcu", "left"), ("core", "left"), ("fpu", "left"),
                         ("clock", "right"), ("SRAM", "right"), ("SRAM budget", "right"),
                         ("Flash", "right"), ("Flash budget", "right"), ("QEMU", "left")):
        table.add_column(col, justify=justify)
    for b in found:
        table.add_row(b.name, b.mcu, b.core, b.fpu, f"{b.clock_hz / 1e6:g} MHz",
                      _kib(b.sram_region_obj.length), _kib(b.sram_budget),
                      _kib(b.flash_region_obj.length), _kib(b.flash_budget),
                      b.qemu_machine or "-")
    out.print(table)


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"


# -- import -------------------------------------------------------------------------------------

@main.command("import", epilog=EPILOG)
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Normalised ONNX to write (default: MODEL with suffix .mpq.onnx).")
@user_errors
def import_(model: Path, output: Path | None) -> None:
    """Check and normalise a model: fold BatchNorm, fuse activations and pads, NHWC layout.

    Writes an ONNX file that onnxruntime runs with the same outputs as MODEL and that every
    later mpq command accepts.
    """
    from mpq.fileio import write_atomic
    from mpq.frontend import load_model
    from mpq.frontend.onnx_writer import graph_to_onnx

    graph = load_model(model)
    target = output or model.with_name(model.name.split(".")[0] + ".mpq.onnx")
    if target.resolve() == model.resolve():
        raise MpqError(f"{target}: refusing to overwrite the input model")
    data = graph_to_onnx(graph).SerializeToString()
    write_atomic(target, data)
    counts: dict[str, int] = {}
    for n in graph.nodes:
        counts[n.kind] = counts.get(n.kind, 0) + 1
    ops = ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items()))
    out.print(f"[bold]{model}[/bold] → {target}")
    for name in graph.inputs:
        out.print(f"  input  {name}: {list(graph.tensors[name].shape)} "
                  f"(IR NHWC; given as {graph.input_layouts[name].upper()})")
    for name in graph.outputs:
        out.print(f"  output {name}: {list(graph.tensors[name].shape)}")
    out.print(f"  {len(graph.nodes)} layers: {ops}")
    if graph.notes:
        out.print("  normalised: " + ", ".join(f"{k} ×{v}" for k, v in graph.notes.items()))


# -- inspect ------------------------------------------------------------------------------------

@main.command(epilog=EPILOG)
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("--board", "board_name", help="Board name or board TOML file to check the fit.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@user_errors
def inspect(model: Path, board_name: str | None, as_json: bool) -> None:
    """Per-layer shapes, MACs, parameters and the int8 memory model of MODEL."""
    from mpq.analysis import summarise
    from mpq.boards import get_board
    from mpq.frontend import load_model

    board = get_board(board_name) if board_name else None
    graph = load_model(model)
    summary = summarise(graph, model.name, board)
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2, sort_keys=True))
        return
    _print_summary(summary)


def _shape(s: list[int]) -> str:
    return "×".join(str(d) for d in s[1:])


def _short(name: str, width: int = 44) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _print_summary(s: Any) -> None:
    table = Table(title=f"{s.model}: layers (int8, layer-based schedule)")
    for col, justify in (("#", "right"), ("layer", "left"), ("op", "left"), ("act", "left"),
                         ("input", "right"), ("output", "right"), ("MACs", "right"),
                         ("params", "right"), ("act bytes", "right"), ("scratch", "right")):
        table.add_column(col, justify=justify)
    for i, layer in enumerate(s.layers):
        table.add_row(str(i), _short(layer.name), layer.op,
                      "" if layer.act == "none" else layer.act, _shape(layer.in_shape),
                      _shape(layer.out_shape), f"{layer.macs:,}", f"{layer.params:,}",
                      f"{layer.act_bytes:,}", f"{layer.scratch_bytes:,}" if layer.scratch_bytes
                      else "")
    out.print(table)
    mem = Table(title="Memory (int8)", show_header=False)
    mem.add_column("what")
    mem.add_column("bytes", justify="right")
    rows = [
        ("MACs", s.macs), ("parameters", s.params),
        ("arena (greedy planner, 16-B aligned)", s.arena_bytes),
        ("largest kernel scratch", s.scratch_bytes),
        ("peak SRAM = arena + scratch", s.peak_sram_bytes),
        ("input buffer (caller's)", s.input_bytes),
        ("Flash: weights + biases + requant", s.flash_bytes),
        ("Flash: code (estimate)", s.code_bytes_estimate),
    ]
    for what, value in rows:
        mem.add_row(what, f"{value:,}")
    out.print(mem)
    if s.fit is not None:
        f = s.fit
        verdict = "[green]fits[/green]" if f.fits else "[red]does not fit[/red]"
        out.print(f"Board [bold]{f.board}[/bold]: {verdict}")
        out.print(f"  SRAM  {f.sram_needed:>10,} of {f.sram_budget:>10,} B  "
                  f"margin {f.sram_margin:>+11,} B")
        out.print(f"  Flash {f.flash_needed:>10,} of {f.flash_budget:>10,} B  "
                  f"margin {f.flash_margin:>+11,} B")


# -- progress ----------------------------------------------------------------------------------

class progress_bar:  # noqa: N801 - used as a context manager like open()
    """A rich progress bar on a terminal; silent when stdout is not a terminal or with --quiet.

    `with progress_bar("calibrating", total) as advance: advance(n)`.
    """

    def __init__(self, description: str, total: int, quiet: bool = False) -> None:
        self.enabled = sys.stdout.isatty() and not quiet
        self.description = description
        self.total = total

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self.progress = Progress("[progress.description]{task.description}", BarColumn(),
                                 MofNCompleteColumn(), TimeRemainingColumn(), console=out,
                                 transient=True)
        self.progress.start()
        task = self.progress.add_task(self.description, total=self.total)
        return lambda n: self.progress.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.progress.stop()


QUIET = click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
METHOD = click.option("--method", type=click.Choice(["minmax", "percentile", "entropy"]),
                      default="minmax", show_default=True,
                      help="How activation ranges are chosen from the statistics.")


def _stats_for(graph: Any, data: Path | None, stats: Path | None, quiet: bool,
               what: str) -> Any:
    """Calibration statistics from a stats file or by calibrating on a data set."""
    from mpq.quant.calibrate import CalibrationStats, calibrate, load_dataset, total_steps

    if stats is not None:
        return CalibrationStats.load(stats, graph)
    if data is None:
        raise MpqError(f"{what} needs calibration data: give --calib/--data D or --stats S")
    ds = load_dataset(data, graph)
    with progress_bar("calibrating", total_steps(ds), quiet) as advance:
        return calibrate(graph, ds, progress=advance)


# -- calibrate ----------------------------------------------------------------------------------

@main.command(epilog=EPILOG)
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("--data", "data", required=True, type=click.Path(path_type=Path),
              help="Calibration data: .npz with x (ONNX input layout) [and y], or a folder "
                   "of .npy files.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Statistics file to write (.npz).")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
@click.option("--bins", default=2048, show_default=True, type=click.IntRange(2),
              help="Histogram bins per tensor.")
@QUIET
@user_errors
def calibrate(model: Path, data: Path, output: Path, batch_size: int, bins: int,
              quiet: bool) -> None:
    """Stream calibration data through MODEL and save per-tensor statistics.

    Min/max, mean and σ, a histogram and percentiles for every activation; two passes, memory
    independent of the number of samples. Activations are computed with onnxruntime.
    """
    from mpq.frontend import load_model
    from mpq.quant.calibrate import calibrate as run_calibration
    from mpq.quant.calibrate import load_dataset, total_steps

    graph = load_model(model)
    ds = load_dataset(data, graph)
    with progress_bar("calibrating", total_steps(ds), quiet) as advance:
        stats = run_calibration(graph, ds, batch_size=batch_size, bins=bins, progress=advance)
    stats.save(output)
    out.print(f"{model} × {len(ds)} samples → {output} ({len(stats.tensors)} tensors, "
              f"{bins} bins, onnxruntime)")


# -- run ----------------------------------------------------------------------------------------

@main.command(epilog=EPILOG)
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("--input", "input_path", required=True, type=click.Path(path_type=Path),
              help=".npy of float inputs in the model's input layout (one sample or a batch).")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Write the integer outputs (int8 values) to this .npy.")
@click.option("--bits", type=click.Choice(["8", "4", "2"]), default="8", show_default=True,
              help="Uniform activation bits (weights stay 8-bit).")
@click.option("--data", type=click.Path(path_type=Path),
              help="Calibration data (for ONNX models).")
@click.option("--stats", type=click.Path(path_type=Path),
              help="Statistics from `mpq calibrate` instead of --data.")
@METHOD
@QUIET
@user_errors
def run(model: Path, input_path: Path, output: Path | None, bits: str, data: Path | None,
        stats: Path | None, method: str, quiet: bool) -> None:
    """Run MODEL through the bit-exact integer reference.

    An int8 .tflite runs with its own quantisation; an ONNX model is quantised with
    calibration data (--data or --stats) at the given activation bits.
    """
    import numpy as np

    from mpq.evaluate import quant_outputs
    from mpq.fileio import write_atomic
    from mpq.quant.calibrate import load_dataset
    from mpq.quant.pipeline import load_for_quantisation, quantise
    from mpq.sim import dequantize

    loaded = load_for_quantisation(model)
    ds = load_dataset(input_path, loaded.graph)
    if loaded.own_quant is not None and bits == "8" and data is None and stats is None:
        qm = loaded.own_quant
    else:
        qm = quantise(loaded.graph, _stats_for(loaded.graph, data, stats, quiet, "mpq run"),
                      int(bits), method)
    ys = np.concatenate([quant_outputs(qm, batch) for batch in ds.batches(256)])
    oq = qm.output_quant()
    if output is not None:
        import io

        buf = io.BytesIO()
        np.save(buf, ys.astype(np.int8))
        write_atomic(output, buf.getvalue())
    real = dequantize(oq, ys)
    flat = ys.reshape(len(ys), -1)
    for i in range(min(len(ys), 8)):
        top = int(real.reshape(len(ys), -1)[i].argmax())
        out.print(f"sample {i}: top-1 {top}  int {flat[i][:12].tolist()}"
                  f"{' …' if flat.shape[1] > 12 else ''}")
    out.print(f"{len(ys)} samples; output scale {oq.scale:.6g}, zero point {oq.zero_point}, "
              f"{oq.bits} bits" + (f"; written to {output}" if output else ""))


# -- eval ---------------------------------------------------------------------------------------

@main.command("eval", epilog=EPILOG)
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Labelled test data: .npz with x and y.")
@click.option("--calib", type=click.Path(path_type=Path),
              help="Calibration data for quantising an ONNX model.")
@click.option("--stats", type=click.Path(path_type=Path),
              help="Statistics from `mpq calibrate` instead of --calib.")
@click.option("--act-bits", default="8", show_default=True,
              help="Comma-separated uniform activation bitwidths to evaluate, e.g. 8,4,2.")
@METHOD
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@QUIET
@user_errors
def eval_(model: Path, data: Path, calib: Path | None, stats: Path | None, act_bits: str,
          method: str, as_json: bool, quiet: bool) -> None:
    """Top-1 accuracy of the float model and of the integer reference, side by side."""
    from mpq.evaluate import accuracy, float_predictions, quant_predictions
    from mpq.quant.calibrate import load_dataset
    from mpq.quant.pipeline import load_for_quantisation, quantise

    try:
        bit_list = [int(b) for b in act_bits.split(",")]
    except ValueError:
        raise MpqError(f"--act-bits must be a comma-separated list of 8, 4, 2, not "
                       f"'{act_bits}'") from None
    loaded = load_for_quantisation(model)
    ds = load_dataset(data, loaded.graph)
    if ds.y is None:
        raise MpqError(f"{data}: evaluation needs labels (y in the .npz)")
    labels = ds.y
    results: dict[str, Any] = {"samples": len(ds)}
    with progress_bar("float", len(ds), quiet) as advance:
        results["float"] = accuracy(float_predictions(model, loaded.graph, ds,
                                                      progress=advance), labels)
    stats_obj = None
    for b in bit_list:
        key = "int8" if b == 8 else f"act{b}"
        if b == 8 and loaded.own_quant is not None and calib is None and stats is None:
            qm = loaded.own_quant
        else:
            if stats_obj is None:
                stats_obj = _stats_for(loaded.graph, calib, stats, quiet, "mpq eval")
            qm = quantise(loaded.graph, stats_obj, b, method)
        with progress_bar(key, len(ds), quiet) as advance:
            results[key] = accuracy(quant_predictions(qm, ds, progress=advance), labels)
    if as_json:
        click.echo(json.dumps(results, indent=2, sort_keys=True))
        return
    table = Table(title=f"{model.name}: top-1 accuracy on {len(ds)} samples")
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    for key, value in results.items():
        if key != "samples":
            table.add_row(key, f"{value:.4f}")
    out.print(table)


if __name__ == "__main__":  # pragma: no cover
    main()

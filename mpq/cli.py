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
from mpq.safetext import error_line, plain, tolerant_streams

EPILOG = "Exit codes: 0 success, 1 user error (bad input, unsupported model), 2 usage error."

tolerant_streams()  # an ASCII stdout gets '->' for '→', never a UnicodeEncodeError
# Not a terminal (a pipe, a log, CI): do not squeeze tables into 80 columns. No emoji: a name
# such as 'a:cat:b' is printed as it is (user text goes through safetext.plain for markup).
out = Console(highlight=False, soft_wrap=True, emoji=False,
              width=None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", 160)))
err = Console(stderr=True, highlight=False, emoji=False)
VERBOSE = False  # `mpq -v …`: phase detail on stderr


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn MpqError (and any unexpected exception) into one line on stderr and exit 1.

    The line is exactly one line whatever the message quotes: control characters are shown
    escaped, markup is not interpreted and over-long names are shortened (mpq.safetext).
    Set MPQ_DEBUG=1 to see the traceback of an unexpected exception.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MpqError as exc:
            err.print(f"[red]error:[/red] {error_line(exc)}", markup=True, highlight=False,
                      soft_wrap=True)
            sys.exit(1)
        except (click.exceptions.Exit, click.ClickException, KeyboardInterrupt):
            raise
        except Exception as exc:
            if os.environ.get("MPQ_DEBUG"):
                raise
            line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            err.print(f"[red]internal error:[/red] {type(exc).__name__}: {error_line(line)} "
                      "(set MPQ_DEBUG=1 for details)", soft_wrap=True)
            sys.exit(1)

    return wrapper


def limit_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The resource limits of `mpq.limits` as options of the `mpq` group, each with its
    environment variable (`mpq --max-elements N import …`, or MPQ_MAX_ELEMENTS=N)."""
    from mpq.limits import DEFAULTS, HELP, OPTIONS

    for name, (option, env, _) in reversed(OPTIONS.items()):
        fn = click.option(option, name, type=click.IntRange(1), envvar=env, show_envvar=True,
                          default=getattr(DEFAULTS, name), show_default=True, metavar="N",
                          help=HELP[name])(fn)
    return fn


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mpq")
@click.option("-v", "--verbose", is_flag=True,
              help="Print each step's detail (search candidates, build commands) on stderr.")
@limit_options
def main(verbose: bool, **limits: int) -> None:
    """mpq: fit a neural network onto a Cortex-M board with mixed-precision quantisation
    and patch-based inference, and emit the firmware sources.

    Progress bars appear on a terminal only (never in pipes or CI logs; -q/--quiet on a
    command turns them off); errors are one line on stderr, in red on a terminal.

    The --max-* options bound the work an untrusted model or data file can ask for; an input
    over a limit is refused with one line naming the option that raises it.
    """
    from mpq.limits import Limits, set_limits

    global VERBOSE
    VERBOSE = verbose
    set_limits(Limits(**limits))
    if verbose:  # the library logs the external commands it runs (compilers, QEMU)
        import logging

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logging.getLogger("mpq").addHandler(handler)
        logging.getLogger("mpq").setLevel(logging.INFO)


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
                         ("Flash", "right"), ("Flash budget", "right"), ("QEMU", "left"),
                         ("data regions, fastest first", "left")):
        table.add_column(col, justify=justify)
    for b in found:
        table.add_row(plain(b.name), plain(b.mcu), plain(b.core), plain(b.fpu),
                      f"{b.clock_hz / 1e6:g} MHz",
                      _kib(b.sram_region_obj.length), _kib(b.sram_budget),
                      _kib(b.flash_region_obj.length), _kib(b.flash_budget),
                      plain(b.qemu_machine or "-"), _data_regions(b))
    out.print(table)


def _data_regions(board: Any) -> str:
    """The board's ranked SRAM regions (`mpq.regions`), fastest first; `-` without."""
    return ", ".join(f"{plain(r.name)} {r.length // 1024:,} KiB"
                     for r in board.data_regions) or "-"


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"


# -- import -------------------------------------------------------------------------------------

@main.command("import", epilog=EPILOG)
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Normalised ONNX to write (default: MODEL with suffix .mpq.onnx).")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success (for Makefiles).")
@user_errors
def import_(model: Path, output: Path | None, quiet: bool) -> None:
    """Check and normalise a model: fold BatchNorm, fuse activations and pads, NHWC layout.

    Writes an ONNX file that onnxruntime runs with the same outputs as MODEL and that every
    later mpq command accepts.
    """
    from mpq.fileio import check_outputs, write_atomic
    from mpq.frontend import load_model
    from mpq.frontend.onnx_writer import graph_to_onnx

    target = output or model.with_name(model.name.split(".")[0] + ".mpq.onnx")
    check_outputs([target], [model])
    graph = load_model(model)
    data = graph_to_onnx(graph).SerializeToString()
    write_atomic(target, data)
    if quiet:
        return
    counts: dict[str, int] = {}
    for n in graph.nodes:
        counts[n.kind] = counts.get(n.kind, 0) + 1
    ops = ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items()))
    out.print(f"[bold]{plain(model)}[/bold] → {plain(target)}")
    for name in graph.inputs:
        out.print(f"  input  {plain(name)}: {list(graph.tensors[name].shape)} "
                  f"(IR NHWC; given as {graph.input_layouts[name].upper()})")
    for name in graph.outputs:
        out.print(f"  output {plain(name)}: {list(graph.tensors[name].shape)}")
    out.print(f"  {len(graph.nodes)} layers: {plain(ops)}")
    if graph.notes:
        out.print("  normalised: " + plain(", ".join(f"{k} ×{v}"
                                                     for k, v in graph.notes.items())))


# -- inspect ------------------------------------------------------------------------------------

@main.command(epilog=EPILOG)
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("--board", "board_name", help="Board name or board TOML file to check the fit.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option("--compress", is_flag=True,
              help="Also report the exported weight blob's size: raw, gzip and lzma.")
@click.option("--weights", "weights_spec", default=None,
              help="Weight scheme of --compress (default linear:8): linear, wentropy, sym "
                   "or pow2, with :BITS.")
@click.option("--io", type=click.Choice(["arena", "external"]), default="arena",
              show_default=True, help="Where the input and outputs live, as `mpq search --io`.")
@click.option("--order", type=click.Choice(["memory", "file"]), default="memory",
              show_default=True,
              help="Execution order of branching graphs, as `mpq search --order`.")
@click.option("--overlap/--no-overlap", default=True, show_default=True,
              help="Outputs written over their dying inputs, as `mpq search --overlap`.")
@click.option("--scratch", type=click.Choice(["arena", "separate"]), default="arena",
              show_default=True, help="Where the kernels' scratch lives, as `mpq search "
                                      "--scratch`.")
@user_errors
def inspect(model: Path, board_name: str | None, as_json: bool, compress: bool,
            weights_spec: str | None, io: str, order: str, overlap: bool,
            scratch: str = "arena") -> None:
    """Per-layer shapes, MACs, parameters and the int8 memory model of MODEL (layers in the
    order the search would run them)."""
    from mpq.analysis import summarise, weight_compression
    from mpq.boards import get_board
    from mpq.frontend import load_model
    from mpq.order import memory_ordered
    from mpq.quant.weights import parse_weights

    if weights_spec is not None and not compress:
        raise click.UsageError("--weights goes with --compress")
    spec = parse_weights(weights_spec or "linear:8", for_export=True)
    board = get_board(board_name) if board_name else None
    graph = load_model(model)
    if order == "memory":
        graph, _ = memory_ordered(graph)
    summary = summarise(graph, model.name, board, io=io, overlap=overlap, scratch=scratch)
    if compress:
        summary.compress = weight_compression(graph, spec)
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2, sort_keys=True))
        return
    _print_summary(summary)
    if summary.compress is not None:
        c = summary.compress
        table = Table(title=f"Weight blob ({plain(c['weights'])}: {c['layers']} layers, "
                            f"{c['parameters']:,} parameters)")
        for col in ("", "bytes", "vs raw", "bits/weight"):
            table.add_column(col, justify="right")
        for key in ("raw", "gzip", "lzma"):
            table.add_row(key, f"{c[key]:,}", f"{c[key] / max(c['raw'], 1):.3f}",
                          f"{8 * c[key] / max(c['parameters'], 1):.3f}")
        out.print(table)


def _shape(s: list[int]) -> str:
    return "×".join(str(d) for d in s[1:])


def _short(name: str, width: int = 44) -> str:
    """A name for a table cell: one line, markup-safe, at most `width` characters."""
    return plain(name, width)


def _print_summary(s: Any) -> None:
    table = Table(title=f"{plain(s.model)}: layers (int8, layer-based schedule)")
    for col, justify in (("#", "right"), ("layer", "left"), ("op", "left"), ("act", "left"),
                         ("input", "right"), ("output", "right"), ("MACs", "right"),
                         ("params", "right"), ("act bytes", "right"), ("scratch", "right")):
        table.add_column(col, justify=justify)
    for i, layer in enumerate(s.layers):
        table.add_row(str(i), _short(layer.name), plain(layer.op),
                      "" if layer.act == "none" else plain(layer.act), _shape(layer.in_shape),
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
        ("kernel scratch beside the arena" + (" (per layer inside the arena)"
                                               if s.scratch == "arena" else " (largest)"),
         s.scratch_bytes),
        ("peak SRAM = arena + scratch" + (" (input and outputs in the arena)"
                                           if s.io == "arena" else ""), s.peak_sram_bytes),
        ("layers writing over their dying input (overlap)", s.overlapped),
    ]
    if s.io == "external":
        rows += [("input buffer (caller's)", s.input_bytes),
                 ("output buffer (caller's)", s.output_bytes)]
    rows += [
        ("model stack (GCC call-graph bound)", s.stack_bytes),
        ("Flash: weights + biases + requant + tables", s.flash_bytes),
        ("Flash: code (predicted from measured kernel sizes)", s.code_bytes_estimate),
    ]
    for what, value in rows:
        mem.add_row(what, f"{value:,}")
    out.print(mem)
    if s.fit is not None:
        f = s.fit
        verdict = "[green]fits[/green]" if f.fits else "[red]does not fit[/red]"
        out.print(f"Board [bold]{plain(f.board)}[/bold]: {verdict}")
        out.print(f"  SRAM  {f.sram_needed:>10,} of {f.sram_budget:>10,} B  "
                  f"margin {f.sram_margin:>+11,} B")
        out.print(f"  Flash {f.flash_needed:>10,} of {f.flash_budget:>10,} B  "
                  f"margin {f.flash_margin:>+11,} B")


# -- progress ----------------------------------------------------------------------------------

class _Ticker:
    """What `progress_bar` hands out: `tick(n)` advances the bar, `tick.note(msg)` names the
    current phase on the bar and, with -v, also prints it as a line on stderr."""

    def __init__(self, progress: Any = None, task: Any = None) -> None:
        self.progress, self.task = progress, task

    def __call__(self, n: int) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, n)

    def note(self, message: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=plain(message.split(":")[0][:40]))
        if VERBOSE:
            err.print(f"[dim]{plain(message)}[/dim]", highlight=False, soft_wrap=True)


class _PhaseClock:
    """Wall seconds per phase for `-v`: `clock.timed(note)` passes each phase line on with the
    seconds since the previous one (or since the clock started) appended, so a line that ends a
    phase carries that phase's time. Only log lines on stderr get times, never a written file
    (same inputs, same bytes)."""

    def __init__(self) -> None:
        import time

        self.clock = time.perf_counter
        self.start = self.last = self.clock()

    def timed(self, note: Callable[[str], None]) -> Callable[[str], None]:
        def log(message: str) -> None:
            now = self.clock()
            note(f"{message} ({now - self.last:.2f} s)")
            self.last = now

        return log

    def total(self) -> float:
        return self.clock() - self.start


class progress_bar:  # noqa: N801 - used as a context manager like open()
    """A rich progress bar on a terminal; silent when stdout is not a terminal or with --quiet.

    `with progress_bar("calibrating", total) as tick: tick(n); tick.note("scoring")`.
    """

    def __init__(self, description: str, total: int | None, quiet: bool = False) -> None:
        self.enabled = sys.stdout.isatty() and not quiet
        self.description = description
        self.total = total

    def __enter__(self) -> _Ticker:
        if not self.enabled:
            return _Ticker()
        from rich import progress as rp

        self.progress = rp.Progress(rp.SpinnerColumn(),
                                    "[progress.description]{task.description}",
                                    rp.BarColumn(), rp.MofNCompleteColumn(),
                                    rp.TimeElapsedColumn(), console=out, transient=True)
        self.progress.start()
        return _Ticker(self.progress, self.progress.add_task(plain(self.description),
                                                             total=self.total))

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.progress.stop()


QUIET = click.option("-q", "--quiet", is_flag=True, help="No progress bars.")


def ptq_options(fn: Any) -> Any:
    """`--bias-correction` and `--adaround` (mpq.quant.ptq), shared by search and eval."""
    fn = click.option("--adaround/--no-adaround", default=False, show_default=True,
                      help="Fit each 4/2-bit linear layer's round-up/down choices on the "
                           "calibration data (AdaRound).")(fn)
    return click.option("--bias-correction/--no-bias-correction", default=False,
                        show_default=True,
                        help="Remove the mean shift quantisation puts on each conv/FC output "
                             "(fitted on the calibration data).")(fn)
METHOD = click.option("--method", type=click.Choice(["minmax", "percentile", "entropy", "mse"]),
                      default="minmax", show_default=True,
                      help="How activation ranges are chosen from the statistics.")
ENGINE = click.option("--engine", type=click.Choice(["auto", "c", "numpy"]), default="auto",
                      show_default=True,
                      help="How a plan runs: c (its exported C, compiled by the host cc/gcc "
                           "and loaded in-process; same bytes), numpy (the integer "
                           "reference), auto (c when a compiler is present).")


def _plan_runner(plan: Any, graph: Any, engine: str) -> Any:
    """The plan's runner for --engine (mpq.engine), a missing compiler noted on stderr."""
    from mpq.engine import plan_runner

    return plan_runner(plan, graph, engine,
                       lambda msg: err.print(f"note: {plain(msg)}", soft_wrap=True))


def _plan_only_engine(engine: str) -> None:
    """--engine c is for plans; a model runs through the integer reference."""
    if engine == "c":
        raise MpqError("--engine c runs a plan (.json) through its exported C; a model runs "
                       "through the integer reference (drop --engine or give a plan)")


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
    from mpq.fileio import check_outputs
    from mpq.frontend import load_model
    from mpq.quant.calibrate import calibrate as run_calibration
    from mpq.quant.calibrate import load_dataset, total_steps

    check_outputs([output], [model, data])
    graph = load_model(model)
    ds = load_dataset(data, graph)
    with progress_bar("calibrating", total_steps(ds), quiet) as advance:
        stats = run_calibration(graph, ds, batch_size=batch_size, bins=bins, progress=advance)
    stats.save(output)
    out.print(f"{plain(model)} × {len(ds)} samples → {plain(output)} "
              f"({len(stats.tensors)} tensors, {bins} bins, onnxruntime)")


# -- run ----------------------------------------------------------------------------------------

@main.command(epilog=EPILOG)
@click.argument("model", metavar="MODEL_OR_PLAN", type=click.Path(dir_okay=True,
                                                                  path_type=Path))
@click.option("--model", "plan_model", type=click.Path(path_type=Path),
              help="With a plan: the model file (default: the path the plan names).")
@click.option("--input", "input_path", required=True, type=click.Path(path_type=Path),
              help=".npy of float inputs in the model's input layout (one sample or a batch).")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Write the integer outputs (int8 values): a .npy for a one-output model, "
                   "a .npz with one array per output name (every output) otherwise.")
@click.option("--bits", type=click.Choice(["8", "4", "2"]), default="8", show_default=True,
              help="Uniform activation bits (weights stay 8-bit).")
@click.option("--data", type=click.Path(path_type=Path),
              help="Calibration data (for ONNX models).")
@click.option("--stats", type=click.Path(path_type=Path),
              help="Statistics from `mpq calibrate` instead of --data.")
@METHOD
@ENGINE
@QUIET
@user_errors
def run(model: Path, plan_model: Path | None, input_path: Path, output: Path | None,
        bits: str, data: Path | None, stats: Path | None, method: str, engine: str,
        quiet: bool) -> None:
    """Run a model or a plan through the bit-exact integer reference.

    A plan (.json) runs exactly as its firmware will; an int8 .tflite runs with its own
    quantisation; an ONNX model is quantised with calibration data (--data or --stats) at the
    given activation bits. Every output of the model is computed, printed and written.
    """
    import numpy as np

    from mpq.evaluate import quant_output_dict
    from mpq.fileio import check_outputs, write_atomic
    from mpq.quant.calibrate import load_dataset
    from mpq.quant.pipeline import load_for_quantisation, quantise

    check_outputs([output], [model, plan_model, input_path, data, stats])
    if model.suffix.lower() == ".json":
        from mpq.plan import load_plan_with_model

        plan, _, graph = load_plan_with_model(model, plan_model)
        _check_run_output(output, graph.outputs)
        ds = load_dataset(input_path, graph)
        runner = _plan_runner(plan, graph, engine)
        parts = [runner.output_dict(batch) for batch in ds.batches(256)]
        acts = runner.mixed.acts
    else:
        _plan_only_engine(engine)
        loaded = load_for_quantisation(model)
        graph = loaded.graph
        _check_run_output(output, graph.outputs)
        ds = load_dataset(input_path, graph)
        if loaded.own_quant is not None and bits == "8" and data is None and stats is None:
            qm = loaded.own_quant
        else:
            qm = quantise(graph, _stats_for(graph, data, stats, quiet, "mpq run"), int(bits),
                          method)
        parts = [quant_output_dict(qm, batch) for batch in ds.batches(256)]
        acts = qm.acts
    ys = {name: np.concatenate([p[name] for p in parts]).astype(np.int8)
          for name in graph.outputs}
    if output is not None:
        write_atomic(output, _run_output_bytes(output, ys))
    for name, y in ys.items():
        _print_run_output(name if len(ys) > 1 else None, y, acts[name])
    if output is not None:
        out.print(f"written to {plain(output)}" + (f" ({len(ys)} outputs by name)"
                                                    if output.suffix.lower() == ".npz" else ""))


def _check_run_output(output: Path | None, names: list[str]) -> None:
    """`mpq run -o`: a .npy holds one array, so a model with several outputs needs a .npz
    (checked before anything runs: an error leaves nothing half-written)."""
    if output is not None and len(names) > 1 and output.suffix.lower() != ".npz":
        raise MpqError(f"-o {output.name}: the model has {len(names)} outputs "
                       f"({', '.join(names)}); name a .npz, which holds one int8 array per "
                       "output name")


def _run_output_bytes(output: Path, ys: dict[str, Any]) -> bytes:
    """The file `mpq run -o` writes: the one output as a .npy, or a .npz with one int8 array
    per output name (`np.load(f)[name]`), deterministic (zip entries carry no timestamps)."""
    import io
    import zipfile

    import numpy as np

    buf = io.BytesIO()
    if output.suffix.lower() != ".npz":
        (y,) = ys.values()
        np.save(buf, y)
        return buf.getvalue()
    with zipfile.ZipFile(buf, "w") as z:
        for name, y in ys.items():
            with z.open(f"{name}.npy", "w") as f:
                np.lib.format.write_array(f, np.ascontiguousarray(y), allow_pickle=False)
    return buf.getvalue()


def _print_run_output(name: str | None, ys: Any, oq: Any) -> None:
    """The first samples of one output (top-1 class and leading integers) and its
    quantisation; `name` heads the lines when the model has several outputs."""
    from mpq.sim import dequantize

    if name is not None:
        out.print(f"output '{plain(name)}': {list(ys.shape)}")
    real = dequantize(oq, ys)
    flat = ys.reshape(len(ys), -1)
    for i in range(min(len(ys), 8)):
        top = int(real.reshape(len(ys), -1)[i].argmax())
        out.print(f"sample {i}: top-1 {top}  int {flat[i][:12].tolist()}"
                  f"{' …' if flat.shape[1] > 12 else ''}")
    out.print(f"{len(ys)} samples; output scale {oq.scale:.6g}, zero point {oq.zero_point}, "
              f"{oq.bits} bits")


# -- eval ---------------------------------------------------------------------------------------

@main.command("eval", epilog=EPILOG)
@click.argument("model", metavar="MODEL_OR_PLAN", type=click.Path(dir_okay=True,
                                                                  path_type=Path))
@click.option("--model", "plan_model", type=click.Path(path_type=Path),
              help="With a plan: the model file (default: the path the plan names).")
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Test data: .npz with x and, optionally, y; y holds class indices [N] (or "
                   "[N, 1]) or one-hot rows [N, classes], taken by argmax. Without y only the "
                   "agreement with the float model is reported.")
@click.option("--calib", type=click.Path(path_type=Path),
              help="Calibration data for quantising an ONNX model.")
@click.option("--stats", type=click.Path(path_type=Path),
              help="Statistics from `mpq calibrate` instead of --calib.")
@click.option("--act-bits", default="8", show_default=True,
              help="Comma-separated uniform activation bitwidths to evaluate, e.g. 8,4,2.")
@METHOD
@click.option("--weights", "weights_spec",
              help="Weights of every layer under one scheme: linear, wentropy, sym, asym "
                   "(reference only) or pow2, with :BITS (default: linear:8).")
@click.option("--act-quant", type=click.Choice(["linear", "log"]), default="linear",
              show_default=True,
              help="log: also Park et al.'s log-domain activation levels (reference only, "
                   "float fake quantisation; needs --calib), beside the linear ones.")
@click.option("--task", type=click.Choice(["auto", "classify", "regress"]), default="auto",
              show_default=True,
              help="Whether the outputs are class scores (top-1 accuracy and agreement). auto: "
                   "an output made by Softmax, or a vector of C values with 2 <= C < the "
                   "input's size (an autoencoder's reconstruction is not a classifier).")
@click.option("--output", "label_out", metavar="NAME",
              help="With several outputs: the one the labels y belong to, scored for top-1 "
                   "accuracy (default: the first classifier output). Fidelity to the float "
                   "model is reported for every output either way.")
@ENGINE
@ptq_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@QUIET
@user_errors
def eval_(model: Path, plan_model: Path | None, data: Path, calib: Path | None,
          stats: Path | None, act_bits: str, method: str, weights_spec: str | None,
          act_quant: str, task: str, label_out: str | None, engine: str,
          bias_correction: bool, adaround: bool, as_json: bool, quiet: bool) -> None:
    """Top-1 accuracy of the float model and of the integer reference, side by side, and how
    close each quantised model's outputs are to the float model's: top-1 agreement
    (classifiers), cosine similarity and SQNR in dB, per output — with or without labels.

    Given a plan (.json), also the plan's own mixed-precision model (with VDPC's per-patch
    branches) beside the float model and the all-int8 model at the plan's ranges.
    """
    from mpq.evaluate import (
        LogActivations,
        label_output,
        output_tasks,
        quant_variant,
        usable_labels,
    )
    from mpq.quant.calibrate import load_dataset
    from mpq.quant.pipeline import load_for_quantisation, quantise
    from mpq.quant.ptq import PtqOptions, apply_ptq
    from mpq.quant.qmodel import with_weight_scheme
    from mpq.quant.weights import parse_weights

    if model.suffix.lower() == ".json":
        if weights_spec is not None or act_quant != "linear" or bias_correction or adaround:
            raise MpqError("a plan carries its own weight schemes, biases and linear "
                           "activations; --weights, --act-quant, --bias-correction and "
                           "--adaround apply to a model")
        _eval_plan(model, plan_model, data, task, as_json, quiet, engine, label_out)
        return
    _plan_only_engine(engine)
    spec = parse_weights(weights_spec) if weights_spec is not None else None
    if act_quant == "log" and calib is None:
        raise MpqError("--act-quant log fits its levels on calibration data: give --calib")
    ptq = PtqOptions(bias_correction, adaround)
    if ptq.any and calib is None:
        raise MpqError("--bias-correction and --adaround fit on calibration data: give --calib")
    if adaround and (spec is None or spec.scheme != "linear" or spec.bits not in (4, 2)):
        raise MpqError("--adaround rounds 4- and 2-bit linear weights: add --weights linear:4 "
                       "or linear:2")

    try:
        bit_list = [int(b) for b in act_bits.split(",")]
    except ValueError:
        raise MpqError(f"--act-bits must be a comma-separated list of 8, 4, 2, not "
                       f"'{act_bits}'") from None
    loaded = load_for_quantisation(model)
    ds = load_dataset(data, loaded.graph)
    classifier = output_tasks(loaded.graph, task)
    scored = label_output(loaded.graph, classifier, label_out)
    labels = usable_labels(ds, loaded.graph, classifier, scored)
    variants: dict[str, Any] = {}
    stats_obj = None
    log_acts = None
    for b in bit_list:
        key = "int8" if b == 8 else f"act{b}"
        if b == 8 and loaded.own_quant is not None and calib is None and stats is None \
                and spec is None:
            qm = loaded.own_quant
        else:
            if stats_obj is None:
                stats_obj = _stats_for(loaded.graph, calib, stats, quiet, "mpq eval")
            qm = quantise(loaded.graph, stats_obj, b, method)
            if spec is not None:
                qm = with_weight_scheme(qm, spec)
            if ptq.any:
                qm = apply_ptq(qm, load_dataset(calib, loaded.graph), ptq).model
        variants[key] = quant_variant(qm)
        if act_quant == "log":
            if log_acts is None:
                log_acts = LogActivations(loaded.graph, load_dataset(calib, loaded.graph))
            variants[f"log{b}"] = log_acts.variant(qm, b)
    weights = f", weights {spec.label}" if spec is not None else ""
    _run_eval(model, loaded.graph, ds, variants, classifier, labels, as_json, quiet,
              {"weights": spec.label} if spec is not None else {}, weights, output=scored)


def _run_eval(model_path: Path, graph: Any, ds: Any, variants: dict[str, Any],
              classifier: dict[str, bool], labels: Any, as_json: bool, quiet: bool,
              extra: dict[str, Any], subtitle: str = "", name: Path | None = None,
              output: str | None = None) -> None:
    """Measure (`mpq.evaluate.evaluate`), then print: nothing reaches stdout before every
    number is in, so a failure mid-way leaves no half-written table or JSON. Accuracy is
    scored on `output` (default the first), fidelity on every output."""
    from mpq.evaluate import evaluate

    output = output if output is not None else graph.outputs[0]
    ev = evaluate(model_path, graph, ds, variants, classifier, labels,
                  lambda what, n: progress_bar(what, n, quiet), output)
    if ds.y is not None and labels is None:  # after the run: an error stays the only line
        err.print(f"note: {plain(ds.path)}: y ignored; output '{plain(output)}' is "
                  "not a classifier (--task classify scores top-1 accuracy)", soft_wrap=True)
    elif labels is not None and len(graph.outputs) > 1 and not quiet:
        err.print(f"note: top-1 accuracy is scored on output '{plain(output)}' (the labels "
                  "fit one output; --output NAME picks another)", soft_wrap=True)
    if as_json:
        click.echo(json.dumps({**ev.as_json(), **extra}, indent=2, sort_keys=True))
        return
    title = plain((name or model_path).name)
    if ev.accuracy:
        which = f" of output '{plain(output)}'" if len(graph.outputs) > 1 else ""
        _print_accuracies(f"{title}: top-1 accuracy{which} on {ev.samples} samples"
                          f"{plain(subtitle)}", ev.accuracy)
    for output, per_model in ev.fidelity.items():
        _print_fidelity(f"{title}: output '{plain(output)}' against the float model on "
                        f"{ev.samples} samples{plain(subtitle)}", per_model,
                        ev.classifier[output])


def _print_accuracies(title: str, results: dict[str, Any]) -> None:
    table = Table(title=title, min_width=len(title))
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    for key, value in results.items():
        if isinstance(value, float):
            table.add_row(plain(key), f"{value:.4f}")
    out.print(table)


def _print_fidelity(title: str, per_model: dict[str, dict[str, Any]], classifier: bool) -> None:
    """One output's fidelity table; SQNR reads 'exact' when the outputs are identical."""
    table = Table(title=title + ("" if classifier else " (not a classifier)"),
                  min_width=len(title))
    table.add_column("model")
    if classifier:
        table.add_column("top-1 agreement", justify="right")
    table.add_column("cosine", justify="right")
    table.add_column("SQNR dB", justify="right")
    for key, m in per_model.items():
        sqnr = "exact" if m["sqnr_db"] is None else f"{m['sqnr_db']:.2f}"
        agree = [f"{m['top1_agreement']:.4f}"] if classifier else []
        table.add_row(plain(key), *agree, f"{m['cosine']:.5f}", sqnr)
    out.print(table)


def _eval_plan(plan_path: Path, model: Path | None, data: Path, task: str, as_json: bool,
               quiet: bool, engine: str = "auto", label_out: str | None = None) -> None:
    from mpq.evaluate import (
        label_output,
        output_tasks,
        plan_int8_ranges,
        quant_variant,
        usable_labels,
    )
    from mpq.plan import load_plan_with_model
    from mpq.quant.calibrate import load_dataset
    from mpq.quant.qmodel import quantize_graph

    plan, model_path, graph = load_plan_with_model(plan_path, model)
    ds = load_dataset(data, graph)
    classifier = output_tasks(graph, task)
    scored = label_output(graph, classifier, label_out)
    labels = usable_labels(ds, graph, classifier, scored)
    runner = _plan_runner(plan, graph, engine)  # compiled first: a build error stops early
    variants = {"int8": quant_variant(quantize_graph(graph, plan_int8_ranges(plan))),
                "plan": runner.real_outputs}
    _run_eval(model_path, graph, ds, variants, classifier, labels, as_json, quiet, {},
              name=plan_path, output=scored)


# -- export -------------------------------------------------------------------------------------

def _build_targets(values: tuple[str, ...]) -> tuple[str, ...]:
    """--target values (repeated or comma-separated) as build targets; an unknown one is a
    usage error like any bad option value."""
    from mpq.codegen.export import parse_targets

    try:
        return parse_targets(values) or ("make",)
    except MpqError as exc:
        raise click.BadParameter(str(exc).removeprefix("export: ")) from None


@main.command("export", epilog=EPILOG)
@click.argument("plan_path", metavar="PLAN", type=click.Path(dir_okay=True, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Directory for the C sources.")
@click.option("--model", "plan_model", type=click.Path(path_type=Path),
              help="The plan's model file (default: the path the plan names).")
@click.option("--backend", type=click.Choice(["portable", "cmsis-nn"]), default="portable",
              show_default=True, help="Kernel library the sources call.")
@click.option("--target", "targets", multiple=True, metavar="TARGET[,TARGET…]",
              callback=lambda ctx, param, value: _build_targets(value),
              help="Build files to write, repeatable or comma-separated: make (mpq.mk, always "
                   "written), cmake (CMakeLists.txt: add_subdirectory, then link mpq_model), "
                   "zephyr (a module for ZEPHYR_EXTRA_MODULES), arduino (a library: "
                   "library.properties, src/, an example sketch), platformio (library.json).")
@click.option("--build", is_flag=True,
              help="Also link for the board (arm-none-eabi-gcc), record the measured "
                   "section sizes in mpq_report.json and fail (writing nothing) when the "
                   "model's Flash or SRAM is over the plan's budgets or the board's regions.")
@click.option("--allow-over", is_flag=True,
              help="With --build: write the export even when it is over budget (warns).")
@QUIET
@user_errors
def export_cmd(plan_path: Path, output: Path, plan_model: Path | None, backend: str,
               targets: tuple[str, ...], build: bool, allow_over: bool, quiet: bool) -> None:
    """Write the firmware sources of PLAN: mpq_model.{h,c}, mpq_weights.{h,c}, the kernels.

    Same plan ⇒ byte-identical files; unchanged files are not rewritten (make-friendly).
    With --backend cmsis-nn the int8 layers call CMSIS-NN (mpq_report.json lists each layer's
    backend); your build supplies CMSIS-NN through CMSIS_NN_PATH (mpq.mk), as does --build.
    --target cmake adds a CMakeLists.txt defining the static library mpq_model; zephyr,
    arduino and platformio add a Zephyr module, an Arduino library and a PlatformIO manifest.
    """
    from mpq.codegen.export import measure_build, render_export, with_measured, write_export
    from mpq.fileio import check_outputs
    from mpq.plan import load_plan_with_model

    plan, model_path, graph = load_plan_with_model(plan_path, plan_model)
    files = render_export(plan, graph, backend, targets)
    check_outputs([output / name for name in files], [plan_path, model_path])
    if build:
        from mpq.boards import plan_board

        board = plan_board(plan.board)  # the plan's own board, validated like a board file
        with progress_bar(f"building for {board.name}", None, quiet):
            measured = measure_build(files, board)
        files = with_measured(files, measured)
        _check_build(measured, board, plan, allow_over)
    if output.exists() and not output.is_dir():
        raise MpqError(f"{output}: exists and is not a directory")
    try:
        written = write_export(files, output)
    except OSError as exc:
        raise MpqError(f"{output}: cannot write ({exc.strerror})") from None
    out.print(f"{plain(plan_path)} → {plain(output)}/: {len(files)} files, {len(written)} written "
              f"({len(files) - len(written)} unchanged)")
    report = json.loads(files["mpq_report.json"])
    if backend == "cmsis-nn":
        n = sum(1 for layer in report["layers"] if layer["backend"] == "cmsis-nn")
        p = report["predicted"]
        out.print(f"  {n} of {len(report['layers'])} layers call CMSIS-NN (see "
                  f"mpq_report.json); scratch {p['scratch_bytes']:,} B, the plan predicted "
                  f"{p['plan_scratch_bytes']:,} B")


def _check_build(measured: dict[str, int], board: Any, plan: Any, allow_over: bool) -> None:
    """Print what `export --build` measured; over budget, stop before writing anything (one
    line, exit 1) unless --allow-over, which writes the export with a warning line."""
    from mpq.budget import build_summary, over_budget

    out.print(f"built for {plain(board.name)}: Flash {measured['flash_bytes']:,} B, "
              f"SRAM {measured['sram_bytes']:,} B (measured)")
    p = plan.predicted
    out.print("  " + plain(build_summary(measured, p["flash_bytes"] + p["code_bytes_estimate"],
                                         p.get("stack_bytes"))))
    problems = over_budget(measured, board, plan.board)
    if not problems:
        return
    line = f"build for {board.name} is over budget: " + "; ".join(problems)
    if not allow_over:
        raise MpqError(line + " (nothing written; --allow-over writes it anyway)")
    err.print(f"warning: {plain(line)} (written anyway: --allow-over)", highlight=False,
              soft_wrap=True)


@main.command("report", epilog=EPILOG)
@click.argument("plan_path", metavar="PLAN", type=click.Path(dir_okay=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Directory for the report (default: <plan stem>.report/ beside PLAN).")
@click.option("--model", "plan_model", type=click.Path(path_type=Path),
              help="The plan's model file (default: the path the plan names).")
@QUIET
@user_errors
def report_cmd(plan_path: Path, output: Path | None, plan_model: Path | None,
               quiet: bool) -> None:
    """Figures (PNG), an HTML page and report.json of PLAN: SRAM per step against the
    budget, bits per layer, the patch grid with VDPC's outlier rates, BitOPs per layer.

    Same plan ⇒ byte-identical files.
    """
    from mpq.fileio import check_outputs
    from mpq.plan import load_plan_with_model
    from mpq.report import check_output_dir, default_output_dir, render_report, write_report

    plan, model_path, graph = load_plan_with_model(plan_path, plan_model)
    target = output or default_output_dir(plan_path)
    check_output_dir(target)
    with progress_bar("drawing figures", None, quiet):
        files = render_report(plan, graph, plan_path.name)
    check_outputs([target / name for name in files], [plan_path, model_path])
    write_report(files, target)
    out.print(f"{plain(plan_path)} → {plain(target)}/: {plain(', '.join(files))}")


@main.command("verify", epilog=EPILOG)
@click.argument("plan_path", metavar="PLAN", type=click.Path(dir_okay=True, path_type=Path))
@click.option("--target", type=click.Choice(["host", "qemu-m4", "qemu-m7"]), default="host",
              show_default=True, help="Where the exported C runs.")
@click.option("--backend", type=click.Choice(["portable", "cmsis-nn"]), default="portable",
              show_default=True,
              help="Kernel library the export calls (cmsis-nn: CMSIS-NN from $CMSIS_NN_PATH).")
@click.option("--data", type=click.Path(path_type=Path), help="Inputs: .npz with x.")
@click.option("--input", "input_path", type=click.Path(path_type=Path),
              help="Inputs: .npy (one sample or a batch).")
@click.option("--samples", type=click.IntRange(1), default=16, show_default=True,
              help="At most this many inputs.")
@click.option("--model", "plan_model", type=click.Path(path_type=Path),
              help="The plan's model file (default: the path the plan names).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--per-layer", is_flag=True,
              help="QEMU targets: also count every layer's instructions (a table; `per_layer` "
                   "in --json).")
@QUIET
@user_errors
def verify_cmd(plan_path: Path, target: str, backend: str, data: Path | None,
               input_path: Path | None, samples: int, plan_model: Path | None,
               as_json: bool, quiet: bool, per_layer: bool) -> None:
    """Export PLAN, build it for TARGET, run it and compare every byte with the reference."""
    import numpy as np

    from mpq.codegen.cmsis import cmsis_nn_root
    from mpq.plan import load_plan_with_model
    from mpq.quant.calibrate import load_dataset
    from mpq.verify import verify

    if per_layer and target == "host":
        raise MpqError("verify: --per-layer counts instructions under QEMU: use --target "
                       "qemu-m4 or qemu-m7")
    if backend == "cmsis-nn":
        cmsis_nn_root([])
    plan, _, graph = load_plan_with_model(plan_path, plan_model)
    source = data or input_path
    if source is None:
        raise MpqError("mpq verify needs inputs: --data D.npz or --input x.npy")
    ds = load_dataset(source, graph)
    x = np.concatenate(list(ds.batches(256)))[:samples]
    with progress_bar(f"building and running on {target}", None, quiet or as_json):
        result = verify(plan, graph, x, target, backend, per_layer)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    else:
        verdict = "[green]0 mismatches[/green]" if result.mismatches == 0 else \
            f"[red]{result.mismatches} mismatched bytes[/red]"
        where = target if backend == "portable" else f"{target} with {backend}"
        out.print(f"{plain(plan_path)} on {where}: {result.samples} samples, {verdict}"
                  + (f" over all {len(result.outputs)} outputs" if len(result.outputs) > 1
                     else ""))
        if len(result.outputs) > 1:
            for o in result.outputs:
                out.print(f"  output '{plain(o['name'])}': {o['bytes']:,} bytes, "
                          f"{o['mismatches']} mismatched")
        if result.instructions is not None:
            r = result
            rest = r.sram_bytes - r.model_sram_bytes - r.test_vector_bytes - r.stack_bytes
            out.print(f"  {r.instructions:,} instructions per inference; measured: Flash "
                      f"{r.flash_bytes:,} B (model {r.model_flash_bytes:,}), SRAM "
                      f"{r.sram_bytes:,} B = model {r.model_sram_bytes:,} + this harness's "
                      f"test vectors {r.test_vector_bytes:,} + stack {r.stack_bytes:,}"
                      + (f" + harness data {rest:,}" if rest else ""))
        if result.per_layer is not None:
            _print_per_layer(result)
    if result.mismatches:
        sys.exit(1)


def _print_per_layer(result: Any) -> None:
    """`verify --per-layer`: the measured instructions of every layer beside the plan's MACs and
    BitOPs (per inference; exact integers unless the inferences differ)."""
    n = result.samples
    exact = all(r["instructions_all"] % n == 0 for r in result.per_layer)

    def count(v: int) -> str:
        return f"{v // n:,}" if exact else f"{v / n:,.1f}"

    table = Table(title=f"Instructions per layer on {result.target}, measured (per inference"
                        f"{'' if n == 1 else f', mean of {n}'})")
    for col in ("#", "layer", "kernel", "op", "bits w/a", "MACs", "BitOPs", "instructions",
                "instr/MAC"):
        table.add_column(col, justify="left" if col in ("layer", "kernel", "op") else "right")
    for r in result.per_layer:
        bits = "" if r["a_bits_in"] is None else \
            f"{r['w_bits'] or '-'}/{r['a_bits_in']}→{r['a_bits_out']}"
        table.add_row(r["segment"], plain(r["layer"]), plain(r["kernel"] or ""),
                      plain(r["op"] or ""), bits, f"{r['macs']:,}" if r["macs"] else "",
                      f"{r['bitops']:,}" if r["bitops"] else "", count(r["instructions_all"]),
                      "" if r["instructions_per_mac"] is None
                      else f"{r['instructions_per_mac']:.2f}")
    table.add_row("", "total", "", "", "", f"{sum(r['macs'] for r in result.per_layer):,}",
                  f"{sum(r['bitops'] for r in result.per_layer):,}",
                  count(result.instructions_all), "")
    out.print(table)


# -- search -------------------------------------------------------------------------------------

def _int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise MpqError(f"{what} must be a comma-separated list of integers, not '{text}'") \
            from None
    bad = [v for v in values if v not in (8, 4, 2)]
    if bad:
        raise MpqError(f"{what}: bitwidth {bad[0]} is not one of 8, 4, 2")
    return values


@main.command("search", epilog=EPILOG)
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("--board", "board_name", required=True, help="Board name or board TOML file.")
@click.option("--data", type=click.Path(path_type=Path),
              help="Calibration data (.npz with x, or a folder of .npy).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Plan JSON to write.")
@click.option("--sram", type=click.IntRange(1), help="Override the board's SRAM budget (bytes).")
@click.option("--flash", type=click.IntRange(1),
              help="Override the board's Flash budget (bytes).")
@click.option("--strategy",
              type=click.Choice(["measured", "exact", "vdqs", "int8", "qe", "importance",
                                 "rusci"]),
              default="measured", show_default=True,
              help="measured: ILP over each choice's damage, measured through the integer "
                   "reference on up to 64 samples of --data, then whole plans measured and "
                   "the best kept; "
                   "exact: ILP over VDQS scores; vdqs: QuantMCU's Algorithm 1; int8: no "
                   "sub-byte maps; qe: data-free QE-Score; importance: LIMPQ's fitted LSQ "
                   "step sizes + one ILP over (b_w, b_a); rusci: Rusci's accuracy-blind "
                   "memory-driven halving (baseline).")
@click.option("--lambda", "lam", type=click.FloatRange(0, 1), default=0.6, show_default=True,
              help="λ of S = −λΩ + (1−λ)Φ.")
@click.option("--phi", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.96,
              show_default=True, help="VDPC central probability mass φ.")
@click.option("--bins", type=click.IntRange(2), default=256, show_default=True,
              help="Entropy bins k.")
@click.option("--bits", default="8,4,2", show_default=True,
              help="Candidate activation bitwidths.")
@click.option("--weight-bits", default="8", show_default=True,
              help="Candidate weight bitwidths (8,4 lets the search choose).")
@click.option("--weights", "weights_spec",
              help="Every weighted layer under one scheme: wentropy:4|3|2 (weighted-entropy "
                   "codebook), pow2:4|3|2 (shifts), sym:8|4|3|2 or linear:8|4|2 "
                   "(default: linear, bits from --weight-bits).")
@click.option("--patches", default="auto", show_default=True,
              help="auto, none, k=K,n=N (K layers per patch, N×N grid) or k=K,n=N,m=M "
                   "(N rows × M columns of patches).")
@click.option("--patch-cache", type=click.Choice(["auto", "on", "off"]), default="auto",
              show_default=True,
              help="Keep the rows adjacent patches share in line buffers instead of "
                   "recomputing them (auto: when that costs no peak and VDPC is off, or "
                   "--strategy int8 or measured).")
@click.option("--max-overhead", type=click.FloatRange(min=0), default=None,
              help="With --patches auto: the most MACs the patch overlaps may recompute, as a "
                   "fraction of the network's MACs (default: 2.0 for the measured strategy, "
                   "which spends compute to keep bits, and 4.0 for its stages that end in a "
                   "global average pool; 0.25 for the others).")
@click.option("--scratch", type=click.Choice(["arena", "separate"]), default="arena",
              show_default=True,
              help="arena: each layer's kernel scratch is an arena buffer alive only at its "
                   "step (layer-based schedules; a patch schedule keeps the separate one); "
                   "separate: one buffer of the largest scratch beside the arena.")
@click.option("--no-vdpc", is_flag=True,
              help="All patches mixed-precision (the measured default runs without VDPC).")
@click.option("--vdpc-min-outliers", type=click.IntRange(1), default=1, show_default=True,
              help="Outliers a patch needs to take the 8-bit branch.")
@click.option("--no-qbr", is_flag=True, help="Skip QBR bit refinement.")
@click.option("--phi-norm", type=click.Choice(["global", "map"]), default="global",
              show_default=True, help="Normalisation of the BitOPs term Φ.")
@click.option("--method", type=click.Choice(["minmax", "percentile", "entropy", "mse"]),
              default="entropy", show_default=True,
              help="How activation ranges are chosen (entropy keeps sub-byte maps usable; mse: "
                   "least squared error at each map's bits).")
@click.option("--bitops", type=click.IntRange(1),
              help="BitOPs budget Σ MACs·b_w·b_a (--strategy importance; default: none).")
@click.option("--order", type=click.Choice(["memory", "file"]), default="memory",
              show_default=True,
              help="Execution order of branching graphs: memory (the order with the lowest "
                   "planned peak, exact over up to 1000 orders; recorded in the plan) or file "
                   "(the model file's order).")
@ptq_options
@click.option("--latency", is_flag=True,
              help="Fewest predicted instructions (latency table) among the accuracy-first "
                   "search's plans with fewer candidate bitwidths, within the budgets and "
                   "--latency-tolerance of its fidelity.")
@click.option("--latency-tolerance", type=click.FloatRange(0), default=0.5, show_default=True,
              help="--latency: top-1 agreement loss allowed vs the accuracy-first plan (pp; "
                   "cosine loss ×100 for non-classifier outputs).")
@click.option("--io", "io", type=click.Choice(["arena", "external"]), default="arena",
              show_default=True,
              help="arena: the input and outputs are arena tensors (the input freed after its "
                   "last reader; the caller writes it through mpq_model_input()); external: "
                   "the caller's own buffers beside the arena.")
@click.option("--overlap/--no-overlap", default=True, show_default=True,
              help="Let a layer's output start inside its dying input where the kernels' "
                   "write order makes it exact and the arena shrinks (vMCU; layer-based "
                   "layers, and a patch stage's convolutions where VDPC does not run).")
@click.option("--auto-ptq/--no-auto-ptq", default=True, show_default=True,
              help="Measured strategy: try bias correction (and AdaRound on 4/2-bit weights) "
                   "on the chosen plan, fitted on the --data samples it does not measure on, "
                   "and keep a fit only when it measures closer to float (ignored with "
                   "--bias-correction/--adaround).")
@click.option("--compare-strategies", is_flag=True,
              help="With the measured strategy: also run importance, exact, qe, vdqs, rusci and "
                   "uniform 4-bit under the same budgets and keep the plan that keeps most of "
                   "the float model's top-1 decisions on --data (several times slower; models "
                   "up to 60 M MACs per sample).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@QUIET
@user_errors
def search_cmd(model: Path, board_name: str, data: Path | None, output: Path,
               sram: int | None, flash: int | None, strategy: str, lam: float, phi: float,
               bins: int, bits: str, weight_bits: str, weights_spec: str | None, patches: str,
               no_vdpc: bool, vdpc_min_outliers: int, no_qbr: bool, phi_norm: str,
               method: str, bitops: int | None, order: str, bias_correction: bool,
               adaround: bool, latency: bool, latency_tolerance: float, io: str,
               overlap: bool, compare_strategies: bool, auto_ptq: bool, as_json: bool,
               quiet: bool, patch_cache: str = "auto", scratch: str = "arena",
               max_overhead: float | None = None) -> None:
    """Find bitwidths and a patch schedule that fit MODEL onto a board; write the plan."""
    clock = _PhaseClock()  # started before the imports below: they are the import phase

    from mpq.boards import get_board
    from mpq.fileio import check_outputs
    from mpq.frontend import load_model
    from mpq.plan import model_reference
    from mpq.quant.calibrate import load_dataset, total_steps
    from mpq.quant.weights import parse_weights
    from mpq.search.driver import SearchOptions, feasible_candidates, search

    board = get_board(board_name)
    w_bits, w_scheme = _int_list(weight_bits, "--weight-bits"), None
    if weights_spec is not None:
        if weight_bits != "8":
            raise MpqError("--weights fixes every layer's weight bits; drop --weight-bits")
        spec = parse_weights(weights_spec, for_export=True)
        w_bits, w_scheme = (spec.bits,), spec.scheme
    opts = SearchOptions(strategy=strategy, lam=lam, phi=phi, bins=bins,
                         bits=_int_list(bits, "--bits"),
                         weight_bits=w_bits, weight_scheme=w_scheme, patches=patches,
                         vdpc=not no_vdpc, vdpc_min_outliers=vdpc_min_outliers, qbr=not no_qbr,
                         phi_norm=phi_norm, range_method=method, sram=sram, flash=flash,
                         bitops=bitops, bias_correction=bias_correction, adaround=adaround,
                         order=order, io=io, compare_strategies=compare_strategies,
                         overlap=overlap, patch_cache=patch_cache, auto_ptq=auto_ptq,
                         scratch=scratch, max_overhead=max_overhead)
    check_outputs([output], [model, data, board.path])
    graph = load_model(model)
    candidates = feasible_candidates(graph, board, opts)  # budgets met at all? before the data
    ds = load_dataset(data, graph) if data is not None else None
    total = total_steps(ds) if ds is not None else 0
    with progress_bar("calibrating", total or None, quiet) as tick:
        log = clock.timed(tick.note)
        log(f"import: {len(graph.nodes)} layers, {len(candidates)} candidate schedule(s)")
        if latency:
            from mpq.search.latency import latency_search

            result = latency_search(model, graph, board, ds, opts, latency_tolerance, log,
                                    search_fn=functools.partial(search, progress=tick,
                                                                log=log))
        else:
            result = search(model, graph, board, ds, opts, progress=tick, log=log,
                            candidates=candidates)
    result.plan.model = model_reference(model, output)
    result.plan.save(output)
    seconds = clock.total()
    if VERBOSE:
        err.print(f"[dim]total: {seconds:.2f} s[/dim]", highlight=False, soft_wrap=True)
    summary = _search_summary(result.plan, seconds, output)
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    _print_search(result.plan, summary)
    lat = result.plan.search.get("latency")
    if lat:
        c = lat["candidates"][lat["chosen"]]
        out.print(f"--latency: bits {','.join(map(str, c['bits']))}, weight bits "
                  f"{','.join(map(str, c['weight_bits']))}: {c['instructions']:,} instructions "
                  f"predicted, the fewest of {sum(x['admissible'] for x in lat['candidates'])} "
                  f"plans within {lat['tolerance_pp']:g} pp of the accuracy-first plan's "
                  f"fidelity ({lat['candidates'][0]['instructions']:,})")


def _db(v: float | None) -> str:
    """An SQNR for display: `exact` when the outputs were identical (null in the plan)."""
    return "exact" if v is None else f"{v:.1f} dB"


def _search_summary(plan: Any, seconds: float, output: Path) -> dict[str, Any]:
    p = plan.predicted
    return {"plan": str(output), "board": plan.board, "strategy": plan.strategy,
            "predicted": p, "patch": None if plan.patch is None else {
                k: plan.patch[k] for k in ("split_layer", "n", "redundant_macs",
                                           "redundant_macs_percent", "cache")
                if k in plan.patch},
            "objective": plan.search["objective"], "seconds": round(seconds, 3),
            "bits": {t.name: t.bits for t in plan.tensors},
            **({"measured": plan.search["measured"]} if "measured" in plan.search else {})}


def _arena_budget_line(p: dict[str, Any], b: dict[str, Any]) -> str:
    """What the arena was planned against: the SRAM budget less the other parts of the
    model's SRAM figure (`mpq.budget`), and the board's reserves beside it."""
    from mpq.memory import align_up

    scratch, io = align_up(p["scratch_bytes"]), p["input_bytes"] + p.get("output_bytes", 0)
    stack = p.get("stack_bytes", 0)
    reserve = b.get("reserve", {})
    return (f"arena {p['arena_bytes']:,} B planned against SRAM budget {b['sram_budget']:,} − "
            f"scratch {scratch:,} − input/output buffers {io:,} − model stack {stack:,} = "
            f"{b['sram_budget'] - scratch - io - stack:,} B; board reserves beside it: stack "
            f"{reserve.get('stack', 0):,} B (the model's included), rest of firmware "
            f"{reserve.get('runtime_sram', 0):,} B")


def _print_search(plan: Any, summary: dict[str, Any]) -> None:
    p, b = plan.predicted, plan.board
    table = Table(title=f"{plain(plan.model)} on {plain(b['name'])} ({plain(plan.strategy)})")
    for col in ("", "predicted", "budget", "margin"):
        table.add_column(col, justify="right")
    table.add_row("SRAM (arena + scratch + in/out + stack)", f"{p['sram_needed_bytes']:,}",
                  f"{b['sram_budget']:,}",
                  f"{b['sram_budget'] - p['sram_needed_bytes']:+,}")
    flash = p["flash_bytes"] + p["code_bytes_estimate"]
    table.add_row("Flash (params + code)", f"{flash:,}", f"{b['flash_budget']:,}",
                  f"{b['flash_budget'] - flash:+,}")
    table.add_row("BitOPs (all patches mixed)", f"{p['bitops']:,}", "", "")
    table.caption = plain(_arena_budget_line(p, b))
    table.add_row("BitOPs expected (VDPC)", f"{p['expected_bitops']:,}", "", "")
    table.add_row("BitOPs int8", f"{p['bitops_int8']:,}", "", "")
    ins = p.get("instructions")
    if ins:
        staged = plan.patch is not None  # stage layers: scaled layer costs (`search_prediction`)
        table.add_row(f"Instructions ({plain(ins['target'])}, latency table"
                      + ("; patch stage estimated, per-patch overheads not modelled)" if staged
                         else ")"), f"{ins['total']:,}", "", "")
    out.print(table)
    layers = Table(title="Bits per layer")
    for col in ("layer", "op", "w", "a in", "a out", "MACs", "BitOPs",
                *(("instr. (predicted)",) if ins else ())):
        layers.add_column(col, justify="right" if col not in ("layer", "op") else "left")
    for layer in plan.layers:
        pred = ins["layers"].get(layer.name) if ins else None
        layers.add_row(_short(layer.name, 40), plain(layer.op), plain(layer.w_bits or ""),
                       plain(layer.a_bits_in), plain(layer.a_bits_out), f"{layer.macs:,}",
                       f"{layer.bitops:,}",
                       *((("" if pred is None else f"{pred:,}"),) if ins else ()))
    out.print(layers)
    if plan.patch is not None:
        pt = plan.patch
        grid = f"{pt['n']}×{pt.get('cols', pt['n'])}"
        pooled = ", ending in a global pool summed patch by patch" if pt.get("pool") else ""
        out.print(f"Patches: first {pt['split_layer']} layers in a {grid} grid{pooled}, "
                  f"redundant MACs {pt['redundant_macs']:,} "
                  f"({pt['redundant_macs_percent']:.1f} % of the network)")
        stage = set(pt["stage_nodes"])
        below = [n for n in plan.schedule.get("overlap", {}) if n in stage]
        raised = plan.schedule.get("inplace_raised", {})
        if below or raised:  # `patch.choose_stage_overlaps`
            out.print(f"  inside the stage: {len(below)} output(s) written over their dying "
                      f"input (schedule.overlap), {len(raised)} in-place depthwise output(s) "
                      "ending where their input's tile ends (schedule.inplace_raised)")
        if pt.get("cache"):  # line buffers (`mpq.patch.cache_rows`)
            c = pt["cache"]
            out.print(f"  line buffers for {len(c['line_buffers'])} map(s), "
                      f"{sum(b['bytes'] for b in c['line_buffers']):,} B; recomputing every "
                      f"halo would cost {c['redundant_macs_recompute']:,} redundant MACs")
        if pt.get("vdpc"):
            v = pt["vdpc"]
            out.print(f"VDPC on '{_short(v['map'], 40)}': φ={plain(v['phi'])}, integer thresholds "
                      f"{plain([v['lo_threshold'], v['hi_threshold']])}, outlier rate per patch:")
            for row in v["outlier_rate"]:
                out.print("  " + "  ".join(f"{r:5.2f}" for r in row))
    else:
        out.print("Patches: none (layer-based schedule)")
    fid = p.get("fidelity")
    if fid:
        for name, f in fid["outputs"].items():
            e = fid["int8"][name]
            agree = "" if f["top1_agreement"] is None else \
                f"top-1 agreement with float {f['top1_agreement']:.1%} (int8 " \
                f"{e['top1_agreement']:.1%}), "
            out.print(f"Fidelity on {fid['samples']} samples of --data (seen by the search), "
                      f"output '{_short(name, 30)}': {agree}SQNR {_db(f['sqnr_db'])} (int8 "
                      f"{_db(e['sqnr_db'])}), cosine {f['cosine']:.4f}")
    ptq = plan.search.get("measured", {}).get("ptq")
    if ptq and ptq.get("candidates"):
        tried = ", ".join(f"{c['fit']} {c['damage_vs_float']:.5f}" for c in ptq["candidates"])
        out.print(f"PTQ: {ptq['kept']} kept — damage against float on the validation samples: "
                  f"{tried} (fitted on the {ptq['fit_samples']} samples of --data not measured)")
    out.print(f"objective {plan.search['objective']:.6f}; {summary['seconds']:.1f} s → "
              f"{plain(summary['plan'])}")


if __name__ == "__main__":  # pragma: no cover
    main()

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


if __name__ == "__main__":  # pragma: no cover
    main()

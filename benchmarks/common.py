"""What every benchmark module shares: the console and the table form RESULTS.md is built from."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

console = Console(width=140)


def show(title: str, columns: list[str], rows: list[list[str]], note: str | None = None) -> dict:
    """Print a table (and its note, what a reader needs to read it) and return it as
    {"title", "columns", "rows"[, "note"]} for `write_markdown`."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    out = {"title": title, "columns": columns, "rows": rows}
    if note is not None:
        console.print(note)
        out["note"] = note
    return out

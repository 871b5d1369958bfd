"""Placing the arena and the scratch across a board's data regions (issue 16 item 4).

A board may rank its SRAM regions by speed (`speed = 1` fastest; `mpq.boards`): the STM32H743's
DTCM before its AXI SRAM, the STM32F746's DTCM before SRAM1/2. X-CUBE-AI places tensors across
such regions; mpq places whole blocks, the rule being:

1. the **arena** (every activation tensor: each layer reads and writes it) goes to the fastest
   ranked region that holds it;
2. the **kernel scratch** (im2col and the in-place depthwise channel buffer, read as often as
   the arena per MAC) goes to the fastest ranked region with room left beside the arena.

A region's room is its length; the board's `sram_region` (which also holds the stack,
`.data`/`.bss` and the caller's input/output buffers) offers its length less the reserves and
those buffers. A block that fits nowhere ranked goes to `sram_region` (the search's budget
ensures it fits there). Splitting the arena itself across regions (per tensor, like
X-CUBE-AI) is not done: one arena per plan keeps every offset in one address range, and the
fastest region that holds the whole arena is what the largest, most used tensors get anyway.

The placement is recorded in the plan (`schedule.regions`, only for boards with ranked
regions), recomputed by the plan check, and turned into linker sections by the export:
`mpq_model.c` puts each array in `.mpq_arena.<REGION>` and the board's linker script has one
NOLOAD output section per SRAM region collecting those (`templates/linker/board.ld.j2`); an
unknown region falls back to the generic `.mpq_arena` section in `sram_region`.
"""

from __future__ import annotations

from mpq.boards import Board
from mpq.memory import align_up

PARTS = ("arena", "scratch")


def region_room(board: Board, name: str, io_bytes: int) -> int:
    """Bytes a region offers the model: its length; `sram_region` less the stack and runtime
    reserves and the caller's input/output buffers (`io_bytes`)."""
    region = board.region(name)
    if name == board.sram_region:
        return region.length - board.reserve_stack - board.reserve_runtime_sram - io_bytes
    return region.length


def place_buffers(board: Board, arena_bytes: int, scratch_bytes: int,
                  io_bytes: int) -> dict[str, str] | None:
    """{"arena": region, "scratch": region} by the module's rule, or None when the board ranks
    no region (everything stays in `sram_region`, as before)."""
    ranked = board.data_regions
    if not ranked:
        return None
    room = {r.name: region_room(board, r.name, io_bytes) for r in ranked}
    out: dict[str, str] = {}
    # as the export declares them: each array at least 16 B, rounded up to 16
    sizes = (align_up(max(arena_bytes, 16)), align_up(max(scratch_bytes, 16)))
    for part, size in zip(PARTS, sizes, strict=True):
        name = next((r.name for r in ranked if room[r.name] >= size), board.sram_region)
        room[name] = room.get(name, 0) - size
        out[part] = name
    return out


def section_of(regions: dict[str, str] | None, part: str, board: Board) -> str:
    """The linker input section of an arena part: `.mpq_arena.<REGION>` when placed outside
    `sram_region`, else the generic `.mpq_arena`."""
    if regions is None or regions[part] == board.sram_region:
        return ".mpq_arena"
    return f".mpq_arena.{regions[part]}"

"""Linker scripts rendered from board files (the template ships in the wheel)."""

from __future__ import annotations

import re

import pytest

from mpq.boards import list_boards
from mpq.codegen.render import linker_script


@pytest.mark.parametrize("board", list_boards(), ids=lambda b: b.name)
def test_memory_regions_come_from_the_board_file(board) -> None:
    text = linker_script(board)
    for region in board.memory:
        pattern = rf"{region.name}\s+\(r\w+\) : ORIGIN = 0x{region.origin:08X}, " \
                  rf"LENGTH = 0x{region.length:08X}"
        assert re.search(pattern, text), region
    assert f"> {board.sram_region} AT> {board.flash_region}" in text  # .data
    # .bss, .mpq_arena, .heap, .stack, and one arena section per other SRAM region
    others = [r.name for r in board.memory if r.kind == "sram" and r.name != board.sram_region]
    assert text.count("(NOLOAD)") == 4 + len(others)
    for name in others:  # each before the generic .mpq_arena, which would take it otherwise
        assert text.index(f"*(.mpq_arena.{name})") < text.index("*(.mpq_arena .mpq_arena.*)")
        assert f"}} > {name} AT> {name}" in text
    assert f"MPQ_STACK_SIZE = {board.reserve_stack};" in text
    assert text.index(".isr_vector") < text.index(".text :")
    assert "/work" not in text and "/tmp" not in text  # no absolute paths
    assert linker_script(board) == text

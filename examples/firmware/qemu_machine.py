"""Print the QEMU machine that runs BOARD's firmware, or why `make run` cannot run it.

    mpq boards --json | python qemu_machine.py BOARD

BOARD is a shipped board's name or a board TOML file (what `mpq search --board` takes). Its
`qemu_machine` field names the machine; a board without one (an nRF52840, an STM32: chips QEMU
does not emulate) cannot run under QEMU. The Makefile turns the second case into one error line
before building anything, so the line names the boards that can run, taken from the board files
(`mpq boards --json` on stdin) rather than from a list here that would go stale.

Output, always one line on stdout and exit 0 (the Makefile reads it with $(shell)):
    machine <name>        BOARD runs on QEMU machine <name>
    error <message>       it does not; <message> is what the user is told
"""

from __future__ import annotations

import json
import sys


def qemu_boards(boards: list[dict]) -> list[str]:
    """The names of the boards whose code QEMU runs, sorted (`mpq boards` order)."""
    return sorted(b["name"] for b in boards if b.get("qemu_machine"))


def answer(board: str, boards: list[dict]) -> str:
    """The output line for `board` (see the module docstring)."""
    by_name = {b["name"]: b for b in boards}
    if board in by_name:
        machine = by_name[board].get("qemu_machine")
    else:
        from mpq.boards import get_board  # a board file of the user's own
        from mpq.errors import MpqError

        try:
            machine = get_board(board).qemu_machine
        except MpqError as e:
            return f"error {e}"
    if machine:
        return f"machine {machine}"
    return (f"error make run: board '{board}' has no qemu_machine (QEMU does not emulate it); "
            f"boards QEMU emulates: {', '.join(qemu_boards(boards)) or 'none'}")


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: mpq boards --json | python qemu_machine.py BOARD")
    try:
        boards = json.load(sys.stdin)
    except ValueError:
        print("error `mpq boards --json` printed no board list (is MPQ set to mpq?)")
        return
    print(answer(sys.argv[1], boards))


if __name__ == "__main__":
    main()

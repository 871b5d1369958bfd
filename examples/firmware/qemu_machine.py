"""Which QEMU machine `make run` uses for a board, and the linker script of that machine's board.

    mpq boards --json | python qemu_machine.py BOARD [QEMU_BOARD]
    python qemu_machine.py --linker-script QEMU_BOARD -o OUT.ld

BOARD is a shipped board's name or a board TOML file (what `mpq search --board` takes). Its
`qemu_machine` field names the machine; a board without one (an nRF52840, an STM32: chips QEMU
does not emulate) cannot run under QEMU as linked for it. QEMU_BOARD, when given, is a board
QEMU emulates with the same core: `make run` then links the same objects for that board's memory
map (as `mpq verify --target qemu-m4` does) and runs them on its machine. The Makefile turns a
refusal into one error line before building anything, so the line names the boards that can run,
taken from the board files (`mpq boards --json` on stdin), not from a list here that would go
stale.

Output, always one line on stdout and exit 0 (the Makefile reads it with $(shell)):
    machine <name>        the firmware runs on QEMU machine <name>
    error <message>       it does not; <message> is what the user is told
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def qemu_boards(boards: list[dict]) -> list[str]:
    """The names of the boards whose code QEMU runs, sorted (`mpq boards` order)."""
    return sorted(b["name"] for b in boards if b.get("qemu_machine"))


def _board(name: str, boards: list[dict]) -> dict:
    """`name`'s entry of `mpq boards --json`, or the board file at that path in the same form
    (a user's own board). Raises MpqError for an unknown board or a bad file."""
    for b in boards:
        if b["name"] == name:
            return b
    from mpq.boards import get_board

    return get_board(name).to_dict()


def answer(board: str, qemu_board: str, boards: list[dict]) -> str:
    """The output line for `board` run on `qemu_board` ('' = on its own machine)."""
    from mpq.errors import MpqError

    emulated = qemu_boards(boards)
    listed = f"boards QEMU emulates: {', '.join(emulated) or 'none'}"
    try:
        target = _board(board, boards)
        host = _board(qemu_board, boards) if qemu_board else target
    except MpqError as e:
        return f"error make run: {e}"
    if not qemu_board:
        if target.get("qemu_machine"):
            return f"machine {target['qemu_machine']}"
        # The same core runs the same code; only the memory map differs (`mpq verify` links
        # for the machine's own), so name that board as the way to run this build after all.
        same = [b["name"] for b in boards if b.get("qemu_machine") and b["core"] == target["core"]]
        hint = f" (QEMU_BOARD={same[0]} runs this build linked for its memory map)" if same else ""
        return (f"error make run: board '{board}' has no qemu_machine (QEMU does not emulate "
                f"it); {listed}{hint}")
    if not host.get("qemu_machine"):
        return f"error make run: QEMU_BOARD '{qemu_board}' has no qemu_machine; {listed}"
    if host["core"] != target["core"]:
        return (f"error make run: QEMU_BOARD '{qemu_board}' is a {host['core']}, board "
                f"'{board}' a {target['core']}: its code cannot run there; {listed}")
    return f"machine {host['qemu_machine']}"


def write_linker_script(board: str, out: Path) -> None:
    """Write `board`'s linker script (the one `mpq export` writes for it) to `out`."""
    from mpq.boards import get_board
    from mpq.codegen.render import linker_script

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(linker_script(get_board(board)), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("board")
    ap.add_argument("qemu_board", nargs="?", default="")
    ap.add_argument("--linker-script", action="store_true",
                    help="write BOARD's linker script to -o instead")
    ap.add_argument("-o", "--output", type=Path)
    args = ap.parse_args()
    if args.linker_script:
        if args.output is None:
            ap.error("--linker-script needs -o")
        write_linker_script(args.board, args.output)
        return
    try:
        boards = json.load(sys.stdin)
    except ValueError:
        print("error make run: `mpq boards --json` printed no board list (is MPQ set to mpq?)")
        return
    print(answer(args.board, args.qemu_board, boards))


if __name__ == "__main__":
    main()

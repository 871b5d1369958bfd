"""The Jinja2 environment over `templates/` and the renderers built on it."""

from __future__ import annotations

from functools import lru_cache

import jinja2

from mpq.boards import Board
from mpq.resources import data_dir


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """Strict environment: an undefined variable is an error, output ends with a newline."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(data_dir("templates"))),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render(template: str, **context: object) -> str:
    """Render one template by its path under `templates/`."""
    return environment().get_template(template).render(**context)


def linker_script(board: Board) -> str:
    """The board's linker script: MEMORY from the board file, NOLOAD sections AT> RAM."""
    return render("linker/board.ld.j2", board=board, board_file=f"boards/{board.name}.toml")

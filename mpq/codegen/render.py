"""The Jinja2 environment over `templates/` and the renderers built on it.

Text from a model, a plan, a board file or a file name is untrusted: it may only appear in
generated files as a comment, through the filter of the file's language, which keeps a
conservative set of characters that cannot end the comment, continue it onto a code line or
be expanded (`c_comment`, `make_comment`, `ld_comment`, `cmake_comment`); HTML is autoescaped.
The one exception is a model's output names, which the C header also gives as string literals
through `c_string` (a literal of letters, digits and a few inert punctuation characters).
Identifiers and code are mpq's own (`mpq_l3`, `mpq_arena + 128`).

Forgetting a filter cannot pass silently: every value a C, make, linker or CMake template
outputs is checked (`_finalize`), and a value with a character or sequence that neither mpq's
generated code nor a filtered comment ever contains — a newline or anything else not printable
ASCII, a backslash, `?` (trigraphs), a C comment delimiter, for make and ld `*`, `$` and `#`,
for CMake `*`, `$`, `#`, `;`, `"`, `[` and `]`, and for the Zephyr/Arduino/PlatformIO files
every quoting, escaping or comment character (`meta_text`) — stops the render with
`UnsafeOutput`. So hostile text can at worst stop an export, never run.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import jinja2

from mpq.boards import Board
from mpq.resources import data_dir

#: The language of each template directory; a template elsewhere has none and is refused.
LANGUAGES: dict[str, str] = {"c": "c", "firmware": "c", "make": "make", "linker": "ld",
                             "cmake": "cmake", "report": "html", "zephyr": "meta",
                             "arduino": "meta", "platformio": "meta"}

# Characters a comment keeps (beyond printable ASCII, which excludes newlines and controls).
# C: `\` splices lines, `??/` is a trigraph for it, `*` could close the comment or, after a
# `/`, open a nested one. `/` alone is kept: without `*` it is plain text in a comment, and
# exported layer names are full of it (`/features/0/0/Conv`). make and ld: the same, and `$`
# (expansion) and `#` (make comments) as well.
_C_DROP = "\\?*"
_MAKE_LD_DROP = "\\?*$#"
# CMake: a `#` line comment ends only at a newline, but the text must stay inert wherever a
# value may land — inside a quoted argument `\\` escapes, `$` expands (`${…}`, `$ENV{…}`),
# `"` ends it and `;` splits a list; `#[[`/`]]` open and close bracket comments and arguments.
_CMAKE_DROP = "\\?*$#;\"[]"

# What a filter never lets through and mpq's own code never contains: in an output value, it
# means untrusted text reached a template unfiltered. For make and ld that is what their filter
# drops; C code has `*` of its own (`(void *)input`), so C refuses only what ends or nests a
# comment.
_UNSAFE: dict[str, re.Pattern[str]] = {
    "c": re.compile(r"[^\x20-\x7e]|[\\?]|/\*|\*/"),
    "make": re.compile(r"[^\x20-\x7e]|[\\?*$#]"),
    "ld": re.compile(r"[^\x20-\x7e]|[\\?*$#]"),
    "cmake": re.compile(r'[^\x20-\x7e]|[\\?*$#;"\[\]]'),
    # The Zephyr module (YAML, Kconfig, CMake), the Arduino library (properties, sketch) and
    # the PlatformIO manifest (JSON) take only names, numbers and `meta_text`: anything that
    # could quote, escape, expand or comment in one of those languages is refused.
    "meta": re.compile(r"""[^\x20-\x7e]|[\\?*$#;"'`\[\]{}<>&|!%^~@:=]|/\*|\*/"""),
}
# Every character any `_UNSAFE` match starts with: one character class is quick to rule out on
# the bulk of the output (numbers, weights), the alternatives above run only when it matches.
_PLAIN = "".join(chr(c) for c in range(0x20, 0x7F)
                 if chr(c) not in "\\?*/$#;\"[]'`{}<>&|!%^~@:=")
_SUSPECT = re.compile(f"[^{re.escape(_PLAIN)}]")


class UnsafeOutput(RuntimeError):
    """A template output untrusted-looking text without its language's filter (an mpq bug)."""


def _keep_only(text: object, drop: str) -> str:
    """`text` with every character that is not printable ASCII, or is in `drop`, as `_`."""
    return "".join(ch if " " <= ch <= "~" and ch not in drop else "_" for ch in str(text))


def c_comment(text: object) -> str:
    """Text safe inside a C `/* … */` comment, compiled with or without `-trigraphs`: printable
    ASCII without `\\`, `?` and `*` (each other character becomes `_`)."""
    return _keep_only(text, _C_DROP)


def make_comment(text: object) -> str:
    """Text safe in a make `# …` comment line: printable ASCII without `\\` (it would continue
    the comment onto the next line), `$`, `#`, `?` and `*` (each other character becomes `_`)."""
    return _keep_only(text, _MAKE_LD_DROP)


def ld_comment(text: object) -> str:
    """Text safe inside a GNU ld `/* … */` comment: as :func:`make_comment`, so no `*` can
    close it."""
    return _keep_only(text, _MAKE_LD_DROP)


def cmake_comment(text: object) -> str:
    """Text safe in a CMake `# …` comment line, and inert even inside a quoted argument:
    printable ASCII without `\\`, `$`, `#`, `;`, `"`, `[`, `]`, `?` and `*` (each other
    character becomes `_`), so it can neither end the line, expand a variable, close a quote
    nor open a bracket comment."""
    return _keep_only(text, _CMAKE_DROP)


def meta_text(text: object) -> str:
    """Text safe as a value in the Zephyr, Arduino and PlatformIO files (a YAML or properties
    value, a Kconfig or JSON string, a C++ `//` comment): letters, digits, space and `_.,()+-/`
    only (each other character becomes `_`)."""
    return "".join(ch if ch.isascii() and (ch.isalnum() or ch in " _.,()+-/") else "_"
                   for ch in str(text))


def c_string(text: object) -> str:
    """Text as a C string literal that is inert whatever the text: the quotes around letters,
    digits, space and `_.,:()+-/` only (each other character becomes `_`), so it can neither
    end the literal, escape, splice a line, form a trigraph nor open or close a comment. For a
    model's tensor names in `MPQ_OUTPUTk_NAME`."""
    return '"' + "".join(ch if ch.isascii() and (ch.isalnum() or ch in " _.,:()+-/") else "_"
                         for ch in str(text)) + '"'


def template_language(name: str | None) -> str:
    """The language of a template from its directory (`c/…` → "c"); unknown → `UnsafeOutput`,
    so a new kind of template must say how its output is checked."""
    top = (name or "").split("/", 1)[0]
    if top not in LANGUAGES:
        raise UnsafeOutput(f"template '{name}' is in no directory of a known language")
    return LANGUAGES[top]


def check_output(language: str, value: object) -> None:
    """Refuse a value about to be written into a `language` file if it looks like text that
    skipped its filter (see the module docstring)."""
    pattern = _UNSAFE.get(language)
    if pattern is None:  # html: autoescaped by the environment
        return
    text = str(value)
    m = _SUSPECT.search(text) and pattern.search(text)
    if m:
        raise UnsafeOutput(f"unfiltered text in a {language} template: {m.group()!r} in "
                           f"{text[:80]!r}; pass it through the {language}_comment filter")


@jinja2.pass_context
def _finalize(context: jinja2.runtime.Context, value: Any) -> Any:
    if type(value) is not int:  # ints are most of a weights file, and always safe
        check_output(template_language(context.name), value)
    return value


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """Strict environment: an undefined variable is an error, output ends with a newline,
    HTML is autoescaped and C/make/ld/CMake output is checked by `_finalize`."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(data_dir("templates"))),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",),
                                            default_for_string=False, default=False),
        finalize=_finalize,
    )
    env.filters.update(c_comment=c_comment, make_comment=make_comment, ld_comment=ld_comment,
                       cmake_comment=cmake_comment, meta_text=meta_text, c_string=c_string)
    return env


def render(template: str, **context: object) -> str:
    """Render one template by its path under `templates/`."""
    return environment().get_template(template).render(**context)


def linker_script(board: Board) -> str:
    """The board's linker script: MEMORY from the board file, NOLOAD sections AT> RAM."""
    return render("linker/board.ld.j2", board=board, board_file=f"boards/{board.name}.toml")

"""User-derived text made safe to print: one line, no markup, no terminal control codes.

Model, node and tensor names, file names, board and plan fields and the error messages that
quote them all come from files a user may not have written. The CLI prints with rich, which
reads ``[tag]`` as markup (a ``[/x]`` in a name raises MarkupError, a ``[bold red]`` restyles
the line) and ``:name:`` as emoji; a terminal reads ESC sequences; a newline in a name turns a
one-line error into several. Everything the CLI prints that it did not write itself goes
through `plain` (or `error_line` for an exception).
"""

from __future__ import annotations

import codecs
import io
import re
import sys

from rich.markup import escape

# C0 and C1 controls, DEL, the Unicode line/paragraph separators (str.splitlines breaks on them)
# and the bidirectional overrides that can make a name read differently from what it is.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

NAME_LIMIT = 120  # longest name (or unbroken run) an error message quotes in full
_HEAD, _TAIL = 70, 40  # what a longer one keeps: both ends are what tells names apart

# A quoted name: the opening quote not preceded by a letter (so "caller's" is not a quote).
_QUOTED = re.compile(rf"(?<!\w)'([^'\n]{{{NAME_LIMIT + 1},}})'(?!\w)")
_RUN = re.compile(rf"\S{{{NAME_LIMIT + 1},}}")


def visible(text: str) -> str:
    r"""`text` with every control character written as an escape (newline as the two characters
    ``\n``, ESC as ``\x1b``), so it prints as one line and a terminal interprets none of it,
    while the name stays recognisable."""

    def sub(m: re.Match[str]) -> str:
        c = m.group()
        if c in _NAMED:
            return _NAMED[c]
        return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"

    return _CONTROL.sub(sub, text)


def _cut(s: str) -> str:
    return s if len(s) <= NAME_LIMIT else f"{s[:_HEAD]}…{s[-_TAIL:]}"


def shorten_names(text: str) -> str:
    """Quoted names and unbroken runs (paths, names) longer than NAME_LIMIT keep their head and
    tail around '…': a megabyte-long node name must not bury what the message says about it,
    and the message itself is never cut."""
    text = _QUOTED.sub(lambda m: f"'{_cut(m.group(1))}'", text)
    return _RUN.sub(lambda m: _cut(m.group()), text)


def plain(value: object, width: int | None = None) -> str:
    """`value` as text to embed in rich markup (a print argument, a table cell or title): one
    line, control characters escaped, markup brackets escaped. With `width`, a longer result
    keeps its tail after a leading '…' (layer names differ at their ends)."""
    s = visible(str(value))
    if width is not None and len(s) > width:
        s = "…" + s[-(width - 1):]
    return escape(s)


def error_line(message: object) -> str:
    """An error message as one markup-safe line with over-long names shortened."""
    return escape(shorten_names(visible(str(message).strip())))


# What the CLI's own glyphs become on a stream that cannot encode them (tables stay aligned
# for the one-character ones); anything else is written as a backslash escape.
ASCII_GLYPHS = {"→": "->", "×": "x", "…": "...", "−": "-", "—": "-", "–": "-", "⇒": "=>",
                "≤": "<=", "≥": ">=", "·": "*", "σ": "sigma", "φ": "phi", "λ": "lambda",
                "Φ": "Phi", "Ω": "Omega", "Σ": "sum", "±": "+-", "≈": "~", "²": "^2", "§": "S"}
ERRORS = "mpq-ascii"


def _ascii_glyphs(exc: UnicodeError) -> tuple[str, int]:
    """Codec error handler: ASCII stand-ins for known glyphs, backslash escapes otherwise."""
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    bad = exc.object[exc.start:exc.end]
    return "".join(ASCII_GLYPHS.get(c) or c.encode("ascii", "backslashreplace").decode()
                   for c in bad), exc.end


codecs.register_error(ERRORS, _ascii_glyphs)


def tolerant_streams() -> None:
    """Let stdout and stderr write any character on any encoding.

    With an ASCII locale (LC_ALL=C, PYTHONIOENCODING=ascii) printing '→' or a non-ASCII name
    would raise UnicodeEncodeError after the command's work is done. Only the error handler
    changes, never the encoding: a UTF-8 stream writes exactly what it wrote before, an ASCII
    one gets '->' for '→' and '\\u4e2d' for a character without a stand-in.
    """
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is None:
            continue
        try:
            reconfigure(errors=ERRORS)
        except (ValueError, io.UnsupportedOperation):  # a closed or foreign stream
            pass

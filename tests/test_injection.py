"""Nothing from a model, a plan, a board file or a file name is ever interpreted by the C
compiler, make, the linker or a browser (mpq issue 12).

One hostile plan is searched per session: the Fashion example CNN with every node and tensor
renamed to a payload, under a file name that is a make and a CMake payload, for a board file
whose description is a C and linker-script payload. Each payload would break the build, fail
the link, create a sentinel file or add markup if it escaped its comment; the tests render every
template from it and hand the results to gcc, make, cmake, arm-none-eabi-gcc/ld and an HTML
parser.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import jinja2
import onnx
import pytest
from conftest import REPO, run_mpq
from test_bad_input import assert_clean_failure

from mpq.boards import board_dir, list_boards, plan_board
from mpq.codegen.export import c_sources, render_export, write_export
from mpq.codegen.render import (
    LANGUAGES,
    UnsafeOutput,
    c_comment,
    c_string,
    cmake_comment,
    environment,
    ld_comment,
    make_comment,
    template_language,
)
from mpq.errors import MpqError
from mpq.frontend import load_model
from mpq.plan import load_plan

EX = REPO / "examples" / "fashion"
TEMPLATES = REPO / "templates"

# Escaping a C comment: `*/` plainly, spelled with a line splice, spelled with the `??/`
# trigraph; a nested `/*` (-Wcomment, an error under -Werror); the splice running a command (it
# did, through `mpq verify --target host`, before this was fixed); markup; make and ld code.
NODE_PAYLOADS = (
    '*/ _Static_assert(0, "PWNED_C"); /*',
    'splice *\\\n/ _Static_assert(0, "PWNED_SPLICE"); /*',
    'trigraph *??/\n/ _Static_assert(0, "PWNED_TRIGRAPH"); /*',
    "nested /* comment",
    'run *\\\n/ { extern int system(const char *); system("touch SENTINEL"); } /*',
    '<script>alert("PWNED_HTML")</script>',
    "make $(shell touch SENTINEL_MK)\n$(error PWNED_MK) # \\",
    'ld */ ASSERT(0, "PWNED_LD") /*',
)
# A file name cannot hold `/`, but a newline ends mpq.mk's (and CMakeLists.txt's) comment line,
# `\` continues it, and in CMake `")` would close a quoted argument and its command, `#[[` open
# a bracket comment, `${…}` expand and `;` split a list.
MODEL_FILE = ("evil $(shell touch SENTINEL_F) *\\\n$(shell touch SENTINEL_F2)\nPWNED_F := 1\n"
              "\")\nfile(WRITE SENTINEL_CM x)#[[ ]] ${PWNED_CM} ;"
              "'\".onnx")
# Plan text fields hold anything a hand-edited plan can: every payload at once.
PLAN_TEXT = ('m */ _Static_assert(0, "PWNED_PM"); /* *??/\n/ *\\\n/ $(shell touch '
             'SENTINEL_P)\nPWNED_P := 1\n<script>alert("PWNED_PM")</script> $\\frac$'
             '")\nfile(WRITE SENTINEL_CP x)#')
# The plan's `model` is a bare file name (the schema refuses `/`), so the rest of it.
PLAN_MODEL = PLAN_TEXT.replace("/", "|")
BOARD_DESCRIPTION = ('x */ ASSERT(0, "PWNED_LD") /* \n _Static_assert(0, "PWNED_D"); *??/\n/ '
                     '$(shell touch SENTINEL_B) # \\')
MARKERS = ("PWNED", "SENTINEL")  # in no generated line that the tools read as code
C_FLAGS = ("-std=c99", "-trigraphs", "-Wall", "-Wextra", "-Werror")


def _hostile_model(path: Path) -> None:
    """The example CNN with each node and each inner tensor named after a payload."""
    m = onnx.load(EX / "fashion_cnn.onnx")
    keep = {v.name for v in m.graph.input} | {v.name for v in m.graph.output} \
        | {t.name for t in m.graph.initializer}
    renamed: dict[str, str] = {}
    for i, node in enumerate(m.graph.node):
        node.name = f"{NODE_PAYLOADS[i % len(NODE_PAYLOADS)]} #{i}"
        for k, t in enumerate(node.output):
            if t not in keep:
                renamed[t] = f"{NODE_PAYLOADS[(i + 3) % len(NODE_PAYLOADS)]} t{i}.{k}"
    for node in m.graph.node:
        for field in (node.input, node.output):
            field[:] = [renamed.get(t, t) for t in field]
    for v in m.graph.value_info:
        v.name = renamed.get(v.name, v.name)
    onnx.save(m, path)


def _hostile_board(path: Path) -> None:
    """nano33ble as `evilboard`, its description a payload (TOML basic-string escaped)."""
    text = (board_dir() / "nano33ble.toml").read_text()
    text = text.replace('name = "nano33ble"', 'name = "evilboard"', 1)
    desc = json.dumps(BOARD_DESCRIPTION)  # a JSON string is a valid TOML basic string here
    text = re.sub(r"^description = .*$", lambda _: f"description = {desc}", text, count=1,
                  flags=re.M)
    path.write_text(text)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, Path]:
    """The hostile plan (int8, a 2×2 patch stage so the stage code is rendered too), searched
    for `--board ./evilboard.toml`."""
    root = tmp_path_factory.mktemp("hostile")
    _hostile_model(root / MODEL_FILE)
    _hostile_board(root / "evilboard.toml")
    r = run_mpq("search", MODEL_FILE, "--board", "./evilboard.toml", "--strategy", "int8",
                "--patches", "k=4,n=2", "--data", EX / "calib.npz", "-o", "hostile.plan.json",
                "-q", cwd=root)
    assert r.returncode == 0, r.stderr
    return {"root": root, "model": root / MODEL_FILE, "plan": root / "hostile.plan.json"}


@pytest.fixture(scope="module")
def exported(hostile, tmp_path_factory) -> dict[str, Path]:
    """The hostile plan's export for both backends, rendered in-process."""
    plan, graph = load_plan(hostile["plan"]), load_model(hostile["model"])
    out = {}
    for backend in ("portable", "cmsis-nn"):
        out[backend] = tmp_path_factory.mktemp(backend)
        write_export(render_export(plan, graph, backend, ("make", "cmake")), out[backend])
    return out


SENTINELS = ("SENTINEL", "SENTINEL_MK", "SENTINEL_F", "SENTINEL_F2", "SENTINEL_P",
             "SENTINEL_B", "SENTINEL_CM", "SENTINEL_CP")  # what the payloads' `touch` would create


def _no_sentinels(*dirs: Path) -> None:
    for d in dirs:
        assert not [n for n in SENTINELS if (d / n).exists()], d


def _code_only(source: Path, *includes: Path) -> str:
    """What the C compiler reads as code in `source`: its preprocessed text, comments gone
    after trigraphs and line splices."""
    r = subprocess.run(["gcc", "-E", "-P", "-trigraphs", *(f"-I{d}" for d in includes),
                        str(source)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _assert_code_clean(directory: Path, tmp: Path) -> None:
    """No payload marker in the code of any C file (comments are where names belong); a stub
    arm_nnfunctions.h stands in for CMSIS-NN, which only the cmsis-nn export includes."""
    stub = tmp / "stub"
    stub.mkdir(exist_ok=True)
    (stub / "arm_nnfunctions.h").write_text("")
    files = sorted(directory.glob("*.[ch]"))
    assert files
    for f in files:
        code = _code_only(f, directory, stub)
        for marker in MARKERS:
            assert marker not in code, f"{f.name}: '{marker}' left its comment"


def _gcc_syntax(files: list[Path], includes: list[Path], cc: str = "gcc",
                flags: tuple[str, ...] = ()) -> None:
    r = subprocess.run([cc, "-fsyntax-only", *flags, *C_FLAGS, *(f"-I{d}" for d in includes),
                        *map(str, files)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# -- the filters and the guard -----------------------------------------------------------------

def test_comment_filters_keep_only_inert_text() -> None:
    """Hostile text comes out printable ASCII without what ends or continues a comment (or is
    expanded, for make and ld); names that are already clean come out unchanged."""
    for text in (*NODE_PAYLOADS, MODEL_FILE, PLAN_TEXT, BOARD_DESCRIPTION, "é\x00\t\r"):
        for f, banned in ((c_comment, "\\?*"), (make_comment, "\\?*$#"),
                          (ld_comment, "\\?*$#"), (cmake_comment, '\\?*$#;"[]')):
            out = f(text)
            assert len(out) == len(text)
            assert all(" " <= ch <= "~" and ch not in banned for ch in out), (f, out)
        lit = c_string(text)  # a C string literal: nothing can end, escape or splice it
        assert lit[0] == lit[-1] == '"' and len(lit) == len(text) + 2
        assert all(ch.isascii() and (ch.isalnum() or ch in " _.,:()+-/") for ch in lit[1:-1])
    assert c_string("Identity:0") == '"Identity:0"'
    clean = ["/features/0/0/Conv", "/features/2/Add + /features/2/conv/2/Conv",
             "fashion_cnn.mpq.onnx", "kws_ref_model_fp32.onnx"]
    for b in list_boards():
        clean += [b.name, b.description, f"boards/{b.name}.toml", b.flash_region]
    for text in clean:
        assert c_comment(text) == make_comment(text) == ld_comment(text) == text
        assert cmake_comment(text) == text


def test_unfiltered_text_stops_the_render() -> None:
    """The guard behind the filters: a C, make or linker template that outputs untrusted text
    without its filter fails to render instead of emitting it; mpq's own code passes."""
    env = environment().overlay(loader=jinja2.DictLoader({
        "c/bad.c.j2": "/* {{ v }} */", "c/good.c.j2": "/* {{ v | c_comment }} */",
        "c/code.c.j2": "x = {{ v }};", "make/bad.mk.j2": "# {{ v }}",
        "linker/bad.ld.j2": "/* {{ v }} */", "report/page.html.j2": "<p>{{ v }}</p>",
        "cmake/bad.txt.j2": "# {{ v }}", "cmake/good.txt.j2": "# {{ v | cmake_comment }}",
        "other/t.j2": "{{ v }}"}))
    for name, value in (("c/bad.c.j2", "a */ b"), ("c/bad.c.j2", "a *\\"),
                        ("c/bad.c.j2", "??/"), ("c/bad.c.j2", "a\nb"), ("c/bad.c.j2", "/* x"),
                        ("make/bad.mk.j2", "$(shell x)"), ("make/bad.mk.j2", "a\nb"),
                        ("linker/bad.ld.j2", "*/ ASSERT(0, x)"), ("other/t.j2", "x"),
                        ("cmake/bad.txt.j2", "a\nfile(WRITE x y)"), ("cmake/bad.txt.j2", "${x}"),
                        ("cmake/bad.txt.j2", '")'), ("cmake/bad.txt.j2", "a;b"),
                        ("cmake/bad.txt.j2", "#[[ x"), ("cmake/bad.txt.j2", "]]")):
        with pytest.raises(UnsafeOutput):
            env.get_template(name).render(v=value)
    assert env.get_template("c/good.c.j2").render(v="a */ b") == "/* a _/ b */"
    assert env.get_template("cmake/good.txt.j2").render(v='")\n#[[${x};') == "# _)_____{x}_"
    assert env.get_template("c/code.c.j2").render(v="(void *)input") == "x = (void *)input;"
    assert env.get_template("report/page.html.j2").render(v="<script>") == \
        "<p>&lt;script&gt;</p>"


UNTRUSTED = re.compile(r"\b(model|model_sha256|description|mcu|board_file|name)\b|^board$")
# Validated identifiers a template may use as code: a board name (letters, digits, . _ -) and
# region names (linker identifiers), both checked by mpq.boards.
# The build-system layouts' library name (`export.library_name`: letters, digits and `_` only,
# whatever the model file is called).
CODE_FIELDS = {("make/mpq.mk.j2", "board.name"), ("cmake/CMakeLists.txt.j2", "board.name"),
               ("linker/board.ld.j2", '"%-10s" | format(r.name)'),
               ("linker/board.ld.j2", "r.name"),
               *((t, "name") for t in ("arduino/library.properties.j2", "arduino/sketch.ino.j2",
                                       "zephyr/Kconfig.j2", "zephyr/module.yml.j2",
                                       "zephyr/CMakeLists.txt.j2",
                                       "platformio/library.json.j2"))}
FILTER = {"meta": "meta_text"}  # the layouts' metadata files: one filter for every format


def test_every_template_filters_untrusted_text() -> None:
    """Static half of the guard: in every C/make/ld template, each `{{ … }}` that outputs a
    name, the model, a description or a file name goes through its own language's filter, and
    never right after or before a `*` or `/` of the template (a filtered name may hold `/`).
    HTML templates are autoescaped and mark nothing safe."""
    seen, code = 0, set()
    for path in sorted(TEMPLATES.rglob("*.j2")):
        rel = path.relative_to(TEMPLATES).as_posix()
        lang = template_language(rel)
        text = path.read_text()
        if lang == "html":
            assert environment().autoescape(rel) is True
            assert not re.search(r"\|\s*safe\b|Markup", text), rel
            continue
        assert environment().autoescape(rel) is False
        for m in re.finditer(r"{{-?\s*(.*?)\s*-?}}", text, flags=re.S):
            expr = m.group(1)
            filters = re.findall(r"\|\s*(\w+_comment|meta_text|c_string)\b", expr)
            if filters:
                seen += 1
                # C also takes a name as an inert string literal (MPQ_OUTPUTk_NAME)
                assert filters in ([FILTER.get(lang, f"{lang}_comment")],
                                   *([["c_string"]] if lang == "c" else [])), (rel, expr)
                assert text[m.start() - 1] not in "*/" and text[m.end()] not in "*/", (rel, expr)
            elif UNTRUSTED.search(expr):
                assert (rel, expr) in CODE_FIELDS, f"{rel}: '{{{{ {expr} }}}}' is unfiltered"
                code.add((rel, expr))
    assert seen >= 15 and code == CODE_FIELDS
    assert set(LANGUAGES) == {p.name for p in TEMPLATES.iterdir() if p.is_dir()}


# -- the C compiler --------------------------------------------------------------------------

def test_exported_c_keeps_hostile_names_in_comments(exported, tmp_path: Path) -> None:
    """Every exported C file of both backends compiles (portable: gcc -trigraphs -Wall -Wextra
    -Werror, which refuses a nested `/*` and fires any `_Static_assert(0)` that escaped) and
    no payload reaches the code the compiler reads."""
    port = exported["portable"]
    _gcc_syntax([port / n for n in c_sources([p.name for p in port.iterdir()])], [port])
    for directory in exported.values():
        _assert_code_clean(directory, tmp_path)
    model_c = (port / "mpq_model.c").read_text()
    assert "splice ___/ _Static_assert" in model_c  # the name is there, as inert text


def test_host_verify_with_hostile_names(hostile) -> None:
    """End to end: `mpq verify --target host` builds and runs the export of the hostile model:
    bit exact, and the `system("touch SENTINEL")` in a node name never ran."""
    r = run_mpq("verify", hostile["plan"], "--data", EX / "test.npz", "--target", "host",
                "--json", cwd=hostile["root"])
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["mismatches"] == 0 and result["samples"] > 0
    _no_sentinels(hostile["root"], Path.cwd())


def test_firmware_sources_for_a_hostile_board(hostile, tmp_path: Path) -> None:
    """The board file's description reaches startup.c, the semihosting files and the linker
    script only as comments: they compile with -trigraphs -Werror and link, which a payload's
    `_Static_assert(0)` or `ASSERT(0)` would stop, and carry no payload as code."""
    from mpq import firmware

    if shutil.which("arm-none-eabi-gcc") is None:
        pytest.skip("arm-none-eabi-gcc not installed")
    board = plan_board(load_plan(hostile["plan"]).board)
    assert board.name == "evilboard" and board.description == BOARD_DESCRIPTION
    main = tmp_path / "main.c"
    main.write_text("int main(void) { return 0; }\n")
    elf = firmware.build_elf([main], [], board, tmp_path / "build",
                             extra_flags=("-Werror", "-trigraphs"))
    assert elf.is_file()
    build = tmp_path / "build"
    _assert_code_clean(build, tmp_path)
    ld = (build / "evilboard.ld").read_text()
    first_comment = ld[:ld.index("*/")]
    assert "PWNED_LD" in first_comment and "PWNED" not in ld[ld.index("*/"):]


# -- make and the linker -----------------------------------------------------------------------

def _make_database(mk: Path, cwd: Path) -> str:
    """`make -pn -f mpq.mk`: make reads the whole file and prints its variables."""
    r = subprocess.run(["make", "-pn", "-f", str(mk)], capture_output=True, text=True, cwd=cwd)
    assert r.returncode in (0, 2), r.stderr  # 2: no target to make, after reading everything
    assert "PWNED" not in r.stderr and "mpq.mk:" not in r.stderr, r.stderr
    return r.stdout


def test_mpq_mk_never_expands_the_model_file_name(hostile, exported) -> None:
    """mpq.mk names the model in a comment: make neither runs its `$(shell …)` nor reads the
    lines a newline in the file name would start."""
    mk = exported["portable"] / "mpq.mk"
    assert "SENTINEL_F" in mk.read_text().splitlines()[0]
    db = _make_database(mk, hostile["root"])
    assert "PWNED" not in db
    assert f"MPQ_LDSCRIPT := {exported['portable']}/evilboard.ld" in db.splitlines()
    _no_sentinels(hostile["root"], exported["portable"], Path.cwd())


# -- cmake ---------------------------------------------------------------------------------------

def _cmake_configure(directory: Path, build: Path, cwd: Path) -> str:
    """Configure the export's CMakeLists.txt on its own with real cmake (it reads every
    command, and runs any `file(WRITE …)` that escaped a comment); returns its output."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake not installed (see .ci/run)")
    r = subprocess.run(["cmake", "-S", str(directory), "-B", str(build)], capture_output=True,
                       text=True, cwd=cwd, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PWNED" not in r.stdout + r.stderr
    _no_sentinels(cwd, directory, build, Path.cwd())
    return r.stdout


def test_cmakelists_keeps_the_model_file_name_in_a_comment(hostile, exported,
                                                             tmp_path: Path) -> None:
    """CMakeLists.txt names the model in a `#` comment line: cmake configures the export and
    defines mpq_model, never running the `file(WRITE SENTINEL_CM …)` the file name's newline
    and `")` would start nor opening a bracket comment over the code below."""
    text = (exported["portable"] / "CMakeLists.txt").read_text()
    first = text.splitlines()[0]
    assert "file(WRITE SENTINEL_CM x)" in first and first.startswith("# ")
    assert not re.search(r'[\\$;"\[\]]', first[1:])
    _cmake_configure(exported["portable"], tmp_path / "build", hostile["root"])
    cache = (tmp_path / "build" / "CMakeCache.txt").read_text()
    assert "mpq_model" in cache  # the project() line below the comment was read
    _no_sentinels(hostile["root"], exported["portable"], tmp_path / "build", Path.cwd())


# -- plan fields ---------------------------------------------------------------------------------

def _edited_plan(hostile, tmp_path: Path, name: str, **changes) -> Path:
    d = json.loads(hostile["plan"].read_text())
    board = changes.pop("board", {})
    d = {**d, **changes, "board": {**d["board"], **board}}
    path = tmp_path / name
    path.write_text(json.dumps(d))
    return path


def test_plan_text_fields_stay_comments(hostile, tmp_path: Path) -> None:
    """A plan is untrusted too: its `model` and its board's description, whatever they hold,
    export to C that compiles, an mpq.mk make does not expand, a CMakeLists.txt cmake reads
    as comments and a linker script that links."""
    plan = _edited_plan(hostile, tmp_path, "p.plan.json", model=PLAN_MODEL,
                        board={"description": PLAN_TEXT})
    out = tmp_path / "out"
    r = run_mpq("export", plan, "--model", hostile["model"], "-o", out, "--target", "make",
                "--target", "cmake", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    _cmake_configure(out, tmp_path / "cmake-build", tmp_path)
    _gcc_syntax([out / "mpq_model.c", out / "mpq_weights.c"], [out])
    _assert_code_clean(out, tmp_path)
    assert "PWNED" not in _make_database(out / "mpq.mk", tmp_path)
    if shutil.which("arm-none-eabi-ld") is not None:
        # The script parses and its MEMORY and SECTIONS are read (the payload's ASSERT is not).
        obj = tmp_path / "empty.o"
        subprocess.run(["arm-none-eabi-gcc", "-c", "-x", "c", "/dev/null", "-o", str(obj)],
                       check=True)
        r = subprocess.run(["arm-none-eabi-ld", "-T", str(out / "evilboard.ld"), str(obj),
                            "-o", str(tmp_path / "a.elf")], capture_output=True, text=True)
        assert r.returncode == 0 and "PWNED" not in r.stderr, r.stderr
    _no_sentinels(tmp_path, hostile["root"], Path.cwd())


def test_plan_board_is_checked_like_a_board_file(hostile, tmp_path: Path) -> None:
    """The plan's board goes through the board-file validation: a name that is no file name
    or a region that is no linker identifier is one line naming the field, and nothing is
    written."""
    plan = _edited_plan(hostile, tmp_path, "p.plan.json",
                        board={"name": 'x */ _Static_assert(0, "PWNED"); /*'})
    out = tmp_path / "out"
    assert_clean_failure(run_mpq("export", plan, "--model", hostile["model"], "-o", out),
                         "plan: board", "'name'")
    assert not out.exists()
    good = load_plan(hostile["plan"]).board
    for change, field in (({"name": "../../etc/passwd"}, "'name'"),
                          ({"name": "x" * 65}, "'name'"),
                          ({"memory": [{"name": "FLASH */ ASSERT(0) /*", "kind": "flash",
                                        "origin": 0, "length": 4096}]}, "'memory[0].name'"),
                          ({"budget": "$(shell touch SENTINEL)"}, "'budget'"),
                          ({"shell": "x"}, "'shell'")):
        with pytest.raises(MpqError, match=re.escape(field)):
            plan_board({**good, **change})


def test_plan_carries_its_own_board(hostile, tmp_path: Path) -> None:
    """A plan searched with `--board ./evilboard.toml` exports from anywhere (the board file is
    not looked up again), and a board named like a shipped one stays the plan's own."""
    out = tmp_path / "out"
    r = run_mpq("export", hostile["plan"], "-o", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (out / "evilboard.ld").is_file()
    plan, graph = load_plan(hostile["plan"]), load_model(hostile["model"])
    memory = [dict(r) for r in plan.board["memory"]]
    memory[1]["origin"] = 0x20010000  # not the shipped nano33ble's RAM
    plan.board = {**plan.board, "name": "nano33ble", "memory": memory}
    ld = render_export(plan, graph)["nano33ble.ld"]
    assert "ORIGIN = 0x20010000" in ld and "ORIGIN = 0x20000000" not in ld


# -- the browser ---------------------------------------------------------------------------------

class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        self.tags.append((tag, attrs))

    def handle_data(self, data) -> None:
        self.text.append(data)


PAGE_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "code", "table",
             "tr", "th", "td", "sub", "figure", "img", "figcaption", "a"}
PAGE_ATTRS = {"lang", "charset", "class", "src", "alt", "colspan", "href"}
PAGE_LINKS = {"report.json", "sram_profile.png", "bitwidths.png", "patch_grid.png", "bitops.png"}


def test_report_html_holds_only_mpq_markup(hostile, tmp_path: Path) -> None:
    """report.html of a plan whose names, model, strategy and file name are markup: the page
    has only the elements and attributes mpq writes (no `<script>`), the hostile text shows as
    text, and the figures are drawn (a `$…$` model name is not mathtext)."""
    plan = _edited_plan(hostile, tmp_path, 'x<script>alert("PWNED")<!--.plan.json',
                        model=PLAN_MODEL)
    r = run_mpq("report", plan, "--model", hostile["model"], "-o", tmp_path / "rep", "-q")
    assert r.returncode == 0, r.stderr
    page = _Tags()
    page.feed((tmp_path / "rep" / "report.html").read_text())
    page.close()
    assert {t for t, _ in page.tags} <= PAGE_TAGS
    assert {a for _, attrs in page.tags for a, _ in attrs} <= PAGE_ATTRS
    assert {v for _, attrs in page.tags for a, v in attrs if a in ("src", "href")} <= PAGE_LINKS
    text = "".join(page.text)
    for shown in ('<script>alert("PWNED_HTML")</script>', '<script>alert("PWNED_PM")<|script>',
                  'x<script>alert("PWNED")<!--.plan.json'):
        assert shown in text
    assert (tmp_path / "rep" / "bitops.png").is_file()

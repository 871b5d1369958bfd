"""Bad input to `mpq import` / `mpq inspect`: one line on stderr, exit 1, no traceback, and
nothing written."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_builders as B
import pytest
from conftest import run_mpq


def assert_clean_failure(result, *fragments: str) -> None:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def import_fails(tmp_path: Path, model_path: Path, *fragments: str) -> None:
    out = tmp_path / "out.mpq.onnx"
    result = run_mpq("import", model_path, "-o", out)
    assert_clean_failure(result, *fragments)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def save(tmp_path: Path, model: onnx.ModelProto, name: str = "bad.onnx") -> Path:
    path = tmp_path / name
    path.write_bytes(model.SerializeToString())
    return path


def test_not_a_file(tmp_path: Path) -> None:
    import_fails(tmp_path, tmp_path / "missing.onnx", "missing.onnx", "no such file")
    (tmp_path / "dir.onnx").mkdir()
    import_fails(tmp_path, tmp_path / "dir.onnx", "not a file")


def test_not_onnx(tmp_path: Path) -> None:
    path = tmp_path / "notes.onnx"
    path.write_text("this is a text file, not a protobuf\n" * 20)
    import_fails(tmp_path, path, "notes.onnx", "not an ONNX model")


def test_truncated(tmp_path: Path) -> None:
    data = B.mobilenet_v2(0.35, 64, num_classes=10).SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    import_fails(tmp_path, path, "cut.onnx", "truncated")


def test_unsupported_op_names_node_op_and_supported_list(tmp_path: Path) -> None:
    path = save(tmp_path, B.unsupported_op_model())
    import_fails(tmp_path, path, "'/bad/TopK'", "TopK", "supported ops:", "Conv", "Gemm")


def test_dynamic_spatial_dimensions(tmp_path: Path) -> None:
    path = save(tmp_path, B.dynamic_spatial_model())
    import_fails(tmp_path, path, "dynamic dimension", "height")


def test_float16_weights(tmp_path: Path) -> None:
    path = save(tmp_path, B.float16_weights_model())
    import_fails(tmp_path, path, "float16")


def test_missing_initializer(tmp_path: Path) -> None:
    path = save(tmp_path, B.missing_initializer_model())
    import_fails(tmp_path, path, "conv.weight", "missing initializer")


def test_unknown_format(tmp_path: Path) -> None:
    path = tmp_path / "model.pb"
    path.write_bytes(b"\x00\x01")
    import_fails(tmp_path, path, "unknown model format")


def test_unwritable_output_leaves_nothing(tmp_path: Path) -> None:
    path = save(tmp_path, B.tf2onnx_style_model(), "ok.onnx")
    result = run_mpq("import", path, "-o", tmp_path / "no" / "such" / "dir" / "x.onnx")
    assert_clean_failure(result, "does not exist")


@pytest.mark.parametrize("cmd", [["inspect", "--board", "nosuchboard"], ["inspect"]])
def test_inspect_errors(tmp_path: Path, cmd: list[str]) -> None:
    path = save(tmp_path, B.tf2onnx_style_model(), "ok.onnx") if "--board" in cmd \
        else tmp_path / "absent.onnx"
    result = run_mpq(cmd[0], path, *cmd[1:])
    assert_clean_failure(result, "nosuchboard" if "--board" in cmd else "no such file")


def test_usage_error_exit_code_2() -> None:
    result = run_mpq("inspect")
    assert result.returncode == 2
    result = run_mpq("import", "--no-such-option", "x.onnx")
    assert result.returncode == 2

"""The int8 memory model (DESIGN §5): planner behaviour, published anchors, TFLM comparison."""

from __future__ import annotations

import onnx_builders as B
import pytest
from conftest import shared_model

from mpq.frontend.onnx_import import import_model, load_onnx
from mpq.ir import node_macs
from mpq.memory import Buffer, Segment, align_up, layer_memory, packed_bytes, plan_arena
from mpq.tflm import tflm_arena


def buf(name: str, *segments: tuple[int, int, int]) -> Buffer:
    return Buffer(name, [Segment(name, a, b, s) for a, b, s in segments])


def test_planner_reuses_dead_space_largest_first() -> None:
    # a and c never live together: c goes at offset 0 over a; b sits beside both.
    plan = plan_arena([buf("a", (0, 1, 64)), buf("b", (1, 2, 32)), buf("c", (2, 3, 48))])
    assert plan.offsets == {"a": 0, "b": 64, "c": 0}
    assert plan.size == 96


def test_planner_takes_the_first_gap_that_fits() -> None:
    # x and z overlap y in time and leave no gap: y goes on top.
    plan = plan_arena([buf("x", (0, 4, 64)), buf("z", (0, 4, 48)), buf("y", (2, 3, 32))])
    assert plan.offsets == {"x": 0, "z": 64, "y": 112} and plan.size == 144
    # w dies before y is born, leaving a 48-byte hole between x and z: y takes it.
    plan = plan_arena([buf("x", (0, 4, 64)), buf("w", (0, 1, 48)), buf("z", (0, 4, 40)),
                       buf("y", (2, 3, 32))])
    assert plan.offsets == {"x": 0, "w": 64, "z": 112, "y": 64} and plan.size == 152


def test_planner_l_shaped_buffer() -> None:
    # An in-place buffer shrinks from 96 to 16 bytes; a later tensor may use the freed part.
    plan = plan_arena([buf("inplace", (0, 1, 96), (1, 4, 16)), buf("late", (2, 4, 80))])
    assert plan.offsets == {"inplace": 0, "late": 16}
    assert plan.size == 96


def test_packing_and_alignment() -> None:
    assert packed_bytes(10, 8) == 10 and packed_bytes(11, 4) == 6 and packed_bytes(9, 2) == 3
    assert align_up(1) == 16 and align_up(32) == 32


@pytest.mark.parametrize("width,res,arena", [(1.0, 224, 112 * 112 * (16 + 96)),
                                             (0.35, 144, 290_304)])
def test_mobilenet_v2_anchors(width: float, res: int, arena: int) -> None:
    """MCUNetV2's layer-based numbers: 1372 kB at 1.0@224, 283.5 kB at 0.35@144."""
    graph = import_model(B.mobilenet_v2(width, res), "mbv2")
    mem = layer_memory(graph)
    assert align_up(mem.arena_bytes) == align_up(arena)
    assert len(mem.inplace) == 17  # every depthwise conv runs in place
    if width == 1.0:
        macs = sum(node_macs(n, graph) for n in graph.nodes)
        assert abs(macs - 300.8e6) / 300.8e6 <= 0.005


def test_without_inplace_depthwise_needs_more() -> None:
    graph = import_model(B.mobilenet_v2(1.0, 224), "mbv2")
    assert layer_memory(graph, inplace_depthwise=False).arena_bytes > \
        layer_memory(graph).arena_bytes


def test_arena_counts_packed_sub_byte_tensors() -> None:
    graph = import_model(B.mobilenet_v2(0.35, 144), "mbv2")
    full = layer_memory(graph).arena_bytes
    half = layer_memory(graph, bits={t: 4 for t in graph.tensors}).arena_bytes
    assert half == pytest.approx(full / 2, rel=0.01)


# TFLM's planned head for the matching int8 models (tflite-micro's print_allocations()).
TFLM_HEAD = {
    ("pretrainedResnet.onnx", "pretrainedResnet_quant.tflite"): 49_152,
    ("vww_96_float.onnx", "vww_96_int8.tflite"): 73_728,
    ("kws_ref_model_fp32.onnx", "kws_ref_model.tflite"): 16_000,
    ("ad01_fp32.onnx", "ad01_int8.tflite"): 768,
}


@pytest.mark.parametrize("onnx_name,tflite_name", sorted(TFLM_HEAD))
def test_arena_not_larger_than_tflm(onnx_name: str, tflite_name: str) -> None:
    graph = import_model(load_onnx(shared_model(onnx_name)), onnx_name)
    mem = layer_memory(graph)
    tflm = tflm_arena(shared_model(tflite_name))
    assert tflm.head == TFLM_HEAD[(onnx_name, tflite_name)]
    assert mem.arena_bytes <= tflm.head
    print(f"{onnx_name}: mpq arena {mem.arena_bytes} B, peak {mem.peak_sram_bytes} B; "
          f"TFLM head {tflm.head} B")


def _plan_every_offset(buffers):
    """The greedy planner trying the ends of every placed buffer (the planner before it
    pruned the offsets to buffers alive with the one placed): the reference for the test."""
    from mpq.memory import buffers_conflict

    order = sorted(buffers, key=lambda b: (-b.size, b.first, b.name))
    placed, offsets = [], {}
    for buf in order:
        shifts = {s.shift for s in buf.segments}
        candidates = sorted({0} | {off + s.shift + s.size - k for other, off in placed
                                   for s in other.segments for k in shifts
                                   if off + s.shift + s.size >= k})
        for cand in candidates:
            if not any(buffers_conflict(buf, cand, other, off) for other, off in placed):
                break
        offsets[buf.name] = cand
        placed.append((buf, cand))
    return offsets


def test_planner_places_as_trying_every_offset() -> None:
    """`plan_arena` tries offsets only from buffers alive with the one it places; on random
    buffer sets (several segments, overlap shifts) it places every buffer where trying every
    placed buffer's ends does."""
    import random

    from mpq.memory import Buffer, Segment, plan_arena

    rng = random.Random(7)
    for _ in range(2000):
        buffers = []
        for i in range(rng.randint(1, 10)):
            segments = []
            for j in range(rng.choice([1, 1, 2, 3])):
                first = rng.randint(0, 12)
                segments.append(Segment(f"t{i}.{j}", first, first + rng.randint(0, 5),
                                        rng.choice([0, 16, 32, 48, 100, 128]),
                                        rng.choice([0, 0, 8, 40])))
            buffers.append(Buffer(f"b{i}", segments))
        assert plan_arena(buffers).offsets == _plan_every_offset(buffers)

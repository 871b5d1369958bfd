"""Random quantisation parameters and one-node models shared by the randomised op suites
(`test_sim_ops.py` against plain kernels, `test_c_kernels.py` against the C kernels)."""

from __future__ import annotations

import numpy as np

from mpq.ir import Graph, Node, Tensor, conv_out_size
from mpq.quant import arith
from mpq.quant.qmodel import ActQuant, QuantModel, layer_params


def rand_act(rng: np.random.Generator, bits: int, tiny: float = 0.0) -> ActQuant:
    """Random (scale, zp); with probability `tiny` a very small scale, so that conv multipliers
    exceed 1 (S > 0) and acc << S wraps in int32."""
    lo, hi = arith.qrange(bits)
    exp = rng.uniform(-7, -4) if rng.random() < tiny else rng.uniform(-3, 0)
    return ActQuant(float(np.float32(10 ** exp)), int(rng.integers(lo, hi + 1)), bits)


def rand_clamp(rng: np.random.Generator, q: ActQuant) -> tuple[float, float]:
    """A fused activation in real terms: none, relu, relu6 or a random clip inside q's range."""
    kind = rng.integers(4)
    if kind == 0:
        return -np.inf, np.inf
    if kind == 1:
        return 0.0, np.inf
    if kind == 2:
        return 0.0, 6.0
    qmin, qmax = arith.qrange(q.bits)
    qlo = int(rng.integers(qmin, qmax))
    qhi = int(rng.integers(qlo + 1, qmax + 1))
    return float((qlo - q.zero_point) * q.scale), float((qhi - q.zero_point) * q.scale)


def single_node_model(node: Node, shapes: dict[str, tuple[int, ...]],
                      acts: dict[str, ActQuant], **weights) -> QuantModel:
    """A QuantModel of one node over the given tensors (all of the node's inputs are inputs)."""
    graph = Graph("op", {k: Tensor(k, v) for k, v in shapes.items()}, [node],
                  list(node.inputs), [node.outputs[0]])
    return QuantModel(graph, acts, {node.name: layer_params(node, acts, **weights)})


def random_pool_case(rng: np.random.Generator, kind: str, bits: int, max_hw: int,
                     max_c: int) -> tuple[QuantModel, tuple[int, ...], tuple[int, int, int]]:
    """A random max/avg pool on one `bits`-bit tensor: window 1–3, stride 1–2, pads below the
    window, input h, w in [window, max_hw), c in [1, max_c). Returns the one-node model, the
    geometry (kh, kw, sh, sw, pads...) and the input (h, w, c)."""
    kh, kw = (int(v) for v in rng.integers(1, 4, 2))
    sh, sw = (int(v) for v in rng.integers(1, 3, 2))
    pads = tuple(int(v) for v in rng.integers(0, 2, 4))
    pads = (min(pads[0], kh - 1), min(pads[1], kw - 1), min(pads[2], kh - 1),
            min(pads[3], kw - 1))
    h, w, c = int(rng.integers(kh, max_hw)), int(rng.integers(kw, max_hw)), \
        int(rng.integers(1, max_c))
    ho = conv_out_size(h, kh, sh, 1, pads[0], pads[2])
    wo = conv_out_size(w, kw, sw, 1, pads[1], pads[3])
    q = rand_act(rng, bits)
    lo, hi = rand_clamp(rng, q)
    node = Node("pool", f"{kind}_pool", ["x"], ["y"], {
        "kernel": (kh, kw), "strides": (sh, sw), "pads": pads, "act_min": lo, "act_max": hi})
    qm = single_node_model(node, {"x": (1, h, w, c), "y": (1, ho, wo, c)}, {"x": q, "y": q})
    return qm, (kh, kw, sh, sw, *pads), (h, w, c)

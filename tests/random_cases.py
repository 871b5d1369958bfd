"""Random quantisation parameters and one-node models shared by the randomised op suites
(`test_sim_ops.py` against plain kernels, `test_c_kernels.py` against the C kernels)."""

from __future__ import annotations

import numpy as np

from mpq.ir import Graph, Node, Tensor
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

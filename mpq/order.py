"""Memory-aware execution order of branching graphs (issue 16 item 3; DESIGN §5).

A graph with branches (residual shortcuts with their own layers, concatenated paths, several
heads) can run in many topological orders, and the arena the planner needs depends on which:
a branch run early keeps its output alive while the other branch runs (Liberis & Lane,
"Neural networks on microcontrollers: saving memory at inference via operator reordering",
2019). The objective here is the real one: the peak (`arena + scratch`) of the layer-based
schedule as `mpq.memory.layer_memory` plans it for that order — placement, in-place
depthwise, fused residual adds and all — at 8 bits, never a proxy.

- **Exact** when the graph has at most `EXACT_ORDERS` topological orders: every one is
  planned and the lowest peak kept.
- **Heuristic** beyond: Liberis & Lane's dynamic programme over the sets of executed nodes
  minimises the largest sum of live buffers over the steps (a quantity each set and next node
  determine; views counted once; in-place and fused adds ignored) — or, past `DP_STATES`
  sets, the greedy list schedule that runs the ready node leaving the fewest live bytes —
  followed by a local search: between consecutive *cut nodes* (nodes every order runs at the
  same step), each segment with at most `EXACT_ORDERS` orders of its own tries them all with
  the rest fixed, on the real planner, until no segment improves.

Either way the file order is a candidate and wins ties, so a plan never needs more than the
file order did. The chosen order is recorded in the plan (`schedule.order`, present only when
it differs from the model file's) and every later stage runs the nodes in it
(`plan_graph`).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, replace

from mpq.errors import MpqError
from mpq.ir import Graph
from mpq.memory import align_up, layer_memory, packed_bytes

EXACT_ORDERS = 1000  # plan every order up to this many (the planner takes ~1 ms per order)
DP_STATES = 20000  # sets of executed nodes the dynamic programme may visit
LOCAL_PASSES = 3  # rounds of the segment-wise local search


@dataclass(frozen=True)
class OrderChoice:
    """The order chosen for a graph and how: `method` is "exact" or "heuristic", `orders` the
    number of topological orders (capped at EXACT_ORDERS + 1 when there are more)."""

    order: tuple[str, ...]
    peak: int
    file_peak: int
    method: str
    orders: int

    def to_dict(self) -> dict[str, object]:
        return {"method": self.method, "orders": self.orders,
                "orders_more": self.orders > EXACT_ORDERS,
                "peak_sram_bytes": self.peak, "peak_sram_bytes_file_order": self.file_peak}


def predecessors(graph: Graph) -> dict[str, set[str]]:
    """Node → the nodes whose outputs it reads."""
    producer = {t: n.name for n in graph.nodes for t in n.outputs}
    return {n.name: {producer[t] for t in n.inputs if t in producer} for n in graph.nodes}


def order_problem(graph: Graph, order: list[str] | tuple[str, ...]) -> str | None:
    """Why `order` is not a topological order of `graph`'s nodes (None when it is)."""
    names = [n.name for n in graph.nodes]
    if len(order) != len(names) or set(order) != set(names):
        return f"must list each of the model's {len(names)} nodes once"
    preds = predecessors(graph)
    done: set[str] = set()
    for name in order:
        missing = sorted(preds[name] - done)
        if missing:
            return f"'{name}' runs before '{missing[0]}', whose output it reads"
        done.add(name)
    return None


def file_order(graph: Graph) -> tuple[str, ...]:
    """The node names in the model file's order."""
    return graph.file_order or tuple(n.name for n in graph.nodes)


def apply_order(graph: Graph, order: list[str] | tuple[str, ...]) -> Graph:
    """`graph` with its nodes in `order` (a new Graph sharing tensors and nodes; the same one
    when nothing moves). It remembers the file order, so `graph_fingerprint` still names the
    model. `order` must be topological (`order_problem`)."""
    if list(order) == [n.name for n in graph.nodes]:
        return graph
    problem = order_problem(graph, order)
    if problem is not None:
        raise MpqError(f"order: {problem}")
    by_name = {n.name: n for n in graph.nodes}
    original = file_order(graph)
    return replace(graph, nodes=[by_name[name] for name in order],
                   file_order=() if tuple(order) == original else original)


def plan_graph(plan, graph: Graph) -> Graph:
    """`graph` in the order a plan runs it (`schedule.order`; the file order without it), so the
    integer reference, export and verify run the nodes in the order the arena was planned for.
    A wrong order is MpqError naming the field."""
    order = plan.schedule.get("order")
    if order is None:
        order = file_order(graph)
    problem = order_problem(graph, order)
    if problem is not None:
        raise MpqError(f"schedule.order: {problem}")
    return apply_order(graph, order)


def order_peak(graph: Graph, order: tuple[str, ...]) -> int:
    """Peak SRAM (arena + scratch) of the layer-based schedule in `order`, 8-bit maps."""
    return layer_memory(apply_order(graph, order)).peak_sram_bytes


def topological_orders(graph: Graph, names: list[str] | None = None) -> Iterator[tuple[str, ...]]:
    """Every topological order of the nodes `names` (default all; edges outside them are
    ignored), depth first with ready nodes in file order, so the file order comes first."""
    names = names if names is not None else [n.name for n in graph.nodes]
    inside = set(names)
    preds = {k: v & inside for k, v in predecessors(graph).items() if k in inside}
    succs: dict[str, list[str]] = {k: [] for k in names}
    for k in names:
        for p in preds[k]:
            succs[p].append(k)
    pos = {k: i for i, k in enumerate(names)}
    missing = {k: len(preds[k]) for k in names}
    prefix: list[str] = []

    def walk() -> Iterator[tuple[str, ...]]:
        if len(prefix) == len(names):
            yield tuple(prefix)
            return
        ready = sorted((k for k, m in missing.items() if m == 0), key=pos.get)
        for k in ready:
            del missing[k]
            for s in succs[k]:
                missing[s] -= 1
            prefix.append(k)
            yield from walk()
            prefix.pop()
            for s in succs[k]:
                missing[s] += 1
            missing[k] = 0

    return walk()


def _buffers(graph: Graph) -> tuple[list[int], list[int], list[int], list[bool], dict[str, int]]:
    """Per storage root (a tensor and the reshapes viewing it): producer index, bit mask of
    its readers, 8-bit aligned bytes, graph output or not; and node name → index."""
    index = {n.name: i for i, n in enumerate(graph.nodes)}
    root: dict[str, str] = {}
    for n in graph.nodes:
        for t in n.outputs:
            root[t] = root.get(n.inputs[0], n.inputs[0]) if n.op == "reshape" \
                and n.inputs[0] in root else t
    roots = list(dict.fromkeys(root.values()))
    producer = {t: index[n.name] for n in graph.nodes for t in n.outputs}
    readers = {r: 0 for r in roots}
    is_out = {r: False for r in roots}
    size = {r: 0 for r in roots}
    for n in graph.nodes:
        for t in n.inputs:
            if t in root:
                readers[root[t]] |= 1 << index[n.name]
    for t, r in root.items():
        size[r] = max(size[r], align_up(packed_bytes(graph.tensors[t].size, 8)))
        is_out[r] = is_out[r] or t in graph.outputs
    return ([producer[r] for r in roots], [readers[r] for r in roots], [size[r] for r in roots],
            [is_out[r] for r in roots], index)


def live_order(graph: Graph) -> tuple[str, ...]:
    """The order minimising the largest sum of live buffers over the steps (Liberis & Lane's
    dynamic programme over executed sets, ties to the file order), or the greedy list schedule
    when it would visit more than DP_STATES sets. Between steps a buffer is live when its
    producer ran and a reader has not (or it is a graph output); during a node's step its
    inputs and its outputs are live too."""
    prod, readers, size, is_out, index = _buffers(graph)
    names = [n.name for n in graph.nodes]
    n_nodes = len(names)
    full = (1 << n_nodes) - 1
    pred_mask = [0] * n_nodes
    for k, ps in predecessors(graph).items():
        for p in ps:
            pred_mask[index[k]] |= 1 << index[p]
    out_bytes = [0] * n_nodes
    for p, s in zip(prod, size, strict=True):
        out_bytes[p] += s

    def between(done: int) -> int:
        return sum(s for p, r, s, o in zip(prod, readers, size, is_out, strict=True)
                   if done >> p & 1 and (o or r & ~done))

    def ready(done: int) -> list[int]:
        return [i for i in range(n_nodes)
                if not done >> i & 1 and pred_mask[i] & done == pred_mask[i]]

    memo: dict[int, int] = {}

    def best(done: int) -> int:
        if done == full:
            return 0
        if done in memo:
            return memo[done]
        if len(memo) > DP_STATES:
            raise _TooMany
        base = between(done)
        value = min(max(base + out_bytes[i], best(done | 1 << i)) for i in ready(done))
        memo[done] = value
        return value

    order: list[int] = []
    done = 0
    try:
        best(0)
        while done != full:
            base = between(done)
            i = min(ready(done), key=lambda i: (max(base + out_bytes[i], best(done | 1 << i)),
                                                i))
            order.append(i)
            done |= 1 << i
    except (_TooMany, RecursionError):
        order, done = [], 0
        while done != full:
            base = between(done)
            i = min(ready(done), key=lambda i: (base + out_bytes[i],
                                                between(done | 1 << i), i))
            order.append(i)
            done |= 1 << i
    return tuple(names[i] for i in order)


class _TooMany(Exception):
    """The dynamic programme would visit more than DP_STATES sets."""


def segments(graph: Graph, order: tuple[str, ...]) -> list[tuple[int, int]]:
    """(start, end) position ranges of `order` between cut nodes — nodes every other node
    precedes or follows — holding at least two nodes: each is reordered on its own."""
    preds = predecessors(graph)
    anc: dict[str, set[str]] = {}
    for name in order:
        a: set[str] = set()
        for p in preds[name]:
            a |= anc[p] | {p}
        anc[name] = a
    desc_count = {name: 0 for name in order}
    for name in order:
        for a in anc[name]:
            desc_count[a] += 1
    n = len(order)
    cuts = [i for i, name in enumerate(order) if len(anc[name]) + desc_count[name] == n - 1]
    out: list[tuple[int, int]] = []
    for lo, hi in zip([-1, *cuts], [*cuts, n], strict=True):
        if hi - lo - 1 >= 2:
            out.append((lo + 1, hi))
    return out


def _local_search(graph: Graph, order: tuple[str, ...], peak: int) -> tuple[tuple[str, ...], int]:
    """Segment by segment, every order of the segment (when it has at most EXACT_ORDERS) with
    the rest fixed; a strictly lower real peak is kept. Up to LOCAL_PASSES rounds."""
    for _ in range(LOCAL_PASSES):
        improved = False
        for lo, hi in segments(graph, order):
            local = list(itertools.islice(topological_orders(graph, list(order[lo:hi])),
                                          EXACT_ORDERS + 1))
            if len(local) > EXACT_ORDERS:
                continue
            for cand in local:
                full = order[:lo] + cand + order[hi:]
                p = order_peak(graph, full)
                if p < peak:
                    order, peak, improved = full, p, True
        if not improved:
            break
    return order, peak


def best_order(graph: Graph) -> OrderChoice:
    """The execution order with the lowest planned peak (module docstring): exact over every
    topological order when there are at most EXACT_ORDERS, else the heuristic."""
    start = file_order(graph)
    base = apply_order(graph, start) if graph.file_order else graph
    orders = list(itertools.islice(topological_orders(base), EXACT_ORDERS + 1))
    file_peak = order_peak(base, start)
    if len(orders) <= EXACT_ORDERS:
        peaks = [order_peak(base, o) for o in orders]
        i = min(range(len(orders)), key=lambda k: (peaks[k], k))  # the file order is first
        return OrderChoice(orders[i], peaks[i], file_peak, "exact", len(orders))
    best, peak = start, file_peak
    guided = live_order(base)
    guided_peak = order_peak(base, guided)
    if guided_peak < peak:
        best, peak = guided, guided_peak
    best, peak = _local_search(base, best, peak)
    return OrderChoice(best, peak, file_peak, "heuristic", len(orders))


_CACHE: dict[int, tuple[weakref.ref, Graph, OrderChoice]] = {}


def memory_ordered(graph: Graph) -> tuple[Graph, OrderChoice]:
    """`graph` in its `best_order` and the choice, computed once per Graph object (the search
    asks from the budget check and again from the search proper)."""
    hit = _CACHE.get(id(graph))
    if hit is not None and hit[0]() is graph:
        return hit[1], hit[2]
    for k in [k for k, (ref, _, _) in _CACHE.items() if ref() is None]:
        del _CACHE[k]
    choice = best_order(graph)
    ordered = apply_order(graph, choice.order)
    _CACHE[id(graph)] = (weakref.ref(graph), ordered, choice)
    _CACHE[id(ordered)] = (weakref.ref(ordered), ordered, choice)
    return ordered, choice

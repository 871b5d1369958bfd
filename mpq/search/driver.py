"""`mpq search`: from a model, calibration data and a board to a plan (DESIGN §5–§7).

The steps, each a function of the one before:
1. calibration statistics (or synthetic ones for the data-free `qe` strategy);
2. the candidate patch schedules: none, given, or searched (`candidate_tiers`), each solved
   and the best kept;
3. scores per feature map and bitwidth (VDQS entropy or QE-Score; for `importance`, LIMPQ's
   fitted LSQ step sizes, `search/importance.py`);
4. the allocation problem under the board's budgets, solved by `exact`, `vdqs` or `int8`
   (`importance`: the exact ILP on its costs, with an optional BitOPs row), then refined by
   QBR;
5. quantisation at the chosen bits, VDPC's thresholds and outlier rates;
6. the plan, with everything the memory model predicts.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mpq.boards import Board
from mpq.budget import (
    align4,
    board_cpu,
    code_shape,
    packed_layers,
    packed_padding_bytes,
    predicted_stack_bytes,
    stage_branch_flash,
    unpacked_layers,
    unpacked_needs,
)
from mpq.errors import MpqError
from mpq.interpreter import to_ir_layout
from mpq.ir import Graph, graph_fingerprint, node_macs, tensor_groups
from mpq.latency import search_prediction
from mpq.memory import (
    SCRATCH_PREFIX,
    ArenaPlan,
    align_up,
    code_bytes_estimate,
    constant_flash_bytes,
    packed_bytes,
    scratch_record,
)
from mpq.memory import io_buffer_bytes as memory_io_bytes
from mpq.order import EXACT_ORDERS, OrderChoice, apply_order, file_order, memory_ordered
from mpq.patch import (
    LINE_PREFIX,
    PatchSchedule,
    PatchSplit,
    cache_within_peak,
    choose_stage_overlaps,
    plan_patches,
    pooled_splits,
    search_patches,
)
from mpq.plan import (
    LayerPlan,
    Plan,
    TensorPlan,
    file_sha256,
    layer_weight_fields,
    plan_quant_model,
)
from mpq.quant.calibrate import (
    CalibrationStats,
    Dataset,
    activation_range,
    calibrate,
    dataset_from_array,
    onnx_input_shape,
)
from mpq.quant.lut import tables_flash
from mpq.quant.ptq import PtqOptions, apply_ptq
from mpq.quant.qmodel import (
    QuantModel,
    fixed_output_quant,
    quantize_graph,
    shared_quant_groups,
)
from mpq.quant.weights import WeightSpec, check_exportable, codebook_bytes, storage
from mpq.regions import place_buffers
from mpq.search.importance import ImportanceTable, solve_importance, total_importance
from mpq.search.measured import Measured, initial, plan_fidelity, refine, rescore
from mpq.search.rusci import layer_groups, solve_rusci
from mpq.search.scores import MapScore, full_precision_bitops, layer_bitops, qe_scores, vdqs_scores
from mpq.search.sensitivity import Probe
from mpq.search.solvers import Group, Problem, Solution, refine_bits, solve_exact, solve_vdqs
from mpq.vdpc import VdpcResult, classify_rates

STRATEGIES = ("measured", "exact", "vdqs", "int8", "qe", "importance", "rusci")
#: The grid sizes n of `--patches auto`: MCUNetV2's choices in the paper strategies' space ...
PATCH_N = (2, 3, 4, 5, 6, 8)
#: ... and every n from 2 to 8 in the wider space of the measured default (a redundant-MAC
#: bound above the paper's): a 7×7 split tensor has no 8×8 grid, and its 7×7 one can be the
#: grid that keeps the most maps at 8 bits (the Fashion example at 0.35× of its int8 need: an
#: 11-layer 7×7 stage with every map but one block's expansion at 8 bits, 92.1 % top-1, where
#: the best other grid left 2-bit maps and 90.4 %).
WIDE_PATCH_N = (2, 3, 4, 5, 6, 7, 8)


@dataclass
class SearchOptions:
    """Everything `mpq search` lets the user set (defaults: DESIGN §6–§7)."""

    strategy: str = "measured"
    lam: float = 0.6
    phi: float = 0.96
    bins: int = 256
    bits: tuple[int, ...] = (8, 4, 2)
    weight_bits: tuple[int, ...] = (8,)
    weight_scheme: str | None = None  # `--weights SCHEME:B`: every layer at weight_bits[0]
    patches: str = "auto"  # "auto", "none" or "k=8,n=4"
    vdpc: bool = True
    vdpc_min_outliers: int = 1
    qbr: bool = True
    phi_norm: str = "global"
    range_method: str = "entropy"
    sram: int | None = None
    flash: int | None = None
    # `--max-overhead`: bound on redundant MACs / total MACs of `--patches auto`'s splits;
    # None: the strategy's own (`overhead_bound`)
    max_overhead: float | None = None
    bitops: int | None = None  # BitOPs budget of `--strategy importance` (none: unbounded)
    bias_correction: bool = False  # `mpq.quant.ptq`: fitted on the calibration data
    adaround: bool = False
    order: str = "memory"  # `--order`: memory (`mpq.order.best_order`) or file
    io: str = "arena"  # `--io`: graph input/outputs in the arena or the caller's (memory.IO_MODES)
    # The measured strategy tries bias correction / AdaRound on its plan and keeps what
    # measures best (`search.ptq_choice`); off, or the user's own --bias-correction/--adaround
    # given, it does not.
    auto_ptq: bool = True
    # `--compare-strategies`: the measured plan competes with the other strategies' plans
    # (`search.portfolio`); opt-in, it costs their searches (several times the default's time)
    compare_strategies: bool = False
    # `--patch-cache`: line buffers keep the rows adjacent patches share (`mpq.patch.cache_rows`)
    # — "auto": where the search finds them better (the same peak, fewer MACs) and VDPC is not
    # in play (a cached row must come from the patch's own branch); "on"; "off" (MCUNetV2)
    patch_cache: str = "auto"
    # `--overlap`: layer outputs start inside their dying inputs where the kernels' write order
    # allows and the arena shrinks (`memory.choose_overlaps`; layer-based schedules)
    overlap: bool = True
    # `--scratch`: the kernels' scratch per layer inside the arena, alive only at its step
    # (`memory.scratch_buffers`; layer-based schedules), or one separate largest-size buffer
    scratch: str = "arena"


#: The patch overhead bound of the paper strategies (MCUNetV2's schedules stay within ~10–30 %)
#: and of the accuracy-first default (DESIGN §7.5: it may recompute up to twice the network's
#: own MACs when a deeper or finer patch stage keeps maps at more bits — on the Fashion example
#: at 0.5× of the int8 need, an 11-layer stage with 78 % redundant MACs keeps top-1 at
#: 91.9 % where the 25 % bound leaves 2-bit maps and 88.4 %; at 0.42×, its 6×6 grid (151 %)
#: keeps 92.1 % where the bound 1.0's 8-layer 5×5 stage left 2-bit maps and 90.4 %).
PAPER_MAX_OVERHEAD = 0.25
MEASURED_MAX_OVERHEAD = 2.0
#: ... and of the default's pooled stages (`patch.pooled_splits`: the whole network up to its
#: global average pool, one or a few rows of its last map per patch), which alone never hold
#: a whole feature map: their recomputed halos are the price of fitting a budget below every
#: other schedule (KWS DS-CNN: 25 one-row patches, 333 % redundant MACs, int8 in 6.7 kB
#: where every other schedule needs 9.7 kB). The measured selection still prefers fewer
#: redundant MACs at equal fidelity; `--max-overhead` bounds them too.
POOLED_MAX_OVERHEAD = 4.0


def grid_sizes(opts: SearchOptions) -> tuple[int, ...]:
    """The n `--patches auto` tries: WIDE_PATCH_N beyond the paper's redundant-MAC bound (the
    measured default, its wider tier for the paper strategies, a larger `--max-overhead`),
    else PATCH_N."""
    return WIDE_PATCH_N if overhead_bound(opts) > PAPER_MAX_OVERHEAD else PATCH_N


def overhead_bound(opts: SearchOptions) -> float:
    """The redundant-MAC bound of `--patches auto` (a fraction of the network's MACs):
    `--max-overhead` when given, else MEASURED_MAX_OVERHEAD for the measured strategy and
    PAPER_MAX_OVERHEAD for the others."""
    if opts.max_overhead is not None:
        return opts.max_overhead
    return MEASURED_MAX_OVERHEAD if opts.strategy == "measured" else PAPER_MAX_OVERHEAD


#: A schedule and the options it is solved under (the paper strategies' fallback tier solves
#: its schedules without VDPC: `candidate_tiers`).
Candidate = tuple[PatchSchedule, SearchOptions]


class BudgetError(MpqError):
    """No allocation fits; `sram_needed` is the smallest SRAM this schedule reaches."""

    def __init__(self, message: str, sram_needed: int) -> None:
        super().__init__(message)
        self.sram_needed = sram_needed


@dataclass
class SearchResult:
    plan: Plan
    quant: QuantModel
    schedule: PatchSchedule
    solution: Solution
    qbr_log: list[str] = field(default_factory=list)
    vdpc: VdpcResult | None = None


# -- patches ------------------------------------------------------------------------------------

def parse_patches(text: str) -> PatchSplit | str:
    """`auto`, `none`, `k=8,n=4` (k = number of layers in the patch stage, an n×n grid) or
    `k=10,n=25,m=1` (n rows × m columns of patches)."""
    if text in ("auto", "none"):
        return text
    try:
        fields = dict(part.split("=", 1) for part in text.split(","))
        if set(fields) - {"k", "n", "m"}:
            raise KeyError
        return PatchSplit(int(fields["k"]), int(fields["n"]),
                          cols=int(fields["m"]) if "m" in fields else None)
    except (ValueError, KeyError):
        raise MpqError(f"--patches must be auto, none, k=K,n=N or k=K,n=N,m=M (e.g. k=8,n=4), "
                       f"not '{text}'") from None


# -- the allocation problem ---------------------------------------------------------------------

def tie_groups(graph: Graph, fused: dict[str, tuple[str, str]] | None = None,
               inplace: set[str] | None = None) -> list[list[str]]:
    """Tensors that must share a bitwidth: pool/reshape/pad/slice outputs with their inputs,
    concat inputs with the output, through any chain of those (`shared_quant_groups`; DESIGN
    §4.1; TFLite requires it, there is no requantisation), a
    fused residual add's sum with the skip it overwrites (`memory.fused_residual_adds`), and an
    in-place depthwise conv's output with its input — writing in place is safe channel by
    channel only when every element keeps its bit position."""
    # Views and concats: exactly the tensors that share one quantisation (the quantiser's
    # groups), so a concat of reshaped heads ties the heads' producers too.
    pairs = [(g[0], t) for g in shared_quant_groups(graph) for t in g[1:]]
    for n in graph.nodes:
        if fused and n.name in fused:
            pairs.append((fused[n.name][1], n.outputs[0]))
        elif inplace and n.name in inplace:
            pairs.append((n.inputs[0], n.outputs[0]))
    return tensor_groups(graph, pairs)


def fixed_8bit(graph: Graph, classified: str | None) -> set[str]:
    """Tensors held at 8 bits whatever the search: inputs, outputs, softmax, sigmoid and tanh
    outputs and the map VDPC classifies (both branches must read the same values)."""
    fixed = set(graph.inputs) | set(graph.outputs)
    fixed |= {n.outputs[0] for n in graph.nodes if n.op == "softmax"}
    # Sigmoid and tanh outputs too: TFLM fixes them at 8 bits, 1/256 and 1/128 (mpq.quant.lut).
    fixed |= {n.outputs[0] for n in graph.nodes if fixed_output_quant(n) is not None}
    if classified:
        fixed.add(classified)
    return fixed


def weight_flash(node_weight_size: int, cout: int, bits: int, scheme: str = "linear") -> int:
    """Flash of one layer: packed weights (+ the scheme's codebook) + int32 bias + int32 (M, S)
    per output channel, each array 4-byte aligned as mpq_weights.c declares it."""
    return align4(packed_bytes(node_weight_size, bits)) + align4(codebook_bytes(scheme, bits)) \
        + 12 * cout


def weight_specs(graph: Graph, opts: SearchOptions) -> dict[str, WeightSpec]:
    """`--weights SCHEME:B`: every weighted layer's scheme (none: linear, bits searched)."""
    if opts.weight_scheme is None:
        return {}
    spec = WeightSpec(opts.weight_scheme, opts.weight_bits[0])
    check_exportable(spec, "--weights")
    return {n.name: spec for n in graph.nodes if n.weight is not None}


def weight_omega(weight: np.ndarray, bits: int) -> float:
    """Relative quantisation error ‖W − Q_b(W)‖²/‖W‖² of per-channel symmetric weights: the
    data-free accuracy proxy of a weight bitwidth."""
    from mpq.quant.arith import quantize_weights_symmetric

    q, s = quantize_weights_symmetric(weight, bits)
    deq = q.astype(np.float64) * s.reshape((-1,) + (1,) * (weight.ndim - 1))
    norm = float((weight.astype(np.float64) ** 2).sum())
    return float(((weight - deq) ** 2).sum()) / norm if norm > 0 else 0.0


_OMEGA_CACHE: dict[tuple[int, int], tuple[weakref.ref, float]] = {}


def cached_weight_omega(weight: np.ndarray, bits: int) -> float:
    """`weight_omega(weight, bits)`, computed once per weight array and bitwidth: every
    candidate schedule's problem asks for the same layers' errors (MobileNetV2-1.0@224 on
    stm32h743: 742 quantisations for 7 schedules, 106 distinct). Keyed on the array's
    identity, checked through a weak reference so a new array at a recycled address is never
    served an old value; mpq never changes a weight array in place (layers get new arrays)."""
    key = (id(weight), bits)
    hit = _OMEGA_CACHE.get(key)
    if hit is not None and hit[0]() is weight:
        return hit[1]
    if len(_OMEGA_CACHE) >= 4096:  # drop the entries of arrays gone since
        for k in [k for k, (ref, _) in _OMEGA_CACHE.items() if ref() is None]:
            del _OMEGA_CACHE[k]
    value = weight_omega(weight, bits)
    _OMEGA_CACHE[key] = (weakref.ref(weight), value)
    return value


def weights_flash(graph: Graph, bits: int, scheme: str = "linear") -> int:
    """Flash of every weighted layer's weights at `bits` under `scheme` (`weight_flash`
    summed over the graph)."""
    return sum(weight_flash(n.weight.size, n.weight.shape[0], bits, scheme)
               for n in graph.nodes if n.weight is not None)


def weight_options(graph: Graph, opts: SearchOptions, flash_budget: int) -> tuple[int, ...]:
    """The weight bitwidths the search offers every weighted layer, largest first: 8 unless
    the user offers more (--weight-bits) or Flash demands it (4 then joins), or the one
    bitwidth --weights fixes (DESIGN §7)."""
    if opts.weight_scheme is not None:
        return (opts.weight_bits[0],)
    w_options = tuple(sorted(set(opts.weight_bits) | {8}, reverse=True))
    if weights_flash(graph, 8) > flash_budget and w_options == (8,):
        w_options = (8, 4)
    return w_options


def build_problem(graph: Graph, schedule: PatchSchedule, scores: dict[str, MapScore],
                  opts: SearchOptions, sram_budget: int, flash_budget: int,
                  classified: str | None, inplace: set[str], scored: bool = True
                  ) -> tuple[Problem, list[str]]:
    """The allocation problem of DESIGN §7.2 (and the activation groups in schedule order).

    `scored=False` skips the weights' quantisation errors (every weight quantised at every
    option): `feasible_candidates` only needs the sizes."""
    fixed = fixed_8bit(graph, classified)
    stage_internal = set()
    if schedule.split_tensor is not None and opts.vdpc:
        by_name = {n.name: n for n in graph.nodes}
        stage_internal = {by_name[s].outputs[0] for s in schedule.stage_nodes} \
            - {schedule.split_tensor}
    groups: list[Group] = []
    order: list[str] = []
    for members in tie_groups(graph, schedule.fused_adds, inplace):
        if any(t in graph.inputs for t in members):
            continue  # the caller's buffer: never in the arena, always 8-bit
        if any(t in fixed for t in members):
            continue
        options = tuple(b for b in opts.bits)
        score = {b: sum(scores[t].score[b] for t in members if t in scores) for b in options}
        omega = {b: sum(scores[t].omega[b] for t in members if t in scores) for b in options}
        sram_free = all(t in stage_internal for t in members)
        groups.append(Group(members[0], tuple(members), options, score, omega,
                            sram_free=sram_free))
        order.append(members[0])
    weighted = [n for n in graph.nodes if n.weight is not None]
    w_options = weight_options(graph, opts, flash_budget)
    scheme = opts.weight_scheme or "linear"
    flash_fixed = tables_flash(graph)  # activation lookup tables (mpq.quant.lut)
    total_params = max(sum(n.weight.size for n in weighted), 1)
    for n in weighted:
        if len(w_options) == 1:
            flash_fixed += weight_flash(n.weight.size, n.weight.shape[0], w_options[0], scheme)
            continue
        omega_w = {b: cached_weight_omega(n.weight, b) if scored else 0.0 for b in w_options}
        if opts.weight_bits == (8,):
            # Only Flash forces lower bits: cost them by the parameters they touch, so the
            # fewest parameters drop and activation scores are not traded against them.
            score_w = {b: -10.0 * (8 - b) / 8 * n.weight.size / total_params for b in w_options}
        else:
            score_w = {b: -opts.lam * omega_w[b] for b in w_options}
        groups.append(Group(f"weights:{n.name}", (), w_options, score_w, omega_w,
                            flash={b: weight_flash(n.weight.size, n.weight.shape[0], b)
                                   for b in w_options}))
    flash_fixed += constant_flash_bytes(graph)

    buffers = schedule.buffers()
    # The kernels' scratch in the arena (`schedule.scratch_buffers`): fixed bytes at their
    # steps, so each step's row holds them as the real planner does (a slot a 4/2-bit input
    # enlarges for the packed kernel counts at its int8 size: the rows stay a relaxation).
    slots = schedule.scratch_buffers(inplace)
    slot_bytes = {b.name: b.size for b in slots}
    live: list[list[tuple[str, ...]]] = []
    for t in range(len(schedule.steps)):
        step = []
        for buf in buffers:
            # An overlapped input and output (different shifts) count as two buffers here:
            # the linear model then asks no more of the bits than without overlap, and the
            # exact planner (`arena`) credits the overlap.
            for shift in sorted({s.shift for s in buf.segments}):
                alive = tuple(s.tensor for s in buf.segments
                              if s.first <= t <= s.last and s.shift == shift)
                if alive:
                    step.append(alive)
        step += [(b.name,) for b in slots if any(s.first <= t <= s.last for s in b.segments)]
        live.append(step)

    elements = schedule.tensor_elements
    never_stored = schedule.fused_conv_outputs

    def size(tensor: str, bits: int) -> int:
        if tensor in never_stored:
            return 0
        if tensor in slot_bytes:
            return slot_bytes[tensor]
        return align_up(packed_bytes(elements[tensor], bits))

    plans: dict[tuple, ArenaPlan] = {}  # the planner is deterministic: each bit map planned once

    def placement(bits: dict[str, int]) -> ArenaPlan:
        key = tuple(sorted(bits.items()))
        if key not in plans:
            plans[key] = schedule.memory(bits).plan
        return plans[key]

    problem = Problem(groups=groups, live=live, size=size,
                      arena=lambda bits: placement(bits).size,
                      sram_budget=sram_budget, flash_budget=flash_budget,
                      flash_fixed=flash_fixed, placement=placement)
    return problem, order


# -- the whole search ---------------------------------------------------------------------------

def synthetic_data(graph: Graph, samples: int = 64, lo: float = 0.0,
                   hi: float = 1.0) -> Dataset:
    """Uniform random inputs in [lo, hi] (seeded) for the data-free `qe` strategy's ranges."""
    shape = onnx_input_shape(graph)
    x = np.random.default_rng(0).uniform(lo, hi, (samples, *shape)).astype(np.float32)
    return dataset_from_array(x, "synthetic inputs")


def search(model_path: Path, graph: Graph, board: Board, data: Dataset | None,
           opts: SearchOptions, progress: Callable[[int], None] | None = None,
           stats: CalibrationStats | None = None,
           log: Callable[[str], None] | None = None,
           candidates: list[Candidate] | None = None) -> SearchResult:
    """Run the whole search and return the plan (DESIGN §1, §5–§7). `log` receives one line
    per phase and per candidate schedule (what `mpq -v search` prints). `candidates` are the
    schedules `feasible_candidates` returned for the same graph, board and options (else
    they are computed, and checked, here before calibration)."""
    say = log or (lambda message: None)
    if opts.strategy not in STRATEGIES:
        raise MpqError(f"unknown strategy '{opts.strategy}' (choose from "
                       f"{', '.join(STRATEGIES)})")
    if opts.bitops is not None and opts.strategy != "importance":
        raise MpqError("--bitops is a constraint of --strategy importance")
    if opts.strategy == "importance" and data is None:
        raise MpqError("strategy 'importance' needs calibration data (--data): it fits its "
                       "step sizes on the layers' activations")
    if opts.strategy == "measured" and data is None:
        raise MpqError("strategy 'measured' needs calibration data (--data): it measures each "
                       "bit choice on up to 64 of its samples; the data-free strategy is "
                       "--strategy qe")
    notes: list[str] = []
    graph, order_choice = search_graph(graph, opts)
    if order_choice is not None:
        more = "more than " if order_choice.orders > EXACT_ORDERS else ""
        say(f"order: {order_choice.method} over {more}{min(order_choice.orders, EXACT_ORDERS):,}"
            f" topological order(s); int8 peak {order_choice.file_peak:,} B in file order, "
            f"{order_choice.peak:,} B in the chosen one")
    specs = weight_specs(graph, opts)  # refuses what cannot be exported before any work
    if opts.adaround and opts.weight_scheme not in (None, "linear"):
        raise MpqError(f"--adaround rounds linear weights; --weights {opts.weight_scheme} "
                       "chooses its own levels")
    if data is None and stats is None:
        if opts.strategy != "qe":
            raise MpqError(f"strategy '{opts.strategy}' needs calibration data (--data); the "
                           "data-free strategy is --strategy qe")
        data = synthetic_data(graph)
        notes.append("no calibration data: activation ranges from 64 synthetic uniform [0, 1] "
                     "inputs")
    if candidates is None:
        candidates = feasible_candidates(graph, board, opts)
    x_val = None
    if opts.strategy == "measured":
        from mpq.fidelity import measured_samples, validation_inputs

        # Ranges come from every sample (they need them all: on KWS, 75 of 100 samples cost
        # 0.7 pp); the measurements run on up to 64 of the same samples, never on eval data.
        macs = sum(node_macs(n, graph) for n in graph.nodes)
        x_val = validation_inputs(data, measured_samples(macs))
        notes.append(f"measured search: ranges from all {len(data)} samples of --data, damage "
                     f"measured on {len(x_val)} of them")
    if stats is None:
        stats = calibrate(graph, data, progress=progress)
    say(f"calibrated: {len(stats.tensors)} tensors")
    cache: dict[tuple[str, int], tuple[float, float]] = {}

    def range_of(t: str, bits: int) -> tuple[float, float]:
        if (t, bits) not in cache:
            cache[(t, bits)] = activation_range(stats.tensors[t], opts.range_method, bits)
        return cache[(t, bits)]

    probe = None
    if x_val is not None:
        probe = Probe(graph, x_val, range_of, specs)
        say(f"sensitivity: int8 reference run on {probe.samples} samples of --data")

    sram_total, flash_total, input_bytes, code = _totals(graph, board, opts)
    flash_budget = flash_total - code
    table = ImportanceTable(graph, data, stats, opts.bits, opts.weight_bits) \
        if opts.strategy == "importance" else None
    if opts.strategy == "qe":
        scores = qe_scores(graph, opts.bits, opts.lam, opts.phi_norm)
    elif table is not None or probe is not None:
        scores = {}  # the groups' costs come from the fitted step sizes or measured damage
    else:
        scores = vdqs_scores(graph, stats, opts.bits, opts.lam, opts.bins, opts.phi_norm,
                             range_method=opts.range_method)
    say(f"scoring: {len(scores)} feature maps, {len(candidates)} candidate schedule(s)")
    full_bitops = full_precision_bitops(graph)
    attempts = []
    to_measure: list[_Attempt] = []  # measured strategy: ILP solutions to measure
    failures: list[MpqError] = []
    for schedule, s_opts in candidates:
        try:
            extra = stage_flash(graph, schedule, s_opts, board_cpu(board))
            attempt = _solve_schedule(graph, schedule, scores, s_opts, sram_total, flash_total,
                                      flash_budget - extra, input_bytes, code + extra, table,
                                      probe, say)
        except MpqError as exc:  # this schedule cannot meet the budgets; try the others
            failures.append(exc)
            say(f"solving: {_describe(schedule)}: {exc}")
            continue
        # Schedules are compared on what each would ship: after QBR, on one objective over
        # every map (see `schedule_value`), not on the solver's, whose groups differ by
        # schedule.
        if probe is not None:
            to_measure.append(attempt)  # below, the schedules' plans side by side
            say(f"solving: {_describe(schedule)}: arena {attempt.solution.arena:,} B, sum of "
                f"single-choice damages {-attempt.solution.objective:.5f}")
            continue
        if opts.qbr and opts.strategy != "int8":
            attempt.refined, attempt.qbr_log = refine_bits(attempt.problem, attempt.solution)
        final = attempt.refined or attempt.solution
        # Overlap recomputation costs BitOPs that S does not see: charge it in S's units.
        penalty = (1 - opts.lam) * schedule.redundant_macs * 64 / full_bitops
        value = schedule_value(attempt.problem, final.choice, scores) - penalty
        if table is not None:  # LIMPQ's cost has no BitOPs term: least cost, then fewest MACs
            value = -round(total_importance(table, graph, attempt.problem, final.choice), 9)
        say(f"solving: {_describe(schedule)}: arena {final.arena:,} B, objective "
            f"{attempt.solution.objective:.4f}, after QBR {value:.4f}")
        attempts.append((round(value, 12), *_tie_break(attempt), attempt))
    if to_measure:
        from mpq.search.measured import choice_bits

        probe.prefetch([choice_bits(a.problem, a.solution.choice) for a in to_measure])
        for attempt in to_measure:
            attempt.pool = initial(attempt.problem, attempt.solution, probe)
            value = -attempt.pool.best[0]
            attempts.append((round(value, 12), *_tie_break(attempt), attempt))
        ranked = sorted(attempts, key=lambda a: a[:-1], reverse=True)
        say(f"measuring: the ILP solutions of {len(to_measure)} schedule(s), side by side: "
            + ", ".join(f"{_describe(a[-1].schedule)} {-a[0]:.5f}" for a in ranked))
    if not attempts:
        raise min(failures, key=lambda e: getattr(e, "sram_needed", 1 << 62))
    if probe is not None:
        attempts = _refine_measured(attempts, opts, say)
    attempt = max(attempts, key=lambda a: a[:-1])[-1]
    schedule, problem, solution = attempt.schedule, attempt.problem, attempt.solution
    use_vdpc, classified = attempt.use_vdpc, attempt.classified
    opts_eff = replace(opts, vdpc=use_vdpc)
    if schedule.split_tensor is not None and opts.vdpc and opts.strategy == "measured":
        notes.append(MEASURED_VDPC_NOTE)
    elif schedule.cache and opts.vdpc and opts.strategy != "int8":
        notes.append("VDPC off: the patch line buffers (--patch-cache) need every patch on "
                     "one branch")
    by_name = {n.name: n for n in graph.nodes}
    objective_solver = solution.objective
    qbr_log = attempt.qbr_log
    solution = attempt.refined or solution

    act_bits = problem.tensor_bits(solution.choice)  # SRAM view: VDPC stage maps at 8
    mixed_bits = {t: 8 for t in graph.tensors}
    for g in problem.groups:
        for t in g.tensors:
            mixed_bits[t] = solution.choice[g.name]
    w_bits = {n.name: specs[n.name].bits if specs else 8 for n in graph.nodes
              if n.weight is not None}
    for g in problem.groups:
        if g.name.startswith("weights:"):
            w_bits[g.name[len("weights:"):]] = solution.choice[g.name]

    ranges = {t: range_of(t, mixed_bits[t])
              for t in graph.tensors}
    qm = quantize_graph(graph, ranges, act_bits=mixed_bits, weight_bits=w_bits,
                        weight_schemes=specs)
    qm, specs, corrections = _post_training(qm, specs, data, opts, notes, say)
    ptq_choice = None
    if probe is not None and opts.auto_ptq and not (opts.bias_correction or opts.adaround):
        ptq_choice, specs, corrections = _measured_ptq(qm, specs, data, probe, say,
                                                       (problem, solution.choice))
        qm = ptq_choice.model
    outlier_qm = None
    stage_tensors = set()
    if use_vdpc:
        # Inside the stage the outlier branch runs at 8 bits; the split tensor it writes keeps
        # the plan's parameters, so both branches hand the rest the same format.
        stage_tensors = {by_name[s].outputs[0] for s in schedule.stage_nodes} \
            - {schedule.split_tensor}
        bits8 = {t: (8 if t in stage_tensors else mixed_bits[t]) for t in graph.tensors}
        ranges8 = {t: range_of(t, bits8[t])
                   for t in graph.tensors}
        rebuilt = {n: WeightSpec(s.scheme, s.bits, qm.layers[n].weight_params)
                   for n, s in specs.items()}  # the same weights, without a second search
        outlier_qm = quantize_graph(graph, ranges8, act_bits=bits8, weight_bits=w_bits,
                                    weight_schemes=rebuilt, bias_corrections=corrections)
    say(f"quantisation: {len(qm.layers)} layers" + (", twice (VDPC)" if use_vdpc else ""))

    vdpc_result = None
    if use_vdpc:
        st = stats.tensors[classified]
        regions = [[(r.y0, r.y1, r.x0, r.x1) for r in row]
                   for row in schedule.regions[classified]]
        batches = (to_ir_layout(graph, graph.inputs[0], b) for b in data.batches(64)) \
            if data is not None else iter(())
        vdpc_result = classify_rates(graph, qm, classified, st.mean, st.std, opts.phi,
                                     opts.vdpc_min_outliers, regions, batches)
        say(f"VDPC: outlier rates of {vdpc_result.samples} samples")

    memory = schedule.memory(act_bits)
    # The SRAM and Flash the bits left over buy speed: slots for mpq_conv2d_unpacked
    before = memory.arena_bytes
    schedule, grown = speed_slots(graph, board, schedule, memory, qm, act_bits, input_bytes,
                                  sram_total - input_bytes - memory.scratch_bytes,
                                  flash_total - problem.flash_bytes(solution.choice))
    if grown:
        memory = schedule.memory(act_bits, grown=grown)
        notes.append(f"scratch: {len(grown)} layer(s) given mpq_conv2d_unpacked's scratch "
                     f"within the SRAM budget (arena {before:,} -> {memory.arena_bytes:,} B)")
    ranges8 = {t: range_of(t, 8)
               for t in graph.tensors}
    if ptq_choice is not None and ptq_choice.fitted is not None:
        opts_eff = replace(opts_eff, bias_correction=ptq_choice.options.bias_correction,
                           adaround=ptq_choice.options.adaround)
    plan = assemble_plan(model_path, graph, board, opts_eff, schedule, qm, outlier_qm, ranges8,
                         stage_tensors, act_bits, w_bits, memory, input_bytes, problem,
                         solution, objective_solver, vdpc_result, sram_total, flash_total,
                         notes + [f"QBR: {line}" for line in qbr_log], grown)
    if order_choice is not None:
        plan.search["order"] = order_choice.to_dict()
    regions = place_buffers(board, memory.arena_bytes, memory.scratch_bytes, input_bytes)
    if regions is not None:  # the board ranks its data regions (`mpq.regions`)
        plan.schedule["regions"] = regions
    if probe is not None:
        m = attempt.measured
        damage = ptq_choice.damage if ptq_choice is not None else m.damage
        plan.search["measured"] = {
            "validation_samples": probe.samples, "damage": round(damage, 9),
            "damage_sum_of_single_choices": round(m.predicted, 9),
            "plans_measured": m.candidates, "reference_runs": probe.runs}
        if ptq_choice is not None and ptq_choice.record:
            plan.search["measured"]["ptq"] = ptq_choice.record
        if ptq_choice is not None and ptq_choice.fitted is not None:
            # `damage` is the shipped model's, against the all-8-bit reference: a kept fit
            # moves it (toward float; an all-8-bit plan's goes from 0 to > 0). The bits'
            # own damage is what the search ranked plans by, monotone in the budget.
            plan.search["measured"]["damage_before_ptq"] = round(m.damage, 9)
        plan.predicted["fidelity"] = plan_fidelity(plan, graph, x_val, probe.classifier_any,
                                                   damage, probe)
        say(f"fidelity: measured on {probe.samples} samples")
    say("plan: assembled")
    if table is not None:
        plan.search["importance"] = table.to_dict()
        plan.search["importance_total"] = round(
            total_importance(table, graph, problem, solution.choice), 9)
        plan.search["bitops_budget"] = opts.bitops
        if opts.bitops is not None and plan.predicted["bitops"] > opts.bitops:
            raise MpqError(f"internal: the plan's {plan.predicted['bitops']:,} BitOPs exceed "
                           f"--bitops {opts.bitops:,}")
    result = SearchResult(plan, qm, schedule, solution, qbr_log, vdpc_result)
    if opts.compare_strategies and probe is not None and attempt.measured is not None \
            and attempt.measured.damage > 0:
        result = accuracy_first(result, model_path, graph, board, data, opts, stats, probe,
                                x_val, say)
    return result


def _post_training(qm: QuantModel, specs: dict[str, WeightSpec], data: Dataset | None,
                   opts: SearchOptions, notes: list[str], say: Callable[[str], None]
                   ) -> tuple[QuantModel, dict[str, WeightSpec], dict[str, np.ndarray]]:
    """`--bias-correction` / `--adaround` (`mpq.quant.ptq`) on the chosen plan's model: the
    fitted model, the weight specs with AdaRound's rounding added, the bias corrections."""
    if not (opts.bias_correction or opts.adaround):
        return qm, specs, {}
    if data is None:
        raise MpqError("--bias-correction and --adaround fit on calibration data: give --data")
    fitted = apply_ptq(qm, data, PtqOptions(opts.bias_correction, opts.adaround), say)
    if opts.adaround and not fitted.specs:
        notes.append("AdaRound: no 4- or 2-bit linear layer improved (or none in this plan); "
                     "weights rounded to nearest")
    return fitted.model, {**specs, **fitted.specs}, fitted.corrections


def _measured_ptq(qm: QuantModel, specs: dict[str, WeightSpec], data: Dataset,
                  probe: Probe, say: Callable[[str], None],
                  chosen: tuple[Problem, dict[str, int]] | None = None):
    """The measured strategy's PTQ (`search.ptq_choice`): the plan's model with the fit of
    lowest measured damage, the weight specs with AdaRound's rounding added when kept, and
    the bias corrections kept. `chosen`: the problem and choice `qm` was built from; when the
    probe's variant of that choice has `qm`'s very parameters, its measured outputs are
    reused instead of running `qm` again."""
    from mpq.fidelity import validation_indices
    from mpq.search.measured import choice_bits
    from mpq.search.ptq_choice import choose_ptq
    from mpq.search.sensitivity import same_parameters

    plain = None
    if chosen is not None:
        acts, weights = choice_bits(*chosen)
        if same_parameters(probe.model(acts, weights)[0], qm):
            plain = probe.variant_outputs(acts, weights)
    validation = validation_indices(len(data), str(data.path), probe.samples)
    choice = choose_ptq(qm, data, validation, probe, say, plain)
    if choice.fitted is None:
        return choice, specs, {}
    return choice, {**specs, **choice.fitted.specs}, choice.fitted.corrections


def _totals(graph: Graph, board: Board, opts: SearchOptions) -> tuple[int, int, int, int]:
    """SRAM and Flash budgets (the board's or --sram/--flash), the SRAM the model needs beside
    the arena and scratch — the caller's input and output buffers (none with `--io arena`) and
    the model's stack (`mpq.budget`) — and the code estimate, in bytes."""
    input_bytes = io_buffer_bytes(graph, opts.io) + predicted_stack_bytes(graph, board_cpu(board))
    sram_total = opts.sram if opts.sram is not None else board.sram_budget
    flash_total = opts.flash if opts.flash is not None else board.flash_budget
    code = code_bound(graph, board, opts)
    w_options = weight_options(graph, opts, flash_total - code)
    if min(w_options) < min(opts.weight_bits):
        # Flash made 4-bit weights an option: their layers may take the packed kernels, so the
        # bound reserves that code as it does when --weight-bits offers them.
        code = code_bound(graph, board, replace(opts, weight_bits=w_options))
    return sram_total, flash_total, input_bytes, code


def code_bound(graph: Graph, board: Board, opts: SearchOptions) -> int:
    """The code the search reserves Flash for: the layer-based export's
    (`budget.predicted_code_bytes`); when the options allow 4- or 2-bit activations, the
    channel-group depthwise / pooling entry points of every layer that could take them; and
    when they also allow 4- or 2-bit linear weights on a core with SMLAD, the packed kernels'
    code and row padding for every layer that could take them (at 4 bits, their largest) —
    what the plan may end up using."""
    cpu = board_cpu(board)
    # any regular conv may get a sub-byte operand (mpq_conv2d_unpacked)
    unpackable = unpacked_layers(graph, None, lambda t: 4, lambda n: (4, True)) \
        if min(opts.weight_bits) < 8 or min(opts.bits) < 8 \
        or opts.weight_scheme not in (None, "linear") else frozenset()
    sub_byte = min(opts.bits) <= 4 and min(opts.weight_bits) <= 4 \
        and opts.weight_scheme in (None, "linear")
    if not sub_byte:
        # 4-/2-bit maps alone put depthwise and pooling layers on their channel-group entry
        # points (`codegen.packed.group_choice`), whatever the weights: reserve them too
        grouped = packed_layers(graph, board.core, None, lambda t: 4, lambda n: (8, True)) \
            if min(opts.bits) <= 4 else frozenset()
        return code_bytes_estimate(graph, cpu, None, grouped, either=True,
                                   unpacked=unpackable)
    packable = packed_layers(graph, board.core, None, lambda t: 4, lambda n: (4, True))
    return code_bytes_estimate(graph, cpu, None, packable, either=True,
                               unpacked=unpackable - packable) \
        + max(0, packed_padding_bytes(graph, packable, lambda n: 4))


def io_buffer_bytes(graph: Graph, io: str = "external") -> int:
    """The caller's input and output buffers, 8-bit (`mpq_model_run(input, output)`): part of
    the model's SRAM figure, so the arena is planned against the budget less them; 0 with
    `io` "arena" (they are arena tensors then: `memory.io_buffer_bytes`)."""
    return sum(memory_io_bytes(graph, io))


def candidate_list(graph: Graph, opts: SearchOptions) -> list[PatchSchedule]:
    """The patch schedules the search tries (--patches none, auto or k=K,n=N)."""
    patches = parse_patches(opts.patches)
    if patches == "none":
        return [plan_patches(graph, None, opts.io, opts.overlap, opts.scratch)]
    if patches == "auto":
        return auto_candidates(graph, opts)
    return [given_split(graph, patches, opts)]


PATCH_CACHE = ("auto", "on", "off")


def cache_choice(opts: SearchOptions) -> bool | None:
    """`--patch-cache` as `search_patches` takes it: True (on), False (off, or auto while VDPC
    may pick a branch per patch: rows kept from the patch above could be the other
    branch's), None (auto: both forms compete — also for the measured strategy, which runs
    without VDPC: `vdpc_allowed`)."""
    if opts.patch_cache not in PATCH_CACHE:
        raise MpqError(f"--patch-cache must be one of {', '.join(PATCH_CACHE)}, not "
                       f"'{opts.patch_cache}'")
    if opts.patch_cache == "on":
        return True
    if opts.patch_cache == "off" or (vdpc_allowed(opts) and opts.strategy != "int8"):
        return False
    return None


def given_split(graph: Graph, split: PatchSplit, opts: SearchOptions) -> PatchSchedule:
    """`--patches k=K,n=N`: every map in line buffers with `--patch-cache on`; with auto (when
    `cache_choice` allows them) the maps whose line buffers fit under the recomputing
    schedule's int8 peak (`patch.cache_within_peak`), if any saves MACs."""
    choice = cache_choice(opts)
    plain = with_stage_overlap(
        graph, plan_patches(graph, split, opts.io, scratch=opts.scratch), opts)
    if choice is False:
        return plain
    if choice:
        return plan_patches(graph, replace(split, cache=True), opts.io)
    cached = cache_within_peak(plain)
    return cached if cached is not None and cached.redundant_macs < plain.redundant_macs \
        else plain


def with_stage_overlap(graph: Graph, schedule: PatchSchedule, opts: SearchOptions
                       ) -> PatchSchedule:
    """`schedule` with its stage convolutions written below their dying inputs where that
    lowers its int8 arena (`patch.choose_stage_overlaps`), under `--overlap` — unless VDPC
    would run on it: its outlier branch computes the same tiles at other bits, for which the
    shifts were not computed (an int8 plan's branches are the same; the measured strategy
    runs without VDPC)."""
    if not opts.overlap or schedule.split_tensor is None or schedule.cache \
            or (opts.strategy != "int8" and vdpc_map(graph, schedule, opts) is not None):
        return schedule
    # ties at int8 go to the smaller arena at the floor bits (none to break with --bits 8)
    chosen, raised = choose_stage_overlaps(
        schedule, floor_bits(graph, opts) if min(opts.bits) < 8 else None)
    return replace(schedule, overlap=chosen, inplace_raise=raised) \
        if chosen or raised else schedule


def feasible_candidates(graph: Graph, board: Board, opts: SearchOptions) -> list[Candidate]:
    """The search's candidate schedules, after checking — before any data is read or
    calibrated — that the budgets can be met at all; else the BudgetError the search would
    raise.

    The check is the search's own floor (`_solve_schedule`): every map and weight at the
    smallest bits the strategy may choose (8-bit activations and weights for `int8`). Sizes
    do not depend on the data, so it rejects exactly the budgets the full search rejects at
    that floor, and never one the search would meet. Flash does not depend on the schedule
    and is checked first, without building any. The candidates are the first tier of
    `candidate_tiers` in which some schedule's floor fits; the error names the smallest
    floor of them all, which every strategy but `int8` then meets.
    """
    graph, _ = search_graph(graph, opts)
    sram_total, flash_total, input_bytes, code = _totals(graph, board, opts)
    w_options = weight_options(graph, opts, flash_total - code)
    w_floor = max(w_options) if opts.strategy == "int8" else min(w_options)
    scheme = opts.weight_scheme or "linear"
    flash = code + weights_flash(graph, w_floor, scheme) + tables_flash(graph) \
        + constant_flash_bytes(graph)
    if flash > flash_total:
        raise BudgetError(f"needs at least {flash:,} B Flash with {w_floor}-bit weights, the "
                          f"fewest bits allowed (code {code:,} B included); budget is "
                          f"{flash_total:,} B"
                          + _flash_hint(graph, opts, w_floor,
                                        code_bound(graph, board, replace(opts,
                                                                         weight_bits=(8, 4, 2))),
                                        flash), 0)
    failures: list[BudgetError] = []
    for tier in candidate_tiers(graph, opts):
        for schedule, s_opts in tier:
            extra = stage_flash(graph, schedule, s_opts, board_cpu(board))
            setup = _setup_schedule(graph, schedule, {}, s_opts, sram_total,
                                    flash_total - code - extra, input_bytes, scored=False)
            if setup.problem.fits(setup.floor):
                return tier
            failures.append(_impossible(setup.problem, setup.floor, schedule, sram_total,
                                        input_bytes, setup.scratch, flash_total, code + extra,
                                        setup.what))
    raise min(failures, key=lambda e: e.sram_needed)


@dataclass
class _Setup:
    """One schedule's allocation problem and the floor choice the strategy starts from."""

    problem: Problem
    order: list[str]
    use_vdpc: bool
    classified: str | None
    scratch: int
    floor: dict[str, int]
    what: str  # the floor's activation bits, as error messages name them


def vdpc_map(graph: Graph, schedule: PatchSchedule, opts: SearchOptions) -> str | None:
    """The map VDPC classifies on `schedule` (the first stage node's output, QuantMCU §III-A),
    or None: no patches, VDPC not allowed (`vdpc_allowed`), line buffers, stage outputs over
    their inputs (`with_stage_overlap`), a pooled stage or a grid that is not n×n, or that map
    is the split tensor itself."""
    if not (vdpc_allowed(opts) and schedule.split_tensor is not None) or schedule.cache \
            or schedule.overlap:
        # line buffers: every patch must take the same branch (`cache_choice`); outputs over
        # their inputs: the shifts hold at one branch's bits (`with_stage_overlap`)
        return None
    if schedule.pool_input is not None or schedule.m != schedule.n:
        # a pooled stage's sums add both branches' integers, which need not share their
        # quantisation; VDPC's outlier rates are an n×n grid
        return None
    by_name = {n.name: n for n in graph.nodes}
    classified = by_name[schedule.stage_nodes[0]].outputs[0]
    return None if classified == schedule.split_tensor else classified


def stage_flash(graph: Graph, schedule: PatchSchedule, opts: SearchOptions, cpu: str) -> int:
    """Flash a schedule's patch stage adds to the layer-based code estimate (its calls,
    geometry tables, patch loop and VDPC test: `budget.predicted_code_bytes`) plus its outlier
    branch's parameters, every activation table counted (`budget.stage_branch_flash`): the
    bound the search holds the weights to on that schedule. The stage's code is added as its
    difference from the layer-based estimate, so the packed and unpacked kernels' reserve in
    the search's code bound (`code_bound`) stays in it."""
    shape = code_shape(schedule, schedule.memory().inplace,
                       vdpc_map(graph, schedule, opts) is not None)
    if shape is None:
        return 0
    return code_bytes_estimate(graph, cpu, shape) - code_bytes_estimate(graph, cpu) \
        + stage_branch_flash(graph, shape)


def _setup_schedule(graph: Graph, schedule: PatchSchedule, scores: dict[str, MapScore],
                    opts: SearchOptions, sram_total: int, flash_budget: int,
                    input_bytes: int, scored: bool = True, probe: Probe | None = None,
                    say: Callable[[str], None] | None = None) -> _Setup:
    """The allocation problem of one schedule and the strategy's floor: the largest options
    for `int8`, the smallest otherwise. With `probe` (the measured strategy) the groups are
    scored by measured damage (`say` gets a `sensitivity:` line with the time it took, so
    the schedule's `solving:` line times the solving alone)."""
    int8_memory = schedule.memory()
    scratch = int8_memory.scratch_bytes
    sram_budget = sram_total - input_bytes - align_up(scratch)  # export aligns the scratch
    classified = vdpc_map(graph, schedule, opts)
    use_vdpc = classified is not None
    problem, order = build_problem(graph, schedule, scores, replace(opts, vdpc=use_vdpc),
                                   sram_budget, flash_budget, classified, int8_memory.inplace,
                                   scored=scored)
    if probe is not None and not problem.fits({g.name: max(g.options) for g in problem.groups}):
        # Measured only when the budget forces something below 8 bits: at 8 everywhere the
        # plan is the reference itself (damage 0), nothing to measure.
        runs = probe.runs
        problem = rescore(problem, probe)
        if say is not None and probe.runs > runs:
            say(f"sensitivity: {_describe(schedule)}: {probe.runs - runs} single choice(s) "
                f"measured ({probe.runs} in all)")
    if opts.strategy == "int8":
        floor = {g.name: max(g.options) for g in problem.groups}
        what = "8-bit activations"
    else:
        floor = {g.name: min(g.options) for g in problem.groups}
        what = f"{min(opts.bits)}-bit activations"
    return _Setup(problem, order, use_vdpc, classified, scratch, floor, what)


@dataclass
class _Attempt:
    schedule: PatchSchedule
    problem: Problem
    order: list[str]
    solution: Solution
    use_vdpc: bool
    classified: str | None
    scratch: int
    refined: Solution | None = None  # after QBR
    qbr_log: list[str] = field(default_factory=list)
    pool: object | None = None  # measured strategy: the measured candidates (`measured._Pool`)
    measured: Measured | None = None


def schedule_value(problem: Problem, choice: dict[str, int],
                   scores: dict[str, MapScore]) -> float:
    """Σ S(i, b_i) over every scored map plus the weight groups' scores (DESIGN §7.1–§7.2),
    maps a schedule holds at 8 bits (VDPC's classified map) counted at 8: the solver's own
    objective leaves fixed maps out, so it cannot rank schedules that fix different maps."""
    bits = {t: choice[g.name] for g in problem.groups for t in g.tensors}
    value = sum(g.score[choice[g.name]] for g in problem.groups if not g.tensors)
    for t, s in sorted(scores.items()):
        b = bits.get(t, 8)
        # 8 bits is never worse than the best option offered when --bits leaves 8 out
        value += s.score[b] if b in s.score else max(s.score.values())
    return float(value)


def floor_bits(graph: Graph, opts: SearchOptions) -> dict[str, int]:
    """Every map at the smallest candidate bitwidth, the graph input at 8: the bits the
    candidate splits are ranked at (`auto_candidates`) and stage-overlap ties broken at."""
    return {t: 8 if t in graph.inputs else min(opts.bits) for t in graph.tensors}


def auto_candidates(graph: Graph, opts: SearchOptions) -> list[PatchSchedule]:
    """`--patches auto`: the layer-based schedule and, for each grid size n, the split with the
    lowest peak at the smallest candidate bitwidth, redundant MACs within `max_overhead` — for
    each form `cache_choice` allows (halos recomputed, rows kept in line buffers)."""
    low = floor_bits(graph, opts)
    out = [plan_patches(graph, None, opts.io, opts.overlap, opts.scratch)]
    choice = cache_choice(opts)
    # auto: the lowest-peak split of each form competes; at equal objective the solver's
    # ranking (`search`) then prefers the one with fewer redundant MACs that fits the budget
    forms = (False, True) if choice is None else (choice,)
    for n in grid_sizes(opts):
        for cache in forms:
            best = search_patches(graph, n_choices=(n,), max_overhead=overhead_bound(opts),
                                  bits=low, io=opts.io, cache=cache, scratch=opts.scratch)
            if best is not None:
                out.append(with_stage_overlap(graph, best, opts))
    splits = pooled_splits(graph)
    if not splits:
        return out
    pooled_bound = POOLED_MAX_OVERHEAD if opts.strategy == "measured" \
        and opts.max_overhead is None else overhead_bound(opts)
    baseline = out[0].memory(low).peak_sram_bytes
    for split in splits:
        sched = plan_patches(graph, split, opts.io, scratch=opts.scratch)
        if sched.redundant_macs > pooled_bound * sched.total_macs:
            continue  # before planning its overlaps: a stage the bound rules out is dropped
        sched = with_stage_overlap(graph, sched, opts)
        if sched.memory(low).peak_sram_bytes < baseline:
            out.append(sched)
    return out


def _solve_schedule(graph: Graph, schedule: PatchSchedule, scores: dict[str, MapScore],
                    opts: SearchOptions, sram_total: int, flash_total: int, flash_budget: int,
                    input_bytes: int, code: int, table: ImportanceTable | None = None,
                    probe: Probe | None = None,
                    say: Callable[[str], None] | None = None) -> _Attempt:
    """Build and solve the allocation problem for one patch schedule (`say`: see
    `_setup_schedule`)."""
    setup = _setup_schedule(graph, schedule, scores, opts, sram_total, flash_budget,
                            input_bytes, probe=probe, say=say)
    problem, order, scratch, low = setup.problem, setup.order, setup.scratch, setup.floor
    use_vdpc, classified = setup.use_vdpc, setup.classified
    if not problem.fits(low):
        raise _impossible(problem, low, schedule, sram_total, input_bytes, scratch,
                          flash_total, code, setup.what)
    top = {g.name: max(g.options) for g in problem.groups}
    if opts.strategy == "int8" or (probe is not None and problem.fits(top)):
        pick = low if opts.strategy == "int8" else top
        solution = Solution(pick, problem.objective(pick),
                            problem.arena(problem.tensor_bits(pick)), problem.flash_bytes(pick))
    else:
        if table is not None:
            floor = problem.arena(problem.tensor_bits(low)) + align_up(scratch) + input_bytes
            problem, solution = solve_importance(problem, table, graph, schedule, opts.bitops,
                                                 floor)
        else:
            try:
                if opts.strategy == "rusci":
                    solution = solve_rusci(problem, layer_groups(graph, problem))
                elif opts.strategy == "vdqs":
                    solution = solve_vdqs(problem, order)
                else:
                    solution = solve_exact(problem)
            except MpqError:
                # The floor fits the real planner (checked above), so the budget is met: the
                # solver's own bound was stricter (the ILP's liveness rows can exceed what the
                # planner packs). Start from the floor; QBR raises what fits.
                solution = Solution(low, problem.objective(low),
                                    problem.arena(problem.tensor_bits(low)),
                                    problem.flash_bytes(low))
    return _Attempt(schedule, problem, order, solution, use_vdpc, classified, scratch)


#: Schedules the measured strategy refines in full (the best by the measured ILP solution).
REFINE_SCHEDULES = 2


def _refine_measured(attempts: list[tuple], opts: SearchOptions,
                     say: Callable[[str], None]) -> list[tuple]:
    """The measured strategy's step 2–4 (`search.measured`) on the REFINE_SCHEDULES schedules
    whose ILP solutions measured best; their ranking value becomes the refined plan's
    measured damage (negated)."""
    ranked = sorted(attempts, key=lambda a: a[:-1], reverse=True)
    out = []
    for i, entry in enumerate(ranked):
        att = entry[-1]
        if i >= REFINE_SCHEDULES:
            out.append(entry)
            continue
        floor = {g.name: min(g.options) for g in att.problem.groups}
        m = refine(att.pool, floor, qbr=opts.qbr)
        problem = att.problem
        att.measured = m
        att.refined = Solution(m.choice, problem.objective(m.choice),
                               problem.arena(problem.tensor_bits(m.choice)),
                               problem.flash_bytes(m.choice), att.solution.iterations)
        att.qbr_log = m.log
        say(f"measuring: {_describe(att.schedule)}: {m.candidates} plan(s) measured, best "
            f"damage {m.damage:.5f} (sum of single choices {m.predicted:.5f})")
        out.append((round(-m.damage, 12), *entry[1:]))
    return out


def _describe(schedule: PatchSchedule) -> str:
    """A schedule as the user names it: `no patches` or `k=3,n=2 patches`."""
    if schedule.split_tensor is None:
        return "no patches"
    cached = " with line buffers" if schedule.cache else ""
    cols = f",m={schedule.m}" if schedule.m != schedule.n else ""
    return f"k={schedule.split_layer},n={schedule.n}{cols} patches{cached}"


def _tie_break(attempt: _Attempt) -> tuple[int, int, int]:
    """How schedules of equal value rank (the larger first): fewer redundant MACs, smaller
    k, smaller n."""
    s = attempt.schedule
    return -s.redundant_macs, -s.split_layer, -s.n


def candidate_tiers(graph: Graph, opts: SearchOptions) -> Iterator[list[Candidate]]:
    """The candidates the search tries, in tiers: a later tier only when no schedule of the
    earlier ones fits the budgets (`feasible_candidates`).

    The paper strategies keep their own space first (VDPC, PAPER_MAX_OVERHEAD); the measured
    strategy's wider one (splits without VDPC, redundant MACs up to
    MEASURED_MAX_OVERHEAD, line buffers) comes second, so the smallest budget any strategy's
    error names is met by every strategy (issue 13: the advertised minimum is accepted by
    all), while a budget the paper space meets gets the paper's plan as before. One tier for
    the measured strategy (it is that space), `int8`, `--max-overhead` or a given split.
    Lazy: a tier's schedules are built only when the earlier tiers fit nothing."""
    yield [(s, opts) for s in candidate_list(graph, opts)]
    if opts.strategy in ("measured", "int8") or opts.max_overhead is not None \
            or parse_patches(opts.patches) != "auto":
        return
    wide = replace(opts, vdpc=False, max_overhead=MEASURED_MAX_OVERHEAD)
    yield [(s, replace(opts, vdpc=False)) for s in candidate_list(graph, wide)]


def vdpc_allowed(opts: SearchOptions) -> bool:
    """Whether patch stages may use VDPC: unless `--no-vdpc`, and never in the measured
    strategy (`MEASURED_VDPC_NOTE`)."""
    return opts.vdpc and opts.strategy != "measured"


#: Why the measured strategy does without VDPC (DESIGN §7.5). VDPC budgets the patch stage's
#: SRAM for its all-8-bit outlier branch, so lowering a stage map saves no byte there; the
#: measured strategy keeps such maps at 8 bits (they would only add damage: `rescore`), and
#: then both branches compute the same values — VDPC would add its per-patch test and branch
#: code and nothing else. Without it the stage's maps are the ILP's to lower, which is what
#: lets deep stages into small budgets (Fashion example at half its int8 need: an 11-layer
#: stage with every map at 8 or 4 bits, 91.9 % top-1, where the VDPC splits needed 2-bit maps
#: and kept 88.4 %).
MEASURED_VDPC_NOTE = ("VDPC off: the measured strategy keeps the maps of a VDPC patch stage at 8 "
                      "bits (lowering them saves no SRAM there), so VDPC's two branches would "
                      "compute the same values; without it the stage's maps can be lowered")


def _flash_hint(graph: Graph, opts: SearchOptions, w_floor: int, code: int, flash: int
                ) -> str:
    """What would go below a Flash floor of `flash` bytes at `w_floor`-bit weights: the option
    offering 2-bit linear weights and the Flash they need with that option's code `code`
    (DESIGN §7), or nothing when the user already allows them or chose another scheme."""
    if opts.weight_scheme is not None or w_floor <= 2:
        return ""
    flash2 = code + weights_flash(graph, 2) + tables_flash(graph) + constant_flash_bytes(graph)
    if flash2 >= flash:
        return ""
    option = "--weight-bits 8,4,2" if opts.strategy != "int8" else \
        "--strategy exact --weight-bits 8,4,2"
    return f" ({option} goes down to {flash2:,} B)"


def _impossible(problem: Problem, floor: dict[str, int], schedule: PatchSchedule,
                sram_total: int, input_bytes: int, scratch: int, flash_total: int, code: int,
                what: str) -> BudgetError:
    """One line naming the smallest SRAM and Flash reachable with the `floor` choice (the
    smallest bits the strategy may use) on this schedule (DESIGN §7.2)."""
    best_sram = problem.arena(problem.tensor_bits(floor)) + align_up(scratch) + input_bytes
    best_flash = problem.flash_bytes(floor) + code
    grid = f"{schedule.n}×{schedule.m} patches" if schedule.split_tensor else "no patches"
    parts = []
    if best_sram > sram_total:
        parts.append(f"needs at least {best_sram:,} B SRAM with {what} and {grid}; budget is "
                     f"{sram_total:,} B")
    if best_flash > flash_total:
        w_bits = sorted({floor[g.name] for g in problem.groups if g.name.startswith("weights:")})
        with_bits = f"{w_bits[0]}-bit weights" if w_bits else "its fixed weights"
        parts.append(f"needs at least {best_flash:,} B Flash with {with_bits}; "
                     f"budget is {flash_total:,} B")
    if not parts:
        parts.append(f"needs {best_sram:,} B SRAM and {best_flash:,} B Flash with {what}; "
                     f"budgets are {sram_total:,} B and {flash_total:,} B")
    return BudgetError("; ".join(parts), best_sram)


# -- the plan -----------------------------------------------------------------------------------

def scratch_available(schedule_info: dict, separate: int) -> Callable[[Any], int]:
    """The scratch the export gives a node's kernel (codegen.export `_scratch_available`): its
    arena slot when `schedule.scratch` plans them, else the one separate scratch."""
    slots = schedule_info.get("scratch", {}).get("steps")
    if slots is None:
        return lambda n: separate
    return lambda n: slots[n.name]["bytes"] if n.name in slots else 0


def _weights_of(qm: QuantModel) -> Callable[[Any], tuple[int, bool]]:
    """node → (weight bits, linear?) of a quantised model (what the export's kernel choice
    reads: `codegen.export._Builder`)."""
    def weights(n: Any) -> tuple[int, bool]:
        lq = qm.layers[n.name]
        return lq.weight_bits, storage(lq.weight_scheme, lq.weight_bits)[0] == 0
    return weights


def plan_code_bytes(graph: Graph, board: Board, shape: Any, qm: QuantModel,
                    packed: frozenset[str], available: Callable[[Any], int]) -> int:
    """`predicted.code_bytes_estimate`: the code of the kernels the export picks — the
    `packed` layers on the packed sub-byte kernels, those whose unpacked operands fit the
    scratch `available(node)` on mpq_conv2d_unpacked — and the packed rows' padding."""
    weights = _weights_of(qm)
    return code_bytes_estimate(
        graph, board_cpu(board), shape, packed,
        unpacked=unpacked_layers(graph, shape, lambda t: qm.acts[t].bits, weights, available),
        unpacked_exact=True) \
        + packed_padding_bytes(graph, packed, lambda n: qm.layers[n.name].weight_bits)


def speed_slots(graph: Graph, board: Board, schedule: PatchSchedule, memory: Any,
                qm: QuantModel, act_bits: dict[str, int], io_bytes: int, arena_limit: int,
                code_limit: int) -> tuple[PatchSchedule, dict[str, int]]:
    """(schedule, grown slots) once the bits are chosen (`memory`: `schedule.memory(act_bits)`,
    which the caller has): `unpacked_slots` on `schedule`, then
    for each layer it left out because it is written above its input row by row (most MACs
    first), the schedule without that reverse overlap when there its slot grows too, and
    every slot grown before still does — the overlap saved arena bytes the budget no longer
    needs, and the layer then runs mpq_conv2d_unpacked in one call. Same limits as
    `unpacked_slots`; the arena keeps the region the search's plan had."""
    region = place_buffers(board, memory.arena_bytes, memory.scratch_bytes, io_bytes)
    grown = unpacked_slots(graph, board, schedule, qm, act_bits, memory, io_bytes,
                           arena_limit, code_limit, region)
    if not schedule.scratch_in_arena or schedule.split_tensor is not None:
        return schedule, grown  # rows reversed and grown slots are layer-based forms
    fused_convs = {conv for conv, _ in schedule.fused_adds.values()}
    by_name = {n.name: n for n in graph.nodes}
    rows = [n for n in unpacked_needs(graph, board.core, lambda t: qm.acts[t].bits,
                                      _weights_of(qm), memory.inplace, fused_convs)
            if memory.overlap.get(n, 0) < 0]
    for name in sorted(rows, key=lambda m: -node_macs(by_name[m], graph)):
        trial = replace(schedule, overlap_reverse=schedule.overlap_reverse - {name})
        trial_memory = trial.memory(act_bits)
        if trial_memory.arena_bytes > arena_limit:
            continue
        trial_grown = unpacked_slots(graph, board, trial, qm, act_bits, trial_memory,
                                     io_bytes, arena_limit, code_limit, region)
        if name in trial_grown and set(grown) <= set(trial_grown):
            schedule, grown = trial, trial_grown
    return schedule, grown


def unpacked_slots(graph: Graph, board: Board, schedule: PatchSchedule, qm: QuantModel,
                   act_bits: dict[str, int], memory: Any, io_bytes: int, arena_limit: int,
                   code_limit: int, region: Any = None) -> dict[str, int]:
    """node → bytes of the slots grown for mpq_conv2d_unpacked once the bits are chosen
    (`memory.grow_scratch` over `budget.unpacked_needs`, but for layers run row by row;
    layer-based, scratch in the arena): each kept while the arena stays within `arena_limit`
    (the SRAM budget less what lies beside the arena), in the data region it had
    (`regions.place_buffers`: a larger arena must not move out of a faster memory;
    `region`: the placement to keep, by default this memory's) and the
    code the export then links (`plan_code_bytes`) within `code_limit` (the Flash budget less
    the parameters).
    `io_bytes`: the SRAM beside the arena (the caller's buffers and the stack)."""
    if not schedule.scratch_in_arena or schedule.split_tensor is not None:
        return {}
    weights = _weights_of(qm)
    fused_convs = {conv for conv, _ in schedule.fused_adds.values()}
    needs = unpacked_needs(graph, board.core, lambda t: qm.acts[t].bits, weights,
                           memory.inplace, fused_convs)
    # A layer written above its input runs one kernel call per output row
    # (`memory.reverse_overlap_shift`), and mpq_conv2d_unpacked decodes the weights at every
    # call: KWS's first conv, 25 rows of 64×40 4-bit weights, took 2.85 M instructions so
    # against 1.95 M on mpq_conv2d (qemu-m4). Such layers keep their slot.
    needs = {n: b for n, b in needs.items() if memory.overlap.get(n, 0) >= 0}
    base = {b.name[len(SCRATCH_PREFIX):]: b.size for b in memory.plan.buffers
            if b.name.startswith(SCRATCH_PREFIX)}
    packed = packed_layers(graph, board.core, None, lambda t: qm.acts[t].bits, weights)

    if region is None:
        region = place_buffers(board, memory.arena_bytes, memory.scratch_bytes, io_bytes)

    def fits(grown: dict[str, int], arena: int) -> bool:
        def available(n: Any) -> int:
            return max(base.get(n.name, 0), align_up(grown.get(n.name, 0)))
        return place_buffers(board, arena, memory.scratch_bytes, io_bytes) == region \
            and plan_code_bytes(graph, board, None, qm, packed, available) <= code_limit

    return schedule.grow_scratch(act_bits, needs, arena_limit, fits)


def assemble_plan(model_path: Path, graph: Graph, board: Board, opts: SearchOptions,
                  schedule: PatchSchedule, qm: QuantModel, outlier_qm: QuantModel | None,
                  ranges8: dict[str, tuple[float, float]], stage_tensors: set[str],
                  act_bits: dict[str, int], w_bits: dict[str, int],
                  memory, input_bytes: int, problem: Problem, solution: Solution,
                  objective_solver: float, vdpc: VdpcResult | None, sram_total: int,
                  flash_total: int, notes: list[str],
                  grown: dict[str, int] | None = None) -> Plan:
    """Everything the later stages need, in the plan's JSON shape (DESIGN §1); `grown`: the
    slots `unpacked_slots` grew (recorded in `schedule.scratch.unpacked`)."""
    offsets = memory.plan.tensor_offsets()
    tensors = []
    for name in graph.tensors:
        q = qm.acts[name]
        outlier = None
        if outlier_qm is not None and name in stage_tensors:
            o = outlier_qm.acts[name]
            outlier = {"bits": o.bits, "scale": o.scale, "zero_point": o.zero_point}
        tensors.append(TensorPlan(
            name=name, bits=q.bits, scale=q.scale, zero_point=q.zero_point,
            bytes=packed_bytes(schedule.tensor_elements[name], act_bits.get(name, q.bits)),
            offset=offsets.get(name), outlier_branch=outlier,
            range8=[float(v) for v in ranges8[name]]))
    mixed_bits = {t: qm.acts[t].bits for t in graph.tensors}
    bitops = layer_bitops(graph, mixed_bits, w_bits)
    bits8 = {t: 8 for t in graph.tensors}
    bitops8 = layer_bitops(graph, bits8, {n: 8 for n in w_bits})
    layers = []
    for n in graph.nodes:
        layers.append(LayerPlan(
            name=n.name, op=n.kind, w_bits=w_bits.get(n.name),
            a_bits_in=qm.acts[n.inputs[0]].bits, a_bits_out=qm.acts[n.outputs[0]].bits,
            macs=node_macs(n, graph), bitops=int(bitops[n.name]),
            **layer_weight_fields(qm.layers.get(n.name))))
    total_bitops = int(sum(bitops.values()))
    stage_extra = stage_bitops(schedule, graph, bitops, bitops8, vdpc)
    shape = code_shape(schedule, memory.inplace, vdpc is not None)
    stack = predicted_stack_bytes(graph, board_cpu(board))  # what the search planned against
    packed = packed_layers(
        graph, board.core, shape, lambda t: qm.acts[t].bits,
        lambda n: (qm.layers[n.name].weight_bits,
                   storage(qm.layers[n.name].weight_scheme, qm.layers[n.name].weight_bits)[0]
                   == 0),
        lambda n: offsets.get(n.inputs[0]) is not None
        and offsets.get(n.inputs[0]) == offsets.get(n.outputs[0]))

    def table_differs(node) -> bool:  # the outlier branch's activation table is its own
        return any((qm.acts[t].bits, qm.acts[t].scale, qm.acts[t].zero_point)
                   != (outlier_qm.acts[t].bits, outlier_qm.acts[t].scale,
                       outlier_qm.acts[t].zero_point) for t in (*node.inputs, *node.outputs))

    flash = problem.flash_bytes(solution.choice) + stage_branch_flash(graph, shape,
                                                                      table_differs)
    patch = None
    if schedule.split_tensor is not None:
        patch = {"split_layer": schedule.split_layer, "n": schedule.n,
                 **({"cols": schedule.m} if schedule.m != schedule.n else {}),
                 "split_tensor": schedule.split_tensor, "stage_nodes": schedule.stage_nodes,
                 "redundant_macs": schedule.redundant_macs,
                 "redundant_macs_percent": round(schedule.redundant_macs_percent, 4),
                 "tiles": [[[r.y0, r.y1, r.x0, r.x1] for r in row] for row in schedule.tiles],
                 "vdpc": vdpc.to_dict() if vdpc is not None else None}
        if schedule.cache:
            patch["cache"] = cache_record(schedule, memory.plan.offsets, act_bits)
        if schedule.accumulator is not None:  # a pooled stage's sums (`global_pool_problem`)
            name, size = schedule.accumulator
            patch["pool"] = {"tensor": schedule.pool_input, "bytes": size,
                             "offset": memory.plan.offsets[name]}
    schedule_info = {"io": schedule.io, "inplace_depthwise": sorted(memory.inplace),
                     "fused_adds": {add: {"conv": conv, "skip": skip}
                                    for add, (conv, skip) in sorted(schedule.fused_adds.items())}}
    if memory.overlap:  # outputs written inside their inputs (`memory.overlap_shift`)
        schedule_info["overlap"] = dict(sorted(memory.overlap.items()))
    raised = schedule.raise_record(act_bits, memory.inplace)
    if raised:  # in-place depthwise outputs above their input (`PatchSchedule.raise_shift`)
        schedule_info["inplace_raised"] = raised
    if schedule.scratch_in_arena:  # each layer's scratch in the arena (`memory.scratch_buffers`)
        schedule_info["scratch"] = scratch_record(memory.plan, grown or ())
    if graph.file_order:  # the nodes run in a memory-aware order (`mpq.order`)
        schedule_info["order"] = [n.name for n in graph.nodes]
    predicted = {
        "arena_bytes": memory.arena_bytes,
        "scratch_bytes": memory.scratch_bytes,
        "peak_sram_bytes": memory.peak_sram_bytes,
        # The caller's buffers beside the arena (0 with io "arena": counted in the arena).
        "input_bytes": memory_io_bytes(graph, schedule.io)[0],
        "output_bytes": memory_io_bytes(graph, schedule.io)[1],
        "stack_bytes": stack,
        "sram_needed_bytes": memory.peak_sram_bytes + input_bytes,  # + in, out and stack
        "flash_bytes": flash,
        "code_bytes_estimate": plan_code_bytes(
            graph, board, shape, qm, packed,
            scratch_available(schedule_info, memory.scratch_bytes)),
        "macs": schedule.total_macs + schedule.redundant_macs,
        "bitops": total_bitops + stage_extra["mixed"],
        "bitops_int8": int(sum(bitops8.values())) + stage_extra["int8"],
        "expected_bitops": total_bitops + stage_extra["expected"],
        "full_precision_bitops": full_precision_bitops(graph),
    }
    instructions, why = search_prediction(graph, mixed_bits, w_bits, schedule)
    if instructions is not None:
        predicted["instructions"] = instructions
    else:
        notes.append(why)
    search_info = {
        "objective": round(solution.objective, 9),
        "objective_solver": round(objective_solver, 9),
        "solver": opts.strategy,
        "lambda": opts.lam, "phi": opts.phi, "bins": opts.bins,
        "phi_norm": opts.phi_norm, "range_method": opts.range_method,
        "candidate_bits": list(opts.bits), "weight_bits": list(opts.weight_bits),
        **({"weights": f"{opts.weight_scheme}:{opts.weight_bits[0]}"}
           if opts.weight_scheme else {}),
        "qbr": opts.qbr, "vdpc": opts.vdpc, "patches": opts.patches,
        "ilp_rounds": solution.iterations, "repaired_groups": solution.repaired,
        **({"bias_correction": True} if opts.bias_correction else {}),
        **({"adaround": True} if opts.adaround else {}),
    }
    # The whole board, so export rebuilds this board (`boards.plan_board`) and not whatever file
    # has its name then; the budgets are the search's (the board's or --sram/--flash).
    board_info = {**board.to_dict(), "sram_budget": sram_total, "flash_budget": flash_total}
    return Plan(model=model_path.name, model_sha256=file_sha256(model_path),
                graph_fingerprint=graph_fingerprint(graph), board=board_info,
                strategy=opts.strategy, patch=patch, schedule=schedule_info, tensors=tensors,
                layers=layers, predicted=predicted, search=search_info, notes=notes)


def stage_bitops(schedule: PatchSchedule, graph: Graph, bitops: dict[str, int],
                  bitops8: dict[str, int], vdpc: VdpcResult | None) -> dict[str, int]:
    """BitOPs the patch overlaps add: per patch, stage MACs on its region at the branch's bits;
    with VDPC, outlier patches at 8 bits weighted by their calibration rate."""
    if schedule.split_tensor is None:
        return {"mixed": 0, "int8": 0, "expected": 0}
    by_name = {n.name: n for n in graph.nodes}
    stage = [by_name[s] for s in schedule.stage_nodes]
    ratio = schedule.stage_macs_patched / max(schedule.stage_macs_full, 1)
    mixed = sum(bitops[n.name] for n in stage)
    eight = sum(bitops8[n.name] for n in stage)
    extra_mixed = int(round(mixed * (ratio - 1)))
    extra8 = int(round(eight * (ratio - 1)))
    if vdpc is None:
        return {"mixed": extra_mixed, "int8": extra8, "expected": extra_mixed}
    rate = float(np.mean(vdpc.outlier_rate))
    expected_stage = rate * eight * ratio + (1 - rate) * mixed * ratio
    return {"mixed": extra_mixed, "int8": extra8,
            "expected": int(round(expected_stage - mixed))}


def search_graph(graph: Graph, opts: SearchOptions) -> tuple[Graph, OrderChoice | None]:
    """The graph the search plans: its nodes in the memory-aware order (`mpq.order`, chosen
    once per graph at 8 bits; every candidate schedule and bit choice is then planned exactly
    in it) with `--order memory`, in the file's order with `--order file`."""
    if opts.order == "file":
        return apply_order(graph, file_order(graph)), None
    if opts.order != "memory":
        raise MpqError(f"--order must be memory or file, not '{opts.order}'")
    return memory_ordered(graph)


# -- accuracy first (issue 13) ------------------------------------------------------------------

def accuracy_first(own: SearchResult, model_path: Path, graph: Graph, board: Board,
                   data: Dataset, opts: SearchOptions, stats: CalibrationStats, probe: Probe,
                   x_val: np.ndarray, say: Callable[[str], None]) -> SearchResult:
    """The measured strategy's plan against the other strategies' plans under the same
    budgets, each run as the firmware runs it on the calibration samples; the one closest to
    float is kept (`mpq.search.portfolio`: top-1 agreement, then measured damage). Small
    models only (`portfolio_applies`)."""
    from mpq.fidelity import validation_inputs
    from mpq.search.portfolio import (
        ALTERNATIVES,
        Judge,
        choose,
        portfolio_applies,
        selection_count,
    )
    from mpq.search.ptq_choice import model_damage

    macs = sum(node_macs(n, graph) for n in graph.nodes)
    if not portfolio_applies(macs):
        say(f"selection: {macs:,} MACs per sample, alternatives not searched")
        return own
    x = validation_inputs(data, selection_count(macs, len(data)))
    judge = Judge.build(graph, x, probe.classifier_any)

    def damage_of(plan: Plan) -> float:
        # The plan's own model (its PTQ fits included), not only its bits: the measured
        # plan may keep bias correction, which the bits alone do not show.
        return model_damage(probe, plan_quant_model(plan, graph))

    def alternatives() -> list[tuple[str, SearchResult]]:
        out = []
        for label, strategy, bits in ALTERNATIVES:
            alt = replace(opts, strategy=strategy, bits=bits or opts.bits)
            try:
                out.append((label, search(model_path, graph, board, data, alt, stats=stats)))
            except MpqError as exc:  # this strategy finds no plan under these budgets
                say(f"selection: {label}: {exc}")
        return out

    best, cands = choose(own, alternatives, judge, damage_of, say)
    result = best.result
    plan = result.plan
    selection = {"samples": len(x), "chosen": best.label,
                 "candidates": [c.record(len(x) * max(len(judge.float_top1), 1))
                                for c in cands]}
    if best.label != "measured":
        measured = own.plan.search["measured"]
        plan.strategy = "measured"
        plan.search["measured"] = {
            "validation_samples": probe.samples, "damage": round(best.damage, 9),
            "plans_measured": measured["plans_measured"] + len(cands) - 1,
            "reference_runs": probe.runs}
        plan.predicted["fidelity"] = plan_fidelity(plan, graph, x_val, probe.classifier_any,
                                                   best.damage, probe)
        plan.notes.append(f"accuracy first: the {best.label} strategy's plan kept more top-1 "
                          f"decisions of the float model on {len(x)} calibration samples "
                          f"({best.agree} vs {cands[0].agree}) than the measured ILP's")
    plan.search["measured"]["selection"] = selection
    say(f"selection: kept the {best.label} plan")
    return result


def cache_record(schedule: PatchSchedule, offsets: dict[str, int], bits: dict[str, int]
                 ) -> dict[str, Any]:
    """The plan's `patch.cache` (`mpq.patch.cache_rows`): the patch order, both forms'
    redundant MACs and each line buffer's map, rows, packed bytes and arena offset."""
    lines = []
    for name, elements in sorted(schedule.line_buffers.items()):
        t = name[len(LINE_PREFIX):]
        lines.append({"tensor": t, "rows": schedule.line_rows[t],
                      "bytes": packed_bytes(elements, bits.get(t, 8)),
                      "offset": offsets.get(name)})
    return {"order": "column-major", "redundant_macs_recompute":
            schedule.redundant_macs_recompute, "line_buffers": lines}

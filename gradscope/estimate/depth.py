"""Depth figures of the static estimate: plain runs, the product of gains, the depth scale.

Schoenholz et al. (2017): in a plain stack the gradient scales as chi^L, so
what matters is the longest stretch of weight layers that no skip bypasses,
the per-layer gain chi along the worst path, and the depth scale
xi = -1 / ln(chi) (how many layers until the signal changes by a factor e).
A skip is a real ``add`` node one of whose inputs is an ancestor of the
other (x + f(x)), found in the graph, never guessed from class names.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import networkx as nx

from gradscope.estimate.engine import StaticEstimate
from gradscope.tracing.graph import TracedModel, node_record


@dataclass(frozen=True)
class DepthSummary:
    """Per-model depth figures of the static estimate (the plain run and the skips are
    structural facts: ``gradscope.rules.analysis.structural_facts``)."""

    #: Product of squared-norm gains from the output back to the worst entry layer.
    chi_product: float | None
    #: Weight layers along that path.
    path_layers: int
    #: Geometric-mean gain per weight layer along it.
    chi_per_layer: float | None
    #: Depth scale -1/ln(chi); None when chi is 1 (no decay either way).
    depth_scale: float | None


def _weight_depth(traced: TracedModel) -> dict[str, int]:
    """Most weight layers on any path from an input to each node."""
    depth: dict[str, int] = {}
    for name in traced.order():
        upstream = max((depth.get(p, 0) for p in traced.graph.predecessors(name)), default=0)
        depth[name] = upstream + (1 if traced.node(name).trainable else 0)
    return depth


def nearest_common_ancestor(graph: nx.DiGraph, a: str, b: str) -> str | None:
    """The deepest node upstream of both ``a`` and ``b`` (either one included), or None.

    Best-first backwards from both, deepest node first. Depth grows strictly along
    edges, so when a node is popped every path into it from ``a`` or ``b`` has
    been walked: the first popped node reached from both sides is the fork. A
    residual block costs its own size, not the whole graph's.
    """
    marks: dict[str, set[int]] = {a: {0}, b: {1}}
    heap = [(-node_record(graph, a).depth, a), (-node_record(graph, b).depth, b)]
    heapq.heapify(heap)
    popped: set[str] = set()
    while heap:
        _, node = heapq.heappop(heap)
        if node in popped:
            continue
        popped.add(node)
        if len(marks[node]) == 2:
            return node
        for pred in graph.predecessors(node):
            if node_record(graph, pred).role == "param":
                continue
            if pred not in marks:
                marks[pred] = set()
                heapq.heappush(heap, (-node_record(graph, pred).depth, pred))
            marks[pred] |= marks[node]
    return None


def skip_joins(traced: TracedModel) -> tuple[list[str], list[str]]:
    """(residual adds, concatenation skips): joins of two branches of one fork that cross
    unequal numbers of weights, so that the gradient has a shorter way around the longer.

    x + f(x), and the projection shortcuts of ResNets (1 conv against 2), are residual
    adds; DenseNet's ``cat([x, f(x)])`` and U-Net's ``cat([encoder features, upsampled
    decoder])`` are concatenation skips (Huang et al. 2017; Ronneberger et al. 2015).
    Two independent inputs joined, or two equal branches, are neither.
    """
    graph = traced.graph
    wdepth = _weight_depth(traced)
    found: list[str] = []
    for name in traced.order():
        data = node_record(graph, name)
        if data.key not in ("add", "sub", "cat") or data.role != "compute":
            continue
        ins = [r for r in data.inputs if node_record(graph, r).role != "param"
               and node_record(graph, r).is_float]
        for i, a in enumerate(ins):
            for b in ins[i + 1:]:
                fork = nearest_common_ancestor(graph, a, b)
                if fork is None:
                    continue
                if wdepth[a] - wdepth[fork] != wdepth[b] - wdepth[fork]:
                    found.append(name)
                    break
            if found and found[-1] == name:
                break
    adds = [n for n in found if node_record(graph, n).key != "cat"]
    return adds, [n for n in found if node_record(graph, n).key == "cat"]


def plain_run(traced: TracedModel, skips: set[str]) -> tuple[list[str], int, str | None]:
    """The longest plain run: (its nodes in forward order, its weight layers, its last node).

    The one walker (the summary and GS701 read the same run): a residual add resets
    the count, since the gradient has a way around the layers before it; every
    trainable layer adds one.
    """
    graph = traced.graph
    run: dict[str, int] = {}
    best, best_end = 0, None
    for name in traced.order():
        if traced.node(name).role == "param":
            continue
        upstream = max((run.get(p, 0) for p in graph.predecessors(name)), default=0)
        if name in skips:
            run[name] = 0
            continue
        run[name] = upstream + (1 if traced.node(name).trainable else 0)
        if run[name] > best:
            best, best_end = run[name], name
    path: list[str] = []
    node = best_end
    while node is not None and run.get(node, 0) > 0:
        path.append(node)
        preds = [p for p in graph.predecessors(node) if p in run]
        node = max(preds, key=lambda p: (run[p], traced.node(p).index), default=None)
    return list(reversed(path)), best, best_end


def summarize_depth(traced: TracedModel, est: StaticEstimate, entries: list[str],
                    ) -> DepthSummary:
    """Compute the depth figures; ``entries`` are the first trainable layers (the rules')."""
    graph = traced.graph
    order = traced.order()

    # Worst entry layer: the one whose static health is lowest (or highest, if exploding).
    candidates = [(n, est.health.get(n)) for n in entries]
    finite = [(n, h) for n, h in candidates if h is not None and math.isfinite(h)]
    if not finite:
        return DepthSummary(None, 0, None, None)
    worst, health = max(finite, key=lambda item: abs(math.log(item[1])) if item[1] > 0
                        else math.inf)
    # Weight layers on the longest path from the worst entry to the output.
    layers_to: dict[str, int] = {worst: 1}
    for name in order:
        if name not in layers_to:
            continue
        for succ in graph.successors(name):
            count = layers_to[name] + (1 if traced.node(succ).trainable else 0)
            layers_to[succ] = max(layers_to.get(succ, 0), count)
    path_layers = layers_to.get(traced.output_node, 1)
    chi_product = health * health
    chi = chi_product ** (1.0 / path_layers) if chi_product > 0 else 0.0
    xi = None
    if chi > 0 and abs(math.log(chi)) > 1e-9:
        xi = -1.0 / math.log(chi)
    return DepthSummary(chi_product, path_layers, chi, xi)

"""The analysis the rules read, the structural facts computed once, and the rule run.

:class:`Analysis` bundles what the earlier stages produced (the traced graph,
the static estimate, the probe's measurements) with what every rule needs and no
rule should compute on its own: the :class:`StructuralFacts` of the graph (which
layers train, which are entry layers, where the skips are, the longest plain
run), the gradient health table (``gradscope.rules.health``) and the
:class:`~gradscope.rules.fixes.Fixer` that builds verified fixes. Each is
computed once per analysis and handed to every check, to the summary and to the
report, so they cannot disagree.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gradscope.estimate.depth import plain_run, skip_joins
from gradscope.estimate.statistics import var_of
from gradscope.options import Thresholds
from gradscope.records import Finding, severity_rank
from gradscope.rules.base import StructuralFacts, normalised_downstream
from gradscope.rules.health import HealthTable, build_health
from gradscope.rules.registry import CHECKS
from gradscope.rules.variants import zero_initialised
from gradscope.tracing.graph import Ref, TracedModel

if TYPE_CHECKING:
    from gradscope.estimate.engine import StaticEstimate
    from gradscope.lr_range import RangeTest
    from gradscope.probe import ProbeResult
    from gradscope.rules.base import Check
    from gradscope.rules.fixes import Fixer
    from gradscope.rules.selection import RuleSelection


def trainable_nodes(traced: TracedModel) -> list[str]:
    """Nodes whose own weights train: where a starved gradient actually hurts."""
    return [n for n in traced.order() if traced.node(n).trainable]


def entry_nodes(traced: TracedModel, trainable: Sequence[str]) -> list[str]:
    """The first trainable layers on each path from the inputs.

    The gradient has to travel the whole depth to reach them. Side paths that are
    weak by design at initialisation (attention's query/key projections under a
    near-uniform softmax) are not entry layers, so they do not raise alarms.
    """
    graph = traced.graph
    train = set(trainable)
    behind: dict[str, bool] = {}
    # Only what the inputs reach is on a path from them: a position table normalised on
    # its own (DeBERTa's rel_embeddings) is reached by the gradient only through the
    # attention scores, a side path like the query/key projections.
    fed: dict[str, bool] = {}
    entries = []
    for node in traced.order():
        preds = list(graph.predecessors(node))
        fed[node] = traced.node(node).role == "input" or any(fed.get(p, False) for p in preds)
        behind[node] = any(p in train or behind.get(p, False) for p in preds)
        if node in train and not behind[node] and fed[node]:
            entries.append(node)
    return entries


def differentiated_path(traced: TracedModel) -> frozenset[str]:
    """Nodes whose output reaches the differentiated output (the output node included)."""
    from networkx import ancestors

    out = traced.output_node
    return frozenset(ancestors(traced.graph, out) | {out})


def behind(traced: TracedModel, on_path: frozenset[str], gates: Sequence[str]) -> frozenset[str]:
    """Nodes on the path whose every way to the output crosses one of ``gates``."""
    if not gates:
        return frozenset()
    from networkx import ancestors

    out = traced.output_node
    closed = set(gates)
    if out in closed:
        free: set[str] = set()
    else:
        open_graph = traced.graph.subgraph(n for n in traced.graph.nodes if n not in closed)
        free = ancestors(open_graph, out) | {out}
    return frozenset(on_path - free - closed)


#: Argument positions and names of (query, key) and of value in attention ops.
_SCORE_ARGS = ((0, "query"), (1, "key"))
_VALUE_ARG = (2, "value")


def _refs_at(rec: Any, places: Sequence[tuple[int, str]]) -> set[str]:
    names = set()
    for index, key in places:
        value = rec.args[index] if index < len(rec.args) else rec.kwargs.get(key)
        if isinstance(value, Ref):
            names.add(value.name)
    return names


def score_side(traced: TracedModel, on_path: frozenset[str]) -> frozenset[str]:
    """Nodes on the path whose every way to the output enters an attention op as its
    query or key only (the LayerNorm before a cross-attention's query projection).

    At initialisation the softmax is near uniform and passes the scores little
    gradient, by design: such nodes are weak for the reason the query/key projections
    are, not starved (the value path and the residual stream carry the signal).
    """
    from networkx import ancestors

    graph = traced.graph.copy()
    for node in traced.order():
        rec = traced.node(node)
        if rec.family != "attention":
            continue
        values = _refs_at(rec, (_VALUE_ARG,))
        for ref in _refs_at(rec, _SCORE_ARGS) - values:
            if graph.has_edge(ref, node):
                graph.remove_edge(ref, node)
    out = traced.output_node
    free = ancestors(graph, out) | {out}
    return frozenset(on_path - free)


def structural_facts(traced: TracedModel) -> StructuralFacts:
    """Compute the facts once."""
    on_path = differentiated_path(traced)
    trainable = [n for n in trainable_nodes(traced) if n in on_path]
    zero = [n for n in trainable if zero_initialised(traced, n)]
    blocked = behind(traced, on_path, zero)
    judged = [n for n in trainable if n not in blocked]
    skips, concats = skip_joins(traced)
    path, longest, end = plain_run(traced, set(skips) | set(concats))
    entries = entry_nodes(traced, judged)
    return StructuralFacts(trainable=tuple(judged), entries=tuple(entries),
                           residual_adds=tuple(skips), plain_run=tuple(path),
                           longest_plain_run=longest, plain_run_end=end, on_path=on_path,
                           zero_init=tuple(zero), behind_zero_init=blocked,
                           concat_skips=tuple(concats),
                           normalised_entries=frozenset(
                               n for n in entries if normalised_downstream(traced, n)),
                           score_side=score_side(traced, on_path))


@dataclass
class Analysis:
    """Everything the checks may read."""

    traced: TracedModel
    estimate: StaticEstimate
    probe: ProbeResult | None
    thresholds: Thresholds = field(default_factory=Thresholds)
    #: What the estimate ran on (fixes are re-estimated on the same inputs).
    inputs: tuple[Any, ...] = ()
    declared: dict[int, tuple[float, float]] | None = None
    #: The planned run's length in optimiser steps (``--steps``): warmup advice is a share
    #: of it; None: no warmup length is advised.
    steps: int | None = None
    #: The model the graph was traced from (an ``nn.Module``), or None: fixes read its
    #: module tree to say whether a change can be applied mechanically (an activation
    #: module to swap, consecutive children of an ``nn.Sequential`` to wrap).
    model: Any = None
    #: The optimizer the user said they train with (``--optimizer``), None when not given
    #: (the verdict then assumes plain SGD and says so).
    optimizer: str | None = None
    #: The learning-rate range test (``gradscope.lr_range``), None where none ran.
    lr_range: RangeTest | None = None
    #: Why no range test ran (what would enable one), None where one ran or no lr.
    lr_range_skipped: str | None = None
    #: Results shared between checks (verified fixes are costly: one estimate each).
    memo: dict[str, Any] = field(default_factory=dict)

    def remember(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]

    @functools.cached_property
    def facts(self) -> StructuralFacts:
        return structural_facts(self.traced)

    @functools.cached_property
    def health(self) -> HealthTable:
        return build_health(self.estimate, self.probe, self.thresholds, self.facts.entries,
                            self.facts.on_path, self.facts.behind_zero_init,
                            self.facts.normalised_entries)

    def mean_and_variance(self, node: str) -> tuple[float, float] | None:
        """The estimate's (mean, variance) of a node's output, None where it has none."""
        mom = self.estimate.moments.get(node)
        return None if mom is None else (mom[0], var_of(mom))

    @functools.cached_property
    def fixer(self) -> Fixer:
        from gradscope.rules.fixes import Fixer  # the fixes read this module's Analysis

        return Fixer(self)


def run_rules(analysis: Analysis, selection: RuleSelection | None = None,
              checks: Sequence[Check] | None = None) -> tuple[list[Finding], list[str]]:
    """Run the selected checks; (findings most serious first, codes not run by selection).

    Selection decides before a check runs: a check none of whose codes is
    selected is skipped with its costly what-if estimates. A check that runs for
    one selected code may still emit another; those findings are dropped after.
    """
    selects = selection.selects if selection is not None else (lambda _code: True)
    findings: list[Finding] = []
    not_run: list[str] = []
    for check in checks if checks is not None else CHECKS:
        chosen = [code for code in check.codes if selects(code)]
        not_run.extend(code for code in check.codes if code not in chosen)
        if not chosen:
            continue
        findings.extend(f for f in check.run(analysis) if f.rule in chosen)
    findings.sort(key=lambda f: (severity_rank(f.severity), f.rule, f.location.node or ""))
    return findings, sorted(set(not_run))

"""What every rule family shares: the rule record, its findings, how a family declares checks.

A rule family is one module of ``gradscope.rules`` (GS1xx vanishing, GS2xx
exploding, ... GS8xx tracing) holding, for each of its codes, the metadata users
read (:class:`Rule`), the check that decides, the message it writes and the fixes
it offers. The family hands :data:`FAMILY` (a :class:`RuleFamily`) to the
registry. Nothing here imports torch, and neither do the family modules: what
needs torch (the what-if estimates behind fixes, recurrent unrolls) is reached
through the :class:`~gradscope.rules.analysis.Analysis` a check receives, so the
registry, ``gradscope rules``, the settings and the renderers stay light.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from gradscope.records import Finding, Location, Recommendation, Severity
from gradscope.tracing.nodes import node_record

if TYPE_CHECKING:
    import networkx as nx

    from gradscope.estimate.engine import StaticEstimate
    from gradscope.lr_range import RangeTest
    from gradscope.options import Thresholds
    from gradscope.probe import ProbeResult
    from gradscope.rules.health import HealthTable
    from gradscope.tracing.graph import TracedModel

#: Code families by hundreds and their category; a code's third character names it.
CATEGORIES_BY_FAMILY: dict[int, str] = {
    1: "vanishing_gradient",
    2: "exploding_gradient",
    3: "saturation",
    4: "dead_units",
    5: "nonfinite",
    6: "learning_rate",
    7: "architecture",
    8: "trace",
}


#: The location of a finding about the whole model.
NOWHERE = Location()


@dataclass(frozen=True)
class Rule:
    """Everything a user needs to understand a code without reading gradscope's source."""

    code: str
    name: str
    category: str
    severity: Severity
    summary: str
    what: str
    why: str
    fix: str
    references: tuple[str, ...] = ()

    def explain(self) -> str:
        """The long text of ``gradscope rules CODE``."""
        refs = "\n".join(f"  - {r}" for r in self.references) or "  (none)"
        return (
            f"{self.code} {self.name} [{self.category}, default severity {self.severity}]\n"
            f"{self.summary}\n\n"
            f"What: {self.what}\n\nWhy: {self.why}\n\nHow to fix: {self.fix}\n\n"
            f"References:\n{refs}\n"
        )

    def finding(self, message: str, location: Location = NOWHERE,
                severity: Severity | None = None,
                recommendations: Iterable[Recommendation] = (),
                evidence: Mapping[str, float | int | str | None] | None = None) -> Finding:
        """A finding of this rule (its category; its default severity unless told)."""
        return Finding(rule=self.code, category=self.category,
                       severity=severity or self.severity, message=message,
                       location=location, recommendations=tuple(recommendations),
                       evidence=dict(evidence or {}))


# ---------------------------------------------------------------------------
# What a check may read: the analysis, and the fixes it may ask for


@dataclass(frozen=True)
class StructuralFacts:
    """Facts of the graph's structure that several rules, the summary and the fixes read."""

    #: Nodes whose own weights train and whose output reaches the differentiated
    #: output, in forward order.
    trainable: tuple[str, ...]
    #: The first trainable layer on each path from the inputs: where vanishing is judged.
    entries: tuple[str, ...]
    #: ``add`` nodes that give the gradient a shorter way around weight layers.
    residual_adds: tuple[str, ...]
    #: The nodes of the longest plain run (weight layers no skip bypasses), forward order.
    plain_run: tuple[str, ...]
    #: Weight layers on that run, and the node where it ends.
    longest_plain_run: int
    plain_run_end: str | None
    #: Nodes whose output reaches the output the probe differentiates (the selected
    #: output): the others (a BERT pooler when the hidden states are probed, a second
    #: head) get no gradient from this loss, by construction, and are not judged.
    on_path: frozenset[str] = frozenset()
    #: Trainable nodes whose weights are all zero at initialisation (ReZero/SkipInit
    #: gains, Fixup's last branch layers, a zero-initialised head), in forward order.
    zero_init: tuple[str, ...] = ()
    #: Nodes every path of which to the output crosses a zero-initialised node: they
    #: get no gradient until the first update, by design, and are not judged.
    behind_zero_init: frozenset[str] = frozenset()
    #: ``cat`` nodes that hand the gradient a way around a branch (DenseNet, U-Net): skips
    #: for the plain run, not residual adds.
    concat_skips: tuple[str, ...] = ()
    #: Entry layers whose output is normalised before it matters (a convolution followed
    #: by BatchNorm): their weights are scale-invariant, so a large gradient norm there is
    #: not an exploding gradient (it shrinks as the weights grow; Arora et al. 2019).
    normalised_entries: frozenset[str] = frozenset()
    #: Nodes whose every way to the output goes through the query or key of an
    #: attention op: weak by design at initialisation (a flat softmax passes the scores
    #: little gradient), like the query/key projections, which are not entry layers.
    score_side: frozenset[str] = frozenset()


class Fixes(Protocol):
    """The verified fixes and the weight measurements a check may ask for.

    Implemented by :class:`gradscope.rules.fixes.Fixer`, which needs torch and the
    static estimate; the rule families see only this interface, so they stay light
    and every costly what-if is memoised in one place.
    """

    def activation_swap(self, worst: str = "low") -> Recommendation | None: ...
    def initialization(self, worst: str) -> Recommendation | None: ...
    def residual(self, worst: str) -> Recommendation | None: ...
    def normalization_after_layers(self, worst: str) -> Recommendation | None: ...
    def zero_bias(self, nodes: Sequence[str], worst: str = "low") -> Recommendation | None: ...
    def pre_ln(self, pairs: list[tuple[str, str]]) -> Recommendation | None: ...
    def scaled_residuals(self, unscaled: list[tuple[str, tuple[str, str]]],
                         worst: str) -> Recommendation | None: ...
    def recurrent(self, node: str) -> list[Recommendation]: ...
    def saturating_hidden(self) -> list[str]: ...
    def negative_bias_layers(self) -> list[tuple[str, float]]: ...
    def recurrent_spectral_norm(self, node: str) -> float | None: ...
    def lstm_forget_bias(self, node: str) -> float | None: ...


class Analysis(Protocol):
    """What a check reads: the earlier stages' results and what is computed once for all.

    Implemented by :class:`gradscope.rules.analysis.Analysis`.
    """

    traced: TracedModel
    estimate: StaticEstimate
    probe: ProbeResult | None
    thresholds: Thresholds
    inputs: tuple[Any, ...]
    declared: dict[int, tuple[float, float]] | None
    steps: int | None
    #: The traced ``nn.Module`` (typed Any: this module stays free of torch), or None.
    model: Any
    lr_range: RangeTest | None
    optimizer: str | None
    lr_range_skipped: str | None

    def remember(self, key: str, compute: Callable[[], Any]) -> Any: ...
    def mean_and_variance(self, node: str) -> tuple[float, float] | None: ...
    @property
    def facts(self) -> StructuralFacts: ...
    @property
    def health(self) -> HealthTable: ...
    @property
    def fixer(self) -> Fixes: ...


#: A check reads the analysis and returns findings of its family's codes.
#: An analysis (before training) or a ``gradscope.steps.TrainingRecord`` (step checks).
CheckFunction = Callable[[Any], list[Finding]]


@dataclass(frozen=True)
class Check:
    """One check and the codes it may emit: the registry runs it only if one is selected."""

    codes: tuple[str, ...]
    run: CheckFunction


@dataclass(frozen=True)
class RuleFamily:
    """A family module's rules and checks, handed to :mod:`gradscope.rules.registry`."""

    number: int
    rules: tuple[Rule, ...]
    checks: tuple[Check, ...]
    #: Checks over the steps of a watched training run (``gradscope.watch``): the same
    #: ``Check``, run on a ``gradscope.steps.TrainingRecord`` instead of an analysis.
    step_checks: tuple[Check, ...] = ()


# ---------------------------------------------------------------------------
# Helpers the checks share


def location(analysis: Analysis, node: str) -> Location:
    """Where a finding about ``node`` points: module, node and the user's source line."""
    rec = analysis.traced.node(node)
    return Location(module=rec.module, node=node, file=rec.file, line=rec.line)


def op_of(analysis: Analysis, node: str) -> str:
    """``module (op)`` as findings name a node."""
    return analysis.traced.node(node).label()


def fmt(x: float | None) -> str:
    """A figure as recommendations print it: 2 significant digits, ``n/a``, or no gradient."""
    if x is None or not math.isfinite(x):
        return "n/a"
    if x == 0:
        return "0 (no gradient)"
    return f"{x:.2g}" if 1e-2 <= abs(x) < 1e3 else f"{x:.2e}"


def median(values: list[float]) -> float:
    """The upper median of sorted-or-not values (what every rule calls "the median layer")."""
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


# ---------------------------------------------------------------------------
# References cited by several families

SCHOENHOLZ = "Schoenholz et al. 2017, Deep Information Propagation (ICLR)"
GLOROT = "Glorot & Bengio 2010, Understanding the difficulty of training deep feedforward networks"
HE = "He et al. 2015, Delving Deep into Rectifiers (ICCV)"
HE_RES = "He et al. 2016, Deep Residual Learning for Image Recognition (CVPR)"
PASCANU = "Pascanu, Mikolov & Bengio 2013, On the difficulty of training recurrent neural networks"

YANG = "Yang et al. 2019, A Mean Field Theory of Batch Normalization (ICLR)"
XIONG = "Xiong et al. 2020, On Layer Normalization in the Transformer Architecture (ICML)"
HANIN = "Hanin 2018, Which Neural Net Architectures Give Rise to Exploding and Vanishing " \
    "Gradients? (NeurIPS)"
DE_SMITH = "De & Smith 2020, Batch Normalization Biases Residual Blocks Towards the Identity " \
    "Function in Deep Networks (NeurIPS)"
ZHANG_FIXUP = "Zhang, Dauphin & Ma 2019, Fixup Initialization: Residual Learning Without " \
    "Normalization (ICLR)"
LU = "Lu et al. 2020, Dying ReLU and Initialization: Theory and Numerical Examples"



# ---------------------------------------------------------------------------
# Graph helpers the checks and the fixes share


def signal_inputs(graph: nx.DiGraph, node: str) -> list[str]:
    """A node's floating-point inputs that are activations, not weights."""
    return [r for r in node_record(graph, node).inputs
            if node_record(graph, r).role != "param" and node_record(graph, r).is_float]


def stream_and_branch(graph: nx.DiGraph, add: str) -> tuple[str, str] | None:
    """(stream, branch output) of a residual add ``stream + branch(stream)``, else None."""
    from networkx import has_path  # at call time: `gradscope rules` needs no graph library

    ins = signal_inputs(graph, add)
    if len(ins) != 2:
        return None
    a, b = ins
    if has_path(graph, a, b):
        return a, b
    if has_path(graph, b, a):
        return b, a
    return None


#: Ops through which a per-channel scale passes unchanged in shape: scaling their input
#: by a > 0 scales their output by a (ReLU, max and average pooling, concatenation,
#: views, dropout, a weight layer without bias). ReLU6 is homogeneous below its cap,
#: which normalised activations at initialisation rarely reach (MobileNetV2).
HOMOGENEOUS = ("max_pool", "avg_pool", "mean", "cat", "view", "dropout", "split",
               "getitem", "activation:relu", "activation:relu6")


def normalised_downstream(traced: TracedModel, node: str) -> bool:
    """Whether every path from ``node`` reaches a normalisation through ops that pass a
    positive scale through, so that the scale of ``node``'s output cannot change the loss.

    Then the weights that set that scale are scale-invariant (a convolution followed by
    BatchNorm): the gradient they receive is inversely proportional to their size, and
    its norm says nothing about the size of their relative updates.
    """
    stack, seen, reached = list(traced.graph.successors(node)), set(), False
    while stack:
        succ = stack.pop()
        if succ in seen:
            continue
        seen.add(succ)
        rec = traced.node(succ)
        if succ == traced.output_node:
            return False
        if rec.family == "normalisation":
            reached = True
            continue
        unbiased = rec.is_dense and not any(p.rsplit(".", 1)[-1] == "bias" for p in rec.params)
        if rec.key not in HOMOGENEOUS and not unbiased:
            return False
        stack.extend(traced.graph.successors(succ))
    return reached

"""Residual blocks that hold *equal* weights: their paths add in amplitude, not in power.

Mean field (``docs/static-estimate.md``) treats every weight tensor as an independent draw:
the paths from the top of a residual stack to its bottom are then uncorrelated and their
squared norms add, which gives the familiar product ``prod_l (1 + v_l)`` (``v_l`` the S-gain
of block l's branch). ``nn.TransformerEncoder(layer, n)``, ``copy.deepcopy(block)`` stacks
and ``[block] * n``-style clones start with the *same* weights in every block. Then a
block's Jacobian is ``I + B`` with the same ``B`` throughout, and the paths are no longer
uncorrelated.

The model (leading order in 1/width). Expand the backward product of ``n`` blocks into its
``2^n`` paths: a path is the ordered list of branches it crosses. At leading order in the
width, two paths are correlated only when they apply the *same word* of weight matrices
(Ginibre / free-probability pairing: ``E <X g, Y g> = 0`` unless ``X`` and ``Y`` are the same
product; ``E ||B^j g||^2 = v^j ||g||^2``). With independent draws every path is its own word
and mean field is exact; with equal weights every path that crosses the same sequence of
*kinds* of branch (its "letters": one per class of equal weights) is the same vector up to a
scalar, so those paths add in amplitude. For one kind of block repeated ``n`` times this is

    S_in / S_out = sum_j binom(n, j)^2 v^j     instead of     sum_j binom(n, j) v^j,

and in general the sum over pairs of paths with equal words of the product of their
amplitudes ``prod sqrt(v_l)``: :class:`_PairSum` computes it in ``O(n^2)`` per block by
dynamic programming over the last branch each path of the pair crosses. When no two blocks
share weights, it reduces exactly to the mean-field product, so it is a generalisation of
the old rule rather than a correction to it.

The forward signal is the same kind of sum (a Krylov sequence of the same operator), so the
residual stream's second moment grows coherently too, with the branch's forward gain
``q_branch / q_stream`` as amplitude. This matters as much as the backward half: a Pre-LN
branch normalises its input, so its gain is ``1 / q_stream``, and the stream of identical
Pre-LN blocks grows as ``L^2`` instead of ``L`` (measured 75 against 3.9 at 24 transformer
layers); a Post-LN stack renormalises the coherently grown stream after every add while the
gradient, not yet aligned with the stream's direction, gains only ``1 + v``: the gradient
shrinks in the middle of the stack and recovers near the bottom. Both follow from the one
rule applied to both sweeps (the stream and the norms' gains are the existing op rules'
moments; only the adds' outputs and the forks' squared norms are replaced).

Measured (``benchmarks/identical_layers.py --model``, autograd, widths 64 and 256): residual
MLPs without normalisation 53x at 24 blocks against the mean-field 1.9x, this rule 60x
(0.05 decades); Pre-LN MLPs 4.1-4.3x against 1.5x, this rule 4.5-4.8x; post-norm MLPs 0.40
in mid-stack against 0.97, this rule 0.46-0.52.

Where it applies: a residual ``add`` whose skip input is an ancestor of its other input
(``x + f(x)``: the fork is the skip input itself), chained along one stream (the next
block's fork is reached from this add through single-input ops such as a LayerNorm or a
dropout). A block's letter is the set of equality classes of its branch's non-constant
weight tensors (shape, a fingerprint, then ``torch.equal``); constant tensors (a
LayerNorm's ones and zeros) say nothing about correlation and are ignored. Only streams
where some letter repeats are touched. Tensors without values (the meta device) are never
equal: the old rule applies there.

What it leaves out: a LayerNorm's radial projection removes the stream's own direction from
the gradient, which with coherent blocks is the direction the forward power iteration
aligns with; about 0.1 decade more decay in post-norm stacks (measured with a norm whose
scale is detached, which shows the same U-shaped profile less deep). Dropout masks differ
from block to block and decorrelate the paths slightly (by ``1 - p`` on cross terms).
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import networkx as nx
import torch

from gradscope.estimate.statistics import Facts, Mom, cached_fact
from gradscope.tracing.graph import TracedModel, node_record

#: Longest chain handled coherently: the pair sum costs O(n) per block and O(n^2) memory.
_MAX_CHAIN = 512
#: Steps walked back from a fork to the previous block's add (LayerNorm, dropout, views).
_MAX_WALK = 16


class _PairSum:
    """Sum over pairs of paths with equal words of their amplitudes' product, block by block.

    Blocks are numbered 1..n in the order the signal crosses them. ``m[t][u]`` sums the
    amplitude products of path pairs whose last branches crossed are ``t`` and ``u``; it is
    non-zero only when blocks ``t`` and ``u`` have the same letter, and then equals
    ``a_t a_u (1 + P[t-1][u-1])`` with ``P`` the 2-D prefix sum of ``m`` (both paths extend an
    equal-word pair that ended before them, or start from the bare skip path). The squared
    norm after block ``t``, relative to before the first, is ``U_t = 1 + P[t][t]``.
    """

    def __init__(self, letters: list[int]) -> None:
        self.letters = letters
        n = len(letters)
        self.amp = [0.0] * (n + 1)
        self.prefix = [[0.0] * (n + 1) for _ in range(n + 1)]
        self.done = 0
        self.total = 1.0
        self.broken = False

    def step(self, gain: float) -> float:
        """Cross the next block, whose branch has S-gain ``gain``: the ratio U_t / U_{t-1}."""
        t = self.done + 1
        self.done = t
        gain = max(gain, 0.0) if math.isfinite(gain) else 0.0
        if self.broken:
            return 1.0 + gain
        a = math.sqrt(gain)
        self.amp[t] = a
        p = self.prefix
        row = [0.0] * (t + 1)
        for u in range(1, t + 1):
            if self.letters[u - 1] == self.letters[t - 1]:
                row[u] = a * self.amp[u] * (1.0 + p[t - 1][u - 1])
        # prefix row t and column t (P is symmetric because m is)
        for u in range(1, t + 1):
            p[t][u] = p[t - 1][u] + p[t][u - 1] - p[t - 1][u - 1] + row[u]
            if u < t:
                # column t at row u: P[u][t] = P[t][u] by symmetry
                p[u][t] = p[t][u]
        total = 1.0 + p[t][t]
        if not math.isfinite(total) or total <= 0.0:
            self.broken = True
            return 1.0 + gain
        ratio = total / self.total
        self.total = total
        return ratio


@dataclass
class _Chain:
    """One residual stream's blocks, bottom up: their adds, forks and letters."""

    adds: list[str]
    forks: list[str]
    #: The branch's output: the add's other input.
    outs: list[str]
    letters: list[int]
    forward: _PairSum | None = None
    backward: _PairSum | None = None
    disabled: bool = False


@dataclass
class TiedBlocks:
    """The chains of residual blocks with equal weights in one traced model."""

    #: By add node: (chain, position bottom up).
    by_add: dict[str, tuple[_Chain, int]] = field(default_factory=dict)
    #: By fork node: (chain, position bottom up).
    by_fork: dict[str, tuple[_Chain, int]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.by_add)

    def forward(self, add: str, moments: Mapping[str, Mom | None], mom: Mom | None,
                segmented: bool = False) -> Mom | None:
        """The add's output moments with equal blocks' paths added coherently.

        Called in forward order for every node once its own rule has given ``mom``; returns
        ``mom`` unchanged unless ``add`` is a chain's block. The branch's amplitude is its
        forward gain ``q_branch / q_fork`` (second moments), the new second moment
        ``q_fork U_t / U_(t-1)``; the mean is the rule's. A segmented add (positions of
        unlike scale, ``gradscope.estimate.segments``) switches its chain back to mean field.
        """
        found = self.by_add.get(add)
        if found is None or mom is None:
            return mom
        chain, pos = found
        fork_mom, branch_mom = moments.get(chain.forks[pos]), moments.get(chain.outs[pos])
        if segmented or fork_mom is None or branch_mom is None:
            chain.disabled = True
        second = self._forward(chain, pos, fork_mom[1] if fork_mom else 0.0,
                               branch_mom[1] if branch_mom else 0.0)
        if second is None:
            return mom
        return mom[0], max(second, mom[0] ** 2)

    def _forward(self, chain: _Chain, pos: int, second_fork: float,
                 second_branch: float) -> float | None:
        if chain.disabled:
            return None
        if chain.forward is None or chain.forward.done != pos:
            if pos != 0:
                chain.disabled = True  # the blocks were not met bottom up: leave mean field
                return None
            chain.forward = _PairSum(chain.letters)
        if second_fork <= 0.0 or not math.isfinite(second_fork):
            chain.disabled = True
            return None
        ratio = chain.forward.step(second_branch / second_fork)
        return second_fork * ratio

    def backward(self, fork: str, sq: Mapping[str, float], segmented: bool = False
                 ) -> float | None:
        """The fork's squared norm with equal blocks' paths added coherently.

        Called in reverse order when the sweep reaches a node, before its own rule runs:
        for a block's fork every deposit is in by then, the skip's ``sq[add]`` plus the
        branch's, so the branch's S-gain is ``sq[fork] / sq[add] - 1``. None (keep the
        mean-field sum) when ``fork`` is no chain block's fork.
        """
        found = self.by_fork.get(fork)
        if found is None:
            return None
        chain, pos = found
        if segmented:
            chain.disabled = True
        sq_fork, sq_add = sq.get(fork, 0.0), sq.get(chain.adds[pos], 0.0)
        if chain.disabled or sq_add <= 0.0 or not math.isfinite(sq_add):
            return None
        top = len(chain.adds) - 1 - pos
        if chain.backward is None:
            if top != 0:
                return None
            chain.backward = _PairSum(list(reversed(chain.letters)))
        if chain.backward.done != top:
            chain.disabled = True
            return None
        ratio = chain.backward.step(sq_fork / sq_add - 1.0)
        return sq_add * ratio


# ---------------------------------------------------------------------------
# Finding the chains


def _float_tensors(traced: TracedModel, nodes: Iterable[str]) -> list[torch.Tensor]:
    """The weight tensors a set of nodes reads: parameter nodes, and kept modules' own."""
    out: list[torch.Tensor] = []
    graph = traced.graph
    for name in nodes:
        rec = node_record(graph, name)
        if rec.role == "param":
            t = traced.tensors.get(name)
            if t is not None:
                out.append(t)
        elif rec.kind == "call_module":
            module = traced.modules.get(rec.module or "")
            if module is not None:
                out.extend(module.parameters())
    return [t for t in out if t.is_floating_point()]


def _fingerprint(t: torch.Tensor) -> tuple[object, ...] | None:
    """Shape, dtype, min, max, sum and first values of ``t``; None for a constant tensor."""
    flat = t.detach().reshape(-1)
    lo, hi = float(flat.min()), float(flat.max())
    if lo == hi:
        return None
    head = tuple(float(v) for v in flat[:4])
    return (tuple(t.shape), str(t.dtype), lo, hi, float(flat.double().sum()), head)


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.detach(), b.detach())


class _Classes:
    """Equality classes of tensors by value: shape, dtype, a fingerprint, then torch.equal.

    ``facts`` (the traced model's ``weight_facts``) keeps the fingerprints and equalities
    for the next estimate of the same weights: every fix's re-estimate asks again.
    """

    def __init__(self, facts: Facts | None = None) -> None:
        self._by_id: dict[int, int] = {}
        self._buckets: dict[tuple[object, ...], list[tuple[torch.Tensor, int]]] = \
            defaultdict(list)
        self._next = 0
        self._facts: Facts = facts if facts is not None else {}

    def of(self, t: torch.Tensor) -> int | None:
        """The class of ``t``; None for a constant tensor or one without values (meta)."""
        key_id = id(t)
        if key_id in self._by_id:
            cls = self._by_id[key_id]
            return cls if cls >= 0 else None
        if t.is_meta or t.numel() < 2:
            self._by_id[key_id] = -1
            return None
        key = cached_fact(self._facts, "fingerprint", (t,), functools.partial(_fingerprint, t))
        if key is None:
            self._by_id[key_id] = -1
            return None
        for other, cls in self._buckets[key]:
            if cached_fact(self._facts, "equal", (other, t), functools.partial(_equal, other, t)):
                self._by_id[key_id] = cls
                return cls
        cls = self._next
        self._next += 1
        self._buckets[key].append((t, cls))
        self._by_id[key_id] = cls
        return cls


def _has_equal_weights(traced: TracedModel) -> bool:
    """Cheap pre-check: is one weight tensor read twice (a block called in a loop, a shared
    module) or do two distinct non-constant weight tensors hold equal values (deep copies)?"""
    uses: dict[int, int] = defaultdict(int)
    graph = traced.graph
    for name in graph.nodes:
        rec = node_record(graph, name)
        if rec.role == "param":
            t = traced.tensors.get(name)
            if t is not None:
                uses[id(t)] += sum(1 for _ in graph.successors(name))
        elif rec.kind == "call_module":
            module = traced.modules.get(rec.module or "")
            if module is not None:
                for t in module.parameters():
                    uses[id(t)] += 1
    if any(n > 1 for n in uses.values()):
        return True
    by_shape: dict[tuple[object, ...], list[torch.Tensor]] = defaultdict(list)
    seen: set[int] = set()
    tensors = list(traced.tensors.values())
    for module in traced.modules.values():
        tensors.extend(module.parameters())
    for t in tensors:
        if not isinstance(t, torch.Tensor) or id(t) in seen or not t.is_floating_point() \
                or t.is_meta or t.numel() < 2:
            continue
        seen.add(id(t))
        by_shape[(tuple(t.shape), str(t.dtype))].append(t)
    classes = _Classes(traced.weight_facts)
    for group in by_shape.values():
        if len(group) < 2:
            continue
        found = [c for c in (classes.of(t) for t in group) if c is not None]
        if len(found) != len(set(found)):
            return True
    return False


def _branch(traced: TracedModel, fork: str, out: str) -> set[str] | None:
    """Nodes between ``fork`` and ``out`` (``out`` included), or None if ``fork`` is not
    upstream of ``out``: a backward search from ``out`` that never goes above ``fork``."""
    graph = traced.graph
    floor = node_record(graph, fork).index
    seen = {out}
    stack = [out]
    reached = False
    while stack:
        node = stack.pop()
        for pred in graph.predecessors(node):
            if pred == fork:
                reached = True
                continue
            rec = node_record(graph, pred)
            if pred in seen:
                continue
            if rec.role == "param":
                seen.add(pred)
                continue
            if rec.index <= floor:
                continue
            seen.add(pred)
            stack.append(pred)
    return seen if reached else None


def _activation_inputs(graph: nx.DiGraph, name: str) -> list[str]:
    rec = node_record(graph, name)
    return [r for r in rec.inputs if node_record(graph, r).role != "param"
            and node_record(graph, r).is_float]


def find_tied_blocks(traced: TracedModel) -> TiedBlocks:
    """The residual streams of ``traced`` along which some blocks hold equal weights."""
    found = TiedBlocks()
    try:
        if not _has_equal_weights(traced):
            return found
    except (RuntimeError, TypeError, ValueError):
        return found
    graph = traced.graph
    classes = _Classes(traced.weight_facts)
    blocks: dict[str, tuple[str, int]] = {}  # add -> (fork, letter)
    outs: dict[str, str] = {}
    fresh = -1
    for name in traced.order():
        rec = node_record(graph, name)
        if rec.key != "add" or rec.role != "compute" or not rec.is_float:
            continue
        ins = _activation_inputs(graph, name)
        if len(ins) != 2 or ins[0] == ins[1]:
            continue
        for skip, out in ((ins[0], ins[1]), (ins[1], ins[0])):
            nodes = _branch(traced, skip, out)
            if nodes is None:
                continue
            ids = sorted({c for c in (classes.of(t) for t in _float_tensors(traced, nodes))
                          if c is not None})
            if ids:
                letter = hash(tuple(ids))
            else:
                letter, fresh = fresh, fresh - 1  # no weights: a letter of its own
            blocks[name] = (skip, letter)
            outs[name] = out
            break
    # link each block to the previous block on its stream
    prev: dict[str, str] = {}
    for add, (fork, _) in blocks.items():
        node: str | None = fork
        for _ in range(_MAX_WALK):
            if node is None:
                break
            if node in blocks and node != add:
                prev[add] = node
                break
            ins = _activation_inputs(graph, node)
            node = ins[0] if len(ins) == 1 else None
    nxt: dict[str, str] = {}
    for add, before in prev.items():
        if before in nxt:  # a fork in the stream: two blocks read one add; keep the first
            continue
        nxt[before] = add
    starts = [a for a in blocks if a not in prev or nxt.get(prev[a]) != a]
    forks_used: dict[str, int] = defaultdict(int)
    for fork, _ in blocks.values():
        forks_used[fork] += 1
    for start in starts:
        adds = [start]
        while adds[-1] in nxt and len(adds) < _MAX_CHAIN:
            adds.append(nxt[adds[-1]])
        letters = [blocks[a][1] for a in adds]
        if len(set(letters)) == len(letters):
            continue  # every block its own weights: mean field is exact
        forks = [blocks[a][0] for a in adds]
        if any(forks_used[f] > 1 for f in forks):
            continue
        chain = _Chain(adds=adds, forks=forks, outs=[outs[a] for a in adds], letters=letters)
        for pos, (add, fork) in enumerate(zip(adds, forks, strict=True)):
            found.by_add[add] = (chain, pos)
            found.by_fork[fork] = (chain, pos)
    return found

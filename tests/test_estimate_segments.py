"""Positions of unlike scale (a class token) and weights read by indexing, against autograd.

Two mechanisms of the static estimate, each checked on a small synthetic model
against a brute-force autograd measurement (not gradscope's probe):

- ``gradscope.estimate.segments``: a learned class token (std 0.02) is
  concatenated before patch tokens of larger scale, Pre-LN blocks follow and the
  head reads token 0 only. The gradient stays mostly on token 0, so each
  LayerNorm divides it by token 0's standard deviation, not the tensor's; the
  patch tokens receive only what attention spreads. With tensor-wide moments the
  estimate of the squared gradient norm at the ``cat`` was ~30x low and at the
  patch projection ~10x high.
- ``ops_routing._route_forward``: ``table[ids]`` on a parameter (learned
  positions, as Whisper's decoder reads them) moves the table's values; it used
  to fall to the unit-variance prior, so the LayerNorm after the embedding sum
  got a gain 1/var ~ 1 instead of ~1/0.0008.

Figures compared: the squared norm of dLoss/d(node) over that at the model
output (the estimator's ``sq_norm``), for the loss ``<output, r>`` with Gaussian
directions ``r``, averaged over seeds. Tolerance: 0.3 decade on the squared norm
(as ``tests/test_estimate_ops.py``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradscope.estimate.engine import estimate
from gradscope.tracing import trace_model

D, T, P, HEADS = 32, 24, 12, 4


class _Block(nn.Module):
    """Pre-LN Transformer block with small (std 0.02) projections, as Hugging Face inits."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        for lin in (self.q, self.k, self.v, self.o, self.fc1, self.fc2):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.ln1(x)
        q, k, v = (f(h).view(b, t, HEADS, D // HEADS).transpose(1, 2)
                   for f in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, D)
        x = x + self.o(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ClassTokenEncoder(nn.Module):
    """ViT-like: [class token; patch projections] + positions, Pre-LN blocks, head on token 0."""

    def __init__(self, blocks: int = 2) -> None:
        super().__init__()
        self.patch = nn.Linear(P, D)
        nn.init.normal_(self.patch.weight, std=0.1)
        nn.init.zeros_(self.patch.bias)
        self.cls = nn.Parameter(torch.randn(1, 1, D) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, T + 1, D) * 0.02)
        self.blocks = nn.ModuleList(_Block() for _ in range(blocks))
        self.ln = nn.LayerNorm(D)
        self.head = nn.Linear(D, 10)
        self.kept: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.patch(x)
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), patches], dim=1)
        self._keep("cat", h)
        self._keep("patches", patches)
        h = h + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h)[:, 0])

    def _keep(self, name: str, t: torch.Tensor) -> None:
        if t.requires_grad:
            t.retain_grad()
            self.kept[name] = t


class IndexedPositions(nn.Module):
    """Token embedding plus a position table read as ``table[ids]``, LayerNorm, head."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(50, D)
        self.table = nn.Parameter(torch.randn(T, D) * 0.02)
        nn.init.normal_(self.tok.weight, std=0.02)
        self.ln = nn.LayerNorm(D)
        self.head = nn.Linear(D, 10)
        self.kept: dict[str, torch.Tensor] = {}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
        h = self.tok(ids) + self.table[positions]
        if h.requires_grad:
            h.retain_grad()
            self.kept["sum"] = h
        return self.head(self.ln(h))


def _measured(model: nn.Module, inputs: tuple[torch.Tensor, ...], names: list[str],
              seeds: int = 8) -> dict[str, float]:
    """Squared gradient norm at each kept tensor over that at the output, autograd."""
    totals = dict.fromkeys(names, 0.0)
    out_total = 0.0
    for seed in range(seeds):
        model.zero_grad()
        out = model(*inputs)
        r = torch.randn(out.shape, generator=torch.Generator().manual_seed(100 + seed))
        (out * r).sum().backward()
        out_total += float((r * r).sum())
        for n in names:
            grad = model.kept[n].grad  # type: ignore[union-attr, index]
            totals[n] += float((grad * grad).sum())
    return {n: totals[n] / out_total for n in names}


def _node(traced: object, *, key: str | None = None, module: str | None = None) -> str:
    records = traced.records()  # type: ignore[attr-defined]
    found = [r.name for r in records if r.role == "compute"
             and (key is None or r.key == key) and (module is None or r.module == module)]
    assert found, (key, module)
    return str(found[0])


def _decades(a: float, b: float) -> float:
    return abs(math.log10(a / b))


@pytest.mark.parametrize("method", ["export", "runtime"])
def test_class_token_gradient_per_segment(method: str) -> None:
    torch.manual_seed(0)
    model = ClassTokenEncoder().train()
    x = torch.randn(4, T, P, generator=torch.Generator().manual_seed(1))
    measured = _measured(model, (x,), ["cat", "patches"])
    traced = trace_model(model, (x,), method=method)
    est = estimate(traced, (x,))
    cat = _node(traced, key="cat")
    patches = _node(traced, module="patch")
    predicted = {"cat": est.sq_norm[cat], "patches": est.sq_norm[patches]}
    # the gradient is concentrated on the class token: the cat's far exceeds the patches'
    assert measured["cat"] > 10 * measured["patches"]
    for name in ("cat", "patches"):
        assert _decades(predicted[name], measured[name]) <= 0.3, (name, predicted, measured)


def test_class_token_forward_moments_per_segment() -> None:
    """The tensor-wide moments are the share-weighted average of the parts' (exact)."""
    torch.manual_seed(0)
    model = ClassTokenEncoder(blocks=1).train()
    x = torch.randn(4, T, P, generator=torch.Generator().manual_seed(1))
    traced = trace_model(model, (x,))
    est = estimate(traced, (x,))
    with torch.no_grad():
        h = torch.cat([model.cls.expand(4, -1, -1), model.patch(x)], dim=1)
    mom = est.moments[_node(traced, key="cat")]
    assert mom is not None
    assert _decades(mom[1], float((h * h).mean())) <= 0.1


def test_position_table_read_by_index() -> None:
    torch.manual_seed(0)
    model = IndexedPositions().train()
    ids = torch.randint(0, 50, (4, T), generator=torch.Generator().manual_seed(2))
    measured = _measured(model, (ids,), ["sum"])
    traced = trace_model(model, (ids,))
    est = estimate(traced, (ids,))
    summed = _node(traced, key="add")
    mom = est.moments[summed]
    assert mom is not None
    with torch.no_grad():
        h = model.tok(ids) + model.table[torch.arange(T)]
    assert _decades(mom[1], float((h * h).mean())) <= 0.1, (mom, float((h * h).mean()))
    assert _decades(est.sq_norm[summed], measured["sum"]) <= 0.3, (est.sq_norm[summed],
                                                                   measured)


class GroupedExperts(nn.Module):
    """Mixture-of-experts rows: tokens sorted by expert times their expert's matrix.

    ``torch._grouped_mm`` (and Hugging Face's ``grouped_mm_fallback``, which MoE
    models use on the CPU) is a matmul per row; it used to be an unknown op that
    passed its input's moments through (q ~ 1 instead of K E[w^2] q), so the
    RMSNorm after Mixtral's expert sum got a gain ~400x too small in squared norm.
    """

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.Parameter(torch.randn(4, D, D) * 0.02)
        self.ln = nn.LayerNorm(D)
        self.head = nn.Linear(D, 10)
        self.kept: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offs = torch.tensor([8, 16, 24, 32], dtype=torch.int32)
        h = torch._grouped_mm(x, self.experts, offs=offs)
        if h.requires_grad:
            h.retain_grad()
            self.kept["experts"] = h
        return self.head(self.ln(x + h))


def test_grouped_matmul_is_a_matmul() -> None:
    torch.manual_seed(0)
    model = GroupedExperts().train()
    x = (torch.randn(32, D, generator=torch.Generator().manual_seed(3)) * 0.05).requires_grad_()
    measured = _measured(model, (x,), ["experts"])
    traced = trace_model(model, (x,))
    est = estimate(traced, (x,))
    node = _node(traced, key="matmul")
    mom = est.moments[node]
    assert mom is not None
    with torch.no_grad():
        h = torch._grouped_mm(x, model.experts, offs=torch.tensor([8, 16, 24, 32],
                                                                   dtype=torch.int32))
    assert _decades(mom[1], float((h * h).mean())) <= 0.1, (mom, float((h * h).mean()))
    assert _decades(est.sq_norm[node], measured["experts"]) <= 0.3, (est.sq_norm[node],
                                                                      measured)


class MaskedAttention(nn.Module):
    """Attention with causality as a boolean mask built from ``arange``, as HF decoders pass it."""

    def __init__(self) -> None:
        super().__init__()
        self.v = nn.Linear(D, D)
        self.head = nn.Linear(D, D)
        self.kept: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        pos = torch.arange(t)
        mask = (pos[None, :] <= pos[:, None])[None, None].expand(b, 1, t, t)
        v = self.v(x).view(b, t, HEADS, D // HEADS).transpose(1, 2)
        if v.requires_grad:
            v.retain_grad()
            self.kept["v"] = v
        # zero queries and keys: uniform attention over the keys each row sees
        zeros = torch.zeros_like(v)
        a = F.scaled_dot_product_attention(zeros, zeros, v, attn_mask=mask)
        return self.head(a.transpose(1, 2).reshape(b, t, D))


@pytest.mark.parametrize("method", ["export", "runtime"])
def test_causal_mask_tensor_counts_visible_keys(method: str) -> None:
    """Value-path gain A = mean over rows of 1/(i+1), not 1/T, under a causal mask tensor."""
    torch.manual_seed(0)
    model = MaskedAttention().train()
    x = torch.randn(4, 16, D, generator=torch.Generator().manual_seed(4))
    measured = _measured(model, (x,), ["v"])
    traced = trace_model(model, (x,), method=method)
    est = estimate(traced, (x,))
    sdpa = _node(traced, key="sdpa")
    v = traced.node(sdpa).args[2].name
    gain_predicted = est.sq_norm[v] / est.sq_norm[sdpa]
    assert _decades(est.sq_norm[v], measured["v"]) <= 0.2, (est.sq_norm[v], measured)
    assert abs(gain_predicted - sum(1 / (i + 1) for i in range(16)) / 16) < 0.05


class FunctionalEmbedding(nn.Module):
    """``F.embedding(ids, table)``: indices first, as torch writes it (aten: table first)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(50, D) * 0.02)
        self.head = nn.Linear(D, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(F.embedding(ids, self.table))


@pytest.mark.parametrize("method", ["symbolic_trace", "export", "runtime"])
def test_functional_embedding_reads_its_table(method: str) -> None:
    """The table is the second argument of F.embedding: read as the first (the indices),
    no table was found and the unit prior stood in (OPT's learned positions: 1.3 decades
    off downstream under the runtime recorder)."""
    torch.manual_seed(0)
    model = FunctionalEmbedding()
    ids = torch.randint(0, 50, (4, T), generator=torch.Generator().manual_seed(2))
    traced = trace_model(model, (ids,), method=method)
    est = estimate(traced, (ids,))
    mom = est.moments[_node(traced, key="embedding")]
    assert mom is not None
    with torch.no_grad():
        real = float(F.embedding(ids, model.table).pow(2).mean())
    assert _decades(mom[1], real) <= 0.1, (mom, real)

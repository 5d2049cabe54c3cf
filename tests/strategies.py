"""Hypothesis strategies that generate random PyTorch models (issue 8).

A drawn :class:`ModelSpec` is plain data (its ``repr`` pastes into ``@example``);
:func:`build` turns it into ``(model, inputs)`` with plain ``torch.nn`` code,
deterministically: weights come from ``torch.manual_seed(spec.seed)`` under
``torch.random.fork_rng`` (the global RNG is left as it was) and inputs from
their own ``torch.Generator``.

What the specs cover:

* layouts: vectors ``(B, W)``, ``Conv1d`` ``(B, C, L)``, ``Conv2d`` ``(B, C, S, S)``,
  float sequences ``(B, T, D)``, token ids through ``nn.Embedding`` (int64 or int32),
  and models with no parameters at all;
* blocks: ``Linear``, ``Conv1d``/``Conv2d``, ``nn.MultiheadAttention``,
  ``F.scaled_dot_product_attention`` (causal or masked), ``LSTM``/``GRU``/``RNN``
  (several layers, bidirectional, the last hidden state instead of the sequence),
  bare activations and dropout; each with an activation (relu, gelu, tanh,
  sigmoid, silu, leaky; in place where torch allows), a norm (BatchNorm1d/2d,
  LayerNorm, GroupNorm, none), dropout, a skip ``x + f(x)``, an in-place
  ``y.add_`` on an intermediate, and a repeat count (one module called several
  times);
* odd shapes: width/channels 1, batch 1, sequence length 1 (BatchNorm in train
  mode with a batch of 1 raises in torch: gradscope must turn that into one of its
  documented errors);
* extra inputs: a float vector, a padding mask (bool), a Python float, token type
  ids; float32 or float64 models;
* outputs: a tensor, a tuple, a dict (with or without ``logits``), an integer
  tensor first, nested containers;
* tied weights (same-shaped ``Linear``/``Conv`` weights shared, or the embedding
  reused as the output projection), buffers (a constant, a call counter and a
  running mean the forward updates in place), frozen parameters (some or all),
  data-dependent branches, train/eval mode of the model and of some submodules.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

ACTIVATIONS = ("relu", "gelu", "tanh", "sigmoid", "silu", "leaky")
INPLACE_ACTIVATIONS = ("relu", "silu", "leaky")
NORMS = ("none", "bn", "ln", "gn")
RECURRENT = ("lstm", "gru", "rnn")
FAMILIES = ("vector", "conv1d", "conv2d", "sequence", "tokens", "free")
OUTPUTS = ("tensor", "tuple", "dict", "dict_logits", "int_first", "nested")
EXTRAS = ("vector", "mask", "scalar", "type_ids")
BUFFERS = ("none", "const", "counter", "ema")
VOCAB = 11


@dataclass(frozen=True)
class BlockSpec:
    """One block; ``kind`` is dense, conv, mha, sdpa, lstm, gru, rnn, act or dropout."""

    kind: str
    width: int = 0
    act: str | None = None
    norm: str = "none"
    skip: bool = False
    dropout: float | None = None
    inplace: bool = False
    add_inplace: bool = False
    repeat: int = 1
    heads: int = 1
    kernel: int = 1
    layers: int = 1
    bidirectional: bool = False
    last: bool = False
    causal: bool = False
    need_weights: bool = False
    bias: bool = True

    def __repr__(self) -> str:
        return _short_repr(self)


@dataclass(frozen=True)
class ModelSpec:
    family: str
    batch: int = 2
    width: int = 3
    length: int = 3
    blocks: tuple[BlockSpec, ...] = ()
    head: int | None = 2
    extras: tuple[str, ...] = ()
    output: str = "tensor"
    tie: bool = False
    buffer: str = "none"
    frozen: str = "none"
    train: bool = True
    eval_modules: tuple[int, ...] = ()
    branch: bool = False
    dtype: str = "float32"
    id_dtype: str = "int64"
    seed: int = 0

    def __repr__(self) -> str:
        return _short_repr(self)


def _short_repr(obj: Any) -> str:
    """Only the fields that differ from their defaults: short enough for ``@example``."""
    parts = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.default is dataclasses.MISSING or value != f.default:
            parts.append(f"{f.name}={value!r}")
    return f"{type(obj).__name__}({', '.join(parts)})"


# ---------------------------------------------------------------------------
# Modules


def make_act(name: str | None, inplace: bool = False) -> nn.Module:
    if name is None:
        return nn.Identity()
    inplace = inplace and name in INPLACE_ACTIVATIONS
    if name == "relu":
        return nn.ReLU(inplace=inplace)
    if name == "gelu":
        return nn.GELU()
    if name == "tanh":
        return nn.Tanh()
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "silu":
        return nn.SiLU(inplace=inplace)
    if name == "leaky":
        return nn.LeakyReLU(0.1, inplace=inplace)
    raise ValueError(name)


def _groups(width: int) -> int:
    """The largest of 4, 2, 1 dividing ``width`` (GroupNorm needs it)."""
    return next(g for g in (4, 2, 1) if width % g == 0)


class Norm(nn.Module):
    """A norm over the channel axis of any layout (vec, conv1, conv2, seq)."""

    def __init__(self, kind: str, layout: str, width: int, length: int) -> None:
        super().__init__()
        self.transpose = layout == "seq" and kind in ("bn", "gn")
        if kind == "bn":
            self.norm: nn.Module = nn.BatchNorm2d(width) if layout == "conv2" else \
                nn.BatchNorm1d(width)
        elif kind == "ln":
            self.norm = nn.LayerNorm(length if layout in ("conv1", "conv2") else width)
        elif kind == "gn":
            self.norm = nn.GroupNorm(_groups(width), width)
        else:
            raise ValueError(kind)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.transpose:
            return self.norm(h.transpose(1, 2)).transpose(1, 2)
        return self.norm(h)


class Dense(nn.Module):
    """layer -> (add_ in place) -> norm -> activation -> dropout, with an optional skip."""

    def __init__(self, spec: BlockSpec, layout: str, w_in: int, length: int) -> None:
        super().__init__()
        if spec.kind == "conv":
            conv = nn.Conv2d if layout == "conv2" else nn.Conv1d
            self.layer: nn.Module = conv(w_in, spec.width, spec.kernel,
                                         padding=spec.kernel // 2, bias=spec.bias)
        else:
            self.layer = nn.Linear(w_in, spec.width, bias=spec.bias)
        self.norm = Norm(spec.norm, layout, spec.width, length) if spec.norm != "none" else None
        self.act = make_act(spec.act, spec.inplace)
        self.drop = nn.Dropout(spec.dropout) if spec.dropout is not None else None
        self.add_inplace = spec.add_inplace
        self.skip = spec.skip and w_in == spec.width

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.layer(h)
        if self.add_inplace:
            y.add_(0.25)
        if self.norm is not None:
            y = self.norm(y)
        y = self.act(y)
        if self.drop is not None:
            y = self.drop(y)
        return h + y if self.skip else y


class MHA(nn.Module):
    def __init__(self, spec: BlockSpec, width: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, spec.heads, dropout=spec.dropout or 0.0,
                                          batch_first=True, bias=spec.bias)
        self.need_weights = spec.need_weights
        self.skip = spec.skip
        self.causal = spec.causal

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        attn_mask = None
        if self.causal:
            t = h.shape[1]
            attn_mask = torch.ones(t, t, dtype=torch.bool, device=h.device).triu(1)
        y = self.attn(h, h, h, key_padding_mask=mask, need_weights=self.need_weights,
                      attn_mask=attn_mask)[0]
        return h + y if self.skip else y


class SDPA(nn.Module):
    def __init__(self, spec: BlockSpec, width: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width, bias=spec.bias)
        self.proj = nn.Linear(width, width, bias=spec.bias)
        self.heads = spec.heads
        self.causal = spec.causal
        self.p = spec.dropout or 0.0
        self.skip = spec.skip

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t = h.shape[0], h.shape[1]
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        q = q.reshape(b, t, self.heads, -1).transpose(1, 2)
        k = k.reshape(b, t, self.heads, -1).transpose(1, 2)
        v = v.reshape(b, t, self.heads, -1).transpose(1, 2)
        attn_mask = None if mask is None or self.causal else ~mask[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.p if self.training else 0.0,
                                           is_causal=self.causal)
        y = self.proj(o.transpose(1, 2).reshape(b, t, -1))
        return h + y if self.skip else y


class Recurrent(nn.Module):
    def __init__(self, spec: BlockSpec, width: int) -> None:
        super().__init__()
        cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[spec.kind]
        self.rnn = cls(width, spec.width, num_layers=spec.layers, batch_first=True,
                       bidirectional=spec.bidirectional, bias=spec.bias,
                       dropout=(spec.dropout or 0.0) if spec.layers > 1 else 0.0)
        self.lstm = spec.kind == "lstm"
        self.last = spec.last
        self.bidirectional = spec.bidirectional

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        res = self.rnn(h)
        if not self.last:
            return res[0]
        state = res[1][0] if self.lstm else res[1]
        if self.bidirectional:  # the last layer's two directions
            return torch.cat([state[-2], state[-1]], dim=-1)
        return state[-1]


class Net(nn.Module):
    """The generated model: stem -> blocks (some repeated) -> head -> output container."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec_family = spec.family
        self.output = spec.output
        self.branch = spec.branch
        self.extras = spec.extras
        layout = {"vector": "vec", "free": "vec", "conv1d": "conv1", "conv2d": "conv2",
                  "sequence": "seq", "tokens": "seq"}[spec.family]
        width, length = spec.width, spec.length
        self.emb = nn.Embedding(VOCAB, width) if spec.family == "tokens" else None
        self.type_emb = nn.Embedding(3, width) if "type_ids" in spec.extras and self.emb \
            else None
        self.extra_proj = nn.Linear(2, width) if "vector" in spec.extras else None
        self.extra_layout = layout
        self.blocks = nn.ModuleList()
        self.repeats: list[int] = []
        self.takes_mask: list[bool] = []
        for b in spec.blocks:
            block, out_layout, out_width = _make_block(b, layout, width, length)
            self.blocks.append(block)
            same = out_layout == layout and out_width == width
            self.repeats.append(b.repeat if same else 1)
            self.takes_mask.append(b.kind in ("mha", "sdpa"))
            layout, width = out_layout, out_width
        self.layout = layout
        if spec.buffer == "const":
            shape = {"conv1": (width, 1), "conv2": (width, 1, 1)}.get(layout, (width,))
            self.register_buffer("scale", torch.full(shape, 0.5))
        elif spec.buffer == "counter":
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        elif spec.buffer == "ema":
            self.register_buffer("running", torch.zeros(()))
        self.buffer = spec.buffer
        self.tied_head = spec.tie and self.emb is not None and width == spec.width
        flat = width * {"conv1": length, "conv2": length * length}.get(layout, 1)
        self.head = nn.Linear(flat, spec.head) if spec.head is not None and \
            not self.tied_head else None

    def run(self, x: torch.Tensor, *extra: Any) -> Any:
        ex = dict(zip(self.extras, extra, strict=True))
        mask = ex.get("mask")
        h = self.emb(x) if self.emb is not None else x
        if self.type_emb is not None:
            h = h + self.type_emb(ex["type_ids"])
        if self.extra_proj is not None:
            e = self.extra_proj(ex["vector"])
            if self.extra_layout == "seq":
                e = e.unsqueeze(1)
            elif self.extra_layout == "conv1":
                e = e.unsqueeze(-1)
            elif self.extra_layout == "conv2":
                e = e[:, :, None, None]
            h = h + e
        if "scalar" in ex:
            h = h * ex["scalar"]
        for block, repeat, takes_mask in zip(self.blocks, self.repeats, self.takes_mask,
                                             strict=True):
            for _ in range(repeat):
                h = block(h, mask) if takes_mask else block(h)
        if self.branch and float(h.mean()) > 0:  # data-dependent: no symbolic trace
            h = -h
        if self.buffer == "const":
            h = h * self.scale
        elif self.buffer == "counter":
            self.calls.add_(1)
        elif self.buffer == "ema":
            with torch.no_grad():
                self.running.mul_(0.9).add_(0.1 * h.detach().mean())
        if self.layout in ("conv1", "conv2"):
            h = h.flatten(1)
        if self.tied_head:
            assert self.emb is not None
            out = F.linear(h, self.emb.weight)
        elif self.head is not None:
            out = self.head(h)
        else:
            out = h
        if self.output == "tensor":
            return out
        if self.output == "tuple":
            return out, h
        if self.output == "dict":
            return {"hidden": h, "out": out}
        if self.output == "dict_logits":
            return {"hidden": h, "logits": out}
        if self.output == "int_first":
            return out.argmax(-1), out
        return (h.shape[0], {"features": [out, h]})  # nested, a non-tensor first


class Net0(Net):
    def forward(self, x: torch.Tensor) -> Any:
        return self.run(x)


class Net1(Net):
    def forward(self, x: torch.Tensor, a: Any) -> Any:
        return self.run(x, a)


class Net2(Net):
    def forward(self, x: torch.Tensor, a: Any, b: Any) -> Any:
        return self.run(x, a, b)


class Net3(Net):
    def forward(self, x: torch.Tensor, a: Any, b: Any, c: Any) -> Any:
        return self.run(x, a, b, c)


class Net4(Net):
    def forward(self, x: torch.Tensor, a: Any, b: Any, c: Any, d: Any) -> Any:
        return self.run(x, a, b, c, d)


#: forward takes exactly the model's inputs, as a symbolic tracer wants.
NETS: tuple[type[Net], ...] = (Net0, Net1, Net2, Net3, Net4)


def _make_block(b: BlockSpec, layout: str, width: int, length: int,
                ) -> tuple[nn.Module, str, int]:
    if b.kind in ("dense", "conv"):
        return Dense(b, layout, width, length), layout, b.width
    if b.kind == "mha":
        return MHA(b, width), layout, width
    if b.kind == "sdpa":
        return SDPA(b, width), layout, width
    if b.kind in RECURRENT:
        rec = Recurrent(b, width)
        out = b.width * (2 if b.bidirectional else 1)
        return rec, ("vec" if b.last else "seq"), out
    if b.kind == "act":
        return make_act(b.act, b.inplace), layout, width
    if b.kind == "dropout":
        return nn.Dropout(b.dropout or 0.0), layout, width
    raise ValueError(b.kind)


def _tie(model: nn.Module) -> None:
    """Share weights between same-shaped Linear (or Conv) layers: each uses the first's."""
    first: dict[tuple[type, tuple[int, ...]], nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            key = (type(m), tuple(m.weight.shape))
            if key in first:
                m.weight = first[key]
            else:
                first[key] = m.weight


def build(spec: ModelSpec) -> tuple[nn.Module, tuple[Any, ...]]:
    """The model and example inputs a spec describes (deterministic, global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = NETS[len(spec.extras)](spec)
    if spec.tie:
        _tie(model)
    dtype = getattr(torch, spec.dtype)
    model.to(dtype)
    params = list(dict.fromkeys(model.parameters()))
    if spec.frozen == "all":
        for p in params:
            p.requires_grad_(False)
    elif spec.frozen == "some":
        for p in params[1::2]:
            p.requires_grad_(False)
    model.train(spec.train)
    modules = list(model.modules())
    for i in spec.eval_modules:
        if i < len(modules):
            modules[i].train(not spec.train)
    g = torch.Generator().manual_seed(spec.seed + 1)
    b, w, n = spec.batch, spec.width, spec.length
    if spec.family == "tokens":
        x = torch.randint(0, VOCAB, (b, n), generator=g, dtype=getattr(torch, spec.id_dtype))
    elif spec.family in ("vector", "free"):
        x = torch.randn(b, w, generator=g, dtype=dtype)
    elif spec.family == "conv1d":
        x = torch.randn(b, w, n, generator=g, dtype=dtype)
    elif spec.family == "conv2d":
        x = torch.randn(b, w, n, n, generator=g, dtype=dtype)
    else:
        x = torch.randn(b, n, w, generator=g, dtype=dtype)
    inputs: list[Any] = [x]
    for extra in spec.extras:
        if extra == "vector":
            inputs.append(torch.randn(b, 2, generator=g, dtype=dtype))
        elif extra == "mask":
            mask = torch.rand(b, n, generator=g) < 0.3
            mask[:, 0] = False  # every row keeps one position to attend to
            inputs.append(mask)
        elif extra == "scalar":
            inputs.append(1.5)
        elif extra == "type_ids":
            inputs.append(torch.randint(0, 3, (b, n), generator=g))
    return model, tuple(inputs)


# ---------------------------------------------------------------------------
# Strategies

_small = st.integers(1, 5)


@st.composite
def _block(draw: st.DrawFn, layout: str, width: int, max_width: int) -> BlockSpec:
    kinds = {"vec": ["dense", "act", "dropout"],
             "conv1": ["conv", "act", "dropout"],
             "conv2": ["conv", "act", "dropout"],
             "seq": ["dense", "mha", "sdpa", "lstm", "gru", "rnn", "act"]}[layout]
    kind = draw(st.sampled_from(kinds))
    act = draw(st.sampled_from(ACTIVATIONS))
    inplace = draw(st.booleans())
    dropout = draw(st.sampled_from([None, 0.0, 0.1, 0.5]))
    if kind == "act":
        return BlockSpec("act", act=act, inplace=inplace)
    if kind == "dropout":
        return BlockSpec("dropout", dropout=dropout if dropout is not None else 0.5)
    skip = draw(st.booleans())
    bias = draw(st.booleans())
    if kind in ("dense", "conv"):
        out = draw(st.integers(1, max_width))
        return BlockSpec(kind, width=out, act=draw(st.sampled_from([None, act])),
                         norm=draw(st.sampled_from(NORMS)), skip=skip, dropout=dropout,
                         inplace=inplace, add_inplace=draw(st.booleans()),
                         repeat=draw(st.integers(1, 3)) if out == width else 1,
                         kernel=draw(st.sampled_from([1, 3])) if kind == "conv" else 1,
                         bias=bias)
    if kind in ("mha", "sdpa"):
        heads = draw(st.sampled_from([h for h in (1, 2, 4) if width % h == 0]))
        return BlockSpec(kind, heads=heads, skip=skip, dropout=dropout,
                         causal=draw(st.booleans()), need_weights=draw(st.booleans()),
                         repeat=draw(st.integers(1, 2)), bias=bias)
    last = draw(st.booleans())
    return BlockSpec(kind, width=draw(st.integers(1, max_width)), layers=draw(st.integers(1, 2)),
                     bidirectional=draw(st.booleans()), last=last, dropout=dropout, bias=bias)


@st.composite
def model_specs(draw: st.DrawFn, families: tuple[str, ...] = FAMILIES, max_blocks: int = 3,
                max_width: int = 6) -> ModelSpec:
    """A random :class:`ModelSpec` of one of ``families``."""
    family = draw(st.sampled_from(families))
    batch = draw(st.sampled_from([2, 1, 3, 4]))
    width = draw(st.integers(1, max_width))
    length = draw(st.integers(1, 4))
    layout = {"vector": "vec", "free": "vec", "conv1d": "conv1", "conv2d": "conv2",
              "sequence": "seq", "tokens": "seq"}[family]
    blocks: list[BlockSpec] = []
    w = width
    for _ in range(draw(st.integers(0 if family != "free" else 1, max_blocks))):
        if family == "free":
            b = draw(st.one_of(
                st.builds(BlockSpec, st.just("act"), act=st.sampled_from(ACTIVATIONS),
                          inplace=st.booleans()),
                st.builds(BlockSpec, st.just("dropout"), dropout=st.sampled_from([0.0, 0.5]))))
        else:
            b = draw(_block(layout, w, max_width))
        blocks.append(b)
        if b.kind in ("dense", "conv"):
            w = b.width
        elif b.kind in RECURRENT:
            w = b.width * (2 if b.bidirectional else 1)
            if b.last:
                layout = "vec"
    extras_allowed = ["vector", "scalar"]
    if family in ("sequence", "tokens"):
        extras_allowed.append("mask")
    if family == "tokens":
        extras_allowed.append("type_ids")
    if family == "free":
        extras_allowed = ["scalar"]
    extras = tuple(e for e in extras_allowed if draw(st.booleans()))
    has_head = (family != "free" and draw(st.booleans())) or family in ("conv1d", "conv2d")
    spec = ModelSpec(
        family=family, batch=batch, width=width, length=length, blocks=tuple(blocks),
        head=draw(st.integers(1, 4)) if has_head else None, extras=extras,
        output=draw(st.sampled_from(OUTPUTS)), tie=draw(st.booleans()),
        buffer=draw(st.sampled_from(BUFFERS)),
        frozen=draw(st.sampled_from(["none", "some", "all"])), train=draw(st.booleans()),
        eval_modules=tuple(draw(st.lists(st.integers(1, 8), max_size=2, unique=True))),
        branch=draw(st.integers(0, 9)) == 9,
        dtype=draw(st.sampled_from(["float32", "float64"])),
        id_dtype=draw(st.sampled_from(["int64", "int32"])) if family == "tokens" else "int64",
        seed=draw(st.integers(0, 2**16)))
    return spec


__all__ = ["BlockSpec", "ModelSpec", "build", "model_specs"]

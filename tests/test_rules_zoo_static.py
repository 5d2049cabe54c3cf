"""A zoo of tiny models: each gradient and architecture rule fires on one and not on its twin.

Every pair differs in exactly the property the rule is about (init scale,
skips, where the LayerNorm sits, a recurrent matrix's spectrum, width), so a
rule that fires on both or neither fails here. Fixes that change the model
must come verified: ``verified.after`` closer to 1 than ``verified.before``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import gradscope
from gradscope.report import Finding, Report
from gradscope.rules.health import log_distance
from gradscope.rules.registry import RULES

MODEL_CHANGES = {"activation", "normalization", "initialization", "residual_connection"}


def _mlp(depth: int, width: int, act: type[nn.Module] = nn.ReLU,
         std: Callable[[int], float] | None = None, bn: bool = False,
         bias: float = 0.0, d_in: int = 32, out: int = 8) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        lin = nn.Linear(d, width)
        if std is not None:
            nn.init.normal_(lin.weight, 0.0, std(d))
            nn.init.constant_(lin.bias, bias)
        layers += [lin, *([nn.BatchNorm1d(width)] if bn else []), act()]
        d = width
    layers.append(nn.Linear(d, out))
    return nn.Sequential(*layers)


def _he(fan: int) -> float:
    return math.sqrt(2.0 / fan)


class _Residual(nn.Module):
    """Kaiming ReLU blocks x + f(x); optionally Pre-LN'd or with a branch scale."""

    def __init__(self, blocks: int, scale: float = 1.0, norm: bool = False,
                 width: int = 64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(32, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
            for _ in range(blocks))
        for block in self.blocks:
            for m in block:
                if isinstance(m, nn.Linear):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                    nn.init.zeros_(m.bias)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(blocks)) if norm else None
        self.scale = scale
        self.out = nn.Linear(width, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for i, block in enumerate(self.blocks):
            h = self.norms[i](x) if self.norms is not None else x
            x = x + self.scale * block(h) if self.scale != 1.0 else x + block(h)
        return self.out(x)


class _RMSResidual(_Residual):
    """Pre-norm residual blocks with a hand-written RMSNorm (as in Llama): no norm module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
            x = x + block(h)
        return self.out(x)


class _Transformerish(nn.Module):
    """Hand-written blocks: LayerNorm(x + f(x)) (Post-LN) or x + f(LayerNorm(x)) (Pre-LN)."""

    def __init__(self, pre: bool, blocks: int = 4, d: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pre = pre
        self.inp = nn.Linear(16, d)
        self.mix = nn.ModuleList(nn.Linear(d, d) for _ in range(blocks))
        self.ff = nn.ModuleList(nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
                                for _ in range(blocks))
        self.n1 = nn.ModuleList(nn.LayerNorm(d) for _ in range(blocks))
        self.n2 = nn.ModuleList(nn.LayerNorm(d) for _ in range(blocks))
        self.final = nn.LayerNorm(d) if pre else nn.Identity()
        self.out = nn.Linear(d, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for mix, ff, n1, n2 in zip(self.mix, self.ff, self.n1, self.n2, strict=True):
            if self.pre:
                x = x + mix(n1(x))
                x = x + ff(n2(x))
            else:
                x = n1(x + mix(x))
                x = n2(x + ff(x))
        return self.out(self.final(x))


class _Recurrent(nn.Module):
    def __init__(self, kind: str, forget_bias: float | None = None, orthogonal: bool = False,
                 scale: float | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = getattr(nn, kind)(8, 32, batch_first=True)
        with torch.no_grad():
            if forget_bias is not None:
                for name, p in self.rnn.named_parameters():
                    if name.startswith("bias_ih"):
                        p[32:64].fill_(forget_bias)
                    elif name.startswith("bias_hh"):
                        p[32:64].zero_()
            if orthogonal:
                nn.init.orthogonal_(self.rnn.weight_hh_l0)
            if scale is not None:
                self.rnn.weight_hh_l0.mul_(scale)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class _BigThenNorm(nn.Module):
    """A first layer whose weights are ``scale`` x the default, hidden behind a LayerNorm."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(32, 64)
        self.n = nn.LayerNorm(64)
        self.b = nn.Linear(64, 64)
        self.c = nn.Linear(64, 8)
        with torch.no_grad():
            self.a.weight.mul_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.n(self.a(x))))))


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


#: name -> (model factory, input factory, probe?)
ZOO: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], bool]] = {
    "sigmoid_deep": (lambda: _mlp(10, 128, nn.Sigmoid), lambda: _x(64, 32), True),
    "relu_kaiming": (lambda: _mlp(6, 128, std=_he), lambda: _x(64, 32), True),
    "relu_kaiming_deep": (lambda: _mlp(12, 128, std=_he), lambda: _x(64, 32), False),
    "relu_large_init": (lambda: _mlp(12, 128, std=lambda d: 2 * _he(d)), lambda: _x(64, 32), True),
    "big_then_norm": (lambda: _BigThenNorm(1e3), lambda: _x(64, 32), True),
    "normal_then_norm": (lambda: _BigThenNorm(1.0), lambda: _x(64, 32), True),
    "bn_plain": (lambda: _mlp(16, 64, std=_he, bn=True), lambda: _x(64, 32), False),
    "residual_unscaled": (lambda: _Residual(8), lambda: _x(64, 32), False),
    "residual_scaled": (lambda: _Residual(8, scale=1 / math.sqrt(8)), lambda: _x(64, 32), False),
    "residual_normed": (lambda: _Residual(8, norm=True), lambda: _x(64, 32), False),
    "residual_rmsnorm": (lambda: _RMSResidual(8), lambda: _x(64, 32), False),
    "post_ln": (lambda: _Transformerish(pre=False), lambda: _x(64, 16), False),
    "pre_ln": (lambda: _Transformerish(pre=True), lambda: _x(64, 16), False),
    "narrow_deep": (lambda: _mlp(30, 16, std=_he), lambda: _x(64, 32), False),
    "wide_shallow": (lambda: _mlp(6, 256, std=_he), lambda: _x(64, 32), False),
    "lstm_long_default": (lambda: _Recurrent("LSTM"), lambda: _x(16, 60, 8), False),
    "lstm_long_bias3": (lambda: _Recurrent("LSTM", forget_bias=3.0), lambda: _x(16, 60, 8),
                        False),
    "lstm_short_default": (lambda: _Recurrent("LSTM"), lambda: _x(16, 4, 8), False),
    "lstm_short_bias1": (lambda: _Recurrent("LSTM", forget_bias=1.0), lambda: _x(16, 4, 8),
                         False),
    "rnn_contracting": (lambda: _Recurrent("RNN", scale=0.5), lambda: _x(16, 60, 8), False),
    "rnn_orthogonal": (lambda: _Recurrent("RNN", orthogonal=True), lambda: _x(16, 60, 8),
                       False),
}

_CACHE: dict[str, Report] = {}


def report(name: str) -> Report:
    if name not in _CACHE:
        build, inputs, probe = ZOO[name]
        _CACHE[name] = gradscope.analyze(build(), (inputs(),), device="cpu", probe=probe)
    return _CACHE[name]


def found(name: str, code: str) -> list[Finding]:
    return [f for f in report(name).findings if f.rule == code]


def _check_finding(finding: Finding) -> None:
    rule = RULES[finding.rule]
    assert finding.category == rule.category
    assert finding.location.node is not None or finding.location.module is not None
    for rec in finding.recommendations:
        if rec.kind in MODEL_CHANGES:
            assert rec.verified is not None, f"{finding.rule}: unverified {rec.kind} fix"
            if finding.rule != "GS703":  # GS703's figure is better lower, checked below
                assert log_distance(rec.verified.after) < log_distance(rec.verified.before)


#: (code, fires on, silent on, what must hold of the finding)
CASES: list[tuple[str, str, str, Callable[[Finding], Any] | None]] = [
    ("GS101", "sigmoid_deep", "relu_kaiming",
     lambda f: f.severity == "error" and f.evidence["gradient_ratio"] < 1e-3),
    ("GS102", "sigmoid_deep", "relu_kaiming", lambda f: f.severity == "error"),
    ("GS104", "big_then_norm", "normal_then_norm",
     lambda f: f.location.module == "a" and f.evidence["relative"] < 1e-3),
    ("GS201", "relu_large_init", "relu_kaiming",
     lambda f: f.evidence["gradient_ratio"] > 1e2),
    ("GS202", "relu_large_init", "relu_kaiming",
     lambda f: {r.kind for r in f.recommendations} >= {"gradient_clipping", "initialization"}),
    ("GS103", "lstm_long_default", "lstm_long_bias3",
     lambda f: f.location.module == "rnn" and f.evidence["steps"] == 60),
    ("GS701", "relu_kaiming_deep", "residual_normed",
     lambda f: f.severity == "info" and f.evidence["plain_layers"] == 13),
    ("GS702", "bn_plain", "residual_normed", lambda f: f.evidence["batchnorm_layers"] == 16),
    ("GS703", "post_ln", "pre_ln", lambda f: f.evidence["post_ln_blocks"] == 8),
    ("GS704", "residual_unscaled", "residual_scaled",
     lambda f: f.evidence["residual_blocks"] == 8),
    ("GS705", "sigmoid_deep", "relu_kaiming", lambda f: f.evidence["sigmoid_hidden"] == 10),
    ("GS706", "narrow_deep", "wide_shallow", lambda f: f.evidence["beta"] > 1.0),
    ("GS707", "rnn_contracting", "rnn_orthogonal", lambda f: f.evidence["spectral_norm"] < 1),
    ("GS708", "lstm_short_default", "lstm_short_bias1",
     lambda f: abs(f.evidence["forget_bias"]) < 0.25),
]


@pytest.mark.parametrize(("code", "trigger", "healthy", "holds"), CASES,
                         ids=[c[0] for c in CASES])
def test_rule_fires_on_its_model_and_not_on_the_twin(
        code: str, trigger: str, healthy: str, holds: Callable[[Finding], Any] | None) -> None:
    hits = found(trigger, code)
    assert hits, f"{code} did not fire on {trigger}: {[f.rule for f in report(trigger).findings]}"
    for finding in hits:
        _check_finding(finding)
        if holds is not None:
            assert holds(finding), finding
    assert not found(healthy, code), f"{code} fired on {healthy}"


def test_residual_scaled_and_normed_twins_are_healthy() -> None:
    for name in ("residual_scaled", "residual_normed", "residual_rmsnorm", "pre_ln",
                 "relu_kaiming"):
        assert report(name).status == "healthy", [f.rule for f in report(name).findings]


def test_vanishing_sigmoid_stack_gets_a_verified_activation_swap() -> None:
    (finding,) = found("sigmoid_deep", "GS101")
    swap = next(r for r in finding.recommendations if r.kind == "activation")
    assert swap.verified is not None
    assert swap.verified.before < 1e-3 and 0.3 < swap.verified.after < 3
    assert "ReLU" in swap.text and swap.code and "nn.ReLU()" in swap.code


def test_exploding_init_fix_brings_the_ratio_to_about_one() -> None:
    (finding,) = found("relu_large_init", "GS201")
    init = next(r for r in finding.recommendations if r.kind == "initialization")
    assert init.verified is not None and 0.5 < init.verified.after < 2
    assert "kaiming_normal_" in (init.code or "")


def test_clip_threshold_is_derived_from_the_probe() -> None:
    """The threshold cuts what it is meant to cut: below the global norm of the probe
    batches it clips, and it says how many (issue 14: 4.5e9 offered against 2.9e9)."""
    (finding,) = found("relu_large_init", "GS202")
    clip = next(r for r in finding.recommendations if r.kind == "gradient_clipping"
                and "clip_grad_norm_" in (r.code or ""))
    assert clip.code is not None
    max_norm = float(clip.code.split("max_norm=")[1].rstrip(")"))
    assert f"{max_norm:g}" in clip.text and max_norm > 0
    match = re.search(r"so it clips (\d+) of (\d+)", clip.text)
    assert match is not None, clip.text
    assert 1 <= int(match.group(1)) <= int(match.group(2))
    norms = [float(v) for v in re.findall(r"global norm was ([0-9.e+-]+) to ([0-9.e+-]+)",
                                          clip.text)[0]]
    assert max_norm < max(norms)


def test_no_clip_threshold_that_would_clip_nothing() -> None:
    """Where the healthy reference is above every measured batch norm, clipping at it would
    cut nothing: no threshold is offered."""
    from types import SimpleNamespace

    from gradscope.rules.exploding import clipping_fixes

    probe = SimpleNamespace(param_grad_norm={"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0},
                            param_grad_ratio={}, batch_grad_norms=[1.5, 1.9])
    traced = SimpleNamespace(order=lambda: ["a", "b", "c", "d"])
    analysis = SimpleNamespace(probe=probe, traced=traced)
    # reference: sqrt(4) x 1.0 = 2.0, above both batches' global norms
    assert not [r for r in clipping_fixes(analysis, 1.9)  # type: ignore[arg-type]
                if "clip_grad_norm_" in (r.code or "")]
    probe.batch_grad_norms = [1.5, 4.0]
    (clip,) = [r for r in clipping_fixes(analysis, 3.0)  # type: ignore[arg-type]
               if "clip_grad_norm_" in (r.code or "")]
    assert "max_norm=2)" in (clip.code or "") and "clips 1 of 2" in clip.text


def test_post_ln_fix_is_pre_ln_with_lower_last_layer_gradient() -> None:
    (finding,) = found("post_ln", "GS703")
    kinds = [r.kind for r in finding.recommendations]
    assert "warmup" not in kinds  # no --steps: no warmup length
    assert "--steps" in finding.message
    pre = next(r for r in finding.recommendations if r.kind == "normalization")
    assert pre.verified is not None and pre.verified.after < pre.verified.before / 1.1
    assert "norm_first=True" in (pre.code or "")


def test_forget_bias_fix_is_verified_by_a_new_unroll() -> None:
    (finding,) = found("lstm_long_default", "GS103")
    (fix,) = finding.recommendations
    assert fix.kind == "initialization" and fix.verified is not None
    assert fix.verified.after > 1e3 * fix.verified.before
    assert "bias[hidden:2 * hidden].fill_(1)" in (fix.code or "")


def test_unscaled_residual_fix_names_the_scale() -> None:
    (finding,) = found("residual_unscaled", "GS704")
    (fix,) = finding.recommendations
    assert fix.kind == "residual_connection" and "0.354" in fix.text
    assert fix.verified is not None and log_distance(fix.verified.after) < 0.3


def test_a_fix_that_does_not_help_is_not_offered() -> None:
    """A healthy Kaiming stack: re-initialising or adding skips cannot improve ~1."""
    (finding,) = found("relu_kaiming_deep", "GS701")
    assert not finding.recommendations

"""--meta: models built on the meta device, estimated from their declared initialisation."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import SAMPLE_DIR, cli_runner
from torch import nn

import gradscope
from gradscope.cli import main
from gradscope.errors import InputError
from gradscope.loading import load_target
from gradscope.meta import recording_init


def test_init_calls_are_recorded_by_their_documented_formula() -> None:
    declared: dict[int, tuple[float, float]] = {}
    with recording_init(declared):
        default = nn.Linear(64, 32)
        kaiming = nn.Linear(64, 32)
        nn.init.kaiming_normal_(kaiming.weight, nonlinearity="relu")
        nn.init.constant_(kaiming.bias, -0.5)
        normal = nn.Linear(8, 8)
        nn.init.normal_(normal.weight, mean=0.1, std=0.02)
        trunc = nn.Linear(8, 8)
        nn.init.trunc_normal_(trunc.weight, std=1.0, a=-1.0, b=1.0)
        ortho = nn.Linear(8, 16)
        nn.init.orthogonal_(ortho.weight, gain=2.0)
        embed = nn.Embedding(10, 4)
    assert all(p.is_meta for m in (default, kaiming, embed) for p in m.parameters())
    assert declared[id(default.weight)] == pytest.approx((0.0, 1 / (3 * 64)))  # a = sqrt(5)
    assert declared[id(kaiming.weight)] == pytest.approx((0.0, 2 / 64))
    assert declared[id(kaiming.bias)] == pytest.approx((-0.5, 0.25))
    assert declared[id(normal.weight)] == pytest.approx((0.1, 0.02 ** 2 + 0.01))
    # N(0, 1) truncated to [-1, 1]: variance 1 - 2 phi(1) / (2 Phi(1) - 1) = 0.2911
    assert declared[id(trunc.weight)] == pytest.approx((0.0, 0.29112), rel=1e-3)
    assert declared[id(ortho.weight)] == pytest.approx((0.0, 4.0 / 16))
    assert declared[id(embed.weight)] == pytest.approx((0.0, 1.0))


@pytest.mark.parametrize("name", ["deep_sigmoid_mlp", "large_init_mlp", "dead_relu_mlp",
                                  "resnet_bn", "pre_ln_transformer", "lstm"])
def test_meta_estimate_matches_the_estimate_from_real_weights(name: str) -> None:
    path = str(SAMPLE_DIR / f"{name}.py")
    real = load_target(path)
    meta = load_target(path, meta=True)
    assert all(p.is_meta for p in meta.model.parameters())
    a = gradscope.analyze(real.model, real.inputs, probe=False).summary["static_min_ratio"]
    b = gradscope.analyze(meta.model, meta.inputs, probe=False, meta=True,
                          declared=meta.declared).summary["static_min_ratio"]
    assert isinstance(a, float) and isinstance(b, float)
    if a == 0.0:  # dead ReLU net: no gradient at all, either way
        assert b == 0.0
    else:
        assert abs(math.log10(b / a)) < 0.3, (a, b)


def test_meta_factory_through_the_api_allocates_nothing() -> None:
    def build() -> nn.Module:
        return nn.Sequential(*[m for _ in range(30) for m in
                               (nn.Linear(4096, 4096, bias=False), nn.ReLU())])

    report = gradscope.analyze(build, (torch.randn(2, 4096),), meta=True)
    assert report.model.device == "meta"
    assert report.probe.enabled is False
    assert report.model.num_parameters == 30 * 4096 * 4096  # 2 GB in float32, never allocated
    # default init, ReLU: chi = 1/6 per layer -> vanishing predicted before anything runs
    assert "GS101" in {f.rule for f in report.findings}


def test_cli_meta_runs_static_only() -> None:
    result = cli_runner().invoke(main, ["analyze", str(SAMPLE_DIR / "relu_mlp_kaiming.py"),
                                        "--meta", "--json", "-"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert '"device": "meta"' in result.stdout
    assert '"enabled": false' in result.stdout


def test_data_dependent_forward_on_meta_is_a_clear_error() -> None:
    loaded = load_target(str(SAMPLE_DIR / "data_dependent.py"), meta=True)
    with pytest.raises(InputError) as info:
        gradscope.analyze(loaded.model, loaded.inputs, meta=True, declared=loaded.declared)
    assert "without --meta" in info.value.one_line()

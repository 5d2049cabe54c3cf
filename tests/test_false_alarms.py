"""Verdicts that hold on real architectures: each defect class found on the zoo
(``benchmarks/zoo/``), reduced to the smallest plain-torch model that shows it, with the
root-cause fix it needed. A model here trains from its initialisation; gradscope must not
call it unhealthy, and where it measures, the measurement must be what autograd says.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradscope


def _errors(report: gradscope.Report) -> list[str]:
    return [f"{f.rule}: {f.message}" for f in report.findings if f.severity == "error"]


# ------------------------------------------------------------------ off the differentiated path


class TwoHeads(nn.Module):
    """Hidden states as the output, plus a pooler head the loss never reaches (BertModel)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 32)
        self.body = nn.Linear(32, 32)
        self.pooler = nn.Linear(32, 32)

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = torch.relu(self.body(self.emb(ids)))
        return {"last_hidden_state": hidden,
                "pooler_output": torch.tanh(self.pooler(hidden[:, 0]))}


def test_a_layer_off_the_differentiated_path_is_not_judged() -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    report = gradscope.analyze(TwoHeads(), (ids,), device="cpu", output="last_hidden_state")
    assert "GS104" not in {f.rule for f in report.findings}, _errors(report)
    assert report.status == "healthy", report.findings
    pooler = [layer for layer in report.layers if layer.module == "pooler"]
    assert pooler and all(layer.health_class is None for layer in pooler)
    assert all("off the differentiated path" in (layer.health_note or "") for layer in pooler)
    # The head the loss does reach is judged as before.
    assert any(layer.health_class == "ok" for layer in report.layers)


# ------------------------------------------------------------------ an aliased output


class AliasedLogits(nn.Module):
    """Returns ``logits.float()`` on float32 logits: the same tensor (Mamba's LM head)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 32)
        self.body = nn.Linear(32, 32)
        self.head = nn.Linear(32, 64)

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.head(torch.relu(self.body(self.emb(ids)))).float()}


def test_an_aliased_output_is_still_measured() -> None:
    torch.manual_seed(0)
    model = AliasedLogits()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    report = gradscope.analyze(model, (ids,), device="cpu", batches=1)
    assert report.probe.output_grad_rms is not None and report.probe.output_grad_rms > 0
    assert not any("zero or non-finite" in n for n in report.notes), report.notes
    entry = next(layer for layer in report.layers if layer.health_class is not None)
    assert entry.health_source == "measured"
    # Against autograd: the embedding output's gradient norm over the logits', same loss.
    probe_direction = _probe_direction(model, ids)
    emb = model.emb(ids)
    emb.retain_grad()
    logits = model.head(torch.relu(model.body(emb)))
    logits.retain_grad()
    (logits * probe_direction).sum().backward()
    expected = float(emb.grad.norm() / logits.grad.norm())  # type: ignore[union-attr]
    assert math.isclose(entry.health_measured or 0.0, expected, rel_tol=1e-4)


def _probe_direction(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The fixed random direction of the probe's default loss for the first batch."""
    from gradscope.probe import _loss

    out = model(ids)["logits"].detach().requires_grad_(True)
    value, _ = _loss(out, (ids,), "dot", 0)
    (grad,) = torch.autograd.grad(value, [out])
    return grad


# ------------------------------------------------------------------ masked non-finite values


class MaskedLog(nn.Module):
    """log of positions that include 0, discarded by torch.where (T5's position buckets)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(16, 16)
        self.l2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[-1], dtype=x.dtype, device=x.device)
        buckets = torch.where(pos > 0, torch.log(pos), torch.zeros_like(pos))
        return self.l2(torch.relu(self.l1(x + buckets)))


def test_non_finite_values_that_never_reach_the_output_are_not_a_finding() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    report = gradscope.analyze(MaskedLog(), (x,), device="cpu")
    assert not {"GS501", "GS502"} & {f.rule for f in report.findings}, report.findings
    assert any("reached neither the output nor any gradient" in n for n in report.notes)
    assert report.probe.nonfinite_forward is None
    # The same log reaching the output is still GS501 (sample_models/nan_model.py too).

    class Unmasked(MaskedLog):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pos = torch.arange(x.shape[-1], dtype=x.dtype, device=x.device)
            return self.l2(torch.relu(self.l1(x + torch.log(pos))))

    bad = gradscope.analyze(Unmasked(), (x,), device="cpu")
    assert "GS501" in {f.rule for f in bad.findings}


# ------------------------------------------------------------------ zero-initialised by design


class ZeroHead(nn.Module):
    """torchvision's ViT: the classification head starts at zero."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU())
        self.head = nn.Linear(32, 10)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class ReZero(nn.Module):
    """x + alpha * f(x) with alpha = 0 (Bachlechner et al. 2020)."""

    def __init__(self, blocks: int = 4) -> None:
        super().__init__()
        self.stem = nn.Linear(16, 32)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)) for _ in range(blocks))
        self.alphas = nn.ParameterList(nn.Parameter(torch.zeros(())) for _ in range(blocks))
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for branch, alpha in zip(self.branches, self.alphas, strict=True):
            h = h + alpha * branch(h)
        return self.head(h)


def test_zero_initialised_layers_by_design_are_not_vanishing() -> None:
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    for model in (ZeroHead(), ReZero()):
        torch.manual_seed(0)
        report = gradscope.analyze(model, (x,), device="cpu")
        assert report.status == "healthy", [f.message for f in report.findings]
        assert any("zero-initialised layer(s)" in n for n in report.notes), report.notes
        behind = [layer for layer in report.layers
                  if "behind a zero-initialised layer" in (layer.health_note or "")]
        assert behind, "the layers behind the zero layer say why they are not judged"



# ------------------------------------------------------------------ language models


class WordLM(nn.Module):
    """pytorch/examples word_language_model: embedding, 2-layer LSTM, linear decoder."""

    def __init__(self, last_step_only: bool = False) -> None:
        super().__init__()
        self.encoder = nn.Embedding(128, 32)
        self.rnn = nn.LSTM(32, 32, 2)
        self.decoder = nn.Linear(32, 128)
        self.last_step_only = last_step_only
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        output, _ = self.rnn(self.encoder(ids))
        return self.decoder(output[-1] if self.last_step_only else output)


def test_a_language_model_over_many_steps_is_not_an_error() -> None:
    """Each step's prediction gives it a gradient of its own: GS103 is information then;
    a classifier reading the last step only still gets GS103 at full severity."""
    ids = torch.randint(0, 128, (60, 2), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    lm = gradscope.analyze(WordLM(), (ids,), device="cpu")
    gs103 = [f for f in lm.findings if f.rule == "GS103"]
    assert gs103 and all(f.severity == "info" for f in gs103), lm.findings
    assert not lm.fails("warning"), _errors(lm)
    torch.manual_seed(0)
    classifier = gradscope.analyze(WordLM(last_step_only=True), (ids,), device="cpu")
    (finding,) = [f for f in classifier.findings if f.rule == "GS103"]
    # Reading the last step only, over 60 steps: the gradient is below 1e-3 of the last
    # step's long before it has gone back 30 steps, most of the sequence is out of reach.
    assert finding.severity == "error", finding.message
    assert finding.evidence["reach_steps"] < 29.5


class GRUClassifier(nn.Module):
    """The everyday text classifier: embedding, 1-layer GRU, linear on the last state."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(512, 64)
        self.gru = nn.GRU(64, 64, batch_first=True)
        self.head = nn.Linear(64, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        _, h = self.gru(self.embed(ids))
        return self.head(h[-1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_short_gru_classifier_is_not_a_through_time_alarm(seed: int) -> None:
    """16 tokens, default init: the first token gets ~1e-3 of the last one's gradient
    (measured by autograd too), but the gradient reaches back most of the sequence above
    the error threshold, and the shared weights train on every step. An error failed CI on
    a textbook model; GS103 is information with the reach, whatever the seed."""
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    report = gradscope.analyze(GRUClassifier(), (ids,), device="cpu", seed=seed)
    assert not report.fails("warning"), _errors(report)
    gs103 = [f for f in report.findings if f.rule == "GS103"]
    for finding in gs103:
        assert finding.severity == "info", finding.message
        assert finding.evidence["reach_steps"] >= 7.5
    # Brute force, what the warning stands on: halfway back (step 7 of 0..15) the gradient
    # reaching the embeddings is still above the error threshold of the last step's.
    torch.manual_seed(seed)
    model = GRUClassifier()
    emb = model.embed(ids).detach().requires_grad_(True)
    _, h = model.gru(emb)
    model.head(h[-1]).sum().backward()
    assert emb.grad is not None
    assert float(emb.grad[:, 7].norm() / emb.grad[:, -1].norm()) > 1e-3


class ViewedWordLM(nn.Module):
    """PyTorch's word-language-model example: a 2-layer LSTM over 35 time-first steps whose
    output is viewed to (steps x batch, vocab) before the loss, one prediction per token."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Embedding(512, 64)
        self.rnn = nn.LSTM(64, 64, 2)
        self.decoder = nn.Linear(64, 512)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        output, _ = self.rnn(self.encoder(ids))
        return F.log_softmax(self.decoder(output).view(-1, 512), dim=1)


@pytest.mark.parametrize("tracer", ["symbolic_trace", "runtime"])
def test_a_language_model_that_views_its_steps_is_not_a_through_time_alarm(
        tracer: str) -> None:
    """The loss reads every step, through a view that merges steps and batch. GS103 was an
    error under the runtime recorder: the merged (70, 512) rows did not count as "every
    step", and the recorder's LSTM node (its output tuple unpacked without a getitem) read
    as "gradient at the last step only"."""
    ids = torch.randint(0, 512, (35, 2), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    report = gradscope.analyze(ViewedWordLM(), (ids,), device="cpu", tracer=tracer)
    gs103 = [f for f in report.findings if f.rule == "GS103"]
    assert gs103, "the 35-step LSTM's horizon is reported"
    for finding in gs103:
        assert finding.severity == "info", finding.message
        assert "The loss reads every step" in finding.message


# ------------------------------------------------------------------ a forward that marks its input


class MarksItsInput(nn.Module):
    """Wav2Vec2's feature encoder: ``x = x[:, None]; x.requires_grad = True`` in training."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 8, 5, stride=2)
        self.head = nn.Linear(8, 4)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        x = wave[:, None]
        if self.training:
            x.requires_grad = True
        return self.head(torch.relu(self.conv(x)).mean(-1))


def test_a_forward_that_marks_its_input_is_probed() -> None:
    torch.manual_seed(0)
    wave = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    # The runtime recorder re-runs the model's own forward (symbolic tracing drops the
    # attribute assignment; Wav2Vec2 falls back to the recorder).
    report = gradscope.analyze(MarksItsInput(), (wave,), device="cpu", tracer="runtime")
    assert report.probe.batches == 3 and report.probe.output_grad_rms
    assert any("sets requires_grad on its own input" in n for n in report.notes)
    assert report.layer("conv").param_grad_ratio is not None


# ------------------------------------------------------------------ concatenations are skips


class DenseStack(nn.Module):
    """DenseNet's pattern: each layer's output concatenated to its input (Huang et al. 2017)."""

    def __init__(self, layers: int = 14, growth: int = 8) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(16 + i * growth, growth), nn.ReLU()) for i in range(layers))
        self.head = nn.Linear(16 + layers * growth, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.cat([x, layer(x)], dim=-1)
        return self.head(x)


def test_concatenations_that_bypass_layers_are_skips() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    report = gradscope.analyze(DenseStack(), (x,), device="cpu", probe=False)
    assert "GS701" not in {f.rule for f in report.findings}, report.findings
    assert report.summary["concat_skips"] == 14
    assert report.summary["longest_plain_run"] <= 2


# ------------------------------------------------------------------ scale-invariant normalisation


class BnIntoBn(nn.Module):
    """DenseNet's stem: BatchNorm, ReLU, max-pool, then only BatchNorms read it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU(), nn.MaxPool2d(2))
        self.a = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.b = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([x, self.a(x)], dim=1)
        return self.head(self.b(x).mean((2, 3)))


def test_a_scale_the_next_normalisation_divides_out_is_not_imbalanced() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    report = gradscope.analyze(BnIntoBn(), (x,), device="cpu")
    stem_bn = report.layer("stem_1")
    assert stem_bn.param_grad_ratio is not None and stem_bn.param_grad_ratio < 1e-5
    assert "GS104" not in {f.rule for f in report.findings}, report.findings


# ------------------------------------------------------------------ lazy modules


def test_a_lazy_model_is_analysed_on_an_initialised_copy() -> None:
    from torch.nn.parameter import is_lazy

    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(32), nn.ReLU(), nn.LazyLinear(4))
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    state = torch.random.get_rng_state()
    report = gradscope.analyze(model, (x,), device="cpu")
    assert report.status == "healthy", report.findings
    assert any("lazy (uninitialised) parameters" in n for n in report.notes)
    assert all(is_lazy(p) for p in model.parameters()), "the user's model stays lazy"
    assert torch.equal(torch.random.get_rng_state(), state), "the caller's RNG did not move"


# ------------------------------------------------------------------ an unused output of chunk


class UnusedChunk(nn.Module):
    """A hand-written GRU-style gate split where one chunk is never read."""

    def __init__(self) -> None:
        super().__init__()
        self.gates = nn.Linear(16, 48)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, z, _unused = self.gates(x).chunk(3, dim=-1)
        return self.head(torch.sigmoid(r) * torch.tanh(z))


def test_an_unused_output_of_a_multi_output_op_does_not_break_the_probe() -> None:
    """Autograd calls a tensor hook with None for an output nothing reads; the probe used
    to fail on it (an internal error on a model that trains)."""
    torch.manual_seed(0)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    report = gradscope.analyze(UnusedChunk(), (x,), device="cpu")
    assert report.probe is not None and report.probe.enabled, report.notes
    assert not report.fails("error"), _errors(report)


# ------------------------------------------------------ an encoder read through cross-attention


class CrossAttentionOnly(nn.Module):
    """An encoder-decoder in miniature: the encoder reaches the loss only as the keys and
    values of the decoder's cross-attention (Whisper, T5, BART)."""

    def __init__(self, width: int = 32, keys: int = 32) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, width), nn.GELU(), nn.Linear(width, width))
        self.query_norm = nn.LayerNorm(width)
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.embed = nn.Embedding(64, width)
        self.head = nn.Linear(width, 64)
        self.keys = keys

    def forward(self, frames: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        memory = self.encoder(frames)
        x = self.embed(ids)
        attended = nn.functional.scaled_dot_product_attention(
            self.q(self.query_norm(x)), self.k(memory), self.v(memory))
        return self.head(x + attended)


def _cross_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 32, 16, generator=g), torch.randint(0, 64, (2, 8), generator=g)


def test_an_encoder_read_through_cross_attention_is_not_vanishing() -> None:
    """The value path of attention is a mean over the keys at initialisation: it divides
    the gradient's squared norm by about the number of keys, as average pooling does, by
    design. Whisper's encoder (3.2e-3 measured) was a GS101/GS102 warning for it."""
    torch.manual_seed(0)
    model = CrossAttentionOnly()
    report = gradscope.analyze(model, _cross_inputs(), device="cpu")
    vanishing = [f for f in report.findings if f.rule in ("GS101", "GS102", "GS104")]
    assert not vanishing, [f.message for f in vanishing]
    # Brute force: through the attention core alone, the value path's squared-norm gain
    # is the structural gain the estimate divides out (A = E[sum p^2], ~1/keys here).
    frames, ids = _cross_inputs()
    with torch.no_grad():
        memory = model.encoder(frames)
        q = model.q(model.query_norm(model.embed(ids)))
        k = model.k(memory)
    v = model.v(memory).detach().requires_grad_(True)
    out = nn.functional.scaled_dot_product_attention(q, k, v)
    direction = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * direction).sum().backward()
    assert v.grad is not None
    measured = float(v.grad.square().sum() / direction.square().sum())
    from gradscope.estimate.engine import estimate
    from gradscope.tracing import trace_model

    traced = trace_model(model, _cross_inputs())
    est = estimate(traced, _cross_inputs())
    (sdpa,) = [n for n in est.structural if traced.node(n).family == "attention"]
    (value,) = [n for n in traced.graph.predecessors(sdpa) if traced.node(n).module == "v"]
    predicted = est.structural[value] / est.structural[sdpa]
    assert abs(math.log10(predicted / measured)) < 0.15, (predicted, measured)


def test_a_layer_that_reaches_the_loss_only_through_attention_scores_is_a_side_path() -> None:
    """The LayerNorm before a cross-attention's query projection reaches the loss only
    through the scores: weak under a flat softmax by design, so not judged by GS104
    (Whisper's decoder encoder_attn_layer_norm was a GS104 warning on two seeds of five)."""
    from gradscope.rules.analysis import structural_facts
    from gradscope.tracing import trace_model

    torch.manual_seed(0)
    traced = trace_model(CrossAttentionOnly(), _cross_inputs())
    side = structural_facts(traced).score_side
    modules = {traced.node(n).module for n in side}
    assert "query_norm" in modules and "q" in modules, modules
    assert not modules & {"encoder.0", "encoder.2", "v", "embed", "head"}, modules

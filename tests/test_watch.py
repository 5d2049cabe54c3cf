"""gradscope.watch: each recorded figure against a brute-force autograd computation of the same
step, the training left exactly as it would be without the watch, every hook removed, and the
first non-finite step found."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import nn

import gradscope
from gradscope.steps import TrainingRecord


def _mlp(act: type[nn.Module] = nn.ReLU) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), act(), nn.Linear(32, 32), act(), nn.Linear(32, 4))


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 12, generator=gen), torch.randint(0, 4, (16,), generator=gen))
            for _ in range(n)]


def _learnable(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches whose labels a linear teacher gives: a loss that can fall, unlike _batches'."""
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(12, 4, generator=gen)
    out = []
    for _ in range(n):
        x = torch.randn(16, 12, generator=gen)
        out.append((x, (x @ teacher).argmax(1)))
    return out


def _replay(batches: list[tuple[torch.Tensor, torch.Tensor]], calls: list[int]) -> Any:
    """``replay(model, step)`` over ``batches``, recording each step it is asked for."""
    def replay(copy_: nn.Module, step: int) -> torch.Tensor:
        calls.append(step)
        x, y = batches[step]
        return nn.functional.cross_entropy(copy_(x), y)

    return replay


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches: list[Any],
           watch: Any = None) -> list[float]:
    losses = []
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x), y)
        if watch is not None:
            watch.loss(loss)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses


def _no_hooks(model: nn.Module, opt: torch.optim.Optimizer) -> bool:
    modules = all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    return modules and not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_watch_does_not_change_training(optim: str) -> None:
    """The same weights and losses, bit for bit, with and without the watch."""
    batches = _batches(12)
    runs = []
    for watched in (False, True):
        model = _mlp()
        opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if optim == "sgd"
               else torch.optim.Adam(model.parameters(), lr=1e-3))
        if watched:
            with gradscope.watch(model, opt, every=3, horizon=10) as watch:
                losses = _train(model, opt, batches, watch)
            assert watch.record.steps == 10
        else:
            losses = _train(model, opt, batches)
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        assert torch.equal(a, b)


def test_hooks_removed_at_horizon_and_close() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, opt, every=2, horizon=4) as watch:
        _train(model, opt, _batches(2), watch)
        assert any(m._forward_hooks for m in model.modules())  # armed for step 2
        _train(model, opt, _batches(1), watch)
        assert all(not m._forward_hooks for m in model.modules())  # step 3: not recorded
        _train(model, opt, _batches(3), watch)
        # past the horizon: no module hook, no pre-hook; the post-hook waits for close
        assert all(not m._forward_hooks for m in model.modules())
        assert not opt._optimizer_step_pre_hooks
    assert _no_hooks(model, opt)
    assert watch.record.steps == 4
    assert [r.step for r in watch.record.recorded] == [0, 2]


def test_hooks_removed_when_the_loop_raises() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="boom"), gradscope.watch(model, opt):
        _train(model, opt, _batches(2))
        raise RuntimeError("boom")
    assert _no_hooks(model, opt)


def _brute_force_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      opt: torch.optim.Optimizer) -> dict[str, Any]:
    """One step with every module output retained: the figures the watch must report."""
    outs: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if name and next(module.children(), None) is None:
            def keep(_m: nn.Module, _a: Any, out: torch.Tensor, name: str = name) -> None:
                out.retain_grad()
                outs[name] = out
            handles.append(module.register_forward_hook(keep))
    out = model(x)
    out.retain_grad()
    loss = nn.functional.cross_entropy(out, y)
    opt.zero_grad()
    loss.backward()
    for h in handles:
        h.remove()
    out_rms = float(out.grad.double().pow(2).mean().sqrt())
    before = {n: [p.detach().clone().double() for p in m.parameters(recurse=False)]
              for n, m in model.named_modules() if n and list(m.parameters(recurse=False))}
    grads = {n: [p.grad.detach().clone().double() for p in m.parameters(recurse=False)]
             for n, m in model.named_modules() if n and list(m.parameters(recurse=False))}
    total = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()))
    opt.step()
    after = {n: [p.detach().clone().double() for p in m.parameters(recurse=False)]
             for n, m in model.named_modules() if n and list(m.parameters(recurse=False))}
    figures: dict[str, Any] = {"total": total, "loss": float(loss), "layers": {}}
    for name, o in outs.items():
        layer: dict[str, float] = {
            "grad_rms": float(o.grad.double().pow(2).mean().sqrt()) / out_rms}
        if name in before:
            w = math.sqrt(sum(float(t.pow(2).sum()) for t in before[name]))
            g = math.sqrt(sum(float(t.pow(2).sum()) for t in grads[name]))
            u = math.sqrt(sum(float((a - b).pow(2).sum())
                              for a, b in zip(after[name], before[name], strict=True)))
            layer.update(weight_norm=w, weight_grad_norm=g, update_ratio=u / w)
        if isinstance(model.get_submodule(name), nn.ReLU):
            layer["dead_fraction"] = 1.0 - float((o.detach() > 0).any(dim=0).double().mean())
        if isinstance(model.get_submodule(name), nn.Sigmoid):
            s = o.detach().double()
            layer["saturated_fraction"] = float((s * (1 - s) < 0.0025).double().mean())
        figures["layers"][name] = layer
    return figures


@pytest.mark.parametrize("act", [nn.ReLU, nn.Sigmoid])
def test_recorded_figures_equal_brute_force(act: type[nn.Module]) -> None:
    batches = _batches(5)
    model = _mlp(act)
    twin = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-2)
    with gradscope.watch(model, opt, every=2, horizon=5) as watch:
        _train(model, opt, batches, watch)
    expected = [_brute_force_step(twin, x, y, twin_opt) for x, y in batches]
    record = watch.record
    assert [r.step for r in record.recorded] == [0, 2, 4]
    for i, want in enumerate(expected):
        assert record.grad_norms[i] == pytest.approx(want["total"], rel=1e-5)
        assert record.losses[i] == pytest.approx(want["loss"], rel=1e-6)
    checked = 0
    for rec in record.recorded:
        want = expected[rec.step]["layers"]
        assert set(rec.layers) == set(want)
        for name, layer in rec.layers.items():
            for field, value in want[name].items():
                assert getattr(layer, field) == pytest.approx(value, rel=1e-4, abs=1e-12), \
                    (rec.step, name, field)
                checked += 1
    assert checked >= 3 * (5 + 3 * 3 + 2)


def test_first_nonfinite_step_and_module() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = _batches(8)
    batches[5] = (batches[5][0].clone(), batches[5][1])
    batches[5][0][0, 0] = math.inf  # an overflowing input at step 5
    with gradscope.watch(model, opt, every=4, horizon=8) as watch:
        for x, y in batches:
            loss = nn.functional.cross_entropy(model(x), y)
            watch.loss(loss)
            if not math.isfinite(float(loss)):
                break  # as careful loops do: no step on a non-finite loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    record = watch.record
    assert record.first_nonfinite_step == 5
    findings = watch.findings()
    assert [f.rule for f in findings if f.severity == "error"] == ["GS503"]
    assert "step 5" in findings[0].message


def test_nonfinite_gradient_names_its_module() -> None:
    class Sqrt(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.abs().sqrt()  # infinite derivative at 0

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), Sqrt(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.watch(model, opt, every=1, horizon=3) as watch:
        for step in range(3):
            x = torch.randn(8, 4)
            if step == 1:
                with torch.no_grad():
                    model[0].weight.zero_()
                    model[0].bias.zero_()
            loss = model(x).sum()
            watch.loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
    record = watch.record
    assert record.first_nonfinite_step == 1
    assert record.first_nonfinite_modules[:1] == ("0",)
    assert record.recorded[1].layers["0"].nonfinite_grad


def test_loss_after_the_step() -> None:
    """A callback that sees the loss after the optimizer stepped hands it to that step."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    with gradscope.watch(model, opt, every=5, horizon=4) as watch:
        for x, y in _batches(4):
            loss = nn.functional.cross_entropy(model(x), y)
            seen.append(float(loss.detach()))
            opt.zero_grad()
            loss.backward()
            opt.step()
            watch.loss(loss, step=watch.step - 1)
    assert watch.record.losses == pytest.approx(seen, rel=1e-6)  # each at its own step


def test_record_round_trips_through_json() -> None:
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with gradscope.watch(model, opt, every=2, horizon=6) as watch:
        _train(model, opt, _batches(6), watch)
    doc = watch.record.to_dict()
    again = TrainingRecord.from_dict(doc)
    assert again.to_dict() == doc


def test_report_json_and_renderers(tmp_path: Any) -> None:
    import json

    import jsonschema

    from gradscope.render import write_html
    from gradscope.schema import load_schema

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, opt, every=2, horizon=6, name="mlp") as watch:
        _train(model, opt, _batches(6), watch)
    report = watch.report()
    report.write_json(tmp_path / "w.json")
    write_html(report, tmp_path / "w.html")
    report.write_sarif(tmp_path / "w.sarif")
    assert json.loads((tmp_path / "w.sarif").read_text())["version"] == "2.1.0"
    doc = json.loads((tmp_path / "w.json").read_text())
    jsonschema.validate(doc, load_schema())
    assert doc["steps"]["steps"] == 6
    assert doc["model"]["trace"]["method"] == "watch"
    html = (tmp_path / "w.html").read_text()
    assert "Training steps" in html and "Loss per step" in html
    assert "Depth profile" not in html  # no before-training layers to plot
    assert "Op coverage" not in html and "static analysis only" not in html
    assert "6 optimizer step(s) of sgd" in html
    from gradscope.render.terminal import render_terminal

    text = render_terminal(doc, False)
    assert "watched     6 step(s) of sgd" in text
    assert "trace" not in text.split("findings")[0]


def test_analyze_report_writes_its_files(tmp_path: Any) -> None:
    """docs/contract.md section 3: report.write_html / write_json / write_sarif."""
    import json

    report = gradscope.analyze(_mlp(), torch.randn(8, 12))
    report.write_json(tmp_path / "r.json")
    report.write_html(tmp_path / "r.html")
    report.write_sarif(tmp_path / "r.sarif")
    assert json.loads((tmp_path / "r.json").read_text())["status"] == report.status
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")
    assert json.loads((tmp_path / "r.sarif").read_text())["runs"]


def test_replay_verifies_loop_advice_on_copies() -> None:
    """A diverging run (SGD at 5.0): the advice offered is what trained a copy of it to a
    finite, lower loss with no finding of its own, with that measurement; the run itself
    is not touched by the trials."""
    batches = _learnable(40)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    calls: list[int] = []
    replay = _replay(batches, calls)

    with gradscope.watch(model, opt, every=10, horizon=40, replay=replay) as watch:
        for x, y in batches:
            loss = nn.functional.cross_entropy(model(x), y)
            watch.loss(loss)
            if not math.isfinite(float(loss.detach())):
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
    weights = [p.detach().clone() for p in model.parameters()]
    findings = watch.findings()
    assert watch.record.first_nonfinite_step is not None
    assert "GS503" in [f.rule for f in findings]
    advised = [r for f in findings for r in f.recommendations]
    assert advised, "no loop change trained the copy better"
    # the copies really trained: a lower rate ends well below chance (ln 4 = 1.39)
    assert min(r.measured.after for r in advised if r.measured) < 1.2
    for rec in advised:
        assert rec.measured is not None and math.isfinite(rec.measured.after)
        assert rec.measured.after < rec.measured.before
        assert rec.action is not None and rec.action["op"] in (
            "learning_rate", "clip_grad_norm", "warmup")
    assert calls  # the trials ran through the user's replay
    from gradscope.render.html import render_html
    from gradscope.render.terminal import render_terminal

    doc = watch.report().to_dict()
    assert "measured: " in render_html(doc)  # the measurement the advice is offered with
    assert "(measured: " in render_terminal(doc, False)
    assert all(torch.equal(a, p) for a, p in zip(weights, model.parameters(), strict=True))
    assert watch.findings() is findings  # judged once


def test_replay_is_not_called_for_a_healthy_run() -> None:
    batches = _learnable(30)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    calls: list[int] = []
    replay = _replay(batches, calls)

    with gradscope.watch(model, opt, every=10, horizon=30, replay=replay) as watch:
        _train(model, opt, batches, watch)
    assert [f for f in watch.findings() if f.severity != "info"] == []
    assert calls == []


def test_output_is_the_logits_not_the_loss() -> None:
    """A model returning {"loss", "logits"} (Hugging Face's ModelOutput is such a Mapping):
    gradient health is relative to the logits' gradient, as the probe's is."""

    class WithLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp()

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
            logits = self.net(x)
            return {"loss": nn.functional.cross_entropy(logits, y), "logits": logits}

    model = WithLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (x, y), = _batches(1)
    with gradscope.watch(model, opt, every=1, horizon=1) as watch:
        out = model(x, y)
        out["logits"].retain_grad()
        out["loss"].backward()
        want = float(out["logits"].grad.double().pow(2).mean().sqrt())
        opt.step()
    got = watch.record.recorded[0].output_grad_rms
    assert got == pytest.approx(want, rel=1e-6)


def test_model_forward_never_called_falls_back_to_the_last_module() -> None:
    """A Lightning module whose training_step calls self.net(x), not self(x)."""

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp()

    model = Outer()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, opt, every=1, horizon=2) as watch:
        _train(model.net, opt, _batches(2), watch)
    step = watch.record.recorded[0]
    assert step.output_grad_rms is not None
    assert step.layers["net.4"].grad_rms == pytest.approx(1.0)  # the last module: the output
    assert all(layer.grad_rms is not None for name, layer in step.layers.items())


def test_grad_scaler_steps_are_the_unscaled_ones() -> None:
    """GradScaler.step unscales before the optimizer's step: the same gradient norms and
    health ratios as without it (a power-of-two scale is exact in float32)."""
    records = []
    for scaled in (False, True):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        with gradscope.watch(model, opt, every=2, horizon=4) as watch:
            for x, y in _batches(4):
                loss = nn.functional.cross_entropy(model(x), y)
                watch.loss(loss)
                opt.zero_grad()
                if scaled:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
        records.append(watch.record)
    plain, scaled_record = records
    assert scaled_record.grad_norms == pytest.approx(plain.grad_norms, rel=1e-6)
    for a, b in zip(plain.recorded, scaled_record.recorded, strict=True):
        for name in a.layers:
            assert b.layers[name].grad_rms == pytest.approx(a.layers[name].grad_rms, rel=1e-5)


def test_order_is_the_forward_order() -> None:
    class Backwards(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(16, 4)   # registered first, runs last
            self.body = nn.Linear(12, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.body(x)))

    model = Backwards()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, opt, every=1, horizon=1) as watch:
        _train(model, opt, _batches(1), watch)
    assert watch.record.order == ("body", "head")
    from gradscope.steps import input_layer

    assert input_layer(watch.record) == "body"


@pytest.mark.slow
def test_healthy_hugging_face_training_raises_no_warning() -> None:
    """Real architectures trained briefly and healthily (BERT MLM, Llama, AdamW on text):
    no warning or error from the rules over steps."""
    import inspect
    import json as json_module

    transformers = pytest.importorskip("transformers")
    text = inspect.getsource(json_module.decoder) + inspect.getsource(json_module.encoder)
    vocab = {c: i + 1 for i, c in enumerate(sorted(set(text)))}
    ids = torch.tensor([vocab[c] for c in text])
    size = len(vocab) + 2
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, max_position_embeddings=64)
    builds = {
        "bert": lambda: transformers.BertForMaskedLM(
            transformers.BertConfig(vocab_size=size, **small)),
        "llama": lambda: transformers.LlamaForCausalLM(
            transformers.LlamaConfig(vocab_size=size, **small)),
    }
    for name, build in builds.items():
        torch.manual_seed(0)
        model = build()
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
        gen = torch.Generator().manual_seed(1)
        with gradscope.watch(model, opt, every=10, horizon=40, name=name) as watch:
            for _ in range(40):
                starts = torch.randint(0, len(ids) - 33, (8,), generator=gen)
                x = torch.stack([ids[s:s + 32] for s in starts])
                if name == "bert":
                    labels = x.clone()
                    mask = torch.rand(x.shape, generator=gen) < 0.15
                    labels[~mask] = -100
                    x = x.masked_fill(mask, size - 1)
                    out = model(input_ids=x, labels=labels)
                else:
                    out = model(input_ids=x, labels=x)
                watch.loss(out.loss)
                opt.zero_grad()
                out.loss.backward()
                opt.step()
        losses = [v for v in watch.record.losses if v is not None]
        assert losses[-1] < losses[0]
        flagged = [f.rule for f in watch.findings() if f.severity in ("error", "warning")]
        assert flagged == [], (name, flagged)


def test_example_script_writes_its_report(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/watch_training.py runs as documented and writes both files."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "watch_training.py"
    spec = importlib.util.spec_from_file_location("watch_training", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.chdir(tmp_path)
    module.main()
    doc = json.loads((tmp_path / "watch.json").read_text())
    assert doc["steps"]["steps"] == 50 and (tmp_path / "watch.html").exists()
    assert doc["status"] == "healthy"  # the example's rate trains; LR = 2.0 does not

"""gradscope.watch inside real training frameworks and live sinks (issue 18).

Real runs, small: a tiny GPT-2 from a config trained by the Hugging Face ``Trainer`` on
characters of a standard-library source file, a Lightning MLP on sklearn's bundled
digits, and plain torch loops writing TensorBoard event files and an offline W&B run that
are read back. The optional libraries are skipped where not installed.
"""

from __future__ import annotations

import json
import math
import struct
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from training_parts import digits_module, stdlib_lm

import gradscope
from gradscope.integrations._common import torch_optimizer
from gradscope.sinks import LAYER_FIGURES, PREFIX, TensorBoardSink, WandbSink, step_scalars
from gradscope.steps import TrainingRecord


def _no_hooks(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The model and the optimizer as found: no forward, backward or step hook left."""
    for name, module in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                     "_forward_hooks_with_kwargs"):
            assert not getattr(module, attr, {}), f"{attr} left on {name or 'the model'}"
    assert not optimizer._optimizer_step_pre_hooks
    assert not optimizer._optimizer_step_post_hooks


def _assert_watch_json(path: Path, steps: int, horizon: int, every: int) -> dict[str, Any]:
    doc = json.loads(path.read_text())
    record = doc["steps"]
    assert record["steps"] == steps
    assert record["horizon"] == horizon and record["every"] == every
    assert len(record["losses"]) == steps
    assert all(v is not None and math.isfinite(v) for v in record["losses"])
    assert all(v is not None and math.isfinite(v) and v > 0 for v in record["grad_norms"])
    assert [r["step"] for r in record["recorded"]] == list(range(0, steps, every))
    return doc


def _digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    return x, torch.tensor(digits.target, dtype=torch.long)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(),
                         nn.Linear(16, 10))


# -- the real torch optimizer and steps stepped through a closure ---------------------------


def test_torch_optimizer_unwraps_wrappers() -> None:
    inner = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)

    class Wrapper(torch.optim.Optimizer):  # like accelerate's AcceleratedOptimizer
        def __init__(self, optimizer: torch.optim.Optimizer) -> None:
            self.optimizer = optimizer

    class Holder:  # like Lightning's LightningOptimizer
        def __init__(self, optimizer: torch.optim.Optimizer) -> None:
            self._optimizer = optimizer

    assert torch_optimizer(inner) is inner
    assert torch_optimizer(Wrapper(Wrapper(inner))) is inner
    assert torch_optimizer(Holder(Wrapper(inner))) is inner
    with pytest.raises(TypeError, match="torch optimizer"):
        torch_optimizer(object())


def _closure_run(with_closure: bool) -> TrainingRecord:
    x, y = _digits_tensors()
    torch.manual_seed(0)
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, optimizer, every=2, horizon=6) as watch:
        for i in range(8):
            xb, yb = x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32]

            def closure(xb: torch.Tensor = xb, yb: torch.Tensor = yb) -> torch.Tensor:
                loss = nn.functional.cross_entropy(model(xb), yb)
                optimizer.zero_grad()
                loss.backward()
                return loss

            if with_closure:
                optimizer.step(closure)
            else:
                watch.loss(closure())
                optimizer.step()
    _no_hooks(model, optimizer)
    return watch.record


def test_closure_steps_see_the_steps_gradients() -> None:
    """optimizer.step(closure) (Lightning, LBFGS) gives the watch the figures a plain
    step gives: the step's own gradient norm and every module's figures."""
    plain, closed = _closure_run(False), _closure_run(True)
    assert closed.steps == plain.steps == 6
    assert closed.grad_norms == pytest.approx(plain.grad_norms, rel=1e-6)
    assert [r.step for r in closed.recorded] == [0, 2, 4]
    for a, b in zip(plain.recorded, closed.recorded, strict=True):
        assert a.layers.keys() == b.layers.keys()
        for name in a.layers:
            for figure in LAYER_FIGURES:
                want = getattr(a.layers[name], figure)
                got = getattr(b.layers[name], figure)
                assert got == (None if want is None else pytest.approx(want, rel=1e-6)), \
                    (name, figure)
    assert closed.recorded[0].layers["0"].grad_rms is not None


# -- sinks -----------------------------------------------------------------------------------


def _sink_loop(sink: Any, every: int = 3, horizon: int = 12) -> TrainingRecord:
    x, y = _digits_tensors()
    torch.manual_seed(0)
    model = _mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with gradscope.watch(model, optimizer, every=every, horizon=horizon, sinks=[sink]) as watch:
        for i in range(horizon + 3):
            xb, yb = x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32]
            loss = nn.functional.cross_entropy(model(xb), yb)
            watch.loss(loss)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return watch.record


def test_step_scalars_are_the_records_figures() -> None:
    seen: list[dict[str, float]] = []
    record = _sink_loop(lambda rec, step: seen.append(step_scalars(rec, step)))
    assert len(seen) == len(record.recorded) == 4
    for scalars, step in zip(seen, record.recorded, strict=True):
        for name, layer in step.layers.items():
            for figure in LAYER_FIGURES:
                value = getattr(layer, figure)
                tag = f"{PREFIX}/{name}/{figure}"
                assert (tag in scalars) == (value is not None)
                if value is not None:
                    assert scalars[tag] == value
        assert scalars[f"{PREFIX}/output_grad_rms"] == step.output_grad_rms
        assert scalars[f"{PREFIX}/weight_grad_norm"] == pytest.approx(math.sqrt(sum(
            layer.weight_grad_norm ** 2 for layer in step.layers.values()
            if layer.weight_grad_norm is not None)))
        # every parameter of the MLP belongs to a watched module: the same total norm
        assert scalars[f"{PREFIX}/weight_grad_norm"] == pytest.approx(
            record.grad_norms[step.step], rel=1e-5)
        # during the run, the step's loss and total norm are already in the record
        assert scalars[f"{PREFIX}/loss"] == pytest.approx(record.losses[step.step])
        assert scalars[f"{PREFIX}/grad_norm"] == pytest.approx(record.grad_norms[step.step])
    # the ReLU's dead share and the tanh's saturated share are among them
    assert f"{PREFIX}/1/dead_fraction" in seen[0]
    assert f"{PREFIX}/3/saturated_fraction" in seen[0]


def test_sinks_import_their_library_lazily(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"gradscope\[wandb\]"):
        WandbSink()
    with pytest.raises(ImportError, match=r"gradscope\[tensorboard\]"):
        TensorBoardSink(tmp_path)


def test_tensorboard_sink_writes_the_records_figures(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink(tmp_path)
    record = _sink_loop(sink)
    sink.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected: dict[str, dict[int, float]] = {}
    for step in record.recorded:
        for tag, value in step_scalars(TrainingRecord(
                every=record.every, horizon=record.horizon, optimizer=record.optimizer,
                lr=record.lr, losses=record.losses[:step.step + 1],
                grad_norms=record.grad_norms[:step.step + 1]), step).items():
            expected.setdefault(tag, {})[step.step] = value
    assert tags == set(expected)
    assert f"{PREFIX}/0/grad_rms" in tags and f"{PREFIX}/1/dead_fraction" in tags
    for tag, by_step in expected.items():
        logged = {e.step: e.value for e in events.Scalars(tag)}
        assert logged.keys() == by_step.keys(), tag
        for at, value in by_step.items():
            assert logged[at] == pytest.approx(value, rel=1e-6, abs=1e-12), (tag, at)
    # figure by figure against the record itself, not only through step_scalars
    layer = record.recorded[2].layers["2"]
    grad_rms = {e.step: e.value for e in events.Scalars(f"{PREFIX}/2/grad_rms")}
    update = {e.step: e.value for e in events.Scalars(f"{PREFIX}/2/update_ratio")}
    assert grad_rms[6] == pytest.approx(layer.grad_rms, rel=1e-6)
    assert update[6] == pytest.approx(layer.update_ratio, rel=1e-6)


def _wandb_records(path: Path) -> list[Any]:
    """The protobuf records of an offline run's ``.wandb`` file (a LevelDB-style log:
    7-byte header, 32 KiB blocks of chunks with a 7-byte header: crc, length, type)."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    block, pos, chunk, records = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # the block's trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if pos + 7 + length > len(raw):  # a chunk still being written
            break
        chunk += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


@pytest.mark.slow
def test_wandb_sink_offline_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="gradscope-test", dir=str(tmp_path))
    try:
        record = _sink_loop(WandbSink())  # logs to the active run
        summary = dict(run.summary)
    finally:
        run.finish()
    last = record.recorded[-1]
    assert summary[f"{PREFIX}/step"] == last.step
    assert summary[f"{PREFIX}/0/grad_rms"] == pytest.approx(last.layers["0"].grad_rms)

    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1
    # W&B's writer is a separate process: on a loaded machine the file can still be
    # growing when finish() returns. Its last record is the run's exit record.
    deadline = time.monotonic() + 60
    records = _wandb_records(files[0])
    while not any(r.WhichOneof("record_type") == "exit" for r in records) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
        records = _wandb_records(files[0])
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [row[f"{PREFIX}/step"] for row in history] == [r.step for r in record.recorded]
    empty = TrainingRecord(every=record.every, horizon=record.horizon,
                           optimizer=record.optimizer, lr=record.lr)
    for row, step in zip(history, record.recorded, strict=True):
        for tag, value in step_scalars(empty, step).items():
            assert row[tag] == pytest.approx(value, rel=1e-9), tag
    metrics = [r.metric for r in records if r.WhichOneof("record_type") == "metric"]
    assert any(m.glob_name == f"{PREFIX}/*" and m.step_metric == f"{PREFIX}/step"
               for m in metrics)


# -- Hugging Face Trainer --------------------------------------------------------------------


@pytest.mark.slow
def test_huggingface_trainer_writes_the_watch_report(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from gradscope.integrations.huggingface import GradscopeCallback

    model, data = stdlib_lm()  # a tiny GPT-2 on a standard-library source file's text
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=24, per_device_train_batch_size=8,
        gradient_accumulation_steps=2, learning_rate=1e-3, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="steps", logging_steps=1, disable_tqdm=True)
    callback = GradscopeCallback(every=5, horizon=16)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   callbacks=[callback])
    trainer.train()

    assert trainer.state.global_step == 24
    html, js = tmp_path / "gradscope-watch.html", tmp_path / "gradscope-watch.json"
    assert callback.paths == [html, js]
    assert html.stat().st_size > 0
    doc = _assert_watch_json(js, steps=16, horizon=16, every=5)  # the horizon came first
    # the loss of each step is the Trainer's own (its log, one entry per optimizer step,
    # sums the two micro-batches' losses, each already divided by the step's token count)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert doc["steps"]["losses"] == pytest.approx(logged[:16], rel=1e-4)
    assert any(layer["grad_rms"] is not None
               for layer in doc["steps"]["recorded"][0]["layers"].values())
    assert doc["model"]["name"] == "GPT2LMHeadModel"
    assert doc["steps"]["optimizer"] == "adamw"
    # the model and the torch optimizer under accelerate's wrapper are left as found
    inner = torch_optimizer(trainer.optimizer)
    assert inner is not trainer.optimizer and type(inner) is torch.optim.AdamW
    _no_hooks(model, inner)
    assert callback.watch is None and callback.report is not None


# -- Lightning -------------------------------------------------------------------------------


def _lightning() -> Any:
    try:
        import lightning.pytorch as pl
    except ImportError:
        pl = pytest.importorskip("pytorch_lightning")
    return pl


@pytest.mark.slow
def test_lightning_run_writes_the_watch_report(tmp_path: Path) -> None:
    pl = _lightning()
    from gradscope.integrations.lightning import GradscopeLightningCallback

    x, y = _digits_tensors()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64,
                                         shuffle=True, generator=torch.Generator().manual_seed(0))

    torch.manual_seed(0)
    module = digits_module(pl, _mlp(), lambda params: torch.optim.SGD(
        params, lr=0.1, momentum=0.9))
    callback = GradscopeLightningCallback(every=4, horizon=50)
    trainer = pl.Trainer(max_steps=15, accumulate_grad_batches=2, logger=False,
                         enable_checkpointing=False, accelerator="cpu", devices=1,
                         default_root_dir=str(tmp_path), callbacks=[callback],
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)

    assert trainer.global_step == 15
    html, js = tmp_path / "gradscope-watch.html", tmp_path / "gradscope-watch.json"
    assert callback.paths == [html, js]
    assert html.stat().st_size > 0
    doc = _assert_watch_json(js, steps=15, horizon=50, every=4)  # training ended first
    record = doc["steps"]
    # each step's loss: the mean of its two batches'; its gradient norm: the step's own
    # (the closure Lightning steps with runs the forward and backward inside the step)
    pairs = [sum(module.batch_losses[2 * i:2 * i + 2]) / 2 for i in range(15)]
    assert record["losses"] == pytest.approx(pairs, rel=1e-5)
    assert record["grad_norms"] == pytest.approx(module.step_norms, rel=1e-5)
    first = record["recorded"][0]["layers"]
    assert first["net.0"]["grad_rms"] is not None and first["net.0"]["update_ratio"] > 0
    assert first["net.1"]["dead_fraction"] is not None
    assert first["net.3"]["saturated_fraction"] is not None
    assert any("ended after 15 optimizer step(s)" in note for note in record["notes"])
    _no_hooks(module, torch_optimizer(trainer.optimizers[0]))
    assert callback.watch is None and callback.report is not None


def _callback_run(zero: bool, tmp_path: Path, model: nn.Module | None = None) -> Any:
    """A Trainer callback driven by hand, as a process of a distributed run would see it."""
    pytest.importorskip("transformers")
    from types import SimpleNamespace

    from gradscope.integrations.huggingface import GradscopeCallback

    model = model if model is not None else _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    callback = GradscopeCallback(every=2, horizon=4)
    args = SimpleNamespace(output_dir=str(tmp_path))
    state = SimpleNamespace(is_world_process_zero=zero)
    callback.on_train_begin(args, state, None, model=model, optimizer=opt)
    x = torch.randn(16, 64)
    for _ in range(4):
        callback.on_step_begin(args, state, None, model=model, optimizer=opt)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        callback.on_step_end(args, state, None)
    callback.on_train_end(args, state, None)
    return callback


def test_every_process_watches_and_process_zero_alone_writes(tmp_path: Path) -> None:
    """Across processes the watch's figures are summed in collectives every process must
    join: a process other than zero watches too (its report exists) but writes nothing."""
    other = _callback_run(False, tmp_path / "other")
    assert other.report is not None and other.report.steps is not None
    assert other.paths == [] and not (tmp_path / "other").exists()
    zero = _callback_run(True, tmp_path / "zero")
    assert zero.report is not None and [p.name for p in zero.paths] == [
        "gradscope-watch.html", "gradscope-watch.json"]


def test_a_setup_the_watch_cannot_read_is_refused_and_the_callback_trains_on(
        tmp_path: Path) -> None:
    class FullyShardedDataParallel(nn.Module):  # FSDP1's wrapper, by its name
        def __init__(self) -> None:
            super().__init__()
            self.inner = _mlp()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)  # type: ignore[no-any-return]

    model = FullyShardedDataParallel()
    with pytest.raises(ValueError, match="fully_shard"):
        gradscope.watch(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.warns(UserWarning, match="not watching this run"):
        callback = _callback_run(True, tmp_path, model=model)
    assert callback.report is None and callback.paths == []
    _no_hooks(model, torch.optim.SGD(model.parameters(), lr=0.1))

"""``gradscope.watch`` across processes: DDP and FSDP2 over 2 gloo processes record the
figures of the same run in one process on the whole batch.

The run goes under ``torchrun --nproc-per-node 2`` (``tests/workers/distributed_watch.py``):
each process trains its half of every batch; data parallelism averages the halves'
gradients into the whole batch's, so the losses (the processes' mean), gradient norms
(FSDP2: summed over the shards), per-module gradient health, weight and update figures and
dead shares (a unit dead on every process's samples) must all be the one-process figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import torchrun

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow

def _run(worker: str, args: list[str], tmp_path: Path, port: int) -> None:
    """``tests/workers/<worker>`` on 2 processes; fails with its stderr."""
    done = torchrun([str(HERE / "workers" / worker), *args], tmp_path, port=port, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


KINDS = ("loss", "grad_norm", "output_grad_rms", "grad_rms", "weight_grad_norm",
         "weight_norm", "update_ratio", "dead_fraction", "saturated_fraction")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_watch_across_processes_records_the_one_process_figures(mode: str,
                                                                tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    _run("distributed_watch.py", [mode, str(out)], tmp_path, 28500 + 7 * len(mode))
    doc = json.loads(out.read_text())
    assert doc["steps"] == [6, 6]
    for kind in KINDS:  # every kind of figure was compared, and agrees
        assert kind in doc["worst"], kind
        assert doc["worst"][kind] < 1e-5, (kind, doc["worst"][kind], doc["where"][kind])
    # the made-up model has units dead on part of the batch only: the dead share is the
    # whole batch's, not a mean of the halves'
    assert any(0 < d < 1 for d in doc["dead"]), doc["dead"]
    assert "not available across processes" in doc["replay"]
    assert any("this process's own" in note for note in doc["error_notes"]), doc["error_notes"]
    assert doc["alone"] == 3  # process zero watched alone and did not wait for the other


def test_trainer_callback_across_processes(tmp_path: Path) -> None:
    """A real ``Trainer`` run on 2 CPU processes (DDP over gloo) with the callback: both
    processes watch and finish (no collective left waiting), process zero alone writes,
    and each step's loss is the one the Trainer logs (its mean over the processes; each
    process's model loss is a part of it, divided by every process's tokens)."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    _run("distributed_trainer.py", [str(tmp_path)], tmp_path, 27500)
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert zero["world"] == one["world"] == 2 and "DISTRIBUTED" in zero["parallel"]
    assert zero["paths"] == ["gradscope-watch.html", "gradscope-watch.json"]
    assert one["paths"] == []
    assert zero["steps"] == one["steps"] == 12
    assert len(zero["losses"]) == 9  # the horizon
    assert zero["losses"] == pytest.approx(zero["logged"][:9], rel=1e-5)
    assert one["losses"] == zero["losses"] and one["grad_norms"] == zero["grad_norms"]
    written = json.loads((tmp_path / "gradscope-watch.json").read_text())
    assert written["steps"]["losses"] == pytest.approx(zero["losses"], rel=1e-9)


def test_lightning_callback_across_processes(tmp_path: Path) -> None:
    """Lightning's DDP strategy on 2 CPU processes with the callback: both processes watch
    and finish, global rank zero alone writes, each step's loss is the mean of the two
    processes' batch losses and its gradient norm the step's (the same on both)."""
    pytest.importorskip("sklearn")
    try:
        import lightning  # noqa: F401
    except ImportError:
        pytest.importorskip("pytorch_lightning")
    _run("distributed_lightning.py", [str(tmp_path)], tmp_path, 26500)
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert zero["world"] == 2 and zero["steps"] == one["steps"] == 12
    assert zero["paths"] == ["gradscope-watch.html", "gradscope-watch.json"]
    assert one["paths"] == []
    means = [(a + b) / 2 for a, b in zip(zero["batch_losses"], one["batch_losses"],
                                         strict=True)][:9]
    assert zero["losses"] == pytest.approx(means, rel=1e-6)
    assert zero["grad_norms"] == pytest.approx(zero["step_norms"][:9], rel=1e-5)
    assert one["losses"] == zero["losses"] and one["grad_norms"] == zero["grad_norms"]

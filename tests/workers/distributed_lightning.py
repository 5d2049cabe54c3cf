"""Run under torchrun by tests/test_watch_distributed.py: the Lightning callback across processes.

    torchrun --nproc-per-node 2 tests/workers/distributed_lightning.py OUT_DIR

An MLP on scikit-learn's digits trained by Lightning with the DDP strategy on two CPU
processes (gloo) and ``GradscopeLightningCallback``: every process watches, global rank
zero alone writes. Each process writes ``rank<N>.json``: what its callback wrote, the
recorded losses and gradient norms, and its own batches' losses and step gradient norms
(the test averages the losses over the processes; DDP's gradients are the same on both).
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    import pytorch_lightning as pl  # type: ignore[no-redef]

from training_parts import digits_module  # noqa: E402

from gradscope.integrations.lightning import GradscopeLightningCallback  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    torch.manual_seed(0)
    module = digits_module(pl, nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)),
                           lambda params: torch.optim.SGD(params, lr=0.1))
    callback = GradscopeLightningCallback(every=3, horizon=9)
    trainer = pl.Trainer(max_steps=12, logger=False, enable_checkpointing=False,
                         accelerator="cpu", devices=2, strategy="ddp",
                         default_root_dir=str(out), callbacks=[callback],
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    report = callback.report
    doc = {"rank": trainer.global_rank, "world": trainer.world_size,
           "paths": [p.name for p in callback.paths],
           "losses": report.steps.losses if report is not None and report.steps else None,
           "grad_norms": report.steps.grad_norms if report and report.steps else None,
           "batch_losses": module.batch_losses, "step_norms": module.step_norms,
           "steps": trainer.global_step}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(doc))


if __name__ == "__main__":
    main()
    # The frameworks leave the process group to the interpreter's exit, where gloo's
    # threads can be torn down before the models holding it (an abort, now and then):
    # free the models first, then end the group.
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

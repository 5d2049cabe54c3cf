"""Run under torchrun by tests/test_watch_distributed.py: the Trainer callback across processes.

    torchrun --nproc-per-node 2 tests/workers/distributed_trainer.py OUT_DIR

A tiny GPT-2 trained by the ``transformers`` ``Trainer`` on two CPU processes (DDP over
gloo) with ``GradscopeCallback``: every process watches, world process zero alone writes.
Each process writes ``rank<N>.json``: what its callback wrote, the steps' losses the watch
recorded and the losses the Trainer logged (the mean over the processes).
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402
from training_parts import stdlib_lm  # noqa: E402

from gradscope.integrations.huggingface import GradscopeCallback  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    model, data = stdlib_lm()
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=12, per_device_train_batch_size=4, learning_rate=1e-3,
        report_to=[], use_cpu=True, save_strategy="no", logging_strategy="steps",
        logging_steps=1, disable_tqdm=True, seed=0)
    callback = GradscopeCallback(every=3, horizon=9)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   callbacks=[callback])
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    report = callback.report
    doc = {"world": int(os.environ.get("WORLD_SIZE", "1")),
           "parallel": str(trainer.args.parallel_mode),
           "paths": [p.name for p in callback.paths],
           "losses": report.steps.losses if report is not None and report.steps else None,
           "grad_norms": report.steps.grad_norms if report and report.steps else None,
           "logged": [h["loss"] for h in trainer.state.log_history if "loss" in h],
           "steps": trainer.state.global_step}
    (out / f"rank{rank}.json").write_text(json.dumps(doc))


if __name__ == "__main__":
    main()
    # The frameworks leave the process group to the interpreter's exit, where gloo's
    # threads can be torn down before the models holding it (an abort, now and then):
    # free the models first, then end the group.
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

"""The benchmark's real data, all of it shipped with a package: nothing is downloaded.

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes),
  standardised per pixel with the training split's statistics, split 80/20 stratified with
  a fixed seed.
- ``chars``: characters of the Python standard library's own source files, a next-character
  task. Training text: the first files of ``TRAIN_FILES`` found; test text: ``TEST_FILE``.
  Characters outside printable ASCII map to one "other" symbol.
"""

from __future__ import annotations

import string
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

#: Standard-library modules whose source is the training text (about 1 MB together).
TRAIN_FILES = ("argparse.py", "typing.py", "inspect.py", "dataclasses.py", "textwrap.py",
               "pathlib.py", "subprocess.py", "tarfile.py", "logging/__init__.py")
#: Held-out source file for the test loss.
TEST_FILE = "difflib.py"
#: Symbols: printable ASCII (newline and tab included) plus one for everything else.
VOCAB = string.printable
VOCAB_SIZE = len(VOCAB) + 1
SEQ_LEN = 64


@dataclass(frozen=True)
class Split:
    x: torch.Tensor
    y: torch.Tensor


@lru_cache(maxsize=1)
def digits() -> tuple[Split, Split]:
    """(train, test): standardised float32 features of shape (n, 64), int64 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        data.data.astype(np.float32), data.target.astype(np.int64), test_size=0.2,
        random_state=0, stratify=data.target)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
    return (Split(torch.from_numpy((x_tr - mean) / std), torch.from_numpy(y_tr)),
            Split(torch.from_numpy((x_te - mean) / std), torch.from_numpy(y_te)))


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def encode(text: str) -> torch.Tensor:
    index = {c: i for i, c in enumerate(VOCAB)}
    other = len(VOCAB)
    return torch.tensor([index.get(c, other) for c in text], dtype=torch.int64)


@lru_cache(maxsize=1)
def chars() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) streams of symbol ids."""
    root = _stdlib()
    train = "".join((root / name).read_text(encoding="utf-8") for name in TRAIN_FILES
                    if (root / name).exists())
    test = (root / TEST_FILE).read_text(encoding="utf-8")
    return encode(train), encode(test)


def unigram_entropy() -> float:
    """Cross-entropy (nats) of the training text's symbol frequencies on the test text.

    The context-free baseline: a character model that has learnt nothing from the context
    reaches this and no lower.
    """
    train, test = chars()
    counts = torch.bincount(train, minlength=VOCAB_SIZE).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return float(-logp[test].mean())


def char_batch(stream: torch.Tensor, batch: int, generator: torch.Generator,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random windows: inputs (batch, SEQ_LEN) and next-symbol targets."""
    starts = torch.randint(0, len(stream) - SEQ_LEN - 1, (batch,), generator=generator)
    idx = starts[:, None] + torch.arange(SEQ_LEN + 1)
    window = stream[idx]
    return window[:, :-1], window[:, 1:]


def char_test_windows(count: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed evenly spaced test windows (the same for every run)."""
    _, test = chars()
    starts = torch.linspace(0, len(test) - SEQ_LEN - 2, count).long()
    idx = starts[:, None] + torch.arange(SEQ_LEN + 1)
    window = test[idx]
    return window[:, :-1], window[:, 1:]

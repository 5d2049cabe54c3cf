"""The estimate's measurement cache of weight moments (``estimate.statistics``)."""

from __future__ import annotations

import torch

from gradscope.estimate.statistics import statistics_scope, tensor_stats


def test_a_freed_tensors_id_does_not_answer_for_the_next_one() -> None:
    """Rules measure temporaries (``in_proj_weight.chunk(3)``): once one is freed, CPython
    hands its id to the next object of its size, and a cache keyed by id alone answered
    with the freed tensor's moments (a nondeterministic estimate of every
    nn.MultiheadAttention layer after the first, 1e-4 relative)."""
    base = torch.arange(64, dtype=torch.float32).reshape(8, 8)
    with statistics_scope():
        for i in range(8):
            row = base[i]  # a fresh view each time, freed at the end of the iteration
            mean, second = tensor_stats(row)  # type: ignore[misc]
            expected = row.double()
            assert mean == float(expected.mean())
            assert second == float((expected * expected).mean())

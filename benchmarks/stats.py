"""Small helpers shared by the comparison benchmarks: correlations and a stopwatch."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank) of a flattened tensor, float64."""
    flat = x.detach().flatten().double()
    order = flat.argsort()
    r = torch.empty_like(flat)
    r[order] = torch.arange(flat.numel(), dtype=torch.float64)
    # Ties: give every member of a group of equal values the group's mean rank.
    uniq, inverse = torch.unique(flat, return_inverse=True)
    if uniq.numel() < flat.numel():
        sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, r)
        counts = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(
            0, inverse, torch.ones_like(r)
        )
        r = (sums / counts)[inverse]
    return r


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two tensors of equal size (flattened)."""
    x, y = a.detach().flatten().double(), b.detach().flatten().double()
    if x.numel() != y.numel():
        raise ValueError(f"cannot correlate {x.numel()} values with {y.numel()}")
    x, y = x - x.mean(), y - y.mean()
    return float((x @ y) / (x.norm() * y.norm()))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two tensors of equal size (flattened)."""
    return pearson(ranks(a), ranks(b))


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """‖got − ref‖ / ‖ref‖ in float64."""
    g, r = got.detach().double(), ref.detach().double()
    return float((g - r).norm() / r.norm())


@contextmanager
def stopwatch(times: dict[str, float], key: str) -> Iterator[None]:
    """Record the wall time of the block under times[key], keeping the fastest of repeats."""
    start = time.perf_counter()
    yield
    elapsed = time.perf_counter() - start
    times[key] = min(elapsed, times.get(key, float("inf")))

"""Module groups: the tracked modules cut into contiguous groups that a fitting node fits one
pass at a time, so that the device holds one group's sums (and, for Λ, eigenvectors).

The groups are a function of the module specs alone (model order, byte weights), so every
pass, every shard and `msif plan` cut the same way. Each pass runs the whole model over the
whole shard and samples the same labels (msif.core.loss seeds them per sequence from its
tokens), so the union of the groups' sums is bit for bit the sum of one pass over every
module (msif.core.artifact.merge_modules puts them together).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping
from itertools import pairwise
from typing import Any

from msif.core.modules import ModuleSpec
from msif.errors import MsifError


def covariance_entries(spec: ModuleSpec) -> int:
    """Entries of a module's A and G: in'² + blocks·bs²."""
    return spec.in_dim**2 + spec.num_blocks * spec.block_size**2


def covariance_bytes(spec: ModuleSpec) -> int:
    """Device bytes of a module's covariance sums (float64 A and G)."""
    return 8 * covariance_entries(spec)


def lambda_bytes(spec: ModuleSpec, vector_bytes: int = 4) -> int:
    """Device bytes of a module in a Λ pass: its float64 (out × in') sums and its Q_A and Q_G
    cast to the work dtype (vector_bytes: 4 for float32 statistics, 8 for float64)."""
    return 8 * spec.out_features * spec.in_dim + vector_bytes * covariance_entries(spec)


def split_modules(
    specs: Mapping[str, ModuleSpec], groups: int, weight: Callable[[ModuleSpec], int]
) -> list[dict[str, ModuleSpec]]:
    """specs cut into `groups` contiguous, non-empty groups, in order, whose largest total
    weight is the least any contiguous cut achieves; deterministic."""
    names = list(specs)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise MsifError(f"module groups must be a whole number >= 1, not {groups!r}")
    if groups > len(names):
        raise MsifError(f"cannot fit {groups} module groups: only {len(names)} modules are tracked")
    weights = [int(weight(specs[n])) for n in names]
    cuts = _cuts(weights, groups)
    return [{n: specs[n] for n in names[a:b]} for a, b in pairwise(cuts)]


def _cuts(weights: list[int], groups: int) -> list[int]:
    """Boundaries 0 = c_0 < … < c_groups = len(weights) of the least-bottleneck cut."""
    # The least feasible bottleneck by bisection: greedy filling decides feasibility exactly.
    low, high = max(weights), sum(weights)
    while low < high:
        mid = (low + high) // 2
        if len(_greedy(weights, mid)) - 1 <= groups:
            high = mid
        else:
            low = mid + 1
    cuts = _greedy(weights, low)
    # Fewer groups than asked: split the heaviest group that has two modules, at its best
    # point, until there are enough (a split never raises the bottleneck).
    while len(cuts) - 1 < groups:
        spans = [(a, b) for a, b in pairwise(cuts) if b - a > 1]
        a, b = max(spans, key=lambda s: (sum(weights[s[0] : s[1]]), -s[0]))
        best = min(
            range(a + 1, b),
            key=lambda c: (max(sum(weights[a:c]), sum(weights[c:b])), c),
        )
        cuts = sorted([*cuts, best])
    return cuts


def _greedy(weights: list[int], cap: int) -> list[int]:
    """Boundaries of the groups filled left to right up to cap each."""
    cuts, total = [0], 0
    for i, w in enumerate(weights):
        if total + w > cap and i > cuts[-1]:
            cuts.append(i)
            total = 0
        total += w
    cuts.append(len(weights))
    return cuts


class SamePasses:
    """The batches of each of several passes over the same data, checked to be the same.

    batches: an iterable that can be read again (a list of batches), or a zero-argument
    callable returning fresh batches each time (what a one-shot iterator needs). A one-shot
    iterator is refused for more than one pass: the second pass would see no data. Each
    pass's token ids, labels and masks are hashed as they go by; `check` refuses a pass that
    read other batches than the first (a source that shuffles, or changed in between), whose
    groups would otherwise be fitted on other data.
    """

    def __init__(self, batches: Any, count: int) -> None:
        if not callable(batches) and count > 1 and iter(batches) is batches:
            raise MsifError(
                "more than one module group reads the data once per group: give a list of "
                "batches or a zero-argument callable that returns fresh batches"
            )
        self.batches, self.count = batches, count
        self._first: str | None = None
        self._current = hashlib.sha256()

    def __call__(self) -> Iterator[Mapping]:
        """The next pass's batches."""
        source = self.batches() if callable(self.batches) else self.batches
        self._current = hashlib.sha256()
        if self.count == 1:  # nothing to compare with: one pass reads its batches as given
            yield from source
            return
        for batch in source:
            for key in ("input_ids", "labels", "attention_mask"):
                value = batch[key]
                self._current.update(repr((key, tuple(value.shape))).encode())
                self._current.update(value.detach().cpu().contiguous().numpy().tobytes())
            yield batch

    def check(self, index: int) -> None:
        """Refuse pass index (0-based) when it read other batches than pass 0."""
        digest = self._current.hexdigest()
        if self._first is None:
            self._first = digest
        elif digest != self._first:
            raise MsifError(
                f"module group {index + 1} of {self.count} read other batches than group 1: "
                "the data must be the same on every pass (a fixed order, no shuffling)"
            )


def fit_groups(
    groups: list[dict[str, ModuleSpec]],
    batches: Any,
    desc: str,
    one_pass: Callable[[Iterator[Mapping], dict[str, ModuleSpec], str], Any],
) -> Any:
    """Run one_pass(batches, specs, desc) once per module group over the same batches and
    merge the parts (msif.core.artifact.merge_modules): the sums of one pass over them all."""
    from msif.core.artifact import merge_modules

    data = SamePasses(batches, len(groups))
    parts = []
    for i, specs in enumerate(groups):
        label = desc if len(groups) == 1 else f"{desc}, module group {i + 1}/{len(groups)}"
        parts.append(one_pass(data(), specs, label))
        data.check(i)
    return merge_modules(parts)

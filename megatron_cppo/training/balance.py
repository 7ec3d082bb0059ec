"""Reorder a rollout batch so that every data-parallel rank gets a similar token workload.

What it reproduces: verl's ``RayPPOTrainer._balance_batch`` (``trainer.balance_batch=True``, the
verl default, with ``keep_minibatch=False`` as the CPPO recipe calls it), as vendored by the
reference recipe: vbdi/cppo ``verl/verl/trainer/ppo/ray_trainer.py`` (commit d702550d), with the
partition helpers of ``verl/utils/seqlen_balancing.py`` (``calculate_workload``,
``get_seqlen_balanced_partitions``, ``karmarkar_karp``) as volcengine/verl has them at b96b53a3,
the version the vendored trainer pairs with (the helpers' arithmetic is unchanged from 62221fa1,
2025-10, through 2026-01).

What the ordering is for: after the reorder, the batch is cut into ``num_partitions`` (the
data-parallel size) contiguous parts of equal count, one per rank (verl's ``DataProto.chunk``).
Long responses cost more than short ones, so a plain split of the rollout order can give one rank
most of the work while the others wait at the gradient all-reduce; the reorder makes the parts'
summed workloads nearly equal.

The computation (``balance_order``):
1. Each sample's workload (verl: ``calculate_workload`` of its attention-mask sum, i.e. prompt +
   response tokens; ``verl_workload`` here) is the quantity balanced.
2. Equal-count largest differencing (Karmarkar-Karp): sort the samples by (workload, index), cut
   that list into consecutive groups of ``num_partitions``; each group is a partial solution with
   one sample per part. Repeatedly take the two partial solutions with the largest spread
   (heaviest part minus lightest part; ties: the one with the heavier heaviest part) and combine
   them by joining the heaviest part of one with the lightest of the other, the second heaviest
   with the second lightest, and so on. Parts are kept ordered heaviest first, comparing (summed
   workload, sample count, the part's (index, workload) list in joining order).
3. Part j of the final solution goes to rank j: rank 0 gets the heaviest part.
4. Within a part, samples are sorted by (workload, index) and laid out small at both ends, large
   in the middle: positions 0, 2, 4, ... ascending, then positions ..., 5, 3, 1 (verl: fewer
   pipeline bubbles). Even with ``num_partitions == 1`` or all-equal workloads this reorders the
   batch.

``batch[perm]`` (row i of the new batch is row ``perm[i]`` of the old) split into
``num_partitions`` contiguous equal parts gives each rank the samples verl gives it, in verl's
order.
"""

from __future__ import annotations

import heapq
import operator
from typing import Sequence

__all__ = ["balance_order", "verl_workload"]

# verl's calculate_workload: FLOPs of a dense block ~ 12 h^2 L + 2 h L^2; with h = 4096 (a 7B
# model) that is proportional to 6 h L + L^2 = 24576 L + L^2.
_LINEAR_COEFF = 24576


def verl_workload(num_tokens: int) -> int:
    """The workload verl balances for a sample of ``num_tokens`` tokens (its attention-mask sum:
    prompt + response): ``24576 * L + L ** 2``."""
    n = _as_int(num_tokens, "num_tokens")
    if n < 0:
        raise ValueError(f"num_tokens must be >= 0, got {n}")
    return _LINEAR_COEFF * n + n * n


def _as_int(value, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


class _Part:
    """One part of a partial solution: its summed workload and its (index, workload) pairs in the
    order they were joined."""

    __slots__ = ("total", "members")

    def __init__(self, total: int, members: list[tuple[int, int]]):
        self.total = total
        self.members = members

    def key(self):
        return (self.total, len(self.members), self.members)


def _heaviest_first(parts: list[_Part]) -> list[_Part]:
    return sorted(parts, key=_Part.key, reverse=True)


class _Partial:
    """A partial solution: ``k`` disjoint parts, heaviest first. Ordered for a min-heap so that the
    largest spread comes out first, then the one whose heaviest part is heavier."""

    __slots__ = ("parts",)

    def __init__(self, parts: list[_Part]):
        self.parts = _heaviest_first(parts)

    def spread(self) -> int:
        return self.parts[0].total - self.parts[-1].total

    def __lt__(self, other: "_Partial") -> bool:
        mine, theirs = self.spread(), other.spread()
        if mine != theirs:
            return mine > theirs
        return other.parts[0].key() < self.parts[0].key()

    def absorb(self, other: "_Partial") -> None:
        """Join part j of self with part k-1-j of other (heaviest with lightest)."""
        k = len(self.parts)
        joined = []
        for j, mine in enumerate(self.parts):
            theirs = other.parts[k - 1 - j]
            joined.append(_Part(mine.total + theirs.total, mine.members + theirs.members))
        self.parts = _heaviest_first(joined)


def _equal_count_parts(workloads: list[int], k: int) -> list[list[int]]:
    """Largest differencing into ``k`` parts of ``len(workloads) // k`` samples each; the parts
    heaviest first, each a list of sample indices."""
    ranked = sorted(range(len(workloads)), key=lambda i: (workloads[i], i))
    heap: list[_Partial] = []
    for start in range(0, len(ranked), k):
        group = ranked[start:start + k]
        heapq.heappush(heap, _Partial([_Part(workloads[i], [(i, workloads[i])]) for i in group]))
    while len(heap) > 1:
        first = heapq.heappop(heap)
        second = heapq.heappop(heap)
        first.absorb(second)
        heapq.heappush(heap, first)
    return [[i for i, _ in part.members] for part in heap[0].parts]


def _small_at_both_ends(indices: list[int], workloads: list[int]) -> list[int]:
    ascending = sorted(indices, key=lambda i: (workloads[i], i))
    return ascending[0::2] + ascending[1::2][::-1]


def balance_order(workloads: Sequence[int], num_partitions: int) -> list[int]:
    """The permutation verl's ``balance_batch`` applies to a batch whose samples have these
    workloads (integers, e.g. ``verl_workload`` of each sample's token count), for
    ``num_partitions`` data-parallel ranks: rank r takes ``perm[r * n // k:(r + 1) * n // k]``."""
    k = _as_int(num_partitions, "num_partitions")
    if k < 1:
        raise ValueError(f"num_partitions must be >= 1, got {k}")
    values = [_as_int(w, "workloads") for w in workloads]
    if not values:
        raise ValueError("workloads must not be empty")
    if any(w < 0 for w in values):
        raise ValueError(f"workloads must be >= 0, got {min(values)}")
    if len(values) % k:
        raise ValueError(f"num_partitions ({k}) must divide the batch size ({len(values)})")
    perm: list[int] = []
    for part in _equal_count_parts(values, k):
        perm.extend(_small_at_both_ends(part, values))
    return perm

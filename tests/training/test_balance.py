"""``balance_order`` against a transcription of verl's ``balance_batch`` (the reference recipe's
data-parallel reorder).

Proven:
- ``balance_order(workloads, k)`` equals the transcribed index computation exactly, on random
  integer workloads (several seeds, batch sizes, k = 1, 2, 3, 4, 8), on heavily tied workloads
  (values 0..3) and on all-equal workloads;
- ``balance_order([verl_workload(L) ...], k)`` equals the transcribed ``_balance_batch`` run the
  way verl runs it: on a torch tensor of attention-mask sums through ``calculate_workload``;
- the result is a permutation of range(n), and each rank's part has n / k samples;
- on every tested case the parts' summed workloads spread (max - min) no more than the plain
  contiguous split of the rollout order does;
- hand-worked cases (k = 1, equal workloads, a 4-sample split) pin the tie-breaking and the
  order of partitions, independently of the transcription;
- invalid arguments raise ValueError naming the argument.
Not proven: ``keep_minibatch=True`` (per-mini-batch balancing; the CPPO recipe does not use it),
and verl's later ``_get_dp_size`` (b16e0488: the part count from dispatch info instead of the
worker group's world size, which is the same number without tensor/pipeline parallelism).
"""

import heapq
import random

import pytest
import torch

from megatron_cppo.training.balance import balance_order, verl_workload


# --- transcription of the reference -------------------------------------------------------------
# verl/utils/seqlen_balancing.py: calculate_workload, karmarkar_karp, get_seqlen_balanced_partitions
# (volcengine/verl b96b53a3, the version vendored with vbdi/cppo d702550d; karmarkar_karp's body is
# unchanged from 62221fa1 to 2026-01), and verl/trainer/ppo/ray_trainer.py:
# RayPPOTrainer._balance_batch with keep_minibatch=False (vbdi/cppo d702550d,
# verl/verl/trainer/ppo/ray_trainer.py). Only the index computation; asserts and metrics dropped.

def ref_calculate_workload(seqlen_list):
    return 24576 * seqlen_list + seqlen_list**2


def ref_karmarkar_karp(seqlen_list, k_partitions, equal_size):
    class Set:
        def __init__(self):
            self.sum = 0
            self.items = []

        def add(self, idx, val):
            self.items.append((idx, val))
            self.sum += val

        def merge(self, other):
            for idx, val in other.items:
                self.items.append((idx, val))
                self.sum += val

        def __lt__(self, other):
            if self.sum != other.sum:
                return self.sum < other.sum
            if len(self.items) != len(other.items):
                return len(self.items) < len(other.items)
            return self.items < other.items

    class State:
        def __init__(self, items, k):
            self.k = k
            self.sets = [Set() for _ in range(k)]
            for i, (idx, seqlen) in enumerate(items):
                self.sets[i].add(idx=idx, val=seqlen)
            self.sets = sorted(self.sets, reverse=True)

        def get_partitions(self):
            return [[idx for idx, _ in s.items] for s in self.sets]

        def merge(self, other):
            for i in range(self.k):
                self.sets[i].merge(other.sets[self.k - 1 - i])
            self.sets = sorted(self.sets, reverse=True)

        @property
        def spread(self):
            return self.sets[0].sum - self.sets[-1].sum

        def __lt__(self, other):
            if self.spread != other.spread:
                return self.spread > other.spread
            return self.sets[0] > other.sets[0]

    sorted_seqlen_list = sorted([(seqlen, i) for i, seqlen in enumerate(seqlen_list)])
    states_pq = []
    if equal_size:
        for offset in range(0, len(sorted_seqlen_list), k_partitions):
            items = []
            for i in range(k_partitions):
                seqlen, idx = sorted_seqlen_list[offset + i]
                items.append((idx, seqlen))
            heapq.heappush(states_pq, State(items=items, k=k_partitions))
    else:
        for seqlen, idx in sorted_seqlen_list:
            heapq.heappush(states_pq, State(items=[(idx, seqlen)], k=k_partitions))
    while len(states_pq) > 1:
        state0 = heapq.heappop(states_pq)
        state1 = heapq.heappop(states_pq)
        state0.merge(state1)
        heapq.heappush(states_pq, state0)
    return states_pq[0].get_partitions()


def ref_get_seqlen_balanced_partitions(seqlen_list, k_partitions, equal_size):
    assert len(seqlen_list) >= k_partitions
    partitions = ref_karmarkar_karp(seqlen_list=seqlen_list, k_partitions=k_partitions,
                                    equal_size=equal_size)
    return [sorted(p) for p in partitions]  # _check_and_sort_partitions, checks dropped


def ref_balance_batch_index(workload_lst, world_size):
    """_balance_batch from ``workload_lst`` on: the index that ``batch.reorder`` applies."""
    global_partition_lst = ref_get_seqlen_balanced_partitions(workload_lst, k_partitions=world_size,
                                                              equal_size=True)
    for idx, partition in enumerate(global_partition_lst):
        partition.sort(key=lambda x: (workload_lst[x], x))
        ordered_partition = partition[::2] + partition[1::2][::-1]
        global_partition_lst[idx] = ordered_partition
    return [j for partition in global_partition_lst for j in partition]


def ref_balance_batch_from_attention_mask(attention_mask, world_size):
    """_balance_batch as verl runs it: attention-mask sums (a tensor) -> calculate_workload."""
    batch_size = attention_mask.shape[0]
    global_seqlen_lst = attention_mask.view(batch_size, -1).sum(-1)
    workload_lst = ref_calculate_workload(global_seqlen_lst)
    return torch.tensor(ref_balance_batch_index(workload_lst, world_size)).tolist()


# --- cases ---------------------------------------------------------------------------------------

PARTS = [1, 2, 3, 4, 8]
PER_PART = [1, 2, 3, 5, 8, 16]
SEEDS = [0, 1, 2]


def random_cases():
    """(name, workloads, k): wide random, heavily tied, and all-equal workloads."""
    for seed in SEEDS:
        rng = random.Random(seed)
        for k in PARTS:
            for m in PER_PART:
                n = k * m
                yield f"wide-s{seed}-k{k}-n{n}", [rng.randint(1, 100_000) for _ in range(n)], k
                yield f"ties-s{seed}-k{k}-n{n}", [rng.randint(0, 3) for _ in range(n)], k
    for k in PARTS:
        for m in (1, 4, 7):
            yield f"equal-k{k}-n{k * m}", [5] * (k * m), k


CASES = list(random_cases())


def part_sums(order, workloads, k):
    size = len(order) // k
    return [sum(workloads[i] for i in order[r * size:(r + 1) * size]) for r in range(k)]


def test_equals_the_reference_on_integer_workloads():
    for name, w, k in CASES:
        assert balance_order(w, k) == ref_balance_batch_index(w, k), name


def test_equals_the_reference_balance_batch_on_attention_masks():
    rng = random.Random(7)
    for k in PARTS:
        for m in (1, 3, 8):
            for lo, hi in ((1, 4096), (100, 103)):  # wide lengths, and lengths with many ties
                n = k * m
                lengths = [rng.randint(lo, hi) for _ in range(n)]
                mask = torch.zeros(n, hi, dtype=torch.int64)
                for row, length in enumerate(lengths):  # left-padded prompt + response
                    start = rng.randint(0, hi - length)
                    mask[row, start:start + length] = 1
                expected = ref_balance_batch_from_attention_mask(mask, k)
                got = balance_order([verl_workload(L) for L in mask.sum(-1).tolist()], k)
                assert got == expected, (k, n, lo, hi)


def test_is_a_permutation_with_equal_parts():
    for name, w, k in CASES:
        perm = balance_order(w, k)
        assert sorted(perm) == list(range(len(w))), name
        assert len(perm) % k == 0


def test_parts_are_no_less_balanced_than_the_contiguous_split():
    for name, w, k in CASES:
        balanced = part_sums(balance_order(w, k), w, k)
        naive = part_sums(list(range(len(w))), w, k)
        assert max(balanced) - min(balanced) <= max(naive) - min(naive), name
    # and strictly better where there is something to balance (a sorted batch, 4 ranks)
    w = list(range(1, 33))
    balanced, naive = part_sums(balance_order(w, 4), w, 4), part_sums(list(range(32)), w, 4)
    assert max(balanced) - min(balanced) < max(naive) - min(naive)


def test_hand_worked_cases():
    # k = 1: one part, sorted by workload, then small at both ends: [1, 2, 3, 5] -> 1, 3 | 5, 2
    assert balance_order([3, 1, 2, 5], 1) == [1, 0, 3, 2]
    # all equal, k = 2: groups {0,1}, {2,3} (index order), both spread 0; the one whose heaviest
    # part is heavier (same sum and count: the larger (index, workload) list, {3}) is popped first
    # and joins {3} with {0}, {2} with {1}; equal sums, so the part listing index 3 first comes
    # first. Not the identity although there is nothing to balance.
    assert balance_order([7, 7, 7, 7], 2) == [0, 3, 1, 2]
    # 1, 2, 3, 4 over 2 ranks: {4, 1} and {3, 2}, each ordered small first
    assert balance_order([1, 2, 3, 4], 2) == [0, 3, 1, 2]
    # the heaviest part goes to rank 0. Groups (1, 1) = indices {0, 2} (spread 0) and (9, 10)
    # (spread 1, popped first): 10 joins the lighter 1 of the first group (index 0: ties in
    # workload order by index), 9 joins index 2: {3, 0} = 11 on rank 0, {1, 2} = 10 on rank 1
    perm = balance_order([1, 9, 1, 10], 2)
    assert perm == [0, 3, 2, 1]
    assert part_sums(perm, [1, 9, 1, 10], 2) == [11, 10]


def test_verl_workload():
    assert verl_workload(0) == 0
    assert verl_workload(1) == 24577
    assert verl_workload(1000) == 24576 * 1000 + 1000**2


@pytest.mark.parametrize("workloads, k, flag", [
    ([1, 2, 3], 2, "num_partitions"),
    ([1, 2], 0, "num_partitions"),
    ([1, 2], -2, "num_partitions"),
    ([1, 2], 1.0, "num_partitions"),
    ([1, 2], True, "num_partitions"),
    ([], 1, "workloads"),
    ([1, -1], 1, "workloads"),
    ([1, 2.5], 1, "workloads"),
])
def test_rejects_invalid_arguments(workloads, k, flag):
    with pytest.raises(ValueError, match=flag):
        balance_order(workloads, k)


def test_verl_workload_rejects_invalid_lengths():
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="num_tokens"):
            verl_workload(bad)

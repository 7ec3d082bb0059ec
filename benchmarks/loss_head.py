"""Peak memory and time of the CPPO loss head (forward + backward of three passes) at TP > 1.

    python benchmarks/loss_head.py --tokens 4096 --tp 2            # CPU: gloo ranks, CUDA: nccl
    python benchmarks/loss_head.py --tokens 1024 2048 --variants cppo megatron megatron_nograd gather
    python benchmarks/loss_head.py --tokens 4096 --variants cppo --chunk-sizes 256 512 1024 2048 4096
    python benchmarks/loss_head.py --device cuda --tp 1 --tokens 4096 \
        --variants cppo cppo_triton megatron gather          # GPU: triton vs torch vs (b) vs floor

Each measurement spawns ``--tp`` fresh ranks (gloo on CPU, nccl on CUDA). Every rank holds its
vocab shard ``[T, V/tp]`` of three bf16 logits tensors (clean, I+, I-: leaves, not counted) and runs
what one CPPO micro-batch needs from the head: log-prob (with grad) and entropy (for selection) of
the clean pass, log-prob of I+, log-prob and entropy of I-, then the CPPO loss (gating off, so all
three passes carry gradients) and backward to the three logits tensors. Each logits gradient is
dropped as soon as it arrives (a hook), as the output layer's backward would consume it.

Variants:
  cppo             megatron_cppo.ops.log_probs_and_entropy, torch path (impl="torch": chunked,
                   bf16 in, fp32 per chunk)
  cppo_triton      the same API with impl="triton" (megatron_cppo/ops/triton_loss_head.py: each
                   logits row read once in forward, once in backward); CUDA, or CPU under
                   TRITON_INTERPRET=1 (slow, for checking only)
  megatron         baseline (b), as Megatron RL trainers do it (verl megatron_actor): the fp32 logits
                   (``.float()``: Float16Module's fp32_output), megatron-core
                   ``vocab_parallel_cross_entropy`` on a clone for the log-prob, and a verl-style
                   ``_VocabParallelEntropy`` (MAX, SUM, SUM; saves logits + softmax) in the graph
  megatron_nograd  baseline (b) with the entropy under no_grad (the most favourable variant of (b):
                   CPPO uses the entropy only detached)
  gather           baseline (a): all-gather the full vocabulary, fp32 ``log_softmax`` + entropy
  copy             the memory-bandwidth floor: a bf16 copy of the three logits shards (each byte
                   read once and written once; no loss, no backward)

On CUDA the table ends with the HBM floor: the three passes must read the bf16 logits once in forward
and once in backward and write the bf16 gradient once, 9 x T x V/tp x 2 bytes per rank, at the
bandwidth of a bf16 clone measured in the same run (read + write).

Peak memory is "bytes allocated above what existed before the step" (inputs excluded, gradients of
the logits included): on CUDA ``torch.cuda.max_memory_allocated``; on CPU, where torch keeps no
allocator statistics, a TorchDispatchMode that records every storage an op creates and notices when
it is freed (the same quantity, without allocator rounding or caching; an op's internal scratch
that never leaves the op is invisible). The peak resident-set growth of the rank during the same
step (VmHWM after resetting it via /proc/self/clear_refs) is printed as a cross-check on Linux.
Time: the best and the median wall time of ``--reps`` steps after the measured one (slowest rank of
each step; CUDA events on CUDA) and, on CPU, the best per-rank process CPU time (user + system, so
page faults count), which other jobs on a shared machine do not inflate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist
import torch.utils._pytree
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_cppo.parallel.launch import run_local_ranks  # noqa: E402

VARIANTS = ("cppo", "cppo_triton", "megatron", "megatron_nograd", "gather", "copy")
GIB = 1024 ** 3


# ----------------------------------------------------------------------------------------------
# memory accounting


class AllocTracker(TorchDispatchMode):
    """Live bytes of storages created by torch ops inside the mode, and their peak.

    A storage is counted when an op returns a tensor on a storage that none of its inputs had, and
    released when its weak reference expires (checked before every op, so a free is seen before the
    next allocation)."""

    def __init__(self):
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._weak = StorageWeakRef
        self.live: dict[int, tuple] = {}
        self.current = 0
        self.peak = 0

    def _poll(self):
        dead = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in dead:
            self.current -= self.live.pop(k)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._poll()
        leaves = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in inputs or key in self.live:
                continue
            self.live[key] = (self._weak(storage), storage.nbytes())
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        return out


def _proc_status(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------
# baselines


class _VocabParallelEntropy(torch.autograd.Function):
    """verl ``utils/megatron/tensor_parallel.py::_VocabParallelEntropy``, same reductions (MAX, SUM,
    SUM) and saved tensors (logits + fp32 softmax); backward mutates and restores the saved logits."""

    @staticmethod
    def forward(ctx, logits, group):
        logits_max = logits.max(dim=-1, keepdim=True).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        normalized = logits - logits_max
        exp_logits = normalized.exp_()
        sum_exp = exp_logits.sum(dim=-1, keepdim=True)
        dist.all_reduce(sum_exp, group=group)
        softmax = exp_logits.div_(sum_exp)
        sum_pz = (softmax * logits).sum(dim=-1, keepdim=True)
        dist.all_reduce(sum_pz, group=group)
        entropy = logits_max + sum_exp.log() - sum_pz
        ctx.save_for_backward(logits, softmax, sum_pz)
        return entropy.squeeze(-1)

    @staticmethod
    def backward(ctx, grad_output):
        logits, softmax, sum_pz = ctx.saved_tensors
        logits.sub_(sum_pz)
        softmax.mul_(logits)
        softmax.mul_(grad_output.unsqueeze(-1))
        logits.add_(sum_pz)
        softmax.mul_(-1)
        return softmax, None


def _megatron_pass(logits_bf16, labels, with_entropy, entropy_grad, group):
    from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy

    logits = logits_bf16.float()  # the model's fp32 output (Float16Module fp32_output=True)
    entropy = None
    if with_entropy:
        if entropy_grad:
            entropy = _VocabParallelEntropy.apply(logits, group)
        else:
            with torch.no_grad():
                entropy = _VocabParallelEntropy.apply(logits.detach(), group)
        # megatron's CE subtracts/exps in place into its input when it is fp32: clone first
        # (verl megatron_actor.py logits_processor)
        log_probs = -vocab_parallel_cross_entropy(logits.clone(), labels)
    else:
        log_probs = -vocab_parallel_cross_entropy(logits, labels)
    # with grad, the entropy keeps its graph (saved logits + softmax) for as long as the caller holds
    # it: through backward, as in verl's actors, which return it with the log-probs
    return log_probs, entropy


class _GatherVocab(torch.autograd.Function):
    """All-gather the vocab shards; backward keeps this rank's slice (every rank computes the same
    loss from the full vocabulary, so no reduction is needed)."""

    @staticmethod
    def forward(ctx, shard, group):
        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, shard.contiguous(), group=group)
        ctx.rank, ctx.width = dist.get_rank(group), shard.shape[-1]
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad[..., ctx.rank * ctx.width:(ctx.rank + 1) * ctx.width].contiguous(), None


def _gather_pass(logits_bf16, labels, with_entropy, group):
    full = _GatherVocab.apply(logits_bf16, group)
    log_softmax = torch.log_softmax(full.float(), dim=-1)
    del full
    log_probs = log_softmax.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        entropy = -(log_softmax.exp() * log_softmax).sum(-1)
    return log_probs, entropy  # kept with its graph, as in HF-style actors (entropy_from_logits)


# ----------------------------------------------------------------------------------------------
# one rank


def _step(variant, logits3, labels, group, chunk_size, num_seqs):
    """Three passes + CPPO loss + backward; returns the per-token outputs (detached)."""
    from megatron_cppo.algorithms import (
        CPPOLoss,
        CPPOLossConfig,
        CPPOMicroBatch,
        PerturbedPasses,
    )
    from megatron_cppo.ops import log_probs_and_entropy

    clean, plus, minus = logits3
    if variant == "copy":
        with torch.no_grad():
            copies = [x.detach().clone() for x in logits3]
        del copies
        return []
    if variant in ("cppo", "cppo_triton"):
        kw = dict(group=group, chunk_size=chunk_size, with_entropy=False,
                  impl="triton" if variant == "cppo_triton" else "torch")
        a, h = log_probs_and_entropy(clean, labels, **kw)
        b, _ = log_probs_and_entropy(plus, labels, **kw)
        c, hm = log_probs_and_entropy(minus, labels, **kw)
    elif variant in ("megatron", "megatron_nograd"):
        grad = variant == "megatron"
        a, h = _megatron_pass(clean, labels, True, grad, group)
        b, _ = _megatron_pass(plus, labels, False, grad, group)
        c, hm = _megatron_pass(minus, labels, True, grad, group)
    else:
        a, h = _gather_pass(clean, labels, True, group)
        b, _ = _gather_pass(plus, labels, False, group)
        c, hm = _gather_pass(minus, labels, True, group)

    shape = (num_seqs, -1)
    a_BT = a.view(shape)
    mask_BT = torch.ones_like(a_BT)
    adv_B = torch.tensor([1.0, -1.0] * (num_seqs // 2) + [1.0] * (num_seqs % 2),
                         device=a.device)
    old_BT = a_BT.detach() + 0.01
    batch = CPPOMicroBatch(
        log_probs_BT=a_BT, entropy_BT=h.view(shape), old_log_probs_BT=old_BT,
        ref_log_probs_BT=old_BT - 0.02, response_mask_BT=mask_BT, advantages_B=adv_B,
        perturbed=PerturbedPasses(sample_idx_P=torch.arange(num_seqs, device=a.device),
                                  plus_log_probs_PT=b.view(shape), minus_log_probs_PT=c.view(shape),
                                  minus_entropy_PT=hm.view(shape)))
    loss, _ = CPPOLoss(CPPOLossConfig(cpl_gating=False))(batch)
    loss.backward()  # the leaves' hooks drop each logits gradient as it arrives
    return [t.detach() for t in (a, b, c, h, hm)] + [loss.detach()]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _worker(cfg):
    """One rank (env:// variables set by megatron_cppo.parallel.launch); returns its measurements."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = cfg["device"] == "cuda"
    torch.set_num_threads(cfg["threads"])
    if cuda:
        # one GPU per rank with nccl; fewer GPUs than ranks: ranks share GPUs and talk over gloo
        # (nccl refuses two ranks on one GPU); peaks are per process either way
        num_gpus = torch.cuda.device_count()
        device = torch.device("cuda", rank % num_gpus)
        torch.cuda.set_device(device)
        backend = "nccl" if num_gpus >= world else "gloo"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    dist.init_process_group(backend)
    group = dist.group.WORLD
    variant = cfg["variant"]
    if variant.startswith("megatron"):
        from megatron.core import parallel_state as mpu

        mpu.initialize_model_parallel(tensor_model_parallel_size=world)
        group = mpu.get_tensor_model_parallel_group()

    T, V = cfg["tokens"], cfg["vocab"]
    width = V // world
    # drawn on the device: on a GPU, 3 x 16384 x 151,936 draws on one CPU thread would take longer
    # than the measurement (every variant draws the same numbers on the same device)
    gen = torch.Generator(device=device).manual_seed(1000 + rank)
    logits3 = []
    for k in range(3):
        x = torch.empty(T, width, dtype=torch.bfloat16, device=device)
        for s in range(0, T, 256):  # build in slices: no full-size fp32 temporary
            e = min(s + 256, T)
            x[s:e] = (torch.randn(e - s, width, generator=gen, device=device)
                      * (2.0 + k)).to(torch.bfloat16)
        x.requires_grad_()
        # The logits gradient is consumed by the output layer's backward and then freed; emulate
        # that so the three passes' gradients need not coexist (same for every variant).
        x.register_post_accumulate_grad_hook(lambda leaf: setattr(leaf, "grad", None))
        logits3.append(x)
    labels = torch.randint(0, V, (T,), generator=torch.Generator().manual_seed(7)).to(device)
    run = lambda: _step(variant, logits3, labels, group, cfg["chunk_size"], cfg["num_seqs"])  # noqa

    # step 1: memory (also the warm-up)
    dist.barrier()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        outs = run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        rss_peak = None
    else:
        hwm_ok = _reset_hwm()
        rss0 = _proc_status("VmRSS")
        tracker = AllocTracker()
        with tracker:
            outs = run()
        peak = tracker.peak
        rss_peak = (_proc_status("VmHWM") - rss0) if hwm_ok and rss0 is not None else None
    checksum = [o.float().cpu() for o in outs]
    del outs

    times, cpu_times = [], []
    for _ in range(cfg["reps"]):
        dist.barrier()
        _sync(device)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            # CPU time of the whole process (user + system, all threads, page faults included):
            # the work a rank did, unaffected by other jobs on a shared machine
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    result = dict(rank=rank, peak=peak, rss_peak=rss_peak, times=times, cpu_times=cpu_times)
    dist.barrier()
    if variant.startswith("megatron"):
        from megatron.core import parallel_state as mpu

        mpu.destroy_model_parallel()
    dist.destroy_process_group()
    return dict(result=result, outputs=checksum)


def measure(variant, tokens, *, tp, vocab, chunk_size, reps, device, threads, num_seqs):
    cfg = dict(variant=variant, tokens=tokens, vocab=vocab, chunk_size=chunk_size, reps=reps,
               device=device, threads=threads, num_seqs=num_seqs)
    ranks = run_local_ranks(_worker, tp, args=(cfg,))
    res = [r["result"] for r in ranks]
    rss = [r["rss_peak"] for r in res if r["rss_peak"] is not None]
    return dict(variant=variant, tokens=tokens, chunk_size=chunk_size,
                peak=max(r["peak"] for r in res), rss_peak=max(rss) if rss else None,
                # a step ends when its slowest rank does; best of the steps, since a shared machine
                # only ever adds time (the median is printed as well)
                time=min(step_times := [max(r["times"][i] for r in res) for i in range(reps)]),
                time_median=statistics.median(step_times),
                cpu_time=min(max(r["cpu_times"][i] for r in res) for i in range(reps))
                if res[0]["cpu_times"] else None,
                outputs=ranks[0]["outputs"])


def estimate_bytes(variant, tokens, vocab, tp, chunk_size, device):
    """Rough per-rank peak (for --max-gib-per-rank): fp32 copies of [T, V/tp] each variant keeps."""
    shard = tokens * (vocab // tp)
    from megatron_cppo.ops import default_chunk_size

    chunk = min(tokens, chunk_size or default_chunk_size(vocab // tp, device))
    # bytes per shard element, from measured peaks (T=1024, V=151,936, TP=2) plus a margin
    factor = {"cppo": 2 + 12 * chunk / tokens, "cppo_triton": 2.5, "megatron": 8 * 4,
              "megatron_nograd": 5.5 * 4, "gather": 7.5 * 4 * tp, "copy": 3 * 2}[variant]
    return factor * shard + 3 * 2 * shard  # + the bf16 inputs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[4096], help="tokens per micro-batch")
    p.add_argument("--vocab", type=int, default=151_936, help="vocabulary rows (Qwen: 151,936)")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks to spawn")
    p.add_argument("--variants", nargs="+", default=None, choices=VARIANTS,
                   help="default: all (cppo_triton only on CUDA or under TRITON_INTERPRET=1)")
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=[0],
                   help="chunk sizes for the cppo head (0: the default)")
    p.add_argument("--reps", type=int, default=2, help="timed steps after the measured one")
    p.add_argument("--num-seqs", type=int, default=4, help="sequences the tokens are split into")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch threads per CPU rank")
    p.add_argument("--max-gib-per-rank", type=float, default=None,
                   help="skip runs whose estimated per-rank peak exceeds this (protects small "
                        "machines; default: 0.8 x total RAM / tp on CPU, none on CUDA)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else args.device
    if args.variants is None:
        args.variants = [v for v in VARIANTS if v != "cppo_triton" or device == "cuda"
                         or os.environ.get("TRITON_INTERPRET") == "1"]
    budget = args.max_gib_per_rank
    if budget is None and device == "cpu":
        budget = 0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB / args.tp

    rows = []
    for tokens in args.tokens:
        if tokens % args.num_seqs:
            raise SystemExit(f"--tokens {tokens} must be divisible by --num-seqs {args.num_seqs}")
        for variant in args.variants:
            for chunk in (args.chunk_sizes if variant.startswith("cppo") else [0]):
                est = estimate_bytes(variant, tokens, args.vocab, args.tp, chunk or None,
                                     device) / GIB
                label = f"{variant}" + (f" chunk={chunk or 'default'}"
                                        if variant.startswith("cppo") else "")
                if budget is not None and est > budget:
                    print(f"skip T={tokens} {label}: estimated {est:.1f} GiB/rank > {budget:.1f}",
                          flush=True)
                    continue
                row = measure(variant, tokens, tp=args.tp, vocab=args.vocab,
                              chunk_size=chunk or None, reps=args.reps, device=device,
                              threads=args.threads, num_seqs=args.num_seqs)
                row["label"] = label
                rows.append(row)
                rss = f"{row['rss_peak'] / GIB:.2f}" if row["rss_peak"] is not None else "-"
                print(f"T={tokens} {label}: peak {row['peak'] / GIB:.3f} GiB (rss {rss}), "
                      f"time best {row['time']:.3f} s, median {row['time_median']:.3f} s, "
                      f"cpu {row['cpu_time'] or 0:.3f} s", flush=True)
    for tokens in args.tokens:  # outputs of every variant against the first one at that T
        group = [r for r in rows if r["tokens"] == tokens]
        for r in group:
            r["diff_vs_first"] = max(
                ((x - y).abs().max().item()
                 for x, y in zip(r["outputs"][:5], group[0]["outputs"][:5])), default=None)
    floors = _hbm_floors(args) if device == "cuda" else {}
    _print_table(rows, args, device, floors)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device, tp=args.tp, vocab=args.vocab,
                           rows=[{k: v for k, v in r.items() if k != "outputs"} for r in rows],
                           hbm_floor={str(t): dict(seconds=fl, bytes_per_s=bw)
                                      for t, (fl, bw) in floors.items()}), f, indent=1)


def _hbm_floors(args) -> dict:
    """Seconds per step at the measured copy bandwidth: 9 bf16 [T, V/tp] tensors moved per rank."""
    floors = {}
    for tokens in args.tokens:
        x = torch.empty(tokens, args.vocab // args.tp, dtype=torch.bfloat16, device="cuda")
        x.normal_()
        for _ in range(2):
            x.clone()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            x.clone()
        end.record()
        torch.cuda.synchronize()
        bandwidth = 2 * x.nbytes * 10 / (start.elapsed_time(end) / 1e3)  # bytes/s, read + write
        floors[tokens] = (9 * x.nbytes / bandwidth, bandwidth)
        del x
    return floors


def _print_table(rows, args, device, floors=None):
    print(f"\nloss head, fwd+bwd of 3 passes, V={args.vocab}, TP={args.tp}, bf16 logits, "
          f"device={device}")
    print("| T | variant | peak GiB/rank | peak RSS GiB/rank | time s (best) | time s (median) "
          "| CPU s/rank (best) | mem / (b) | time / (b) | CPU time / (b) "
          "| max abs diff of outputs vs first row |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for tokens in args.tokens:
        group = [r for r in rows if r["tokens"] == tokens]
        ref = next((r for r in group if r["variant"] == "megatron"), None)
        for r in group:
            ratio_m = f"{r['peak'] / ref['peak']:.3f}" if ref else "-"
            ratio_t = f"{r['time'] / ref['time']:.2f}" if ref else "-"
            cpu = f"{r['cpu_time']:.2f}" if r["cpu_time"] is not None else "-"
            ratio_c = f"{r['cpu_time'] / ref['cpu_time']:.2f}" if ref and ref["cpu_time"] else "-"
            diff = r["diff_vs_first"]
            rss = f"{r['rss_peak'] / GIB:.2f}" if r["rss_peak"] is not None else "-"
            print(f"| {tokens} | {r['label']} | {r['peak'] / GIB:.3f} | {rss} | {r['time']:.4f} "
                  f"| {r['time_median']:.4f} | {cpu} | {ratio_m} | {ratio_t} | {ratio_c} "
                  f"| {'-' if diff is None else f'{diff:.2e}'} |")
        if floors and tokens in floors:
            floor, bandwidth = floors[tokens]
            ratio_t = f"{floor / ref['time']:.3f}" if ref else "-"
            print(f"| {tokens} | HBM floor ({bandwidth / 1e12:.2f} TB/s copy) | - | - | "
                  f"{floor:.4f} | - | - | - | {ratio_t} | - | - |")


if __name__ == "__main__":
    main()

"""Forward + backward time of the Qwen2.5-VL model (megatron_cppo.models.qwen2_5_vl) per layout.

    python benchmarks/model_step.py                                   # CPU: tiny model, 4 layouts
    python benchmarks/model_step.py --layouts 1,1 2,1 --reps 10
    python benchmarks/model_step.py --gpu --size 3B --seq 4096        # one GPU: real size, bf16
    python benchmarks/model_step.py --gpu --forms padded packed --hf-baseline  # gpu_suite.sh
    python benchmarks/model_step.py --cpu-smoke                       # every path above, tiny, CPU

CPU mode: the tiny random model of the parity tests (vision 3 blocks x 32, LM 4 layers x 64, GQA)
in fp32 at each (tp, pp) on gloo ranks spawned here; one step = megatron's pipeline schedule over
4 micro-batches of 2 sequences of ``--seq`` tokens, each sequence with one image of
``--image-patches`` (h x w patches, h*w/4 image tokens). Prints the median step time per token and
its ratio to (1, 1), and rank 0's process CPU time per step (best of the reps: other jobs on a
shared machine inflate wall time, much less CPU time). On a 2-core machine every rank shares the
same 2 cores: the ratios measure communication and scheduling overhead, not speed-up.

GPU mode: a random-weight model with the dimensions of Qwen2.5-VL-3B (or 7B), bf16
(HalfPrecisionModule), ``--seq`` tokens per sequence of which one image of ``--image-patches``,
TP x PP over the visible GPUs (spawned ranks, nccl). Reports tokens/s and MFU against the dense
bf16 peak (``--peak-tflops``, 989 for H100/H200 SXM). Model FLOPs (fwd + bwd = 3 x forward):
  LM    2 * T * (matmul params per layer * L + h * V) + 2 * L * h * S^2 per sequence (causal half
        of the 4 * h * S^2 of QK^T and AV)
  ViT   2 * P * (block matmul params * depth) + merger + patch embed, + 2 * 2 * C * (P * window
        patches for windowed blocks, P_img^2 for full-attention blocks)
(no recomputation counted).

Forms: "padded" micro-batches are [batch, seq] rows; "packed" the same sequences back to back in
one row with cu_seqlens (megatron_cppo.models.qwen2_5_vl.packing): the same tokens and FLOPs,
the same weights, so the table's loss (the first step's mean over micro-batches, last stage) must
agree between them up to rounding.
``--hf-baseline`` also times transformers' Qwen2_5_VLForConditionalGeneration (attention "sdpa",
random weights, same micro-batches, padded) in its own process, and the table gives each run's
time relative to it.

``--memory-report`` (the suite's 7B fit check): the chunks are wrapped in megatron DDP as the
trainer trains them (fp32 gradient buffers), and a second table splits one GPU's training memory
into what was measured (weights + gradient buffers before the first step; the step's peak) and
what the trainer adds and this step does not hold, counted from the parameter count: Adam's fp32
master weights and two moments (12 bytes per parameter, divided by the data-parallel size with
--use-distributed-optimizer) and the bf16 reference model (2 bytes per parameter, none with
--reference-cpu-offload). It says whether the sum fits ``--budget-gib`` (79 GiB: an 80 GB H100
less the CUDA context) and, if not, the smallest distributed-optimizer sharding that does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

from megatron_cppo.parallel.launch import run_local_ranks  # noqa: E402


# ----------------------------------------------------------------------------------------------
# configs and batches


def tiny_hf_config():
    """The tests' tiny untied model (tests/helpers/tiny_qwen.py), with room for long sequences."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from helpers import tiny_qwen

    return tiny_qwen.hf_config(tied=False, max_position_embeddings=8192)


def make_microbatches(hf_config, *, num_mb, batch, seq, image_hw, seed=0, packed=False):
    """Micro-batches of ``batch`` sequences of ``seq`` tokens, each with one image_hw image:
    [batch, seq] rows, or (``packed``) the same sequences back to back in one row [1, batch * seq]
    with ``cu_seqlens`` and each sequence's own M-RoPE ids (the same tokens and work)."""
    from megatron_cppo.models.qwen2_5_vl import MRopeIndexConfig, mrope_position_ids_batch

    g = torch.Generator().manual_seed(seed)
    vc = hf_config.vision_config
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    h, w = image_hw
    n_img = h * w // vc.spatial_merge_size ** 2
    if n_img + 4 > seq:
        raise ValueError(f"--seq {seq} is too short for an image of {n_img} tokens")
    vocab = min(hf_config.text_config.vocab_size, hf_config.vision_start_token_id)
    rope = MRopeIndexConfig.from_hf(hf_config)
    out = []
    for _ in range(num_mb):
        ids = torch.randint(2, vocab, (batch, seq), generator=g)
        ids[:, 2] = hf_config.vision_start_token_id
        ids[:, 3:3 + n_img] = hf_config.image_token_id
        ids[:, 3 + n_img] = hf_config.vision_end_token_id
        grid = torch.tensor([[1, h, w]] * batch)
        pos, _ = mrope_position_ids_batch(ids, rope, image_grid_N3=grid)
        labels = torch.roll(ids, -1, dims=1)
        mb = dict(input_ids=ids, position_ids=pos, labels=labels, image_grid_thw=grid,
                  pixel_values=torch.randn(batch * h * w, patch_dim, generator=g))
        if packed:
            mb.update(input_ids=ids.reshape(1, -1), labels=labels.reshape(1, -1),
                      position_ids=pos.reshape(3, 1, -1),
                      cu_seqlens=torch.arange(0, batch * seq + 1, seq, dtype=torch.int32))
        out.append(mb)
    return out


def model_flops(hf_config, *, tokens_per_seq, num_seqs, image_hw) -> float:
    """fwd + bwd model FLOPs of one step (see the module doc)."""
    tc, vc = hf_config.text_config, hf_config.vision_config
    h, F, L, V = tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers, tc.vocab_size
    d = h // tc.num_attention_heads
    per_layer = h * (h + 2 * tc.num_key_value_heads * d) + h * h + 3 * h * F
    T = tokens_per_seq * num_seqs
    lm = 2 * T * (L * per_layer + h * V) + num_seqs * L * 2 * h * tokens_per_seq ** 2
    C, Fv = vc.hidden_size, vc.intermediate_size
    P_img = image_hw[0] * image_hw[1]
    P = P_img * num_seqs
    block = 4 * C * C + 3 * C * Fv
    unit = vc.spatial_merge_size ** 2
    merger = (unit * C) ** 2 + unit * C * vc.out_hidden_size
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    window = min(P_img, (vc.window_size // vc.patch_size) ** 2)
    n_full = len(vc.fullatt_block_indexes)
    attn = 4 * C * P * ((vc.depth - n_full) * window + n_full * P_img)
    vit = 2 * P * (vc.depth * block + patch_dim * C) + 2 * (P // unit) * merger + attn
    return 3.0 * (lm + vit)


# ----------------------------------------------------------------------------------------------
# one measurement on spawned ranks


def _time_steps(step, cfg) -> dict:
    """``cfg["warmup"]`` untimed calls of ``step``, then ``cfg["reps"]`` timed ones: median wall
    time, every wall time, peak GPU memory since the first call (CUDA), least CPU time of a call."""
    cuda = cfg["gpu"]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times = [], []
    for i in range(cfg["warmup"] + cfg["reps"]):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        if i >= cfg["warmup"]:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
    return dict(step_s=statistics.median(times), times=times, peak_gib=peak,
                cpu_s=min(cpu_times))


def _worker(cfg):
    """One rank (env:// variables set by megatron_cppo.parallel.launch): build the model once, time
    each of ``cfg["forms"]`` ("padded", "packed"); rank 0 returns the timings, the others None."""
    rank = int(os.environ["RANK"])
    cuda = cfg["gpu"]
    if not cuda:
        torch.set_num_threads(cfg["threads"])
    from megatron.core import tensor_parallel

    from megatron_cppo.models.qwen2_5_vl import Qwen25VLModelConfig, build_qwen2_5_vl
    from megatron_cppo.models.qwen2_5_vl.config import reference_hf_config
    from megatron_cppo.parallel import ParallelConfig, destroy_parallel, initialize_parallel
    from megatron_cppo.models.qwen2_5_vl.forward_step import run_pipeline

    state = initialize_parallel(ParallelConfig(tensor_model_parallel_size=cfg["tp"],
                                               pipeline_model_parallel_size=cfg["pp"]))
    hf = reference_hf_config(cfg["size"]) if cuda else tiny_hf_config()
    settings = Qwen25VLModelConfig(
        bf16=cuda, perform_initialization=True,
        use_cpu_initialization=not cuda, vision_parallel_mode=cfg["vision_mode"],
        attention=cfg["attention"], **cfg["recompute"])
    chunks = build_qwen2_5_vl(hf, state, settings)
    if cfg["memory_report"]:
        from megatron_cppo.training.model import wrap_ddp

        chunks = wrap_ddp(chunks, state)
    memory = dict(params=sum(p.numel() for c in chunks for p in c.parameters()),
                  static_gib=torch.cuda.memory_allocated() / 2 ** 30 if cuda else None)
    results = {}

    def loss_head(mb, logits_BSV):
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits_BSV.float(),
                                                            mb["labels"]).mean()
        return loss, {"loss": loss.detach()}

    for form in cfg["forms"]:
        mbs = make_microbatches(hf, num_mb=cfg["num_mb"], batch=cfg["batch"], seq=cfg["seq"],
                                image_hw=cfg["image_hw"], packed=form == "packed")
        mbs = [{k: v.to(state.device) for k, v in mb.items()} for mb in mbs]

        first_losses = []  # the first call's per-micro-batch losses (last stage; no update)

        def step():
            for c in chunks:
                if hasattr(c, "zero_grad_buffer"):  # megatron DDP: keep the buffers, zero them
                    c.zero_grad_buffer()
                else:
                    c.zero_grad(set_to_none=True)
            metrics = run_pipeline(chunks, mbs, loss_head)
            if not first_losses:
                first_losses.extend(float(m["loss"]) for m in metrics)
            if cuda:
                torch.cuda.synchronize()

        # the same weights and tokens in every form: padded and packed losses must agree
        results[form] = dict(_time_steps(step, cfg), **memory,
                             loss=statistics.mean(first_losses) if first_losses else None)
        del mbs
    destroy_parallel()
    return results if rank == 0 else None


def _hf_worker(cfg):
    """transformers' Qwen2_5_VLForConditionalGeneration (sdpa attention, random weights; bf16 on
    CUDA, fp32 on CPU) on the same micro-batches as the padded run: fwd + bwd with a token-mean
    cross entropy on fp32 logits, one process, no parallelism."""
    import inspect

    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_cppo.models.qwen2_5_vl.config import reference_hf_config

    cuda = cfg["gpu"]
    if not cuda:
        torch.set_num_threads(cfg["threads"])
    hf = reference_hf_config(cfg["size"]) if cuda else tiny_hf_config()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    with device:
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            hf, attn_implementation="sdpa", dtype=torch.bfloat16 if cuda else torch.float32)
    model.train()
    takes_types = "mm_token_type_ids" in inspect.signature(model.forward).parameters
    mbs = make_microbatches(hf, num_mb=cfg["num_mb"], batch=cfg["batch"], seq=cfg["seq"],
                            image_hw=cfg["image_hw"])

    def step():
        model.zero_grad(set_to_none=True)
        for mb in mbs:
            ids = mb["input_ids"].to(device)
            kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                          pixel_values=mb["pixel_values"].to(device, model.dtype),
                          image_grid_thw=mb["image_grid_thw"].to(device))
            if takes_types:  # transformers 5.x builds 3-D M-RoPE ids only with it
                kwargs["mm_token_type_ids"] = (ids == hf.image_token_id).long()
            logits = model(**kwargs).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                                     mb["labels"].to(device).flatten())
            (loss / len(mbs)).backward()
            del logits, loss
        if cuda:
            torch.cuda.synchronize()

    return _time_steps(step, cfg)


def measure(cfg: dict) -> dict:
    """{form: timings} of one layout (spawned ranks)."""
    world = cfg["tp"] * cfg["pp"]
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg["threads"]))
    return run_local_ranks(_worker, world, args=(cfg,))[0]


def measure_hf(cfg: dict) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg["threads"]))
    return run_local_ranks(_hf_worker, 1, args=(cfg,))[0]


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="real-size model in bf16 on CUDA GPUs")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny CPU run of every code path of the GPU suite (padded, packed, the "
                        "transformers baseline) at (1, 1), 1 rep: checks, not timings")
    p.add_argument("--size", default="3B", choices=("3B", "7B"), help="GPU mode model size")
    p.add_argument("--layouts", nargs="+", default=None,
                   help="tp,pp pairs (default CPU: 1,1 2,1 1,2 2,2; GPU: 1,1)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence "
                   "(default CPU 256, GPU 4096)")
    p.add_argument("--image-patches", default=None, help="h,w patches of each sequence's image "
                   "(default CPU 16,16; GPU 64,64 = 1024 image tokens)")
    p.add_argument("--batch", type=int, default=None, help="sequences per micro-batch "
                   "(default CPU 2, GPU 1)")
    p.add_argument("--num-mb", type=int, default=4, help="micro-batches per step")
    p.add_argument("--forms", nargs="+", default=["padded"], choices=("padded", "packed"),
                   help="micro-batch forms: padded [B, S] rows and/or one packed row (same work)")
    p.add_argument("--attention", default="auto", choices=("auto", "torch", "local"),
                   help="language-model core attention (Qwen25VLModelConfig.attention)")
    p.add_argument("--recompute-granularity", default=None, choices=("selective", "full"))
    p.add_argument("--recompute-method", default=None, choices=("uniform", "block"))
    p.add_argument("--recompute-num-layers", type=int, default=None)
    p.add_argument("--hf-baseline", action="store_true",
                   help="also time transformers' Qwen2.5-VL (sdpa) on the padded micro-batches")
    p.add_argument("--vision-mode", default="auto", choices=("auto", "tp", "dp_in_tp"))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="dense bf16 peak per GPU for MFU (H100/H200 SXM: 989)")
    p.add_argument("--memory-report", action="store_true",
                   help="train-like memory (megatron DDP, fp32 gradient buffers) and whether the "
                        "trainer's whole state fits --budget-gib (see the module doc)")
    p.add_argument("--budget-gib", type=float, default=79.0,
                   help="GPU memory budget of --memory-report (80 GB H100 less the context)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    a = p.parse_args(argv)
    if a.gpu and not torch.cuda.is_available():
        p.error("--gpu needs CUDA")
    if a.gpu and a.cpu_smoke:
        p.error("--cpu-smoke and --gpu exclude each other")
    if a.cpu_smoke:
        a.layouts, a.forms, a.hf_baseline = ["1,1"], ["padded", "packed"], True
        a.seq, a.image_patches, a.batch, a.num_mb = a.seq or 64, a.image_patches or "8,8", 2, 2
        a.reps, a.warmup = 1, 0
    seq = a.seq or (4096 if a.gpu else 256)
    image_hw = tuple(int(x) for x in (a.image_patches or ("64,64" if a.gpu else "16,16"))
                     .split(","))
    batch = a.batch or (1 if a.gpu else 2)
    layouts = [tuple(int(x) for x in s.split(",")) for s in
               (a.layouts or (["1,1"] if a.gpu else ["1,1", "2,1", "1,2", "2,2"]))]
    recompute = {k: v for k, v in (("recompute_granularity", a.recompute_granularity),
                                   ("recompute_method", a.recompute_method),
                                   ("recompute_num_layers", a.recompute_num_layers)) if v}
    if a.gpu:
        from megatron_cppo.models.qwen2_5_vl.config import reference_hf_config

        hf = reference_hf_config(a.size)
    else:
        hf = tiny_hf_config()
    flops = model_flops(hf, tokens_per_seq=seq, num_seqs=batch * a.num_mb, image_hw=image_hw)
    tokens = seq * batch * a.num_mb
    what = f"gpu {a.size} bf16" if a.gpu else "cpu tiny fp32"
    print(f"{what}: {a.num_mb} micro-batches x {batch} x {seq} tokens, image {image_hw[0]}x"
          f"{image_hw[1]} patches per sequence, attention {a.attention}, "
          f"{'recompute ' + str(recompute) + ', ' if recompute else ''}{a.reps} reps (median)",
          flush=True)
    base_cfg = dict(gpu=a.gpu, size=a.size, seq=seq, image_hw=image_hw, batch=batch,
                    num_mb=a.num_mb, vision_mode=a.vision_mode, reps=a.reps, warmup=a.warmup,
                    threads=a.threads, attention=a.attention, recompute=recompute,
                    forms=a.forms, memory_report=a.memory_report)
    rows = []

    def add_row(name, tp, pp, r):
        row = dict(name=name, tp=tp, pp=pp, step_s=r["step_s"], us_per_token=r["step_s"] / tokens
                   * 1e6, tokens_per_s=tokens / r["step_s"],
                   mfu=flops / r["step_s"] / (a.peak_tflops * 1e12 * tp * pp) if a.gpu else None,
                   peak_gib=r["peak_gib"], cpu_s=r["cpu_s"], params=r.get("params"),
                   static_gib=r.get("static_gib"), loss=r.get("loss"))
        row["rel_to_first"] = row["us_per_token"] / rows[0]["us_per_token"] if rows else 1.0
        rows.append(row)
        extra = (f"  MFU {row['mfu']:.1%}  peak {row['peak_gib']:.1f} GiB" if a.gpu
                 else f"  rank-0 CPU time {r['cpu_s'] * 1e3:.1f} ms (best)")
        print(f"  {name} tp={tp} pp={pp}: step {r['step_s'] * 1e3:8.1f} ms  "
              f"{row['us_per_token']:8.2f} us/token  x{row['rel_to_first']:.2f} vs first  "
              f"{row['tokens_per_s']:9.0f} tokens/s{extra}", flush=True)

    for tp, pp in layouts:
        res = measure(dict(base_cfg, tp=tp, pp=pp))
        for form in a.forms:
            add_row(f"megatron_cppo {form}", tp, pp, res[form])
    if a.hf_baseline:
        add_row("transformers sdpa", 1, 1, measure_hf(base_cfg))
    _print_table(rows, what, a.gpu)
    if a.memory_report:
        _print_memory(rows, what, a.budget_gib)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(args=vars(a), model_flops_per_step=flops, rows=rows), f, indent=1)
    return rows


def _print_table(rows, what, gpu):
    hf = next((r for r in rows if r["name"].startswith("transformers")), None)
    print(f"\nmodel step (fwd + bwd), {what}")
    print("| run | tp | pp | step ms (median) | rank-0 CPU ms (best) | tokens/s "
          "| time / transformers | MFU | peak GiB | loss (first step) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['step_s'] / hf['step_s']:.2f}" if hf else "-"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        loss = f"{r['loss']:.5f}" if r.get("loss") is not None else "-"
        print(f"| {r['name']} | {r['tp']} | {r['pp']} | {r['step_s'] * 1e3:.1f} "
              f"| {r['cpu_s'] * 1e3:.1f} "
              f"| {r['tokens_per_s']:.0f} | {ratio} | {mfu} | {peak} | {loss} |")


def memory_budget(params: int, static_gib: float, peak_gib: float, budget_gib: float) -> dict:
    """One GPU's training memory from a measured step (see the module doc): the step's peak plus
    Adam's fp32 state (12 B / parameter) and the bf16 reference model (2 B / parameter), and the
    smallest data-parallel sharding of the Adam state that fits ``budget_gib``, with the
    reference on the GPU and offloaded (None: no sharding does)."""
    adam = 12 * params / 2 ** 30
    ref = 2 * params / 2 ** 30
    total = peak_gib + adam + ref

    def shards(room):
        return None if room <= 0 else max(1, math.ceil(adam / room))

    return dict(params=params, static_gib=static_gib, peak_gib=peak_gib,
                activations_gib=peak_gib - static_gib, adam_gib=adam, reference_gib=ref,
                total_gib=total, fits=total <= budget_gib,
                min_dp_shards=shards(budget_gib - peak_gib - ref),
                min_dp_shards_ref_offload=shards(budget_gib - peak_gib))


def _print_memory(rows, what, budget_gib):
    print(f"\ntraining memory on one GPU, {what} (budget {budget_gib:.1f} GiB)")
    print("| run | parameters | weights + grad buffers (measured) | step peak (measured) "
          "| activations + workspace | + Adam state | + reference | total | fits | "
          "distributed optimizer needs DP >= | same, reference offloaded |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("params") is None:
            continue
        if r["peak_gib"] is None:
            print(f"| {r['name']} | {r['params']:,} | not measured on CPU "
                  "| | | | | | | | |")
            continue
        m = memory_budget(r["params"], r["static_gib"], r["peak_gib"], budget_gib)
        need = ["none fits" if n is None else n
                for n in (m["min_dp_shards"], m["min_dp_shards_ref_offload"])]
        print(f"| {r['name']} | {m['params']:,} | {m['static_gib']:.1f} GiB "
              f"| {m['peak_gib']:.1f} GiB | {m['activations_gib']:.1f} GiB "
              f"| {m['adam_gib']:.1f} GiB | {m['reference_gib']:.1f} GiB | {m['total_gib']:.1f} GiB "
              f"| {'yes' if m['fits'] else 'no'} | {need[0]} | {need[1]} |")


if __name__ == "__main__":
    main()

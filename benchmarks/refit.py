"""Refit throughput (megatron ranks -> vLLM engine process) against writing the same tensors to disk.

    python benchmarks/refit.py                          # tiny and 0.5b, TP 2 x PP 1, CPU
    python benchmarks/refit.py --sizes 0.5b --tp 1 --pp 2 --reps 3
    python benchmarks/refit.py --sizes 3b --device cuda  # GPU machine (prepared, not run yet)

Per size: a random bf16 Qwen2.5-VL checkpoint in HF format (plus the tests' tiny tokenizer and
processor: the vocabulary rows are what they are, only ``valid_vocab`` is small) is written, a vLLM
engine process (``placement="process"``, bf16) is started on it, and megatron ranks at TP x PP with
random bf16 weights measure, in the same run, each repeated ``--reps`` times (median):
  (a) stream     the refit's producer alone: TP gathers + mapping.py to HF names/layout + cast,
                 tensors dropped (what any transport must pay);
  (b) disk       (a) written as safetensors by every stage's TP rank 0 into a temporary folder
                 (``ShardedSafetensorsWriter``, not fsynced: page cache) - what a path-based
                 ``reload_weights`` would need before vLLM even reads it;
  (c) refit      ``rollout.refit.refit``: (a) + shared-memory buckets + vLLM's layerwise reload +
                 cache resets, until the engine reports the new version.
MB/s = HF checkpoint bytes / seconds (time on global rank 0, from a barrier to the end of the
call). Peak extra MB: the largest rise of RssAnon + RssShmem over a call, on any rank (the bound to
check: one bucket plus a gathered tensor, not the model). Sizes: tiny = the rollout tests' model; 0.5b = Qwen2.5-0.5B's LM (24 x 896, 14 heads / 2
KV groups, FFN 4864, vocabulary 151936, untied) with a 4-block ViT of 640; 3b = Qwen2.5-VL-3B.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "rollout"))

SIZES = {
    "tiny": dict(text=dict(vocab_size=512, hidden_size=128, intermediate_size=256,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2),
                 vision=dict(depth=2, hidden_size=64, intermediate_size=64, num_heads=2,
                             fullatt_block_indexes=[1]),
                 tied=False),
    "0.5b": dict(text=dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                           num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2),
                 vision=dict(depth=4, hidden_size=640, intermediate_size=1280, num_heads=10,
                             fullatt_block_indexes=[1, 3]),
                 tied=False),
    "3b": dict(text=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                         num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2),
               vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           fullatt_block_indexes=[7, 15, 23, 31]),
               tied=True),
}


def hf_config(size: str):
    from transformers import Qwen2_5_VLConfig

    spec = SIZES[size]
    head_dim = spec["text"]["hidden_size"] // spec["text"]["num_attention_heads"]
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]  # 64 -> [8,12,12]
    text = dict(spec["text"], rms_norm_eps=1e-6, max_position_embeddings=4096,
                bos_token_id=400, eos_token_id=402,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": section},
                tie_word_embeddings=spec["tied"])
    vision = dict(spec["vision"], in_channels=3, patch_size=14, temporal_patch_size=2,
                  spatial_merge_size=2, window_size=112,
                  out_hidden_size=spec["text"]["hidden_size"], hidden_act="silu")
    ids = dict(image_token_id=412, video_token_id=413, vision_start_token_id=409,
               vision_end_token_id=410)  # the tiny tokenizer's specials
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                              tie_word_embeddings=spec["tied"], dtype="bfloat16", **ids)
    # without it vLLM guesses the model class (it picked a pooling adapter, whose weight loading
    # fails on reload)
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return config


def write_checkpoint(path: Path, config) -> int:
    """Random bf16 tensors of every expected shape, streamed into safetensors. Returns bytes."""
    import torch

    from megatron_cppo.checkpoint.safetensors_io import ShardedSafetensorsWriter
    from megatron_cppo.convert.hf_source import expected_hf_shapes
    import tiny_vl

    path.mkdir(parents=True)
    shapes = expected_hf_shapes(config)
    writer = ShardedSafetensorsWriter(path, [(k, s, torch.bfloat16) for k, s in shapes.items()],
                                      max_shard_bytes=2 * 1024 ** 3)
    g = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g) * 0.02
        writer.write(name, (t + 1.0 if "norm" in name or "ln_q" in name else t).bfloat16())
    writer.close()
    config.save_pretrained(path)
    tiny_vl.write_tokenizer_and_processor(str(path))
    return writer.bytes_written


# ----------------------------------------------------------------------------------------------
# megatron ranks


class PeakRss:
    """Peak of RssAnon + RssShmem of this process (sampled every 5 ms in a thread): the refit's
    extra memory is gathered tensors (anonymous) plus the shared-memory bucket (shmem)."""

    def __init__(self):
        import threading

        self.base = self.peak = self._now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _now() -> int:
        total = 0
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssShmem:")):
                    total += int(line.split()[1]) * 1024
        return total

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._now())

    def stop(self) -> int:
        """Peak bytes above the level at construction."""
        self._stop.set()
        self._thread.join()
        return max(self.peak, self._now()) - self.base


def _rank(ckpt: str, tp: int, pp: int, target, bucket_bytes: int, reps: int, scratch: str):
    import torch
    import torch.distributed as dist

    from megatron_cppo.checkpoint.safetensors_io import ShardedSafetensorsWriter
    from megatron_cppo.models.qwen2_5_vl import Qwen25VLModelConfig, build_qwen2_5_vl
    from megatron_cppo.parallel import ParallelConfig, destroy_parallel, initialize_parallel
    from megatron_cppo.rollout.refit import StageModel, iter_hf_tensors, refit, stage_manifest

    state = initialize_parallel(ParallelConfig(tensor_model_parallel_size=tp,
                                               pipeline_model_parallel_size=pp))
    torch.manual_seed(state.rank)
    chunks = build_qwen2_5_vl(ckpt, state, Qwen25VLModelConfig(
        bf16=True, perform_initialization=True))
    stage = StageModel.from_chunks(chunks)
    dtype = torch.bfloat16

    def stream():
        for _ in iter_hf_tensors(stage, state.tp_group, dtype):
            pass

    def disk():
        out = Path(scratch) / f"stage{state.pp_rank}"
        writer = None
        if state.tp_rank == 0:
            manifest = stage_manifest(stage, state.tp_size, dtype)
            writer = ShardedSafetensorsWriter(out, [(k, s, dtype) for k, (s, _) in
                                                    manifest.items()],
                                              max_shard_bytes=2 * 1024 ** 3)
            out.mkdir(parents=True, exist_ok=True)
        for name, t in iter_hf_tensors(stage, state.tp_group, dtype):
            writer.write(name, t)
        if writer is not None:
            writer.close()

    def push():
        return refit(stage, state, target, bucket_bytes=bucket_bytes)

    import gc

    times = {"stream": [], "disk": [], "refit": []}
    extra = {"stream": [], "disk": [], "refit": []}
    version = None
    for _ in range(reps):
        for name, fn in (("stream", stream), ("disk", disk), ("refit", push)):
            gc.collect()
            dist.barrier()
            peak = PeakRss()
            t0 = time.perf_counter()
            result = fn()
            dist.barrier()
            times[name].append(time.perf_counter() - t0)
            extra[name].append(peak.stop())
            if name == "refit":
                version = result.version
            if name == "disk" and state.tp_rank == 0:
                shutil.rmtree(Path(scratch) / f"stage{state.pp_rank}", ignore_errors=True)
    destroy_parallel()
    largest = max(p.numel() * p.element_size() for p in stage.params.values())
    return {"times": times, "extra": extra, "version": version, "largest_param": largest,
            "params": sum(p.numel() * p.element_size() for p in stage.params.values())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="tiny,0.5b", help="comma list of " + ",".join(SIZES))
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--bucket-mb", type=int, default=256)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: ranks on NCCL, the engine process on the same GPU "
                   "(prepared; not run yet)")
    p.add_argument("--workdir", default=None, help="where checkpoints go (default: a tmp dir)")
    args = p.parse_args(argv)
    import torch

    if (args.device == "cuda") != torch.cuda.is_available():
        p.error(f"--device {args.device} but CUDA is {'' if torch.cuda.is_available() else 'not '}"
                f"available")

    from megatron_cppo.parallel.launch import run_local_ranks
    from megatron_cppo.rollout import RolloutConfig
    from megatron_cppo.rollout.process import EngineProcess

    work = Path(args.workdir or tempfile.mkdtemp(prefix="mcppo_refit_bench_"))
    rows = []
    try:
        for size in args.sizes.split(","):
            ckpt = work / size
            t0 = time.perf_counter()
            nbytes = write_checkpoint(ckpt, hf_config(size))
            print(f"[{size}] checkpoint {nbytes / 2**20:.1f} MB written in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
            t0 = time.perf_counter()
            engine = EngineProcess(RolloutConfig(
                model_path=str(ckpt), dtype="bfloat16", max_model_len=512, max_num_seqs=4,
                refit_bucket_mb=args.bucket_mb, rollout_gpu_memory_utilization=0.3))
            print(f"[{size}] engine up in {time.perf_counter() - t0:.1f} s", flush=True)
            try:
                scratch = tempfile.mkdtemp(prefix="disk_", dir=work)
                results = run_local_ranks(_rank, args.tp * args.pp, what=f"refit bench {size}",
                                          args=(str(ckpt), args.tp, args.pp, engine.target,
                                                args.bucket_mb * 2 ** 20, args.reps, scratch))
                assert engine.version == args.reps == results[0]["version"]
            finally:
                engine.shutdown()
            times = results[0]["times"]
            disk = statistics.median(times["disk"])
            for name in ("stream", "disk", "refit"):
                sec = statistics.median(times[name])
                peak = max(max(r["extra"][name]) for r in results) / 2**20
                rows.append((size, nbytes, name, sec, nbytes / 2**20 / sec, disk / sec, peak))
            print(f"[{size}] rank 0 holds {results[0]['params'] / 2**20:.1f} MB of parameters, "
                  f"largest local {results[0]['largest_param'] / 2**20:.1f} MB", flush=True)
            shutil.rmtree(ckpt, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nTP {args.tp} x PP {args.pp}, bucket {args.bucket_mb} MB, {args.device}, "
          f"median of {args.reps}")
    print("| size | HF MB | path | seconds | MB/s | speed vs disk | peak extra MB (any rank) |")
    print("|---|---|---|---|---|---|---|")
    for size, nbytes, name, sec, mbs, ratio, peak in rows:
        print(f"| {size} | {nbytes / 2**20:.1f} | {name} | {sec:.3f} | {mbs:.0f} | {ratio:.2f}x "
              f"| {peak:.0f} |")


if __name__ == "__main__":
    main()

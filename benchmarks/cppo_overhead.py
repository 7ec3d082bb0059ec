"""Update-phase time of CPPO vs GRPO vs CPPO without the gated-out skip, same batch and model.

    python benchmarks/cppo_overhead.py                      # CPU: tiny model, one process
    python benchmarks/cppo_overhead.py --prompts 8 --n 5 --response 64 --reps 3

One recorded rollout batch (``--prompts`` prompts with one image each, ``--n`` responses per
prompt, random rewards) goes through the trainer's update (``training/update.py``: one optimizer
step per call, megatron's schedule, the vocab-parallel head, CPPOLoss) three ways:
  grpo        --cpl-coef 0: the clean pass only
  cppo        the default: I+ and I- views only for responses with advantage > 0 (fraction f)
  cppo_noskip the I+/I- views of every response (what the reference recipe runs)
  cppo_packed the default with --sequence-packing: each micro-batch's rows (every view) back to
              back in one row, no padding tokens
Prints the median time per update and the ratios to GRPO next to the target 1 + 2f (the perturbed
passes cost about what the clean pass costs per sample; the reference pays about 3x), and packed
against padded. Response lengths are ``--response`` tokens, or uniform in [``--response-min``,
``--response``] (padding is what packing saves).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.model_step import tiny_hf_config  # noqa: E402


def make_samples(hf_config, *, prompts, n, response, image_hw, response_min=None, seed=0):
    from megatron_cppo.algorithms import grpo_advantages
    from megatron_cppo.training.batch import Sample

    g = torch.Generator().manual_seed(seed)
    vc = hf_config.vision_config
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    h, w = image_hw
    vocab = hf_config.vision_start_token_id
    out = []
    for p in range(prompts):
        ids = torch.cat([torch.randint(2, vocab, (4,), generator=g),
                         torch.tensor([hf_config.vision_start_token_id]),
                         torch.full((h * w // 4,), hf_config.image_token_id),
                         torch.tensor([hf_config.vision_end_token_id]),
                         torch.randint(2, vocab, (12,), generator=g)])
        pixels = torch.randn(h * w, patch_dim, generator=g)
        for _ in range(n):
            length = response if response_min is None else int(
                torch.randint(response_min, response + 1, (), generator=g))
            s = Sample(prompt_ids=ids, response_ids=torch.randint(2, vocab, (length,),
                                                                  generator=g),
                       group_id=p, pixel_values=pixels, image_grid_thw=torch.tensor([[1, h, w]]),
                       plus_pixel_values=0.9 * pixels,
                       minus_pixel_values=torch.randn(h * w, patch_dim, generator=g))
            s.reward = float(torch.rand((), generator=g) > 0.6)
            out.append(s)
    adv = grpo_advantages(torch.tensor([s.reward for s in out]),
                          torch.tensor([s.group_id for s in out]))
    for s, a in zip(out, adv.tolist()):
        s.advantage = a
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--n", type=int, default=5)
    p.add_argument("--response", type=int, default=48, help="response tokens per sample")
    p.add_argument("--response-min", type=int, default=None,
                   help="response lengths uniform in [this, --response] (default: all equal)")
    p.add_argument("--image-patches", default="8,8", help="h,w patches of each prompt's image")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
        os.environ.setdefault(k, v)
    from megatron_cppo.parallel.launch import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    from megatron_cppo.algorithms import CPPOLoss, CPPOLossConfig
    from megatron_cppo.models.qwen2_5_vl import MRopeIndexConfig, Qwen25VLModelConfig
    from megatron_cppo.parallel import ParallelConfig, destroy_parallel, initialize_parallel
    from megatron_cppo.training.config import OptimizerConfig
    from megatron_cppo.training.model import build_policy
    from megatron_cppo.training.update import UpdateContext, compute_log_probs, update_mini_batch

    hf = tiny_hf_config()
    state = initialize_parallel(ParallelConfig())
    h, w = (int(x) for x in args.image_patches.split(","))
    samples = make_samples(hf, prompts=args.prompts, n=args.n, response=args.response,
                           response_min=args.response_min, image_hw=(h, w))
    f = sum(s.advantage > 0 for s in samples) / len(samples)
    policy = build_policy(hf, state, Qwen25VLModelConfig(perform_initialization=True),
                          OptimizerConfig(lr=1e-6))
    variants = {"grpo": (0.0, False, False), "cppo": (0.01, False, False),
                "cppo_noskip": (0.01, True, False), "cppo_packed": (0.01, False, True)}
    times = {}
    for name, (cpl, perturb_all, packing) in variants.items():
        ctx = UpdateContext(state=state, rope_cfg=MRopeIndexConfig.from_hf(hf),
                            micro_batch_size=args.micro_batch_size, perturb_all=perturb_all,
                            sequence_packing=packing)
        for s, lp in zip(samples, compute_log_probs(policy.chunks, samples, ctx)):
            s.old_log_probs, s.ref_log_probs = lp, lp
        loss_fn = CPPOLoss(CPPOLossConfig(cpl_coef=cpl))
        runs = []
        for i in range(args.reps + 1):
            t0 = time.perf_counter()
            update_mini_batch(policy.chunks, policy.optimizer, samples, loss_fn, ctx)
            if i:  # the first call warms up
                runs.append(time.perf_counter() - t0)
        times[name] = statistics.median(runs)
    destroy_parallel()
    lengths = [s.response_ids.numel() for s in samples]
    print(f"{len(samples)} responses ({args.prompts} prompts x {args.n}), {min(lengths)}-"
          f"{max(lengths)} response tokens (mean {statistics.mean(lengths):.1f}), {h}x{w}-patch "
          f"images, micro-batch {args.micro_batch_size}; f = {f:.2f} (advantage > 0)")
    print("| variant | update s | / grpo | target |")
    print("|---|---|---|---|")
    for name, t in times.items():
        target = {"grpo": "1", "cppo": f"<= {1 + 2 * f:.2f}", "cppo_noskip": "~3",
                  "cppo_packed": "<= cppo"}[name]
        print(f"| {name} | {t:.3f} | {t / times['grpo']:.2f} | {target} |")
    print(f"packed / padded (cppo): {times['cppo_packed'] / times['cppo']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

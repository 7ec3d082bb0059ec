"""megatron_cppo training entry (launch with torchrun; Megatron-style flags).

    torchrun --nproc-per-node 4 -m megatron_cppo.train --tensor-model-parallel-size 2 \
        --pipeline-model-parallel-size 2

Current state: the CPPO trainer (Qwen2.5-VL, vLLM rollouts, GRPO + CPL) is not built yet. Until it is,
this entry trains the tiny Qwen2-like toy GPT (megatron_cppo/toy_gpt.py) on synthetic tokens through
the same machinery the trainer will use: megatron parallel state at any (tp, pp, dp), the pipeline
schedule, megatron DDP, finalize_model_grads and the Megatron optimizer. It prints the loss each
step; the same seed gives the same losses at every layout (tests/test_layout_parity.py).
Without torchrun it runs as a single process (tp = pp = 1).
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--no-batch-p2p-comm", action="store_true",
                   help="send/receive pipeline activations one by one instead of batched")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard optimizer state across data-parallel ranks")
    g = p.add_argument_group("training")
    g.add_argument("--train-iters", type=int, default=10)
    g.add_argument("--micro-batch-size", type=int, default=2)
    g.add_argument("--global-batch-size", type=int, default=16,
                   help="sequences per optimizer step, over all data-parallel ranks")
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def print0(*args):
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, flush=True)


def main(argv=None) -> list[float]:
    args = parse_args(argv)
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29511").items():
        os.environ.setdefault(key, value)  # plain `python -m megatron_cppo.train`: one process

    from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                           finalize_model_grads)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_cppo import toy_gpt
    from megatron_cppo.parallel import ParallelConfig, destroy_parallel, initialize_parallel

    ps = initialize_parallel(ParallelConfig(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        batch_p2p_comm=not args.no_batch_p2p_comm, seed=args.seed))
    per_step = args.micro_batch_size * ps.dp_size
    if args.global_batch_size % per_step:
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by "
                         f"--micro-batch-size {args.micro_batch_size} x data-parallel size "
                         f"{ps.dp_size}")
    num_microbatches = args.global_batch_size // per_step

    cfg = toy_gpt.ToyGPTConfig(micro_batch_size=args.micro_batch_size, seed=args.seed)
    model = toy_gpt.build_model(cfg, ps)
    toy_gpt.load_full_state_dict(model, toy_gpt.full_state_dict(cfg), cfg, ps)
    model.config.finalize_model_grads_func = finalize_model_grads
    ddp = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=args.use_distributed_optimizer),
        model, pg_collection=ps.pg_collection)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=args.lr, weight_decay=args.weight_decay,
                        clip_grad=args.clip_grad,
                        use_distributed_optimizer=args.use_distributed_optimizer),
        [ddp], use_gloo_process_groups=False, pg_collection=ps.pg_collection)
    print0(f"toy GPT, world {ps.world_size}: tp={ps.tp_size} pp={ps.pp_size} dp={ps.dp_size}, "
           f"{num_microbatches} micro-batches of {args.micro_batch_size} per rank per step")

    losses = []
    for step in range(args.train_iters):
        t0 = time.perf_counter()
        # the same global batch split over data-parallel ranks, whatever the layout
        batch = toy_gpt.synthetic_microbatches(cfg, num_microbatches * ps.dp_size, seed=step)
        mine = batch[ps.dp_rank * num_microbatches:(ps.dp_rank + 1) * num_microbatches]
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        mb_losses = toy_gpt.forward_backward([ddp], mine, cfg, ps)
        ok, grad_norm, _ = optimizer.step()
        # mean loss over the global batch: last stage holds it; share over DP, then to PP rank 0
        loss = torch.tensor([sum(mb_losses) / max(len(mb_losses), 1) if ps.is_last_stage else 0.0])
        torch.distributed.all_reduce(loss, group=ps.dp_group)
        torch.distributed.all_reduce(loss, group=ps.pp_group)
        loss = loss.item() / ps.dp_size
        losses.append(loss)
        print0(f"step {step + 1}/{args.train_iters} loss {loss:.6f} grad_norm {grad_norm:.4f} "
               f"{'ok' if ok else 'SKIPPED (non-finite grads)'} {time.perf_counter() - t0:.2f}s")
    destroy_parallel()
    return losses


if __name__ == "__main__":
    main()

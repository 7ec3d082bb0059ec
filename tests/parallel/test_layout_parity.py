"""Layout parity of megatron-core on CPU/gloo (the acceptance of the foundation issue).

One 4-rank launch runs a tiny Qwen2-like GPTModel (local spec, qkv bias, GQA 4 heads / 2 groups,
RMSNorm, SwiGLU, RoPE, tied embeddings, 4 layers) at (tp, pp) = (1,1), (2,1), (1,2), (2,2) with data
parallel taking the rest of the 4 ranks, over the same global batch of 8 micro-batches, through
``get_forward_backward_func``, megatron DDP, ``finalize_model_grads`` and the Megatron optimizer
(Adam with grad clipping; plain and distributed). Every layout starts from the same full weights.

Proven: per-micro-batch losses, every gradient shard (including the tied embedding on both pipeline
ends), the grad norm and every parameter after one optimizer step equal the (1,1) run within fp32
reduction-order tolerance (rtol 1e-4, atol 2e-6 for losses/grads, atol 1e-5 for parameters).
Not proven here: bf16, virtual pipeline (only its guard), sequence parallelism.
"""

import pytest
import torch

from helpers.distributed import run_on_ranks

pytestmark = pytest.mark.slow  # four layouts on 4 ranks

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
NUM_MICROBATCHES = 8
CLIP_GRAD = 0.5


def _one_layout(tp, pp, distributed_optimizer, cfg, microbatches):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from helpers import toy_gpt
    from megatron_cppo.parallel import ParallelConfig, destroy_parallel, initialize_parallel

    ps = initialize_parallel(ParallelConfig(tensor_model_parallel_size=tp,
                                            pipeline_model_parallel_size=pp))
    try:
        model = toy_gpt.build_model(cfg, ps)
        toy_gpt.load_full_state_dict(model, toy_gpt.full_state_dict(cfg), cfg, ps)
        tcfg = model.config
        ddp = DistributedDataParallel(
            tcfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                use_distributed_optimizer=distributed_optimizer),
            model, pg_collection=ps.pg_collection)
        tcfg.finalize_model_grads_func = finalize_model_grads
        opt = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.01, clip_grad=CLIP_GRAD,
                            # eps well above the reduction-order noise of near-zero gradients,
                            # which Adam would otherwise amplify to +-lr
                            adam_eps=1e-3,
                            use_distributed_optimizer=distributed_optimizer),
            [ddp], use_gloo_process_groups=False, pg_collection=ps.pg_collection)
        ddp.zero_grad_buffer()
        opt.zero_grad()
        per_dp = len(microbatches) // ps.dp_size
        mine = list(range(ps.dp_rank * per_dp, (ps.dp_rank + 1) * per_dp))
        losses = toy_gpt.forward_backward([ddp], [microbatches[i] for i in mine], cfg, ps)
        grads = {}
        if not distributed_optimizer:  # with it, each rank holds only its reduce-scattered part
            grads = {toy_gpt.global_name(n, cfg, ps): p.main_grad.detach().clone()
                     for n, p in ddp.module.named_parameters()}
        ok, grad_norm, _ = opt.step()
        params = {toy_gpt.global_name(n, cfg, ps): p.detach().clone()
                  for n, p in ddp.module.named_parameters()}
        return dict(tp=tp, pp=pp, tp_rank=ps.tp_rank, pp_rank=ps.pp_rank, last=ps.is_last_stage,
                    losses=dict(zip(mine, losses)), ok=ok, grad_norm=grad_norm, grads=grads,
                    params=params)
    finally:
        destroy_parallel(keep_process_group=True)


def _all_layouts(ranks, cfg):
    from helpers import toy_gpt

    microbatches = toy_gpt.synthetic_microbatches(cfg, NUM_MICROBATCHES, seed=7)
    out = []
    for dist_opt in (False, True):
        for tp, pp in LAYOUTS:
            out.append(_one_layout(tp, pp, dist_opt, cfg, microbatches))
    return out


@pytest.fixture(scope="module")
def layout_runs():
    from helpers.toy_gpt import ToyGPTConfig

    cfg = ToyGPTConfig()
    per_rank = run_on_ranks(_all_layouts, 4, megatron=False, args=(cfg,), timeout=600)
    runs = {}  # (dist_opt, tp, pp) -> list of per-rank records
    for rank_records in per_rank:
        for i, rec in enumerate(rank_records):
            runs.setdefault((i >= len(LAYOUTS), rec["tp"], rec["pp"]), []).append(rec)
    return cfg, runs


def _full_reference(runs, dist_opt, what):
    (rec, *_) = runs[(dist_opt, 1, 1)]
    return rec[what]


def _expected_shard(full, name, rec, cfg):
    """Slice the (1,1) tensor the way this record's rank holds it (see toy_gpt.tp_slice)."""
    if rec["tp"] == 1:
        return full
    column = (".linear_qkv.", ".linear_fc1.", "word_embeddings", "output_layer")
    row = (".linear_proj.weight", ".linear_fc2.weight")
    if "linear_fc1.weight" in name:
        gate, up = full.chunk(2, 0)
        return torch.cat([gate.chunk(rec["tp"], 0)[rec["tp_rank"]],
                          up.chunk(rec["tp"], 0)[rec["tp_rank"]]])
    if any(k in name for k in column):
        return full.chunk(rec["tp"], 0)[rec["tp_rank"]]
    if any(k in name for k in row):
        return full.chunk(rec["tp"], 1)[rec["tp_rank"]]
    return full


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_losses_equal(layout_runs, layout):
    cfg, runs = layout_runs
    for dist_opt in (False, True):
        ref = {}
        for rec in runs[(dist_opt, 1, 1)]:
            ref.update(rec["losses"])
        got = {}
        for rec in runs[(dist_opt, *layout)]:
            got.update(rec["losses"])
        assert sorted(ref) == sorted(got) == list(range(NUM_MICROBATCHES))
        for k in ref:
            assert abs(ref[k] - got[k]) <= 2e-6 + 1e-4 * abs(ref[k]), (dist_opt, layout, k)


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_gradients_equal(layout_runs, layout):
    cfg, runs = layout_runs
    full = _full_reference(runs, False, "grads")
    seen = set()
    for rec in runs[(False, *layout)]:
        for name, g in rec["grads"].items():
            exp = _expected_shard(full[name], name, rec, cfg)
            torch.testing.assert_close(g, exp, rtol=1e-4, atol=2e-6, msg=lambda m: f"{layout} {name}: {m}")
            seen.add(name)
    assert seen == set(full), f"{layout}: parameters missing {set(full) - seen}"


@pytest.mark.parametrize("dist_opt", [False, True], ids=["adam", "distributed-adam"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_optimizer_step_equal(layout_runs, layout, dist_opt):
    cfg, runs = layout_runs
    full = _full_reference(runs, False, "params")  # plain Adam at (1,1) is the reference
    ref_norm = _full_reference(runs, False, "grad_norm")
    assert ref_norm > CLIP_GRAD, "grad norm must exceed clip_grad so that clipping is exercised"
    for rec in runs[(dist_opt, *layout)]:
        assert rec["ok"]
        assert abs(rec["grad_norm"] - ref_norm) <= 1e-4 * ref_norm
        for name, p in rec["params"].items():
            exp = _expected_shard(full[name], name, rec, cfg)
            torch.testing.assert_close(p, exp, rtol=1e-4, atol=1e-5, msg=lambda m: f"{layout} {name}: {m}")
    # the step moved the weights (a no-op optimizer would pass the comparisons above)
    from helpers import toy_gpt

    start = toy_gpt.full_state_dict(cfg)
    moved = max((full[n] - start[n]).abs().max().item() for n in full)
    assert moved > 1e-3


def test_tied_embedding_copies_identical(layout_runs):
    cfg, runs = layout_runs
    for dist_opt in (False, True):
        recs = runs[(dist_opt, 1, 2)]
        first = [r for r in recs if r["pp_rank"] == 0][0]["params"]
        last = [r for r in recs if r["pp_rank"] == 1][0]["params"]
        name = "embedding.word_embeddings.weight"
        assert torch.equal(first[name], last[name])

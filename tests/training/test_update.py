"""The CPPO update through megatron's schedule on a tiny Qwen2.5-VL.

One recorded rollout batch (8 responses to 2 prompts, one with an image and its I+/I- views, one
text-only; saved with torch.save) goes through the whole update path: old and reference log-probs
(forward-only), then one optimizer step with the stacked clean/I+/I- views, at (tp, pp) = (1, 1)
with data parallel 2, (2, 1) and (1, 2), in one 2-rank launch.

Proven:
- the old log-probs, the loss, the CPL term and the grad norm are equal across the three layouts
  (fp32 reduction-order tolerance), and the step ran with perturbed rows present;
- the loss-scale rule: with 4 micro-batches in one schedule call, every gradient equals the sum
  of the 4 single-micro-batch gradients divided by 4 (the schedule's 1/num_microbatches, applied
  once; the loss head does not scale again);
- a non-finite loss skips the optimizer step on every rank and leaves the weights unchanged;
- the supervised warm-start step (same layout and optimizer) lowers the response NLL;
- packed micro-batches (the trainer's default: every view's rows back to back in one row) give the
  padded ones' old log-probs, losses and gradients at each layout.
Also in-process: the micro-batch layout (views share ids and positions, pixels in row order) and
the token-budget partition.
Not proven here: bf16, VPP, the distributed optimizer's numerics (it is built at (2, 1)).
"""


import pytest
import torch

from helpers.distributed import run_on_ranks

from helpers import tiny_qwen

LAYOUTS = [(1, 1), (2, 1), (1, 2)]
PATCH_DIM = 3 * 2 * 14 * 14
TEMPERATURE = 0.7
VALID_VOCAB = 1500


def make_samples(seed: int = 0):
    """2 prompts x 4 responses: prompt 0 with a 4x6-patch image (6 image tokens), prompt 1 text."""
    from megatron_cppo.data.types import Sample

    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(2, tiny_qwen.TEXT_TOKENS, (n,), generator=g)  # noqa: E731
    img_prompt = torch.cat([text(3), torch.tensor([tiny_qwen.VISION_START]),
                            torch.full((6,), tiny_qwen.IMAGE), torch.tensor([tiny_qwen.VISION_END]),
                            text(4)])
    pixels = torch.randn(24, PATCH_DIM, generator=g)
    plus = pixels * 0.8 + 0.1
    minus = torch.randn(24, PATCH_DIM, generator=g)
    grid = torch.tensor([[1, 4, 6]])
    txt_prompt = text(9)
    samples = []
    rewards = [1.0, 0.0, 0.5, 0.0, 0.0, 0.0, 1.0, 0.2]
    for i, r in enumerate(rewards):
        resp = text(3 + (i * 3) % 5)
        if i < 4:
            s = Sample(prompt_ids=img_prompt, response_ids=resp, group_id=0, pixel_values=pixels,
                       image_grid_thw=grid, plus_pixel_values=plus, minus_pixel_values=minus)
        else:
            s = Sample(prompt_ids=txt_prompt, response_ids=resp, group_id=1)
        s.reward = r
        samples.append(s)
    return samples


def _ctx(state, path, micro_batch_size):
    from megatron_cppo.models.qwen2_5_vl import MRopeIndexConfig, load_hf_config
    from megatron_cppo.training.update import UpdateContext

    return UpdateContext(state=state, rope_cfg=MRopeIndexConfig.from_hf(load_hf_config(path)),
                         temperature=TEMPERATURE, valid_vocab=VALID_VOCAB,
                         micro_batch_size=micro_batch_size)


def _prepare(samples, policy_chunks, ref, ctx, noise):
    """Old / reference log-probs through the schedule (+ recorded noise so that ratios != 1) and
    GRPO advantages, as the trainer does before the update."""
    from megatron_cppo.algorithms import grpo_advantages
    from megatron_cppo.training.update import compute_log_probs

    old = compute_log_probs(policy_chunks, samples, ctx)
    with ref as ref_chunks:
        reference = compute_log_probs(ref_chunks, samples, ctx)
    adv = grpo_advantages(torch.tensor([s.reward for s in samples]),
                          torch.tensor([s.group_id for s in samples]))
    for s, o, r, n, a in zip(samples, old, reference, noise, adv.tolist()):
        s.old_log_probs = o + n[:o.numel()]
        s.ref_log_probs = r - n[:r.numel()]
        s.advantage = a
    return old


def _layout(tp, pp, path, batch_file):
    from megatron_cppo.algorithms import CPPOLoss, CPPOLossConfig
    from megatron_cppo.models.qwen2_5_vl import Qwen25VLModelConfig, read_hf_state_dict
    from megatron_cppo.parallel import ParallelConfig, destroy_parallel, initialize_parallel
    from megatron_cppo.training.config import OptimizerConfig
    from megatron_cppo.training.model import build_policy, build_reference
    from megatron_cppo.training.update import update_mini_batch

    state = initialize_parallel(ParallelConfig(tensor_model_parallel_size=tp,
                                               pipeline_model_parallel_size=pp))
    try:
        rec = torch.load(batch_file, weights_only=False)
        samples, noise = rec["samples"], rec["noise"]
        hf_sd = read_hf_state_dict(path)
        settings = Qwen25VLModelConfig()
        optim = OptimizerConfig(lr=1e-3, clip_grad=1.0,
                                use_distributed_optimizer=(tp, pp) == (2, 1))
        policy = build_policy(path, state, settings, optim, hf_state_dict=hf_sd)
        ref = build_reference(path, state, settings, hf_state_dict=hf_sd)
        dp_share = len(samples) // state.dp_size
        ctx = _ctx(state, path, micro_batch_size=2)
        old = _prepare(samples, policy.chunks, ref, ctx, noise)
        mine = samples[state.dp_rank * dp_share:(state.dp_rank + 1) * dp_share]
        loss_fn = CPPOLoss(CPPOLossConfig(cpl_coef=0.5), tp_group=state.tp_group,
                           temperature=TEMPERATURE, valid_vocab=VALID_VOCAB)
        packed = _packed_vs_padded(policy, samples, mine, old, loss_fn, ctx)
        before = [p.detach().clone() for p in policy.chunks[0].parameters()]
        result = update_mini_batch(policy.chunks, policy.optimizer, mine, loss_fn, ctx,
                                   scheduler=policy.scheduler)
        moved = max(float((p.detach() - b).abs().max())
                    for p, b in zip(policy.chunks[0].parameters(), before))
        out = dict(tp=tp, pp=pp, old=[o.tolist() for o in old], stepped=result.stepped,
                   grad_norm=result.grad_norm, metrics=result.metrics, moved=moved,
                   packed=packed)
        if (tp, pp) == (1, 2):
            out["scale"] = _loss_scale_rule(policy, samples, loss_fn, ctx)
        if (tp, pp) == (2, 1):
            out["skip"] = _non_finite_skip(policy, samples, loss_fn, ctx)
        if (tp, pp) == (1, 1):
            import dataclasses

            from megatron_cppo.training.sft import sft_step

            sft_ctx = dataclasses.replace(ctx, temperature=1.0)
            out["sft"] = [sft_step(policy.chunks, policy.optimizer, mine, sft_ctx).metrics
                          for _ in range(3)]
        return out
    finally:
        destroy_parallel(keep_process_group=True)


def _main_grads(chunks):
    return [p.main_grad.detach().clone() for c in chunks for p in c.parameters()]


def _grads_of(policy, microbatches, head):
    """(per-micro-batch metrics, main grads) of one schedule call, from zeroed buffers."""
    from megatron_cppo.models.qwen2_5_vl.forward_step import run_pipeline

    for c in policy.chunks:
        c.zero_grad_buffer()
    policy.optimizer.zero_grad()  # drops the .grad aliases of main_grad the last step left
    metrics = run_pipeline(policy.chunks, microbatches, head)
    return metrics, _main_grads(policy.chunks)


def _packed_vs_padded(policy, samples, mine, old, loss_fn, ctx):
    """The trainer's packed micro-batches (its default) against padded ones
    (--no-sequence-packing) at the same weights: old log-probs of all samples, then the update's
    per-micro-batch losses and the gradients of this rank's share (no step). Max differences and
    the gradient scale."""
    import dataclasses

    from megatron_cppo.training.update import (
        compute_log_probs,
        cppo_loss_head,
        micro_batches,
        partition,
    )

    pack_ctx = dataclasses.replace(ctx, sequence_packing=True)
    old_packed = compute_log_probs(policy.chunks, samples, pack_ctx)
    adv = torch.tensor([s.advantage for s in mine])
    need = loss_fn.samples_needing_perturbed_passes(adv, torch.ones(len(mine), 1))
    groups = partition(mine, need.tolist(), ctx)
    runs = {}
    for name, c in (("padded", ctx), ("packed", pack_ctx)):
        mbs = micro_batches(mine, groups, need, c)
        if name == "packed":
            assert all(mb["input_ids"].shape[0] == 1 and "cu_seqlens" in mb for mb in mbs)
        for chunk in policy.chunks:
            chunk.train()
        runs[name] = _grads_of(policy, mbs, cppo_loss_head(loss_fn, c))
    (m_pad, g_pad), (m_pack, g_pack) = runs["padded"], runs["packed"]
    keys = ("loss", "pg_loss", "kl_loss", "cpl_loss")
    return dict(
        old_diff=max(float((a - b).abs().max()) for a, b in zip(old_packed, old)),
        loss_diff=max((abs(a[k] - b[k]) for a, b in zip(m_pad, m_pack) for k in keys),
                      default=0.0),
        num_mb=len(m_pad), perturbed_rows=sum(m["perturbed_rows"] for m in m_pad),
        grad_diff=max(float((a - b).abs().max()) for a, b in zip(g_pad, g_pack)),
        grad_scale=max(float(a.abs().max()) for a in g_pad))


def _loss_scale_rule(policy, samples, loss_fn, ctx):
    """Max |grad(4 micro-batches) - sum_k grad(micro-batch k) / 4| and the gradient scale."""
    from megatron_cppo.training.batch import collate, to_device
    from megatron_cppo.training.update import cppo_loss_head

    adv = torch.tensor([s.advantage for s in samples])
    need = loss_fn.samples_needing_perturbed_passes(adv, torch.ones(len(samples), 1))
    mbs = [to_device(collate(samples[k:k + 2], need[k:k + 2], ctx.rope_cfg), ctx.state.device)
           for k in range(0, 8, 2)]
    head = cppo_loss_head(loss_fn, ctx)

    def grads_of(microbatches):
        return _grads_of(policy, microbatches, head)[1]

    single = [grads_of([mb]) for mb in mbs]
    together = grads_of(mbs)
    diff = max(float((t - sum(s[i] for s in single) / 4).abs().max())
               for i, t in enumerate(together))
    scale = max(float(t.abs().max()) for t in together)
    return dict(diff=diff, scale=scale)


def _non_finite_skip(policy, samples, loss_fn, ctx):
    from megatron_cppo.training.update import update_mini_batch

    bad = [s for s in samples]  # the same samples, one old log-prob made NaN on a response token
    saved = bad[0].old_log_probs.clone()
    bad[0].old_log_probs[0] = float("nan")
    mine = bad[ctx.state.dp_rank * 8 // ctx.state.dp_size:][:8 // ctx.state.dp_size]
    before = [p.detach().clone() for p in policy.chunks[0].parameters()]
    result = update_mini_batch(policy.chunks, policy.optimizer, mine, loss_fn, ctx,
                               scheduler=policy.scheduler)
    bad[0].old_log_probs = saved
    same = all(torch.equal(p.detach(), b) for p, b in zip(policy.chunks[0].parameters(), before))
    return dict(stepped=result.stepped, unchanged=same)


def _all(ranks, path, batch_file):
    return [_layout(tp, pp, path, batch_file) for tp, pp in LAYOUTS]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("update")
    path = str(root / "hf")
    tiny_qwen.hf_model(tiny_qwen.hf_config(tied=False), seed=3).save_pretrained(path)
    samples = make_samples()
    g = torch.Generator().manual_seed(5)
    noise = [0.05 * torch.randn(16, generator=g) for _ in samples]
    batch_file = str(root / "rollout_batch.pt")
    torch.save(dict(samples=samples, noise=noise), batch_file)
    per_rank = run_on_ranks(_all, 2, megatron=False, args=(path, batch_file), timeout=900)
    return {(r["tp"], r["pp"]): [rank[i] for rank in per_rank]
            for i, r in enumerate(per_rank[0])}


@pytest.mark.slow
def test_old_log_probs_equal_across_layouts(runs):
    ref = torch.tensor(sum(runs[(1, 1)][0]["old"], []))
    for layout in LAYOUTS[1:]:
        for rec in runs[layout]:
            got = torch.tensor(sum(rec["old"], []))
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_old_log_probs_equal_transformers(runs):
    """The response log-probs of the log-prob pass (logits at response positions only,
    temperature, valid vocabulary) equal transformers' log_softmax over the full logits of the
    same model at the same positions."""
    from megatron_cppo.training.batch import _positions

    model = tiny_qwen.hf_model(tiny_qwen.hf_config(tied=False), seed=3)
    got = runs[(1, 1)][0]["old"]
    with torch.no_grad():
        for s, lp in zip(make_samples(), got):
            ids = torch.cat([s.prompt_ids, s.response_ids])[None]
            out = model(input_ids=ids, pixel_values=s.pixel_values,
                        image_grid_thw=s.image_grid_thw,
                        position_ids=_positions(s, _rope_cfg())[:, None])
            logits = out.logits[0, :, :VALID_VOCAB].double() / TEMPERATURE
            lp_all = torch.log_softmax(logits, -1)
            n = s.prompt_ids.numel()
            want = lp_all[n - 1:-1].gather(1, s.response_ids[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(lp, dtype=torch.float64), want,
                                       rtol=1e-4, atol=1e-4)


def _rope_cfg():
    from megatron_cppo.models.qwen2_5_vl import MRopeIndexConfig

    return MRopeIndexConfig.from_hf(tiny_qwen.hf_config(tied=False))


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_loss_and_grad_norm_equal_across_layouts(runs, layout):
    ref = runs[(1, 1)][0]
    assert ref["stepped"] and ref["metrics"]["perturbed_rows"] > 0
    assert ref["metrics"]["cpl_loss"] > 0 and ref["moved"] > 0
    for rec in runs[layout]:
        assert rec["stepped"]
        for key in ("loss", "pg_loss", "kl_loss", "cpl_loss"):
            assert rec["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-4, abs=1e-6), key
        assert rec["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_packed_micro_batches_equal_padded(runs, layout):
    """Packed micro-batches: the same old log-probs, per-micro-batch losses and gradients as padded
    micro-batches (fp32 summation-order tolerance), with perturbed rows in the packed rows."""
    last_stages = 0
    for rec in runs[layout]:
        p = rec["packed"]
        assert p["old_diff"] <= 1e-5, p
        assert p["grad_scale"] > 1e-4 and p["grad_diff"] <= 1e-5 * p["grad_scale"] + 1e-7, p
        if p["num_mb"]:  # losses are seen on the last pipeline stage
            last_stages += 1
            assert p["num_mb"] >= 2 and p["perturbed_rows"] > 0, p
            assert p["loss_diff"] <= 1e-5, p
    assert last_stages >= 1


@pytest.mark.slow
def test_loss_scale_rule(runs):
    for rec in runs[(1, 2)]:
        scale = rec["scale"]
        assert scale["scale"] > 1e-4  # the gradients are not trivially zero
        assert scale["diff"] <= 1e-5 * scale["scale"] + 1e-7, scale


@pytest.mark.slow
def test_sft_step_lowers_the_response_nll(runs):
    """The warm start (training/sft.py) on the same batch: the response NLL, averaged over both
    data-parallel ranks, falls step after step."""
    for rec in runs[(1, 1)]:
        losses = [m["sft_loss"] for m in rec["sft"]]
        assert losses[0] > losses[1] > losses[2], losses
        assert rec["sft"][0]["response_tokens"] > 0


@pytest.mark.slow
def test_non_finite_loss_skips_everywhere(runs):
    for rec in runs[(2, 1)]:
        assert rec["skip"] == dict(stepped=False, unchanged=True)


# ----------------------------------------------------------------------------------------------
# in-process: layout of one micro-batch, partition


def test_collate_stacks_views_sharing_ids_and_positions(tmp_path):
    from megatron_cppo.models.qwen2_5_vl import MRopeIndexConfig, mrope_position_ids
    from megatron_cppo.training.batch import collate

    rope = MRopeIndexConfig(image_token_id=tiny_qwen.IMAGE, video_token_id=tiny_qwen.VIDEO,
                            spatial_merge_size=2)
    samples = make_samples()
    torch.save(samples, tmp_path / "b.pt")
    samples = torch.load(tmp_path / "b.pt", weights_only=False)
    picked = [samples[4], samples[0], samples[1]]  # text-only, image (views), image (no views)
    mb = collate(picked, torch.tensor([False, True, False]), rope, with_training_targets=False)
    ids, pos = mb["input_ids"], mb["position_ids"]
    assert ids.shape[0] == 5 and mb["num_clean_rows"] == 3
    assert mb["sample_idx_P"].tolist() == [1]
    for view_row in (3, 4):
        assert torch.equal(ids[view_row], ids[1]) and torch.equal(pos[:, view_row], pos[:, 1])
    # images in row order: clean rows 1, 2, then the I+ and I- views of row 1
    s = samples[0]
    assert torch.equal(mb["pixel_values"], torch.cat([s.pixel_values, samples[1].pixel_values,
                                                      s.plus_pixel_values, s.minus_pixel_values]))
    assert mb["image_grid_thw"].shape == (4, 3)
    full = torch.cat([s.prompt_ids, s.response_ids])
    assert torch.equal(pos[:, 1, :full.numel()],
                       mrope_position_ids(full, rope, image_grid_N3=s.image_grid_thw)[0])
    # response alignment: the logit at each scored position predicts the next token, which is
    # the response token; the I+/I- rows score the same positions and labels as their clean row
    lr = s.response_ids.numel()
    index_RT, labels_RT = mb["logit_index_RT"], mb["labels_RT"]
    assert torch.equal(ids[1][index_RT[1, :lr] + 1], s.response_ids)
    assert torch.equal(labels_RT[1, :lr], s.response_ids) and mb["response_mask_BT"][1].sum() == lr
    for view_row in (3, 4):
        assert torch.equal(index_RT[view_row], index_RT[1])
        assert torch.equal(labels_RT[view_row], labels_RT[1])
    assert int(index_RT.max()) < ids.shape[1] and int(index_RT.min()) >= 0
    # packed: the same rows without padding, one after the other; logit positions shifted by
    # each row's offset; every other field as padded
    pk = collate(picked, torch.tensor([False, True, False]), rope, with_training_targets=False,
                 packed=True)
    lengths = [picked[r].num_tokens for r in (0, 1, 2, 1, 1)]
    assert pk["cu_seqlens"].dtype == torch.int32
    assert pk["cu_seqlens"].tolist() == [0] + torch.tensor(lengths).cumsum(0).tolist()
    assert torch.equal(pk["input_ids"][0], torch.cat([ids[r, :n] for r, n in enumerate(lengths)]))
    assert torch.equal(pk["position_ids"][:, 0],
                       torch.cat([pos[:, r, :n] for r, n in enumerate(lengths)], dim=1))
    assert pk["logit_rows"] == tuple(index_RT.shape)
    got_RT = pk["logit_index_RT"].reshape(index_RT.shape) - pk["cu_seqlens"][:-1, None]
    assert torch.equal(got_RT, index_RT)
    for key in ("labels_RT", "pixel_values", "image_grid_thw", "response_mask_BT"):
        assert torch.equal(pk[key], mb[key]), key


def test_token_budget_partition():
    from megatron_cppo.training.batch import equalize_count, sample_cost, split_by_budget

    samples = make_samples()
    cost_img, cost_views = sample_cost(samples[0], False), sample_cost(samples[0], True)
    assert cost_views == 3 * cost_img and cost_img == samples[0].num_tokens + 24
    assert split_by_budget([5, 5, 5, 12, 1], 10) == [[0, 1], [2], [3], [4]]
    groups = equalize_count([[0, 1, 2, 3]], [1, 1, 1, 1], 3)
    assert sorted(sum(groups, [])) == [0, 1, 2, 3] and len(groups) == 3
    with pytest.raises(ValueError, match="cannot fill 3 micro-batches"):
        equalize_count([[0], [1]], [1, 1], 3)


def test_sample_from_a_data_prompt_and_the_reward_adapter():
    """The records and adapters around megatron_cppo.data / .rewards: ``Sample.from_prompt`` of a
    ``PromptItem`` carries its ids, views, ground truth and row index, with the M-RoPE ids
    extended over the response exactly as computing them on the whole sequence; the reward
    adapter grades against the carried ground truth."""
    from megatron_cppo.data.types import PromptItem, Sample
    from megatron_cppo.models.qwen2_5_vl import MRopeIndexConfig, mrope_position_ids
    from megatron_cppo.rewards import cppo_reward
    from megatron_cppo.training.plugins import reward_fn_from

    rope = MRopeIndexConfig(image_token_id=tiny_qwen.IMAGE, video_token_id=tiny_qwen.VIDEO,
                            spatial_merge_size=2)
    s0 = make_samples()[0]
    pos, delta = mrope_position_ids(s0.prompt_ids, rope, image_grid_N3=s0.image_grid_thw)
    item = PromptItem(index=7, epoch=0, data_source="t", prompt="", prompt_ids=s0.prompt_ids,
                      prompt_position_ids=pos, rope_delta=delta, image_grid_thw=s0.image_grid_thw,
                      pixel_values=s0.pixel_values, plus_pixel_values=s0.plus_pixel_values,
                      minus_pixel_values=s0.minus_pixel_values, images=[], plus_images=[],
                      minus_images=[], perturbation_kinds=[], ground_truth="4")
    smp = Sample.from_prompt(item, s0.response_ids, group_id=3,
                             response_text="<think>2+2</think> \\boxed{4}", finish_reason="stop")
    full = torch.cat([s0.prompt_ids, s0.response_ids])
    assert torch.equal(smp.position_ids,
                       mrope_position_ids(full, rope, image_grid_N3=s0.image_grid_thw)[0])
    assert smp.has_perturbed_views and smp.group_id == 3
    assert (smp.index, smp.ground_truth, smp.finish_reason) == (7, "4", "stop")
    wrong = Sample.from_prompt(item, s0.response_ids, group_id=3, response_text="\\boxed{5}")
    scores = reward_fn_from(cppo_reward)([smp, wrong])
    assert scores[0]["reward"] == pytest.approx(1.0) and scores[0]["acc"] == 1.0
    assert scores[1]["reward"] == pytest.approx(0.0) and scores[1]["acc"] == 0.0

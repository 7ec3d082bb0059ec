"""Qwen2.5-VL on megatron-core equals transformers' Qwen2_5_VLForConditionalGeneration at
(tp, pp) = (1, 1), (2, 1), (1, 2), (2, 2) (plus an uneven pipeline split and (1, 2) x VPP 2), in
both vision parallel modes ("tp" sharded, "dp_in_tp" replicated), tied and untied embeddings.

One launch per layout; inside it, per (variant, vision mode): build the chunks from the saved tiny
HF checkpoint, load its weights through mapping.py, run megatron's pipeline schedule (fp32, 4
micro-batches of different sequence lengths with variable_seq_lengths; one padded length under VPP)
over the recorded batch, and compare with the HF reference computed once in the parent:
  * logits of every valid token, this rank's vocab shard against the same HF columns (padding
    columns must be -inf): max abs diff <= 1e-4 (measured <= 4e-6);
  * the ViT alone (first stage) against HF ``model.visual``: <= 1e-5 (measured 2e-6);
  * loss (token mean over the whole batch, every TP rank of the last stage): abs <= 1e-5;
  * every gradient, exported to HF names through mapping.py after the reductions training does
    (tied copies over the embedding group, replicated ViT over TP; by hand, and at (2, 2) once by
    megatron's DDP + finalize_model_grads): max abs diff <= 5e-6 (measured 1.5e-7; the smallest
    ViT tensor's largest gradient is ~5e-4); gradient norm rel <= 1e-5;
  * the HF tensors used by the loader over all ranks are exactly the checkpoint's.
Then loss and gradient norm are compared across all layouts.

M-RoPE ids come from megatron_cppo's function and equal HF's (test_qwen2_5_vl_mrope.py); the
HF reference passes ``mm_token_type_ids`` (without it transformers 5.x silently uses 1-D positions).
bf16 is a smoke test only (test_bf16_smoke). Not proven here: packed (THD) sequences, DP > 1,
sequence parallelism, real-size models.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from helpers.distributed import run_on_ranks
from helpers import tiny_qwen

pytestmark = pytest.mark.slow  # multi-rank parity with transformers

MODES = ("tp", "dp_in_tp")
TOL_LOGITS, TOL_VIT, TOL_LOSS, TOL_GRAD, TOL_NORM_REL = 1e-4, 1e-5, 1e-5, 5e-6, 1e-5


def _pad_batch(batch, seq_length):
    """Right-pad every micro-batch to ``seq_length`` (padding is masked out of loss and checks)."""
    out = []
    for mb in batch:
        extra = seq_length - mb["input_ids"].shape[1]
        pad = lambda t: torch.nn.functional.pad(t, (0, extra))  # noqa: E731
        out.append(dict(mb, **{k: pad(mb[k]) for k in ("input_ids", "attention_mask", "labels",
                                                         "loss_mask", "mm_token_type_ids")}))
    return out


def _check_layout(state, root, runs, fixed_seq_length=None):
    import torch.distributed as dist
    from megatron.core import tensor_parallel

    from megatron_cppo.models.qwen2_5_vl import (
        MRopeIndexConfig,
        Qwen25VLModelConfig,
        build_qwen2_5_vl,
        export_hf_state_dict,
        load_hf_config,
        load_hf_weights,
        mrope_position_ids_batch,
        read_hf_state_dict,
        unwrap,
    )
    from megatron_cppo.models.qwen2_5_vl.mapping import normalize_hf_state_dict
    from megatron_cppo.models.qwen2_5_vl.vision_dp import allreduce_replicated_grads
    from megatron_cppo.models.qwen2_5_vl.forward_step import run_pipeline

    results = {}
    for variant, mode, settings, tag in runs:
        path = os.path.join(root, variant)
        case = tiny_qwen.load_case(path)
        batch, ref = case["batch"], case["ref"]
        if fixed_seq_length is not None:
            batch = _pad_batch(batch, fixed_seq_length)
        hf_sd = read_hf_state_dict(path)
        rope_cfg = MRopeIndexConfig.from_hf(load_hf_config(path))
        total_tokens = sum(float(mb["loss_mask"].sum()) for mb in batch)
        for mb in batch:  # computed once on the data side, shipped with the batch
            mb["position_ids"], _ = mrope_position_ids_batch(
                mb["input_ids"], rope_cfg, attention_mask_BS=mb["attention_mask"],
                image_grid_N3=mb["image_grid_thw"])
        settings = dict(settings)
        ddp = settings.pop("megatron_ddp", False)
        split = {k: settings.pop(k) for k in ("decoder_first_pipeline_num_layers",
                                              "decoder_last_pipeline_num_layers") if k in settings}
        run_state = dataclasses.replace(state, config=dataclasses.replace(state.config, **split))
        chunks = build_qwen2_5_vl(path, run_state, Qwen25VLModelConfig(
            vision_parallel_mode=mode, variable_seq_lengths=fixed_seq_length is None,
            **settings))
        used = load_hf_weights(chunks, hf_sd, run_state)
        model = unwrap(chunks[0])
        if ddp:  # training's path: grads in main_grad, reduced by megatron's finalize_model_grads
            from megatron.core.distributed import (
                DistributedDataParallel,
                DistributedDataParallelConfig,
                finalize_model_grads,
            )

            ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
            chunks = [DistributedDataParallel(config=model.config, ddp_config=ddp_config,
                                              module=c) for c in chunks]
            model.config.finalize_model_grads_func = finalize_model_grads
        res = dict(vit=0.0, logits=0.0, pad_is_neg_inf=True)

        if model.pre_process:  # the ViT alone against HF's visual module
            with torch.no_grad():
                for mb, vit_ref in zip(batch, ref["vit"]):
                    if vit_ref is not None:
                        out = model.vision_model(mb["pixel_values"], mb["image_grid_thw"])
                        res["vit"] = max(res["vit"], float((out - vit_ref).abs().max()))

        stash = []

        def loss_head(mb, logits_BSV):
            stash.append(logits_BSV.detach().clone())
            nll_BS = tensor_parallel.vocab_parallel_cross_entropy(
                logits_BSV.clone(), mb["labels"])
            # the schedule divides by the number of micro-batches: undo it so that the sum
            # over micro-batches is the token mean over the whole batch (as in the HF ref)
            loss = (nll_BS * mb["loss_mask"]).sum() / total_tokens * len(batch)
            return loss, {"loss": loss.detach() / len(batch)}

        losses = run_pipeline(chunks, batch, loss_head)

        if state.is_last_stage:
            res["loss"] = float(sum(float(x["loss"]) for x in losses))
            for logits_BSV, mb, ref_BSV in zip(stash, batch, ref["logits"]):
                local = logits_BSV.shape[-1]
                lo = state.tp_rank * local
                hi = min(lo + local, ref_BSV.shape[-1])
                valid = mb["attention_mask"].bool()
                S = ref_BSV.shape[1]  # a padded batch is longer than the HF one
                diff = (logits_BSV[:, :S, :hi - lo] - ref_BSV[..., lo:hi])[valid[:, :S]]
                res["logits"] = max(res["logits"], float(diff.abs().max()))
                pad = logits_BSV[..., hi - lo:]
                res["pad_is_neg_inf"] &= bool(torch.isneginf(pad).all())

        # the gradient reductions training does (megatron's finalize_model_grads) by hand
        if ddp:
            pass
        elif model.share_embeddings_and_output_weights and state.pp_size > 1:
            is_first, is_last = state.is_first_stage, state.is_last_stage
            if is_first or is_last:
                holder = unwrap(chunks[0] if is_first else chunks[-1])
                w = holder.shared_embedding_or_output_weight()
                dist.all_reduce(w.grad, group=state.embedding_group)
        if not ddp:
            allreduce_replicated_grads(chunks, state.tp_group)
        grads = export_hf_state_dict(chunks, state, grads=True)
        res["grad_keys_match"] = set(grads) == set(ref["grads"])
        res["grad"] = max(float((grads[k] - ref["grads"][k]).abs().max()) for k in grads)
        res["grad_norm"] = float(torch.sqrt(sum((g.double() ** 2).sum()
                                                for g in grads.values())))
        all_used = [None] * state.world_size
        dist.all_gather_object(all_used, used)
        res["hf_keys_match"] = set().union(*all_used) == set(normalize_hf_state_dict(hf_sd))
        results[(variant, mode, tag)] = res
    return results


@pytest.fixture(scope="module")
def case_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("qwen25vl"))
    for tied in (True, False):
        tiny_qwen.write_case(root, tied=tied)
    return root


ALL_RUNS = [(v, m, {}, "") for v in ("tied", "untied") for m in MODES]
# One launch per layout: (world size, run_on_ranks kwargs, runs, fixed sequence length).
LAUNCHES = {
    "tp1pp1": (1, dict(tp=1, pp=1), ALL_RUNS, None),
    "tp2pp1": (2, dict(tp=2, pp=1), ALL_RUNS, None),
    # + an uneven split: the first stage (which also runs the ViT) holds 1 of the 4 LM layers
    "tp1pp2": (2, dict(tp=1, pp=2), ALL_RUNS + [
        ("untied", "tp", {"decoder_first_pipeline_num_layers": 1}, "first_stage_1_layer")],
        None),
    # + megatron's DDP and finalize_model_grads doing the reductions (tied copies, replicated ViT)
    "tp2pp2": (4, dict(tp=2, pp=2), ALL_RUNS + [
        ("tied", "dp_in_tp", {"megatron_ddp": True}, "megatron_ddp")], None),
    # interleaved schedule: 2 chunks per stage; megatron needs one sequence length there (and
    # batch_p2p_comm=False at PP=2, ParallelConfig), so the micro-batches are padded to 37 tokens
    "tp1pp2vpp2": (2, dict(tp=1, pp=2, vpp=2, batch_p2p_comm=False),
                   [("tied", "tp", {}, ""), ("untied", "dp_in_tp", {}, "")], 37),
}
_RESULTS: dict = {}


def _layout_results(root, launch):
    """Per (variant, mode, tag): the worst value over ranks (loss from the last stage)."""
    if launch not in _RESULTS:
        world, kwargs, runs, fixed = LAUNCHES[launch]
        per_rank = run_on_ranks(_check_layout, world, args=(root, runs, fixed), timeout=600,
                                **kwargs)
        merged = {}
        for key in per_rank[0]:
            rows = [r[key] for r in per_rank]
            merged[key] = dict(
                vit=max(r["vit"] for r in rows), logits=max(r["logits"] for r in rows),
                grad=max(r["grad"] for r in rows),
                pad_is_neg_inf=all(r["pad_is_neg_inf"] for r in rows),
                grad_keys_match=all(r["grad_keys_match"] for r in rows),
                hf_keys_match=all(r["hf_keys_match"] for r in rows),
                grad_norm=[r["grad_norm"] for r in rows],
                loss=[r["loss"] for r in rows if "loss" in r])
        _RESULTS[launch] = merged
    return _RESULTS[launch]


@pytest.mark.parametrize("launch", list(LAUNCHES))
def test_matches_hf(case_root, launch):
    results = _layout_results(case_root, launch)
    tp = LAUNCHES[launch][1]["tp"]
    refs = {v: tiny_qwen.load_case(os.path.join(case_root, v))["ref"] for v in ("tied", "untied")}
    for (variant, mode, tag), r in results.items():
        ref = refs[variant]
        where = f"{launch} {variant} vision={mode} {tag}"
        assert r["hf_keys_match"], f"{where}: the loader did not use exactly the HF tensors"
        assert r["grad_keys_match"], f"{where}: exported gradient names differ from HF's"
        assert r["pad_is_neg_inf"], f"{where}: vocab padding columns are not -inf"
        assert r["vit"] <= TOL_VIT, f"{where}: ViT max abs diff {r['vit']:.2e}"
        assert r["logits"] <= TOL_LOGITS, f"{where}: logits max abs diff {r['logits']:.2e}"
        assert len(r["loss"]) == tp, where  # every TP rank of the last stage
        for loss in r["loss"]:
            assert abs(loss - ref["loss"]) <= TOL_LOSS, f"{where}: loss {loss} vs {ref['loss']}"
        assert r["grad"] <= TOL_GRAD, f"{where}: gradient max abs diff {r['grad']:.2e}"
        for norm in r["grad_norm"]:
            assert abs(norm - ref["grad_norm"]) <= TOL_NORM_REL * ref["grad_norm"], \
                f"{where}: grad norm {norm} vs HF {ref['grad_norm']}"


def test_reference_is_meaningful(case_root):
    """Guards on the reference itself: the ViT gradients are not negligible (a dropped ViT
    gradient would show), and the batch really has images in some micro-batches only."""
    for variant in ("tied", "untied"):
        case = tiny_qwen.load_case(os.path.join(case_root, variant))
        vis = [g for k, g in case["ref"]["grads"].items() if k.startswith("model.visual.")]
        assert min(float(g.abs().max()) for g in vis) > 1e-4
        with_images = [mb["pixel_values"] is not None for mb in case["batch"]]
        assert any(with_images) and not all(with_images)


def test_loss_and_grad_norm_equal_across_layouts(case_root):
    """The replay invariant (docs/qwen2_5_vl-model.md, "A tiny test model"): one recorded batch gives
    the same loss (abs 1e-5) and gradient norm (rel 1e-5) at every layout, vision mode and
    pipeline split."""
    rows: dict = {}
    for launch in LAUNCHES:
        for (variant, mode, tag), r in _layout_results(case_root, launch).items():
            rows.setdefault(variant, []).append(
                (f"{launch} {mode} {tag}", r["loss"][0], r["grad_norm"][0]))
    for variant, entries in rows.items():
        where0, loss0, norm0 = entries[0]
        for where, loss, norm in entries[1:]:
            assert abs(loss - loss0) <= TOL_LOSS, f"{variant} {where}: loss {loss} vs {loss0}"
            assert abs(norm - norm0) <= TOL_NORM_REL * norm0, \
                f"{variant} {where}: grad norm {norm} vs {norm0} ({where0})"


def _bf16_check(state, root):
    from megatron_cppo.models.qwen2_5_vl import (
        MRopeIndexConfig,
        Qwen25VLModelConfig,
        build_qwen2_5_vl,
        load_hf_config,
        load_hf_weights,
        mrope_position_ids_batch,
        read_hf_state_dict,
    )
    from megatron_cppo.models.qwen2_5_vl.builder import HalfPrecisionModule

    path = os.path.join(root, "tied")
    case = tiny_qwen.load_case(path)
    (chunk,) = build_qwen2_5_vl(path, state, Qwen25VLModelConfig(
        bf16=True, vision_parallel_mode="dp_in_tp"))
    load_hf_weights([chunk], read_hf_state_dict(path), state)
    out = {}
    rope_cfg = MRopeIndexConfig.from_hf(load_hf_config(path))
    for i in (0, 1):  # one image (rank 1 encodes none) and three images (split over TP)
        mb, ref_BSV = case["batch"][i], case["ref"]["logits"][i]
        pos, _ = mrope_position_ids_batch(mb["input_ids"], rope_cfg,
                                          attention_mask_BS=mb["attention_mask"],
                                          image_grid_N3=mb["image_grid_thw"])
        logits_BSV = chunk(mb["input_ids"], pos, pixel_values=mb["pixel_values"],
                           image_grid_thw=mb["image_grid_thw"])
        local = logits_BSV.shape[-1]
        lo = state.tp_rank * local
        hi = min(lo + local, ref_BSV.shape[-1])
        valid = mb["attention_mask"].bool()
        out[i] = dict(
            wrapped=isinstance(chunk, HalfPrecisionModule), dtype=str(logits_BSV.dtype),
            diff=float((logits_BSV.detach()[..., :hi - lo].float() - ref_BSV[..., lo:hi])[valid]
                       .abs().max()),
            scale=float(ref_BSV.abs().max()),
            pad_is_neg_inf=bool(torch.isneginf(logits_BSV[..., hi - lo:]).all()))
        logits_BSV[valid][..., : hi - lo].float().logsumexp(-1).sum().backward()
    out["grads_bf16"] = all(p.grad is not None and p.grad.dtype == torch.bfloat16
                            for p in chunk.parameters())
    return out


def test_bf16_smoke(case_root):
    """bf16 (HalfPrecisionModule) at TP=2, ViT dp_in_tp: logits stay bf16 (no fp32 copy of the
    full logits), padding columns -inf, values within bf16 rounding of the fp32 HF logits (5% of
    the largest logit; measured 2%), backward produces bf16 gradients for every parameter."""
    for rank_out in run_on_ranks(_bf16_check, 2, tp=2, pp=1, args=(case_root,), timeout=300):
        assert rank_out["grads_bf16"]
        for i in (0, 1):
            r = rank_out[i]
            assert r["wrapped"] and r["dtype"] == "torch.bfloat16" and r["pad_is_neg_inf"]
            assert r["diff"] <= 0.05 * r["scale"], r

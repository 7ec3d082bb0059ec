"""Tiny random Qwen2.5-VL configs, checkpoints and batches, built locally (no hub access).

This is the one tiny test configuration of the repository (tests, converter tests and the CPU
benchmarks import it). It exercises every code path the real model has (docs/qwen2_5_vl-model.md, "A
tiny test model"): 3 ViT blocks with block 1 full attention and blocks 0, 2 windowed; images wider
than one window (window 56 px = 2 x 2 merged tokens) of several sizes; GQA (4 heads, 2 KV
groups); 4 LM layers (2 per stage at PP=2); tied and untied embeddings; a vocabulary that TP=2
does not divide (tied variant: 1531 rows, padded to 1532).

The recorded batch is 4 micro-batches (4: megatron's interleaved schedule at PP=2) of 2
right-padded samples, of different sequence lengths:
  mb0: text + one 8x12-patch image | text only;
  mb1: text + 4x6 and 6x4-patch images | text + a 4x4-patch image;
  mb2: text only | text only (the ViT runs on a dummy image);
  mb3: text + a 6x6-patch image | text + a 4x8-patch image.
"""

from __future__ import annotations

import os

import torch

VISION_START, VISION_END, IMAGE, VIDEO = 1500, 1501, 1502, 1503
TEXT_TOKENS = 1400  # text token ids are drawn from [2, TEXT_TOKENS)


def hf_config(*, tied: bool, vocab_size: int | None = None, depth: int = 3,
              fullatt=(1,), vision_intermediate: int = 48, num_layers: int = 4,
              kv_heads: int = 2, max_position_embeddings: int = 512):
    from transformers import Qwen2_5_VLConfig

    vocab = vocab_size or (1531 if tied else 1536)
    text = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=kv_heads, rms_norm_eps=1e-6,
        max_position_embeddings=max_position_embeddings, bos_token_id=0, eos_token_id=1,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                         "mrope_section": [2, 3, 3]},
        tie_word_embeddings=tied)
    vision = dict(
        depth=depth, hidden_size=32, intermediate_size=vision_intermediate, num_heads=4,
        in_channels=3, patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
        window_size=56, fullatt_block_indexes=list(fullatt), out_hidden_size=64,
        hidden_act="silu", tokens_per_second=2)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE,
                            video_token_id=VIDEO, vision_start_token_id=VISION_START,
                            vision_end_token_id=VISION_END, tie_word_embeddings=tied)


def hf_model(config, seed: int = 0):
    """HF model in fp32 eval mode with every parameter random (norms around 1, biases nonzero),
    so that a wrong transform of any tensor shows in the logits."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.08 * noise)
    return model


def _sample(g, pieces):
    """pieces: ints (text lengths) and (t, h, w) grids -> (ids, grids)."""
    ids, grids = [], []
    for piece in pieces:
        if isinstance(piece, int):
            ids += torch.randint(2, TEXT_TOKENS, (piece,), generator=g).tolist()
        else:
            t, h, w = piece
            ids += [VISION_START] + [IMAGE] * (t * h * w // 4) + [VISION_END]
            grids.append(list(piece))
    return ids, grids


MICROBATCHES = (  # per micro-batch, per sample: text lengths and (t, h, w) image grids
    ((5, (1, 8, 12), 6), (20,)),
    ((3, (1, 4, 6), 2, (1, 6, 4), 4), (4, (1, 4, 4), 3)),
    ((16,), (11,)),
    ((2, (1, 6, 6), 5), (3, (1, 4, 8), 1)),
)


def make_batch(seed: int = 0, patch_dim: int = 3 * 2 * 14 * 14) -> list[dict]:
    """The recorded micro-batches: input_ids / attention_mask / labels / loss_mask [B, S],
    mm_token_type_ids [B, S], pixel_values [P, patch_dim] or None, image_grid_thw [N, 3] or None."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for samples in MICROBATCHES:
        seqs, grids = [], []
        for pieces in samples:
            ids, gr = _sample(g, pieces)
            seqs.append(ids)
            grids += gr
        S = max(len(s) for s in seqs)
        B = len(seqs)
        ids_BS = torch.zeros(B, S, dtype=torch.long)
        mask_BS = torch.zeros(B, S, dtype=torch.long)
        for b, s in enumerate(seqs):
            ids_BS[b, :len(s)] = torch.tensor(s)
            mask_BS[b, :len(s)] = 1
        labels_BS = torch.zeros_like(ids_BS)
        labels_BS[:, :-1] = ids_BS[:, 1:]
        loss_mask_BS = torch.zeros(B, S)
        loss_mask_BS[:, :-1] = (mask_BS[:, 1:] > 0).float()
        grid_N3 = torch.tensor(grids, dtype=torch.long) if grids else None
        pixels = None
        if grids:
            num = int((grid_N3[:, 0] * grid_N3[:, 1] * grid_N3[:, 2]).sum())
            pixels = torch.randn(num, patch_dim, generator=g)
        out.append(dict(input_ids=ids_BS, attention_mask=mask_BS, labels=labels_BS,
                        loss_mask=loss_mask_BS, mm_token_type_ids=(ids_BS == IMAGE).long(),
                        pixel_values=pixels, image_grid_thw=grid_N3))
    return out


def hf_reference(model, batch: list[dict]) -> dict:
    """HF logits per micro-batch, the token-mean loss over the whole batch, HF-named gradients,
    ViT outputs per micro-batch, M-RoPE ids per micro-batch."""
    total = sum(float(mb["loss_mask"].sum()) for mb in batch)
    model.zero_grad(set_to_none=True)
    logits, vit, rope = [], [], []
    loss_total = 0.0
    for mb in batch:
        kwargs = dict(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                      mm_token_type_ids=mb["mm_token_type_ids"])
        if mb["pixel_values"] is not None:
            kwargs.update(pixel_values=mb["pixel_values"], image_grid_thw=mb["image_grid_thw"])
        out = model(**kwargs)
        logp = torch.log_softmax(out.logits.float(), dim=-1)
        nll_BS = -logp.gather(-1, mb["labels"].unsqueeze(-1)).squeeze(-1)
        loss = (nll_BS * mb["loss_mask"]).sum() / total
        loss.backward()
        loss_total += float(loss.detach())
        logits.append(out.logits.detach().clone())
        pos, _ = model.model.get_rope_index(
            mb["input_ids"], mm_token_type_ids=mb["mm_token_type_ids"],
            image_grid_thw=mb["image_grid_thw"], attention_mask=mb["attention_mask"])
        rope.append(pos)
        if mb["pixel_values"] is not None:
            with torch.no_grad():
                vit.append(model.model.visual(mb["pixel_values"],
                                              grid_thw=mb["image_grid_thw"]).pooler_output)
        else:
            vit.append(None)
    grads = {}
    for name, p in model.named_parameters():
        grads[name] = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
    grad_norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))
    return dict(logits=logits, loss=loss_total, grads=grads, grad_norm=grad_norm, vit=vit,
                rope=rope)


def write_case(root: str, *, tied: bool, seed: int = 0) -> str:
    """Save a tiny HF checkpoint, the batch and the HF reference under ``root``; return the dir."""
    path = os.path.join(root, "tied" if tied else "untied")
    os.makedirs(path, exist_ok=True)
    model = hf_model(hf_config(tied=tied), seed=seed)
    model.save_pretrained(path)
    batch = make_batch(seed)
    torch.save(dict(batch=batch, ref=hf_reference(model, batch)), os.path.join(path, "case.pt"))
    return path


def load_case(path: str) -> dict:
    return torch.load(os.path.join(path, "case.pt"), weights_only=False)

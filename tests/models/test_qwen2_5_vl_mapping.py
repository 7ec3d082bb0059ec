"""The HF <-> megatron mapping (megatron_cppo/models/qwen2_5_vl/mapping.py), single process.

Every transform has a reverse, and reverse(forward(x)) == x bitwise at the real Qwen2.5-VL-3B/7B
row counts (the transforms act on rows; column counts are reduced where the full tensor would only
cost memory) and at TP 1, 2, 4. TP shards are checked for content (whole query groups per rank;
rank r's fc1 = [gate_r; up_r]). End to end: a tiny HF checkpoint -> megatron shards -> HF is
bitwise the checkpoint, tied and untied, ViT sharded or replicated, from either HF key layout.
Numerical equivalence of the layouts with transformers is the parity test's job.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_qwen
from megatron_cppo.models.qwen2_5_vl import mapping
from megatron_cppo.models.qwen2_5_vl.config import (
    Qwen25VLDims,
    padded_vocab_size,
    reference_hf_config,
)

REAL = {s: Qwen25VLDims.from_hf(reference_hf_config(s)) for s in ("3B", "7B")}


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size", ["3B", "7B"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_qkv_interleave_roundtrip_and_group_shards(size, tp):
    t = REAL[size].text
    if t.num_query_groups % tp:
        pytest.skip("TP does not divide the query groups (rejected by validate_layout)")
    nh, ng, d = t.num_attention_heads, t.num_query_groups, t.head_dim
    for cols in ((t.hidden_size,), ()):  # weight [rows, hidden] and bias [rows]
        q, k, v = _rand(nh * d, *cols, seed=1), _rand(ng * d, *cols, seed=2), _rand(ng * d, *cols,
                                                                                    seed=3)
        fused = mapping.interleave_qkv(q, k, v, ng)
        assert fused.shape[0] == (nh + 2 * ng) * d
        assert all(torch.equal(a, b) for a, b in zip(mapping.split_qkv(fused, nh, ng, d),
                                                      (q, k, v)))
        per = ng // tp  # groups per rank; rank r's shard is exactly its groups' q, k, v
        for r in range(tp):
            sl = lambda x, n: x[r * per * n * d:(r + 1) * per * n * d]  # noqa: E731
            expect = mapping.interleave_qkv(sl(q, nh // ng), sl(k, 1), sl(v, 1), per)
            assert torch.equal(mapping.shard(fused, 0, r, tp), expect)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_gate_up_fuse_split(tp):
    ffn = REAL["3B"].text.ffn_hidden_size  # 11008 rows, 64 columns
    gate, up = _rand(ffn, 64, seed=4), _rand(ffn, 64, seed=5)
    shards = [mapping.fuse_gate_up(gate, up, r, tp) for r in range(tp)]
    for r, s in enumerate(shards):
        assert torch.equal(s[: ffn // tp], gate.chunk(tp)[r])
        assert torch.equal(s[ffn // tp:], up.chunk(tp)[r])
    g2, u2 = mapping.split_gate_up(shards)
    assert torch.equal(g2, gate) and torch.equal(u2, up)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vision_qkv_roundtrip(tp):
    v = REAL["3B"].vision
    for cols in ((v.hidden_size,), ()):
        hf = _rand(3 * v.hidden_size, *cols, seed=6)
        mc = mapping.vision_qkv_to_mcore(hf, v.num_heads)
        # per head [q_h; k_h; v_h]
        h1 = mc[3 * v.head_dim: 6 * v.head_dim]
        assert torch.equal(h1[: v.head_dim], hf[v.head_dim: 2 * v.head_dim])
        assert torch.equal(h1[v.head_dim: 2 * v.head_dim],
                           hf[v.hidden_size + v.head_dim: v.hidden_size + 2 * v.head_dim])
        shards = [mapping.shard(mc, 0, r, tp) for r in range(tp)]
        back = mapping.vision_qkv_to_hf(mapping.unshard(shards, 0), v.num_heads, v.head_dim)
        assert torch.equal(back, hf)


def test_patch_embed_linear_equals_conv3d():
    v = REAL["3B"].vision
    w = _rand(16, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size, seed=7)
    x = _rand(5, v.patch_dim, seed=8)
    conv = F.conv3d(x.view(-1, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
                    w, stride=(v.temporal_patch_size, v.patch_size, v.patch_size)).view(5, -1)
    lin = F.linear(x, mapping.conv3d_to_linear(w))
    assert torch.allclose(conv, lin, atol=1e-5, rtol=1e-5)
    back = mapping.linear_to_conv3d(mapping.conv3d_to_linear(w), v.in_channels,
                                    v.temporal_patch_size, v.patch_size)
    assert torch.equal(back, w)


def test_vocab_padding_only_where_tp_requires_it():
    for size, dims in REAL.items():
        for tp in (1, 2, 4, 8):
            assert padded_vocab_size(dims.text.vocab_size, tp) == dims.text.vocab_size, size
    assert padded_vocab_size(151669, 4) == 151672  # Megatron-Bridge #1331's vocabulary
    emb = _rand(151669, 4, seed=9)
    rule = mapping.Rule("language_model.embedding.word_embeddings.weight", ("x",), mapping.VOCAB)
    dims = Qwen25VLDims.from_hf(reference_hf_config("3B"))
    dims = type(dims)(**{**dims.__dict__, "text": type(dims.text)(
        **{**dims.text.__dict__, "vocab_size": 151669})})
    shards = [mapping.mcore_from_hf(rule, [emb], dims, tp_rank=r, tp_size=4) for r in range(4)]
    assert all(s.shape[0] == 151672 // 4 for s in shards)
    assert torch.equal(shards[-1][-3:], torch.zeros(3, 4))
    assert torch.equal(mapping.hf_from_mcore(rule, shards, dims)[0], emb)


def test_hf_key_layouts():
    new = ["model.language_model.embed_tokens.weight", "model.visual.blocks.0.attn.qkv.weight",
           "lm_head.weight", "model.language_model.layers.3.mlp.up_proj.weight"]
    old = ["model.embed_tokens.weight", "visual.blocks.0.attn.qkv.weight", "lm_head.weight",
           "model.layers.3.mlp.up_proj.weight"]
    assert [mapping.normalize_hf_key(k) for k in old] == new
    assert [mapping.normalize_hf_key(k) for k in new] == new
    assert [mapping.to_old_layout(k) for k in new] == old
    with pytest.raises(ValueError, match="both key layouts"):
        mapping.normalize_hf_state_dict({old[0]: torch.zeros(1), new[0]: torch.zeros(1)})


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tiny_checkpoint(request, tmp_path_factory):
    from megatron_cppo.models.qwen2_5_vl.builder import read_hf_state_dict

    path = tmp_path_factory.mktemp("tied" if request.param else "untied")
    model = tiny_qwen.hf_model(tiny_qwen.hf_config(tied=request.param))
    model.save_pretrained(path)
    saved = read_hf_state_dict(str(path))
    # transformers 5.23's save_pretrained writes the pre-4.52 key layout
    assert any(k.startswith("visual.") for k in saved)
    return Qwen25VLDims.from_hf(model.config), mapping.normalize_hf_state_dict(saved)


def test_table_covers_the_checkpoint_exactly(tiny_checkpoint):
    dims, sd = tiny_checkpoint
    assert mapping.hf_names(dims) == set(sd)
    assert ("lm_head.weight" in sd) == (not dims.text.tie_word_embeddings)


@pytest.mark.parametrize("tp,vision_tp", [(1, 1), (2, 2), (2, 1)])
@pytest.mark.parametrize("layout", ["new", "old"])
def test_hf_to_mcore_to_hf_is_bitwise(tiny_checkpoint, tp, vision_tp, layout):
    dims, sd = tiny_checkpoint
    src = sd if layout == "new" else {mapping.to_old_layout(k): v for k, v in sd.items()}
    shards = [mapping.hf_to_mcore(src, dims, tp_rank=r, tp_size=tp, vision_tp_size=vision_tp)
              for r in range(tp)]
    back = mapping.mcore_to_hf(shards, dims, vision_tp_size=vision_tp)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_tied_output_copy_comes_from_embed_tokens(tiny_checkpoint):
    """megatron's last-stage copy of a tied output layer (PP > 1) loads the (padded) embedding and
    is never exported."""
    dims, sd = tiny_checkpoint
    if not dims.text.tie_word_embeddings:
        pytest.skip("untied")
    name = "language_model.output_layer.weight"
    emb = "language_model.embedding.word_embeddings.weight"
    for r in range(2):
        got = mapping.hf_to_mcore(sd, dims, tp_rank=r, tp_size=2, vision_tp_size=2,
                                  names=[name, emb])
        assert torch.equal(got[name], got[emb])
    shards = [mapping.hf_to_mcore(sd, dims, tp_rank=r, tp_size=2, vision_tp_size=2,
                                  names=[name, emb]) for r in range(2)]
    assert set(mapping.mcore_to_hf(shards, dims)) == {"model.language_model.embed_tokens.weight"}


def test_missing_hf_tensor_is_named(tiny_checkpoint):
    dims, sd = tiny_checkpoint
    broken = {k: v for k, v in sd.items() if "blocks.1.attn.qkv.weight" not in k}
    with pytest.raises(KeyError, match=r"blocks\.1\.attn\.qkv\.weight"):
        mapping.hf_to_mcore(broken, dims, tp_rank=0, tp_size=1, vision_tp_size=1)

"""The project's core attention (megatron_cppo/nn/attention.py): causal rows and causal and
bidirectional packed segments, with GQA, against an explicit fp64 softmax(QK^T) V reference
(fp32 inputs, 1e-6); the longest segment of a cu_seqlens tensor computed once per tensor; bad
masks refused. GPU-only (marked ``gpu``): the bf16 flash / varlen kernels against the CPU path.
"""

from __future__ import annotations

import pytest
import torch

from megatron_cppo.nn import attention as attn


def _reference(q_ThD, k_TgD, v_TgD, cu, scale, causal):
    """fp64 softmax(q k^T * scale + mask) v per segment, K/V heads repeated to the query heads."""
    heads = q_ThD.shape[1]
    rep = heads // k_TgD.shape[1]
    q, k, v = q_ThD.double(), k_TgD.double().repeat_interleave(rep, 1), \
        v_TgD.double().repeat_interleave(rep, 1)
    out = torch.empty_like(q)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        s_hLL = torch.einsum("ihd,jhd->hij", q[a:b], k[a:b]) * scale
        if causal:
            s_hLL = s_hLL.masked_fill(torch.ones(b - a, b - a).triu(1).bool(), float("-inf"))
        out[a:b] = torch.einsum("hij,jhd->ihd", s_hLL.softmax(-1), v[a:b])
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_segment_attention_matches_reference(causal):
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 5, 6, 17, 24], dtype=torch.int32)
    q = torch.randn(24, 4, 8, generator=g)
    k, v = torch.randn(24, 2, 8, generator=g), torch.randn(24, 2, 8, generator=g)
    got = attn.segment_attention(q, k, v, cu, scale=0.3, causal=causal)
    want = _reference(q, k, v, cu, 0.3, causal)
    assert float((got.double() - want).abs().max()) < 1e-6


def test_longest_segment_computed_once_per_tensor(monkeypatch):
    """Layers sharing one cu_seqlens tensor compute its longest segment once (on CUDA each time is
    a device-to-host sync); a new tensor computes its own."""
    from types import SimpleNamespace

    config = SimpleNamespace(attention_dropout=0.0, num_attention_heads=4, num_query_groups=2,
                             kv_channels=8)
    layers = [attn.CausalCoreAttention(config, i, None, "self") for i in range(4)]
    g = torch.Generator().manual_seed(3)
    q = torch.randn(24, 1, 4, 8, generator=g)
    k, v = torch.randn(24, 1, 2, 8, generator=g), torch.randn(24, 1, 2, 8, generator=g)
    maxima = []
    real_max = attn._segment_max
    monkeypatch.setattr(attn, "_segment_max", lambda cu: (maxima.append(1), real_max(cu))[1])
    cu = torch.tensor([0, 5, 6, 17, 24], dtype=torch.int32)
    outs = [layer(q, k, v, cu) for layer in layers]
    assert len(maxima) == 1 and attn.longest_segment(cu) == 11
    cu2 = torch.tensor([0, 20, 24], dtype=torch.int32)
    assert attn.longest_segment(cu2) == 20 and len(maxima) == 2
    monkeypatch.undo()
    want = _reference(q[:, 0], k[:, 0], v[:, 0], cu, 8 ** -0.5, True)
    assert float((outs[-1].reshape(24, 4, 8).double() - want).abs().max()) < 1e-6


def test_causal_rows_match_reference():
    """Padded rows (GQA): the CPU path equals fp64; the core-attention module returns it."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(1)
    S, B, h, grp, D = 9, 2, 4, 2, 8
    q = torch.randn(S, B, h, D, generator=g)
    k, v = torch.randn(S, B, grp, D, generator=g), torch.randn(S, B, grp, D, generator=g)
    got = attn.causal_attention(q, k, v, scale=D ** -0.5).reshape(S, B, h, D)
    for b in range(B):
        want = _reference(q[:, b], k[:, b], v[:, b], torch.tensor([0, S]), D ** -0.5, True)
        assert float((got[:, b].double() - want).abs().max()) < 1e-6

    config = SimpleNamespace(attention_dropout=0.0, num_attention_heads=h, num_query_groups=grp,
                             kv_channels=D)
    ours = attn.CausalCoreAttention(config, 1, None, "self")
    assert torch.equal(ours(q, k, v, None), got.reshape(S, B, h * D))


def test_core_attention_refuses_bad_masks():
    from types import SimpleNamespace

    config = SimpleNamespace(attention_dropout=0.0, num_attention_heads=2, num_query_groups=1,
                             kv_channels=4)
    ours = attn.CausalCoreAttention(config, 1, None, "self")
    q = torch.zeros(3, 2, 2, 4)
    with pytest.raises(ValueError, match="attention_mask must be None or int cu_seqlens"):
        ours(q, q[:, :, :1], q[:, :, :1], torch.ones(1, 1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch dimension 1"):
        ours(q, q[:, :, :1], q[:, :, :1], torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="attention_dropout 0.1"):
        attn.CausalCoreAttention(SimpleNamespace(**dict(vars(config), attention_dropout=0.1)),
                                 1, None, "self")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernels_match_cpu_path():
    """bf16 flash (rows) and varlen (segments, causal and not, GQA) against the fp32 CPU path."""
    g = torch.Generator().manual_seed(2)
    cu = torch.tensor([0, 100, 357, 512], dtype=torch.int32)
    q = torch.randn(512, 16, 128, generator=g)
    k, v = torch.randn(512, 2, 128, generator=g), torch.randn(512, 2, 128, generator=g)
    for causal in (True, False):
        want = attn.segment_attention(q, k, v, cu, scale=128 ** -0.5, causal=causal)
        got = attn.segment_attention(*(x.cuda().bfloat16() for x in (q, k, v)), cu.cuda(),
                                     scale=128 ** -0.5, causal=causal)
        assert float((got.float().cpu() - want).abs().max()) < 3e-2
    q4, k4, v4 = (x[:, None] for x in (q, k, v))
    want = attn.causal_attention(q4, k4, v4, scale=128 ** -0.5)
    got = attn.causal_attention(*(x.cuda().bfloat16() for x in (q4, k4, v4)), scale=128 ** -0.5)
    assert float((got.float().cpu() - want).abs().max()) < 3e-2

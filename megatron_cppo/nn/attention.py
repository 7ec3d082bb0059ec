"""Core attention for megatron layer specs: causal (language model) and within segments (ViT), for
padded batches and packed sequences, with the kernel chosen by device and dtype.

megatron's local ``DotProductAttention`` materialises the [B, h, S, S] scores and refuses packed
sequences; transformer-engine is not available on CPU (nor on every GPU machine). These modules
fill the ``core_attention`` slot of a megatron ``ModuleSpec`` (same constructor and forward
signature) and pick, per call:

  * CPU (and CUDA in fp32): ``scaled_dot_product_attention`` with its default CPU dispatch; packed
    segments are gathered into right-padded [K, h, L, D] (causal: no mask needed, as for padded
    rows; the ViT's bidirectional segments: a key mask, as the ViT did before; exact, O(K L^2)
    memory; fine at CPU sizes).
  * CUDA, bf16/fp16: ``scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` for padded
    rows (flash kernel, no repeated K/V); ``torch.nn.attention.varlen.varlen_attn`` for packed
    sequences and ViT segments (no padding, no mask). torch 2.11's ``varlen_attn`` has neither
    ``enable_gqa`` nor ``is_causal``: K/V are repeated to the query heads there and causality is
    ``window_size=(-1, 0)`` (docs/qwen2_5_vl-model.md, "Attention kernels").

Packed sequences reach the core attention through the attention-mask argument: an int32
``cu_seqlens`` tensor [K + 1] (segment boundaries, in tokens, of the one packed row). megatron's
own THD path (``PackedSeqParams``) is not used: its rotary embedding restarts positions per
segment, which is wrong for M-RoPE (each token carries its own position ids instead).

Shapes: megatron's sbhd layout, q_SBhD [seq, batch, heads, head dim], k_SBgD with g query groups;
packed: B = 1, S = T tokens; cu_K1 int32 [K + 1]; output [S, B, h * D].
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=None)
def _varlen_cached():
    """torch's varlen_attn and whether it takes ``enable_gqa`` / ``is_causal``, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # an older torch
        return None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, "enable_gqa" in params, "is_causal" in params


def longest_segment(cu_K1: torch.Tensor) -> int:
    """Length of the longest segment of ``cu_K1``, computed once per tensor object and kept on it.

    Every layer of a forward receives the same cu_seqlens tensor; on CUDA each computation is a
    device-to-host sync (the kernels take it as a host int), which would stall the launch queue
    once per layer. megatron's recompute hands the layers detached copies, which compute it again.
    cu_seqlens tensors are never modified in place (they are built per micro-batch)."""
    longest = cu_K1.__dict__.get("_longest_segment")
    if longest is None:
        longest = cu_K1._longest_segment = _segment_max(cu_K1)
    return longest


def _segment_max(cu_K1: torch.Tensor) -> int:
    return int((cu_K1[1:] - cu_K1[:-1]).max())


def use_flash_kernels(x: torch.Tensor) -> bool:
    """The CUDA flash / varlen kernels run in half precision only; everything else takes SDPA."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def _repeat_kv(k_ThD: torch.Tensor, heads: int) -> torch.Tensor:
    groups = k_ThD.shape[-2]
    return k_ThD if groups == heads else k_ThD.repeat_interleave(heads // groups, dim=-2)


def padded_segments_attention(q_ThD, k_TgD, v_TgD, cu_K1, *, scale: float,
                              causal: bool) -> torch.Tensor:
    """Attention within segments of one packed row through SDPA on segments right-padded to the
    longest. Causal: no mask, as for padded rows (a valid query's keys are all valid). Otherwise
    a key mask (query rows past a segment's end still see its first key: no NaN; dropped).
    [T, h, D] -> [T, h, D]."""
    longest = longest_segment(cu_K1)
    cu = cu_K1.to(device=q_ThD.device, dtype=torch.long)
    len_K = cu[1:] - cu[:-1]
    j_L = torch.arange(longest, device=q_ThD.device)
    valid_KL = j_L[None, :] < len_K[:, None]
    idx_KL = torch.where(valid_KL, cu[:-1, None] + j_L[None, :], 0)

    def segments(x_ThD):  # [K, h|g, L, D]
        return x_ThD[idx_KL].transpose(1, 2)

    heads, groups = q_ThD.shape[1], k_TgD.shape[1]
    if causal:
        gqa = dict(enable_gqa=True) if groups != heads else {}
        out_KhLD = F.scaled_dot_product_attention(segments(q_ThD), segments(k_TgD),
                                                  segments(v_TgD), is_causal=True, scale=scale,
                                                  **gqa)
    else:
        out_KhLD = F.scaled_dot_product_attention(
            segments(q_ThD), segments(_repeat_kv(k_TgD, heads)),
            segments(_repeat_kv(v_TgD, heads)), attn_mask=valid_KL[:, None, None, :],
            scale=scale)
    return out_KhLD.transpose(1, 2)[valid_KL]


def varlen_attention(q_ThD, k_TgD, v_TgD, cu_K1, *, scale: float, causal: bool) -> torch.Tensor:
    """Attention within segments through torch's varlen (flash) kernel; [T, h, D] -> [T, h, D]."""
    found = _varlen_cached()
    if found is None:
        return padded_segments_attention(q_ThD, k_TgD, v_TgD, cu_K1, scale=scale, causal=causal)
    varlen_attn, has_gqa, has_causal = found
    longest = longest_segment(cu_K1)
    cu = cu_K1.to(device=q_ThD.device, dtype=torch.int32)
    kwargs: dict = dict(scale=scale)
    if has_gqa:
        kwargs["enable_gqa"] = True
    else:
        heads = q_ThD.shape[1]
        k_TgD, v_TgD = _repeat_kv(k_TgD, heads), _repeat_kv(v_TgD, heads)
    if causal:
        if has_causal:
            kwargs["is_causal"] = True
        else:
            kwargs["window_size"] = (-1, 0)
    return varlen_attn(q_ThD.contiguous(), k_TgD.contiguous(), v_TgD.contiguous(), cu, cu,
                       longest, longest, **kwargs)


def segment_attention(q_ThD, k_TgD, v_TgD, cu_K1, *, scale: float, causal: bool) -> torch.Tensor:
    """Attention within the segments ``cu_K1`` of one packed row, by device and dtype."""
    if use_flash_kernels(q_ThD):
        return varlen_attention(q_ThD, k_TgD, v_TgD, cu_K1, scale=scale, causal=causal)
    return padded_segments_attention(q_ThD, k_TgD, v_TgD, cu_K1, scale=scale, causal=causal)


def causal_attention(q_SBhD, k_SBgD, v_SBgD, *, scale: float) -> torch.Tensor:
    """Causal attention over every row of a padded batch (sbhd in, [S, B, h, D] out)."""
    q, k, v = (x.permute(1, 2, 0, 3) for x in (q_SBhD, k_SBgD, v_SBgD))  # [B, h|g, S, D]
    if q.shape[1] != k.shape[1]:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                             enable_gqa=True)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return out.permute(2, 0, 1, 3)


class _CoreAttention(torch.nn.Module):
    """Shared constructor: megatron's core-attention signature (``build_module`` passes these)."""

    causal = True

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                 pg_collection=None):
        super().__init__()
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"attention_dropout {dropout} is not supported by "
                             f"{type(self).__name__} (the model configs set 0)")
        self.config = config
        # heads and groups per TP rank come with the tensors (megatron's Attention splits them)
        self.softmax_scale = (softmax_scale if softmax_scale is not None
                              else config.kv_channels ** -0.5)

    def _segments(self, query, key, value, cu_K1):
        if query.shape[1] != 1:
            raise ValueError(f"{type(self).__name__}: a packed sequence (cu_seqlens given) must "
                             f"have batch dimension 1, got {query.shape[1]}")
        out_ThD = segment_attention(query[:, 0], key[:, 0], value[:, 0], cu_K1,
                                    scale=self.softmax_scale, causal=self.causal)
        return out_ThD.reshape(out_ThD.shape[0], 1, -1)


class CausalCoreAttention(_CoreAttention):
    """Causal self-attention (the language model). ``attention_mask``: None for padded rows (right
    padding needs no mask: no valid token attends to a later position), or an int32 cu_seqlens
    tensor for one packed row."""

    causal = True

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("CausalCoreAttention takes packed sequences as cu_seqlens in the "
                             "attention-mask slot, not PackedSeqParams / attention_bias")
        if attention_mask is None:
            out_SBhD = causal_attention(query, key, value, scale=self.softmax_scale)
            return out_SBhD.reshape(out_SBhD.shape[0], out_SBhD.shape[1], -1)
        if attention_mask.dtype not in (torch.int32, torch.int64):
            raise ValueError("CausalCoreAttention: attention_mask must be None or int cu_seqlens "
                             f"(got dtype {attention_mask.dtype})")
        return self._segments(query, key, value, attention_mask)


class SegmentCoreAttention(_CoreAttention):
    """Bidirectional attention within segments (the ViT's windows / frames): ``attention_mask``
    carries the int32 cu_seqlens of the one packed row."""

    causal = False

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if attention_mask is None or attention_mask.dtype not in (torch.int32, torch.int64):
            raise ValueError("SegmentCoreAttention needs the segment boundaries (int cu_seqlens) "
                             "in the attention-mask slot")
        return self._segments(query, key, value, attention_mask)


def with_core_attention(spec, core_attention, *, attn_mask_type=None):
    """A megatron TransformerLayer spec with its self-attention's core attention replaced."""
    import dataclasses

    attn = spec.submodules.self_attention
    params = dict(attn.params)
    if attn_mask_type is not None:
        params["attn_mask_type"] = attn_mask_type
    attn = dataclasses.replace(
        attn, params=params,
        submodules=dataclasses.replace(attn.submodules, core_attention=core_attention))
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules,
                                                                    self_attention=attn))


def language_layer_spec(attention: str = "auto"):
    """The language model's layer spec: megatron's local spec (RMSNorm) with
    ``CausalCoreAttention``. ``attention``: "auto" or "torch" (this module's kernels), or "local"
    (megatron's DotProductAttention, padded rows only; for comparisons)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    if attention == "local":
        return spec
    return with_core_attention(spec, CausalCoreAttention)

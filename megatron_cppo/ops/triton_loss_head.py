"""Triton kernels behind ``log_probs_and_entropy`` and ``full_kl`` (megatron_cppo/ops/vocab_parallel.py).

Same API, same math and same collectives as the torch path there. The difference is the memory
traffic. The torch path reads each chunk of logits about four times in forward and again in
backward, with fp32 [chunk, V/tp] scratch. Here:

- forward streams each logits row once. It keeps an online (rescaled) max, sum of exponentials and
  entropy term per token in fp32 registers, and writes four fp32 numbers per token. The shard's
  local statistics are then moved to the group-wide max with per-token torch ops. The TP
  collectives, the formulas from the reduced sums to the outputs and the autograd bookkeeping are
  the torch path's own code (megatron_cppo/ops/_chunk_stats.py): one MAX, then one SUM of stacked
  statistics per chunk, on the group passed in. Without a ``chunk_size`` every token is one chunk
  (nothing here grows with the chunk but [4, C] fp32 numbers): one kernel and a few small
  per-token ops per pass, instead of that many per chunk;
- backward reads the logits once and writes the gradient once. It recomputes p from the saved
  per-token log-sum-exp (and entropy / KL), so it needs no collective and no fp32 scratch.

Used on CUDA when triton imports (``impl="auto"``). ``impl="triton"`` forces it, which works on CPU
tensors only under ``TRITON_INTERPRET=1`` (the kernel tests). Inputs are read in their dtype and
converted to fp32 in registers; gradients are written in the logits' dtype.

Online statistics of one row in the shifted variable w = z/T - m (m the running max): S = sum e^w,
A = sum e^w w. On a new tile with max m' >= m, both are rescaled by e^(m - m'), and A also takes the
shift of its weights: A' = e^(m - m') (A + (m - m') S) + A_tile. The same identity moves a shard's
(m_local, S, A) to the global max after the MAX all-reduce.

Shape suffixes: N tokens, C tokens of one chunk, V this rank's shard width, U its valid columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_cppo.ops import _chunk_stats as cs

__all__ = ["TritonFullKL", "TritonLogProbEntropy"]

BLOCK_V = 4096   # columns per tile: 16 fp32 values per thread at 8 warps
NUM_WARPS = 8
# The running max starts at -1e30, not -inf, so that e^(m - m') and (m - m') S are 0, not NaN.


# ----------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _logprob_entropy_fwd(logits_ptr, row_stride, index_ptr, owned_ptr, out_ptr, num_rows,
                         num_valid, temperature, BLOCK: tl.constexpr):
    """One program per token row: out[0..3, row] = (local max m, sum e^(w-m), sum e^(w-m)(w-m),
    target z_y / T or 0 if another shard owns it), w = z / T over this shard's valid columns."""
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * row_stride
    m = tl.full([], -1.0e30, tl.float32)
    s = tl.zeros([], tl.float32)
    a = tl.zeros([], tl.float32)
    for start in range(0, num_valid, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < num_valid
        w = tl.load(base + cols, mask=valid, other=0.0).to(tl.float32) / temperature
        m_new = tl.maximum(m, tl.max(tl.where(valid, w, float("-inf")), axis=0))
        scale = tl.exp(m - m_new)
        shifted = tl.where(valid, w - m_new, 0.0)
        e = tl.where(valid, tl.exp(shifted), 0.0)
        a = scale * (a + (m - m_new) * s) + tl.sum(e * shifted, axis=0)
        s = scale * s + tl.sum(e, axis=0)
        m = m_new
    index = tl.load(index_ptr + row)
    owned = tl.load(owned_ptr + row) != 0
    z_y = tl.load(base + index, mask=owned, other=0.0).to(tl.float32) / temperature
    tl.store(out_ptr + row, m)
    tl.store(out_ptr + num_rows + row, s)
    tl.store(out_ptr + 2 * num_rows + row, a)
    tl.store(out_ptr + 3 * num_rows + row, tl.where(owned, z_y, 0.0))


@triton.jit
def _logprob_entropy_bwd(logits_ptr, row_stride, grad_ptr, grad_row_stride, index_ptr, owned_ptr,
                         lse_ptr, entropy_ptr, g_lp_ptr, g_h_ptr, num_valid, width, temperature,
                         HAS_LP: tl.constexpr, HAS_H: tl.constexpr, BLOCK: tl.constexpr):
    """grad_z = g_lp (onehot(y) - p) - g_H p (log p + H), with g_* already divided by T; 0 on the
    padding columns [num_valid, width)."""
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * row_stride
    grad_base = grad_ptr + row.to(tl.int64) * grad_row_stride
    lse = tl.load(lse_ptr + row)
    index = tl.load(index_ptr + row)
    owned = tl.load(owned_ptr + row) != 0
    g_lp = tl.load(g_lp_ptr + row) if HAS_LP else 0.0
    g_h = tl.load(g_h_ptr + row) if HAS_H else 0.0
    entropy = tl.load(entropy_ptr + row) if HAS_H else 0.0
    for start in range(0, width, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < num_valid
        w = tl.load(base + cols, mask=valid, other=0.0).to(tl.float32) / temperature
        log_p = w - lse
        p = tl.exp(log_p)
        grad = tl.zeros([BLOCK], tl.float32)
        if HAS_H:
            grad = -g_h * p * (log_p + entropy)
        if HAS_LP:
            grad = grad - g_lp * p + tl.where((cols == index) & owned, g_lp, 0.0)
        grad = tl.where(valid, grad, 0.0)
        tl.store(grad_base + cols, grad.to(grad_ptr.dtype.element_ty), mask=cols < width)


@triton.jit
def _full_kl_fwd(p_ptr, q_ptr, p_row_stride, q_row_stride, out_ptr, num_rows, num_valid,
                 temperature, BLOCK: tl.constexpr):
    """One program per token row: out[0..4, row] = (m_p, sum e^(w_p - m_p), m_q, sum e^(w_q - m_q),
    sum e^(w_p - m_p) (w_p - w_q)) over this shard's valid columns (local maxima)."""
    row = tl.program_id(0)
    p_base = p_ptr + row.to(tl.int64) * p_row_stride
    q_base = q_ptr + row.to(tl.int64) * q_row_stride
    m_p = tl.full([], -1.0e30, tl.float32)
    m_q = tl.full([], -1.0e30, tl.float32)
    s_p = tl.zeros([], tl.float32)
    s_q = tl.zeros([], tl.float32)
    b = tl.zeros([], tl.float32)
    for start in range(0, num_valid, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < num_valid
        # masked columns load as 0 (finite differences), and as -inf for the maxima
        w_p = tl.load(p_base + cols, mask=valid, other=0.0).to(tl.float32) / temperature
        w_q = tl.load(q_base + cols, mask=valid, other=0.0).to(tl.float32) / temperature
        m_p_new = tl.maximum(m_p, tl.max(tl.where(valid, w_p, float("-inf")), axis=0))
        m_q_new = tl.maximum(m_q, tl.max(tl.where(valid, w_q, float("-inf")), axis=0))
        scale_p = tl.exp(m_p - m_p_new)
        e_p = tl.where(valid, tl.exp(w_p - m_p_new), 0.0)
        e_q = tl.where(valid, tl.exp(w_q - m_q_new), 0.0)
        b = scale_p * b + tl.sum(e_p * (w_p - w_q), axis=0)
        s_p = scale_p * s_p + tl.sum(e_p, axis=0)
        s_q = tl.exp(m_q - m_q_new) * s_q + tl.sum(e_q, axis=0)
        m_p = m_p_new
        m_q = m_q_new
    tl.store(out_ptr + row, m_p)
    tl.store(out_ptr + num_rows + row, s_p)
    tl.store(out_ptr + 2 * num_rows + row, m_q)
    tl.store(out_ptr + 3 * num_rows + row, s_q)
    tl.store(out_ptr + 4 * num_rows + row, b)


@triton.jit
def _full_kl_bwd(p_ptr, q_ptr, p_row_stride, q_row_stride, gp_ptr, gq_ptr, gp_row_stride,
                 gq_row_stride, lse_p_ptr, lse_q_ptr, kl_ptr, g_ptr, num_valid, width,
                 temperature, NEED_P: tl.constexpr, NEED_Q: tl.constexpr, BLOCK: tl.constexpr):
    """dKL/dz_p = g p (log p - log q - KL), dKL/dz_q = g (q - p), g already divided by T."""
    row = tl.program_id(0)
    p_base = p_ptr + row.to(tl.int64) * p_row_stride
    q_base = q_ptr + row.to(tl.int64) * q_row_stride
    lse_p = tl.load(lse_p_ptr + row)
    lse_q = tl.load(lse_q_ptr + row)
    kl = tl.load(kl_ptr + row)
    g = tl.load(g_ptr + row)
    for start in range(0, width, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < num_valid
        in_row = cols < width
        log_p = tl.load(p_base + cols, mask=valid, other=0.0).to(tl.float32) / temperature - lse_p
        log_q = tl.load(q_base + cols, mask=valid, other=0.0).to(tl.float32) / temperature - lse_q
        p = tl.exp(log_p)
        if NEED_P:
            grad_p = tl.where(valid, g * p * (log_p - log_q - kl), 0.0)
            tl.store(gp_ptr + row.to(tl.int64) * gp_row_stride + cols,
                     grad_p.to(gp_ptr.dtype.element_ty), mask=in_row)
        if NEED_Q:
            grad_q = tl.where(valid, g * (tl.exp(log_q) - p), 0.0)
            tl.store(gq_ptr + row.to(tl.int64) * gq_row_stride + cols,
                     grad_q.to(gq_ptr.dtype.element_ty), mask=in_row)


# ----------------------------------------------------------------------------------------------
# autograd functions (same signatures as the torch ones in vocab_parallel.py)


def _rows(t_NV: torch.Tensor) -> torch.Tensor:
    """Rows with unit column stride (the kernels index columns contiguously)."""
    return t_NV if t_NV.stride(-1) == 1 else t_NV.contiguous()


class TritonLogProbEntropy(torch.autograd.Function):
    """Triton twin of ``vocab_parallel._LogProbEntropy`` (same arguments, outputs, saved values)."""

    @staticmethod
    def forward(ctx, logits_NV, labels_N, group, temperature, chunk_size, vocab_start,
                num_valid, with_entropy):
        logits_NV = _rows(logits_NV)
        num_tokens = logits_NV.shape[0]
        device = logits_NV.device
        log_probs_N, entropy_N, lse_N = cs.fp32_per_token(num_tokens, device, 3)
        index_N, owned_N = cs.target_columns(labels_N, vocab_start, num_valid)
        owned_i8_N = owned_N.to(torch.int8)
        for s in range(0, num_tokens, chunk_size):
            e = min(s + chunk_size, num_tokens)
            # [m, S, A, z_y/T] per token at this shard's own max m
            local_KC = torch.empty(4, e - s, dtype=torch.float32, device=device)
            _logprob_entropy_fwd[(e - s,)](
                logits_NV[s:e], logits_NV.stride(0), index_N[s:e], owned_i8_N[s:e], local_KC,
                e - s, num_valid, float(temperature), BLOCK=BLOCK_V, num_warps=NUM_WARPS)

            def shifted_stats(m_g_C, local_KC=local_KC, s=s, e=e):
                """[S, A, w_y] [3, C] moved from the local max to the group max m_g."""
                m_C, s_C, a_C = local_KC[0], local_KC[1], local_KC[2]
                scale_C = torch.exp(m_C - m_g_C)
                a_g_C = scale_C * (a_C + (m_C - m_g_C) * s_C)
                return torch.stack([s_C * scale_C, a_g_C,
                                    torch.where(owned_N[s:e], local_KC[3] - m_g_C,
                                                torch.zeros_like(m_g_C))])

            cs.reduce_log_prob_entropy(local_KC[0].clone(), shifted_stats, group,
                                       log_probs_N[s:e], entropy_N[s:e], lse_N[s:e])
        cs.save_log_prob_entropy(ctx, logits_NV, index_N, owned_i8_N, lse_N, entropy_N,
                                 group=group, temperature=temperature, chunk_size=chunk_size,
                                 num_valid=num_valid, with_entropy=with_entropy)
        return log_probs_N, entropy_N

    @staticmethod
    def backward(ctx, grad_log_probs_N, grad_entropy_N):
        # g_lp_N, g_h_N: upstream gradients already divided by T (None: no term)
        logits_NV, index_N, owned_i8_N, lse_N, entropy_N, g_lp_N, g_h_N = (
            cs.saved_log_prob_entropy(ctx, grad_log_probs_N, grad_entropy_N))
        num_tokens, width = logits_NV.shape
        grad_NV = torch.empty(num_tokens, width, dtype=logits_NV.dtype, device=logits_NV.device)
        if g_lp_N is None and g_h_N is None:
            grad_NV.zero_()
            return (grad_NV,) + cs.NO_GRADS_LOG_PROB
        if num_tokens:
            # An absent term's pointer argument gets any fp32 [N] tensor (lse): never read.
            _logprob_entropy_bwd[(num_tokens,)](
                logits_NV, logits_NV.stride(0), grad_NV, grad_NV.stride(0), index_N, owned_i8_N,
                lse_N, lse_N if entropy_N is None else entropy_N,
                (lse_N if g_lp_N is None else g_lp_N).contiguous(),
                (lse_N if g_h_N is None else g_h_N).contiguous(), ctx.num_valid, width,
                float(ctx.temperature), HAS_LP=g_lp_N is not None, HAS_H=g_h_N is not None,
                BLOCK=BLOCK_V, num_warps=NUM_WARPS)
        return (grad_NV,) + cs.NO_GRADS_LOG_PROB


class TritonFullKL(torch.autograd.Function):
    """Triton twin of ``vocab_parallel._FullKL``."""

    @staticmethod
    def forward(ctx, logits_p_NV, logits_q_NV, group, temperature, chunk_size, num_valid):
        logits_p_NV, logits_q_NV = _rows(logits_p_NV), _rows(logits_q_NV)
        num_tokens = logits_p_NV.shape[0]
        device = logits_p_NV.device
        kl_N, lse_p_N, lse_q_N = cs.fp32_per_token(num_tokens, device, 3)
        for s in range(0, num_tokens, chunk_size):
            e = min(s + chunk_size, num_tokens)
            # [m_p, S_p, m_q, S_q, b] per token at this shard's own maxima
            local_KC = torch.empty(5, e - s, dtype=torch.float32, device=device)
            _full_kl_fwd[(e - s,)](
                logits_p_NV[s:e], logits_q_NV[s:e], logits_p_NV.stride(0), logits_q_NV.stride(0),
                local_KC, e - s, num_valid, float(temperature), BLOCK=BLOCK_V,
                num_warps=NUM_WARPS)
            m_loc_KC = local_KC[[0, 2]]  # [2, C] a copy: reduce_kl all-reduces a clone of it

            def shifted_stats(max_KC, local_KC=local_KC, m_loc_KC=m_loc_KC):
                """[S_p, S_q, B] [3, C] moved from the local maxima to the group maxima."""
                scale_KC = torch.exp(m_loc_KC - max_KC)
                # B with each pass shifted by its own global max (as the torch path):
                # sum e^(w_p - M_p) ((w_p - M_p) - (w_q - M_q))
                #   = scale_p (b - (M_p - M_q) S_p_local)
                b_C = scale_KC[0] * (local_KC[4] - (max_KC[0] - max_KC[1]) * local_KC[1])
                return torch.stack([local_KC[1] * scale_KC[0], local_KC[3] * scale_KC[1], b_C])

            cs.reduce_kl(m_loc_KC.clone(), shifted_stats, group, kl_N[s:e], lse_p_N[s:e],
                         lse_q_N[s:e])
        cs.save_kl(ctx, logits_p_NV, logits_q_NV, lse_p_N, lse_q_N, kl_N,
                   temperature=temperature, chunk_size=chunk_size, num_valid=num_valid)
        return kl_N

    @staticmethod
    def backward(ctx, grad_kl_N):
        # g_N: the upstream gradient already divided by T
        logits_p_NV, logits_q_NV, lse_p_N, lse_q_N, kl_N, g_N, need_p, need_q = cs.saved_kl(
            ctx, grad_kl_N)
        g_N = g_N.contiguous()
        num_tokens, width = logits_p_NV.shape
        grad_p_NV = torch.empty(num_tokens, width, dtype=logits_p_NV.dtype,
                                device=logits_p_NV.device) if need_p else None
        grad_q_NV = torch.empty(num_tokens, width, dtype=logits_q_NV.dtype,
                                device=logits_q_NV.device) if need_q else None
        if num_tokens and (need_p or need_q):
            dummy = grad_p_NV if need_p else grad_q_NV
            gp, gq = (grad_p_NV if need_p else dummy), (grad_q_NV if need_q else dummy)
            _full_kl_bwd[(num_tokens,)](
                logits_p_NV, logits_q_NV, logits_p_NV.stride(0), logits_q_NV.stride(0), gp, gq,
                gp.stride(0), gq.stride(0), lse_p_N, lse_q_N, kl_N, g_N, ctx.num_valid, width,
                float(ctx.temperature), NEED_P=need_p, NEED_Q=need_q, BLOCK=BLOCK_V,
                num_warps=NUM_WARPS)
        return (grad_p_NV, grad_q_NV) + cs.NO_GRADS_KL

"""Vocab-parallel log-prob, entropy and KL heads over tensor-parallel-sharded logits.

The output layer of a TP-sharded model gives each rank ``V/tp`` columns of the logits. These heads
compute per-token scalars over the FULL vocabulary (log-prob of the sampled token, entropy, KL
between two passes) while the vocabulary stays sharded: only per-token scalars cross ranks.

Memory contract: the input logits are never modified and never copied as a whole;
fp32 exists only for one chunk of tokens at a time (two or three ``[chunk, V/tp]`` fp32 scratch
buffers), and the only tensors saved for backward are the input itself (a reference) and a few fp32
numbers per token. Backward recomputes the softmax chunk by chunk and needs no collective: a rank's
logits reach the global scalars only through the reductions, so ``d out / d z_local`` is complete
with the globally reduced per-token statistics that forward already saved.

Collectives per chunk, all on the TP group passed in (never looked up): log-prob/entropy one MAX of
``m`` then one SUM of stacked ``[S, A, z_y]``; full KL one MAX of stacked ``[m_p, m_q]`` then one
SUM of stacked ``[S_p, S_q, B]``. Every rank of the group must call with the same number of tokens
and equal shard widths (Megatron pads the vocabulary so that shards are equal).

Two implementations behind one API (``impl``): the torch code below, and Triton kernels
(megatron_cppo/ops/triton_loss_head.py) that read each logits row once in forward and once in
backward. They differ only in how a rank computes its shard's statistics; the collectives, the
formulas from the reduced sums to the outputs and the autograd bookkeeping are one shared code
(megatron_cppo/ops/_chunk_stats.py). ``impl="auto"`` takes Triton on CUDA when it imports, torch
otherwise (CPU always torch).

Shape suffixes: N tokens (all leading dims flattened), C tokens of one chunk, V this rank's vocab
shard (``V/tp`` columns), U the valid columns of this shard (those below ``valid_vocab``),
K number of stacked statistics.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_cppo.ops import _chunk_stats as cs

__all__ = ["log_probs_and_entropy", "full_kl", "default_chunk_size", "triton_available",
           "DEFAULT_CHUNK_ELEMENTS", "IMPLS"]

# Default token chunk: at most this many fp32 elements per [C, V] scratch buffer, per device type.
# CPU: ~5 MiB buffers stay in cache; the sweep in benchmarks/RESULTS.md (2-core EPYC, 32 MiB L3)
# was fastest at 16 tokens x 76k columns and 2-3x slower at 64-1024 tokens. GPU: 256 MiB buffers
# (~880 tokens at V/tp = 76,032) keep kernels large and collectives few; not yet measured on a GPU.
DEFAULT_CHUNK_ELEMENTS = {"cpu": 1_250_000, "cuda": 1 << 26}


def default_chunk_size(shard_width: int, device: torch.device | str = "cuda") -> int:
    """Tokens per chunk the torch path uses when ``chunk_size=None`` for a vocab shard of
    ``shard_width`` columns on ``device`` (every rank of a group must get the same value: equal
    widths, same device type)."""
    kind = torch.device(device).type
    elements = DEFAULT_CHUNK_ELEMENTS.get(kind, DEFAULT_CHUNK_ELEMENTS["cuda"])
    return max(1, elements // max(1, shard_width))


def _chunk_tokens(chunk_size: Optional[int], num_tokens: int, shard_width: int,
                  device: torch.device, triton: bool) -> int:
    """The chunk the head runs with. The Triton kernels keep no [chunk, V] scratch (four or five
    fp32 numbers per token), so by default they take every token in one chunk: one kernel launch,
    one MAX and one SUM per pass. Chunks there would only add launches of the small per-token
    ops, which at T = 4096 cost more than the kernels (~0.3 ms a pass at the HBM floor). Every
    rank of a group has the same token count, hence the same single chunk."""
    if chunk_size is not None:
        return chunk_size
    if triton:
        return max(1, num_tokens)
    return default_chunk_size(shard_width, device)


# ----------------------------------------------------------------------------------------------
# helpers


def _group_rank_size(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _valid_columns(shard_width: int, vocab_start: int, valid_vocab: Optional[int]) -> int:
    """Number of leading columns of this shard with global id < valid_vocab (the rest are padding
    rows: Megatron's vocab padding or checkpoint rows the sampler never produces)."""
    if valid_vocab is None:
        return shard_width
    return max(0, min(shard_width, valid_vocab - vocab_start))


def _check_common(temperature: float, chunk_size: Optional[int]) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")


def _scaled_fp32(chunk_CU: torch.Tensor, temperature: float, out_CU: torch.Tensor) -> torch.Tensor:
    """One chunk converted to fp32 into the scratch ``out_CU`` and divided by the temperature. Always
    a copy: for fp32 input ``.float()`` would return the caller's tensor, and the in-place ops that
    follow would mutate it."""
    out_CU.copy_(chunk_CU)
    if temperature != 1.0:
        out_CU.div_(temperature)
    return out_CU


def _row_max(z_CU: torch.Tensor) -> torch.Tensor:
    if z_CU.shape[-1] == 0:  # a shard holding only padding rows
        return torch.full(z_CU.shape[:-1], float("-inf"), dtype=z_CU.dtype, device=z_CU.device)
    return z_CU.amax(dim=-1)


IMPLS = ("auto", "torch", "triton")


def triton_available() -> bool:
    """True when the Triton kernels import (triton installed and working)."""
    try:
        import megatron_cppo.ops.triton_loss_head  # noqa: F401
    except Exception:  # ImportError, or a triton that fails while compiling its decorators
        return False
    return True


def _resolve_impl(impl: str, logits: torch.Tensor) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if logits.is_cuda and triton_available() else "torch"
    return impl


# ----------------------------------------------------------------------------------------------
# log-prob + entropy


class _LogProbEntropy(torch.autograd.Function):
    """Per-token log p(y) and entropy H over the sharded vocabulary, both from one softmax pass.

    In the shifted variables w = z/T - m (m the global max): S = sum e^w, A = sum e^w w,
    log p(y) = w_y - log S, H = log S - A/S. Gradients w.r.t. the scaled logits z/T:
    d log p(y) = onehot(y) - p, dH = -p (w - A/S) = -p (log p + H); chain through 1/T for the raw
    logits. Backward rebuilds log p = z/T - lse (lse = m + log S saved per token).
    """

    @staticmethod
    def forward(ctx, logits_NV, labels_N, group, temperature, chunk_size, vocab_start,
                num_valid, with_entropy):
        num_tokens = logits_NV.shape[0]
        device = logits_NV.device
        log_probs_N, entropy_N, lse_N = cs.fp32_per_token(num_tokens, device, 3)
        index_N, owned_N = cs.target_columns(labels_N, vocab_start, num_valid)
        # Two fp32 scratch buffers reused by every chunk (fresh allocations per chunk cost page
        # faults on CPU and allocator churn on GPU).
        rows = min(chunk_size, num_tokens)
        w_buf = torch.empty(rows, num_valid, dtype=torch.float32, device=device)
        exp_buf = torch.empty_like(w_buf)

        for s in range(0, num_tokens, chunk_size):
            e = min(s + chunk_size, num_tokens)
            w_CU = _scaled_fp32(logits_NV[s:e, :num_valid], temperature, w_buf[:e - s])

            def shifted_stats(m_C, w_CU=w_CU, s=s, e=e):
                """[S, A, w_y] [3, C] of this shard in w - m (m the group max; w shifted here)."""
                w_CU.sub_(m_C.unsqueeze(-1))
                exp_CU = torch.exp(w_CU, out=exp_buf[:e - s])
                stats_KC = torch.empty(3, e - s, dtype=torch.float32, device=device)
                torch.sum(exp_CU, dim=-1, out=stats_KC[0])
                # sum e^w w: the product in place, then torch.sum's cascaded summation. (A BLAS
                # dot product accumulates 76k-152k terms with a relative error of ~1e-3, measured.)
                torch.sum(exp_CU.mul_(w_CU), dim=-1, out=stats_KC[1])
                if num_valid > 0:
                    w_y_C = w_CU.gather(1, index_N[s:e].unsqueeze(-1)).squeeze(-1)
                    stats_KC[2] = torch.where(owned_N[s:e], w_y_C, torch.zeros_like(w_y_C))
                else:
                    stats_KC[2] = 0.0
                return stats_KC

            cs.reduce_log_prob_entropy(_row_max(w_CU), shifted_stats, group, log_probs_N[s:e],
                                       entropy_N[s:e], lse_N[s:e])
        del w_buf, exp_buf

        cs.save_log_prob_entropy(ctx, logits_NV, index_N, owned_N, lse_N, entropy_N, group=group,
                                 temperature=temperature, chunk_size=chunk_size,
                                 num_valid=num_valid, with_entropy=with_entropy)
        return log_probs_N, entropy_N

    @staticmethod
    def backward(ctx, grad_log_probs_N, grad_entropy_N):
        # g_lp_N, g_h_N: upstream gradients already divided by T (None: no term)
        logits_NV, index_N, owned_N, lse_N, entropy_N, g_lp_N, g_h_N = cs.saved_log_prob_entropy(
            ctx, grad_log_probs_N, grad_entropy_N)
        T, num_valid = ctx.temperature, ctx.num_valid
        num_tokens, width = logits_NV.shape
        grad_NV = torch.empty_like(logits_NV, memory_format=torch.contiguous_format)
        if num_valid < width:
            grad_NV[:, num_valid:] = 0  # padding rows are outside the softmax
        if g_lp_N is None and g_h_N is None or num_valid == 0:
            grad_NV[:, :num_valid] = 0
            return (grad_NV,) + cs.NO_GRADS_LOG_PROB
        rows = min(ctx.chunk_size, num_tokens)
        buf = torch.empty(rows, num_valid, dtype=torch.float32, device=logits_NV.device)
        p_buf = torch.empty_like(buf) if g_h_N is not None else None

        for s in range(0, num_tokens, ctx.chunk_size):
            e = min(s + ctx.chunk_size, num_tokens)
            log_p_CU = _scaled_fp32(logits_NV[s:e, :num_valid], T, buf[:e - s])
            log_p_CU.sub_(lse_N[s:e].unsqueeze(-1))
            if g_h_N is None:
                grad_CU = log_p_CU.exp_().mul_(-g_lp_N[s:e].unsqueeze(-1))  # -g p
            else:
                p_CU = torch.exp(log_p_CU, out=p_buf[:e - s])
                # -g_H p (log p + H)
                grad_CU = log_p_CU.add_(entropy_N[s:e].unsqueeze(-1)).mul_(p_CU)
                grad_CU.mul_(-g_h_N[s:e].unsqueeze(-1))
                if g_lp_N is not None:
                    grad_CU.addcmul_(p_CU, g_lp_N[s:e].unsqueeze(-1), value=-1.0)  # -g p
            if g_lp_N is not None:
                g_own_C = torch.where(owned_N[s:e], g_lp_N[s:e], torch.zeros_like(g_lp_N[s:e]))
                grad_CU.scatter_add_(1, index_N[s:e].unsqueeze(-1), g_own_C.unsqueeze(-1))
            grad_NV[s:e, :num_valid].copy_(grad_CU)  # cast to the logits' dtype
        return (grad_NV,) + cs.NO_GRADS_LOG_PROB


def log_probs_and_entropy(logits: torch.Tensor, labels: torch.Tensor, *,
                          group: Optional[dist.ProcessGroup] = None, temperature: float = 1.0,
                          chunk_size: Optional[int] = None, vocab_start: Optional[int] = None,
                          valid_vocab: Optional[int] = None, with_entropy: bool = True,
                          impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``labels`` and entropy of softmax(logits / temperature) over the full vocabulary.

    Args:
        logits: ``[..., V/tp]`` this rank's vocab shard (bf16, fp16 or fp32). Never modified;
            pass a contiguous tensor (a non-contiguous one is copied once by ``reshape``).
        labels: ``[...]`` global token ids. A label on no shard's valid columns gives a finite,
            meaningless value (mask such positions).
        group: the tensor-parallel group the vocabulary is sharded over (None: not sharded).
        temperature: the rollout temperature; logits are divided by it first, as the sampler does.
        chunk_size: tokens per chunk (bounds the torch path's fp32 scratch to two
            ``[chunk, V/tp]`` buffers); None: ``default_chunk_size`` for the device on the torch
            path (16 tokens on CPU, ~880 on GPU at 76k), every token at once on the Triton path
            (which has no such scratch).
        vocab_start: global id of this shard's first column; default ``rank(group) * V/tp``.
        valid_vocab: number of real vocabulary rows; global ids >= it are excluded from the
            softmax (Megatron padding, unused checkpoint rows). None: every column is real.
        with_entropy: False makes the entropy non-differentiable (no gradient term, nothing extra
            saved); use it when entropy is only a metric or a selection signal.
        impl: "auto" (Triton on CUDA when available, else torch), "torch" or "triton" (on CPU
            only under TRITON_INTERPRET=1). Every rank of ``group`` must use the same one.

    Returns:
        ``(log_probs, entropy)``, fp32, shape ``[...]``, identical on every rank of ``group``.
        Both are differentiable w.r.t. ``logits`` (entropy only with ``with_entropy``).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal logits shape without the "
                         f"vocab dim {tuple(logits.shape[:-1])}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer token ids, got {labels.dtype}")
    _check_common(temperature, chunk_size)
    rank, size = _group_rank_size(group)
    width = logits.shape[-1]
    if vocab_start is None:
        vocab_start = rank * width
    num_valid = _valid_columns(width, vocab_start, valid_vocab)
    triton = _resolve_impl(impl, logits) == "triton"
    chunk = _chunk_tokens(chunk_size, labels.numel(), width, logits.device, triton)
    fn = _LogProbEntropy
    if triton:
        from megatron_cppo.ops.triton_loss_head import TritonLogProbEntropy as fn
    log_probs_N, entropy_N = fn.apply(
        logits.reshape(-1, width), labels.reshape(-1).long(), group if size > 1 else None,
        float(temperature), chunk, int(vocab_start), num_valid, bool(with_entropy))
    return log_probs_N.view(labels.shape), entropy_N.view(labels.shape)


# ----------------------------------------------------------------------------------------------
# full-vocabulary KL between two passes


class _FullKL(torch.autograd.Function):
    """Per-token KL(p || q), p = softmax(z_p/T), q = softmax(z_q/T), over the sharded vocabulary.

    With w_p = z_p/T - m_p, w_q = z_q/T - m_q: KL = B/S_p - log S_p + log S_q, B = sum e^{w_p} (w_p - w_q)
    (the m_p - m_q shift of the note's B cancels). Gradients w.r.t. the scaled logits:
    dKL/dz_p = p (log p - log q - KL), dKL/dz_q = q - p.
    """

    @staticmethod
    def forward(ctx, logits_p_NV, logits_q_NV, group, temperature, chunk_size, num_valid):
        num_tokens = logits_p_NV.shape[0]
        device = logits_p_NV.device
        kl_N, lse_p_N, lse_q_N = cs.fp32_per_token(num_tokens, device, 3)
        rows = min(chunk_size, num_tokens)
        bufs = [torch.empty(rows, num_valid, dtype=torch.float32, device=device) for _ in range(3)]
        for s in range(0, num_tokens, chunk_size):
            e = min(s + chunk_size, num_tokens)
            w_p_CU = _scaled_fp32(logits_p_NV[s:e, :num_valid], temperature, bufs[0][:e - s])
            w_q_CU = _scaled_fp32(logits_q_NV[s:e, :num_valid], temperature, bufs[1][:e - s])

            def shifted_stats(max_KC, w_p_CU=w_p_CU, w_q_CU=w_q_CU, s=s, e=e):
                """[S_p, S_q, B] [3, C] of this shard, each pass shifted by its group max here."""
                w_p_CU.sub_(max_KC[0].unsqueeze(-1))
                w_q_CU.sub_(max_KC[1].unsqueeze(-1))
                stats_KC = torch.empty(3, e - s, dtype=torch.float32, device=device)
                exp_p_CU = torch.exp(w_p_CU, out=bufs[2][:e - s])
                torch.sum(exp_p_CU, dim=-1, out=stats_KC[0])
                torch.sum(exp_p_CU.mul_(w_p_CU.sub_(w_q_CU)), dim=-1, out=stats_KC[2])
                torch.sum(w_q_CU.exp_(), dim=-1, out=stats_KC[1])
                return stats_KC

            cs.reduce_kl(torch.stack([_row_max(w_p_CU), _row_max(w_q_CU)]), shifted_stats, group,
                         kl_N[s:e], lse_p_N[s:e], lse_q_N[s:e])
        cs.save_kl(ctx, logits_p_NV, logits_q_NV, lse_p_N, lse_q_N, kl_N,
                   temperature=temperature, chunk_size=chunk_size, num_valid=num_valid)
        return kl_N

    @staticmethod
    def backward(ctx, grad_kl_N):
        # g_N: the upstream gradient already divided by T
        logits_p_NV, logits_q_NV, lse_p_N, lse_q_N, kl_N, g_N, need_p, need_q = cs.saved_kl(
            ctx, grad_kl_N)
        T, num_valid = ctx.temperature, ctx.num_valid
        num_tokens, width = logits_p_NV.shape
        grads = []
        for need, like in ((need_p, logits_p_NV), (need_q, logits_q_NV)):
            g = None
            if need:
                g = torch.empty_like(like, memory_format=torch.contiguous_format)
                if num_valid < width:
                    g[:, num_valid:] = 0
            grads.append(g)
        grad_p_NV, grad_q_NV = grads
        rows = min(ctx.chunk_size, num_tokens)
        bufs = [torch.empty(rows, num_valid, dtype=torch.float32, device=logits_p_NV.device)
                for _ in range(3)]
        for s in range(0, num_tokens, ctx.chunk_size):
            e = min(s + ctx.chunk_size, num_tokens)
            g_C1 = g_N[s:e].unsqueeze(-1)
            log_p_CU = _scaled_fp32(logits_p_NV[s:e, :num_valid], T, bufs[0][:e - s])
            log_p_CU.sub_(lse_p_N[s:e, None])
            log_q_CU = _scaled_fp32(logits_q_NV[s:e, :num_valid], T, bufs[1][:e - s])
            log_q_CU.sub_(lse_q_N[s:e, None])
            p_CU = torch.exp(log_p_CU, out=bufs[2][:e - s])
            if need_p:
                # p (log p - log q - KL)
                log_p_CU.sub_(log_q_CU).sub_(kl_N[s:e, None]).mul_(p_CU).mul_(g_C1)
                grad_p_NV[s:e, :num_valid].copy_(log_p_CU)
            if need_q:
                grad_q_NV[s:e, :num_valid].copy_(log_q_CU.exp_().sub_(p_CU).mul_(g_C1))
        return (grad_p_NV, grad_q_NV) + cs.NO_GRADS_KL


def full_kl(logits_p: torch.Tensor, logits_q: torch.Tensor, *,
            group: Optional[dist.ProcessGroup] = None, temperature: float = 1.0,
            chunk_size: Optional[int] = None, valid_vocab: Optional[int] = None,
            impl: str = "auto") -> torch.Tensor:
    """Per-token KL(p || q) over the full vocabulary, p = softmax(logits_p / T), q likewise.

    ``logits_p`` and ``logits_q`` are this rank's vocab shards ``[..., V/tp]`` of the same token
    positions (e.g. the clean pass and a perturbed pass); shard ``rank(group)`` holds global ids
    ``[rank * V/tp, (rank+1) * V/tp)``, and ids >= ``valid_vocab`` are excluded. Returns fp32 ``[...]``,
    identical on every rank of ``group``, differentiable w.r.t. both inputs. Inputs are never
    modified; fp32 only per chunk; backward needs no collective. ``impl`` as in
    ``log_probs_and_entropy``.
    """
    if logits_p.shape != logits_q.shape:
        raise ValueError(f"logits_p {tuple(logits_p.shape)} and logits_q {tuple(logits_q.shape)} "
                         "must have the same shape")
    _check_common(temperature, chunk_size)
    rank, size = _group_rank_size(group)
    width = logits_p.shape[-1]
    num_valid = _valid_columns(width, rank * width, valid_vocab)
    triton = _resolve_impl(impl, logits_p) == "triton"
    chunk = _chunk_tokens(chunk_size, logits_p.numel() // max(1, width), width, logits_p.device,
                          triton)
    fn = _FullKL
    if triton:
        from megatron_cppo.ops.triton_loss_head import TritonFullKL as fn
    kl_N = fn.apply(logits_p.reshape(-1, width), logits_q.reshape(-1, width),
                         group if size > 1 else None, float(temperature), chunk, num_valid)
    return kl_N.view(logits_p.shape[:-1])

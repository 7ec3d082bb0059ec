"""Vocab-parallel log-prob/entropy and full-vocabulary KL vs a single-process fp64 reference.

Proven here, at Qwen's real vocabulary (151,936 rows) and a Megatron-padded width (152,064 columns
with 151,936 or 151,665 valid rows), for TP = 1 (in-process), TP = 2 (two size-2 subgroups of a
4-rank world, so ``rank(group)`` differs from the global rank) and TP = 4, fp32 and bf16 inputs:
- values of log p(y), entropy and KL(p || q) equal the fp64 reference on the gathered vocabulary;
- gradients w.r.t. every rank's shard equal the matching slice of the reference gradient, also on
  shards that own no target (a missing collective in backward would show there), with gradients
  flowing from both outputs, from one output only, and with ``with_entropy=False``;
- temperature != 1; padded rows excluded from the softmax and given zero gradient (also a shard
  holding only padding rows); chunk sizes that do not divide the token count give the same result
  as one chunk;
- the input logits are bitwise unchanged after forward and backward;
- forward issues exactly two all-reduces per chunk and backward none.
Not proven here: GPU/NCCL behaviour and speed (benchmarks/loss_head.py).

Tolerances (the reference sees the same bf16-rounded inputs, so they bound our arithmetic only):
values |err| <= 2e-5 (1 + |ref|) for both dtypes (fp32 accumulation over 151k terms); gradient
element v of token t: |err| <= 1e-9 + rtol |ref| + 1e-5 |g_t| p_v, rtol = 1e-4 for fp32 and 2^-8
(one rounding) for bf16 output. The p_v term (p_v + q_v for KL) covers fp32 cancellation in factors
such as (w_v - E_p[w]), differences of numbers up to ~50; for dKL/dz_p it is multiplied by
(1 + |KL_t| + |log p_v - log q_v|), the size of the factor (log p_v - log q_v - KL_t).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from helpers.distributed import run_on_ranks
from megatron_cppo.ops.vocab_parallel import default_chunk_size, full_kl, log_probs_and_entropy

VOCAB = 151_936           # Qwen2.5 embedding rows
PADDED_WIDTH = 152_064    # multiple of tp * 128 for tp in {1, 2, 4}
QWEN_TOKENS = 151_665     # ids the Qwen2.5 tokenizer can produce
NUM_TOKENS = 19           # two leading dims below: [1, 19]; prime so chunks do not divide it

VALUE_TOL = 2e-5
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2.0 ** -8}
GRAD_ATOL = 1e-9

# (dtype, temperature, chunk_size, width, valid_vocab)
CASES = [
    (torch.float32, 1.0, None, VOCAB, None),
    (torch.float32, 0.7, 5, PADDED_WIDTH, VOCAB),
    (torch.bfloat16, 1.0, 4, VOCAB, None),
    (torch.bfloat16, 1.3, None, PADDED_WIDTH, QWEN_TOKENS),
    # at TP=4 the last shard holds only padding rows, at TP=2 the second shard is part padding
    (torch.float32, 1.0, 6, PADDED_WIDTH, 100_000),
]


def _logits(width: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Full-vocabulary logits [1, N, width]: per-token scales from flat to peaked, and a spike on a
    column of a rotating shard so the max is not always on the target's shard."""
    g = torch.Generator().manual_seed(seed)
    scale_N1 = torch.linspace(0.3, 6.0, NUM_TOKENS).unsqueeze(-1)
    z_NV = torch.randn(NUM_TOKENS, width, generator=g) * scale_N1
    spike_cols = torch.randint(0, width, (NUM_TOKENS,), generator=g)
    z_NV[torch.arange(NUM_TOKENS), spike_cols] += 15.0
    return z_NV.unsqueeze(0).to(dtype)


def _labels(width: int, tp: int, valid: int) -> torch.Tensor:
    """Targets on every shard, including each shard's first and last valid column."""
    shard = width // tp
    ids = []
    for r in range(tp):
        lo, hi = r * shard, min((r + 1) * shard, valid) - 1
        if hi >= lo:
            ids += [lo, hi, (lo + hi) // 2]
    ids.append(valid - 1)
    g = torch.Generator().manual_seed(7)
    while len(ids) < NUM_TOKENS:
        ids.append(int(torch.randint(0, valid, (1,), generator=g)))
    return torch.tensor(ids[:NUM_TOKENS]).unsqueeze(0)


def _reference(z_full: torch.Tensor, labels: torch.Tensor, temperature: float, valid: int):
    """fp64 log_softmax on the gathered vocabulary (independent of the code under test); also the
    probabilities over the full width (0 on padding columns) for the gradient tolerance."""
    z = z_full.detach().double().requires_grad_()
    logp_all = torch.log_softmax(z[..., :valid] / temperature, dim=-1)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    probs = torch.zeros(z.shape, dtype=torch.float64)
    probs[..., :valid] = logp_all.detach().exp()
    return z, logp, entropy, probs


def _err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max of |ours - ref| / (1 + |ref|)"""
    return ((ours.double() - ref.detach()).abs() / (1 + ref.detach().abs())).max().item()


def _grad_excess(ours: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
                 weight: torch.Tensor) -> float:
    """max of |ours - ref| - tol: <= 0 means within tolerance (``weight`` = |g_t| p_v)."""
    ref = ref.double()
    tol = GRAD_ATOL + GRAD_RTOL[dtype] * ref.abs() + 1e-5 * weight
    return ((ours.double() - ref).abs() - tol).max().item()


class _CountAllReduce:
    """Counts torch.distributed.all_reduce calls (the head looks it up at call time)."""

    def __init__(self):
        self.calls = 0
        self._orig = dist.all_reduce

    def __enter__(self):
        def counting(*args, **kwargs):
            self.calls += 1
            return self._orig(*args, **kwargs)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig


def _check_all(tp_rank: int, tp: int, group) -> dict:
    """Runs every case on this rank's shard; returns the worst errors per check."""
    out = {}
    for case_id, (dtype, temperature, chunk, width, valid_vocab) in enumerate(CASES):
        valid = valid_vocab or width
        shard = width // tp
        cols = slice(tp_rank * shard, (tp_rank + 1) * shard)
        z_full = _logits(width, 100 + case_id, dtype)
        labels = _labels(width, tp, valid)
        g = torch.Generator().manual_seed(3)
        g_lp, g_h = torch.randn(1, NUM_TOKENS, generator=g), torch.randn(1, NUM_TOKENS, generator=g)
        z_ref, lp_ref, h_ref, p_ref = _reference(z_full, labels, temperature, valid)
        p_loc = p_ref[..., cols]
        w_lp, w_h = g_lp.abs().unsqueeze(-1) * p_loc, g_h.abs().unsqueeze(-1) * p_loc
        kw = dict(group=group, temperature=temperature, valid_vocab=valid_vocab)
        res = {}

        # both outputs with grad
        x = z_full[..., cols].clone().requires_grad_()
        before = x.detach().clone()
        with _CountAllReduce() as fwd_count:
            lp, h = log_probs_and_entropy(x, labels, chunk_size=chunk, **kw)
        with _CountAllReduce() as bwd_count:
            (grad,) = torch.autograd.grad((lp * g_lp + h * g_h).sum(), x)
        (grad_ref,) = torch.autograd.grad((lp_ref * g_lp + h_ref * g_h).sum(), z_ref,
                                          retain_graph=True)
        num_chunks = -(-NUM_TOKENS // (chunk or default_chunk_size(shard, x.device)))
        res["value_lp"] = _err(lp, lp_ref)
        res["value_h"] = _err(h, h_ref)
        res["grad_both"] = _grad_excess(grad, grad_ref[..., cols], dtype, w_lp + w_h)
        res["grad_dtype_ok"] = grad.dtype == dtype and lp.dtype == torch.float32
        res["pad_grad_zero"] = bool((grad[..., max(0, valid - tp_rank * shard):] == 0).all())
        res["unchanged"] = torch.equal(x.detach(), before)
        res["fwd_collectives"] = (fwd_count.calls, 2 * num_chunks if tp > 1 else 0)
        res["bwd_collectives"] = bwd_count.calls

        # chunked == one chunk
        lp1, h1 = log_probs_and_entropy(x, labels, chunk_size=NUM_TOKENS, **kw)
        (grad1,) = torch.autograd.grad((lp1 * g_lp + h1 * g_h).sum(), x)
        res["chunk_invariance"] = max((lp1 - lp).abs().max().item(), (h1 - h).abs().max().item(),
                                      (grad1.float() - grad.float()).abs().max().item())

        # log-prob gradient only; entropy marked non-differentiable
        lp2, h2 = log_probs_and_entropy(x, labels, chunk_size=chunk, with_entropy=False, **kw)
        (grad2,) = torch.autograd.grad((lp2 * g_lp).sum(), x)
        (grad2_ref,) = torch.autograd.grad((lp_ref * g_lp).sum(), z_ref, retain_graph=True)
        res["grad_lp_only"] = _grad_excess(grad2, grad2_ref[..., cols], dtype, w_lp)
        res["entropy_nondiff"] = not h2.requires_grad and torch.equal(h2, h)

        # entropy gradient only (log-prob output unused)
        _, h3 = log_probs_and_entropy(x, labels, chunk_size=chunk, **kw)
        (grad3,) = torch.autograd.grad((h3 * g_h).sum(), x)
        (grad3_ref,) = torch.autograd.grad((h_ref * g_h).sum(), z_ref)
        res["grad_h_only"] = _grad_excess(grad3, grad3_ref[..., cols], dtype, w_h)
        res["unchanged_after_all"] = torch.equal(x.detach(), before)

        # full-vocabulary KL(p || q), q from a second pass
        zq_full = _logits(width, 200 + case_id, dtype)
        xp = z_full[..., cols].clone().requires_grad_()
        xq = zq_full[..., cols].clone().requires_grad_()
        before_q = xq.detach().clone()
        with _CountAllReduce() as kl_count:
            kl = full_kl(xp, xq, chunk_size=chunk, **{k: kw[k] for k in
                                                     ("group", "temperature", "valid_vocab")})
        with _CountAllReduce() as kl_bwd_count:
            gp, gq = torch.autograd.grad((kl * g_lp).sum(), (xp, xq))
        zp_r = z_full.detach().double().requires_grad_()
        zq_r = zq_full.detach().double().requires_grad_()
        logp_r = torch.log_softmax(zp_r[..., :valid] / temperature, -1)
        logq_r = torch.log_softmax(zq_r[..., :valid] / temperature, -1)
        kl_ref = (logp_r.exp() * (logp_r - logq_r)).sum(-1)
        gp_ref, gq_ref = torch.autograd.grad((kl_ref * g_lp).sum(), (zp_r, zq_r))
        res["kl_value"] = _err(kl, kl_ref)
        q_loc = torch.zeros(zq_full.shape, dtype=torch.float64)
        q_loc[..., :valid] = logq_r.detach().exp()
        w_kl = g_lp.abs().unsqueeze(-1) * (p_loc + q_loc[..., cols])
        # dKL/dz_p = p (log p - log q - KL): fp32 error of KL_t (up to ~30 here) times p_v
        log_ratio = torch.zeros(zq_full.shape, dtype=torch.float64)
        log_ratio[..., :valid] = (logp_r - logq_r).detach().abs()
        w_kl_p = w_kl * (1 + kl_ref.detach().abs().unsqueeze(-1) + log_ratio[..., cols])
        res["kl_grad_p"] = _grad_excess(gp, gp_ref[..., cols], dtype, w_kl_p)
        res["kl_grad_q"] = _grad_excess(gq, gq_ref[..., cols], dtype, w_kl)
        res["kl_unchanged"] = torch.equal(xp.detach(), before) and torch.equal(xq.detach(),
                                                                                before_q)
        res["kl_collectives"] = (kl_count.calls, 2 * num_chunks if tp > 1 else 0,
                                 kl_bwd_count.calls)
        kl1 = full_kl(xp, xq, chunk_size=NUM_TOKENS, **{k: kw[k] for k in
                                                        ("group", "temperature", "valid_vocab")})
        res["kl_chunk_invariance"] = (kl1 - kl).abs().max().item()
        out[case_id] = res
    return out


def _ranks_main(state) -> dict:
    """TP=4 on WORLD, then TP=2 on the subgroups [0, 1] and [2, 3]."""
    results = {4: _check_all(state.rank, 4, state.group)}
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group = pairs[state.rank // 2]
    results[2] = _check_all(dist.get_rank(group), 2, group)
    dist.barrier()
    return results


def _assert_ok(results: dict, where: str) -> None:
    for case_id, res in results.items():
        ctx = f"{where} case {case_id} {CASES[case_id][:2]} width {CASES[case_id][3]} " \
              f"valid {CASES[case_id][4]}: {res}"
        assert res["value_lp"] <= VALUE_TOL and res["value_h"] <= VALUE_TOL, ctx
        assert res["kl_value"] <= VALUE_TOL, ctx
        for key in ("grad_both", "grad_lp_only", "grad_h_only", "kl_grad_p", "kl_grad_q"):
            assert res[key] <= 0, (key, ctx)
        for key in ("grad_dtype_ok", "pad_grad_zero", "unchanged", "unchanged_after_all",
                    "entropy_nondiff", "kl_unchanged"):
            assert res[key], (key, ctx)
        assert res["fwd_collectives"][0] == res["fwd_collectives"][1], ctx
        assert res["bwd_collectives"] == 0, ctx
        assert res["kl_collectives"][0] == res["kl_collectives"][1], ctx
        assert res["kl_collectives"][2] == 0, ctx
        # rows are reduced independently: chunking changes nothing beyond float reassociation
        assert res["chunk_invariance"] <= 1e-6, ctx
        assert res["kl_chunk_invariance"] <= 1e-5, ctx


def test_tp1_matches_reference():
    _assert_ok(_check_all(0, 1, None), "tp=1")


@pytest.mark.slow
def test_tp2_and_tp4_match_reference():
    results = run_on_ranks(_ranks_main, 4, megatron=False, timeout=600)
    for rank, res in enumerate(results):
        _assert_ok(res[4], f"tp=4 rank {rank}")
        _assert_ok(res[2], f"tp=2 rank {rank} (tp rank {rank % 2})")
    assert len(results) == 4


def test_input_validation():
    z = torch.randn(2, 3, 10)
    with pytest.raises(ValueError, match="labels shape"):
        log_probs_and_entropy(z, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        log_probs_and_entropy(z, torch.zeros(2, 3, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        full_kl(z, z, chunk_size=0)
    with pytest.raises(ValueError, match="integer"):
        log_probs_and_entropy(z, torch.zeros(2, 3))


def test_fp32_input_never_mutated_and_no_grad_path():
    """fp32 input is the risky case (``.float()`` would alias it); under no_grad nothing is saved."""
    z = torch.randn(4, 33, 257) * 4
    labels = torch.randint(0, 257, (4, 33))
    before = z.clone()
    with torch.no_grad():
        lp, h = log_probs_and_entropy(z, labels, temperature=0.9, chunk_size=16)
    assert torch.equal(z, before) and lp.grad_fn is None and lp.shape == (4, 33)
    ref = torch.log_softmax(z.double() / 0.9, -1)
    assert torch.allclose(lp.double(), ref.gather(-1, labels.unsqueeze(-1)).squeeze(-1),
                          atol=1e-5)
    assert torch.allclose(h.double(), -(ref.exp() * ref).sum(-1), atol=1e-5)


def test_zero_tokens():
    z = torch.randn(0, 7, 50, requires_grad=True)
    lp, h = log_probs_and_entropy(z, torch.zeros(0, 7, dtype=torch.long))
    assert lp.shape == h.shape == (0, 7)
    (lp.sum() + h.sum()).backward()
    assert z.grad.shape == z.shape

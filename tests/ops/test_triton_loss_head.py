"""Triton kernels of the loss head (megatron_cppo/ops/triton_loss_head.py) vs the torch path.

The kernels run on CPU under Triton's interpreter (TRITON_INTERPRET=1, set only for the spawned
rank processes, so nothing else in the session is affected), at Qwen's real vocabulary width.

Proven here, for ``log_probs_and_entropy`` and ``full_kl`` with ``impl="triton"`` against
``impl="torch"`` (itself tested against fp64 in test_vocab_parallel.py), at TP 1 and TP 2 (two
gloo ranks, vocabulary sharded; one launch for both):
- values and gradients agree for bf16 and fp32 logits, widths 151,936 and 152,064 (Megatron
  padding; valid vocabularies 151,936 and 151,665, so the padded columns get zero gradient and
  tiles end mid-row), temperature 1, 0.7 and 1.3, a label outside the valid vocabulary, tokens
  with zero upstream gradient (masked), entropy with and without gradient, and a chunk size that
  does not divide the token count;
- the input logits are unchanged.
Without a GPU, every kernel variant is also compiled ahead of time for Hopper (sm_90, PTX and
cubin), which catches what the interpreter does not check (types of loop-carried values, constexpr
branches). On a GPU (marker ``gpu``) the comparison runs with the compiled kernels at TP 1.
Not proven here: speed (benchmarks/loss_head.py, variant cppo_triton).

Tolerances: values |err| <= 2e-6 (1 + |ref|) (fp32 sums in another order); gradients
|err| <= 1e-6 max|ref| + rtol |ref|, rtol 1e-5 for fp32 and 2^-7 for bf16 (one rounding of the
output may fall on either side).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from helpers.distributed import run_on_ranks
from megatron_cppo.ops.vocab_parallel import _resolve_impl, full_kl, log_probs_and_entropy

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed")

N = 3
VOCAB, PADDED, QWEN_TOKENS = 151_936, 152_064, 151_665
# (what, dtype, width, valid_vocab, temperature, chunk_size, with_entropy)

CASES = [
    ("logprob", torch.bfloat16, VOCAB, None, 1.0, None, True),
    ("logprob", torch.float32, PADDED, QWEN_TOKENS, 0.7, 2, False),
    ("kl", torch.bfloat16, PADDED, VOCAB, 1.3, None, None),
]
def _inputs(dtype, width, valid, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.3, 2.0, 6.0]).unsqueeze(-1)
    z = torch.randn(N, width, generator=g) * scale
    z[1, 5] += 15.0  # a spike on the first shard
    zq = z + torch.randn(N, width, generator=g)
    top = valid or width
    labels = torch.tensor([top - 1, 7, top + 3 if valid else width // 2 + 1])
    upstream = (torch.tensor([1.0, 0.0, -2.0]), torch.tensor([0.5, 0.0, 0.3]))  # token 1 masked
    return z.to(dtype), zq.to(dtype), labels, upstream


def _compare(what, ours, ref, dtype=torch.float32):
    ours, ref = ours.detach().double(), ref.detach().double()
    if what == "value":
        excess = ((ours - ref).abs() - 2e-6 * (1 + ref.abs())).max().item()
    else:
        rtol = 2.0 ** -7 if dtype == torch.bfloat16 else 1e-5
        excess = ((ours - ref).abs() - 1e-6 * ref.abs().max() - rtol * ref.abs()).max().item()
    return excess


def check_cases(group, rank, tp, device="cpu") -> list[str]:
    """Triton vs torch on this rank's shard of every case; returns failure messages."""
    failures = []
    for what, dtype, width, valid, temperature, chunk, with_entropy in CASES:
        z, zq, labels, (g_lp, g_h) = _inputs(dtype, width, valid)
        shard = width // tp
        cols = slice(rank * shard, (rank + 1) * shard)
        z, zq = z[:, cols].contiguous().to(device), zq[:, cols].contiguous().to(device)
        labels, g_lp, g_h = labels.to(device), g_lp.to(device), g_h.to(device)
        snapshot = (z.clone(), zq.clone())
        results = {}
        for impl in ("torch", "triton"):
            x, xq = z.clone().requires_grad_(), zq.clone().requires_grad_()
            kw = dict(group=group, temperature=temperature, chunk_size=chunk, valid_vocab=valid,
                      impl=impl)
            if what == "logprob":
                lp, h = log_probs_and_entropy(x, labels, with_entropy=with_entropy, **kw)
                loss = (lp * g_lp).sum() + ((h * g_h).sum() if with_entropy else 0)
                loss.backward()
                results[impl] = [("log p", lp), ("H", h), ("grad", x.grad)]
            else:
                kl = full_kl(x, xq, **kw)
                (kl * g_lp).sum().backward()
                results[impl] = [("KL", kl), ("grad p", x.grad), ("grad q", xq.grad)]
            if not (torch.equal(x.detach(), snapshot[0]) and torch.equal(xq.detach(),
                                                                          snapshot[1])):
                failures.append(f"{what} {dtype} {impl}: logits modified")
        for (name, ours), (_, ref) in zip(results["triton"], results["torch"]):
            kind = "grad" if name.startswith("grad") else "value"
            excess = _compare(kind, ours, ref, dtype)
            if excess > 0:
                failures.append(f"tp={tp} rank {rank} {what} {dtype} T={temperature} {name}: "
                                f"{excess:.3g} over tolerance")
        if valid is not None and rank == tp - 1:
            grad = results["triton"][-1][1]
            pad_cols = (rank + 1) * shard - valid
            if pad_cols > 0 and torch.count_nonzero(grad[:, -pad_cols:]):
                failures.append(f"{what}: padded columns got a gradient")
    return failures


def count_chunks(group, impl, tokens=24, width=65_536) -> tuple[int, int]:
    """Chunks (reductions) one log-prob/entropy call and one KL call make with the default
    chunk_size: the torch path splits 24 tokens at this width on CPU (19 tokens a chunk), the
    Triton path takes them in one."""
    from megatron_cppo.ops import _chunk_stats as cs

    calls = {"lp": 0, "kl": 0}
    originals = cs.reduce_log_prob_entropy, cs.reduce_kl

    def counted(key, fn):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    cs.reduce_log_prob_entropy, cs.reduce_kl = counted("lp", originals[0]), counted("kl",
                                                                                   originals[1])
    try:
        z = torch.randn(tokens, width, generator=torch.Generator().manual_seed(3))
        log_probs_and_entropy(z, torch.zeros(tokens, dtype=torch.long), group=group, impl=impl)
        full_kl(z, z.flip(0), group=group, impl=impl)
    finally:
        cs.reduce_log_prob_entropy, cs.reduce_kl = originals
    return calls["lp"], calls["kl"]


def _ranks_main(state):
    """TP 1 on rank 0, then TP 2 on both ranks; then the chunk counts at TP 2."""
    failures = check_cases(None, 0, 1) if state.rank == 0 else []
    failures += check_cases(state.group, state.rank, 2)
    chunks = {impl: count_chunks(state.group, impl) for impl in ("torch", "triton")}
    if chunks != {"torch": (2, 2), "triton": (1, 1)}:
        failures.append(f"chunks per call (log-prob, KL) with the default chunk_size: {chunks}")
    return failures


@pytest.mark.slow
def test_triton_head_matches_torch(monkeypatch):
    """One launch. TRITON_INTERPRET must be set before triton itself is imported (triton's own
    library functions are decorated then), so the kernels run in fresh rank processes that start
    with it; this process never runs them."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    results = run_on_ranks(_ranks_main, 2, megatron=False)
    failures = [f for res in results for f in res]
    assert not failures, "\n".join(failures)


def test_impl_argument():
    with pytest.raises(ValueError, match="impl"):
        log_probs_and_entropy(torch.zeros(1, 4), torch.zeros(1, dtype=torch.long), impl="cuda")
    assert _resolve_impl("auto", torch.zeros(1)) == "torch"  # CPU: always the torch path


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    """Ahead-of-time compilation of all eight kernel variants for sm_90 with the launch options
    used on the GPU (bf16 logits, BLOCK_V, NUM_WARPS)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    from megatron_cppo.ops import triton_loss_head as th

    rows = {"row_stride": "i32", "grad_row_stride": "i32", "p_row_stride": "i32",
            "q_row_stride": "i32", "gp_row_stride": "i32", "gq_row_stride": "i32",
            "num_rows": "i32", "num_valid": "i32", "width": "i32", "temperature": "fp32"}
    types = {"logits_ptr": "*bf16", "grad_ptr": "*bf16", "p_ptr": "*bf16", "q_ptr": "*bf16",
             "gp_ptr": "*bf16", "gq_ptr": "*bf16", "index_ptr": "*i64", "owned_ptr": "*i8",
             **rows}
    flags = {"_logprob_entropy_fwd": [{}],
             "_logprob_entropy_bwd": [dict(HAS_LP=lp, HAS_H=h)
                                      for lp, h in ((True, True), (True, False), (False, True))],
             "_full_kl_fwd": [{}],
             "_full_kl_bwd": [dict(NEED_P=p, NEED_Q=q)
                              for p, q in ((True, True), (True, False), (False, True))]}
    for name, variants in flags.items():
        fn = getattr(th, name)
        for constexprs in variants:
            constexprs = dict(constexprs, BLOCK=th.BLOCK_V)
            signature = {arg: "constexpr" if arg in constexprs else types.get(arg, "*fp32")
                         for arg in fn.arg_names}
            kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                    target=GPUTarget("cuda", 90, 32),
                                    options={"num_warps": th.NUM_WARPS})
            assert kernel.asm.get("cubin"), (name, constexprs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_head_matches_torch_on_gpu():
    """The compiled kernels (not the interpreter) on one GPU, TP 1; auto picks them on CUDA."""
    failures = check_cases(None, 0, 1, device="cuda")
    assert not failures, "\n".join(failures)
    assert _resolve_impl("auto", torch.zeros(1, device="cuda")) == "triton"

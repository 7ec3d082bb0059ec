"""The CPPO objective (GRPO + PPO dual clip + reference KL + Contrastive Perception Loss).

Proven here (single process, CPU):
- the whole micro-batch loss, computed through the vocab-parallel head from logits at Qwen's real
  vocabulary (151,936 rows; one case with 151,665 valid rows and temperature 0.8), equals an
  independent fp64 reference written below from the full logits (log_softmax, the formulas of
  docs/cppo-objective.md, a loop-based perception-token selection and CPL in its InfoNCE form), in
  value and in the gradients w.r.t. the clean, I+ and I- logits, for every switch: vision mask
  on/off, gating on/off, top percent, tau, coefficient, estimator k1/k2/k3 (with and without the
  opt-in divergence clamp), full-vocabulary divergence, entropy bonus, every aggregation mode
  (CPL aggregated with it too);
- "skip the perturbed passes of gated-out samples" gives bitwise the same loss and gradients as
  "run them" (and the passes that were run get exactly zero gradient);
- the CPL gradient oracle (docs/cppo-objective.md) and the InfoNCE identity;
- selection edge cases (no increase, ties, all equal, padding, k = max(1, floor(fp32(p c))));
- GRPO advantages (exactly 0 for groups with equal rewards at n = 5, 8, 16), PPO clip/dual clip,
  KL estimators, aggregation modes, config validation, which samples need perturbed passes,
  metrics; NaN/inf at padded positions reach neither the loss nor a gradient; logits unchanged by
  forward and backward.
Not proven here: equality with a transcription of the reference recipe's source, and TP = 2
(tests/test_reference_parity.py).

Tolerances: loss |err| <= 1e-5 (1 + |ref|); gradient |err| <= 1e-6 max|ref| + 1e-3 |ref| (fp32
head vs fp64 reference; a wrong term moves gradients by O(1) relative).
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from megatron_cppo.algorithms import (
    AGG_MODES,
    CPPOLoss,
    CPPOLossConfig,
    CPPOMicroBatch,
    PerturbedPasses,
    aggregate_loss,
    build_perception_term,
    cpl_per_token,
    grpo_advantages,
    ppo_clip_policy_loss,
    samples_needing_perturbed_passes,
    select_perception_tokens,
)
from megatron_cppo.algorithms import kl_estimate
from megatron_cppo.ops import log_probs_and_entropy

VOCAB = 151_936
B, T = 6, 10

# ----------------------------------------------------------------------------------------------
# independent references (fp64, written from docs/cppo-objective.md; never call the code under
# test)


def ref_select(H, Hm, mask, top_percent, eps=1e-6):
    out = torch.zeros(H.shape, dtype=torch.bool)
    for i in range(H.shape[0]):
        resp = [t for t in range(H.shape[1]) if mask[i, t]]
        dH = {t: float(Hm[i, t] - H[i, t]) for t in resp}
        pos = [t for t in resp if dH[t] > 0]
        if not pos:
            continue
        s = {t: max(dH[t], 0.0) / (float(Hm[i, t]) + eps) for t in resp}
        # p c rounded to fp32 before the floor, as the reference recipe computes it
        k = max(1, math.floor(float(torch.tensor(float(len(pos))) * top_percent)))
        theta = sorted((s[t] for t in pos), reverse=True)[k - 1]
        for t in pos:
            out[i, t] = s[t] >= theta
    return out


def ref_k(a, b, kind, clamp=None):
    """Estimator of KL(p||q) from a = log p(y), b = log q(y) (y ~ p); only k3 clamps itself."""
    if kind in ("k3", "low_var_kl"):
        d = torch.clamp(b - a, -20, 20)
        v = torch.clamp(torch.exp(d) - d - 1, -10, 10)
    else:
        v = (a - b) if kind in ("k1", "kl") else 0.5 * (a - b) ** 2
    return v if clamp is None else torch.clamp(v, -clamp, clamp)


def ref_agg(x, mask, mode, eps=1e-8):
    """Every seq-mean mode divides by the number of rows of ``x`` (the micro-batch)."""
    m = mask.double()
    if mode == "token-mean":
        return (x * m).sum() / (m.sum() + eps)
    rows = (x * m).sum(-1)
    if mode == "seq-mean-token-sum":
        return rows.mean()
    if mode == "seq-mean-token-mean":
        return (rows / (m.sum(-1) + 1e-8)).mean()
    return (rows / x.shape[-1]).mean()


def ref_cppo(cfg, z, zp, zm, labels, mask, old, refl, adv, temperature=1.0, valid=VOCAB):
    """Whole objective from the full logits [B, T, V] (fp64 leaves). Returns (loss, selected M)."""

    def lsm(x):
        return torch.log_softmax(x[..., :valid] / temperature, dim=-1)

    ls, lsp, lsm_ = lsm(z), lsm(zp), lsm(zm)
    a = ls.gather(-1, labels[..., None])[..., 0]
    b = lsp.gather(-1, labels[..., None])[..., 0]
    c = lsm_.gather(-1, labels[..., None])[..., 0]
    H = -(ls.exp() * ls).sum(-1)
    Hm = -(lsm_.exp() * lsm_).sum(-1)
    A = adv.double()[:, None].expand(B, T)

    ratio = torch.exp(torch.clamp(a - old, -20, 20))
    l1 = -A * ratio
    l2 = -A * torch.clamp(ratio, 1 - cfg.clip_ratio_low, 1 + cfg.clip_ratio_high)
    lmax = torch.maximum(l1, l2)
    pg_tok = torch.where(A < 0, torch.minimum(lmax, -A * cfg.clip_ratio_c), lmax)
    loss = ref_agg(pg_tok, mask, cfg.loss_agg_mode, eps=0.0)
    if cfg.entropy_coef:
        loss = loss - cfg.entropy_coef * ref_agg(H, mask, cfg.loss_agg_mode)
    loss = loss + cfg.kl_coef * ref_agg(ref_k(a, refl, cfg.kl_estimator), mask,
                                             cfg.loss_agg_mode)

    if cfg.perception_mask:
        m = ref_select(H.detach(), Hm.detach(), mask, cfg.cpl_top_percent)
    else:
        m = mask.bool().clone()
    if cfg.cpl_gating:
        m = m & (A > 0)
    kind = cfg.cpl_divergence or cfg.kl_estimator
    if kind == "full_vocab":
        dp = (ls.exp() * (ls - lsp)).sum(-1)
        dm = (ls.exp() * (ls - lsm_)).sum(-1)
    else:
        dp = ref_k(a, b, kind, cfg.cpl_divergence_clamp)
        dm = ref_k(a, c, kind, cfg.cpl_divergence_clamp)
    ep, em = torch.exp(-dp / cfg.cpl_tau), torch.exp(-dm / cfg.cpl_tau)
    info_nce = -torch.log(ep / (ep + em))
    # CPL is aggregated like the policy loss, over all B rows of the micro-batch
    cpl = ref_agg(torch.where(m, info_nce, torch.zeros_like(info_nce)), m, cfg.loss_agg_mode)
    return loss + cfg.cpl_coef * cpl, m


# ----------------------------------------------------------------------------------------------
# fixtures: logits and a micro-batch


def make_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.5, 4.0, B * T).view(B, T, 1)
    z = torch.randn(B, T, VOCAB, generator=g) * scale
    # I+ close to clean; I- flatter (information removed: entropy mostly rises) plus noise
    zp = z + 0.3 * torch.randn(B, T, VOCAB, generator=g)
    zm = z * torch.rand(B, T, 1, generator=g) * 1.2 + 0.5 * torch.randn(B, T, VOCAB, generator=g)
    labels = torch.randint(0, 151_665, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[0, 8:] = 0
    mask[3, 5:] = 0
    mask[4, :] = 0  # no response tokens at all
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.9, 0.2, 0.1])  # A[2] = 0 exactly
    adv = grpo_advantages(rewards, torch.tensor([0, 0, 0, 1, 1, 1]))
    old = (torch.randn(B, T, generator=g) * 0.2 - 8.0).double()
    refl = (torch.randn(B, T, generator=g) * 0.2 - 8.0).double()
    return z, zp, zm, labels, mask, adv, old, refl


def run_ours(cfg, z, zp, zm, labels, mask, adv, old, refl, *, temperature=1.0, valid=None,
             skip=True):
    """Our pipeline: head on each pass, perturbed passes only for the needed rows (``skip``)."""
    z, zp, zm = (t.clone().requires_grad_() for t in (z, zp, zm))
    snapshots = [t.detach().clone() for t in (z, zp, zm)]
    loss_fn = CPPOLoss(cfg, temperature=temperature, valid_vocab=valid)
    need = loss_fn.samples_needing_perturbed_passes(adv, mask)
    rows = need.nonzero().squeeze(-1) if skip else torch.arange(B)
    kw = dict(temperature=temperature, valid_vocab=valid)
    a, H = log_probs_and_entropy(z, labels, with_entropy=cfg.entropy_coef != 0, **kw)
    b, _ = log_probs_and_entropy(zp[rows], labels[rows], with_entropy=False, **kw)
    c, Hm = log_probs_and_entropy(zm[rows], labels[rows], with_entropy=False, **kw)
    full = cfg.cpl_divergence == "full_vocab"
    batch = CPPOMicroBatch(
        log_probs_BT=a, entropy_BT=H, old_log_probs_BT=old.float(), ref_log_probs_BT=refl.float(),
        response_mask_BT=mask, advantages_B=adv, logits_BTV=z if full else None,
        perturbed=PerturbedPasses(sample_idx_P=rows, plus_log_probs_PT=b, minus_log_probs_PT=c,
                                  minus_entropy_PT=Hm,
                                  plus_logits_PTV=zp[rows] if full else None,
                                  minus_logits_PTV=zm[rows] if full else None))
    loss, metrics = loss_fn(batch)
    loss.backward()
    unchanged = all(torch.equal(t.detach(), s) for t, s in zip((z, zp, zm), snapshots))
    return loss, metrics, (z.grad, zp.grad, zm.grad), need, unchanged


CONFIGS = {
    "default": CPPOLossConfig(),
    "no_vision_mask": CPPOLossConfig(perception_mask=False),
    "no_gating": CPPOLossConfig(cpl_gating=False),
    "k1": CPPOLossConfig(kl_estimator="k1"),                 # CPL divergence follows: k1
    "k2_cpl_k3_kl": CPPOLossConfig(cpl_divergence="k2"),
    "k1_clamped": CPPOLossConfig(kl_estimator="k1", cpl_divergence_clamp=0.5),
    "tau_top_coef": CPPOLossConfig(cpl_tau=0.5, cpl_top_percent=0.3, cpl_coef=0.2),
    "full_vocab": CPPOLossConfig(cpl_divergence="full_vocab", cpl_coef=0.05),
    "entropy_seqmean": CPPOLossConfig(entropy_coef=0.01, loss_agg_mode="seq-mean-token-mean"),
    "seq_token_sum": CPPOLossConfig(loss_agg_mode="seq-mean-token-sum", cpl_coef=0.1),
    "seq_token_sum_norm": CPPOLossConfig(loss_agg_mode="seq-mean-token-sum-norm", cpl_coef=0.1),
}


@pytest.fixture(scope="module")
def inputs():
    return make_inputs()


def _check_against_reference(cfg, inputs, temperature=1.0, valid=None):
    z, zp, zm, labels, mask, adv, old, refl = inputs
    loss, metrics, grads, _, unchanged = run_ours(cfg, z, zp, zm, labels, mask, adv, old, refl,
                                                  temperature=temperature, valid=valid)
    leaves = [t.double().requires_grad_() for t in (z, zp, zm)]
    ref_loss, ref_m = ref_cppo(cfg, *leaves, labels, mask, old, refl, adv,
                               temperature=temperature, valid=valid or VOCAB)
    ref_grads = torch.autograd.grad(ref_loss, leaves)
    assert unchanged, "logits modified"
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * (1 + abs(ref_loss.item())), \
        (loss.item(), ref_loss.item())
    assert metrics["perception_tokens"].item() == ref_m.sum().item()
    for name, g, rg in zip(("clean", "I+", "I-"), grads, ref_grads):
        g = torch.zeros_like(rg) if g is None else g.double()
        # 0 (exact) only where rg is 0 everywhere: a pass no term depends on (cpl_coef = 0), which
        # ours never runs (gradient None, filled with 0) and the reference multiplies by 0
        tol = 1e-6 * rg.abs().max() + 1e-3 * rg.abs()
        excess = ((g - rg).abs() - tol).max().item()
        assert excess <= 0, (name, excess, (g - rg).abs().max().item(), rg.abs().max().item())
    return loss, metrics, ref_m


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cppo_matches_reference(name, inputs):
    cfg = CONFIGS[name]
    _, metrics, ref_m = _check_against_reference(cfg, inputs)
    assert ref_m.any(), "the case must select tokens to test anything"
    if cfg.cpl_coef:
        assert metrics["cpl_loss"].item() > 0


def test_cppo_matches_reference_temperature_and_padding(inputs):
    _check_against_reference(CPPOLossConfig(), inputs, temperature=0.8, valid=151_665)


def test_selection_is_not_trivial(inputs):
    """The fixture exercises both signs of dH and partial selection (else the tests prove little)."""
    z, zp, zm, labels, mask, *_ = inputs
    _, H = log_probs_and_entropy(z, labels)
    _, Hm = log_probs_and_entropy(zm, labels)
    dH = (Hm - H)[mask.bool()]
    assert (dH > 0).any() and (dH < 0).any()
    m = ref_select(H, Hm, mask, 0.5)
    assert 0 < m.sum() < ((Hm - H > 0) & mask.bool()).sum()


def test_skipping_gated_out_passes_is_exact(inputs):
    """Loss and gradients are bitwise equal with and without the perturbed passes of samples with
    A <= 0; the passes that were run anyway get exactly zero gradient."""
    z, zp, zm, labels, mask, adv, old, refl = inputs
    for cfg in (CPPOLossConfig(), CPPOLossConfig(cpl_divergence="full_vocab")):
        skip = run_ours(cfg, z, zp, zm, labels, mask, adv, old, refl, skip=True)
        run = run_ours(cfg, z, zp, zm, labels, mask, adv, old, refl, skip=False)
        need = skip[3]
        assert 0 < need.sum() < B
        assert torch.equal(skip[0], run[0])
        assert torch.equal(skip[2][0], run[2][0])  # clean logits
        for i in (1, 2):  # I+, I-
            assert torch.equal(skip[2][i][need], run[2][i][need])
            assert torch.count_nonzero(run[2][i][~need]) == 0
            assert torch.count_nonzero(skip[2][i][~need]) == 0  # never even computed


def test_missing_needed_passes_raise(inputs):
    z, zp, zm, labels, mask, adv, old, refl = inputs
    a = torch.randn(B, T)
    batch = CPPOMicroBatch(log_probs_BT=a, entropy_BT=a.abs(), old_log_probs_BT=a,
                           ref_log_probs_BT=a, response_mask_BT=mask, advantages_B=adv)
    with pytest.raises(ValueError, match="perturbed"):
        CPPOLoss(CPPOLossConfig())(batch)
    need = samples_needing_perturbed_passes(CPPOLossConfig(), adv, mask)
    first = need.nonzero()[0]
    batch.perturbed = PerturbedPasses(sample_idx_P=first, plus_log_probs_PT=a[first],
                                      minus_log_probs_PT=a[first], minus_entropy_PT=a[first])
    with pytest.raises(ValueError, match="missing"):
        CPPOLoss(CPPOLossConfig())(batch)
    # plain GRPO needs none
    loss, _ = CPPOLoss(CPPOLossConfig(cpl_coef=0.0))(replace(batch, perturbed=None))
    assert torch.isfinite(loss)


def test_samples_needing_passes_follow_config():
    adv = torch.tensor([0.5, 0.0, -1.0, 2.0])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [0, 0]])
    assert samples_needing_perturbed_passes(CPPOLossConfig(), adv, mask).tolist() == \
        [True, False, False, False]
    assert samples_needing_perturbed_passes(CPPOLossConfig(cpl_gating=False), adv,
                                            mask).tolist() == [True, True, True, False]
    assert samples_needing_perturbed_passes(CPPOLossConfig(perception_mask=False), adv,
                                            mask).tolist() == [True, False, False, False]
    assert not samples_needing_perturbed_passes(CPPOLossConfig(cpl_coef=0.0), adv, mask).any()


# ----------------------------------------------------------------------------------------------
# CPL: gradient oracle and InfoNCE identity


def test_gradient_oracle():
    """docs/cppo-objective.md: with k3 and no clamp active, m = D+ - D-,
    dCPL/db = s/tau (e^(b-a) - 1), dCPL/dc = -s/tau (e^(c-a) - 1), dCPL/da = s/tau (e^(c-a) - e^(b-a)),
    s = sigmoid(m/tau). Two selected tokens: L_CPL = sum / (2 + 1e-8), so each gets about half."""
    tau = 0.1
    a = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[-1.1, -1.7, -3.0]], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([[-1.6, -2.4, -0.2]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    term = build_perception_term(CPPOLossConfig(perception_mask=False, cpl_tau=tau))
    batch = CPPOMicroBatch(log_probs_BT=a, old_log_probs_BT=a.detach(), response_mask_BT=mask,
                           advantages_B=torch.tensor([1.0]),
                           perturbed=PerturbedPasses(sample_idx_P=torch.tensor([0]),
                                                     plus_log_probs_PT=b, minus_log_probs_PT=c))
    loss, _ = term(batch)
    ga, gb, gc = torch.autograd.grad(loss, (a, b, c))
    ad, bd, cd = a.detach(), b.detach(), c.detach()
    d_plus = torch.exp(bd - ad) - (bd - ad) - 1
    d_minus = torch.exp(cd - ad) - (cd - ad) - 1
    s = torch.sigmoid((d_plus - d_minus) / tau) / tau * mask / (mask.double().sum() + 1e-8)
    torch.testing.assert_close(gb, s * (torch.exp(bd - ad) - 1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gc, -s * (torch.exp(cd - ad) - 1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ga, s * (torch.exp(cd - ad) - torch.exp(bd - ad)), rtol=1e-10,
                               atol=1e-12)
    assert ga[0, 2] == gb[0, 2] == gc[0, 2] == 0


def test_info_nce_identity():
    d_plus = torch.linspace(0, 10, 41, dtype=torch.float64).repeat_interleave(41)
    d_minus = torch.linspace(0, 10, 41, dtype=torch.float64).repeat(41)
    for tau in (0.05, 0.1, 1.0):
        ours = cpl_per_token(d_plus, d_minus, tau)
        sim = torch.stack([-d_plus / tau, -d_minus / tau], dim=-1)
        info_nce = -torch.log_softmax(sim, dim=-1)[..., 0]
        torch.testing.assert_close(ours, info_nce, rtol=1e-12, atol=1e-12)


def test_nothing_selected_gives_zero_cpl():
    H = torch.tensor([[2.0, 2.0, 2.0]])
    a = torch.zeros(1, 3, requires_grad=True)
    batch = CPPOMicroBatch(log_probs_BT=a, entropy_BT=H, old_log_probs_BT=a.detach(),
                           response_mask_BT=torch.ones(1, 3), advantages_B=torch.tensor([1.0]),
                           perturbed=PerturbedPasses(sample_idx_P=torch.tensor([0]),
                                                     plus_log_probs_PT=a - 1,
                                                     minus_log_probs_PT=a - 2,
                                                     minus_entropy_PT=H - 0.5))
    loss, metrics = build_perception_term(CPPOLossConfig())(batch)
    assert loss.item() == 0 and metrics["perception_tokens"].item() == 0


# ----------------------------------------------------------------------------------------------
# selection edge cases


def _sel(H, Hm, mask=None, p=0.5):
    H, Hm = torch.tensor([H], dtype=torch.float32), torch.tensor([Hm], dtype=torch.float32)
    mask = torch.ones_like(H) if mask is None else torch.tensor([mask], dtype=torch.float32)
    ours = select_perception_tokens(H, Hm, mask, top_percent=p)
    assert torch.equal(ours, ref_select(H, Hm, mask, p))
    return ours[0].int().tolist()


def test_selection_edge_cases():
    assert _sel([1, 2, 3], [1, 1.5, 2]) == [0, 0, 0]                  # no increase
    assert _sel([1, 1, 1, 1], [2, 2, 2, 1.2]) == [1, 1, 1, 0]         # ties: 3 selected, k = 2
    assert _sel([1, 1, 1, 1], [2, 2, 2, 2]) == [1, 1, 1, 1]           # all equal: all kept
    assert _sel([1, 1, 5], [1.2, 0.5, 9]) == [0, 0, 1]                # c = 2 -> k = 1
    assert _sel([1, 1, 1], [1.5, 1.1, 0.2]) == [1, 0, 0]              # c = 2 -> k = 1
    assert _sel([1, 1, 1, 1], [3, 1.5, 1.2, 0], p=1.0) == [1, 1, 1, 0]
    # relative, not absolute: +1 on H- = 2 (s = 0.5) beats +2 on H- = 10 (s = 0.2)
    assert _sel([1, 8], [2, 10], p=0.5) == [1, 0]
    # padding: a huge increase on a padded position is neither selected nor moves theta
    assert _sel([1, 1, 1, 0], [2, 1.5, 1.2, 100], mask=[1, 1, 1, 0], p=0.7) == [1, 1, 0, 0]
    # k = max(1, floor(p c)) with p c rounded to fp32, as the reference: fp32(0.29) * 100 rounds
    # to 29.0, so k = 29. (An earlier version asserted 28, the floor of the fp64 product
    # 28.999999999999996, which is not what the reference computes.)
    H = [1.0] * 100
    Hm = [1.0 + (i + 1) / 100 for i in range(100)]
    assert sum(_sel(H, Hm, p=0.29)) == 29


def test_selection_random_vs_loop_reference():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        H = torch.randint(0, 6, (5, 17), generator=g).float() / 2  # coarse: many ties
        Hm = torch.randint(0, 6, (5, 17), generator=g).float() / 2
        mask = (torch.rand(5, 17, generator=g) > 0.2).float()
        p = float(torch.rand((), generator=g)) * 0.9 + 0.1
        ours = select_perception_tokens(H, Hm, mask, top_percent=p)
        assert torch.equal(ours, ref_select(H, Hm, mask, p))


# ----------------------------------------------------------------------------------------------
# GRPO, PPO, KL, aggregation, config


def test_grpo_advantages():
    r = torch.tensor([1.0, 0.0, 0.5, 3.0, 0.2, 0.2, 0.7])
    groups = torch.tensor([5, 2, 5, 9, 2, 5, 2])  # non-contiguous; group 9 has one member
    adv = grpo_advantages(r, groups)
    for gid in (5, 2):
        idx = (groups == gid).nonzero().squeeze(-1)
        x = r[idx]
        torch.testing.assert_close(adv[idx], (x - x.mean()) / (x.std() + 1e-6))
    assert adv[3] == 0  # group of size 1
    # equal rewards -> exactly 0
    assert torch.equal(grpo_advantages(torch.ones(4), torch.zeros(4)), torch.zeros(4))
    torch.testing.assert_close(grpo_advantages(r, groups, normalize_by_std=False)[[0, 2, 5]],
                               r[[0, 2, 5]] - r[[0, 2, 5]].mean())


@pytest.mark.parametrize("n", [5, 8, 16])
def test_grpo_equal_rewards_give_exact_zero(n):
    """A group whose rewards are all equal carries no signal: its advantages are exactly 0, also
    where the fp32 group mean does not round back to the reward (the literal formula then gives
    up to ~0.1, enough to pass the CPL gate A > 0). Another group in the same call is unaffected."""
    spurious = 0
    for value in (0.03, 0.12, 0.1, 0.7, 0.9, 0.91, 0.37, 0.55, 1.0):
        rewards = torch.cat([torch.full((n,), value), torch.tensor([0.0, 1.0, 1.0])])
        groups = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(3, dtype=torch.long)])
        adv = grpo_advantages(rewards, groups)
        assert torch.equal(adv[:n], torch.zeros(n)), (value, adv[:n])
        x = rewards[n:]
        torch.testing.assert_close(adv[n:], (x - x.mean()) / (x.std() + 1e-6))
        r = rewards[:n]
        spurious = max(spurious, ((r - r.mean()) / (r.std() + 1e-6)).abs().max().item())
    assert spurious > 1e-3, "no case where the literal formula leaves a residue: test proves little"


def test_ppo_clip_and_dual_clip():
    # tokens: (logp - old, A): inside clip, above clip A>0, below clip A<0, dual clip A<0 ratio 5
    lr = torch.tensor([[0.1, 0.5, -0.5, math.log(5.0)]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -2.0]])
    logp = lr.clone().requires_grad_()
    loss, metrics = ppo_clip_policy_loss(logp, torch.zeros(1, 4), adv, torch.ones(1, 4))
    ratio = lr.exp()
    expected = torch.tensor([-ratio[0, 0], -1.2, 0.8, 2.0 * 3.0])
    torch.testing.assert_close(loss, expected.mean())
    (g,) = torch.autograd.grad(loss, logp)
    # gradient only where the unclipped branch is active (token 0); token 2 (A<0, rho<0.8) is
    # clipped at -A (1 - 0.2) = 0.8 > -A rho = 0.61, so no gradient; dual clip -> no gradient
    torch.testing.assert_close(g, torch.tensor([[-ratio[0, 0] / 4, 0.0, 0.0, 0.0]]))
    assert metrics["pg_clipfrac"].item() == pytest.approx(2 / 4)
    assert metrics["pg_clipfrac_lower"].item() == pytest.approx(1 / 4)


def test_kl_estimators():
    a = torch.tensor([-1.0, -2.0, -30.0, -0.1])
    r = torch.tensor([-1.5, -1.0, -1.0, -40.0])
    torch.testing.assert_close(kl_estimate(a, r, "k1"), a - r)
    torch.testing.assert_close(kl_estimate(a, r, "k2"), 0.5 * (a - r) ** 2)
    d = torch.clamp(r - a, -20, 20)
    k3 = torch.clamp(torch.exp(d) - d - 1, -10, 10)
    torch.testing.assert_close(kl_estimate(a, r, "k3"), k3)
    torch.testing.assert_close(kl_estimate(a, r, "low_var_kl"), k3)
    assert kl_estimate(a, r, "k3")[2] == 10  # clamped
    with pytest.raises(ValueError):
        kl_estimate(a, r, "k4")


def test_aggregation_modes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    for mode in AGG_MODES:
        torch.testing.assert_close(aggregate_loss(x, mask, mode), ref_agg(x, mask, mode))
    # Both sides sum the 15 entries in other orders (row sums first, or one sum) and divide
    # differently: each within (15 - 1) u sum|x m| / d of exact plus <= 2 roundings of the result
    # (u = eps / 2), so the two within 16 eps sum|x m| / d, d the total divisor.
    def rounding(d):
        return (x.numel() + 1) * torch.finfo(x.dtype).eps * (x * mask).abs().sum().item() / d

    # Dr.GRPO: divided by T = 5 and by the 3 rows (the reference's agg_loss)
    torch.testing.assert_close(aggregate_loss(x, mask, "seq-mean-token-sum-norm"),
                               (x * mask).sum() / 5 / 3, rtol=0, atol=rounding(5 * 3))
    # a subset of rows aggregated as part of a 6-row micro-batch
    torch.testing.assert_close(aggregate_loss(x, mask, "seq-mean-token-sum", num_rows=6),
                               (x * mask).sum() / 6, rtol=0, atol=rounding(6))
    # token-mean without epsilon (the PPO term): the count itself, 0 for an empty mask
    torch.testing.assert_close(aggregate_loss(x, mask, "token-mean", token_mean_eps=0.0),
                               (x * mask).sum() / 9, rtol=0, atol=rounding(9))
    assert aggregate_loss(x, torch.zeros(3, 5), "token-mean", token_mean_eps=0.0) == 0


def test_metrics(inputs):
    """The loss is returned unscaled (megatron's schedule divides by num_microbatches once) and
    equals the ``loss`` metric."""
    z, zp, zm, labels, mask, adv, old, refl = inputs
    cfg = CPPOLossConfig()
    loss, metrics, *_ = run_ours(cfg, z, zp, zm, labels, mask, adv, old, refl)
    assert torch.equal(loss.detach(), metrics["loss"])
    for key in ("pg_loss", "pg_clipfrac", "pg_clipfrac_lower", "ppo_kl", "kl_loss", "entropy",
                "cpl_loss", "perception_tokens", "perception_token_frac",
                "perception_token_frac_all", "cpl_gated_sample_frac", "cpl_samples", "loss"):
        assert key in metrics and metrics[key].dim() == 0 and not metrics[key].requires_grad, key
    # 5 samples have response tokens (sample 4 has none); A > 0 for samples 0 (group 0) and 3
    # (group 1), A = 0 for sample 2 -> 2 of 5 take part, 3 of 5 are gated out
    assert metrics["cpl_samples"].item() == 2
    assert metrics["cpl_gated_sample_frac"].item() == pytest.approx(3 / 5)
    assert 0 < metrics["perception_token_frac"].item() <= 1


@pytest.mark.parametrize("field,value", [
    ("clip_ratio_low", 1.0), ("clip_ratio_c", 1.0), ("loss_agg_mode", "mean"),
    ("kl_estimator", "k9"), ("kl_coef", -1.0), ("cpl_coef", float("nan")),
    ("cpl_tau", 0.0), ("cpl_top_percent", 0.0), ("cpl_top_percent", 1.5),
    ("cpl_divergence", "js"), ("cpl_divergence_clamp", 0.0),
])
def test_config_validation_names_field(field, value):
    """The error names the setting as its flag (the field of the same name)."""
    with pytest.raises(ValueError, match="^--" + field.replace("_", "-") + ":"):
        CPPOLossConfig(**{field: value})


def test_config_defaults_follow_method_note():
    cfg = CPPOLossConfig()
    assert (cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.clip_ratio_c) == (0.2, 0.2, 3.0)
    assert (cfg.kl_coef, cfg.kl_estimator, cfg.entropy_coef) == (0.01, "low_var_kl", 0.0)
    assert (cfg.cpl_coef, cfg.cpl_tau, cfg.cpl_top_percent) == (0.01, 0.1, 0.5)
    assert cfg.perception_mask and cfg.cpl_gating and cfg.loss_agg_mode == "token-mean"
    assert cfg.cpl_divergence_kind == "k3"


def test_config_warns_about_ignored_settings():
    with pytest.warns(UserWarning, match="cpl_tau ignored because cpl_coef = 0"):
        CPPOLossConfig(cpl_coef=0.0, cpl_tau=0.5)
    with pytest.warns(UserWarning, match="cpl_top_percent ignored because perception_mask"):
        CPPOLossConfig(perception_mask=False, cpl_top_percent=0.3)


def test_non_finite_padding_reaches_neither_loss_nor_gradient():
    """NaN / inf written into padded positions of every per-token input (a filled old log-prob,
    ref log-prob, entropy, perturbed log-probs, even the clean log-probs) leave the loss and the
    gradients bitwise unchanged; padded positions get gradient exactly 0."""
    g = torch.Generator().manual_seed(3)
    b, t = 4, 7
    mask = torch.ones(b, t)
    mask[0, 5:] = 0
    mask[2, 2:] = 0
    pad = ~mask.bool()
    base = {name: torch.randn(b, t, generator=g) * 0.3 - 2.0
            for name in ("a", "old", "ref", "bp", "cm")}
    base["H"] = torch.rand(b, t, generator=g) * 2
    base["Hm"] = base["H"] + torch.randn(b, t, generator=g)
    adv = torch.tensor([1.0, -0.5, 0.7, 0.2])

    def run(values, mode):
        leaves = {k: values[k].clone().requires_grad_() for k in ("a", "H", "bp", "cm")}
        batch = CPPOMicroBatch(
            log_probs_BT=leaves["a"], entropy_BT=leaves["H"], old_log_probs_BT=values["old"],
            ref_log_probs_BT=values["ref"], response_mask_BT=mask, advantages_B=adv,
            perturbed=PerturbedPasses(sample_idx_P=torch.arange(b),
                                      plus_log_probs_PT=leaves["bp"],
                                      minus_log_probs_PT=leaves["cm"],
                                      minus_entropy_PT=values["Hm"]))
        cfg = CPPOLossConfig(loss_agg_mode=mode, entropy_coef=0.01, cpl_gating=False)
        loss, _ = CPPOLoss(cfg)(batch)
        grads = torch.autograd.grad(loss, list(leaves.values()))
        return loss, grads

    for mode in AGG_MODES:
        clean_loss, clean_grads = run(base, mode)
        poisoned = {k: torch.where(pad, torch.tensor(v), x) for k, x in base.items()
                    for v in [{"old": float("nan"), "ref": float("-inf"),
                               "a": float("nan"), "H": float("inf"), "Hm": float("nan"),
                               "bp": float("-inf"), "cm": float("nan")}[k]]}
        loss, grads = run(poisoned, mode)
        assert torch.isfinite(clean_loss) and torch.equal(loss, clean_loss), mode
        for gr, cg in zip(grads, clean_grads):
            assert torch.equal(gr, cg), mode
            assert torch.count_nonzero(gr[pad]) == 0

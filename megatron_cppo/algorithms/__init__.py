"""RL objectives: GRPO advantages, PPO clipped policy loss, reference KL, and CPPO's Contrastive
Perception Loss with perception-token selection and advantage gating."""

from megatron_cppo.algorithms.advantages import grpo_advantages
from megatron_cppo.algorithms.batch import CPPOMicroBatch, PerturbedPasses
from megatron_cppo.algorithms.kl import canonical_kl_kind, kl_estimate
from megatron_cppo.algorithms.cppo_loss import (
    CPPOLoss,
    CPPOLossConfig,
    build_perception_term,
    samples_needing_perturbed_passes,
)
from megatron_cppo.algorithms.perception import (
    AllResponseTokens,
    ContrastivePerceptionLoss,
    FullVocabDivergence,
    NoPerceptionTerm,
    PerceptionTerm,
    SampledDivergence,
    TopRelativeEntropyIncrease,
    cpl_per_token,
    select_perception_tokens,
)
from megatron_cppo.algorithms.policy_loss import (
    AGG_MODES,
    aggregate_loss,
    masked_mean,
    masked_sum,
    ppo_clip_policy_loss,
    reference_kl_loss,
)

__all__ = ["AGG_MODES", "AllResponseTokens", "CPPOLoss", "CPPOLossConfig", "CPPOMicroBatch",
           "ContrastivePerceptionLoss", "FullVocabDivergence", "NoPerceptionTerm",
           "PerceptionTerm", "PerturbedPasses", "SampledDivergence", "TopRelativeEntropyIncrease",
           "aggregate_loss", "build_perception_term", "canonical_kl_kind", "cpl_per_token",
           "grpo_advantages", "kl_estimate", "masked_mean", "masked_sum", "ppo_clip_policy_loss",
           "reference_kl_loss", "samples_needing_perturbed_passes", "select_perception_tokens"]

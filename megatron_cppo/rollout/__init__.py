"""vLLM rollouts for megatron_cppo (docs/rollout.md).

  config.py    RolloutConfig / SamplingConfig
  engine.py    VLLMEngine: vLLM in this process; generate, score, transactional weight update
  process.py   EngineProcess: the engine in its own (unpatched) process; RefitTarget for senders
  refit.py     refit(...) from the megatron ranks: TP gather, HF names via mapping.py, buckets
  source.py    VLLMRolloutSource: the trainer's RolloutSource (rank 0 drives the engine, broadcast)
  metrics.py   rollout_vs_train_logprob_diff
"""

from megatron_cppo.rollout.config import RolloutConfig, SamplingConfig
from megatron_cppo.rollout.engine import (RefitError, RolloutGroup, RolloutItem, RolloutSample,
                                          VLLMEngine)
from megatron_cppo.rollout.metrics import rollout_vs_train_logprob_diff


def build_engine(config: RolloutConfig):
    """The engine for ``config.placement``: an ``EngineProcess`` ("process") or a ``VLLMEngine``
    in this process ("inprocess"). Both have generate / score / version / valid_vocab / shutdown;
    refit senders use ``engine.target`` (process) or ``VLLMEngine.update_weights`` (inprocess)."""
    if config.placement == "process":
        from megatron_cppo.rollout.process import EngineProcess

        return EngineProcess(config)
    return VLLMEngine(config)


__all__ = ["RefitError", "RolloutConfig", "RolloutGroup", "RolloutItem", "RolloutSample",
           "SamplingConfig", "VLLMEngine", "build_engine", "rollout_vs_train_logprob_diff"]

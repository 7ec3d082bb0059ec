"""Rollout settings and the rollout-vs-trainer metric (no vLLM needed)."""

import pytest
import torch

from megatron_cppo.rollout.config import RolloutConfig, SamplingConfig
from megatron_cppo.rollout.metrics import rollout_vs_train_logprob_diff


@pytest.mark.parametrize("kwargs,field", [
    (dict(n=0), "n"), (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_k=0), "top_k"), (dict(max_new_tokens=0), "max_new_tokens")])
def test_sampling_config_names_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} "):
        SamplingConfig(**kwargs)


@pytest.mark.parametrize("kwargs,field", [
    (dict(placement="gpu"), "placement"), (dict(dtype="fp8"), "dtype"),
    (dict(refit_bucket_mb=0), "refit_bucket_mb"), (dict(max_model_len=0), "max_model_len"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization")])
def test_rollout_config_names_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} "):
        RolloutConfig(model_path="m", **kwargs)


def test_rollout_config_accepts_sampling_as_dict():
    config = RolloutConfig(model_path="m", sampling={"n": 4, "seed": 1})
    assert config.sampling == SamplingConfig(n=4, seed=1)


def test_logprob_diff_is_the_masked_mean_abs_difference():
    rollout = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    train = torch.tensor([[-1.5, -2.0, -1.0], [-0.5, -1.5, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert rollout_vs_train_logprob_diff(rollout, train, mask) == pytest.approx(1.5 / 4)
    assert rollout_vs_train_logprob_diff(rollout, train) == pytest.approx(12.5 / 6)
    assert rollout_vs_train_logprob_diff(rollout, train, torch.zeros(2, 3)) == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        rollout_vs_train_logprob_diff(rollout, train[:, :2])
    with pytest.raises(ValueError, match="mask"):
        rollout_vs_train_logprob_diff(rollout, train, mask[:, :2])

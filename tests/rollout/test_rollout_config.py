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
    (dict(rollout_gpu_memory_utilization=1.5), "--rollout-gpu-memory-utilization:"),
    (dict(rollout_top_p=0.0), "--rollout-top-p:"),
    (dict(n_samples_per_prompt=0), "--n-samples-per-prompt:")])
def test_rollout_config_names_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} "):
        RolloutConfig(model_path="m", **kwargs)


def test_rollout_sampling_and_dtype_spellings():
    config = RolloutConfig(n_samples_per_prompt=4, rollout_temperature=0.7, rollout_top_p=0.9,
                           max_response_length=12, dtype="bf16")
    assert config.sampling(seed=1) == SamplingConfig(n=4, temperature=0.7, top_p=0.9,
                                                     max_new_tokens=12, seed=1)
    assert config.dtype == "bfloat16"  # any spelling of the dtype table, stored as vLLM's


def test_engine_args_carry_the_gpu_share_and_need_a_model():
    from megatron_cppo.rollout.engine import vllm_engine_args

    config = RolloutConfig(model_path="m", rollout_gpu_memory_utilization=0.3)
    assert vllm_engine_args(config, cuda=True)["gpu_memory_utilization"] == 0.3
    cpu = vllm_engine_args(config, cuda=False)
    assert "gpu_memory_utilization" not in cpu and cpu["enable_chunked_prefill"] is False
    with pytest.raises(ValueError, match="model_path"):
        vllm_engine_args(RolloutConfig(), cuda=False)


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

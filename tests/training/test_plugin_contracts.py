"""The plug-in contracts (tests/helpers/plugin_contracts.py) on every implementation in the repo:
the real prompt dataset and reward, the recorded plug-ins the trainer tests use, and (in
test_vllm_run.py, where an engine runs) the vLLM rollout source. A misaligned implementation of
each protocol is rejected, so the contracts can fail.
"""

import copy

import pytest
import torch

from helpers import recorded
from helpers.plugin_contracts import (assert_prompt_source_contract, assert_reward_contract,
                                      assert_rollout_source_contract)
from megatron_cppo.data.types import Sample
from megatron_cppo.rollout.config import SamplingConfig

SAMPLING = SamplingConfig(n=3, temperature=1.0, max_new_tokens=16)


@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
    from megatron_cppo.data import build_qwen2_5_vl_processor
    from megatron_cppo.data.builtin import write_builtin_dataset

    root = tmp_path_factory.mktemp("contracts")
    processor = build_qwen2_5_vl_processor(root / "proc", min_pixels=28 * 28,
                                           max_pixels=112 * 112)
    write_builtin_dataset(root / "data", seed=2, train_rows=5, validation_rows=2, sft_rows=2,
                          row_group_size=2)
    return root / "data", processor


def test_prompt_dataset_passes_the_prompt_source_contract(builtin):
    from megatron_cppo.data import PromptDataset

    data, processor = builtin
    # 5 rows, batches of 3: the resumed stream crosses an epoch boundary
    assert_prompt_source_contract(
        lambda: PromptDataset(data / "train.parquet", processor, seed=4))


def test_recorded_plugins_pass_their_contracts():
    table = recorded.record_rollout(num_prompts=3, n=3)
    assert_prompt_source_contract(lambda: recorded.RecordedPrompts(table))
    prompts = recorded.RecordedPrompts(table).next_batch(3)
    assert_rollout_source_contract(recorded.RecordedRollout(table), prompts, SAMPLING,
                                   refit=lambda source, v: source.refit([], None, v))
    samples = recorded.RecordedRollout(table).generate(prompts, SAMPLING)
    assert_reward_contract(recorded.parity_reward, samples)


def test_the_real_reward_passes_the_reward_contract():
    from megatron_cppo.rewards import load_reward_fn
    from megatron_cppo.training.plugins import reward_fn_from

    texts = ["<think>3</think> \\boxed{3}", "\\boxed{4}", "no box", "<think>", "\\boxed{}"]
    samples = [Sample(prompt_ids=torch.tensor([1, 2]), response_ids=torch.tensor([3]),
                      group_id=0, response_text=t, ground_truth="3") for t in texts]
    assert_reward_contract(reward_fn_from(load_reward_fn()), samples)


# ----------------------------------------------------------------------------------------------
# misaligned implementations are rejected


class ForgetfulPrompts(recorded.RecordedPrompts):
    def load_state_dict(self, state):  # ignores the position: a resumed run repeats prompts
        pass


class SampleMajorRollout(recorded.RecordedRollout):
    def generate(self, prompts, sampling):  # response i of every prompt, then response i + 1
        out = super().generate(prompts, sampling)
        n = sampling.n
        return [out[p * n + i] for i in range(n) for p in range(len(prompts))]


def test_misaligned_plugins_are_rejected():
    table = recorded.record_rollout(num_prompts=3, n=3)
    with pytest.raises(AssertionError, match="resume"):
        assert_prompt_source_contract(lambda: ForgetfulPrompts(table))
    prompts = recorded.RecordedPrompts(table).next_batch(2)
    with pytest.raises(AssertionError, match="group_id"):
        assert_rollout_source_contract(SampleMajorRollout(table), prompts, SAMPLING)
    samples = recorded.RecordedRollout(table).generate(prompts, SAMPLING)
    with pytest.raises(AssertionError):
        assert_reward_contract(lambda s: [0.5 for _ in s], samples)  # bare floats

    def writes_into_samples(s):
        for x in s:
            x.reward_extra["seen"] = 1.0
        return [{"reward": 0.0} for _ in s]

    with pytest.raises(AssertionError, match="must not write"):
        assert_reward_contract(writes_into_samples, copy.deepcopy(samples))

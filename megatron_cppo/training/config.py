"""Trainer configuration: typed sections, Megatron-LM flag spellings, an optional YAML file.

    cfg = parse_config(["--tensor-model-parallel-size", "2", "--config", "run.yaml"])
    cfg.parallel.tensor_model_parallel_size, cfg.loss_config()  # -> CPPOLossConfig

Every field of every section is one command-line flag: ``--`` + the field name with ``-`` for ``_``
(Megatron-LM's spelling where Megatron has the setting), except booleans that default to True,
which are switched off by ``--no-<name>``. A YAML file (``--config``) is a flat mapping from flag
names (with or without the dashes, ``-`` or ``_``) to values; flags given on the command line win.

Validation happens in each section's ``__post_init__`` and, for settings that span sections, in
``TrainConfig.__post_init__``; what depends on the world size in ``check_world``. Every error is
one ``ValueError`` whose message starts with the offending flag (``--micro-batch-size: ...``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

__all__ = ["CheckpointConfig", "DataConfig", "LoggingConfig", "LossConfig", "ModelConfig",
           "OptimizerConfig", "ParallelConfig", "RolloutConfig", "TrainConfig", "build_parser",
           "check_world", "parse_config"]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _bad(name: str, message: str) -> ValueError:
    return ValueError(f"{flag(name)}: {message}")


def _opt(default, help: str, **extra):
    return field(default=default, metadata=dict(help=help, **extra))


def _check_int(obj, name: str, minimum: int, *, optional: bool = False) -> None:
    value = getattr(obj, name)
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _bad(name, f"must be an integer >= {minimum}, got {value!r}")


def _check_float(obj, name: str, lo: float = -math.inf, hi: float = math.inf, *,
                 lo_open: bool = False, hi_open: bool = False, optional: bool = False) -> None:
    value = getattr(obj, name)
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, f"must be a finite number, got {value!r}")
    if value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise _bad(name, f"must be in {lb}{lo}, {hi}{rb}, got {value!r}")
    setattr(obj, name, float(value))


def _check_choice(obj, name: str, choices: Sequence, *, optional: bool = False) -> None:
    value = getattr(obj, name)
    if optional and value is None:
        return
    if value not in choices:
        raise _bad(name, f"must be one of {', '.join(map(str, choices))}; got {value!r}")


# ----------------------------------------------------------------------------------------------
# sections


@dataclass(kw_only=True)
class ParallelConfig:
    tensor_model_parallel_size: int = _opt(1, "tensor-parallel ranks (Megatron TP)")
    pipeline_model_parallel_size: int = _opt(1, "pipeline stages (Megatron PP)")
    decoder_first_pipeline_num_layers: Optional[int] = _opt(
        None, "language-model layers on the first stage (which also runs the ViT)")
    decoder_last_pipeline_num_layers: Optional[int] = _opt(
        None, "language-model layers on the last stage")
    use_distributed_optimizer: bool = _opt(False, "shard optimizer state over data parallel")
    batch_p2p_comm: bool = _opt(True, "batch the pipeline send/receive calls of one step")
    vision_parallel_mode: str = _opt("auto", "ViT parallelism: auto, tp (sharded) or dp_in_tp "
                                             "(replicated, images split over TP ranks)")
    distributed_timeout_minutes: int = _opt(30, "collective timeout")

    def __post_init__(self):
        _check_int(self, "tensor_model_parallel_size", 1)
        _check_int(self, "pipeline_model_parallel_size", 1)
        _check_int(self, "decoder_first_pipeline_num_layers", 1, optional=True)
        _check_int(self, "decoder_last_pipeline_num_layers", 1, optional=True)
        _check_int(self, "distributed_timeout_minutes", 1)
        _check_choice(self, "vision_parallel_mode", ("auto", "tp", "dp_in_tp"))
        for name in ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers"):
            if getattr(self, name) is not None and self.pipeline_model_parallel_size == 1:
                raise _bad(name, "needs --pipeline-model-parallel-size > 1")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size


@dataclass(kw_only=True)
class ModelConfig:
    hf_dir: Optional[str] = _opt(None, "Hugging Face Qwen2.5-VL directory: architecture, "
                                       "tokenizer and (without --load) the start weights; "
                                       "default: the built-in tiny model")
    bf16: bool = _opt(False, "bf16 parameters and activations (fp32 otherwise)")
    recompute_granularity: Optional[str] = _opt(
        None, "activation recomputation of the language model: selective (core attention) or "
              "full (whole layers)")
    recompute_method: Optional[str] = _opt(
        None, "with --recompute-granularity full: uniform (every layer, in groups of "
              "--recompute-num-layers) or block (the first --recompute-num-layers layers of each "
              "pipeline stage); default uniform")
    recompute_num_layers: Optional[int] = _opt(
        None, "with --recompute-granularity full: layers per group (uniform) or per stage "
              "(block); default 1")
    reference_cpu_offload: bool = _opt(False, "keep the frozen reference model in CPU memory "
                                              "between its passes")

    def __post_init__(self):
        _check_choice(self, "recompute_granularity", ("full", "selective"), optional=True)
        _check_choice(self, "recompute_method", ("uniform", "block"), optional=True)
        _check_int(self, "recompute_num_layers", 1, optional=True)
        if self.recompute_granularity != "full":
            for name in ("recompute_method", "recompute_num_layers"):
                if getattr(self, name) is not None:
                    raise _bad(name, "applies to --recompute-granularity full only")
        else:  # Megatron-LM requires both; the defaults recompute every layer (least memory)
            if self.recompute_method is None:
                self.recompute_method = "uniform"
            if self.recompute_num_layers is None:
                self.recompute_num_layers = 1


@dataclass(kw_only=True)
class OptimizerConfig:
    train_iters: int = _opt(100, "rollout steps (each: rollout, then optimizer steps over it)")
    micro_batch_size: int = _opt(4, "responses per micro-batch (clean view; the I+/I- views of "
                                    "positive-advantage responses travel with it)")
    max_tokens_per_microbatch: Optional[int] = _opt(
        None, "token budget of a micro-batch instead of a fixed size: text tokens plus image "
              "patches, counted for every view")
    sequence_packing: bool = _opt(True, "pack each micro-batch's sequences (every view) back to "
                                        "back in one row: no padding tokens through the model; "
                                        "same losses as padded rows")
    global_batch_size: int = _opt(40, "responses per optimizer step, over all data-parallel ranks")
    lr: float = _opt(1e-6, "peak learning rate")
    min_lr: float = _opt(0.0, "learning rate at the end of the decay")
    lr_warmup_iters: int = _opt(0, "optimizer steps of linear warm-up")
    lr_decay_style: str = _opt("constant", "constant, linear or cosine")
    lr_decay_iters: Optional[int] = _opt(None, "optimizer steps of decay (default: all)")
    weight_decay: float = _opt(0.01, "AdamW weight decay")
    adam_beta1: float = _opt(0.9, "AdamW beta1")
    adam_beta2: float = _opt(0.999, "AdamW beta2")
    adam_eps: float = _opt(1e-8, "AdamW epsilon")
    clip_grad: float = _opt(1.0, "gradient clipping by global norm (0: off)")
    seed: int = _opt(1234, "seed of the data order, initialisation and the sampler")

    def __post_init__(self):
        _check_int(self, "train_iters", 1)
        _check_int(self, "micro_batch_size", 1)
        _check_int(self, "max_tokens_per_microbatch", 1, optional=True)
        _check_int(self, "global_batch_size", 1)
        _check_float(self, "lr", 0.0, lo_open=True)
        _check_float(self, "min_lr", 0.0)
        if self.min_lr > self.lr:
            raise _bad("min_lr", f"{self.min_lr} is above --lr {self.lr}")
        _check_int(self, "lr_warmup_iters", 0)
        _check_choice(self, "lr_decay_style", ("constant", "linear", "cosine"))
        _check_int(self, "lr_decay_iters", 1, optional=True)
        _check_float(self, "weight_decay", 0.0)
        _check_float(self, "adam_beta1", 0.0, 1.0, hi_open=True)
        _check_float(self, "adam_beta2", 0.0, 1.0, hi_open=True)
        _check_float(self, "adam_eps", 0.0, lo_open=True)
        _check_float(self, "clip_grad", 0.0)
        _check_int(self, "seed", 0)
        if self.micro_batch_size > self.global_batch_size:
            raise _bad("micro_batch_size", f"{self.micro_batch_size} is larger than "
                                           f"--global-batch-size {self.global_batch_size}")


@dataclass(kw_only=True)
class LossConfig:
    """The CPPO objective (mapped onto ``algorithms.CPPOLossConfig``; defaults = the reference)."""

    kl_coef: float = _opt(0.01, "coefficient of the KL-to-reference loss term (0: no reference "
                                "model is built)")
    kl_estimator: str = _opt("low_var_kl", "k1, k2, k3 or low_var_kl (= k3)")
    cpl_coef: float = _opt(0.01, "Contrastive Perception Loss coefficient (0: plain GRPO, no "
                                 "perturbed passes)")
    cpl_tau: float = _opt(0.1, "CPL temperature")
    cpl_top_percent: float = _opt(0.5, "fraction of the tokens with an entropy increase kept as "
                                       "perception tokens")
    cpl_gating: bool = _opt(True, "CPL only for responses with advantage > 0")
    perception_mask: bool = _opt(True, "CPL on the selected perception tokens only")
    clip_ratio_low: float = _opt(0.2, "PPO clip, lower")
    clip_ratio_high: float = _opt(0.2, "PPO clip, upper")
    clip_ratio_c: float = _opt(3.0, "PPO dual clip for negative advantages")
    loss_agg_mode: str = _opt("token-mean", "token-mean, seq-mean-token-sum, "
                                            "seq-mean-token-mean or seq-mean-token-sum-norm")
    entropy_coef: float = _opt(0.0, "entropy bonus coefficient")

    def __post_init__(self):
        _check_float(self, "kl_coef", 0.0)
        _check_choice(self, "kl_estimator", ("k1", "k2", "k3", "low_var_kl", "kl", "mse"))
        _check_float(self, "cpl_coef", 0.0)
        _check_float(self, "cpl_tau", 0.0, lo_open=True)
        _check_float(self, "cpl_top_percent", 0.0, 1.0, lo_open=True)
        _check_float(self, "clip_ratio_low", 0.0, 1.0, hi_open=True)
        _check_float(self, "clip_ratio_high", 0.0)
        _check_float(self, "clip_ratio_c", 1.0, lo_open=True)
        _check_choice(self, "loss_agg_mode", ("token-mean", "seq-mean-token-sum",
                                              "seq-mean-token-mean", "seq-mean-token-sum-norm"))
        _check_float(self, "entropy_coef")

    def to_loss_config(self):
        """The ``CPPOLossConfig`` these flags describe."""
        from megatron_cppo.algorithms import CPPOLossConfig

        # CPPOLossConfig warns about CPL settings that cpl_coef = 0 makes ineffective
        return CPPOLossConfig(
            clip_ratio_low=self.clip_ratio_low, clip_ratio_high=self.clip_ratio_high,
            clip_ratio_c=self.clip_ratio_c, loss_agg_mode=self.loss_agg_mode,
            kl_loss_coef=self.kl_coef, kl_loss_type=self.kl_estimator,
            entropy_coef=self.entropy_coef, cpl_coef=self.cpl_coef, cpl_tau=self.cpl_tau,
            cpl_top_percent=self.cpl_top_percent, advantage_gating=self.cpl_gating,
            use_perception_mask=self.perception_mask)


@dataclass(kw_only=True)
class RolloutConfig:
    rollout_batch_size: int = _opt(8, "prompts per rollout step")
    n_samples_per_prompt: int = _opt(5, "responses sampled per prompt (the GRPO group)")
    rollout_temperature: float = _opt(1.0, "sampling temperature; every log-prob pass divides "
                                           "the logits by it")
    rollout_top_p: float = _opt(1.0, "nucleus sampling (1: off; the log-probs assume 1)")
    max_prompt_length: int = _opt(512, "prompt tokens after image-token expansion; longer "
                                       "prompts are skipped and counted")
    max_response_length: int = _opt(1024, "response tokens per sample")
    rollout_tensor_parallel_size: int = _opt(1, "vLLM tensor parallel size")
    rollout_gpu_memory_utilization: float = _opt(0.5, "vLLM memory fraction")
    eval_n_samples: int = _opt(1, "samples per validation prompt (avg@N)")

    def __post_init__(self):
        _check_int(self, "rollout_batch_size", 1)
        _check_int(self, "n_samples_per_prompt", 1)
        _check_float(self, "rollout_temperature", 0.0, lo_open=True)
        _check_float(self, "rollout_top_p", 0.0, 1.0, lo_open=True)
        if self.rollout_top_p != 1.0:
            raise _bad("rollout_top_p", "only 1.0 is supported: the training log-probs are of the "
                                        "full (temperature-scaled) distribution")
        _check_int(self, "max_prompt_length", 1)
        _check_int(self, "max_response_length", 1)
        _check_int(self, "rollout_tensor_parallel_size", 1)
        _check_float(self, "rollout_gpu_memory_utilization", 0.0, 1.0, lo_open=True)
        _check_int(self, "eval_n_samples", 1)


@dataclass(kw_only=True)
class DataConfig:
    data_path: Optional[str] = _opt(None, "training prompts (parquet or JSONL; default: the "
                                          "built-in generated dataset)")
    val_data_path: Optional[str] = _opt(None, "validation prompts")
    eval_interval: int = _opt(0, "validate every this many steps (0: only at the start and end)")
    eval_iters: Optional[int] = _opt(None, "validation prompts per evaluation (default: all)")
    eval_only: bool = _opt(False, "evaluate the start weights (--load / --hf-dir) and exit")
    sft_data_path: Optional[str] = _opt(None, "warm-start rows (prompt + response; the built-in "
                                              "dataset's sft.parquet)")
    warm_start_iters: int = _opt(0, "supervised warm-start steps on --sft-data-path before CPPO "
                                    "(skipped with --load)")
    warm_start_lr: float = _opt(1e-3, "constant learning rate of the warm start")
    sft_only: bool = _opt(False, "run only the warm start, save the weights to --save (a "
                                 "checkpoint `--load` starts CPPO from) and exit")

    def __post_init__(self):
        for name in ("data_path", "val_data_path"):
            path = getattr(self, name)
            if path is not None and not os.path.exists(path):
                raise _bad(name, f"{path} does not exist")
        _check_int(self, "eval_interval", 0)
        _check_int(self, "warm_start_iters", 0)
        _check_float(self, "warm_start_lr", 0.0, lo_open=True)
        if self.sft_data_path is not None and not os.path.exists(self.sft_data_path):
            raise _bad("sft_data_path", f"{self.sft_data_path} does not exist")
        _check_int(self, "eval_iters", 1, optional=True)
        if self.eval_only and self.val_data_path is None:
            raise _bad("eval_only", "needs --val-data-path")


@dataclass(kw_only=True)
class CheckpointConfig:
    save: Optional[str] = _opt(None, "directory for training checkpoints")
    load: Optional[str] = _opt(None, "resume from this directory (or start from a converted "
                                     "megatron checkpoint)")
    save_interval: int = _opt(0, "save every this many steps (0: only at the end)")
    no_load_optim: bool = _opt(False, "with --load: weights only (fresh optimizer and schedule)")
    exit_interval: Optional[int] = _opt(None, "save (with --save) and exit when the step is a "
                                              "multiple of this (the LR schedule still spans "
                                              "--train-iters)")

    def __post_init__(self):
        _check_int(self, "save_interval", 0)
        _check_int(self, "exit_interval", 1, optional=True)
        if self.save_interval and not self.save:
            raise _bad("save_interval", "needs --save")
        if self.load is not None and not os.path.isdir(self.load):
            raise _bad("load", f"{self.load} is not a directory")


@dataclass(kw_only=True)
class LoggingConfig:
    log_dir: Optional[str] = _opt(None, "metrics.jsonl, samples and the curve PNG (default: "
                                        "--save, else ./runs/<time>)")
    tensorboard_dir: Optional[str] = _opt(None, "TensorBoard event files")
    wandb_project: Optional[str] = _opt(None, "log to Weights & Biases (needs wandb installed)")
    wandb_exp_name: Optional[str] = _opt(None, "W&B run name")
    log_interval: int = _opt(1, "console line every this many steps")
    sample_log_interval: int = _opt(10, "log a few sample responses every this many steps "
                                        "(0: never)")
    progress: bool = _opt(True, "progress bars for the rollout and update phases")

    def __post_init__(self):
        _check_int(self, "log_interval", 1)
        _check_int(self, "sample_log_interval", 0)
        if self.wandb_exp_name and not self.wandb_project:
            raise _bad("wandb_exp_name", "needs --wandb-project")
        if self.wandb_project:
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise _bad("wandb_project", "wandb is not installed (pip install wandb)") from None


SECTIONS = {"parallel": ParallelConfig, "model": ModelConfig, "optimizer": OptimizerConfig,
            "loss": LossConfig, "rollout": RolloutConfig, "data": DataConfig,
            "checkpoint": CheckpointConfig, "logging": LoggingConfig}


@dataclass(kw_only=True)
class TrainConfig:
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        responses = self.rollout.rollout_batch_size * self.rollout.n_samples_per_prompt
        gbs = self.optimizer.global_batch_size
        if responses % gbs:
            raise _bad("global_batch_size", f"{gbs} does not divide the responses of one rollout "
                       f"step: --rollout-batch-size {self.rollout.rollout_batch_size} x "
                       f"--n-samples-per-prompt {self.rollout.n_samples_per_prompt} = {responses}")
        if self.loss.cpl_coef > 0 and self.rollout.n_samples_per_prompt == 1 \
                and self.loss.cpl_gating:
            raise _bad("n_samples_per_prompt", "1 gives every response advantage 0, so gated CPL "
                       "(and the policy gradient) never acts; use >= 2")
        if self.data.sft_only and (not self.data.warm_start_iters or self.checkpoint.save is None
                                   or self.checkpoint.load is not None):
            raise _bad("sft_only", "needs --warm-start-iters > 0 and --save, and starts from "
                       "--hf-dir (not --load)")
        if self.data.warm_start_iters and self.loss.kl_coef > 0 and not self.data.sft_only:
            raise _bad("warm_start_iters", "needs --kl-coef 0 (the reference model would have to "
                       "be the warm-started one)")

    def loss_config(self):
        return self.loss.to_loss_config()

    @property
    def mini_batches_per_step(self) -> int:
        """Optimizer steps per rollout step."""
        return (self.rollout.rollout_batch_size * self.rollout.n_samples_per_prompt
                // self.optimizer.global_batch_size)

    def to_flat_dict(self) -> dict[str, Any]:
        return {f.name: getattr(getattr(self, sec), f.name)
                for sec, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


def check_world(cfg: TrainConfig, world_size: int) -> int:
    """Validate the settings that depend on the number of ranks; returns the data-parallel size."""
    p, o = cfg.parallel, cfg.optimizer
    if world_size % p.model_parallel_size:
        raise _bad("tensor_model_parallel_size",
                   f"{p.tensor_model_parallel_size} x --pipeline-model-parallel-size "
                   f"{p.pipeline_model_parallel_size} does not divide the world size {world_size}")
    dp = world_size // p.model_parallel_size
    if o.global_batch_size % dp:
        raise _bad("global_batch_size", f"{o.global_batch_size} is not divisible by the "
                                        f"data-parallel size {dp}")
    if o.max_tokens_per_microbatch is None and o.global_batch_size % (o.micro_batch_size * dp):
        raise _bad("micro_batch_size", f"{o.micro_batch_size} x data-parallel size {dp} does not "
                                       f"divide --global-batch-size {o.global_batch_size}")
    return dp


# ----------------------------------------------------------------------------------------------
# command line and YAML


def _all_fields():
    for sec, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            yield sec, f


def _is_negated(f) -> bool:
    return f.type in ("bool", bool) and f.default is True


def _cli_name(f) -> str:
    return ("--no-" + f.name.replace("_", "-")) if _is_negated(f) else flag(f.name)


def _arg_type(f):
    t = str(f.type)
    if "int" in t:
        return int
    if "float" in t:
        return float
    return str


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron-cppo train",
        description="CPPO (GRPO + Contrastive Perception Loss) for Qwen2.5-VL on megatron-core.",
        argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="YAML file setting any of the flags below (flags win)")
    for sec, cls in SECTIONS.items():
        g = p.add_argument_group(sec)
        for f in dataclasses.fields(cls):
            help_text = f.metadata.get("help", "")
            if f.type in ("bool", bool):
                if _is_negated(f):  # the help says what the flag turns off
                    help_text = f"turn off (on by default): {help_text}"
                g.add_argument(_cli_name(f), dest=f.name, help=help_text,
                               action="store_false" if _is_negated(f) else "store_true")
            else:
                g.add_argument(flag(f.name), dest=f.name, type=_arg_type(f),
                               help=f"{help_text} (default: {f.default})")
    return p


def _yaml_values(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as e:
        raise ValueError(f"--config: cannot read {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config: {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a mapping of flag names to values")
    fields = {f.name: f for _, f in _all_fields()}
    out = {}
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        negated = name.startswith("no_") and name[3:] in fields and _is_negated(fields[name[3:]])
        if negated:
            name, value = name[3:], not value
        if name not in fields:
            raise ValueError(f"--config: {path}: unknown setting {key!r}")
        out[name] = value
    return out


def parse_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Flags (and ``--config`` YAML) -> a validated ``TrainConfig``. Raises ValueError naming the
    flag for a bad value or combination (argparse itself exits for malformed flags)."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    values = _yaml_values(args.pop("config")) if "config" in args else {}
    values.update(args)
    sections: dict[str, dict] = {sec: {} for sec in SECTIONS}
    for sec, f in _all_fields():
        if f.name in values:
            sections[sec][f.name] = values[f.name]
    built = {}
    for sec, cls in SECTIONS.items():
        try:
            built[sec] = cls(**sections[sec])
        except TypeError as e:  # a YAML value of the wrong type reaching a comparison
            raise ValueError(f"--config: {e}") from None
    return TrainConfig(**built)

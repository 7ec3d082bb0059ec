"""The trainer's configuration: the components' own configs plus what belongs to a run.

    cfg = parse_config(["--tensor-model-parallel-size", "2", "--config", "run.yaml"])
    cfg.parallel.tensor_model_parallel_size   # ParallelConfig (parallel/state.py)
    cfg.loss.kl_coef                          # CPPOLossConfig (algorithms/cppo_loss.py)

``TrainConfig`` composes the component configs, each owned by its component and passed to it as
is (no translation between two vocabularies):

    parallel  ParallelConfig       megatron_cppo/parallel/state.py
    model     Qwen25VLModelConfig  megatron_cppo/models/qwen2_5_vl/config.py
    loss      CPPOLossConfig       megatron_cppo/algorithms/cppo_loss.py
    rollout   RolloutConfig        megatron_cppo/rollout/config.py
    data      DataConfig           megatron_cppo/data/dataset.py

and adds the run's own sections (below): ``training`` (iterations, seed, batches), ``optimizer``
(Adam and the LR schedule), ``warm_start``, ``eval``, ``checkpoint`` (start point and saves) and
``logging``.

Every option field (``megatron_cppo.options.option``) of every section is one command-line flag:
``--`` + the field name with ``-`` for ``_`` (Megatron-LM's spelling where Megatron has the
setting); a boolean that defaults to True is switched off by ``--no-<name>``. A YAML file
(``--config``) is a flat mapping from the same names (with or without the dashes, ``-`` or ``_``)
to values; flags given on the command line win. tests/training/test_config.py freezes the flag
set.

Validation happens in each section's ``__post_init__`` and, for settings that span sections, in
``TrainConfig.__post_init__``; what depends on the world size in ``check_world``. Every error is
one ``ValueError`` whose message starts with the offending flag (``--micro-batch-size: ...``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import yaml

from megatron_cppo.algorithms.cppo_loss import CPPOLossConfig
from megatron_cppo.data.dataset import DataConfig
from megatron_cppo.models.qwen2_5_vl.config import Qwen25VLModelConfig
from megatron_cppo.options import (bad, check_choice, check_float, check_int, cli_name, flag,
                                   help_text, negated, option, option_fields)
from megatron_cppo.parallel.state import ParallelConfig
from megatron_cppo.rollout.config import RolloutConfig

__all__ = ["CheckpointConfig", "EvalConfig", "LoggingConfig", "OptimizerConfig", "TrainConfig",
           "TrainingConfig", "WarmStartConfig", "build_parser", "check_world", "parse_config",
           "replace"]


# ----------------------------------------------------------------------------------------------
# the run's sections


@dataclass(kw_only=True)
class TrainingConfig:
    """How long the run is and how a rollout step's responses are batched."""

    train_iters: Optional[int] = option(
        None, "rollout steps (each: rollout, then optimizer steps over it); default: from "
              "--train-epochs, else 100")
    train_epochs: Optional[int] = option(
        None, "epochs over the training prompts: --train-epochs x floor(usable rows / "
              "--rollout-batch-size) steps (the reference's total_epochs with drop_last; "
              "--train-iters wins when both are given)")
    seed: int = option(1234, "seed of the data order, initialisation and the sampler")
    global_batch_size: int = option(40, "responses per optimizer step, over all data-parallel "
                                        "ranks")
    micro_batch_size: int = option(4, "responses per micro-batch (clean view; the I+/I- views of "
                                      "positive-advantage responses travel with it)")
    max_tokens_per_microbatch: Optional[int] = option(
        None, "token budget of a micro-batch instead of a fixed size: text tokens plus image "
              "patches, counted for every view")
    sequence_packing: bool = option(True, "pack each micro-batch's sequences (every view) back to "
                                          "back in one row: no padding tokens through the model; "
                                          "same losses as padded rows")
    reference_cpu_offload: bool = option(False, "keep the frozen reference model in CPU memory "
                                                "between its passes")
    balance_batch: bool = option(
        False, "reorder each rollout step's responses as verl's balance_batch does (equal-count "
               "parts of similar token workload, one per data-parallel rank; each rank's part "
               "then split into its mini-batch shares) instead of the rollout order")

    def __post_init__(self):
        check_int(self, "train_iters", 1, optional=True)
        check_int(self, "train_epochs", 1, optional=True)
        check_int(self, "seed", 0)
        check_int(self, "global_batch_size", 1)
        check_int(self, "micro_batch_size", 1)
        check_int(self, "max_tokens_per_microbatch", 1, optional=True)
        if self.micro_batch_size > self.global_batch_size:
            raise bad("micro_batch_size", f"{self.micro_batch_size} is larger than "
                                          f"--global-batch-size {self.global_batch_size}")


@dataclass(kw_only=True)
class OptimizerConfig:
    """Adam (megatron-core's optimizer) and its learning-rate schedule, in optimizer steps."""

    lr: float = option(1e-6, "peak learning rate")
    min_lr: float = option(0.0, "learning rate at the end of the decay")
    lr_warmup_iters: int = option(0, "optimizer steps of linear warm-up")
    lr_decay_style: str = option("constant", "constant, linear or cosine")
    lr_decay_iters: Optional[int] = option(None, "optimizer steps of decay (default: all)")
    weight_decay: float = option(0.01, "AdamW weight decay")
    weight_decay_all_params: bool = option(
        False, "apply --weight-decay to every parameter, norms and biases included (the "
               "reference: torch's AdamW over all parameters); default: megatron's, no decay of "
               "norms and biases")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_eps: float = option(1e-8, "AdamW epsilon")
    clip_grad: float = option(1.0, "gradient clipping by global norm (0: off)")
    use_distributed_optimizer: bool = option(False, "shard optimizer state over data parallel")

    def __post_init__(self):
        check_float(self, "lr", 0.0, lo_open=True)
        check_float(self, "min_lr", 0.0)
        if self.min_lr > self.lr:
            raise bad("min_lr", f"{self.min_lr} is above --lr {self.lr}")
        check_int(self, "lr_warmup_iters", 0)
        check_choice(self, "lr_decay_style", ("constant", "linear", "cosine"))
        check_int(self, "lr_decay_iters", 1, optional=True)
        check_float(self, "weight_decay", 0.0)
        check_float(self, "adam_beta1", 0.0, 1.0, hi_open=True)
        check_float(self, "adam_beta2", 0.0, 1.0, hi_open=True)
        check_float(self, "adam_eps", 0.0, lo_open=True)
        check_float(self, "clip_grad", 0.0)


@dataclass(kw_only=True)
class WarmStartConfig:
    """The supervised warm start before CPPO (training/warm_start.py), and ``megatron-cppo sft``."""

    warm_start_iters: int = option(0, "supervised warm-start steps on --sft-data-path before "
                                      "CPPO (skipped with --load)")
    warm_start_lr: float = option(1e-3, "constant learning rate of the warm start")
    sft_only: bool = option(False, "run only the warm start, save the weights to --save (a "
                                   "checkpoint `--load` starts CPPO from) and exit")

    def __post_init__(self):
        check_int(self, "warm_start_iters", 0)
        check_float(self, "warm_start_lr", 0.0, lo_open=True)


@dataclass(kw_only=True)
class EvalConfig:
    """Validation during the run (avg@N accuracy on --val-data-path), and ``megatron-cppo eval``."""

    eval_interval: int = option(0, "validate every this many steps (0: only at the start and "
                                   "end)")
    eval_iters: Optional[int] = option(None, "validation prompts per evaluation (default: all)")
    eval_n_samples: int = option(1, "samples per validation prompt (avg@N)")
    eval_temperature: float = option(
        0.0, "sampling temperature of validation (0: greedy, the reference's val_kwargs); the "
             "length and nucleus setting are the rollout's")
    eval_before_train: bool = option(True, "validate the start weights before the first step "
                                           "(the reference's val_before_train)")
    eval_only: bool = option(False, "evaluate the start weights (--load / --hf-dir) and exit")

    def __post_init__(self):
        check_int(self, "eval_interval", 0)
        check_int(self, "eval_iters", 1, optional=True)
        check_int(self, "eval_n_samples", 1)
        check_float(self, "eval_temperature", 0.0)
        if self.eval_temperature == 0 and self.eval_n_samples > 1:
            raise bad("eval_n_samples", f"{self.eval_n_samples} greedy samples "
                      f"(--eval-temperature 0) are all the same response; sample with "
                      f"--eval-temperature > 0 for avg@N")


@dataclass(kw_only=True)
class CheckpointConfig:
    """Where the start weights come from and where the run saves."""

    hf_dir: Optional[str] = option(None, "Hugging Face Qwen2.5-VL directory: architecture, "
                                         "tokenizer and (without --load) the start weights; "
                                         "default: the built-in tiny model")
    load: Optional[str] = option(None, "resume from this directory (or start from a converted "
                                       "megatron checkpoint)")
    save: Optional[str] = option(None, "directory for training checkpoints")
    save_interval: int = option(0, "save every this many steps (0: only at the end)")
    no_load_optim: bool = option(False, "with --load: weights only (fresh optimizer and "
                                        "schedule)")
    exit_interval: Optional[int] = option(None, "save (with --save) and exit when the step is a "
                                                "multiple of this (the LR schedule still spans "
                                                "--train-iters)")
    continue_on_save_failure: bool = option(
        False, "a periodic save that fails (a full disk, ...) is reported and training goes on "
               "(the last complete checkpoint stays the one --load resumes from); a failed final "
               "save still ends the run (default: any failed save ends it, status 1)")

    def __post_init__(self):
        check_int(self, "save_interval", 0)
        check_int(self, "exit_interval", 1, optional=True)
        if self.save_interval and not self.save:
            raise bad("save_interval", "needs --save")
        if self.load is not None and not os.path.isdir(self.load):
            raise bad("load", f"{self.load} is not a directory")
        _not_a_file(self, "save")


def _not_a_file(obj, name: str) -> None:
    """A directory setting must not name an existing file (the run would fail at its first
    write, possibly after hours)."""
    path = getattr(obj, name)
    if path is not None and os.path.exists(path) and not os.path.isdir(path):
        raise bad(name, f"{path} is a file, not a directory")


@dataclass(kw_only=True)
class LoggingConfig:
    log_dir: Optional[str] = option(None, "metrics.jsonl, samples and the curve PNG (default: "
                                          "--save, else ./runs/<time>)")
    tensorboard_dir: Optional[str] = option(None, "TensorBoard event files")
    wandb_project: Optional[str] = option(None, "log to Weights & Biases (needs wandb "
                                                "installed)")
    wandb_exp_name: Optional[str] = option(None, "W&B run name")
    log_interval: int = option(1, "console line every this many steps")
    sample_log_interval: int = option(10, "log a few sample responses every this many steps "
                                          "(0: never)")
    progress: bool = option(True, "progress bars for the rollout and update phases when stderr "
                                  "is a terminal (never in a redirected log)")
    rollout_data_dir: Optional[str] = option(
        None, "write every training response of each step to DIR/<step>.jsonl (prompt, "
              "response, ground truth, reward, advantage; the reference's rollout_data_dir)")
    validation_data_dir: Optional[str] = option(
        None, "write every validation response to DIR/<step>.jsonl (the reference's "
              "validation_data_dir)")

    def __post_init__(self):
        check_int(self, "log_interval", 1)
        check_int(self, "sample_log_interval", 0)
        for name in ("log_dir", "tensorboard_dir", "rollout_data_dir", "validation_data_dir"):
            _not_a_file(self, name)
        if self.wandb_exp_name and not self.wandb_project:
            raise bad("wandb_exp_name", "needs --wandb-project")
        if self.wandb_project:
            try:
                import wandb  # noqa: F401  (optional: only runs that log to W&B need it)
            except ImportError:
                raise bad("wandb_project", "wandb is not installed (pip install wandb)") from None


# section name -> config class; the order of ``--help``
SECTIONS = {"parallel": ParallelConfig, "model": Qwen25VLModelConfig, "loss": CPPOLossConfig,
            "rollout": RolloutConfig, "data": DataConfig, "training": TrainingConfig,
            "optimizer": OptimizerConfig, "warm_start": WarmStartConfig, "eval": EvalConfig,
            "checkpoint": CheckpointConfig, "logging": LoggingConfig}


@dataclass(kw_only=True)
class TrainConfig:
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: Qwen25VLModelConfig = field(default_factory=Qwen25VLModelConfig)
    loss: CPPOLossConfig = field(default_factory=CPPOLossConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        r, t, w = self.rollout, self.training, self.warm_start
        responses = r.rollout_batch_size * r.n_samples_per_prompt
        if responses % t.global_batch_size:
            raise bad("global_batch_size", f"{t.global_batch_size} does not divide the responses "
                      f"of one rollout step: --rollout-batch-size {r.rollout_batch_size} x "
                      f"--n-samples-per-prompt {r.n_samples_per_prompt} = {responses}")
        if self.loss.cpl_coef > 0 and r.n_samples_per_prompt == 1 and self.loss.cpl_gating:
            raise bad("n_samples_per_prompt", "1 gives every response advantage 0, so gated CPL "
                      "(and the policy gradient) never acts; use >= 2")
        if w.sft_only and (not w.warm_start_iters or self.checkpoint.save is None
                           or self.checkpoint.load is not None):
            raise bad("sft_only", "needs --warm-start-iters > 0 and --save, and starts from "
                      "--hf-dir (not --load)")
        if w.sft_only and os.path.exists(self.checkpoint.save):
            raise bad("save", f"{self.checkpoint.save} already exists; megatron-cppo sft writes "
                      f"a new checkpoint there (remove it or choose another directory)")
        if w.warm_start_iters and self.loss.kl_coef > 0 and not w.sft_only:
            raise bad("warm_start_iters", "needs --kl-coef 0 (the reference model would have to "
                      "be the warm-started one)")
        if self.eval.eval_only and self.data.val_data_path is None:
            raise bad("eval_only", "needs --val-data-path")
        if self.data.data_path is not None and self.data.val_data_path is None:
            # with --data-path the built-in validation set is not used: nothing to evaluate
            for name in ("eval_interval", "eval_iters"):
                if getattr(self.eval, name):
                    raise bad(name, "needs --val-data-path (with --data-path there is no "
                                    "built-in validation set)")
        if self.optimizer.weight_decay_all_params and self.optimizer.weight_decay == 0:
            raise bad("weight_decay_all_params", "has no effect with --weight-decay 0")
        t, ck = self.training, self.checkpoint
        if ck.exit_interval is not None and t.train_iters is not None \
                and ck.exit_interval > t.train_iters:
            raise bad("exit_interval", f"{ck.exit_interval} exceeds --train-iters "
                                       f"{t.train_iters}: it would never stop the run early")

    @property
    def mini_batches_per_step(self) -> int:
        """Optimizer steps per rollout step."""
        return (self.rollout.rollout_batch_size * self.rollout.n_samples_per_prompt
                // self.training.global_batch_size)

    def to_flat_dict(self) -> dict[str, Any]:
        """Every flag's value by its name (for the run's logs)."""
        return {f.name: getattr(getattr(self, sec), f.name)
                for sec, cls in SECTIONS.items() for f in option_fields(cls)}


def check_world(cfg: TrainConfig, world_size: int) -> int:
    """Validate the settings that depend on the number of ranks; returns the data-parallel size."""
    p, t = cfg.parallel, cfg.training
    if world_size % p.model_parallel_size:
        raise bad("tensor_model_parallel_size",
                  f"{p.tensor_model_parallel_size} x --pipeline-model-parallel-size "
                  f"{p.pipeline_model_parallel_size} does not divide the world size {world_size}")
    dp = world_size // p.model_parallel_size
    if t.global_batch_size % dp:
        raise bad("global_batch_size", f"{t.global_batch_size} is not divisible by the "
                                       f"data-parallel size {dp}")
    if t.max_tokens_per_microbatch is None and t.global_batch_size % (t.micro_batch_size * dp):
        raise bad("micro_batch_size", f"{t.micro_batch_size} x data-parallel size {dp} does not "
                                      f"divide --global-batch-size {t.global_batch_size}")
    return dp


# ----------------------------------------------------------------------------------------------
# command line and YAML


def _option_fields():
    for sec, cls in SECTIONS.items():
        for f in option_fields(cls):
            yield sec, f


def _arg_type(f):
    """The flag's parser: int / float / str by the field's type; an Optional field also takes
    ``none`` (unset: e.g. ``--max-tokens-per-microbatch none`` over a YAML that sets it)."""
    t = str(f.type)
    base = int if "int" in t else float if "float" in t else str
    if "Optional" not in t and "None" not in t:
        return base

    def optional(value: str):
        return None if value.lower() in ("none", "null") else base(value)

    optional.__name__ = base.__name__  # argparse names the type in its error message
    return optional


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron-cppo train",
        description="CPPO (GRPO + Contrastive Perception Loss) for Qwen2.5-VL on megatron-core.",
        # no prefixes: an abbreviation (or a renamed flag that is a prefix of a new one) would
        # silently set another setting (Megatron-LM's parser does the same)
        argument_default=argparse.SUPPRESS, allow_abbrev=False)
    p.add_argument("--config", help="YAML file setting any of the flags below (flags win)")
    for sec, cls in SECTIONS.items():
        g = p.add_argument_group(sec)
        for f in option_fields(cls):
            text = help_text(f)
            if f.type in ("bool", bool):
                if negated(f):  # the help says what the flag turns off
                    text = f"turn off (on by default): {text}"
                g.add_argument(cli_name(f), dest=f.name, help=text,
                               action="store_false" if negated(f) else "store_true")
            else:
                g.add_argument(flag(f.name), dest=f.name, type=_arg_type(f),
                               help=f"{text} (default: {f.default})")
    return p


def _yaml_values(path: str) -> dict[str, Any]:
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as e:
        raise ValueError(f"--config: cannot read {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config: {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a mapping of flag names to values")
    fields = {f.name: f for _, f in _option_fields()}
    out = {}
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name.startswith("no_") and name[3:] in fields and negated(fields[name[3:]]):
            name, value = name[3:], not value
        if name not in fields:
            raise ValueError(f"--config: {path}: unknown setting {key!r}")
        out[name] = value
    return out


def parse_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Flags (and ``--config`` YAML) -> a validated ``TrainConfig``. Raises ValueError naming the
    flag for a bad value or combination (argparse itself exits for malformed flags)."""
    args = vars(build_parser().parse_args(argv))
    values = _yaml_values(args.pop("config")) if "config" in args else {}
    values.update(args)
    sections: dict[str, dict] = {sec: {} for sec in SECTIONS}
    for sec, f in _option_fields():
        if f.name in values:
            sections[sec][f.name] = values[f.name]
    built = {}
    for sec, cls in SECTIONS.items():
        try:
            built[sec] = cls(**sections[sec])
        except TypeError as e:  # a YAML value of the wrong type reaching a comparison
            raise ValueError(f"--config: {e}") from None
    return TrainConfig(**built)


def replace(cfg: TrainConfig, **sections: dict) -> TrainConfig:
    """``cfg`` with some fields of some sections replaced, validated again:
    ``replace(cfg, data=dict(data_path="x.parquet"))``."""
    changed = {sec: dataclasses.replace(getattr(cfg, sec), **values)
               for sec, values in sections.items()}
    return dataclasses.replace(cfg, **changed)

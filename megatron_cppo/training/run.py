"""A run as explicit phases over one built ``Run`` (training/builder.py).

    cfg, start = resolve_start(parse_config(argv))     # train.py, on every rank
    history = run(cfg, start)                          # or run(cfg, start, make_plugins)

The command chooses the phases:

    megatron-cppo train   warm_start (if --warm-start-iters and not --load), train
    megatron-cppo eval    evaluate                            (--eval-only)
    megatron-cppo sft     warm_start, save_weights            (--sft-only: no rollout engine)

Each phase is a function of the ``Run``; ``run`` returns the per-step metrics of its last phase
that has steps (on every rank). ``train`` loops ``Trainer.train_step``: validation at the start,
every --eval-interval steps and at the end; the console / JSONL line per --log-interval; samples
per --sample-log-interval; a checkpoint per --save-interval and at the end; --exit-interval.
Validation at the start can be turned off (--no-eval-before-train, the reference's
val_before_train=False).
"""

from __future__ import annotations

from typing import Callable, Optional

from megatron_cppo.checkpoint import save_megatron_checkpoint
from megatron_cppo.parallel import destroy_parallel, initialize_parallel
from megatron_cppo.training import checkpoint as ckpt
from megatron_cppo.training.builder import MakePlugins, Run, build_run, default_plugins
from megatron_cppo.training.config import TrainConfig, check_world
from megatron_cppo.training.start import Start
from megatron_cppo.training.warm_start import warm_start

__all__ = ["PHASES", "mode_of", "run"]


def warm_start_phase(run: Run) -> Optional[list[dict]]:
    """The supervised warm start (skipped when a checkpoint is loaded: it holds warm-started
    weights already)."""
    cfg = run.cfg
    if not cfg.warm_start.warm_start_iters or run.start.checkpoint is not None:
        return None
    return warm_start(cfg, run.policy, run.state, run.ctx, run.monitor, run.processor)


def save_weights_phase(run: Run) -> None:
    """``megatron-cppo sft``: the warm-started weights as a megatron checkpoint in ``--save``
    (``megatron-cppo train --load`` starts CPPO from it, and it is that run's reference)."""
    save = run.cfg.checkpoint.save
    save_megatron_checkpoint(run.policy.raw_chunks(), save, run.state,
                             hf_config=run.start.hf_config, source_hf_dir=run.start.hf_dir)
    run.monitor.print(f"saved the warm-started weights to {save}; start CPPO from them with: "
                      f"megatron-cppo train --load {save} ...")


def _refit(run: Run) -> None:
    """The engine gets the weights the run starts from (HF, loaded, or warm-started)."""
    run.plugins.rollout.refit(run.policy.raw_chunks(), run.state, run.counters.weight_version)


def _validation_prompts(run: Run) -> list:
    return list(run.plugins.val_prompts or [])[:run.cfg.eval.eval_iters or None]


def _dump_validation(run: Run, step: int) -> None:
    if run.cfg.logging.validation_data_dir:
        run.monitor.dump_generations(run.cfg.logging.validation_data_dir, step,
                                     *run.trainer.last_eval)


def evaluate_phase(run: Run) -> list[dict]:
    """``megatron-cppo eval``: validation accuracy of the start weights."""
    _refit(run)
    metrics = run.trainer.evaluate(_validation_prompts(run))
    _dump_validation(run, run.counters.step)
    run.monitor.log_step(run.counters.step, metrics)
    return [metrics]


def train_phase(run: Run) -> list[dict]:
    """CPPO: ``train_step`` until --train-iters (or --exit-interval), with validation, logs and
    checkpoints (module docstring)."""
    cfg, trainer, monitor, counters = run.cfg, run.trainer, run.monitor, run.counters
    _refit(run)
    history = []
    val = _validation_prompts(run)
    if val and counters.step == 0 and cfg.eval.eval_before_train:
        monitor.log_step(0, trainer.evaluate(val))
        _dump_validation(run, 0)
    while counters.step < cfg.training.train_iters:
        metrics = trainer.train_step()
        step = counters.step
        exit_now = bool(cfg.checkpoint.exit_interval and step % cfg.checkpoint.exit_interval == 0)
        last = step == cfg.training.train_iters
        final = last or exit_now
        if cfg.logging.rollout_data_dir:
            monitor.dump_generations(cfg.logging.rollout_data_dir, step, trainer.last_prompts,
                                     trainer.last_samples)
        if val and ((cfg.eval.eval_interval and step % cfg.eval.eval_interval == 0) or last):
            metrics.update(trainer.evaluate(val))
            _dump_validation(run, step)
        history.append(metrics)
        if step % cfg.logging.log_interval == 0 or final:
            monitor.log_step(step, metrics)
        k = cfg.logging.sample_log_interval
        if k and (step % k == 0 or step == 1):
            monitor.log_samples(step, trainer.last_samples)
        if cfg.checkpoint.save and ((cfg.checkpoint.save_interval
                                     and step % cfg.checkpoint.save_interval == 0) or final):
            try:
                path = ckpt.save_checkpoint(cfg.checkpoint.save, policy=run.policy,
                                            state=run.state, counters=counters,
                                            prompts=run.plugins.prompts,
                                            hf_config=run.start.hf_config,
                                            source_hf_dir=run.start.hf_dir, start=trainer.start)
                monitor.print(f"saved {path}")
            except ckpt.CheckpointSaveError as e:
                if final or not cfg.checkpoint.continue_on_save_failure:
                    raise
                monitor.warn(f"{e}; training goes on (--continue-on-save-failure)")
        if exit_now:
            monitor.print(f"exit at step {step} (--exit-interval)")
            break
    return history


Phase = Callable[[Run], Optional[list[dict]]]
PHASES: dict[str, tuple[Phase, ...]] = {
    "train": (warm_start_phase, train_phase),
    "eval": (evaluate_phase,),
    "sft": (warm_start_phase, save_weights_phase),
}


def mode_of(cfg: TrainConfig) -> str:
    """"sft" (--sft-only), "eval" (--eval-only) or "train"."""
    return "sft" if cfg.warm_start.sft_only else "eval" if cfg.eval.eval_only else "train"


def run(cfg: TrainConfig, start: Start, make_plugins: MakePlugins = default_plugins
        ) -> list[dict]:
    """Initialise parallelism, build the run, go through the phases of its mode, close (the
    closing summary, the engine, megatron's groups). Returns the per-step metrics of the last
    phase with steps, on every rank."""
    state = initialize_parallel(cfg.parallel, seed=cfg.training.seed)
    built = None
    try:
        check_world(cfg, state.world_size)
        mode = mode_of(cfg)
        built = build_run(cfg, start, state, make_plugins, rollout=mode != "sft")
        history: list[dict] = []
        for phase in PHASES[mode]:
            steps = phase(built)
            if steps is not None:
                history = steps
        return history
    finally:
        if built is not None:
            built.close()
        destroy_parallel(keep_process_group=True)

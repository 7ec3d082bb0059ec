"""The CPPO trainer (docs/trainer.md).

  config.py      TrainConfig: the components' configs + the run's sections; the flags
  start.py       resolve_start: the start point (--load / --hf-dir / data), read once
  builder.py     build_run: policy, monitor, plug-ins, checkpoint, reference, Trainer;
                 default_plugins (vLLM, datasets, reward)
  run.py         the phases (warm start, evaluate, train, save weights) and run()
  plugins.py     the plug-in protocols (prompt source, rollout source, reward), Plugins
  trainer.py     Trainer.train_step: rollout -> rewards -> advantages -> log-probs -> update ->
                 refit -> metrics
  update.py      log-prob passes and the CPPO update through megatron's schedule
  batch.py       micro-batches of Samples (padded or packed, three views)
  sft.py         the supervised step; warm_start.py the warm-start phase
  model.py       the policy (megatron DDP + optimizer + LR schedule) and the reference model
  checkpoint.py  training checkpoints (save, resume)
  monitor.py     console, JSONL, TensorBoard, W&B, curves
  builtin.py     the built-in tiny model and dataset, prepared offline
"""

"""Where a run starts, read once: ``resolve_start(cfg) -> (cfg, Start)``.

Every rank calls it before anything is built (training/run.py, train.py). It reads each thing
the start point needs exactly once:

* ``--load``: the directory it names (a save directory's ``latest``, an ``iter_*`` directory or a
  converted checkpoint), its metadata (the model's HF config, the source HF directory) and, for a
  training checkpoint without ``--no-load-optim``, its trainer state (counters, schedule, data
  position, where the start weights came from);
* the HF directory: ``--hf-dir``, else the one the checkpoint records (if it still exists), else
  the built-in tiny model (without ``--load``); its config is the model's architecture;
* the data: ``--data-path`` / ``--val-data-path`` / ``--sft-data-path``, else the built-in
  dataset's files (training/builtin.py prepares model and data offline on first use).
* the run's length: ``--train-iters``, else ``--train-epochs`` x the batches of one epoch of the
  training data (scanned here for its usable rows, the scan handed on to the dataset so it is
  not read twice), else 100 steps.

The returned config is the input with the resolved paths filled in (a new object); ``Start``
holds what was read, and the builder (training/builder.py) builds from both without reading the
start point again: the checkpoint loader takes the metadata and trainer state from it, and a
reference model that starts from the loaded weights is a copy of the policy's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from megatron_cppo.checkpoint import CheckpointMeta, read_meta
from megatron_cppo.data.dataset import RowScan, scan_rows
from megatron_cppo.data.tokenizer import load_processor
from megatron_cppo.models.qwen2_5_vl.config import load_hf_config
from megatron_cppo.training import builtin
from megatron_cppo.training.checkpoint import find_checkpoint, read_trainer_state
from megatron_cppo.training.config import TrainConfig, replace

__all__ = ["DEFAULT_TRAIN_ITERS", "Start", "resolve_start"]

DEFAULT_TRAIN_ITERS = 100  # rollout steps without --train-iters and --train-epochs


@dataclass(frozen=True)
class Start:
    hf_dir: Optional[str]            # processor, tokenizer and rollout model (start weights
    #                                  unless a checkpoint is loaded)
    hf_config: Any                   # Qwen2_5_VLConfig: the architecture
    checkpoint: Optional[Path] = None        # what --load resolved to
    meta: Optional[CheckpointMeta] = None    # its metadata
    trainer_state: Optional[dict] = None     # its trainer state (None: load the weights only)
    # where the start weights, which are also the frozen reference, came from:
    # {"kind": "hf", "path": HF dir} or {"kind": "megatron", "path": checkpoint}
    reference: Optional[dict] = None
    train_scan: Optional[RowScan] = None     # the training data's scan (--train-epochs)
    notes: list = field(default_factory=list)  # lines for the console (the step count chosen)

    @property
    def resumed(self) -> bool:
        """A training run continued (its trainer state restored), not a fresh start."""
        return self.trainer_state is not None

    @property
    def reference_is_loaded_checkpoint(self) -> bool:
        """The start weights are the checkpoint this run loads as its policy (a fresh start from
        a converted or warm-started checkpoint): the reference is a copy of the loaded policy."""
        return (self.checkpoint is not None and not self.resumed
                and self.reference == {"kind": "megatron", "path": str(self.checkpoint)})


def resolve_start(cfg: TrainConfig, *, rank: Optional[int] = None) -> tuple[TrainConfig, Start]:
    """See the module docstring. ``rank``: this process's global rank (default $RANK): rank 0
    writes the built-in model and data when they are needed and missing, the others wait."""
    ck, data = cfg.checkpoint, cfg.data
    checkpoint = meta = trainer_state = None
    hf_dir = ck.hf_dir
    if ck.load is not None:
        checkpoint = find_checkpoint(ck.load)
        meta = read_meta(checkpoint)
        if hf_dir is None and meta.source_hf_dir is not None \
                and os.path.isdir(meta.source_hf_dir):
            hf_dir = meta.source_hf_dir
        if not ck.no_load_optim:
            trainer_state = read_trainer_state(checkpoint)
    paths = dict(data_path=data.data_path, val_data_path=data.val_data_path,
                 sft_data_path=data.sft_data_path)
    if data.data_path is None or (hf_dir is None and ck.load is None):
        rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        builtin_hf, data_dir = builtin.prepare_builtin(rank=rank)
        if hf_dir is None and ck.load is None:
            hf_dir = builtin_hf
        if data.data_path is None:
            paths["data_path"] = os.path.join(data_dir, "train.parquet")
            if data.val_data_path is None:
                paths["val_data_path"] = os.path.join(data_dir, "validation.parquet")
        if data.sft_data_path is None:
            paths["sft_data_path"] = os.path.join(data_dir, "sft.parquet")
    if hf_dir is not None:
        hf_config = load_hf_config(hf_dir)
    elif meta is not None:
        hf_config = load_hf_config(meta.hf_config)
    else:  # unreachable: without --load the built-in model is used
        raise ValueError("--hf-dir: needed (or --load with a checkpoint that records the model)")
    if checkpoint is None:
        reference = {"kind": "hf", "path": hf_dir}
    elif trainer_state is not None and trainer_state.get("start"):
        reference = trainer_state["start"]
    else:
        reference = {"kind": "megatron", "path": str(checkpoint)}
    resolved = replace(cfg, checkpoint=dict(hf_dir=hf_dir), data=paths)
    steps, scan, notes = _train_iters(resolved)
    resolved = replace(resolved, training=dict(train_iters=steps))
    return resolved, Start(hf_dir=hf_dir, hf_config=hf_config, checkpoint=checkpoint, meta=meta,
                           trainer_state=trainer_state, reference=reference, train_scan=scan,
                           notes=notes)


def _train_iters(cfg: TrainConfig) -> tuple[int, Optional[RowScan], list[str]]:
    """The run's rollout steps: --train-iters; else --train-epochs x the batches of one epoch
    (the training data scanned for its usable rows with the model directory's processor, so
    prompts over --max-prompt-length are filtered as the dataset filters them; drop_last); else
    100."""
    t, batch = cfg.training, cfg.rollout.rollout_batch_size
    if t.train_epochs is None:
        return (t.train_iters if t.train_iters is not None else DEFAULT_TRAIN_ITERS), None, []
    hf_dir = cfg.checkpoint.hf_dir
    if hf_dir is None:
        raise ValueError("--train-epochs: needs --hf-dir (the processor measures the prompts)")
    scan = scan_rows(cfg.data.data_path, cfg.data, load_processor(hf_dir))
    per_epoch = len(scan.kept) // batch
    if per_epoch == 0:
        raise ValueError(f"--train-epochs: {cfg.data.data_path} has {len(scan.kept)} usable "
                         f"rows, fewer than one batch of --rollout-batch-size {batch}")
    steps = t.train_epochs * per_epoch
    note = (f"--train-epochs {t.train_epochs}: {t.train_epochs} x floor({len(scan.kept)} usable "
            f"rows / {batch} prompts) = {steps} steps")
    if t.train_iters is not None:
        return t.train_iters, scan, [f"{note}; --train-iters {t.train_iters} given: "
                                     f"{t.train_iters} steps"]
    return steps, scan, [note]

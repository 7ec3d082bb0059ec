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

The returned config is the input with the resolved paths filled in (a new object); ``Start``
holds what was read, and the builder (training/builder.py) builds from both without reading the
start point again: the checkpoint loader takes the metadata and trainer state from it, and a
reference model that starts from the loaded weights is a copy of the policy's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from megatron_cppo.checkpoint import CheckpointMeta, read_meta
from megatron_cppo.models.qwen2_5_vl.config import load_hf_config
from megatron_cppo.training import builtin
from megatron_cppo.training.checkpoint import find_checkpoint, read_trainer_state
from megatron_cppo.training.config import TrainConfig, replace

__all__ = ["Start", "resolve_start"]


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
    return resolved, Start(hf_dir=hf_dir, hf_config=hf_config, checkpoint=checkpoint, meta=meta,
                           trainer_state=trainer_state, reference=reference)

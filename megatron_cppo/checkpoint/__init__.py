"""The megatron_cppo checkpoint format, shared by the converter and the trainer.

A checkpoint is one directory, written atomically (a ``.{name}.partial-*`` sibling renamed in when
complete; with overwrite the old directory is moved aside first and deleted after the rename):

    megatron_cppo.json   metadata (``CheckpointMeta``): HF config, the layout it was written at
                         (tp, pp, pipeline split, vision parallel mode, stored dtype, padded
                         vocabulary), source HF directory and key layout, the names of extra
                         state subdirectories and the caller's free JSON (``extra``)
    checksums.json       CRC-32 of every stored chunk and file (integrity.py), verified before
                         every read
    model/               megatron-core distributed checkpoint (torch_dist) of
                         ``model_sharded_state_dict(chunks)``: reloadable at any TP x PP x VPP and
                         pipeline split with the same padded vocabulary
    <name>/              optional extra distributed checkpoints (``extra_sharded``), e.g. the
                         optimizer's sharded state dict

API (all collective over the ranks of the job unless said otherwise):

    save_megatron_checkpoint(chunks, out_dir, state, *, hf_config, source_hf_dir=None,
                             source_hf_layout=None, overwrite=False,
                             extra_sharded=None, extra_metadata=None, model_sharded=None)
        extra_sharded:  {"optimizer": optimizer.sharded_state_dict(model_sharded), ...}
                        each saved with megatron's dist_checkpointing into out_dir/<name>/
        extra_metadata: JSON dict (step, data position, RNG seeds, scheduler state...) -> meta.extra
    load_megatron_checkpoint(chunks, checkpoint_dir, state) -> CheckpointMeta
        loads the model weights only
    load_extra_state(checkpoint_dir, name, sharded_state_dict) -> dict
        megatron's loaded state dict for extra state ``name``
    model_sharded_state_dict(chunks) -> dict
        exactly what is stored under model/ (input to optimizer.sharded_state_dict)
    read_meta(checkpoint_dir) -> CheckpointMeta          (local; validates every field)
    integrity.verify(checkpoint_dir, subdirs, expected=...)  (local; checksums, names the tensor)
    atomic_output_dir / check_output_dir / output_lock   (local; for single-process writers)

Errors: bad or damaged input raises ``CheckpointError`` (a ValueError) naming the file and, where
known, the tensor or field; an output that must not be replaced raises ``OutputExistsError``, one
being written by another live run ``OutputBusyError``.

A trainer checkpoint therefore looks like:

    sd = model_sharded_state_dict(chunks)
    save_megatron_checkpoint(chunks, out, state, hf_config=cfg, model_sharded=sd,
                             extra_sharded={"optimizer": optimizer.sharded_state_dict(sd)},
                             extra_metadata={"step": step, "scheduler": sched.state_dict()})
    meta = load_megatron_checkpoint(chunks, out, state)
    optimizer.load_state_dict(load_extra_state(out, "optimizer",
                                               optimizer.sharded_state_dict(
                                                   model_sharded_state_dict(chunks))))

The converter (``megatron_cppo.convert``) writes the same format in one process. This package
imports nothing from ``megatron_cppo.convert`` (no import cycle). docs/checkpoints.md describes the
format and its guarantees.
"""

from megatron_cppo.checkpoint.atomic import (OutputBusyError, OutputExistsError,
                                             atomic_output_dir, check_output_dir,
                                             make_partial_dir, output_lock, recover_leftovers,
                                             swap_into_place)
from megatron_cppo.checkpoint.meta import (FORMAT_VERSION, HF_LAYOUTS, META_NAME, MODEL_SUBDIR,
                                           CheckpointError, CheckpointMeta, read_meta)
from megatron_cppo.checkpoint.store import (load_extra_state, load_megatron_checkpoint,
                                            model_sharded_state_dict, save_megatron_checkpoint)

__all__ = [
    "OutputBusyError", "output_lock", "recover_leftovers", "OutputExistsError",
    "atomic_output_dir", "check_output_dir", "make_partial_dir",
    "swap_into_place", "FORMAT_VERSION", "HF_LAYOUTS", "META_NAME", "MODEL_SUBDIR",
    "CheckpointError", "CheckpointMeta", "read_meta", "load_extra_state",
    "load_megatron_checkpoint", "model_sharded_state_dict", "save_megatron_checkpoint",
]

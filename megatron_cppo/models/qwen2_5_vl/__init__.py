"""Qwen2.5-VL on megatron-core (tensor and pipeline parallel), numerically equal to transformers'
``Qwen2_5_VLForConditionalGeneration``.

  config.py     HF config -> dimensions, Qwen25VLModelConfig (the model flags), layout
                validation, TransformerConfigs
  rope_index.py M-RoPE position ids (data side, HF semantics)
  vision.py     the ViT (window/full attention, 2-D rotary, patch merger)
  model.py      one model chunk: ViT + splice + GPTModel
  packing.py    packed (THD) micro-batches: pack samples, unpack per-token outputs
  vision_dp.py  the replicated ViT inside the TP group ("dp_in_tp")
  mapping.py    HF <-> megatron name table and reversible transforms (the converter's source)
  builder.py    build chunks for a layout, load / export HF weights
  forward_step.py  run_pipeline: the model's step under megatron's pipeline schedule (the
                trainer's passes, the converter's verify, the model tests)
"""

from megatron_cppo.models.qwen2_5_vl.builder import (
    HalfPrecisionModule,
    build_qwen2_5_vl,
    export_hf_state_dict,
    load_hf_weights,
    read_hf_state_dict,
    unwrap,
)
from megatron_cppo.models.qwen2_5_vl.config import (
    Qwen25VLDims,
    Qwen25VLModelConfig,
    load_hf_config,
    padded_vocab_size,
    validate_layout,
)
from megatron_cppo.models.qwen2_5_vl.model import Qwen25VLModel, stage_inputs
from megatron_cppo.models.qwen2_5_vl.packing import PackedBatch, pack_samples, unpack
from megatron_cppo.models.qwen2_5_vl.rope_index import (
    MRopeIndexConfig,
    mrope_position_ids,
    mrope_position_ids_batch,
)

__all__ = [
    "HalfPrecisionModule", "MRopeIndexConfig", "PackedBatch", "Qwen25VLDims", "Qwen25VLModel",
    "Qwen25VLModelConfig", "build_qwen2_5_vl", "export_hf_state_dict", "load_hf_config",
    "load_hf_weights", "mrope_position_ids", "mrope_position_ids_batch", "pack_samples",
    "padded_vocab_size", "read_hf_state_dict", "stage_inputs", "unpack", "unwrap",
    "validate_layout",
]

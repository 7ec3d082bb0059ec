"""Qwen2.5-VL configuration: the HF config read once into plain dimensions, our model settings,
layout validation, and the megatron ``TransformerConfig``s of the three towers.

Every constant of the model comes from the HF config (``Qwen2_5_VLConfig``: ``text_config``,
``vision_config``, token ids). Two numbers are HF code constants rather than config fields and are
named here: the RMSNorm epsilon of the vision blocks and of the patch merger (1e-6 in
``Qwen2_5_VLVisionBlock`` / ``Qwen2_5_VLPatchMerger``).

Three megatron configs are built per rank:
  * language model: a GPTModel with M-RoPE, qkv bias, RMSNorm, SwiGLU; TP x PP x VPP as laid out;
  * vision blocks: ``depth`` TransformerLayers, no pipeline split, TP = the LM TP size ("tp" mode)
    or 1 ("dp_in_tp" mode: replicated weights, images divided across the TP group);
  * patch-merger projector: a 2-layer GELU MLP (4 x vision hidden -> same -> LM hidden).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from megatron_cppo.options import bad, check_bool, check_choice, check_int, option
from megatron_cppo.parallel.state import ParallelConfig, check_model_divisibility

# HF code constants (not config fields): Qwen2_5_VLVisionBlock.norm1/norm2 and PatchMerger.ln_q.
VISION_RMSNORM_EPS = 1e-6

VISION_PARALLEL_MODES = ("auto", "tp", "dp_in_tp")
ATTENTION_CHOICES = ("auto", "torch", "local")


# ----------------------------------------------------------------------------------------------
# HF config -> dimensions


@dataclass(frozen=True, kw_only=True)
class TextDims:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]
    max_position_embeddings: int
    tie_word_embeddings: bool


@dataclass(frozen=True, kw_only=True)
class VisionDims:
    depth: int
    hidden_size: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    hidden_act: str
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    window_size: int
    fullatt_block_indexes: tuple[int, ...]
    out_hidden_size: int
    rope_theta: float
    tokens_per_second: float

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch row of ``pixel_values`` (3 * 2 * 14 * 14 = 1176)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:
        """Patches merged into one LM token (2 x 2 = 4)."""
        return self.spatial_merge_size ** 2

    @property
    def merger_hidden_size(self) -> int:
        return self.hidden_size * self.merge_unit


@dataclass(frozen=True, kw_only=True)
class Qwen25VLDims:
    """Everything this package needs from an HF ``Qwen2_5_VLConfig``."""

    text: TextDims
    vision: VisionDims
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int

    @classmethod
    def from_hf(cls, hf_config: Any) -> "Qwen25VLDims":
        tc, vc = hf_config.text_config, hf_config.vision_config
        rope = dict(getattr(tc, "rope_parameters", None) or getattr(tc, "rope_scaling", None) or {})
        theta = rope.get("rope_theta", getattr(tc, "rope_theta", None))
        if "mrope_section" not in rope:
            raise ValueError("text_config.rope_parameters has no mrope_section (transformers "
                             "silently uses [16, 24, 24] then): set it in the HF config")
        if theta is None:
            raise ValueError("text_config.rope_parameters has no rope_theta")
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        tied = bool(getattr(hf_config, "tie_word_embeddings", False)
                    or getattr(tc, "tie_word_embeddings", False))
        vrope = dict(getattr(vc, "rope_parameters", None) or {})
        text = TextDims(
            vocab_size=tc.vocab_size, hidden_size=tc.hidden_size,
            num_layers=tc.num_hidden_layers, num_attention_heads=tc.num_attention_heads,
            num_query_groups=tc.num_key_value_heads or tc.num_attention_heads,
            head_dim=head_dim, ffn_hidden_size=tc.intermediate_size,
            rms_norm_eps=float(tc.rms_norm_eps), rope_theta=float(theta),
            mrope_section=tuple(int(s) for s in rope["mrope_section"]),
            max_position_embeddings=int(tc.max_position_embeddings),
            tie_word_embeddings=tied)
        vision = VisionDims(
            depth=vc.depth, hidden_size=vc.hidden_size, num_heads=vc.num_heads,
            head_dim=vc.hidden_size // vc.num_heads, intermediate_size=vc.intermediate_size,
            hidden_act=vc.hidden_act, in_channels=vc.in_channels, patch_size=int(vc.patch_size),
            temporal_patch_size=int(vc.temporal_patch_size),
            spatial_merge_size=vc.spatial_merge_size, window_size=vc.window_size,
            fullatt_block_indexes=tuple(int(i) for i in vc.fullatt_block_indexes),
            out_hidden_size=vc.out_hidden_size, rope_theta=float(vrope.get("rope_theta", 10000.0)),
            tokens_per_second=float(getattr(vc, "tokens_per_second", 1)))
        dims = cls(text=text, vision=vision, image_token_id=hf_config.image_token_id,
                   video_token_id=hf_config.video_token_id,
                   vision_start_token_id=hf_config.vision_start_token_id)
        dims.validate()
        return dims

    def validate(self) -> None:
        t, v = self.text, self.vision
        if t.num_attention_heads % t.num_query_groups:
            raise ValueError(f"text_config.num_key_value_heads {t.num_query_groups} must divide "
                             f"num_attention_heads {t.num_attention_heads}")
        if 2 * sum(t.mrope_section) != t.head_dim:
            raise ValueError(f"text_config.rope_parameters.mrope_section {list(t.mrope_section)} "
                             f"must sum to head_dim / 2 = {t.head_dim // 2}")
        if v.hidden_size % v.num_heads or v.head_dim % 4:
            raise ValueError(f"vision_config.hidden_size {v.hidden_size} / num_heads {v.num_heads} "
                             f"must be an integer head dim divisible by 4 (2-D rotary)")
        bad = [i for i in v.fullatt_block_indexes if not 0 <= i < v.depth]
        if bad:
            raise ValueError(f"vision_config.fullatt_block_indexes {bad} are outside depth "
                             f"{v.depth}: those blocks would silently stay windowed")
        if v.window_size % (v.patch_size * v.spatial_merge_size):
            raise ValueError(f"vision_config.window_size {v.window_size} must be a multiple of "
                             f"patch_size * spatial_merge_size = "
                             f"{v.patch_size * v.spatial_merge_size}")
        if v.hidden_act not in ("silu", "gelu"):
            raise ValueError(f"vision_config.hidden_act {v.hidden_act!r} is not supported "
                             f"(silu or gelu)")
        if v.out_hidden_size != t.hidden_size:
            raise ValueError(f"vision_config.out_hidden_size {v.out_hidden_size} must equal "
                             f"text_config.hidden_size {t.hidden_size}")


def load_hf_config(source: Union[str, os.PathLike, Any]):
    """A ``Qwen2_5_VLConfig`` from a checkpoint directory, a config.json path, a dict, or as is."""
    from transformers import Qwen2_5_VLConfig

    if isinstance(source, Qwen2_5_VLConfig):
        return source
    if isinstance(source, dict):
        return Qwen2_5_VLConfig(**source)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isfile(path):
            path = os.path.dirname(path) or "."
        return Qwen2_5_VLConfig.from_pretrained(path, local_files_only=True)
    raise TypeError(f"expected a Qwen2_5_VLConfig, a dict or a path, got {type(source).__name__}")


# ----------------------------------------------------------------------------------------------
# our settings


@dataclass(kw_only=True)
class Qwen25VLModelConfig:
    """Settings of the megatron model that the HF config does not fix. The option fields are
    trainer flags (``--vision-parallel-mode``, ``--bf16``, ``--recompute-*``; the converter takes
    ``--vision-parallel-mode`` too); the others are set by code. The pipeline split is part of the
    layout: ``ParallelConfig.decoder_first/last_pipeline_num_layers``."""

    # "tp": the ViT is sharded over the TP group (TP must divide heads, MLP width, merger width);
    # "dp_in_tp": ViT weights replicated, images divided across the TP ranks, merged embeddings
    # all-gathered, ViT gradients reduced over TP. "auto": "tp" if TP < 4 and it divides, else
    # "dp_in_tp" (the ViT is ~5% of the FLOPs; sharding it 4+ ways mostly adds collectives).
    vision_parallel_mode: str = option(
        "auto", "ViT parallelism: tp (sharded over the TP group), dp_in_tp (weights replicated, "
                "images divided over the TP ranks) or auto (tp below TP 4 where it divides)")
    bf16: bool = option(False, "bf16 parameters and activations (fp32 otherwise)")
    # Activation recomputation of the language model (Megatron-LM's options): "selective" (core
    # attention recomputed in backward) or "full" (whole layers; then method "uniform" (groups of
    # recompute_num_layers layers) or "block" (the first recompute_num_layers layers of each
    # pipeline stage), defaults uniform / 1 = every layer, the least memory).
    recompute_granularity: Optional[str] = option(
        None, "activation recomputation of the language model: selective (core attention) or "
              "full (whole layers)")
    recompute_method: Optional[str] = option(
        None, "with --recompute-granularity full: uniform (every layer, in groups of "
              "--recompute-num-layers) or block (the first --recompute-num-layers layers of each "
              "pipeline stage); default uniform")
    recompute_num_layers: Optional[int] = option(
        None, "with --recompute-granularity full: layers per group (uniform) or per stage "
              "(block); default 1")
    # Micro-batches of different sequence lengths across PP stages (megatron exchanges shapes).
    variable_seq_lengths: bool = True
    # Random initialisation (benchmarks); off when HF weights are loaded afterwards.
    perform_initialization: bool = False
    use_cpu_initialization: bool = True
    # Core attention of the language model (megatron_cppo/nn/attention.py): "auto" (= "torch":
    # flash / varlen kernels on CUDA in bf16, SDPA elsewhere; packed sequences supported) or
    # "local" (megatron's DotProductAttention: padded rows only, materialises S x S scores).
    attention: str = "auto"

    def __post_init__(self):
        check_choice(self, "vision_parallel_mode", VISION_PARALLEL_MODES)
        check_bool(self, "bf16")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got "
                             f"{self.attention!r}")
        check_choice(self, "recompute_granularity", ("full", "selective"), optional=True)
        check_choice(self, "recompute_method", ("uniform", "block"), optional=True)
        check_int(self, "recompute_num_layers", 1, optional=True)
        if self.recompute_granularity != "full":
            for name in ("recompute_method", "recompute_num_layers"):
                if getattr(self, name) is not None:
                    raise bad(name, "applies to --recompute-granularity full only")
        else:  # Megatron-LM requires both; the defaults recompute every layer (least memory)
            if self.recompute_method is None:
                self.recompute_method = "uniform"
            if self.recompute_num_layers is None:
                self.recompute_num_layers = 1

    @property
    def dtype(self) -> str:
        """The short name of the parameter dtype (``megatron_cppo.dtypes``): "bf16" or "fp32"."""
        return "bf16" if self.bf16 else "fp32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32


@dataclass(frozen=True, kw_only=True)
class ResolvedLayout:
    """What ``validate_layout`` decided for one (model, parallel layout) pair."""

    tp_size: int
    pp_size: int
    vpp_size: Optional[int]
    vision_parallel_mode: str  # "tp" or "dp_in_tp"
    vision_tp_size: int  # TP size the ViT weights are sharded over (1 in dp_in_tp mode)
    padded_vocab_size: int
    # the pipeline split in force (None, None: even); chosen here when PP does not divide the
    # language model's layers and none was given (split_note then says which)
    decoder_first_pipeline_num_layers: Optional[int] = None
    decoder_last_pipeline_num_layers: Optional[int] = None
    split_note: Optional[str] = None

    @property
    def pipeline_split(self) -> dict:
        """The split as ``ParallelConfig`` keyword arguments."""
        return dict(decoder_first_pipeline_num_layers=self.decoder_first_pipeline_num_layers,
                    decoder_last_pipeline_num_layers=self.decoder_last_pipeline_num_layers)


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    """Rows megatron's vocab-parallel layers need: padded only where TP does not divide the vocab
    (real Qwen2.5-VL vocabularies, 151936 and 152064 = 2^7 * k, never need padding at TP <= 8)."""
    return -(-vocab_size // tp_size) * tp_size


def validate_layout(dims: Qwen25VLDims, settings: Qwen25VLModelConfig,
                    parallel: ParallelConfig) -> ResolvedLayout:
    """Raise ValueError naming the setting when this model cannot run at ``parallel``."""
    t, v = dims.text, dims.vision
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    vpp = parallel.virtual_pipeline_model_parallel_size
    check_model_divisibility(parallel, num_layers=t.num_layers,
                             num_attention_heads=t.num_attention_heads,
                             num_query_groups=t.num_query_groups,
                             ffn_hidden_size=t.ffn_hidden_size,
                             what="language model (text_config)")
    if parallel.sequence_parallel:
        raise ValueError("sequence_parallel is not supported by the Qwen2.5-VL model (image "
                         "features are spliced into the full sequence on the first stage)")
    first, last, note = _resolve_pipeline_split(t.num_layers, pp, vpp, parallel)
    if vpp is not None and settings.variable_seq_lengths:
        # measured on gloo (megatron-core 0.16.1, PP=2 x VPP=2): the interleaved schedule's shape
        # exchange mismatches ("Received data size doesn't match expected size") and aborts.
        raise ValueError("virtual_pipeline_model_parallel_size needs variable_seq_lengths=False: "
                         "pad the micro-batches to one sequence length")

    divisible = all(x % tp == 0 for x in (v.num_heads, v.intermediate_size, v.merger_hidden_size))
    mode = settings.vision_parallel_mode
    if mode == "auto":
        mode = "tp" if tp < 4 and divisible else "dp_in_tp"
    if mode == "tp":
        for value, name in ((v.num_heads, "num_heads"), (v.intermediate_size, "intermediate_size"),
                            (v.merger_hidden_size, "merger width (hidden_size * merge_size^2)")):
            if value % tp:
                raise ValueError(
                    f"vision_parallel_mode 'tp': tensor-model-parallel-size {tp} does not divide "
                    f"vision_config.{name} {value}; use vision_parallel_mode='dp_in_tp' "
                    f"(replicated ViT, images divided across the TP ranks)")
    return ResolvedLayout(tp_size=tp, pp_size=pp, vpp_size=vpp, vision_parallel_mode=mode,
                          vision_tp_size=tp if mode == "tp" else 1,
                          padded_vocab_size=padded_vocab_size(t.vocab_size, tp),
                          decoder_first_pipeline_num_layers=first,
                          decoder_last_pipeline_num_layers=last, split_note=note)


def stage_layer_counts(num_layers: int, pp: int, first: Optional[int],
                       last: Optional[int]) -> Optional[list[int]]:
    """Language-model layers per pipeline stage for a split (megatron's rule: the stages without a
    fixed count share the rest evenly), or None if the split is impossible."""
    fixed = [x for x in (first, last) if x is not None]
    rest_layers, rest_stages = num_layers - sum(fixed), pp - len(fixed)
    if rest_stages < 0 or (rest_stages == 0 and rest_layers != 0) \
            or (rest_stages > 0 and (rest_layers < rest_stages or rest_layers % rest_stages)):
        return None
    middle = [rest_layers // rest_stages] * rest_stages if rest_stages else []
    return ([first] if first is not None else []) + middle + ([last] if last is not None else [])


def choose_pipeline_split(num_layers: int, pp: int) -> tuple[Optional[int], Optional[int]]:
    """(first, last) for ``pp`` stages that megatron accepts: the smallest largest stage, then
    the most even one (sum of squares), then the fewest layers on the first stage (it also runs
    the vision tower), then the first count alone."""
    if num_layers % pp == 0:
        return None, None
    best = None
    for first in range(1, num_layers + 1):
        for last in (None,) + tuple(range(1, num_layers + 1)):
            counts = stage_layer_counts(num_layers, pp, first, last)
            if counts is None:
                continue
            key = (max(counts), sum(c * c for c in counts), first, last is not None)
            if best is None or key < best[0]:
                best = (key, first, last)
    if best is None:
        raise ValueError(f"no pipeline split of {num_layers} layers into {pp} stages exists")
    return best[1], best[2]


def _resolve_pipeline_split(num_layers: int, pp: int, vpp: Optional[int],
                            parallel: ParallelConfig
                            ) -> tuple[Optional[int], Optional[int], Optional[str]]:
    """(first, last, note): the given split validated, or one chosen when PP does not divide the
    layers and none was given (note says which)."""
    first = parallel.decoder_first_pipeline_num_layers
    last = parallel.decoder_last_pipeline_num_layers
    if first is None and last is None:
        stages = pp * (vpp or 1)
        if num_layers % stages == 0:
            return None, None, None
        if vpp is not None:
            raise ValueError(
                f"pipeline-model-parallel-size {pp} x virtual {vpp} does not divide num_layers "
                f"{num_layers} of the language model (an uneven split is not supported with "
                f"virtual pipeline parallelism)")
        first, last = choose_pipeline_split(num_layers, pp)
        counts = stage_layer_counts(num_layers, pp, first, last)
        note = (f"pipeline-model-parallel-size {pp} does not divide the language model's "
                f"{num_layers} layers: using layers per stage {counts} "
                f"(--decoder-first-pipeline-num-layers {first}"
                + (f", --decoder-last-pipeline-num-layers {last}" if last is not None else "")
                + "; set them to choose another split)")
        return first, last, note
    if stage_layer_counts(num_layers, pp, first, last) is None:
        fixed = [x for x in (first, last) if x is not None]
        rest_layers, rest_stages = num_layers - sum(fixed), pp - len(fixed)
        raise ValueError(
            f"--decoder-first-pipeline-num-layers {first} / --decoder-last-pipeline-num-layers "
            f"{last} leave {rest_layers} of {num_layers} language-model layers for {rest_stages} "
            f"other pipeline stages: they must split evenly, at least one layer per stage")
    return first, last, None


# ----------------------------------------------------------------------------------------------
# megatron TransformerConfigs


def _common(settings: Qwen25VLModelConfig, parallel: ParallelConfig) -> dict:
    dtype = settings.torch_dtype
    return dict(
        hidden_dropout=0.0, attention_dropout=0.0,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
        use_cpu_initialization=settings.use_cpu_initialization,
        perform_initialization=settings.perform_initialization,
        # Unfused paths: the fused kernels need CUDA and apex or transformer-engine.
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        batch_p2p_comm=parallel.batch_p2p_comm, overlap_p2p_comm=parallel.overlap_p2p_comm,
    )


def language_transformer_config(dims: Qwen25VLDims, settings: Qwen25VLModelConfig,
                                parallel: ParallelConfig,
                                layout: Optional[ResolvedLayout] = None):
    """``layout``: the resolved layout (its pipeline split, possibly chosen); validated here if
    not given."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    t = dims.text
    layout = layout or validate_layout(dims, settings, parallel)
    return TransformerConfig(
        num_layers=t.num_layers, hidden_size=t.hidden_size,
        num_attention_heads=t.num_attention_heads, num_query_groups=t.num_query_groups,
        kv_channels=t.head_dim, ffn_hidden_size=t.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=t.rms_norm_eps,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, add_qkv_bias=True,
        mrope_section=list(t.mrope_section),
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=layout.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=layout.decoder_last_pipeline_num_layers,
        sequence_parallel=False,
        # Only the pipeline p2p reads it; megatron refuses it with its default MoE dispatcher even
        # in a dense model, hence the (unused) alltoall dispatcher.
        variable_seq_lengths=(settings.variable_seq_lengths
                              and parallel.pipeline_model_parallel_size > 1),
        moe_token_dispatcher_type="alltoall",
        recompute_granularity=settings.recompute_granularity,
        recompute_method=settings.recompute_method,
        recompute_num_layers=settings.recompute_num_layers,
        **_common(settings, parallel),
    )


def vision_transformer_config(dims: Qwen25VLDims, settings: Qwen25VLModelConfig,
                              parallel: ParallelConfig, layout: ResolvedLayout):
    """The ViT blocks: never pipeline-split (they live on the first stage), TP = vision TP size."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    v = dims.vision
    act = torch.nn.functional.silu if v.hidden_act == "silu" else torch.nn.functional.gelu
    return TransformerConfig(
        num_layers=v.depth, hidden_size=v.hidden_size, num_attention_heads=v.num_heads,
        num_query_groups=v.num_heads, kv_channels=v.head_dim,
        ffn_hidden_size=v.intermediate_size,
        normalization="RMSNorm", layernorm_epsilon=VISION_RMSNORM_EPS,
        gated_linear_unit=True, activation_func=act,
        add_bias_linear=True, add_qkv_bias=True,
        tensor_model_parallel_size=layout.vision_tp_size, pipeline_model_parallel_size=1,
        sequence_parallel=False,
        **_common(settings, parallel),
    )


def projector_transformer_config(dims: Qwen25VLDims, settings: Qwen25VLModelConfig,
                                 parallel: ParallelConfig, layout: ResolvedLayout):
    """The patch merger's MLP: [4 * vision hidden] -> GELU -> [LM hidden], with biases."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    v = dims.vision
    return TransformerConfig(
        num_layers=1, hidden_size=v.out_hidden_size, num_attention_heads=v.num_heads,
        kv_channels=v.head_dim, ffn_hidden_size=v.merger_hidden_size,
        gated_linear_unit=False, activation_func=torch.nn.functional.gelu,
        add_bias_linear=True,
        tensor_model_parallel_size=layout.vision_tp_size, pipeline_model_parallel_size=1,
        sequence_parallel=False,
        **_common(settings, parallel),
    )


# ----------------------------------------------------------------------------------------------
# real model sizes without the hub (benchmarks, shape tests); values from the released config.json


def reference_hf_config(size: str):
    """A ``Qwen2_5_VLConfig`` with the dimensions of Qwen2.5-VL-3B or -7B (no weights, no hub)."""
    from transformers import Qwen2_5_VLConfig

    sizes = {
        "3B": dict(text=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                             num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2),
                   out_hidden_size=2048, tie=True),
        "7B": dict(text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                             num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4),
                   out_hidden_size=3584, tie=False),
    }
    if size not in sizes:
        raise ValueError(f"size must be one of {tuple(sizes)}, got {size!r}")
    s = sizes[size]
    text = dict(s["text"], rms_norm_eps=1e-6, max_position_embeddings=128000,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                 "mrope_section": [16, 24, 24]},
                tie_word_embeddings=s["tie"])
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                  in_channels=3, patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
                  window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                  out_hidden_size=s["out_hidden_size"], hidden_act="silu", tokens_per_second=2)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                            tie_word_embeddings=s["tie"])

"""The Qwen2.5-VL vision tower on megatron-core: patch embedding, window/full attention blocks with
2-D rotary, patch merger. Numerically the HF ``Qwen2_5_VisionTransformerPretrainedModel``.

One call, with HF's semantics (transformers 5.23 ``modeling_qwen2_5_vl.py``, ``vision_utils.py``):
  1. patch embedding: HF's Conv3d has kernel = stride = (temporal, patch, patch) over pre-flattened
     patch rows, i.e. a linear map [patch_dim -> hidden] (a Conv3d takes a pathological cuDNN path;
     Megatron-LM ``qwen3_vl_model.py`` swaps it for F.linear for the same reason);
  2. patches are reordered into window order, in units of one merge block (merge^2 patches);
     a window of ``window_size`` pixels holds (window_size / patch / merge)^2 merged tokens (fewer
     at the right and bottom edges);
  3. the 2-D rotary angles (h and w ids in merge-block order, ``head_dim / 4`` frequencies per axis,
     [h, w, h, w] over the head dim) get the same reordering;
  4. every block attends within segments: windows, or whole frames for ``fullatt_block_indexes``;
  5. the merger: RMSNorm (``decoder.final_layernorm``, HF ``merger.ln_q``), view merge^2 consecutive
     rows as one, GELU MLP to the LM width (``projection``), then undo the window order.

Attention within segments has no megatron-core CPU kernel (the local DotProductAttention refuses
packed sequences; THD rotary in megatron restarts positions per segment, wrong for the absolute
vision rotary). ``megatron_cppo.nn.attention.SegmentCoreAttention`` receives the segment boundaries
(cu_seqlens) in the attention-mask slot: variable-length flash attention on CUDA in bf16, SDPA on
segments padded to the longest elsewhere.

TP: in "tp" mode every TransformerLayer and the projector are sharded over the TP group (heads,
MLP width and merger width divide by TP); the patch embedding is replicated. In "dp_in_tp" mode the
whole tower is built over a one-rank group (see ``vision_dp.py``).

Shapes: P patches (rows of pixel_values), U = P / merge^2 merged tokens, C vision hidden, D head
dim, E LM hidden, N images, K segments, L longest segment; x_PC, rope_PD, cu_K1 [K + 1] int32,
grid_N3 (t, h, w) in patches.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_cppo.models.qwen2_5_vl.config import VisionDims


# ----------------------------------------------------------------------------------------------
# index helpers (pure, CPU or GPU)


def vision_rotary_ids(grid_N3: torch.Tensor, merge: int) -> torch.Tensor:
    """[P, 2] (h, w) patch coordinates in merge-block order (HF ``get_vision_position_ids``)."""
    out = []
    for t, h, w in grid_N3.tolist():
        h_ids, w_ids = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        h_ids = h_ids.reshape(shape).transpose(1, 2).flatten()
        w_ids = w_ids.reshape(shape).transpose(1, 2).flatten()
        out.append(torch.stack([h_ids, w_ids], dim=-1).repeat(t, 1))
    return torch.cat(out, dim=0)


def vision_rotary_angles(grid_N3: torch.Tensor, dims: VisionDims) -> torch.Tensor:
    """[P, D] fp32 rotary angles: [theta_h, theta_w, theta_h, theta_w] with D/4 frequencies each."""
    half = dims.head_dim // 2
    inv_freq = 1.0 / (dims.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float) / half))
    ids_P2 = vision_rotary_ids(grid_N3, dims.spatial_merge_size).float()
    freqs_P2F = ids_P2[..., None] * inv_freq
    hw_PF = torch.cat([freqs_P2F[:, 0], freqs_P2F[:, 1]], dim=-1)
    return torch.cat([hw_PF, hw_PF], dim=-1)


def window_index(grid_N3: torch.Tensor, dims: VisionDims) -> tuple[torch.Tensor, torch.Tensor]:
    """Window order of merged tokens [U] and window boundaries in patches [windows + 1] int32
    (HF ``get_vision_window_index``: row-major windows per frame, padding dropped)."""
    merge = dims.spatial_merge_size
    win = dims.window_size // merge // dims.patch_size  # merged tokens per window side
    order, cu, base = [], [0], 0
    for t, h, w in grid_N3.tolist():
        lh, lw = h // merge, w // merge
        idx = torch.arange(t * lh * lw).reshape(t, lh, lw)
        pad_h, pad_w = (-lh) % win, (-lw) % win
        nh, nw = (lh + pad_h) // win, (lw + pad_w) // win
        idx = F.pad(idx, (0, pad_w, 0, pad_h), value=-1)
        idx = idx.reshape(t, nh, win, nw, win).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, -1)
        sizes = (idx >= 0).sum(-1).flatten()
        flat = idx.flatten()
        order.append(flat[flat >= 0] + base)
        for s in sizes.tolist():
            if s:
                cu.append(cu[-1] + s * merge * merge)
        base += t * lh * lw
    return torch.cat(order), torch.tensor(cu, dtype=torch.int32)


def frame_cu_seqlens(grid_N3: torch.Tensor) -> torch.Tensor:
    """Full-attention segments: one per frame (h * w patches), [frames + 1] int32."""
    sizes = torch.repeat_interleave(grid_N3[:, 1] * grid_N3[:, 2], grid_N3[:, 0])
    return F.pad(sizes.cumsum(0), (1, 0)).to(torch.int32)


def vision_layer_spec():
    """megatron's local GPT layer spec with RMSNorm and bidirectional attention within segments
    (``megatron_cppo.nn.attention.SegmentCoreAttention``)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_cppo.nn.attention import SegmentCoreAttention, with_core_attention

    return with_core_attention(get_gpt_layer_local_spec(normalization="RMSNorm"),
                               SegmentCoreAttention, attn_mask_type=AttnMaskType.no_mask)


# ----------------------------------------------------------------------------------------------
# the tower


class VisionBlocks(torch.nn.Module):
    """``layers`` (megatron TransformerLayers) + ``final_layernorm`` (the merger's ln_q)."""

    def __init__(self, config, pg_collection):
        super().__init__()
        from megatron.core.transformer.spec_utils import build_module
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        spec = vision_layer_spec()
        self.layers = torch.nn.ModuleList([
            build_module(spec, config=config, layer_number=i + 1, pg_collection=pg_collection)
            for i in range(config.num_layers)])
        self.final_layernorm = WrappedTorchNorm(config=config, hidden_size=config.hidden_size,
                                                eps=config.layernorm_epsilon)


class Qwen25VisionModel(torch.nn.Module):
    """pixel rows [P, patch_dim] + grid [N, 3] -> merged embeddings [U, E] in image order."""

    def __init__(self, *, dims: VisionDims, vit_config, projector_config, pg_collection,
                 model_tp_group=None):
        super().__init__()
        # The LM's TP group. In dp_in_tp mode the tower's own TP group is a one-rank group and
        # its weights are replicas across this one (checkpoint replica ids must say so).
        self.model_tp_group = model_tp_group if model_tp_group is not None else pg_collection.tp
        self.replicated_over_tp = self.model_tp_group is not pg_collection.tp
        from megatron.core.models.vision.multimodal_projector import MultimodalProjector
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer.mlp import MLPSubmodules

        self.dims = dims
        self.config = vit_config
        self.full_attention = frozenset(dims.fullatt_block_indexes)
        device = (torch.device("cpu") if vit_config.use_cpu_initialization
                  else torch.device("cuda", torch.cuda.current_device()))
        self.patch_embed = torch.nn.Linear(dims.patch_dim, dims.hidden_size, bias=False,
                                           dtype=vit_config.params_dtype, device=device)
        self.decoder = VisionBlocks(vit_config, pg_collection)
        self.projection = MultimodalProjector(
            projector_config,
            MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            projector_type="mlp", input_size=dims.merger_hidden_size, tp_group=pg_collection.tp)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None) -> dict:
        """megatron dist-checkpoint entries of the tower: each block through its TransformerLayer
        (TP-aware, gate/up split like the LM's fc1), the rest replicated. Keys are per block
        (``decoder.layers.{i}.``; the ViT is never split over pipeline stages), so a checkpoint
        written at one TP size loads at another."""
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.transformer.utils import (ensure_metadata_has_dp_cp_group,
                                                     sharded_state_dict_default)

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        out = {}
        # Plain torch modules: replicated over the LM's TP group (passed explicitly: megatron
        # 0.16 otherwise gives every TP rank replica id 0 when metadata carries a DP group).
        for name, module in (("patch_embed.", self.patch_embed),
                             ("decoder.final_layernorm.", self.decoder.final_layernorm)):
            out.update(sharded_state_dict_default(module, prefix + name, sharded_offsets,
                                                  metadata, tp_group=self.model_tp_group))
        tower = dict(self.projection.sharded_state_dict(f"{prefix}projection.", sharded_offsets,
                                                        metadata))
        for i, layer in enumerate(self.decoder.layers):
            tower.update(layer.sharded_state_dict(f"{prefix}decoder.layers.{i}.",
                                                  sharded_offsets, metadata))
        if self.replicated_over_tp:  # whole tensors on every TP rank: only TP rank 0 is main
            tp_rank = torch.distributed.get_rank(self.model_tp_group)
            for value in nested_values(tower):
                rid = value.replica_id
                value.replica_id = (rid[0], tp_rank, *rid[2:]) if isinstance(rid, tuple) \
                    else (rid, tp_rank)
        out.update(tower)
        return out

    def forward(self, pixel_values_PD: torch.Tensor, grid_N3: torch.Tensor) -> torch.Tensor:
        d = self.dims
        unit = d.merge_unit
        grid_N3 = grid_N3.to("cpu", torch.long)
        num_P = int((grid_N3[:, 0] * grid_N3[:, 1] * grid_N3[:, 2]).sum())
        if pixel_values_PD.shape != (num_P, d.patch_dim):
            raise ValueError(f"pixel_values has shape {tuple(pixel_values_PD.shape)}, the grids "
                             f"need ({num_P}, {d.patch_dim})")
        device = pixel_values_PD.device
        order_U, cu_window = window_index(grid_N3, d)
        cu_frame = frame_cu_seqlens(grid_N3)
        order_U, cu_window, cu_frame = (t.to(device) for t in (order_U, cu_window, cu_frame))

        x_PC = self.patch_embed(pixel_values_PD.to(self.patch_embed.weight.dtype))
        x_PC = x_PC.view(-1, unit, d.hidden_size)[order_U].reshape(num_P, d.hidden_size)
        rope_PD = vision_rotary_angles(grid_N3, d).to(device)
        rope_PD = rope_PD.view(-1, unit, d.head_dim)[order_U].reshape(num_P, d.head_dim)
        rope_P11D = rope_PD[:, None, None, :]

        h_P1C = x_PC.unsqueeze(1)
        for i, layer in enumerate(self.decoder.layers):
            cu = cu_frame if i in self.full_attention else cu_window
            h_P1C, _ = layer(h_P1C, attention_mask=cu, rotary_pos_emb=rope_P11D)
        h_P1C = self.decoder.final_layernorm(h_P1C)
        merged_U1E = self.projection(h_P1C.reshape(-1, 1, unit * d.hidden_size))
        return merged_U1E[:, 0][torch.argsort(order_U)]

"""The Qwen2.5-VL model chunk of one (PP stage, virtual stage): ViT + splice + megatron GPTModel.

First stage (``pre_process``): embed the tokens, run the ViT on this micro-batch's images, write the
merged image embeddings into the ``<|image_pad|>`` positions (batch-major order, as HF
``masked_scatter``), feed the sequence to the GPTModel as ``decoder_input``. Later stages get
hidden states from the pipeline and never see pixel values. Every stage needs the M-RoPE ids
[3, B, S] (computed once on the data side, ``rope_index.mrope_position_ids_batch``).

The ViT always runs on the first stage, with a one-token dummy image when the micro-batch (or, in
dp_in_tp mode, this TP rank's share of it) has no image: every rank then joins the same
collectives and every ViT parameter gets a gradient (zero) in every step.

The last stage returns vocab-sharded logits [B, S, Vp/TP] in the parameter dtype (nothing is
gathered unless ``runtime_gather_output=True``, which returns [B, S, V] without padding columns).
With ``logit_index`` [B, T] it returns only the logits of those positions, [B, T, Vp/TP]: the
hidden states are gathered before the output layer, so an RL pass pays the vocabulary projection
for the scored (response) positions only, not for the prompt and its image tokens.
Padding columns of the vocabulary (where TP does not divide V) are set to -inf on the shard that
holds them, so they are never sampled or scored.

A micro-batch is either right-padded rows [B, S] or one packed row [1, T] of several samples
(``packing.py``) with ``cu_seqlens``: the boundaries reach the core attention
(``megatron_cppo/nn/attention.py``) through megatron's attention-mask argument on every stage, and
each token carries its own M-RoPE ids. Nothing else differs (the images of a packed row are the
samples' images in order, spliced as for padded rows).

Shapes: ids_BS [micro-batch, seq], pos_3BS, pixel_PD [patches, patch_dim], grid_N3 [images, 3],
emb_SBE [seq, batch, LM hidden], feats_UE [image tokens, LM hidden], logits_BSV.
"""

from __future__ import annotations

import re
from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_cppo.models.qwen2_5_vl.config import Qwen25VLDims, ResolvedLayout
from megatron_cppo.models.qwen2_5_vl.vision import Qwen25VisionModel
from megatron_cppo.models.qwen2_5_vl.vision_dp import gather_rows, mark_replicated, split_images

_LM_LAYER = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.")

VISION_INPUTS = ("pixel_values", "image_grid_thw")


class Qwen25VLModel(MegatronModule):
    """One model chunk. Attributes megatron's schedules and ``finalize_model_grads`` look for
    (``config``, ``model_type``, ``pre_process``, ``share_embeddings_and_output_weights``,
    ``shared_embedding_or_output_weight``, ``set_input_tensor``) are provided here."""

    def __init__(self, *, dims: Qwen25VLDims, layout: ResolvedLayout, lm_config,
                 vit_config=None, projector_config=None, pre_process: bool, post_process: bool,
                 pg_collection, vision_pg_collection=None, vp_stage: Optional[int] = None,
                 attention: str = "auto"):
        super().__init__(config=lm_config)
        from megatron.core.enums import ModelType
        from megatron.core.models.gpt import GPTModel

        from megatron_cppo.nn.attention import language_layer_spec

        self.dims = dims
        self.layout = layout
        self.pre_process = pre_process
        self.post_process = post_process
        self.vp_stage = vp_stage
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = dims.text.tie_word_embeddings
        self.supports_packed = attention != "local"
        self.language_model = GPTModel(
            config=lm_config,
            transformer_layer_spec=language_layer_spec(attention),
            vocab_size=layout.padded_vocab_size,
            max_sequence_length=dims.text.max_position_embeddings,
            pre_process=pre_process, post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=dims.text.tie_word_embeddings,
            position_embedding_type="mrope",
            rotary_base=dims.text.rope_theta,
            # image features are spliced into the full sequence before anything is scattered
            scatter_embedding_sequence_parallel=False,
            pg_collection=pg_collection, vp_stage=vp_stage)
        self.vision_model = None
        if pre_process:
            self.vision_model = Qwen25VisionModel(
                dims=dims.vision, vit_config=vit_config, projector_config=projector_config,
                pg_collection=vision_pg_collection, model_tp_group=pg_collection.tp)
            if layout.vision_parallel_mode == "dp_in_tp":
                mark_replicated(self.vision_model.parameters())
        # positions whose logits the output layer computes (set only for the duration of a call)
        self._logit_index_BT: Optional[torch.Tensor] = None
        if post_process:
            self.language_model.output_layer.register_forward_pre_hook(
                self._select_logit_positions, with_kwargs=True)

    # ---- megatron plumbing

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def global_param_name(self, local_name: str) -> str:
        """Local parameter name -> megatron name with the global LM layer index (mapping.py)."""
        m = _LM_LAYER.match(local_name)
        if m is None:
            return local_name
        layer = self.language_model.decoder.layers[int(m.group(1))]
        return f"language_model.decoder.layers.{layer.layer_number - 1}." + local_name[m.end():]

    # ---- forward

    def forward(self, input_ids: Optional[torch.Tensor], position_ids: torch.Tensor, *,
                pixel_values: Optional[torch.Tensor] = None,
                image_grid_thw: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None,
                logit_index: Optional[torch.Tensor] = None,
                runtime_gather_output: bool = False) -> torch.Tensor:
        """input_ids [B, S] (first stage), position_ids [3, B, S] M-RoPE ids (every stage),
        pixel_values [P, patch_dim] and image_grid_thw [N, 3] (first stage, images of the whole
        micro-batch in sample order). Attention is causal over right-padded rows (padding needs
        no mask: no valid token attends to a later position).

        Packed micro-batch (``packing.pack_samples``): B = 1, S = T tokens of several samples
        back to back, ``cu_seqlens`` int32 [K + 1] their boundaries (every stage), position_ids
        each token's own M-RoPE ids; attention stays within each sample.

        ``logit_index`` int64 [B, T] (read on the last stage): the positions of each row whose
        logits are wanted (e.g. ``len(prompt) - 1 + t`` for response token t); padding entries
        may repeat any valid position.

        Returns logits [B, S, Vp/TP] (or [B, T, Vp/TP] with ``logit_index``) on the last stage,
        hidden states [S, B, E] elsewhere."""
        if cu_seqlens is not None:
            self._check_packed(cu_seqlens, position_ids)
        decoder_input = None
        if self.pre_process:
            if input_ids is None:
                raise ValueError("the first pipeline stage needs input_ids")
            decoder_input = self._embed(input_ids, pixel_values, image_grid_thw)
        elif pixel_values is not None or image_grid_thw is not None:
            raise ValueError("only the first pipeline stage takes pixel_values / image_grid_thw "
                             "(drop them with stage_inputs())")
        if position_ids is None or position_ids.dim() != 3 or position_ids.shape[0] != 3:
            raise ValueError("position_ids must be the [3, B, S] M-RoPE ids")
        if logit_index is not None and self.post_process:
            if logit_index.dim() != 2 or logit_index.shape[0] != position_ids.shape[1] \
                    or logit_index.dtype != torch.long:
                raise ValueError(f"logit_index must be int64 [B={position_ids.shape[1]}, T], got "
                                 f"{tuple(logit_index.shape)} {logit_index.dtype}")
            self._logit_index_BT = logit_index
        try:
            out = self.language_model(None, position_ids, cu_seqlens,
                                      decoder_input=decoder_input,
                                      runtime_gather_output=runtime_gather_output)
        finally:
            self._logit_index_BT = None
        if not self.post_process:
            return out
        return self._mask_vocab_padding(out, gathered=runtime_gather_output)

    def _select_logit_positions(self, module, args, kwargs):
        """Forward pre-hook of the output layer: hidden [S, B, E] -> [T, B, E] at the requested
        positions (no sequence parallelism here, so every TP rank holds the full sequence)."""
        index_BT = self._logit_index_BT
        if index_BT is None:
            return None
        hidden_SBE = args[0]
        index_TBE = index_BT.t().unsqueeze(-1).expand(-1, -1, hidden_SBE.shape[-1])
        return (hidden_SBE.gather(0, index_TBE),) + tuple(args[1:]), kwargs

    def _check_packed(self, cu_K1: torch.Tensor, position_ids: torch.Tensor) -> None:
        if not self.supports_packed:
            raise ValueError("packed sequences (cu_seqlens) need attention 'auto' or 'torch', "
                             "not 'local'")
        if cu_K1.dim() != 1 or cu_K1.dtype not in (torch.int32, torch.int64) \
                or cu_K1.numel() < 2:
            raise ValueError("cu_seqlens must be a 1-D int32 tensor [samples + 1]")
        if position_ids is None or position_ids.dim() != 3 or position_ids.shape[1] != 1:
            raise ValueError("a packed micro-batch has batch dimension 1: position_ids [3, 1, T]")
        if int(cu_K1[0]) != 0 or int(cu_K1[-1]) != position_ids.shape[2]:
            raise ValueError(f"cu_seqlens must run from 0 to the packed length "
                             f"{position_ids.shape[2]}, got {cu_K1.tolist()}")

    def _mask_vocab_padding(self, logits_BSV: torch.Tensor, gathered: bool) -> torch.Tensor:
        vocab, padded = self.dims.text.vocab_size, self.layout.padded_vocab_size
        if padded == vocab:
            return logits_BSV
        if gathered:
            return logits_BSV[..., :vocab]
        local = logits_BSV.shape[-1]
        start = self.tp_group.rank() * local
        first_pad = vocab - start  # local column where padding starts
        if first_pad >= local:
            return logits_BSV
        pad_V = torch.arange(local, device=logits_BSV.device) >= first_pad
        return logits_BSV.masked_fill(pad_V, float("-inf"))

    def _embed(self, ids_BS, pixel_PD, grid_N3) -> torch.Tensor:
        emb_SBE = self.language_model.embedding(input_ids=ids_BS, position_ids=None)
        image_BS = ids_BS == self.dims.image_token_id
        num_image_tokens = int(image_BS.sum())
        has_images = grid_N3 is not None and grid_N3.shape[0] > 0
        if not has_images:
            if num_image_tokens:
                raise ValueError(f"{num_image_tokens} <|image_pad|> tokens but no images")
            # keep every rank in the same collectives and every ViT weight in the graph
            return emb_SBE + 0.0 * self._dummy_image(emb_SBE).sum()
        if pixel_PD is None:
            raise ValueError("image_grid_thw given without pixel_values")
        feats_UE = self._encode_images(pixel_PD, grid_N3)
        if feats_UE.shape[0] != num_image_tokens:
            raise ValueError(f"{num_image_tokens} <|image_pad|> tokens but the images give "
                             f"{feats_UE.shape[0]} merged tokens")
        emb_BSE = emb_SBE.transpose(0, 1)
        emb_BSE = emb_BSE.masked_scatter(image_BS.unsqueeze(-1), feats_UE.to(emb_BSE.dtype))
        return emb_BSE.transpose(0, 1).contiguous()

    def _dummy_image(self, like: torch.Tensor) -> torch.Tensor:
        v = self.dims.vision
        m = v.spatial_merge_size
        grid = torch.tensor([[1, m, m]])
        pixels = torch.zeros(m * m, v.patch_dim, dtype=like.dtype, device=like.device)
        return self.vision_model(pixels, grid)

    def _encode_images(self, pixel_PD, grid_N3) -> torch.Tensor:
        if self.layout.vision_parallel_mode == "tp" or self.tp_group.size() == 1:
            return self.vision_model(pixel_PD, grid_N3)
        # dp_in_tp: this TP rank encodes a contiguous share of the images (balanced by patches),
        # the merged rows are all-gathered over the TP group in image order.
        tp, rank = self.tp_group.size(), self.tp_group.rank()
        unit = self.dims.vision.merge_unit
        grid_N3 = grid_N3.to("cpu", torch.long)
        patches_N = (grid_N3[:, 0] * grid_N3[:, 1] * grid_N3[:, 2]).tolist()
        ranges = split_images(patches_N, tp)
        start, end = ranges[rank]
        if end > start:
            row0, row1 = sum(patches_N[:start]), sum(patches_N[:end])
            local_UE = self.vision_model(pixel_PD[row0:row1], grid_N3[start:end])
        else:
            local_UE = self._dummy_image(pixel_PD)[:0]
        counts = [sum(patches_N[s:e]) // unit for s, e in ranges]
        # grad_scale = TP: megatron AVG-reduces these replicated weights' grads over TP (see
        # vision_dp.py), which then equals the SUM of the per-rank partial gradients.
        return gather_rows(local_UE, counts, self.tp_group, grad_scale=tp)


def stage_inputs(batch: dict, *, pre_process: bool) -> dict:
    """The model inputs of one pipeline stage: later stages get neither pixels nor token ids."""
    keep = dict(batch)
    if not pre_process:
        for key in VISION_INPUTS + ("input_ids",):
            keep.pop(key, None)
    return keep

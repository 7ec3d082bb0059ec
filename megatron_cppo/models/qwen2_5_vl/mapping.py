"""HF Qwen2.5-VL <-> megatron names and tensor transforms: the one source of truth.

Used by the in-memory loader (``builder.load_hf_weights``), the exporter
(``builder.export_hf_state_dict``) and the checkpoint converter. Everything here is pure (no process
groups): a TP shard is computed from full HF tensors given (tp_rank, tp_size), and full HF tensors
from the list of TP shards.

Names
  * megatron names are those of ``Qwen25VLModel`` with GLOBAL layer indices
    (``language_model.decoder.layers.{i}.…``, ``vision_model.decoder.layers.{i}.…``); a pipeline
    stage's local index j maps to i = j + its layer offset (``Qwen25VLModel.global_param_name``);
  * HF names use the transformers >= 4.52 layout (``model.language_model.*``, ``model.visual.*``,
    ``lm_head.weight``), which is also the export layout. The older layout (``model.*`` for the LM,
    ``visual.*``) is accepted on input (``normalize_hf_state_dict``); note that transformers 5.23's
    ``save_pretrained`` still writes the older layout, and loads both (checked).

Transforms (each has a reverse; round trips are identities, tested at TP 1, 2, 4):
  * QKV: HF q/k/v -> per query group [q heads of the group; k; v] (``interleave_qkv``), rows split
    over TP (whole groups per rank);
  * gate/up: rank r holds [gate_r; up_r] (``fuse_gate_up``): gate and up are split separately;
  * vision QKV: HF fused [q_all; k_all; v_all] -> per head [q; k; v] (MHA: groups = heads);
  * patch embedding: Conv3d [C, in, t, p, p] <-> Linear [C, in * t * p * p] (a reshape);
  * vocabulary: rows padded with zeros to a multiple of TP where needed, split over TP; padding rows
    are dropped on export;
  * tied embeddings (3B): HF has no ``lm_head.weight``; megatron's last-stage copy
    (``language_model.output_layer.weight``, PP > 1) is loaded from ``embed_tokens`` and never
    exported.

Legend: V vocab, Vp padded vocab, E LM hidden, d head dim, nh/ng heads/query groups, F ffn width.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch

from megatron_cppo.models.qwen2_5_vl.config import Qwen25VLDims, padded_vocab_size

HF_TEXT = "model.language_model."
HF_VISION = "model.visual."
HF_LM_HEAD = "lm_head.weight"
MC_TEXT = "language_model."
MC_VISION = "vision_model."

# kinds of rules: how a tensor is laid out over TP and transformed
REPLICATED = "replicated"  # same on every TP rank
COLUMN = "column"  # rows split over TP
ROW = "row"  # columns split over TP
VOCAB = "vocab"  # rows padded to Vp, split over TP
QKV = "qkv"  # (q, k, v) interleaved per query group, rows split over TP
GATE_UP = "gate_up"  # (gate, up): rank r holds [gate_r; up_r]
VISION_QKV = "vision_qkv"  # HF fused [q; k; v] -> per head interleaved, rows split over TP
PATCH = "patch"  # Conv3d <-> Linear, replicated


@dataclass(frozen=True)
class Rule:
    """One megatron tensor and the HF tensor(s) it is made of ({i}: global layer index)."""

    mcore: str
    hf: tuple[str, ...]
    kind: str


# The name table. LM names under MC_TEXT / HF_TEXT (lm_head excepted), ViT under MC_VISION /
# HF_VISION.
TEXT_RULES = (
    Rule("embedding.word_embeddings.weight", ("embed_tokens.weight",), VOCAB),
    Rule("decoder.layers.{i}.input_layernorm.weight", ("layers.{i}.input_layernorm.weight",),
         REPLICATED),
    Rule("decoder.layers.{i}.self_attention.linear_qkv.weight",
         ("layers.{i}.self_attn.q_proj.weight", "layers.{i}.self_attn.k_proj.weight",
          "layers.{i}.self_attn.v_proj.weight"), QKV),
    Rule("decoder.layers.{i}.self_attention.linear_qkv.bias",
         ("layers.{i}.self_attn.q_proj.bias", "layers.{i}.self_attn.k_proj.bias",
          "layers.{i}.self_attn.v_proj.bias"), QKV),
    Rule("decoder.layers.{i}.self_attention.linear_proj.weight",
         ("layers.{i}.self_attn.o_proj.weight",), ROW),
    Rule("decoder.layers.{i}.pre_mlp_layernorm.weight",
         ("layers.{i}.post_attention_layernorm.weight",), REPLICATED),
    Rule("decoder.layers.{i}.mlp.linear_fc1.weight",
         ("layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.up_proj.weight"), GATE_UP),
    Rule("decoder.layers.{i}.mlp.linear_fc2.weight", ("layers.{i}.mlp.down_proj.weight",), ROW),
    Rule("decoder.final_layernorm.weight", ("norm.weight",), REPLICATED),
)
OUTPUT_RULE = Rule("output_layer.weight", (HF_LM_HEAD,), VOCAB)  # HF name is top level

VISION_RULES = (
    Rule("patch_embed.weight", ("patch_embed.proj.weight",), PATCH),
    Rule("decoder.layers.{i}.input_layernorm.weight", ("blocks.{i}.norm1.weight",), REPLICATED),
    Rule("decoder.layers.{i}.self_attention.linear_qkv.weight", ("blocks.{i}.attn.qkv.weight",),
         VISION_QKV),
    Rule("decoder.layers.{i}.self_attention.linear_qkv.bias", ("blocks.{i}.attn.qkv.bias",),
         VISION_QKV),
    Rule("decoder.layers.{i}.self_attention.linear_proj.weight", ("blocks.{i}.attn.proj.weight",),
         ROW),
    Rule("decoder.layers.{i}.self_attention.linear_proj.bias", ("blocks.{i}.attn.proj.bias",),
         REPLICATED),
    Rule("decoder.layers.{i}.pre_mlp_layernorm.weight", ("blocks.{i}.norm2.weight",), REPLICATED),
    Rule("decoder.layers.{i}.mlp.linear_fc1.weight",
         ("blocks.{i}.mlp.gate_proj.weight", "blocks.{i}.mlp.up_proj.weight"), GATE_UP),
    Rule("decoder.layers.{i}.mlp.linear_fc1.bias",
         ("blocks.{i}.mlp.gate_proj.bias", "blocks.{i}.mlp.up_proj.bias"), GATE_UP),
    Rule("decoder.layers.{i}.mlp.linear_fc2.weight", ("blocks.{i}.mlp.down_proj.weight",), ROW),
    Rule("decoder.layers.{i}.mlp.linear_fc2.bias", ("blocks.{i}.mlp.down_proj.bias",), REPLICATED),
    Rule("decoder.final_layernorm.weight", ("merger.ln_q.weight",), REPLICATED),
    Rule("projection.encoder.linear_fc1.weight", ("merger.mlp.0.weight",), COLUMN),
    Rule("projection.encoder.linear_fc1.bias", ("merger.mlp.0.bias",), COLUMN),
    Rule("projection.encoder.linear_fc2.weight", ("merger.mlp.2.weight",), ROW),
    Rule("projection.encoder.linear_fc2.bias", ("merger.mlp.2.bias",), REPLICATED),
)


def iter_rules(dims: Qwen25VLDims, *, include_tied_output: bool = False) -> Iterator[Rule]:
    """Every concrete (full-name, global-index) rule of the model.

    The output layer of a tied model is left out unless ``include_tied_output`` (megatron's
    last-stage copy at PP > 1); its HF source is then ``embed_tokens``."""

    def concrete(rules, n, mc, hf):
        for rule in rules:
            layers = range(n) if "{i}" in rule.mcore else [None]
            for i in layers:
                fmt = (lambda s: s.format(i=i)) if i is not None else (lambda s: s)
                yield Rule(mc + fmt(rule.mcore), tuple(hf + fmt(h) for h in rule.hf), rule.kind)

    yield from concrete(TEXT_RULES, dims.text.num_layers, MC_TEXT, HF_TEXT)
    if not dims.text.tie_word_embeddings:
        yield Rule(MC_TEXT + OUTPUT_RULE.mcore, OUTPUT_RULE.hf, VOCAB)
    elif include_tied_output:
        yield Rule(MC_TEXT + OUTPUT_RULE.mcore, (HF_TEXT + "embed_tokens.weight",), VOCAB)
    yield from concrete(VISION_RULES, dims.vision.depth, MC_VISION, HF_VISION)


def rule_table(dims: Qwen25VLDims) -> dict[str, Rule]:
    """megatron name -> rule (tied output layer included: it may exist on the last stage)."""
    return {r.mcore: r for r in iter_rules(dims, include_tied_output=True)}


def hf_names(dims: Qwen25VLDims) -> set[str]:
    """The HF tensors of a checkpoint of this model (>= 4.52 layout, tie-aware)."""
    return {h for r in iter_rules(dims) for h in r.hf}


# ----------------------------------------------------------------------------------------------
# HF key layouts

_OLD_TEXT = re.compile(r"^model\.(?!language_model\.|visual\.)")


def normalize_hf_key(key: str) -> str:
    """Old layout (< 4.52: ``model.*`` LM, ``visual.*``) -> new layout; new keys unchanged."""
    if key.startswith("visual."):
        return "model." + key
    if _OLD_TEXT.match(key):
        return HF_TEXT + key[len("model."):]
    return key


def normalize_hf_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = normalize_hf_key(key)
        if new in out:
            raise ValueError(f"HF state dict holds {new!r} in both key layouts")
        out[new] = value
    return out


def to_old_layout(key: str) -> str:
    """New -> old layout (tests and tools that must write pre-4.52 checkpoints)."""
    if key.startswith(HF_VISION):
        return key[len("model."):]
    if key.startswith(HF_TEXT):
        return "model." + key[len(HF_TEXT):]
    return key


# ----------------------------------------------------------------------------------------------
# pure transforms


def shard(t: torch.Tensor, dim: int, tp_rank: int, tp_size: int) -> torch.Tensor:
    if t.shape[dim] % tp_size:
        raise ValueError(f"dim {dim} of size {t.shape[dim]} does not split into {tp_size}")
    return t.chunk(tp_size, dim=dim)[tp_rank]


def unshard(shards: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    return shards[0] if len(shards) == 1 else torch.cat(list(shards), dim=dim)


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   num_query_groups: int) -> torch.Tensor:
    """HF q [nh*d, ...], k/v [ng*d, ...] -> megatron [ng * (nh/ng + 2) * d, ...]: per group its q
    heads, then its k head, then its v head (weights and biases alike)."""
    ng = num_query_groups
    rest = q.shape[1:]
    q_g = q.reshape(ng, -1, *rest)
    k_g = k.reshape(ng, -1, *rest)
    v_g = v.reshape(ng, -1, *rest)
    return torch.cat([q_g, k_g, v_g], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, num_heads: int, num_query_groups: int,
              head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reverse of ``interleave_qkv``."""
    ng, per = num_query_groups, num_heads // num_query_groups
    rest = qkv.shape[1:]
    g = qkv.reshape(ng, (per + 2) * head_dim, *rest)
    q, k, v = g.split([per * head_dim, head_dim, head_dim], dim=1)
    return (q.reshape(-1, *rest).contiguous(), k.reshape(-1, *rest).contiguous(),
            v.reshape(-1, *rest).contiguous())


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """Rank r's fc1 shard [gate_r; up_r] (a plain cat then TP split would be wrong at TP > 1)."""
    return torch.cat([shard(gate, 0, tp_rank, tp_size), shard(up, 0, tp_rank, tp_size)], dim=0)


def split_gate_up(shards: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reverse of ``fuse_gate_up`` over all TP ranks' shards."""
    halves = [s.chunk(2, dim=0) for s in shards]
    return unshard([h[0] for h in halves], 0), unshard([h[1] for h in halves], 0)


def vision_qkv_to_mcore(qkv_hf: torch.Tensor, num_heads: int) -> torch.Tensor:
    """HF fused [q_all; k_all; v_all] -> per head [q_h; k_h; v_h] (MHA: one group per head)."""
    q, k, v = qkv_hf.chunk(3, dim=0)
    return interleave_qkv(q, k, v, num_heads)


def vision_qkv_to_hf(qkv_mc: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    return torch.cat(split_qkv(qkv_mc, num_heads, num_heads, head_dim), dim=0)


def conv3d_to_linear(w: torch.Tensor) -> torch.Tensor:
    """[C, in, t, p, p] -> [C, in*t*p*p] (pixel rows are flattened in (in, t, p, p) order)."""
    return w.reshape(w.shape[0], -1).contiguous()


def linear_to_conv3d(w: torch.Tensor, in_channels: int, temporal_patch_size: int,
                     patch_size: int) -> torch.Tensor:
    return w.reshape(w.shape[0], in_channels, temporal_patch_size, patch_size, patch_size)


def pad_vocab(w: torch.Tensor, padded_rows: int) -> torch.Tensor:
    """Zero rows up to ``padded_rows`` (never looked up: ids < V; their logits are masked)."""
    if padded_rows == w.shape[0]:
        return w
    return torch.cat([w, w.new_zeros((padded_rows - w.shape[0],) + tuple(w.shape[1:]))], dim=0)


def unpad_vocab(w: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return w[:vocab_size]


# ----------------------------------------------------------------------------------------------
# per tensor, both ways


def _tower(name: str) -> str:
    return "vision" if name.startswith(MC_VISION) else "text"


def mcore_from_hf(rule: Rule, hf: Sequence[torch.Tensor], dims: Qwen25VLDims, *,
                  tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's megatron tensor for ``rule`` from its full HF tensors (``tp_size`` is the TP
    size of the rule's tower: the ViT's is 1 in dp_in_tp mode)."""
    t, v = dims.text, dims.vision
    if rule.kind == REPLICATED:
        return hf[0]
    if rule.kind == COLUMN:
        return shard(hf[0], 0, tp_rank, tp_size)
    if rule.kind == ROW:
        return shard(hf[0], 1, tp_rank, tp_size)
    if rule.kind == VOCAB:
        return shard(pad_vocab(hf[0], padded_vocab_size(t.vocab_size, tp_size)), 0, tp_rank,
                     tp_size)
    if rule.kind == QKV:
        return shard(interleave_qkv(*hf, t.num_query_groups), 0, tp_rank, tp_size)
    if rule.kind == GATE_UP:
        return fuse_gate_up(hf[0], hf[1], tp_rank, tp_size)
    if rule.kind == VISION_QKV:
        return shard(vision_qkv_to_mcore(hf[0], v.num_heads), 0, tp_rank, tp_size)
    if rule.kind == PATCH:
        return conv3d_to_linear(hf[0])
    raise AssertionError(rule.kind)


def hf_from_mcore(rule: Rule, shards: Sequence[torch.Tensor],
                  dims: Qwen25VLDims) -> list[torch.Tensor]:
    """The full HF tensors of ``rule`` from all TP ranks' megatron shards (rank order)."""
    t, v = dims.text, dims.vision
    if rule.kind == REPLICATED:
        return [shards[0]]
    if rule.kind == COLUMN:
        return [unshard(shards, 0)]
    if rule.kind == ROW:
        return [unshard(shards, 1)]
    if rule.kind == VOCAB:
        return [unpad_vocab(unshard(shards, 0), t.vocab_size)]
    if rule.kind == QKV:
        return list(split_qkv(unshard(shards, 0), t.num_attention_heads, t.num_query_groups,
                              t.head_dim))
    if rule.kind == GATE_UP:
        return list(split_gate_up(shards))
    if rule.kind == VISION_QKV:
        return [vision_qkv_to_hf(unshard(shards, 0), v.num_heads, v.head_dim)]
    if rule.kind == PATCH:
        return [linear_to_conv3d(shards[0], v.in_channels, v.temporal_patch_size, v.patch_size)]
    raise AssertionError(rule.kind)


def hf_to_mcore(hf_sd: Mapping[str, torch.Tensor], dims: Qwen25VLDims, *, tp_rank: int,
                tp_size: int, vision_tp_size: int, names=None) -> dict[str, torch.Tensor]:
    """megatron tensors (global names) of one TP rank from a full HF state dict (either layout).

    ``names``: only these megatron names (default: all, tied output layer excluded).
    ``vision_tp_size``: ``tp_size`` in "tp" mode, 1 in "dp_in_tp" mode (rank 0's shard = all)."""
    hf_sd = normalize_hf_state_dict(hf_sd)
    table = rule_table(dims)
    if names is None:
        names = [r.mcore for r in iter_rules(dims)]
    out = {}
    for name in names:
        rule = table.get(name)
        if rule is None:
            raise KeyError(f"no HF mapping for megatron tensor {name!r}")
        missing = [h for h in rule.hf if h not in hf_sd]
        if missing:
            raise KeyError(f"HF state dict lacks {missing} (needed for {name!r})")
        vis = _tower(name) == "vision"
        out[name] = mcore_from_hf(rule, [hf_sd[h] for h in rule.hf], dims,
                                  tp_rank=0 if vis and vision_tp_size == 1 else tp_rank,
                                  tp_size=vision_tp_size if vis else tp_size)
    return out


def mcore_to_hf(shards_per_rank: Sequence[Mapping[str, torch.Tensor]], dims: Qwen25VLDims, *,
                vision_tp_size: int | None = None) -> dict[str, torch.Tensor]:
    """Full HF state dict (>= 4.52 layout) from every TP rank's megatron tensors (global names,
    rank order). ``vision_tp_size`` (default: the number of ranks given) is 1 when the ViT is
    replicated over TP (dp_in_tp): its tensors are then read from rank 0 only. The tied output
    layer is skipped (HF has no lm_head then)."""
    table = rule_table(dims)
    if vision_tp_size is None:
        vision_tp_size = len(shards_per_rank)
    out = {}
    for name in shards_per_rank[0]:
        rule = table.get(name)
        if rule is None:
            raise KeyError(f"no HF mapping for megatron tensor {name!r}")
        if name == MC_TEXT + OUTPUT_RULE.mcore and dims.text.tie_word_embeddings:
            continue
        ranks = shards_per_rank[:vision_tp_size] if _tower(name) == "vision" else shards_per_rank
        tensors = [sd[name] for sd in ranks]
        for hf_name, tensor in zip(rule.hf, hf_from_mcore(rule, tensors, dims)):
            out[hf_name] = tensor
    return out

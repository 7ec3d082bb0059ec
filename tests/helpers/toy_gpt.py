"""A tiny Qwen2-like GPTModel on megatron-core: the layout-parity workload.

Used by the layout-parity tests (same loss, gradients and optimizer step at any (tp, pp, dp)); it
serves tests only, so it lives under tests/.

Weights come from one deterministic full (TP=1, PP=1) state dict that every rank slices for itself,
so runs at different layouts start from identical parameters:
  * tensor-parallel params are cut along ``param.partition_dim`` (megatron's own attribute); the
    gated ``linear_fc1`` holds [gate_i; up_i] on rank i, so gate and up are cut separately;
  * pipeline stage p holds global layers [p * L/pp, (p+1) * L/pp).

Shapes: tokens_BS / labels_BS [micro_batch, seq]; logits_SBV / logits_BSV with V = vocab/tp.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import torch

from megatron_cppo.parallel import ParallelState, check_model_divisibility


@dataclass(kw_only=True)
class ToyGPTConfig:
    num_layers: int = 4
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 128
    vocab_size: int = 1024
    seq_length: int = 32
    micro_batch_size: int = 2
    tie_word_embeddings: bool = True
    seed: int = 1234

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                     "ffn_hidden_size", "vocab_size", "seq_length", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"num_query_groups {self.num_query_groups} must divide "
                             f"num_attention_heads {self.num_attention_heads}")


def transformer_config(cfg: ToyGPTConfig, ps: ParallelState, dtype=torch.float32):
    from megatron.core.transformer.transformer_config import TransformerConfig

    check_model_divisibility(ps.config, num_layers=cfg.num_layers,
                             num_attention_heads=cfg.num_attention_heads,
                             num_query_groups=cfg.num_query_groups,
                             ffn_hidden_size=cfg.ffn_hidden_size, what="toy GPT")
    if cfg.num_layers % ps.pp_size:
        raise ValueError(f"pipeline-model-parallel-size {ps.pp_size} does not divide num_layers "
                         f"{cfg.num_layers} of the toy GPT")
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size,
        kv_channels=cfg.hidden_size // cfg.num_attention_heads,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=ps.tp_size,
        pipeline_model_parallel_size=ps.pp_size,
        sequence_parallel=ps.config.sequence_parallel,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=True,
        batch_p2p_comm=ps.config.batch_p2p_comm,
        # Backward of the output layer and embedding is reduced by finalize_model_grads.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
    )


def build_model(cfg: ToyGPTConfig, ps: ParallelState, dtype=torch.float32):
    """This rank's GPTModel chunk (pre/post process from the pipeline stage)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    tcfg = transformer_config(cfg, ps, dtype)
    model = GPTModel(
        config=tcfg,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.seq_length,
        pre_process=ps.is_first_stage,
        post_process=ps.is_last_stage,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=10000,
        pg_collection=ps.pg_collection,
    )
    return model


def full_state_dict(cfg: ToyGPTConfig) -> dict[str, torch.Tensor]:
    """Deterministic TP=1, PP=1 weights in megatron names (the same on every rank)."""
    g = torch.Generator().manual_seed(cfg.seed)
    h, f, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    d = h // cfg.num_attention_heads
    qkv = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * d

    def rnd(*shape, scale=0.02):
        return torch.randn(*shape, generator=g) * scale

    sd = {"embedding.word_embeddings.weight": rnd(v, h)}
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + rnd(h, scale=0.1)
        sd[p + "self_attention.linear_qkv.weight"] = rnd(qkv, h)
        sd[p + "self_attention.linear_qkv.bias"] = rnd(qkv)
        sd[p + "self_attention.linear_proj.weight"] = rnd(h, h)
        sd[p + "pre_mlp_layernorm.weight"] = 1 + rnd(h, scale=0.1)
        sd[p + "mlp.linear_fc1.weight"] = rnd(2 * f, h)
        sd[p + "mlp.linear_fc2.weight"] = rnd(h, f)
    sd["decoder.final_layernorm.weight"] = 1 + rnd(h, scale=0.1)
    if not cfg.tie_word_embeddings:
        sd["output_layer.weight"] = rnd(v, h)
    return sd


_LAYER = re.compile(r"decoder\.layers\.(\d+)\.")


def global_name(local_name: str, cfg: ToyGPTConfig, ps: ParallelState) -> str:
    """Local parameter name -> name in ``full_state_dict`` (pipeline layer offset applied)."""
    name = local_name.removeprefix("module.")
    if name == "output_layer.weight" and cfg.tie_word_embeddings:
        return "embedding.word_embeddings.weight"  # the last stage's copy of the tied weight
    offset = ps.pp_rank * (cfg.num_layers // ps.pp_size)
    return _LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", name, count=1)


def tp_slice(full: torch.Tensor, param: torch.nn.Parameter, name: str,
             ps: ParallelState) -> torch.Tensor:
    """This TP rank's part of a full tensor, in the layout megatron keeps for ``param``."""
    if not getattr(param, "tensor_model_parallel", False) or ps.tp_size == 1:
        return full
    dim = param.partition_dim
    if name.endswith("mlp.linear_fc1.weight"):  # [gate; up]: each half is split separately
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(ps.tp_size, dim=0)[ps.tp_rank],
                          up.chunk(ps.tp_size, dim=0)[ps.tp_rank]], dim=0)
    return full.chunk(ps.tp_size, dim=dim)[ps.tp_rank]


def load_full_state_dict(model: torch.nn.Module, full: dict[str, torch.Tensor], cfg: ToyGPTConfig,
                         ps: ParallelState) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            gname = global_name(name, cfg, ps)
            param.copy_(tp_slice(full[gname], param, gname, ps))


def synthetic_microbatches(cfg: ToyGPTConfig, num_microbatches: int,
                           seed: int) -> list[dict[str, torch.Tensor]]:
    """A fixed, learnable global batch: ``num_microbatches`` of [micro_batch_size, seq_length]
    tokens, each sequence an arithmetic progression (random start, stride 1..4) modulo the vocab,
    so the loss falls as the model learns to continue it."""
    g = torch.Generator().manual_seed(seed)
    out = []
    steps = torch.arange(cfg.seq_length + 1)
    for _ in range(num_microbatches):
        start = torch.randint(0, cfg.vocab_size, (cfg.micro_batch_size, 1), generator=g)
        stride = torch.randint(1, 5, (cfg.micro_batch_size, 1), generator=g)
        tokens = (start + stride * steps) % cfg.vocab_size
        out.append({"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()})
    return out


def forward_backward(model_chunks: list, microbatches: list[dict], cfg: ToyGPTConfig,
                     ps: ParallelState, forward_only: bool = False) -> list[float]:
    """Run megatron's pipeline schedule over ``microbatches``; returns per-micro-batch losses on the
    last stage (empty elsewhere). The loss of a micro-batch is its mean token cross-entropy; the
    schedule divides it by the number of micro-batches."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    position_ids = torch.arange(cfg.seq_length).unsqueeze(0).expand(cfg.micro_batch_size, -1)

    def forward_step(data_iterator: Iterator, model):
        batch = next(data_iterator)
        tokens = batch["tokens"] if ps.is_first_stage else None
        losses_BS = model(tokens, position_ids, None, labels=batch["labels"])

        def loss_func(losses):
            loss = losses.float().mean()
            return loss, {"lm loss": loss.detach().clone()}

        return losses_BS, loss_func

    fb = get_forward_backward_func()
    out = fb(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=model_chunks,
        num_microbatches=len(microbatches),
        seq_length=cfg.seq_length,
        micro_batch_size=cfg.micro_batch_size,
        forward_only=forward_only,
    )
    return [float(o["lm loss"]) for o in out] if ps.is_last_stage else []

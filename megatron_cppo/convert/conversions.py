"""HF <-> Megatron checkpoint conversion, streaming one parameter at a time: the conversions users
call (``hf_to_megatron``, ``reshard``, ``megatron_to_hf``, ``check_checkpoint``) and their reports.

The checkpoint format itself (metadata, atomic directories, the collective save / load used by
training) lives in ``megatron_cppo.checkpoint``; docs/checkpoints.md describes it. In short:

    megatron_cppo.json   metadata: HF model config, layout (incl. pipeline split), source HF
                         directory and key layout, converter version
    model/               megatron-core distributed checkpoint (torch_dist) of the model's
                         ``sharded_state_dict()``: reshardable, loads at any TP x PP

How it streams: every conversion runs in one process on a TP=1, PP=1 model built on the ``meta``
device (``convert.meta_model``), whose tensors are written and read one chunk / one parameter at a
time (``convert.streaming``, which also has the peak memory); HF directories are read and validated
by ``convert.hf_source``.

Training saves and loads the same format from its live layout with
``megatron_cppo.checkpoint.save_megatron_checkpoint`` / ``load_megatron_checkpoint``
(megatron-core's own distributed save and load, collective).

Integrity (docs/checkpoints.md): every read and every write is checked (``convert.streaming``:
metadata, checksums, stored shapes and dtypes), and so is HF input (``convert.hf_source``);
``check_checkpoint`` does the reading checks alone.

Pipeline splits: the stored tensors use global layer indices, so a checkpoint does not depend on
the split; the split it was written for (given, or chosen when PP does not divide the layers) is
recorded in the metadata, and reshard moves between splits like between layouts.

Names and transforms all come from ``megatron_cppo.models.qwen2_5_vl.mapping`` (one source of truth).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import megatron_cppo
from megatron_cppo.checkpoint import (FORMAT_VERSION, HF_LAYOUTS, META_NAME, MODEL_SUBDIR,
                                      CheckpointMeta, atomic_output_dir, check_output_dir,
                                      integrity)
from megatron_cppo.checkpoint.safetensors_io import ShardedSafetensorsWriter
from megatron_cppo.convert.hf_source import (ConversionError, HFSource, _check_finite, _dims,
                                             expected_hf_shapes, read_hf_config)
from megatron_cppo.convert.meta_model import _meta_model, _resolve_layout, _single_process_parallel
from megatron_cppo.convert.streaming import _read_param, _save_model, open_checkpoint
from megatron_cppo.dtypes import FLOAT_DTYPES, short_name

# written into every HF export: marks the directory as ours (what --overwrite may replace)
EXPORT_MARKER = "megatron_cppo_export.json"
# Files of an HF model directory that are not weights and travel with an export.
_AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
              "merges.txt", "special_tokens_map.json", "added_tokens.json",
              "preprocessor_config.json", "video_preprocessor_config.json",
              "processor_config.json", "chat_template.json", "chat_template.jinja",
              "generation_config.json")


@dataclass
class ConversionReport:
    num_tensors: int
    bytes: int
    seconds: float
    notes: list = dataclasses.field(default_factory=list)  # e.g. the pipeline split chosen

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)

    def __str__(self) -> str:
        return (f"{self.num_tensors} tensors, {self.bytes / 1e6:.1f} MB in {self.seconds:.1f} s "
                f"({self.mb_per_s:.1f} MB/s)")


def _write_meta(tmp: Path, meta: CheckpointMeta, mat) -> None:
    checksums = getattr(mat, "checksums", None)
    if checksums is not None:
        integrity.write(tmp, checksums)
    dataclasses.replace(meta, checksums=integrity.ALGORITHM if checksums is not None
                        else None).write(tmp)


def hf_to_megatron(hf_dir, out_dir, *, tp: int = 1, pp: int = 1,
                   vision_parallel_mode: str = "auto", dtype: Optional[str] = None,
                   overwrite: bool = False, progress: bool = True,
                   decoder_first_pipeline_num_layers: Optional[int] = None,
                   decoder_last_pipeline_num_layers: Optional[int] = None,
                   allow_non_finite: bool = False, checksums: bool = True) -> ConversionReport:
    """Write a megatron_cppo checkpoint of an HF Qwen2.5-VL directory, loadable at (tp, pp).
    ``dtype`` (bf16, fp16, fp32) defaults to the HF config's dtype (bf16 if it names none). The
    pipeline split (first / last stage layer counts) is validated and recorded; when PP does not
    divide the layers and none is given one is chosen (the report's notes say which). Non-float
    tensors are refused; non-finite values too unless ``allow_non_finite``."""
    from megatron_cppo.models.qwen2_5_vl import mapping

    t0 = time.perf_counter()
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ConversionError(f"--dtype: must be one of {', '.join(FLOAT_DTYPES)}, got {dtype!r}")
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    check_output_dir(out_dir, overwrite, marker=META_NAME, inputs=[hf_dir])
    hf_config = read_hf_config(hf_dir)
    if dtype is None:
        stored = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        try:
            dtype = short_name(stored) if stored is not None else "bf16"
        except ValueError:
            dtype = "bf16"
    layout = _resolve_layout(hf_config, tp, pp, vision_parallel_mode,
                             decoder_first_pipeline_num_layers,
                             decoder_last_pipeline_num_layers)
    source = HFSource(hf_dir, hf_config)
    check_output_dir(out_dir, overwrite, marker=META_NAME, inputs=[hf_dir],
                     needed_bytes=_estimate(source.total_bytes(), dtype))
    dims = _dims(hf_config)
    table = mapping.rule_table(dims)

    def make(name):
        rule = table[name]
        hf = [source.get(h, allow_non_finite) for h in rule.hf]
        if rule.kind == mapping.VOCAB:  # padded for the target TP, whole (TP=1) here
            return mapping.pad_vocab(hf[0], layout.padded_vocab_size)
        return mapping.mcore_from_hf(rule, hf, dims, tp_rank=0, tp_size=1)

    with atomic_output_dir(out_dir, overwrite, marker=META_NAME, inputs=[hf_dir]) as tmp, \
            _single_process_parallel() as state:
        mm = _meta_model(hf_config, state, dtype, layout.padded_vocab_size)
        mat = _save_model(mm, make, tmp / MODEL_SUBDIR, progress, "hf -> megatron",
                          checksums=checksums)
        _write_meta(tmp, CheckpointMeta(
            format_version=FORMAT_VERSION, converter_version=megatron_cppo.__version__,
            hf_config=hf_config.to_dict(), source_hf_dir=str(hf_dir.resolve()), tp=tp, pp=pp,
            vision_parallel_mode=layout.vision_parallel_mode, dtype=dtype,
            padded_vocab_size=layout.padded_vocab_size, source_hf_layout=source.layout,
            **layout.pipeline_split), mat)
    return ConversionReport(mat.count, mat.bytes, time.perf_counter() - t0,
                            notes=[layout.split_note] if layout.split_note else [])


def _estimate(hf_bytes: int, dtype: str) -> int:
    """Bytes a checkpoint of ``hf_bytes`` of HF tensors needs at ``dtype`` (fp32 sources may be
    stored in bf16 and vice versa: the larger of the two, plus 5% for the format)."""
    return int(hf_bytes * (2 if dtype == "fp32" else 1) * 1.05)


def reshard(megatron_dir, out_dir, *, tp: int, pp: int,
            vision_parallel_mode: Optional[str] = None, overwrite: bool = False,
            progress: bool = True, decoder_first_pipeline_num_layers: Optional[int] = None,
            decoder_last_pipeline_num_layers: Optional[int] = None,
            allow_non_finite: bool = False, checksums: bool = True) -> ConversionReport:
    """Rewrite a checkpoint for another (tp, pp) and pipeline split: the layout is validated and
    the vocabulary padding adjusted; everything else is copied chunk by chunk. Without a split,
    the source's split is kept when ``pp`` is the source's, else one is chosen if PP does not
    divide the layers. The source's checksums are verified; new ones are written."""
    from megatron_cppo.models.qwen2_5_vl import mapping

    t0 = time.perf_counter()
    src_dir, out_dir = Path(megatron_dir), Path(out_dir)
    check_output_dir(out_dir, overwrite, marker=META_NAME, inputs=[src_dir])
    src = open_checkpoint(src_dir, checksums=checksums)
    meta, hf_config = src.meta, src.hf_config
    check_output_dir(out_dir, overwrite, marker=META_NAME, inputs=[src_dir],
                     needed_bytes=integrity.total_bytes(src_dir / MODEL_SUBDIR))
    first, last = decoder_first_pipeline_num_layers, decoder_last_pipeline_num_layers
    if first is None and last is None and pp == meta.pp:
        first, last = meta.decoder_first_pipeline_num_layers, \
            meta.decoder_last_pipeline_num_layers
    layout = _resolve_layout(hf_config, tp, pp, vision_parallel_mode or "auto", first, last)
    vocab = _dims(hf_config).text.vocab_size

    with atomic_output_dir(out_dir, overwrite, marker=META_NAME, inputs=[src_dir]) as tmp, \
            _single_process_parallel() as state:
        smm = _meta_model(hf_config, state, meta.dtype, meta.padded_vocab_size)
        src.reader.check_against(smm, meta, src_dir / META_NAME)
        dst = _meta_model(hf_config, state, meta.dtype, layout.padded_vocab_size)

        def make(name):
            t = _read_param(src.reader, smm, name)
            if not allow_non_finite:
                _check_finite(t, f"{src_dir / MODEL_SUBDIR}: tensor {name}")
            if name.endswith(("word_embeddings.weight", "output_layer.weight")):
                t = mapping.pad_vocab(mapping.unpad_vocab(t, vocab), layout.padded_vocab_size)
            return t

        mat = _save_model(dst, make, tmp / MODEL_SUBDIR, progress, "reshard",
                          checksums=checksums)
        _write_meta(tmp, dataclasses.replace(
            meta, tp=tp, pp=pp, vision_parallel_mode=layout.vision_parallel_mode,
            padded_vocab_size=layout.padded_vocab_size,
            converter_version=megatron_cppo.__version__, extra_state=[],
            **layout.pipeline_split), mat)
    return ConversionReport(mat.count, mat.bytes, time.perf_counter() - t0,
                            notes=[layout.split_note] if layout.split_note else [])


def hf_export_name(name: str, layout: str) -> str:
    """A >= 4.52 HF name in the key layout of an export (meta.HF_LAYOUTS)."""
    from megatron_cppo.models.qwen2_5_vl import mapping

    if layout == "transformers":
        return mapping.to_old_layout(name)
    if layout == "language_model":
        return name
    raise ValueError(f"HF key layout must be one of {list(HF_LAYOUTS)}, got {layout!r}")


def megatron_to_hf(megatron_dir, out_dir, *, overwrite: bool = False, progress: bool = True,
                   max_shard_bytes: int = 5 * 1024**3, hf_layout: Optional[str] = None,
                   allow_non_finite: bool = False, checksums: bool = True,
                   processor_dir: Optional[str] = None) -> ConversionReport:
    """Export a checkpoint as an HF directory (sharded safetensors + index, config, generation
    config, tokenizer/processor files from ``processor_dir`` (default: the recorded source
    directory), and
    ``megatron_cppo_export.json`` naming the source). ``hf_layout``: key layout of the tensor names
    (meta.HF_LAYOUTS); default the source's recorded layout, else "transformers" (what
    save_pretrained and the released checkpoints write). The source's checksums are verified."""
    from tqdm import tqdm
    from transformers import GenerationConfig

    from megatron_cppo.models.qwen2_5_vl import mapping

    t0 = time.perf_counter()
    src_dir, out_dir = Path(megatron_dir), Path(out_dir)
    check_output_dir(out_dir, overwrite, marker=EXPORT_MARKER, inputs=[src_dir])
    src = open_checkpoint(src_dir, checksums=checksums)
    meta, hf_config = src.meta, src.hf_config
    layout = hf_layout or meta.source_hf_layout or "transformers"
    if layout not in HF_LAYOUTS:
        raise ConversionError(f"--hf-layout must be one of {list(HF_LAYOUTS)}, got {layout!r}")
    check_output_dir(out_dir, overwrite, marker=EXPORT_MARKER, inputs=[src_dir],
                     needed_bytes=integrity.total_bytes(src_dir / MODEL_SUBDIR))
    dims = _dims(hf_config)
    dtype = FLOAT_DTYPES[meta.dtype]
    shapes = expected_hf_shapes(hf_config)
    rules = list(mapping.iter_rules(dims))
    specs = [(hf_export_name(h, layout), shapes[h], dtype) for r in rules for h in r.hf]
    written = 0

    with atomic_output_dir(out_dir, overwrite, marker=EXPORT_MARKER, inputs=[src_dir]) as tmp, \
            _single_process_parallel() as state:
        mm = _meta_model(hf_config, state, meta.dtype, meta.padded_vocab_size)
        src.reader.check_against(mm, meta, src_dir / META_NAME)
        writer = ShardedSafetensorsWriter(tmp, specs, max_shard_bytes=max_shard_bytes)
        for rule in tqdm(rules, desc="megatron -> hf", unit="tensor", disable=not progress):
            param = _read_param(src.reader, mm, rule.mcore)
            if not allow_non_finite:
                _check_finite(param, f"{src_dir / MODEL_SUBDIR}: tensor {rule.mcore}")
            for h, t in zip(rule.hf, mapping.hf_from_mcore(rule, [param], dims)):
                writer.write(hf_export_name(h, layout), t.to(dtype).contiguous())
                written += 1
        writer.close()
        hf_config.dtype = dtype  # transformers 5 (older versions read torch_dtype)
        if hasattr(hf_config, "torch_dtype") and not hasattr(type(hf_config), "torch_dtype"):
            hf_config.torch_dtype = dtype
        hf_config.save_pretrained(tmp)
        _copy_aux_files(processor_dir or meta.source_hf_dir, tmp)
        if not (tmp / "generation_config.json").exists():
            GenerationConfig.from_model_config(hf_config).save_pretrained(tmp)
        (tmp / EXPORT_MARKER).write_text(json.dumps(
            {"exported_from": str(src_dir.resolve()), "hf_layout": layout,
             "converter_version": megatron_cppo.__version__}, indent=2) + "\n")
    return ConversionReport(written, writer.bytes_written, time.perf_counter() - t0)


@dataclass
class CheckReport:
    directory: Path
    meta: CheckpointMeta
    checked: int  # chunks + files verified against checksums (0: the checkpoint has none)
    tensors: int  # tensors read back (without checksums: every one is deserialised)
    seconds: float


def check_checkpoint(megatron_dir, *, read_tensors: Optional[bool] = None) -> CheckReport:
    """Verify a checkpoint without building a model: metadata against the model it describes,
    stored shapes and dtypes, and the checksums of every stored chunk (all of ``model/`` and of
    extra state). A checkpoint without checksums has every tensor read back instead (which finds
    damaged files, not changed values). CheckpointError naming the first problem."""
    t0 = time.perf_counter()
    src = open_checkpoint(megatron_dir, checksums=True)
    meta = src.meta
    checked = src.checked
    if meta.extra_state:
        checked += integrity.verify(src.dir, list(meta.extra_state),
                                    expected=meta.checksums is not None, warn=False)
    tensors = 0
    with _single_process_parallel() as state:
        mm = _meta_model(src.hf_config, state, meta.dtype, meta.padded_vocab_size)
        src.reader.check_against(mm, meta, src.dir / META_NAME)
        if read_tensors or (read_tensors is None and meta.checksums is None):
            for name in mm.pieces:
                _read_param(src.reader, mm, name)
                tensors += 1
    return CheckReport(src.dir, meta, checked, tensors, time.perf_counter() - t0)


def _copy_aux_files(source: Optional[str], dest: Path) -> None:
    if not source or not Path(source).is_dir():
        print(f"note: source HF directory {source!r} is not available: tokenizer and processor "
              f"files were not copied")
        return
    for name in _AUX_FILES:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, dest / name)

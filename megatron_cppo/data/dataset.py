"""Prompt dataset: rows from parquet / JSONL -> processed prompts (``PromptItem``) with three image
views.

Row schema (verl's parquet schema, used by the ViRL39K and Geometry3K preprocessors; JSONL rows use
the same keys):

* the question, from the first of
  - ``prompt``: a list of chat messages ``[{"role": "user", "content": "<image>..."}]`` or a string,
    used verbatim (verl preprocessors already appended the answer-format instruction), or
  - ``question`` / ``problem``: a bare question; it gets ``"<image>\\n"`` in front if it has no
    ``<image>`` and ``" " + INSTRUCTION`` behind (the reference's prompt);
* ``images`` (or ``image``): a list of ``{"bytes": ..., "path": ...}``, raw bytes or paths (relative
  paths are relative to the data file's folder);
* the answer, from ``reward_model.ground_truth`` or ``answer``; it must be a string;
* optional ``data_source``, ``extra_info`` (a dict) and ``response`` (warm-start target).

Reading never loads a whole file: one parquet row group (or a chunk of ``jsonl_chunk_rows`` JSONL
lines) is in memory at a time. The order of an epoch is a two-level shuffle seeded by (seed, epoch):
the order of the row groups, then the rows inside each group.

Rows that cannot be used are skipped and counted by reason (``SKIP_REASONS``); ``skip_counts``
returns the counts for logging. The data position (epoch, rows consumed in the epoch, the seed and
the counts) is ``state_dict()``; ``load_state_dict`` resumes so that the following samples, including
their perturbation draws (a pure function of (seed, row index, epoch)), equal those of an
uninterrupted run.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import pyarrow.parquet as pq
import torch

from megatron_cppo.data.images import ImageError, decode_image, resize_for_qwen
from megatron_cppo.data.perturb import PerturbationConfig, Perturber, perturbation_seed
from megatron_cppo.data.schema import (INSTRUCTION, SKIP_REASONS, SkipRow, messages, row_answer,
                                       row_images, row_question)
from megatron_cppo.data.tokenizer import pixel_bounds
from megatron_cppo.data.types import PromptItem
from megatron_cppo.options import bad, check_int, option


@dataclass(kw_only=True)
class DataConfig:
    """Where the prompts come from and how rows become prompts. The option fields are trainer
    flags; the others are set by code. Which files a dataset reads, its seed and whether it
    shuffles and perturbs are the arguments of ``PromptDataset`` (the trainer opens three: the
    training, validation and warm-start sets); the image size bounds are the processor's."""

    data_path: Optional[str] = option(None, "training prompts (parquet or JSONL; default: the "
                                            "built-in generated dataset)")
    val_data_path: Optional[str] = option(None, "validation prompts")
    sft_data_path: Optional[str] = option(None, "warm-start rows (prompt + response; the "
                                                "built-in dataset's sft.parquet)")
    max_prompt_length: int = option(512, "prompt tokens after image-token expansion; longer "
                                         "prompts are skipped and counted")
    max_image_pixels: int = 1 << 26  # source images larger than this are skipped, never decoded
    max_images_per_prompt: int = 1  # reference (ViRL39K): keep items with at most one image
    jsonl_chunk_rows: int = 1024     # JSONL lines per read unit (parquet: the file's row groups)
    perturbation: PerturbationConfig = field(default_factory=PerturbationConfig)

    def __post_init__(self):
        for name in ("data_path", "val_data_path", "sft_data_path"):
            path = getattr(self, name)
            if path is not None and not os.path.exists(path):
                raise bad(name, f"{path} does not exist")
        check_int(self, "max_prompt_length", 1)
        for name in ("max_image_pixels", "max_images_per_prompt", "jsonl_chunk_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_files(files) -> list[str]:
    files = [str(files)] if isinstance(files, (str, Path)) else [str(f) for f in files]
    if not files:
        raise ValueError("a dataset needs at least one .parquet or .jsonl file")
    for f in files:
        if not f.endswith((".parquet", ".jsonl")):
            raise ValueError(f"{f}: neither .parquet nor .jsonl")
        if not Path(f).is_file():
            raise ValueError(f"{f}: does not exist")
    return files


def warm_start_tokens(item: PromptItem, tokenizer) -> tuple[torch.Tensor, torch.Tensor,
                                                           torch.Tensor]:
    """(ids [T + R], position ids [3, T + R], loss mask [T + R] bool) of a warm-start item:
    the prompt, then ``item.response`` and ``<|im_end|>``; the loss covers the response only."""
    if item.response is None:
        raise ValueError(f"row {item.index} has no response (warm-start rows come from "
                         f"sft.parquet of the built-in dataset)")
    resp = tokenizer.encode(item.response, add_special_tokens=False)
    resp.append(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    ids_T = torch.cat([item.prompt_ids, torch.tensor(resp, dtype=item.prompt_ids.dtype)])
    mask_T = torch.zeros(ids_T.numel(), dtype=torch.bool)
    mask_T[item.prompt_ids.numel():] = True
    return ids_T, item.position_ids_with_response(len(resp)), mask_T


# ----------------------------------------------------------------------------------------------
# Read units: a parquet row group or a chunk of JSONL lines; only one is held in memory.

@dataclass(frozen=True)
class _Unit:
    file: int
    kind: str           # "parquet" | "jsonl"
    key: int            # row group index, or byte offset of the chunk's first line
    num_rows: int
    first_index: int    # global index of its first row


def _index_units(files: list[str], jsonl_chunk_rows: int) -> list[_Unit]:
    units, total = [], 0
    for fi, path in enumerate(files):
        if path.endswith(".parquet"):
            try:
                meta = pq.ParquetFile(path).metadata
            except Exception as e:
                raise ValueError(f"{path}: not a readable parquet file ({e})") from e
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                if n:
                    units.append(_Unit(fi, "parquet", g, n, total))
                    total += n
        else:
            offsets, pos = [], 0
            with open(path, "rb") as f:
                for line in f:
                    if line.strip():
                        offsets.append(pos)
                    pos += len(line)
            for s in range(0, len(offsets), jsonl_chunk_rows):
                n = min(jsonl_chunk_rows, len(offsets) - s)
                units.append(_Unit(fi, "jsonl", offsets[s], n, total))
                total += n
    return units


def _read_unit(files: list[str], u: _Unit) -> list[Any]:
    """Rows of one unit; a JSONL line that is not a JSON object becomes a SkipRow marker."""
    if u.kind == "parquet":
        return pq.ParquetFile(files[u.file]).read_row_group(u.key).to_pylist()
    rows = []
    with open(files[u.file], "rb") as f:
        f.seek(u.key)
        while len(rows) < u.num_rows:
            line = f.readline()
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                row = SkipRow("bad_record", f"{files[u.file]}: invalid JSON ({e})")
            if not isinstance(row, (dict, SkipRow)):
                row = SkipRow("bad_record", f"{files[u.file]}: a line is not a JSON object")
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------

class RowReader:
    """Raw rows of the files in the epoch's shuffled order; one read unit in memory at a time.

    Position: ``epoch`` and ``cursor`` (rows consumed in the epoch); the order is a pure function
    of (seed, epoch), so (epoch, cursor) is the whole position."""

    def __init__(self, files: list[str], *, seed: int, shuffle: bool, jsonl_chunk_rows: int):
        self.files = [str(f) for f in files]
        self.seed, self.shuffle = seed, shuffle
        self.units = _index_units(self.files, jsonl_chunk_rows)
        self.num_rows = sum(u.num_rows for u in self.units)
        if self.num_rows == 0:
            raise ValueError(f"files {self.files} hold no rows")
        self.epoch = 0
        self.cursor = 0
        self._order: Optional[list[int]] = None   # unit order of the current epoch
        self._loaded: Optional[tuple[int, list[int], list[Any]]] = None  # (unit, row perm, rows)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed,
                "num_rows": self.num_rows, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_rows", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(f"data state has {key}={state[key]!r}, this dataset "
                                 f"{getattr(self, key)!r}: not the same data or seed")
        if not 0 <= state["cursor"] <= self.num_rows:
            raise ValueError(f"data state cursor {state['cursor']} outside [0, {self.num_rows}]")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order, self._loaded = None, None

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed & 0xFFFFFFFF, *key])

    def _unit_order(self) -> list[int]:
        if self._order is None:
            n = len(self.units)
            self._order = (self._rng(self.epoch).permutation(n).tolist() if self.shuffle
                           else list(range(n)))
        return self._order

    def next_row(self) -> tuple[int, Any, int]:
        """(global index, raw row, file number) of the next row; moves to the next epoch at the
        end of one. A raw row is a dict, or a SkipRow for a JSONL line that is not an object."""
        if self.cursor >= self.num_rows:
            self.epoch, self.cursor, self._order, self._loaded = self.epoch + 1, 0, None, None
        c = self.cursor
        for ui in self._unit_order():  # units are few (row groups), a linear walk is cheap
            if c < self.units[ui].num_rows:
                break
            c -= self.units[ui].num_rows
        u = self.units[ui]
        if self._loaded is None or self._loaded[0] != ui:
            self._loaded = None  # drop the previous unit before reading the next
            perm = (self._rng(self.epoch, ui + 1).permutation(u.num_rows).tolist()
                    if self.shuffle else list(range(u.num_rows)))
            self._loaded = (ui, perm, _read_unit(self.files, u))
        _, perm, rows = self._loaded
        r = perm[c]
        self.cursor += 1
        return u.first_index + r, rows[r], u.file


class PromptDataset:
    """Iterates processed ``PromptItem``s of ``files`` over epochs (an endless stream; ``epoch``
    tells where it is).

    Deterministic given (files, config, seed): data-parallel ranks that build it with the same
    seed see the same stream (e.g. each takes ``next_batch(global_prompts)[rank::world]``, or one
    rank builds the batch and sends it). ``seed`` drives the shuffle (``shuffle``) and the I+ / I-
    draws (``perturb``: build the perturbed views).

    ``processor`` is a ``Qwen2_5_VLProcessor`` (see ``build_qwen2_5_vl_processor``): images are
    resized to its min/max pixels here (multiples of 28 inside them), so its own resize is a
    no-op."""

    def __init__(self, files: Union[str, Sequence[str]], processor,
                 config: Optional[DataConfig] = None, *, seed: int = 0, shuffle: bool = True,
                 perturb: bool = True):
        self.cfg = cfg = config if config is not None else DataConfig()
        self.seed, self.shuffle, self.perturb = seed, shuffle, perturb
        self.processor = processor
        self.min_pixels, self.max_pixels = pixel_bounds(processor)
        self.reader = RowReader(_check_files(files), seed=seed, shuffle=shuffle,
                                jsonl_chunk_rows=cfg.jsonl_chunk_rows)
        self.num_rows = self.reader.num_rows
        self.base_dirs = [Path(f).resolve().parent for f in self.reader.files]
        # Imported here: the model package's __init__ loads megatron-core, which the rest of
        # megatron_cppo.data (generator, tokenizer) does not need.
        from megatron_cppo.models.qwen2_5_vl.rope_index import MRopeIndexConfig, mrope_position_ids
        self._mrope_position_ids = mrope_position_ids
        tok = processor.tokenizer
        self.rope_cfg = MRopeIndexConfig(
            image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
            spatial_merge_size=processor.image_processor.merge_size)
        self.perturber = Perturber(cfg.perturbation)
        self._skips: Counter = Counter()
        self._skip_examples: dict[str, str] = {}  # first skipped row per reason (for a log line)

    @property
    def epoch(self) -> int:
        return self.reader.epoch

    # -- position -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The data position: {epoch, cursor, seed, num_rows, shuffle, skip_counts}."""
        return {**self.reader.state_dict(), "skip_counts": dict(self._skips)}

    def load_state_dict(self, state: dict) -> None:
        self.reader.load_state_dict(state)
        self._skips = Counter(state.get("skip_counts", {}))

    def skip_counts(self) -> dict[str, int]:
        """Rows skipped so far, per reason (all of SKIP_REASONS, zeros included)."""
        return {r: self._skips.get(r, 0) for r in SKIP_REASONS}

    def skip_examples(self) -> dict[str, str]:
        """The first skipped row of each reason seen by this process: "file row N: why"."""
        return dict(self._skip_examples)

    # -- iteration ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[PromptItem]:
        while True:
            yield self.next_sample()

    def next_sample(self) -> PromptItem:
        """The next usable sample; rows that cannot be used are counted and passed over."""
        tried = 0
        while True:
            if tried > self.num_rows:
                raise ValueError(f"no usable row in {self.reader.files}: skipped "
                                 f"{self.skip_counts()}")
            index, row, file = self.reader.next_row()
            epoch = self.reader.epoch
            tried += 1
            try:
                if isinstance(row, SkipRow):
                    raise row
                return self.process_row(row, index=index, epoch=epoch,
                                        base_dir=self.base_dirs[file])
            except SkipRow as e:
                self._skips[e.reason] += 1
                self._skip_examples.setdefault(
                    e.reason, f"{self.reader.files[file]} row {index}: {e}")

    def next_batch(self, num_prompts: int) -> list[PromptItem]:
        return [self.next_sample() for _ in range(num_prompts)]

    # -- one row --------------------------------------------------------------------------------
    def process_row(self, row: dict, *, index: int, epoch: int,
                    base_dir: Optional[Path] = None) -> PromptItem:
        """Row -> PromptItem, or SkipRow(reason)."""
        cfg = self.cfg
        question, verbatim = row_question(row)
        answer = row_answer(row)
        entries = row_images(row)
        if not entries:
            raise SkipRow("image_missing")
        if len(entries) > cfg.max_images_per_prompt:
            raise SkipRow("too_many_images")
        if "<image>" not in question:  # the reference prompt puts the image first
            question = "<image>\n" * len(entries) + question
        if not verbatim:
            question = question + " " + INSTRUCTION
        if question.count("<image>") != len(entries):
            raise SkipRow("image_token_mismatch")
        images = []
        for e in entries:
            try:
                img = decode_image(e, base_dir=base_dir, max_image_pixels=cfg.max_image_pixels)
                images.append(resize_for_qwen(img, min_pixels=self.min_pixels,
                                              max_pixels=self.max_pixels))
            except ImageError as err:
                raise SkipRow(err.reason, str(err)) from err

        prompt = self.processor.apply_chat_template(messages(question), add_generation_prompt=True,
                                                    tokenize=False)
        clean = self.processor(text=[prompt], images=images, return_tensors="pt")
        input_ids = clean["input_ids"][0]
        if input_ids.numel() > cfg.max_prompt_length:
            raise SkipRow("prompt_too_long", f"{input_ids.numel()} tokens")
        grid = clean["image_grid_thw"]
        position_ids, delta = self._mrope_position_ids(input_ids, self.rope_cfg, image_grid_N3=grid)

        plus_imgs, minus_imgs, kinds, pv_plus, pv_minus = [], [], [], None, None
        if self.perturb:
            plus_imgs, minus_imgs, kinds = self.perturber(
                images, seed=perturbation_seed(self.seed, index, epoch))
            # One image-processor call for both perturbed views (patches of I+ then I-).
            out = self.processor.image_processor(images=plus_imgs + minus_imgs,
                                                 return_tensors="pt")
            # The perturbed passes reuse input_ids and position_ids: the grids must be equal.
            assert torch.equal(out["image_grid_thw"], torch.cat([grid, grid])), \
                "a perturbation changed the image grid"
            num_patches = clean["pixel_values"].shape[0]
            pv_plus, pv_minus = out["pixel_values"].split(num_patches)
        extra = row.get("extra_info")
        response = row.get("response")
        return PromptItem(
            index=index, epoch=epoch, data_source=str(row.get("data_source") or ""),
            prompt=prompt, prompt_ids=input_ids, prompt_position_ids=position_ids,
            rope_delta=delta, image_grid_thw=grid, pixel_values=clean["pixel_values"],
            plus_pixel_values=pv_plus, minus_pixel_values=pv_minus, images=images,
            plus_images=plus_imgs, minus_images=minus_imgs, perturbation_kinds=kinds,
            ground_truth=answer, response=response if isinstance(response, str) else None,
            extra_info=extra if isinstance(extra, dict) else {})

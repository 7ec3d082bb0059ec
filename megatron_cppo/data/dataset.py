"""Prompt dataset: rows from parquet / JSONL -> processed prompts (``PromptItem``) with three image
views.

Row schema (verl's parquet schema, used by the ViRL39K and Geometry3K preprocessors; JSONL rows use
the same keys):

* the question, from the first of
  - ``prompt``: a list of chat messages ``[{"role": "user", "content": "<image>..."}]`` or a string,
    used verbatim (verl preprocessors already appended the answer-format instruction), or
  - ``question`` / ``problem``: a bare question; it gets ``"<image>\\n"`` in front if it has no
    ``<image>`` and ``" " + INSTRUCTION`` behind (the reference's prompt);
* ``images`` (or ``image``): a list of ``{"bytes": ..., "path": ...}``, raw bytes or paths; a
  relative path is looked up in the current directory (how ``datasets`` and verl read the files
  the reference's preprocessing writes), then in the data file's folder (raw ViRL39K);
* the answer, from ``reward_model.ground_truth`` or ``answer`` (a raw ViRL39K answer's
  ``\\boxed{...}`` content); it must be a string;
* optional ``data_source``, ``extra_info`` (a dict) and ``response`` (warm-start target).

Opening a dataset scans it once (``scan_rows``): every row is checked without decoding its images
(question, answer, image entries, image files and headers, and the prompt's length after
image-token expansion, measured with the tokenizer: the reference's ``filter_overlong_prompts``),
the kept, skipped and filtered counts by reason are the scan's ``summary()``, and a dataset with
more than ``max_skip_fraction`` of its rows skipped is refused with that summary (rows dropped by
the reference's own filters, ``FILTER_REASONS``, are reported but do not count against it).
Reading never loads a whole file: a batch reads each parquet row group (or chunk of
``jsonl_chunk_rows`` JSONL lines) it needs once, one at a time. An epoch is a uniform permutation
of the kept rows seeded by (seed, epoch); ``next_batch`` drops an epoch's last partial batch, as
the reference's dataloader does.

Rows that fail while being processed (pixel data that does not decode) are skipped and counted by
reason (``SKIP_REASONS``) and replaced; ``stats`` gives the counts for the run's metrics,
``reports`` the console lines (the scan's, then one per finished epoch). The
data position (epoch, rows consumed in the epoch, the seed and the counts) is ``state_dict()``;
``load_state_dict`` resumes so that the following samples, including their perturbation draws (a
pure function of (seed, row index, epoch)), equal those of an uninterrupted run.
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

from megatron_cppo.data.images import (ImageError, decode_image, image_size, image_source,
                                       image_tokens, resize_for_qwen)
from megatron_cppo.data.perturb import PerturbationConfig, Perturber, perturbation_seed
from megatron_cppo.data.schema import (FILTER_REASONS, SKIP_REASONS, SkipRow, messages,
                                       prompt_question, row_answer, row_images, row_min_side,
                                       row_question)
from megatron_cppo.data.tokenizer import pixel_bounds
from megatron_cppo.data.types import PromptItem
from megatron_cppo.options import bad, check_float, check_int, option


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
    max_skip_fraction: float = option(
        0.05, "refuse a dataset when more than this fraction of its rows cannot be used (their "
              "counts by reason are printed at open and every epoch; 1: never refuse)")
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
        check_float(self, "max_skip_fraction", 0.0, 1.0)
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
# The scan: every row checked once at open, without decoding images


class PromptMeasure:
    """The token length of a prompt without running the processor: its chat-templated text
    tokenized (one ``<|image_pad|>`` per image), plus per image its tokens after the reference's
    resize (one per 28 x 28 block) minus that one placeholder: the length the processor gives
    (tests/data/test_reader.py), which is what verl's ``filter_overlong_prompts`` measures."""

    def __init__(self, processor):
        self.processor = processor
        self.min_pixels, self.max_pixels = pixel_bounds(processor)

    def prompt(self, question: str) -> str:
        """The chat-templated prompt of a user turn (``prompt_question``'s text)."""
        return self.processor.apply_chat_template(messages(question), add_generation_prompt=True,
                                                  tokenize=False)

    def __call__(self, question: str, sizes: Sequence[tuple[int, int]]) -> int:
        """Tokens of the prompt of ``question`` with images of ``sizes`` ((width, height) each).
        Raises ImageError for an image the resize cannot keep (aspect ratio)."""
        text_tokens = len(self.processor.tokenizer(self.prompt(question))["input_ids"])
        return text_tokens + sum(image_tokens(w, h, min_pixels=self.min_pixels,
                                              max_pixels=self.max_pixels) - 1 for w, h in sizes)


def screen_row(row: Any, *, base_dir: Optional[Path], cfg: DataConfig,
               measure: Optional[PromptMeasure] = None) -> tuple[str, str, list[Any]]:
    """(user turn, answer, image entries) of a raw row (the turn as ``prompt_question`` builds
    it), or SkipRow(reason): the checks that need no image pixels. A path entry must name a file
    that exists (``resolve_image_path``); a bytes entry must hold bytes. With ``measure``, every
    image's header is read (undecodable, over ``max_image_pixels``, aspect ratio) and the
    prompt's length checked against ``max_prompt_length``: the scan then drops exactly the rows
    the reference filters. Processing a row runs these checks first (without ``measure``), so a
    row the scan kept is never counted twice."""
    if isinstance(row, SkipRow):
        raise row
    question, verbatim = row_question(row)
    answer = row_answer(row)
    entries = row_images(row)
    if not entries:
        raise SkipRow("image_missing", "the row has no image")
    if len(entries) > cfg.max_images_per_prompt:  # the reference drops multi-image ViRL39K rows
        raise SkipRow("too_many_images", f"{len(entries)} images (at most "
                      f"{cfg.max_images_per_prompt})")
    text = prompt_question(question, verbatim, len(entries))
    if text.count("<image>") != len(entries):
        raise SkipRow("image_token_mismatch", f"{text.count('<image>')} <image> markers for "
                      f"{len(entries)} images")
    sizes = []
    for e in entries:
        try:
            if measure is None:  # the entry holds bytes or names a file that exists
                image_source(e, base_dir)
            else:  # ... and its header reads
                sizes.append(image_size(e, base_dir=base_dir, min_side=row_min_side(row),
                                        max_image_pixels=cfg.max_image_pixels))
        except ImageError as err:
            raise SkipRow(err.reason, str(err)) from err
    if measure is not None:
        try:
            n = measure(text, sizes)
        except ImageError as err:
            raise SkipRow(err.reason, str(err)) from err
        if n > cfg.max_prompt_length:
            raise SkipRow("prompt_too_long", f"{n} tokens (--max-prompt-length "
                          f"{cfg.max_prompt_length})")
    return text, answer, entries


@dataclass
class RowScan:
    """What the scan of a dataset's files found: every row's global index that passed
    ``screen_row`` (``kept``, in file order) and the others counted by reason, with the first
    example of each. ``measured``: (min_pixels, max_pixels, max_prompt_length) the prompts were
    measured with, None when they were not (no processor)."""

    files: list[str]
    num_rows: int
    kept: np.ndarray                                   # int64 global row indices
    skips: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    measured: Optional[tuple[int, int, int]] = None

    @property
    def num_filtered(self) -> int:
        """Rows dropped by the reference's own filters (``FILTER_REASONS``)."""
        return sum(self.skips.get(r, 0) for r in FILTER_REASONS)

    @property
    def num_skipped(self) -> int:
        """Rows that cannot be used for any other reason (held against max_skip_fraction)."""
        return self.num_rows - len(self.kept) - self.num_filtered

    def summary(self) -> str:
        """``FILES: N rows, K kept, S skipped (reason n, ...; e.g. file row i: why), F filtered
        (reason n, ...)``."""
        line = (f"{', '.join(self.files)}: {self.num_rows} rows, {len(self.kept)} kept, "
                f"{self.num_skipped} skipped")
        skipped = [(r, n) for r, n in self.skips.most_common() if r not in FILTER_REASONS]
        if skipped:
            line += " (" + ", ".join(f"{r} {n}" for r, n in skipped) + \
                f"; e.g. {self.examples[skipped[0][0]]})"
        filtered = [(r, n) for r, n in self.skips.most_common() if r in FILTER_REASONS]
        if filtered:
            line += f", {self.num_filtered} filtered (" + \
                ", ".join(f"{r} {n}" for r, n in filtered) + ")"
        return line


def scan_rows(files: Union[str, Sequence[str]], cfg: Optional[DataConfig] = None,
              processor=None) -> RowScan:
    """One pass over every read unit of ``files`` (one in memory at a time): ``screen_row`` on
    each row, measuring the prompts when a ``processor`` is given. Raises ValueError naming the
    files when none is usable, or when more than ``cfg.max_skip_fraction`` of them are skipped
    (rows the reference's filters drop are reported but not counted against it)."""
    cfg = cfg if cfg is not None else DataConfig()
    files = _check_files(files)
    units = _index_units(files, cfg.jsonl_chunk_rows)
    base_dirs = [Path(f).resolve().parent for f in files]
    measure = PromptMeasure(processor) if processor is not None else None
    kept, skips, examples = [], Counter(), {}
    for u in units:
        for r, row in enumerate(_read_unit(files, u)):
            index = u.first_index + r
            try:
                screen_row(row, base_dir=base_dirs[u.file], cfg=cfg, measure=measure)
                kept.append(index)
            except SkipRow as e:
                skips[e.reason] += 1
                examples.setdefault(e.reason, f"{files[u.file]} row {index}: {e}")
    scan = RowScan(files=files, num_rows=sum(u.num_rows for u in units),
                   kept=np.asarray(kept, dtype=np.int64), skips=skips, examples=examples,
                   measured=None if measure is None else
                   (measure.min_pixels, measure.max_pixels, cfg.max_prompt_length))
    if scan.num_rows == 0:
        raise ValueError(f"{', '.join(files)}: no rows")
    if len(scan.kept) == 0:
        raise ValueError(f"no usable row in {scan.summary()}")
    if scan.num_skipped > cfg.max_skip_fraction * scan.num_rows:
        raise ValueError(
            f"{scan.summary()}: {scan.num_skipped / scan.num_rows:.1%} of the rows cannot be "
            f"used, more than --max-skip-fraction {cfg.max_skip_fraction:g} (fix the data, see "
            f"docs/cppo-data.md, or raise --max-skip-fraction to train on what is left)")
    return scan


# ----------------------------------------------------------------------------------------------


class RowReader:
    """Raw rows of the files in the epoch's order: a uniform permutation (seeded by (seed,
    epoch)) of the rows in ``candidates`` (default: all rows), or file order without shuffle.

    Rows are read lazily: ``take(n)`` reads each read unit (a parquet row group, a chunk of JSONL
    lines) the next n rows fall in once, keeps those rows and drops the unit, so memory holds one
    unit at a time whatever the order. Position: ``epoch`` and ``cursor`` (rows of the epoch's
    order consumed); the order is a pure function of (seed, epoch, candidates), so (epoch,
    cursor) is the whole position."""

    def __init__(self, files: list[str], *, seed: int, shuffle: bool, jsonl_chunk_rows: int,
                 candidates: Optional[np.ndarray] = None):
        self.files = [str(f) for f in files]
        self.seed, self.shuffle = seed, shuffle
        self.units = _index_units(self.files, jsonl_chunk_rows)
        self.num_rows = sum(u.num_rows for u in self.units)
        if self.num_rows == 0:
            raise ValueError(f"files {self.files} hold no rows")
        self.candidates = (np.arange(self.num_rows, dtype=np.int64) if candidates is None
                           else np.asarray(candidates, dtype=np.int64))
        self._starts = np.asarray([u.first_index for u in self.units], dtype=np.int64)
        self.epoch = 0
        self.cursor = 0
        self._order: Optional[np.ndarray] = None   # global row indices of the current epoch

    @property
    def epoch_size(self) -> int:
        return len(self.candidates)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed,
                "num_rows": self.num_rows, "kept": self.epoch_size, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("num_rows", self.num_rows),
                          ("kept", self.epoch_size), ("shuffle", self.shuffle)):
            if key in state and state[key] != mine:
                raise ValueError(f"data state has {key}={state[key]!r}, this dataset "
                                 f"{mine!r}: not the same data or seed")
        if not 0 <= state["cursor"] <= self.epoch_size:
            raise ValueError(f"data state cursor {state['cursor']} outside "
                             f"[0, {self.epoch_size}]")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = None

    def order(self) -> np.ndarray:
        """The current epoch's row indices, in order."""
        if self._order is None:
            rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch])
            self._order = (self.candidates[rng.permutation(self.epoch_size)] if self.shuffle
                           else self.candidates)
        return self._order

    def remaining(self) -> int:
        return self.epoch_size - self.cursor

    def next_epoch(self) -> None:
        self.epoch, self.cursor, self._order = self.epoch + 1, 0, None

    def take(self, n: int) -> list[tuple[int, Any, int]]:
        """The next ``min(n, remaining())`` rows of the epoch: (global index, raw row, file
        number) each, in order; a raw row is a dict, or a SkipRow for a JSONL line that is not
        an object."""
        indices = self.order()[self.cursor:self.cursor + n].tolist()
        self.cursor += len(indices)
        unit_of = np.searchsorted(self._starts, indices, side="right") - 1
        rows: dict[int, Any] = {}
        for ui in sorted(set(unit_of.tolist())):  # each unit once, one in memory at a time
            u = self.units[ui]
            unit_rows = _read_unit(self.files, u)
            for i, j in zip(indices, unit_of.tolist()):
                if j == ui:
                    rows[i] = unit_rows[i - u.first_index]
            del unit_rows
        return [(i, rows[i], self.units[j].file) for i, j in zip(indices, unit_of.tolist())]

    def next_row(self) -> tuple[int, Any, int]:
        """The next row (moving to the next epoch at the end of one)."""
        if self.remaining() == 0:
            self.next_epoch()
        return self.take(1)[0]


class PromptDataset:
    """Iterates processed ``PromptItem``s of ``files`` over epochs (an endless stream; ``epoch``
    tells where it is).

    At open every row is checked once (``scan_rows`` with this processor: image headers and
    prompt lengths, no image decoding): the kept / skipped / filtered counts by reason are
    ``scan.summary()``, and more than ``max_skip_fraction`` skipped refuses the dataset. An
    epoch is a uniform permutation of the kept rows (or file order without ``shuffle``).
    ``next_batch(n)`` never spans two epochs: an epoch yields ``floor(kept / n)`` batches and its
    last partial batch is dropped (the reference's ``drop_last``); rows that fail while being
    processed (pixel data that does not decode) are counted and replaced by the next rows of the
    epoch.

    Deterministic given (files, config, seed): data-parallel ranks that build it with the same
    seed see the same stream (e.g. each takes ``next_batch(global_prompts)[rank::world]``, or one
    rank builds the batch and sends it). ``seed`` drives the shuffle (``shuffle``) and the I+ / I-
    draws (``perturb``: build the perturbed views). ``scan``: the files' scan when the caller has
    it already (training/start.py scans the training set for --train-epochs); it is used when it
    was measured with this processor's pixel bounds and ``max_prompt_length``.

    ``processor`` is a ``Qwen2_5_VLProcessor`` (see ``build_qwen2_5_vl_processor``): images are
    resized to its min/max pixels here (multiples of 28 inside them), so its own resize is a
    no-op."""

    def __init__(self, files: Union[str, Sequence[str]], processor,
                 config: Optional[DataConfig] = None, *, seed: int = 0, shuffle: bool = True,
                 perturb: bool = True, scan: Optional[RowScan] = None):
        self.cfg = cfg = config if config is not None else DataConfig()
        self.seed, self.shuffle, self.perturb = seed, shuffle, perturb
        self.processor = processor
        self.min_pixels, self.max_pixels = pixel_bounds(processor)
        files = _check_files(files)
        self.measure = PromptMeasure(processor)
        if scan is None or scan.files != files or scan.measured != (
                self.min_pixels, self.max_pixels, cfg.max_prompt_length):
            scan = scan_rows(files, cfg, processor)
        self.scan = scan
        self.reader = RowReader(files, seed=seed, shuffle=shuffle,
                                jsonl_chunk_rows=cfg.jsonl_chunk_rows, candidates=self.scan.kept)
        self.num_rows = self.reader.num_rows
        self.num_kept = self.reader.epoch_size
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
        self.perturber = Perturber(cfg.perturbation) if perturb else None
        self._skips: Counter = Counter()          # skipped while processing, all epochs
        self._epoch_skips: Counter = Counter()    # ... in the current epoch
        self._epoch_seen = 0                      # rows processed in the current epoch
        self._skip_examples: dict[str, str] = {}  # first skipped row per reason (for a log line)
        # lines for the run's console: the scan's summary, then one per finished epoch
        self._reports: list[str] = [f"data {self.scan.summary()}"]

    @property
    def epoch(self) -> int:
        return self.reader.epoch

    # -- position -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The data position: {epoch, cursor, seed, num_rows, kept, shuffle, skip_counts,
        epoch_skip_counts, epoch_seen}."""
        return {**self.reader.state_dict(), "skip_counts": dict(self._skips),
                "epoch_skip_counts": dict(self._epoch_skips), "epoch_seen": self._epoch_seen}

    def load_state_dict(self, state: dict) -> None:
        self.reader.load_state_dict(state)
        self._skips = Counter(state.get("skip_counts", {}))
        self._epoch_skips = Counter(state.get("epoch_skip_counts", {}))
        self._epoch_seen = int(state.get("epoch_seen", 0))

    def skip_counts(self) -> dict[str, int]:
        """Rows skipped, per reason (all of SKIP_REASONS, zeros included): at the scan, plus
        while processing (every epoch's)."""
        return {r: self.scan.skips.get(r, 0) + self._skips.get(r, 0) for r in SKIP_REASONS}

    def skip_examples(self) -> dict[str, str]:
        """The first skipped row of each reason: "file row N: why"."""
        return {**self.scan.examples, **self._skip_examples}

    def reports(self) -> list[str]:
        """The lines not reported yet: at the first call the scan's kept / skipped counts, then
        one line per finished epoch (rows processed, skipped by reason)."""
        out, self._reports = self._reports, []
        return out

    def stats(self) -> dict[str, float]:
        """For the run's metrics: the epoch, rows kept at the scan, the rows the reference's
        filters dropped (``FILTER_REASONS``) and the rows skipped so far for any other reason
        (scan + processing), in total and by reason (non-zero reasons only)."""
        counts = {r: n for r, n in self.skip_counts().items() if n}
        return {"data/epoch": float(self.epoch), "data/kept": float(self.num_kept),
                "data/filtered": float(sum(n for r, n in counts.items() if r in FILTER_REASONS)),
                "data/skipped": float(sum(n for r, n in counts.items()
                                          if r not in FILTER_REASONS)),
                **{f"data/skipped_{r}": float(n) for r, n in counts.items()}}

    # -- iteration ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[PromptItem]:
        while True:
            yield self.next_sample()

    def _process(self, index: int, row: Any, file: int) -> Optional[PromptItem]:
        self._epoch_seen += 1
        try:
            return self.process_row(row, index=index, epoch=self.reader.epoch,
                                    base_dir=self.base_dirs[file])
        except SkipRow as e:
            self._skips[e.reason] += 1
            self._epoch_skips[e.reason] += 1
            self._skip_examples.setdefault(
                e.reason, f"{self.reader.files[file]} row {index}: {e}")
            return None

    def _end_epoch(self) -> None:
        """Close the epoch: its report line; refuse when processing skipped more than
        ``max_skip_fraction`` of the rows it processed."""
        seen, skipped = self._epoch_seen, sum(self._epoch_skips.values())
        line = (f"data epoch {self.epoch} of {', '.join(self.reader.files)}: {seen} rows "
                f"processed, {skipped} skipped"
                + (" (" + ", ".join(f"{r} {n}" for r, n in self._epoch_skips.most_common())
                   + ")" if skipped else "") + f"; at the scan {self.scan.num_skipped} skipped, "
                f"{self.scan.num_filtered} filtered")
        self._reports.append(line)
        if seen and skipped > self.cfg.max_skip_fraction * seen:
            reason = self._epoch_skips.most_common(1)[0][0]
            raise ValueError(f"{line}: more than --max-skip-fraction "
                             f"{self.cfg.max_skip_fraction:g} (e.g. "
                             f"{self._skip_examples[reason]})")
        if seen and skipped == seen:
            raise ValueError(f"no usable row in {', '.join(self.reader.files)}: {line}")
        self._epoch_skips, self._epoch_seen = Counter(), 0
        self.reader.next_epoch()

    def next_sample(self) -> PromptItem:
        """The next usable item, continuing into the next epoch at the end of one."""
        while True:
            if self.reader.remaining() == 0:
                self._end_epoch()
            item = self._process(*self.reader.take(1)[0])
            if item is not None:
                return item

    def next_batch(self, num_prompts: int) -> list[PromptItem]:
        """``num_prompts`` items of one epoch (drop_last: a new epoch starts when fewer rows than
        that are left in this one; rows skipped while processing are replaced by the next)."""
        if num_prompts > self.num_kept:
            raise ValueError(f"a batch of {num_prompts} prompts exceeds the {self.num_kept} "
                             f"usable rows of {', '.join(self.reader.files)}")
        if self.reader.remaining() < num_prompts:
            self._end_epoch()
        out: list[PromptItem] = []
        while len(out) < num_prompts:
            if self.reader.remaining() == 0:  # processing skips used up the epoch
                self._end_epoch()
            for row in self.reader.take(min(num_prompts - len(out), self.reader.remaining())):
                item = self._process(*row)
                if item is not None:
                    out.append(item)
        return out

    def epoch_items(self, limit: Optional[int] = None) -> list[PromptItem]:
        """Up to ``limit`` usable items (default: all) from the rest of the current epoch, each
        row at most once (validation sets: no wrap-around, so no row counts twice)."""
        out: list[PromptItem] = []
        while self.reader.remaining() and (limit is None or len(out) < limit):
            want = self.reader.remaining() if limit is None else limit - len(out)
            for row in self.reader.take(min(want, self.reader.remaining())):
                item = self._process(*row)
                if item is not None:
                    out.append(item)
        return out

    # -- one row --------------------------------------------------------------------------------
    def process_row(self, row: dict, *, index: int, epoch: int,
                    base_dir: Optional[Path] = None) -> PromptItem:
        """Row -> PromptItem, or SkipRow(reason)."""
        cfg = self.cfg
        question, answer, entries = screen_row(row, base_dir=base_dir, cfg=cfg)
        images, min_side = [], row_min_side(row)
        for e in entries:
            try:
                img = decode_image(e, base_dir=base_dir, min_side=min_side,
                                   max_image_pixels=cfg.max_image_pixels)
                images.append(resize_for_qwen(img, min_pixels=self.min_pixels,
                                              max_pixels=self.max_pixels))
            except ImageError as err:
                raise SkipRow(err.reason, str(err)) from err

        prompt = self.measure.prompt(question)
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

"""Built-in verifiable dataset: small generated images whose answer can only be read from the image.

    python -m megatron_cppo.data.builtin --out DIR [--seed 0] [--levels 0,1,2] [--tasks ...]

writes ``DIR/train.parquet``, ``DIR/validation.parquet`` (the RL prompts), ``DIR/sft.parquet`` (a
supervised warm-start set: the same rows plus ``response``, a correct answer in the expected format
``<think>...</think> ... \\boxed{answer}``) and ``DIR/builtin.json`` (settings, row counts, sha256 of
every file). The files use the reader's schema (verl's parquet schema), so they exercise the same
path as real data. The same settings give byte-identical files.

Tasks (exact answers; every shape is drawn without anti-aliasing on white, shapes never touch):

========  =========================================  ==========================================
task      level 0 (56 px, one-word answers)           levels 1 (84 px) and 2 (112 px)
========  =========================================  ==========================================
count     "How many red squares ...?" 1-4 red         1: 1-6 squares of one colour among 0-3 of
          squares, nothing else                       other colours; 2: 1-9 of a colour and shape
                                                      among up to 5 distractors
color     "What color is the square?" one square,     1/2: 2/4 shapes of distinct colours and
          red/green/blue/yellow                       kinds, "What color is the circle?"
digit     one seven-segment digit, black              1: coloured, anywhere; 2: a two-digit
                                                      number
bars      "Which bar is taller, left or right?"       1: 3 bars, 2: 4 bars: "Which bar is the
                                                      tallest? Answer with its number ..."
========  =========================================  ==========================================

Row ``i`` of a split is drawn from ``numpy.random.default_rng([seed, split, i])``, so rows are
independent of each other and of the split sizes; train and validation use different streams.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from megatron_cppo.data.schema import INSTRUCTION

DATA_SOURCE = "megatron_cppo/builtin"
TASKS = ("count", "color", "digit", "bars")
LEVELS = (0, 1, 2)
SIZES = {0: 56, 1: 84, 2: 112}
COLORS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
          "yellow": (230, 190, 20)}
BLACK = (0, 0, 0)
WHITE = (255, 255, 255)
SHAPES = ("square", "circle", "triangle")
SPLITS = {"train": 0, "validation": 1, "sft": 2}

# Seven-segment layout: segment -> (x0, y0, x1, y1) in a 4 x 7 unit cell; digit -> lit segments.
SEGMENTS = {"a": (0, 0, 4, 1), "b": (3, 0, 4, 4), "c": (3, 3, 4, 7), "d": (0, 6, 4, 7),
            "e": (0, 3, 1, 7), "f": (0, 0, 1, 4), "g": (0, 3, 4, 4)}
DIGIT_SEGMENTS = {0: "abcdef", 1: "bc", 2: "abdeg", 3: "abcdg", 4: "bcfg", 5: "acdfg",
                  6: "acdefg", 7: "abc", 8: "abcdefg", 9: "abcdfg"}

ROW_SCHEMA = pa.schema([
    ("data_source", pa.string()),
    ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
    ("ability", pa.string()),
    ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
    ("extra_info", pa.struct([("index", pa.int64()), ("split", pa.string()),
                              ("task", pa.string()), ("level", pa.int64()),
                              ("question", pa.string()), ("answer", pa.string())])),
])


# ----------------------------------------------------------------------------------------------
# Drawing

def _draw_shape(d: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], color) -> None:
    x0, y0, x1, y1 = box  # inclusive pixel box
    if shape == "square":
        d.rectangle(box, fill=color)
    elif shape == "circle":
        d.ellipse(box, fill=color)
    else:
        d.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color)


def _place(rng: np.random.Generator, size: int, n: int, side: int, gap: int = 3
           ) -> list[tuple[int, int, int, int]]:
    """n non-touching boxes of ``side`` px (a gap of >= ``gap`` px between them and the border)."""
    cells = size // (side + gap)
    slots = [(i, j) for i in range(cells) for j in range(cells)]
    if n > len(slots):
        raise ValueError(f"{n} shapes of {side} px do not fit in {size} px")
    pick = rng.choice(len(slots), size=n, replace=False)
    boxes = []
    pitch = side + gap
    slack = size - cells * pitch  # leftover pixels, spread as a random offset
    ox, oy = (int(rng.integers(0, slack + 1)) for _ in range(2))
    for k in pick:
        i, j = slots[int(k)]
        x0 = ox + j * pitch + gap // 2 + int(rng.integers(0, gap // 2 + 1))
        y0 = oy + i * pitch + gap // 2 + int(rng.integers(0, gap // 2 + 1))
        boxes.append((x0, y0, x0 + side - 1, y0 + side - 1))
    return boxes


def _canvas(size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (size, size), WHITE)
    return img, ImageDraw.Draw(img)


def _draw_digit(d: ImageDraw.ImageDraw, digit: int, x: int, y: int, unit: int, color) -> None:
    for s in DIGIT_SEGMENTS[digit]:
        x0, y0, x1, y1 = SEGMENTS[s]
        d.rectangle((x + x0 * unit, y + y0 * unit, x + x1 * unit - 1, y + y1 * unit - 1), fill=color)


# ----------------------------------------------------------------------------------------------
# Tasks: rng, level -> (image, question, answer, reasoning)

def _task_count(rng, level):
    size = SIZES[level]
    img, d = _canvas(size)
    if level == 0:
        n = int(rng.integers(1, 5))
        for box in _place(rng, size, n, side=8):
            _draw_shape(d, "square", box, COLORS["red"])
        return img, "How many red squares are in the image?", str(n), f"I see {n} red squares."
    names = list(COLORS)
    color = names[int(rng.integers(len(names)))]
    shape = "square" if level == 1 else SHAPES[int(rng.integers(len(SHAPES)))]
    n = int(rng.integers(1, 7 if level == 1 else 10))
    k = int(rng.integers(0, 4 if level == 1 else 6))
    boxes = _place(rng, size, n + k, side=9 if level == 1 else 10)
    for box in boxes[:n]:
        _draw_shape(d, shape, box, COLORS[color])
    for box in boxes[n:]:  # distractors differ in colour (level 1) or colour or shape (level 2)
        while True:
            c = names[int(rng.integers(len(names)))]
            s = shape if level == 1 else SHAPES[int(rng.integers(len(SHAPES)))]
            if (c, s) != (color, shape):
                break
        _draw_shape(d, s, box, COLORS[c])
    q = f"How many {color} {shape}s are in the image?"
    return img, q, str(n), f"I count the {color} {shape}s: {n}."


def _task_color(rng, level):
    size = SIZES[level]
    img, d = _canvas(size)
    names = list(COLORS)
    if level == 0:
        color = names[int(rng.integers(len(names)))]
        side = int(rng.integers(16, 33))
        (box,) = _place(rng, size, 1, side=side)
        _draw_shape(d, "square", box, COLORS[color])
        return img, "What color is the square?", color, f"The square is {color}."
    n = 2 if level == 1 else 4
    colors = [names[int(i)] for i in rng.permutation(len(names))[:n]]
    others = [s for s in SHAPES if s != "circle"]
    shapes = ["circle"] + [others[int(rng.integers(len(others)))] for _ in range(n - 1)]
    for box, s, c in zip(_place(rng, size, n, side=16 if level == 1 else 14), shapes, colors):
        _draw_shape(d, s, box, COLORS[c])
    return img, "What color is the circle?", colors[0], f"The circle is {colors[0]}."


def _task_digit(rng, level):
    size = SIZES[level]
    img, d = _canvas(size)
    if level == 0:
        digit = int(rng.integers(10))
        unit = 6
        x = int(rng.integers(2, size - 4 * unit - 1))
        y = int(rng.integers(2, size - 7 * unit - 1))
        _draw_digit(d, digit, x, y, unit, BLACK)
        return img, "What digit is shown in the image?", str(digit), f"The digit is {digit}."
    names = list(COLORS)
    color = COLORS[names[int(rng.integers(len(names)))]]
    if level == 1:
        digit, unit = int(rng.integers(10)), 8
        x = int(rng.integers(2, size - 4 * unit - 1))
        y = int(rng.integers(2, size - 7 * unit - 1))
        _draw_digit(d, digit, x, y, unit, color)
        return img, "What digit is shown in the image?", str(digit), f"The digit is {digit}."
    number, unit = int(rng.integers(10, 100)), 7
    width = 4 * unit * 2 + 2 * unit
    x = int(rng.integers(2, size - width - 1))
    y = int(rng.integers(2, size - 7 * unit - 1))
    _draw_digit(d, number // 10, x, y, unit, color)
    _draw_digit(d, number % 10, x + 6 * unit, y, unit, color)
    return img, "What number is shown in the image?", str(number), f"The number is {number}."


def _task_bars(rng, level):
    size = SIZES[level]
    img, d = _canvas(size)
    n = {0: 2, 1: 3, 2: 4}[level]
    bar_w = size // (2 * n + 1)
    top = size - 4
    while True:  # heights distinct by >= 15% of the plot so the answer is unambiguous
        heights = sorted(rng.integers(size // 6, size - 8, size=n).tolist())
        if all(b - a >= 0.15 * size for a, b in zip(heights, heights[1:])):
            break
    heights = [heights[int(i)] for i in rng.permutation(n)]
    color = COLORS["blue"]
    for i, h in enumerate(heights):
        x0 = bar_w * (2 * i + 1)
        d.rectangle((x0, top - h + 1, x0 + bar_w - 1, top), fill=color)
    tallest = int(np.argmax(heights))
    if level == 0:
        ans = "left" if tallest == 0 else "right"
        return (img, "Which bar is taller, the left or the right one? Answer left or right.", ans,
                f"The {ans} bar is taller.")
    q = f"Which bar is the tallest? Answer with its number, 1 to {n} from the left."
    return img, q, str(tallest + 1), f"Bar {tallest + 1} is the tallest."


TASK_FNS: dict[str, Callable] = {"count": _task_count, "color": _task_color,
                                 "digit": _task_digit, "bars": _task_bars}


# ----------------------------------------------------------------------------------------------

def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def make_row(seed: int, split: str, i: int, tasks: tuple[str, ...], levels: tuple[int, ...],
             answer_noise: float = 0.0, format_noise: float = 0.0) -> tuple[dict, str]:
    """(row in the reader's schema, warm-start response) of row ``i`` of ``split``. With
    ``answer_noise`` p, the warm-start response of a fraction p of the rows (own stream) states a
    wrong answer: that of another draw of the same task and level (the ground truth stays). With
    ``format_noise`` q, that of a fraction q (another stream) states its answer without
    ``\\boxed{}``: a response the reward scores 0 (no accuracy, no format)."""
    rng = np.random.default_rng([seed & 0xFFFFFFFF, SPLITS[split], i])
    task = tasks[int(rng.integers(len(tasks)))]
    level = int(levels[int(rng.integers(len(levels)))])
    img, question, answer, thought = TASK_FNS[task](rng, level)
    said, said_thought = answer, thought
    noise_rng = np.random.default_rng([seed & 0xFFFFFFFF, SPLITS[split], i, 1])
    if answer_noise > 0 and noise_rng.random() < answer_noise:
        while said == answer:
            _, _, said, said_thought = TASK_FNS[task](noise_rng, level)
    row = {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": f"<image>{question} {INSTRUCTION}"}],
        "images": [{"bytes": _png(img), "path": None}],
        "ability": "visual",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {"index": i, "split": split, "task": task, "level": level,
                       "question": question, "answer": answer},
    }
    format_rng = np.random.default_rng([seed & 0xFFFFFFFF, SPLITS[split], i, 2])
    boxed = not (format_noise > 0 and format_rng.random() < format_noise)
    said = f"\\boxed{{{said}}}" if boxed else said
    response = f"<think>{said_thought}</think> The answer is {said}."
    return row, response


def _write(path: Path, rows: list[dict], row_group_size: int, schema: pa.Schema) -> None:
    table = pa.Table.from_pylist(rows, schema=schema)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd",
                   write_statistics=False)
    os.replace(tmp, path)


def write_builtin_dataset(out: str | os.PathLike, *, seed: int = 0, train_rows: int = 2000,
                          validation_rows: int = 200, sft_rows: int = 500,
                          tasks: tuple[str, ...] = TASKS, levels: tuple[int, ...] = LEVELS,
                          row_group_size: int = 256, sft_answer_noise: float = 0.0,
                          sft_format_noise: float = 0.0) -> dict[str, str]:
    """Write the built-in dataset into ``out``; return {"train", "validation", "sft": path}.
    ``sft_answer_noise``: the fraction of warm-start responses that state a wrong answer (a
    warm start on them knows the answer but says it with less confidence); ``sft_format_noise``:
    the fraction that leave the answer out of ``\\boxed{}`` (see make_row)."""
    tasks, levels = tuple(tasks), tuple(int(v) for v in levels)
    bad = [t for t in tasks if t not in TASK_FNS]
    if bad or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {tasks}")
    if not levels or any(v not in LEVELS for v in levels):
        raise ValueError(f"levels must be a non-empty subset of {LEVELS}, got {levels}")
    for name, n in (("train_rows", train_rows), ("validation_rows", validation_rows),
                    ("sft_rows", sft_rows)):
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    if row_group_size < 1:
        raise ValueError(f"row_group_size must be >= 1, got {row_group_size}")
    for name, q in (("sft_answer_noise", sft_answer_noise), ("sft_format_noise", sft_format_noise)):
        if not 0.0 <= q < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {q}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths, digests = {}, {}
    sft_schema = ROW_SCHEMA.append(pa.field("response", pa.string()))
    for split, n in (("train", train_rows), ("validation", validation_rows), ("sft", sft_rows)):
        rows, sft = [], split == "sft"
        for i in range(n):
            row, response = make_row(seed, split, i, tasks, levels,
                                     sft_answer_noise if sft else 0.0,
                                     sft_format_noise if sft else 0.0)
            if sft:
                row["response"] = response
            rows.append(row)
        path = out / f"{split}.parquet"
        _write(path, rows, row_group_size, sft_schema if sft else ROW_SCHEMA)
        paths[split] = str(path)
        digests[split] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest = {"seed": seed, "tasks": list(tasks), "levels": list(levels),
                "rows": {"train": train_rows, "validation": validation_rows, "sft": sft_rows},
                "sft_answer_noise": sft_answer_noise, "sft_format_noise": sft_format_noise,
                "row_group_size": row_group_size, "sha256": digests}
    (out / "builtin.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--seed", type=int, default=0, help="generator seed")
    ap.add_argument("--train-rows", type=int, default=2000, help="rows of train.parquet")
    ap.add_argument("--validation-rows", type=int, default=200,
                    help="rows of validation.parquet")
    ap.add_argument("--sft-rows", type=int, default=500, help="rows of sft.parquet (warm start)")
    ap.add_argument("--tasks", default=",".join(TASKS),
                    help=f"comma-separated subset of {','.join(TASKS)}")
    ap.add_argument("--levels", default="0,1,2",
                    help="comma-separated difficulty levels (0 = easiest, one-word answers)")
    ap.add_argument("--row-group-size", type=int, default=256, help="parquet rows per row group")
    ap.add_argument("--sft-answer-noise", type=float, default=0.0,
                    help="fraction of warm-start responses stating a wrong answer")
    ap.add_argument("--sft-format-noise", type=float, default=0.0,
                    help="fraction of warm-start responses leaving the answer out of \\boxed{}")
    a = ap.parse_args(argv)
    try:
        paths = write_builtin_dataset(
            a.out, seed=a.seed, train_rows=a.train_rows, validation_rows=a.validation_rows,
            sft_rows=a.sft_rows, tasks=tuple(t for t in a.tasks.split(",") if t),
            levels=tuple(int(v) for v in a.levels.split(",") if v),
            row_group_size=a.row_group_size, sft_answer_noise=a.sft_answer_noise,
            sft_format_noise=a.sft_format_noise)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split, p in paths.items():
        print(f"{split}: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

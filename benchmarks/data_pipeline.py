"""Throughput of the CPPO sample pipeline (read -> decode/resize -> processor -> I+ / I- views).

    python benchmarks/data_pipeline.py [--samples 200] [--big-side 448]

Two data sets: the built-in one (56-112 px images) and a synthetic one of photo-sized images
(``--big-side`` x 3/4 of it, PNG, resized to multiples of 28). For each, three pipelines over the
same rows, in one process, one thread:

  read       RowReader only (parquet row groups -> Python rows)
  clean      + decode, resize, chat template, processor, M-RoPE ids      (baseline, x1.00)
  cppo       + I+ / I- perturbations and their image processing (the full sample)

Prints samples/s (best of ``--rounds`` interleaved rounds) and the ratio to ``clean``.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_cppo.data.builtin import write_builtin_dataset  # noqa: E402
from megatron_cppo.data.dataset import DataConfig, PromptDataset, RowReader  # noqa: E402
from megatron_cppo.data.tokenizer import build_qwen2_5_vl_processor  # noqa: E402


def _big_parquet(path: Path, n: int, side: int) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        w, h = side, side * 3 // 4
        img = Image.fromarray(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)).resize(
            (w, h), Image.BILINEAR)
        d = ImageDraw.Draw(img)
        for _ in range(5):
            x, y = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            d.rectangle((x, y, x + 39, y + 39), fill=(200, 20, 20))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        rows.append({"prompt": [{"role": "user", "content": f"<image>Question {i}?"}],
                     "images": [{"bytes": buf.getvalue(), "path": None}],
                     "reward_model": {"style": "rule", "ground_truth": "5"}})
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=64)


def _rate(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=100, help="samples per pipeline and round")
    ap.add_argument("--big-side", type=int, default=448, help="width of the synthetic images")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (best is kept)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_builtin_dataset(tmp / "builtin", train_rows=2 * a.samples, validation_rows=0,
                                      sft_rows=0)
        _big_parquet(tmp / "big.parquet", 2 * a.samples, a.big_side)
        min_px, max_px = 4 * 28 * 28, 16384 * 28 * 28
        processor = build_qwen2_5_vl_processor(tmp / "proc", min_pixels=min_px, max_pixels=max_px)
        sets = {"builtin (56-112 px)": paths["train"],
                f"synthetic {a.big_side}x{a.big_side * 3 // 4}": str(tmp / "big.parquet")}
        print(f"load average {os.getloadavg()}, {a.samples} samples per pipeline, 1 thread")
        print(f"| data | pipeline | samples/s | vs clean | prompt tokens |")
        print(f"|---|---|---|---|---|")
        for name, f in sets.items():
            # Pipelines interleaved over --rounds rounds, best round kept: the machine is shared.
            reader = RowReader([f], seed=0, shuffle=True, jsonl_chunk_rows=1)
            pipes = {"read": reader.next_row}
            for mode in ("clean", "cppo"):
                ds = PromptDataset(f, processor, DataConfig(max_prompt_length=4096),
                                   perturb=(mode == "cppo"))
                tokens = ds.next_sample().prompt_ids.numel()  # warm-up
                pipes[mode] = ds.next_sample
            rates = {k: 0.0 for k in pipes}
            for _ in range(a.rounds):
                for mode, fn in pipes.items():
                    rates[mode] = max(rates[mode], _rate(fn, a.samples))
            for mode, r in rates.items():
                print(f"| {name} | {mode} | {r:.1f} | x{r / rates['clean']:.2f} | {tokens} |")
        print(f"load average after: {os.getloadavg()}")

if __name__ == "__main__":
    main()

"""``megatron-cppo eval``: avg@N of a model on benchmark files, vLLM alone (no megatron model).

    megatron-cppo eval --hf-dir Qwen2.5-VL-3B-cppo --data-path geo3k_test.parquet mathvista.jsonl \
        --n 16 --temperature 1.0 --max-new-tokens 2048 --out eval/run1
    megatron-cppo eval --load ckpt/run1 --data-path test.parquet     # a megatron checkpoint:
                                                                     # exported to HF first

The paper's protocol is the default: N = 16 samples per question at temperature 1.0, up to 2048
new tokens, images resized to at least 1280 x 28 x 28 pixels (``--min-pixels``), the answer the
content of the last ``\\boxed{}`` graded by the project's reward (``--reward``:
megatron_cppo.rewards' registry, the training reward by default). The files are read as the
trainer reads them (megatron_cppo.data: verl parquet, raw ViRL39K / geometry3k rows, JSONL; the
same prompt and skip rules, every row once, file order).

avg@N of a benchmark = the mean over its questions of the mean accuracy of that question's N
responses; a benchmark is a row's ``data_source`` (else the file's name). Its 95% interval is a
bootstrap over questions (``--bootstrap`` resamples, seeded): the uncertainty from which questions
the benchmark holds, not from the N samples (they are averaged per question first).

Written to ``--out``: ``responses.jsonl`` (every response: benchmark, row index, sample index,
answer, response, accuracy, format, score, finish reason) and ``eval_summary.csv`` (one row per
benchmark: benchmark, questions, samples per question, avg@N, the interval, the format rate;
the reference's eval_summary layout), and the table is printed. Exit status: 0, or 2 for bad
input (one ``error:`` line).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from megatron_cppo.data.dataset import DataConfig, PromptDataset
from megatron_cppo.data.tokenizer import load_processor, pixel_bounds
from megatron_cppo.rewards import DEFAULT_REWARD_FN, load_reward_fn
from megatron_cppo.rollout.config import RolloutConfig, SamplingConfig
from megatron_cppo.rollout.engine import RolloutItem

__all__ = ["avg_at_n", "bootstrap_interval", "main", "run_eval"]

PAPER_MIN_PIXELS = 1280 * 28 * 28
PAPER_MAX_PIXELS = 16384 * 28 * 28


def bootstrap_interval(per_question: Sequence[float], *, resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of ``per_question`` (questions resampled
    with replacement ``resamples`` times, numpy's default generator seeded by ``seed``)."""
    x = np.asarray(per_question, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no questions")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def avg_at_n(scores: dict) -> tuple[float, list[float]]:
    """(avg@N, per-question means in key order) of question key -> its N scores."""
    per_q = [sum(v) / len(v) for _, v in sorted(scores.items())]
    return sum(per_q) / len(per_q), per_q


def _engine(args, model_dir: str):
    from megatron_cppo.rollout import build_engine  # starts vLLM: only when evaluating

    return build_engine(RolloutConfig(
        model_path=model_dir, dtype=args.dtype, seed=args.seed,
        max_model_len=args.max_prompt_length + args.max_new_tokens,
        max_num_seqs=min(args.batch_size * args.n, 256), placement=args.placement))


def run_eval(args, model_dir: str) -> list[dict]:
    """Evaluate ``model_dir`` on ``args.data_path``; returns the summary rows."""
    _, engine_max = pixel_bounds(load_processor(model_dir))
    if args.max_pixels > engine_max:  # the engine would shrink the images again
        raise ValueError(f"--max-pixels: {args.max_pixels} exceeds the model directory's "
                         f"max_pixels {engine_max} ({model_dir}/preprocessor_config.json)")
    processor = load_processor(model_dir, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    data_cfg = DataConfig(max_prompt_length=args.max_prompt_length,
                          max_skip_fraction=args.max_skip_fraction)
    sets = []
    for path in args.data_path:
        ds = PromptDataset(path, processor, data_cfg, shuffle=False, perturb=False)
        items = ds.epoch_items(args.limit)
        for line in ds.reports():
            print(line, flush=True)
        sets.append((path, items))
    reward = load_reward_fn(args.reward)
    sampling = SamplingConfig(n=args.n, temperature=args.temperature, top_p=args.top_p,
                              max_new_tokens=args.max_new_tokens, seed=args.seed)
    os.makedirs(args.out, exist_ok=True)
    scores: dict[str, dict[tuple, list[float]]] = defaultdict(dict)
    formats: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    engine = _engine(args, model_dir)
    try:
        with open(os.path.join(args.out, "responses.jsonl"), "w") as sink:
            for path, items in sets:
                for start in range(0, len(items), args.batch_size):
                    batch = items[start:start + args.batch_size]
                    groups = engine.generate([RolloutItem(prompt=x.prompt, image=(
                        x.images[0] if x.images else None)) for x in batch], sampling)
                    for item, group in zip(batch, groups):
                        bench = item.data_source or Path(path).stem
                        key = (path, item.index)
                        for s in group.samples:
                            if s.prompt_token_ids != item.prompt_ids.tolist():
                                raise ValueError(
                                    f"{path} row {item.index}: vLLM tokenized the prompt to "
                                    f"{len(s.prompt_token_ids)} ids, the data reader to "
                                    f"{item.prompt_ids.numel()}: the model directory's "
                                    f"tokenizer and chat template must be the processor's")
                            acc, fmt, score, failed = _grade(reward, s.text, item.ground_truth)
                            scores[bench].setdefault(key, []).append(acc)
                            formats[bench].append(fmt)
                            errors[bench] += failed
                            sink.write(json.dumps({
                                "benchmark": bench, "file": path, "index": item.index,
                                "sample": s.sample_index, "answer": item.ground_truth,
                                "response": s.text, "accuracy": acc, "format": fmt,
                                "score": score, "grader_error": failed,
                                "finish_reason": s.finish_reason}) + "\n")
                    sink.flush()
    finally:
        engine.shutdown()
    rows = []
    for bench, by_q in scores.items():
        value, per_q = avg_at_n(by_q)
        low, high = bootstrap_interval(per_q, resamples=args.bootstrap, seed=args.seed)
        fmt = [f for f in formats[bench] if f == f]
        rows.append({"benchmark": bench, "questions": len(per_q), "samples": args.n,
                     f"avg@{args.n}": round(value, 6), "ci95_low": round(low, 6),
                     "ci95_high": round(high, 6),
                     "format_rate": round(sum(fmt) / len(fmt), 6) if fmt else "",
                     "grader_errors": errors[bench]})
    with open(os.path.join(args.out, "eval_summary.csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def _grade(reward, text: str, answer: str) -> tuple[float, float, float, bool]:
    """(accuracy, format (nan when the reward has none), score, grader failed) of one response.
    A float reward is its own accuracy; a reward that raises scores 0 and is counted."""
    try:
        r = reward(text, answer)
    except Exception:  # noqa: BLE001 - a grader bug on one response is counted, not fatal
        return 0.0, float("nan"), 0.0, True
    if isinstance(r, (int, float)):
        return float(r), float("nan"), float(r), False
    return (float(r.accuracy), float(r.format), float(r.score),
            bool(getattr(r, "grader_error", False)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-cppo eval", allow_abbrev=False,
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-dir", help="Hugging Face model directory (a converter export or a "
                                      "released checkpoint)")
    src.add_argument("--load", help="a megatron_cppo checkpoint (a training save directory or "
                                    "iter_* / converted directory): exported to a temporary HF "
                                    "directory first")
    p.add_argument("--processor-dir", default=None,
                   help="with --load: the directory whose tokenizer, chat template and image "
                        "processor the export gets (default: the HF directory the checkpoint "
                        "was converted or trained from)")
    p.add_argument("--data-path", nargs="+", required=True,
                   help="benchmark files (parquet or JSONL, the trainer's row formats)")
    p.add_argument("--out", default="eval", help="directory for responses.jsonl and "
                                                 "eval_summary.csv")
    p.add_argument("--n", type=int, default=16, help="samples per question (avg@N)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: off)")
    p.add_argument("--max-new-tokens", type=int, default=2048, help="response tokens")
    p.add_argument("--min-pixels", type=int, default=PAPER_MIN_PIXELS,
                   help="images are resized to at least this many pixels (multiples of 28)")
    p.add_argument("--max-pixels", type=int, default=PAPER_MAX_PIXELS,
                   help="... and at most this many")
    p.add_argument("--max-prompt-length", type=int, default=8192,
                   help="prompt tokens after image-token expansion; longer prompts are "
                        "skipped and counted")
    p.add_argument("--max-skip-fraction", type=float, default=0.05,
                   help="refuse a file with more than this fraction of unusable rows")
    p.add_argument("--limit", type=int, default=None, help="the first LIMIT usable rows of each "
                                                           "file")
    p.add_argument("--reward", default=DEFAULT_REWARD_FN,
                   help="MODULE:FUNCTION(response, answer) -> RewardOutput or float")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the "
                                                               "interval")
    p.add_argument("--seed", type=int, default=0, help="sampling (prompt i: seed + i) and "
                                                       "bootstrap seed")
    p.add_argument("--batch-size", type=int, default=64, help="questions per generate call")
    p.add_argument("--dtype", default="bfloat16", help="the engine's weights")
    p.add_argument("--placement", default="process", choices=("process", "inprocess"),
                   help="vLLM in its own process (default) or in this one")
    return p


def _check(args) -> None:
    for name in ("n", "max_new_tokens", "min_pixels", "max_pixels", "batch_size", "bootstrap"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1")
    if args.min_pixels > args.max_pixels:
        raise ValueError("--min-pixels: larger than --max-pixels")
    if args.temperature == 0 and args.n > 1:
        raise ValueError("--n: greedy samples (--temperature 0) are all the same response")
    if args.processor_dir is not None and args.load is None:
        raise ValueError("--processor-dir: only with --load (an --hf-dir has its own)")
    for path in args.data_path:
        if not os.path.isfile(path):
            raise ValueError(f"--data-path: {path} does not exist")


def _print_table(rows: list[dict]) -> None:
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |", flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check(args)
        if args.hf_dir is not None:
            rows = run_eval(args, args.hf_dir)
        else:
            from megatron_cppo.convert.conversions import megatron_to_hf  # megatron-core only
            from megatron_cppo.training.checkpoint import find_checkpoint  # for a checkpoint

            with tempfile.TemporaryDirectory(prefix="mcppo_eval_") as tmp:
                hf = os.path.join(tmp, "hf")
                megatron_to_hf(str(find_checkpoint(args.load)), hf, progress=False,
                               processor_dir=args.processor_dir)
                if not os.path.isfile(os.path.join(hf, "tokenizer_config.json")):
                    raise ValueError(f"--load: {args.load} was exported without tokenizer and "
                                     "processor files (its source HF directory is not here): "
                                     "name one with --processor-dir")
                rows = run_eval(args, hf)
    except (ValueError, OSError) as e:  # bad flags, files, rows; a directory without a model
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    _print_table(rows)
    print(f"responses: {os.path.join(args.out, 'responses.jsonl')}; summary: "
          f"{os.path.join(args.out, 'eval_summary.csv')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

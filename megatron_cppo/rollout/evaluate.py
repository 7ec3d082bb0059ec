"""avg@N evaluation: N samples per question, graded, averaged (the CPPO paper's metric).

    python -m megatron_cppo.rollout.evaluate --model DIR --data test.parquet --n 8 \
        --out responses.jsonl [--grader package.module:function] [--temperature 1.0 ...]

avg@N = mean over questions of (mean grader score of that question's N responses). The parquet
holds one question per row: ``question`` (str), ``image`` (encoded image bytes, a {"bytes", "path"}
struct as written by datasets, a list of those (the first is used), a path, or null) and ``answer``
(str). Every response goes to the JSONL (question index, sample index, response, score, answer,
weight version, finish reason) as soon as its batch is graded. ``grader(response_text, answer) ->
float`` is any callable (megatron_cppo.rewards plugs in here).
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
from typing import Any, Callable, Optional, Sequence

from megatron_cppo.rollout.config import RolloutConfig, SamplingConfig
from megatron_cppo.rollout.engine import RolloutItem

Grader = Callable[[str, str], float]


def load_eval_records(path: str) -> list[dict]:
    """Rows of the parquet as {"question", "image" (PIL or None), "answer"}; a bad row raises
    ValueError naming the file, row and field."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    missing = [c for c in ("question", "answer") if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: no column {missing[0]!r} (columns: {table.column_names})")
    rows = table.to_pylist()
    out = []
    for i, row in enumerate(rows):
        question, answer = row.get("question"), row.get("answer")
        if not isinstance(question, str) or not question:
            raise ValueError(f"{path}: row {i}: field 'question' must be a non-empty string")
        if answer is None:
            raise ValueError(f"{path}: row {i}: field 'answer' is null")
        try:
            image = _decode_image(row.get("image"), os.path.dirname(path))
        except Exception as e:  # noqa: BLE001 - re-raised with the row named
            raise ValueError(f"{path}: row {i}: field 'image' cannot be decoded: {e}") from None
        out.append({"question": question, "image": image, "answer": str(answer)})
    return out


def _decode_image(value: Any, base_dir: str):
    from PIL import Image

    if value is None:
        return None
    if isinstance(value, list):
        if not value:
            return None
        value = value[0]
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value)).convert("RGB")
    if isinstance(value, str):
        path = value if os.path.isabs(value) else os.path.join(base_dir, value)
        return Image.open(path).convert("RGB")
    raise TypeError(f"unsupported image value of type {type(value).__name__}")


def chat_prompt(processor, question: str, has_image: bool) -> str:
    """The model's chat template applied to one user turn (image first, then the question)."""
    content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True, tokenize=False)


def exact_match(response: str, answer: str) -> float:
    """Fallback grader: the answer equals the response's last non-empty line (stripped)."""
    lines = [line.strip() for line in response.strip().splitlines() if line.strip()]
    return float(bool(lines) and lines[-1] == answer.strip())


def evaluate(engine, records: Sequence[dict], grader: Grader, *, prompts: Sequence[str],
             sampling: SamplingConfig, out_jsonl: Optional[str] = None, batch_size: int = 16,
             progress: bool = True) -> dict:
    """Generate ``sampling.n`` responses per record, grade them, return {"avg_at_n", "n",
    "num_questions", "num_responses"}; write every response to ``out_jsonl``."""
    from tqdm import tqdm

    if len(prompts) != len(records):
        raise ValueError(f"{len(prompts)} prompts for {len(records)} records")
    per_question: list[float] = []
    sink = open(out_jsonl, "w") if out_jsonl else None
    try:
        bar = tqdm(total=len(records), desc=f"avg@{sampling.n}", unit="q", disable=not progress)
        for start in range(0, len(records), batch_size):
            batch = records[start:start + batch_size]
            items = [RolloutItem(prompt=p, image=r["image"])
                     for p, r in zip(prompts[start:start + batch_size], batch)]
            groups = engine.generate(items, sampling)
            for group, record in zip(groups, batch):
                scores = []
                for s in group.samples:
                    score = float(grader(s.text, record["answer"]))
                    scores.append(score)
                    if sink:
                        sink.write(json.dumps({
                            "question_index": start + group.prompt_index,
                            "sample_index": s.sample_index, "question": record["question"],
                            "answer": record["answer"], "response": s.text, "score": score,
                            "finish_reason": s.finish_reason,
                            "weight_version": s.weight_version}) + "\n")
                per_question.append(sum(scores) / len(scores))
            if sink:
                sink.flush()
            bar.update(len(batch))
            bar.set_postfix(avg=f"{sum(per_question) / len(per_question):.4f}")
        bar.close()
    finally:
        if sink:
            sink.close()
    return {"avg_at_n": sum(per_question) / max(len(per_question), 1), "n": sampling.n,
            "num_questions": len(per_question), "num_responses": len(per_question) * sampling.n}


def _load_grader(spec: Optional[str]) -> Grader:
    if not spec:
        return exact_match
    module, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"--grader must be MODULE:FUNCTION, got {spec!r}")
    return getattr(importlib.import_module(module), attr)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF-format model directory")
    p.add_argument("--data", required=True, help="parquet of (question, image, answer)")
    p.add_argument("--out", required=True, help="JSONL of every response")
    p.add_argument("--n", type=int, default=8, help="samples per question (avg@N)")
    p.add_argument("--grader", default=None, help="MODULE:FUNCTION grader(response, answer)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (question i: seed + i)")
    p.add_argument("--batch-size", type=int, default=64, help="questions per generate call")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--limit", type=int, default=None, help="only the first LIMIT questions")
    args = p.parse_args(argv)

    from transformers import AutoProcessor

    from megatron_cppo.rollout import build_engine

    records = load_eval_records(args.data)[:args.limit]
    processor = AutoProcessor.from_pretrained(args.model)
    prompts = [chat_prompt(processor, r["question"], r["image"] is not None) for r in records]
    sampling = SamplingConfig(n=args.n, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, max_new_tokens=args.max_new_tokens,
                              seed=args.seed)
    engine = build_engine(RolloutConfig(model_path=args.model, dtype=args.dtype,
                                        max_model_len=args.max_model_len))
    try:
        report = evaluate(engine, records, _load_grader(args.grader), prompts=prompts,
                          sampling=sampling, out_jsonl=args.out, batch_size=args.batch_size)
    finally:
        engine.shutdown()
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()

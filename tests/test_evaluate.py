"""``megatron-cppo eval`` (megatron_cppo/evaluate.py): avg@N of a model on benchmark files.

Proven:
- the arithmetic: avg@N is the mean over questions of each question's mean (groups of any size);
  the bootstrap interval of a constant is that constant, is seeded, and for 2000 Bernoulli
  questions matches the normal interval (width 2 * 1.96 * sd / sqrt(n)) within 10%;
- bad flags and files exit 2 with one ``error: --flag`` line, before any model is loaded;
- the module imports neither megatron-core nor vLLM (``--hf-dir`` runs without megatron);
- end to end with vLLM (a tiny random Qwen2.5-VL): a geometry3k test parquet written the way
  the reference's ``geo3k.py`` writes it (``datasets``, embedded images, verl rows) and a raw
  ViRL39K-shaped parquet (``question`` / boxed ``answer`` / image bytes; one row without its
  image, skipped and reported) give one response line per sample, benchmarks named by
  ``data_source`` else the file, the boxed content as the answer, and a summary whose avg@N,
  interval and format rate are those of the response lines; vLLM's prompt ids equal the reader's
  (the run checks each one);
- ``--load`` of a megatron checkpoint (hf-to-megatron of the same model) gives the same responses
  as ``--hf-dir`` at the same seed (the export is exact, fp32 both times).
Not proven: the paper's benchmarks and a real model (not reachable here).
"""

import csv
import json
import os
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import tiny_vl
from megatron_cppo.evaluate import avg_at_n, bootstrap_interval, main

INSTRUCTION = (r"You FIRST think about the reasoning process as an internal monologue and then "
               r"provide the final answer. The reasoning process MUST BE enclosed within <think> "
               r"</think> tags. The final answer MUST BE put in \boxed{}.")


def test_avg_at_n_is_the_mean_of_question_means():
    value, per_q = avg_at_n({("f", 1): [1.0, 0.0, 0.0], ("f", 0): [1.0, 1.0]})
    assert per_q == [1.0, 1 / 3]  # key order
    assert value == (1.0 + 1 / 3) / 2


def test_bootstrap_interval():
    assert bootstrap_interval([0.25] * 7, resamples=50) == (0.25, 0.25)
    rng = np.random.default_rng(1)
    x = (rng.random(2000) < 0.3).astype(float)
    low, high = bootstrap_interval(x, resamples=2000, seed=4)
    assert (low, high) == bootstrap_interval(x, resamples=2000, seed=4)
    assert low < x.mean() < high
    normal = 2 * 1.96 * x.std() / np.sqrt(x.size)
    assert abs((high - low) / normal - 1) < 0.1
    with pytest.raises(ValueError, match="no questions"):
        bootstrap_interval([])


@pytest.mark.parametrize("extra, flag", [
    (["--n", "4", "--temperature", "0"], "--n"),
    (["--min-pixels", "5000", "--max-pixels", "4000"], "--min-pixels"),
    (["--processor-dir", "x"], "--processor-dir"),
    (["--n", "0"], "--n"),
])
def test_bad_flags_exit_2(tmp_path, capsys, extra, flag):
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    assert main(["--hf-dir", str(tmp_path), "--data-path", str(data), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {flag}: "), err


def test_missing_data_file_and_model_dir(tmp_path, capsys):
    assert main(["--hf-dir", str(tmp_path), "--data-path", str(tmp_path / "no.parquet")]) == 2
    assert "error: --data-path: " in capsys.readouterr().err
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    assert main(["--hf-dir", str(tmp_path / "none"), "--data-path", str(data)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert main(["--load", str(tmp_path), "--data-path", str(data)]) == 2
    assert "error: --load: " in capsys.readouterr().err


def test_imports_neither_megatron_nor_vllm():
    code = ("import sys, megatron_cppo.evaluate; "
            "print(sorted(m for m in ('megatron.core', 'vllm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------------------
# End to end with vLLM.

def _geo3k_like(path: str) -> None:
    """vbdi/cppo verl/examples/data_preprocess/geo3k.py's row layout and calls (``datasets``
    rows with PIL ``images``, ``map``, ``to_parquet``) on three made-up geometry3k rows."""
    datasets = pytest.importorskip("datasets")
    raw = datasets.Dataset.from_dict({
        "problem": [f"<image>Find x in figure {i}." for i in range(3)],
        "answer": ["3", "4.5", "12"],
        "images": [[tiny_vl.image(20 + i)] for i in range(3)]})

    def process_fn(example, idx):
        return {"data_source": "hiyouga/geometry3k",
                "prompt": [{"role": "user", "content": example["problem"] + " " + INSTRUCTION}],
                "images": example["images"], "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": example["answer"]},
                "extra_info": {"split": "test", "index": idx}}

    raw.map(function=process_fn, with_indices=True,
            remove_columns=["problem", "answer"]).to_parquet(path)


def _raw_rows(path: str) -> None:
    """Raw ViRL39K-shaped rows with embedded image bytes; row 2 has no image."""
    import io

    rows = []
    for i in range(4):
        buf = io.BytesIO()
        tiny_vl.image(30 + i).save(buf, format="PNG")
        image = [] if i == 2 else [{"bytes": buf.getvalue(), "path": None}]
        rows.append({"question": f"<image>How many dots in picture {i}?",
                     "answer": f"There are \\boxed{{{i + 1}}} dots", "image": image})
    pq.write_table(pa.Table.from_pylist(rows), path)


def _argv(model_flag, model, files, out, *extra):
    return [model_flag, model, "--data-path", *files, "--out", out, "--n", "3",
            "--max-new-tokens", "6", "--seed", "5", "--batch-size", "2", "--dtype", "float32",
            "--min-pixels", str(56 * 56), "--max-pixels", str(224 * 112),
            "--max-prompt-length", "400", "--max-skip-fraction", "0.5",
            "--reward", "helpers.tiny_vl:length_parity_reward", *extra]


@pytest.fixture(scope="module")
def evals(tmp_path_factory):
    from megatron_cppo.convert.conversions import hf_to_megatron

    root = tmp_path_factory.mktemp("eval")
    hf = tiny_vl.write_checkpoint(str(root / "hf"))
    geo, raw = str(root / "geo3k_test.parquet"), str(root / "raw_virl.parquet")
    _geo3k_like(geo)
    _raw_rows(raw)
    ckpt = str(root / "mcore")
    hf_to_megatron(hf, ckpt, progress=False)
    return dict(root=root, hf=hf, geo=geo, raw=raw, ckpt=ckpt)


@pytest.mark.slow  # two vLLM engines
def test_eval_end_to_end(evals, capsys):
    out = str(evals["root"] / "out")
    assert main(_argv("--hf-dir", evals["hf"], [evals["geo"], evals["raw"]], out)) == 0
    printed = capsys.readouterr().out
    assert "raw_virl.parquet: 4 rows, 3 kept, 1 skipped (image_missing 1;" in printed, printed
    lines = [json.loads(x) for x in open(os.path.join(out, "responses.jsonl"))]
    assert len(lines) == (3 + 3) * 3
    assert {x["benchmark"] for x in lines} == {"hiyouga/geometry3k", "raw_virl"}
    answers = defaultdict(set)
    for x in lines:
        answers[x["benchmark"]].add(x["answer"])
        assert x["finish_reason"] in ("stop", "length") and x["grader_error"] is False
        assert x["accuracy"] == len(x["response"]) % 2
    assert answers == {"hiyouga/geometry3k": {"3", "4.5", "12"}, "raw_virl": {"1", "2", "4"}}
    with open(os.path.join(out, "eval_summary.csv")) as fh:
        summary = {r["benchmark"]: r for r in csv.DictReader(fh)}
    assert set(summary) == {"hiyouga/geometry3k", "raw_virl"}
    for bench, row in summary.items():
        mine = [x for x in lines if x["benchmark"] == bench]
        by_q = defaultdict(list)
        for x in mine:
            by_q[(x["file"], x["index"])].append(x["accuracy"])
        assert sorted(len(v) for v in by_q.values()) == [3, 3, 3]
        expect = np.mean([np.mean(v) for v in by_q.values()])
        assert float(row["avg@3"]) == pytest.approx(expect, abs=1e-6)  # written to 6 places
        assert float(row["ci95_low"]) <= float(row["avg@3"]) <= float(row["ci95_high"])
        assert float(row["format_rate"]) == pytest.approx(
            np.mean([x["format"] for x in mine]), abs=1e-6)
        assert row["questions"] == "3" and row["grader_errors"] == "0"
    assert "| hiyouga/geometry3k | 3 | 3 |" in printed

    # the same model as a megatron checkpoint: exported, then the same responses
    out2 = str(evals["root"] / "out_load")
    assert main(_argv("--load", evals["ckpt"], [evals["geo"]], out2, "--limit", "2")) == 0
    again = [json.loads(x) for x in open(os.path.join(out2, "responses.jsonl"))]
    first = [x for x in lines if x["benchmark"] == "hiyouga/geometry3k"][:6]
    key = lambda x: (x["index"], x["sample"], x["response"])  # noqa: E731
    assert [key(x) for x in again] == [key(x) for x in first]

"""The built-in verifiable dataset: answers re-derived from its own images, determinism, the CLI.

Proves: for every task and level, an independent reading of the PNG (connected components of a
colour classified by fill ratio, seven-segment decoding of ink columns, bar heights) gives the stored
answer; level 0 answers are one word; the warm-start responses score 1.0 under the reward; the same
seed writes byte-identical files and another seed different ones; the reader reads the files.
Does not prove a model can learn the tasks."""

import io
import re
from collections import deque

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from helpers.datasets import open_dataset
from megatron_cppo.data.builtin import (COLORS, DIGIT_SEGMENTS, LEVELS, SEGMENTS, TASKS, main,
                                        make_row, write_builtin_dataset)
from megatron_cppo.data.dataset import warm_start_tokens
from megatron_cppo.rewards import cppo_reward


def _components(mask):
    """4-connected components of a boolean mask -> list of (area, bbox area, x0, x1)."""
    seen = np.zeros_like(mask)
    out = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        q, pts = deque([(y, x)]), []
        seen[y, x] = True
        while q:
            cy, cx = q.popleft()
            pts.append((cy, cx))
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if (0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx]
                        and not seen[ny, nx]):
                    seen[ny, nx] = True
                    q.append((ny, nx))
        ys, xs = np.array(pts).T
        out.append((len(pts), (np.ptp(ys) + 1) * (np.ptp(xs) + 1), xs.min(), xs.max()))
    return out


def _shape_of(area, box_area):
    r = area / box_area
    return "square" if r > 0.95 else "circle" if r > 0.65 else "triangle"


def _mask(a, rgb):
    return np.all(a == np.array(rgb, dtype=np.uint8), axis=-1)


def _read_digits(a):
    ink = ~np.all(a == 255, axis=-1)
    rows = np.nonzero(ink.any(axis=1))[0]
    top, unit = rows.min(), (rows.max() - rows.min() + 1) // 7
    cols = np.nonzero(ink.any(axis=0))[0]
    groups = np.split(cols, np.nonzero(np.diff(cols) > 1)[0] + 1)
    digits = ""
    for g in groups:
        if len(g) == unit:
            digits += "1"
            continue
        lit = "".join(s for s, (x0, y0, x1, y1) in SEGMENTS.items()
                      if ink[top + (y0 + y1) * unit // 2, g[0] + (x0 + x1) * unit // 2])
        digits += str(next(d for d, segs in DIGIT_SEGMENTS.items() if set(segs) == set(lit)))
    return digits


def independent_answer(img, question):
    a = np.asarray(img)
    name_of = {v: k for k, v in COLORS.items()}
    if m := re.match(r"How many (\w+) (\w+)s are", question):
        color, shape = m.groups()
        comps = _components(_mask(a, COLORS[color]))
        return str(sum(_shape_of(ar, ba) == shape for ar, ba, _, _ in comps))
    if question.startswith("What color is the square"):
        colors = {tuple(p) for p in a.reshape(-1, 3).tolist()} - {(255, 255, 255)}
        assert len(colors) == 1
        return name_of[colors.pop()]
    if question.startswith("What color is the circle"):
        found = [name for name, rgb in COLORS.items()
                 for ar, ba, _, _ in _components(_mask(a, rgb)) if _shape_of(ar, ba) == "circle"]
        assert len(found) == 1
        return found[0]
    if question.startswith(("What digit", "What number")):
        return _read_digits(a)
    if question.startswith("Which bar"):
        comps = sorted(_components(_mask(a, COLORS["blue"])), key=lambda c: c[2])
        heights = [ar // (x1 - x0 + 1) for ar, _, x0, x1 in comps]
        best = int(np.argmax(heights))
        assert sorted(heights)[-1] > sorted(heights)[-2]
        if "left or the right" in question:
            return ["left", "right"][best]
        return str(best + 1)
    raise AssertionError(question)


def test_answers_match_an_independent_reading_of_the_images():
    seen = set()
    for i in range(240):
        row, response = make_row(11, "train", i, TASKS, LEVELS)
        e = row["extra_info"]
        img = Image.open(io.BytesIO(row["images"][0]["bytes"]))
        assert img.size == (56, 56) if e["level"] == 0 else img.size[0] in (84, 112)
        answer = row["reward_model"]["ground_truth"]
        assert independent_answer(img, e["question"]) == answer, (i, e)
        if e["level"] == 0:
            assert re.fullmatch(r"\w+", answer)
        assert cppo_reward(response, answer).score == 1.0
        seen.add((e["task"], e["level"]))
    assert seen == {(t, v) for t in TASKS for v in LEVELS}


def test_deterministic_files_cli_and_reader(tmp_path, processor):
    kw = dict(train_rows=30, validation_rows=6, sft_rows=6, row_group_size=8)
    write_builtin_dataset(tmp_path / "a", seed=4, **kw)
    assert main(["--out", str(tmp_path / "b"), "--seed", "4", "--train-rows", "30",
                 "--validation-rows", "6", "--sft-rows", "6", "--row-group-size", "8"]) == 0
    write_builtin_dataset(tmp_path / "c", seed=5, **kw)
    for name in ("train.parquet", "validation.parquet", "sft.parquet", "builtin.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()
    train = pq.read_table(tmp_path / "a" / "train.parquet").to_pylist()
    val = pq.read_table(tmp_path / "a" / "validation.parquet").to_pylist()
    assert {r["images"][0]["bytes"] for r in train}.isdisjoint(r["images"][0]["bytes"] for r in val)
    assert pq.ParquetFile(tmp_path / "a" / "train.parquet").metadata.num_row_groups == 4

    assert main(["--out", str(tmp_path / "d"), "--levels", "7"]) == 2

    ds = open_dataset([tmp_path / "a" / "sft.parquet"], shuffle=False, processor=processor)
    s = ds.next_sample()
    assert s.response.startswith("<think>") and s.ground_truth in s.response
    assert sum(ds.skip_counts().values()) == 0
    ids, pos, mask = warm_start_tokens(s, processor.tokenizer)
    T = s.prompt_ids.numel()
    assert processor.tokenizer.decode(ids[mask]) == s.response + "<|im_end|>"
    assert not mask[:T].any() and torch.equal(ids[:T], s.prompt_ids)
    from megatron_cppo.models.qwen2_5_vl.rope_index import mrope_position_ids
    want, _ = mrope_position_ids(ids, ds.rope_cfg, image_grid_N3=s.image_grid_thw)
    assert torch.equal(pos, want)


def _noisy_warm_start_rows(n=400, **noise):
    """(clean response, noisy response, ground truth, reward of the noisy one) of n warm-start
    rows; the noise never touches the row itself (image, question, ground truth)."""
    for i in range(n):
        clean_row, clean = make_row(3, "sft", i, ("count", "color"), (0,))
        row, response = make_row(3, "sft", i, ("count", "color"), (0,), **noise)
        assert row == clean_row
        truth = row["reward_model"]["ground_truth"]
        yield clean, response, truth, cppo_reward(response, truth)


def test_sft_answer_noise_states_a_wrong_answer_on_that_fraction_only():
    """A noisy warm-start row says another answer of the same task (a well-formed response:
    format reward, no accuracy); the other rows are unchanged, and 0 noise is the clean set."""
    wrong = 0
    for clean, response, _, score in _noisy_warm_start_rows(answer_noise=0.3):
        if response != clean:
            wrong += 1
            assert score.format == 1.0 and score.accuracy == 0.0, response
        else:
            assert score.score == 1.0
    assert abs(wrong / 400 - 0.3) < 0.06


def test_sft_format_noise_drops_the_box_on_that_fraction_only():
    """A format-noise warm-start row keeps the correct answer but leaves it out of
    ``\\boxed{}``: the reward scores it 0 (unparsable, no format); the other rows are the clean
    responses, and the answer-noise stream is independent of the format-noise one."""
    unboxed = []
    for clean, response, truth, score in _noisy_warm_start_rows(format_noise=0.5):
        unboxed.append(response != clean)
        if unboxed[-1]:
            assert response == clean.replace(f"\\boxed{{{truth}}}", truth)
            assert score.score == 0.0 and score.unparsable, response
        else:
            assert score.score == 1.0
    assert abs(sum(unboxed) / 400 - 0.5) < 0.07
    both = _noisy_warm_start_rows(answer_noise=0.3, format_noise=0.5)
    wrong_only = _noisy_warm_start_rows(answer_noise=0.3)
    for was_unboxed, (_, b, _, _), (_, w, _, _) in zip(unboxed, both, wrong_only):
        assert (b == w) != was_unboxed

"""The prompt reader: skip reasons, bounded memory, exact resume, the processed sample.

Proves: every skip reason is triggered by a crafted row and counted exactly once; the scan's
prompt length (tokenizer + image tokens from the header) equals the processed prompt's, so the
scan filters overlong prompts exactly where processing would; reading a
10,000-row parquet holds one row group at a time (Python and Arrow allocations stay far below the
file's payload); save/restore of the position resumes with identical samples (pixels included) in
the middle of an epoch, across an epoch boundary and exactly at one; a sample's M-RoPE ids equal
the shared rope_index function's and its prompt length counts the expanded image tokens."""

import io
import json
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from helpers.datasets import open_dataset
from megatron_cppo.data.dataset import DataConfig, RowReader, screen_row
from megatron_cppo.data.schema import SKIP_REASONS, SkipRow


def _png(w, h, color=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def _bad_files(tmp_path):
    """Files with one row per skip reason, and two good rows at the end."""
    (tmp_path / "ok.png").write_bytes(_png(40, 40))
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    (tmp_path / "thin.png").write_bytes(_png(1, 300))
    (tmp_path / "big.png").write_bytes(_png(100, 100))
    noisy = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
                    ).save(noisy, format="PNG")
    (tmp_path / "cut.png").write_bytes(noisy.getvalue()[:len(noisy.getvalue()) // 2])
    q = {"role": "user"}
    lines = [
        "this is not json",                                                       # bad_record
        json.dumps([1, 2]),                                                       # bad_record
        json.dumps({"prompt": [{**q, "content": "  "}], "images": ["ok.png"],
                    "answer": "1"}),                                              # question_missing
        json.dumps({"images": ["ok.png"], "answer": "1"}),                        # question_missing
        json.dumps({"question": "Q", "images": ["ok.png"], "answer": 3}),         # answer_not_string
        json.dumps({"question": "Q", "images": ["ok.png"]}),                      # answer_not_string
        json.dumps({"question": "Q", "answer": "1"}),                             # image_missing
        json.dumps({"question": "Q", "images": ["nowhere.png"], "answer": "1"}),  # image_missing
        json.dumps({"question": "Q", "images": ["garbage.png"], "answer": "1"}),  # image_undecodable
        json.dumps({"question": "Q", "images": ["thin.png"], "answer": "1"}),     # image_aspect_ratio
        json.dumps({"question": "Q", "images": ["big.png"], "answer": "1"}),      # image_over_pixel_limit
        json.dumps({"question": "Q", "images": ["ok.png", "ok.png"],
                    "answer": "1"}),                                              # too_many_images
        json.dumps({"prompt": [{**q, "content": "<image><image>Q"}], "images": ["ok.png"],
                    "answer": "1"}),                                              # image_token_mismatch
        json.dumps({"question": "word " * 200, "images": ["ok.png"],
                    "answer": "1"}),                                              # prompt_too_long
        json.dumps({"question": "Q", "images": ["cut.png"], "answer": "1"}),  # image_undecodable
        #                                                         (its pixels, while processing)
        json.dumps({"question": "Q", "images": ["ok.png"], "answer": " "}),   # answer_empty
    ]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n\n")
    # parquet rows: undecodable bytes and a non-string answer column
    pq.write_table(pa.Table.from_pylist([
        {"prompt": [{"role": "user", "content": "<image>Q"}],
         "images": [{"bytes": b"\x89PNG broken", "path": None}],
         "reward_model": {"style": "rule", "ground_truth": "1"}}]), tmp_path / "bad1.parquet")
    pq.write_table(pa.Table.from_pylist([
        {"question": "Q", "images": [{"bytes": _png(40, 40), "path": None}], "answer": 7}]),
        tmp_path / "bad2.parquet")
    pq.write_table(pa.Table.from_pylist([
        {"question": "Good one", "prompt": None,
         "images": [{"bytes": _png(56, 28), "path": None}], "answer": "2",
         "data_source": "t", "extra_info": {"k": 1}},
        {"question": None, "prompt": "<image>Good two",
         "images": [{"bytes": None, "path": "ok.png"}], "answer": "x", "data_source": None,
         "extra_info": None}]), tmp_path / "good.parquet")
    return [tmp_path / n for n in ("bad.jsonl", "bad1.parquet", "bad2.parquet", "good.parquet")]


def test_every_skip_reason_is_counted(processor, tmp_path):
    ds = open_dataset(_bad_files(tmp_path), processor=processor, shuffle=False,
                      max_prompt_length=200, max_image_pixels=60 * 60, max_skip_fraction=1.0)
    good = ds.next_batch(2)
    assert [s.ground_truth for s in good] == ["2", "x"]
    want = {r: 1 for r in SKIP_REASONS}
    want.update(bad_record=2, question_missing=2, answer_not_string=3, image_missing=2,
                image_undecodable=3)
    assert ds.skip_counts() == want
    # the position saves the processing skips; the scan's are recounted when the data reopens
    assert ds.state_dict()["skip_counts"] == dict(image_undecodable=1)
    assert ds.skip_examples()["image_missing"].endswith("bad.jsonl row 6: the row has no image")
    # the scan counted the rows its checks reject exactly once (image headers and prompt lengths
    # included); processing counted the truncated pixels
    assert sum(ds.scan.skips.values()) == 17 and ds.num_kept == 3
    assert ds.scan.num_filtered == 2 and ds.scan.num_skipped == 15  # too many images, too long
    assert "row 10: image of 100x100 pixels exceeds" in ds.skip_examples()["image_over_pixel_limit"]
    assert "row 13: " in ds.skip_examples()["prompt_too_long"]
    assert "row 14: cannot decode image" in ds.skip_examples()["image_undecodable"]
    assert ds.stats()["data/filtered"] == 2.0 and ds.stats()["data/skipped"] == 16.0

    s = good[0]
    # "<image>\n" prepended and the instruction appended to a bare question (reference prompt)
    assert "<|vision_start|><|image_pad|><|vision_end|>\nGood one You FIRST think" in s.prompt
    assert s.images[0].size == (56, 28) and s.image_grid_thw.tolist() == [[1, 2, 4]]
    n_img = int((s.prompt_ids == 151655).sum())
    assert n_img == 2 * 4 // 4  # prompt length counts the expanded image tokens
    assert s.prompt_ids.numel() == len(processor.tokenizer(s.prompt)["input_ids"]) + n_img - 1
    from megatron_cppo.models.qwen2_5_vl.rope_index import mrope_position_ids
    pos, delta = mrope_position_ids(s.prompt_ids, ds.rope_cfg, image_grid_N3=s.image_grid_thw)
    assert torch.equal(pos, s.prompt_position_ids) and delta == s.rope_delta
    assert s.data_source == "t" and s.extra_info == {"k": 1}
    # 40x40 is resized to a multiple of 28 within the pixel bounds: 28x28
    assert good[1].images[0].size == (28, 28)

    with pytest.raises(ValueError, match="--max-prompt-length"):
        open_dataset(_bad_files(tmp_path), processor=processor, max_prompt_length=0)
    only_bad = open_dataset([tmp_path / "bad.jsonl"], processor=processor,
                            max_image_pixels=60 * 60, max_prompt_length=200,
                            max_skip_fraction=1.0)
    with pytest.raises(ValueError, match="no usable row"):
        only_bad.next_sample()


def test_scan_measures_prompts_as_processing_counts_them(processor, tmp_path):
    """The scan's length (tokenizer on the templated text + the resized image's tokens, from the
    header) equals the processed prompt's on images that are resized up, down and not at all;
    with --max-prompt-length at a prompt's length it is kept, one below it is filtered at the
    scan and never reaches processing."""
    rng = np.random.default_rng(1)
    sizes = [(28, 28), (56, 28), (40, 90), (90, 60), (300, 200), (13, 700), (1000, 1000)]
    rows = [{"question": "word " * int(rng.integers(1, 40)),
             "images": [{"bytes": _png(w, h), "path": None}], "answer": "1"} for w, h in sizes]
    verbatim = {"prompt": [{"role": "user", "content": "Look: <image> and say."}],
                "images": [{"bytes": _png(90, 60), "path": None}], "answer": "2"}
    path = [tmp_path / "sizes.parquet", tmp_path / "verbatim.parquet"]
    pq.write_table(pa.Table.from_pylist(rows), path[0])
    pq.write_table(pa.Table.from_pylist([verbatim]), path[1])
    rows.append(verbatim)
    ds = open_dataset(path, processor=processor, shuffle=False, max_prompt_length=100_000)
    items = ds.epoch_items()
    assert len(items) == len(rows) and sum(ds.skip_counts().values()) == 0
    lengths = [s.prompt_ids.numel() for s in items]
    for row, length in zip(rows, lengths):  # the scan's measure is exact: kept at, not below
        screen_row(row, base_dir=None, cfg=DataConfig(max_prompt_length=length),
                   measure=ds.measure)
        with pytest.raises(SkipRow, match=f"{length} tokens"):
            screen_row(row, base_dir=None, cfg=DataConfig(max_prompt_length=length - 1),
                       measure=ds.measure)
    limit = sorted(lengths)[3]
    cut = open_dataset(path, processor=processor, shuffle=False, max_prompt_length=limit,
                       max_skip_fraction=0.0)  # filtered rows do not count as skipped
    keep = [i for i, n in enumerate(lengths) if n <= limit]
    drop = len(rows) - len(keep)
    assert cut.scan.kept.tolist() == keep and 0 < drop < len(rows)
    assert cut.scan.skips == {"prompt_too_long": drop}
    assert len(cut.epoch_items()) == len(keep) and cut.skip_counts()["prompt_too_long"] == drop
    assert f", {drop} filtered (prompt_too_long {drop})" in cut.scan.summary()


def test_10k_row_parquet_memory_is_bounded_by_a_row_group(tmp_path):
    n, group, payload = 10_000, 250, 4096
    rng = np.random.default_rng(0)
    path = tmp_path / "big.parquet"
    writer = None
    for g in range(n // group):  # written a row group at a time too
        t = pa.table({"question": [f"q{g * group + i}" for i in range(group)],
                      "blob": [rng.bytes(payload) for _ in range(group)]})
        writer = writer or pq.ParquetWriter(path, t.schema, compression="none")
        writer.write_table(t, row_group_size=group)
    writer.close()
    file_payload = n * payload  # 41 MB
    group_payload = group * payload  # 1 MB

    reader = RowReader([str(path)], seed=0, shuffle=True, jsonl_chunk_rows=1)
    seen = set()
    arrow_base = arrow_peak = pa.total_allocated_bytes()
    tracemalloc.start()
    for _ in range(n):
        index, row, _ = reader.next_row()
        assert row["question"] == f"q{index}"
        seen.add(index)
        arrow_peak = max(arrow_peak, pa.total_allocated_bytes())
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(seen) == n and reader.epoch == 0
    # The file holds 41 MB. Python holds one row group's rows (1 MB); Arrow, while a group is
    # read, its column chunk, the decoded column and the table being converted (measured ~3 MB).
    assert py_peak < 3 * group_payload, py_peak
    assert arrow_peak - arrow_base < 4 * group_payload, (arrow_base, arrow_peak)
    assert file_payload > 30 * group_payload
    reader.next_row()
    assert reader.epoch == 1 and reader.cursor == 1


def test_jsonl_with_image_paths_reads_like_parquet(processor, builtin_dir, tmp_path):
    """The same rows as JSONL (images written as files, referenced by relative paths) give the
    same samples as the parquet file (bytes), pixels included."""
    rows = pq.read_table(builtin_dir / "validation.parquet").to_pylist()
    with open(tmp_path / "val.jsonl", "w") as f:
        for i, r in enumerate(rows):
            (tmp_path / "img").mkdir(exist_ok=True)
            (tmp_path / "img" / f"{i}.png").write_bytes(r["images"][0]["bytes"])
            r["images"] = [f"img/{i}.png"]
            f.write(json.dumps(r) + "\n")
    kw = dict(shuffle=True, seed=9, jsonl_chunk_rows=5)  # units like the row groups of 5
    a = open_dataset([builtin_dir / "validation.parquet"], **kw, processor=processor)
    b = open_dataset([tmp_path / "val.jsonl"], **kw, processor=processor)
    assert [u.num_rows for u in b.reader.units] == [u.num_rows for u in a.reader.units] == [5, 3]
    for _ in range(len(rows)):
        x, y = a.next_sample(), b.next_sample()
        assert x.ground_truth == y.ground_truth and torch.equal(x.prompt_ids, y.prompt_ids)
        assert torch.equal(x.pixel_values, y.pixel_values)


def _key(s):
    return (s.index, s.epoch, s.prompt_ids.tolist(), s.plus_pixel_values.sum().item(),
            s.minus_pixel_values.sum().item(), s.perturbation_kinds)


@pytest.mark.parametrize("cut", [25, 32])  # mid-epoch; exactly at the epoch boundary (32 rows)
def test_resume_sees_the_same_samples(processor, builtin_dir, cut):
    files = [builtin_dir / "train.parquet", builtin_dir / "validation.parquet"]  # 32 rows
    full = open_dataset(files, seed=5, processor=processor)
    ref = [_key(full.next_sample()) for _ in range(cut + 12)]
    a = open_dataset(files, seed=5, processor=processor)
    for _ in range(cut):
        a.next_sample()
    state = json.loads(json.dumps(a.state_dict()))  # what a checkpoint stores
    b = open_dataset(files, seed=5, processor=processor)
    b.load_state_dict(state)
    assert [_key(b.next_sample()) for _ in range(12)] == ref[cut:]
    assert [k[1] for k in ref].count(1) == cut + 12 - 32  # crossed into epoch 1
    # epoch 1 reorders and redraws the perturbations of the same rows
    e0 = {k[0]: k for k in ref if k[1] == 0}
    e1 = [k for k in ref if k[1] == 1]
    assert [k[0] for k in ref[:len(e1)]] != [k[0] for k in e1]
    assert all(e0[k[0]][3:5] != k[3:5] for k in e1)
    with pytest.raises(ValueError, match="seed"):
        open_dataset(files, seed=6, processor=processor).load_state_dict(state)

"""The paper's data as the reference prepares it, read by ``megatron_cppo.data``.

Proven:
- a parquet written the way vbdi/cppo's ``verl/examples/data_preprocess/virl39k.py`` writes it
  (``datasets``: load the raw parquet, filter to at most one image, ``map`` to verl rows whose
  ``images`` are PIL images opened from ``os.path.join(local_img_folder, path)``, ``to_parquet``:
  an image it did not resize is stored as ``{bytes: None, path: <path relative to the directory
  the script ran in>}``, one it resized as bytes) loses no row when read from that directory, and
  is refused from another with the skip-rate error naming both paths tried;
- raw ViRL39K rows (``question``, ``answer`` with its ``\\boxed{}``, ``image`` paths relative to the
  parquet's folder): the boxed content is the ground truth, multi-image rows are dropped and
  counted, and the reward of a correct response is 1.0;
- a file whose every image is missing is refused with exact counts (the earlier reader counted 49
  for 48 rows);
- an epoch is a uniform permutation across row groups (a statistical test the earlier two-level
  order fails), each batch stays within one epoch (drop_last), and the reports and stats a run
  prints and logs carry the kept / skipped counts.
Not proven: the real ViRL39K download (not reachable here); the files are made in the test.
"""

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from helpers.datasets import open_dataset
from megatron_cppo.data.dataset import RowReader
from megatron_cppo.rewards import cppo_reward

INSTRUCTION = (r"You FIRST think about the reasoning process as an internal monologue and then "
               r"provide the final answer. The reasoning process MUST BE enclosed within <think> "
               r"</think> tags. The final answer MUST BE put in \boxed{}.")


def _raw_virl39k(folder: Path, n: int = 12) -> Path:
    """A raw ViRL39K-shaped release: 39Krelease.parquet next to images/, paths relative to it;
    every 4th row has two images; row 5's image is 20 px high (the script resizes it)."""
    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        names = [f"images/q{i}_{k}.png" for k in range(2 if i % 4 == 3 else 1)]
        for name in names:
            Image.new("RGB", (56, 20 if i == 5 else 42), (10 * i, 80, 120)).save(folder / name)
        rows.append({"question": f"<image>How many dots in picture {i}?",
                     "answer": f"The count is \\boxed{{{i + 1}}}", "image": names,
                     "category": "count", "source": "synthetic", "qid": f"q{i}"})
    pq.write_table(pa.Table.from_pylist(rows), folder / "39Krelease.parquet")
    return folder / "39Krelease.parquet"


def _preprocess_like_the_reference(raw_parquet: str, local_img_folder: str, out_dir: str) -> str:
    """vbdi/cppo verl/examples/data_preprocess/virl39k.py, rewritten for the test (same calls,
    same row layout), run in the current directory with the same relative arguments."""
    datasets = pytest.importorskip("datasets")
    from mathruler.grader import extract_boxed_content

    def resize_min_side(image, min_size=28):
        w, h = image.size
        if min(w, h) >= min_size:
            return image
        scale = max(min_size / w, min_size / h)
        return image.resize((int(round(w * scale)), int(round(h * scale))), Image.LANCZOS)

    train = datasets.load_dataset("parquet", data_files=raw_parquet, split="train")
    train = train.filter(lambda example: len(example["image"]) <= 1)

    def process_fn(example, idx):
        problem = example["question"]
        if "<image>" not in problem:
            problem = "<image>\n" + problem
        answer = extract_boxed_content(example["answer"])
        paths = [os.path.join(local_img_folder, img) for img in example["image"]]
        return {"data_source": "TIGER-Lab/ViRL39K",
                "prompt": [{"role": "user", "content": problem + " " + INSTRUCTION}],
                "images": [resize_min_side(Image.open(p)) for p in paths], "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": answer},
                "extra_info": {"split": "train", "index": idx, "answer": answer,
                               "question": problem}}

    train = train.map(process_fn, with_indices=True)
    os.makedirs(out_dir, exist_ok=True)
    train.to_parquet(os.path.join(out_dir, "train.parquet"))
    return os.path.join(out_dir, "train.parquet")


def test_reference_preprocessed_virl39k_keeps_every_row(processor, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    _raw_virl39k(tmp_path / "data" / "TIGER-Lab-ViRL39K")
    monkeypatch.chdir(work)  # the script's own defaults are relative: ../data/...
    out = _preprocess_like_the_reference("../data/TIGER-Lab-ViRL39K/39Krelease.parquet",
                                         "../data/TIGER-Lab-ViRL39K", "../data/virl39k_verl")
    out = os.path.abspath(out)
    stored = pq.read_table(out).to_pylist()
    assert len(stored) == 9  # 3 of the 12 rows have two images
    by_path = [r for r in stored if r["images"][0]["bytes"] is None]
    assert len(by_path) == 8 and by_path[0]["images"][0]["path"].startswith("../data/")
    # read from the directory the script ran in (as verl and datasets resolve the paths)
    ds = open_dataset([out], processor=processor, shuffle=False)
    assert ds.num_kept == 9 and ds.scan.num_skipped == 0
    items = ds.epoch_items()
    assert len(items) == 9 and sum(ds.skip_counts().values()) == 0
    assert [x.ground_truth for x in items] == [str(i + 1) for i in range(12) if i % 4 != 3]
    # from elsewhere: refused at open, the message naming both places looked in
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as err:
        open_dataset([out], processor=processor)
    msg = str(err.value)
    assert "8 skipped (image_missing 8" in msg and "--max-skip-fraction" in msg
    assert str(tmp_path / "../data/TIGER-Lab-ViRL39K/images") in msg  # the current directory
    assert str(Path(out).resolve().parent / "../data/TIGER-Lab-ViRL39K/images") in msg


def test_raw_virl39k_rows(processor, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = _raw_virl39k(tmp_path / "release")
    monkeypatch.chdir(tmp_path.parent)  # the image paths resolve against the parquet's folder
    # the reference drops multi-image rows by design: a filter, reported but not held against
    # --max-skip-fraction (a quarter of the rows here)
    ds = open_dataset([raw], processor=processor, shuffle=False)
    assert ds.scan.num_filtered == 3 and ds.scan.num_skipped == 0 and ds.num_kept == 9
    assert ds.skip_counts()["too_many_images"] == 3
    assert "12 rows, 9 kept, 0 skipped, 3 filtered (too_many_images 3)" in ds.scan.summary()
    items = ds.epoch_items()
    assert [x.ground_truth for x in items] == [str(i + 1) for i in range(12) if i % 4 != 3]
    response = f"<think>I count them.</think> The answer is \\boxed{{{items[0].ground_truth}}}"
    assert cppo_reward(response, items[0].ground_truth).score == pytest.approx(1.0)
    assert "How many dots in picture 0?" in items[0].prompt and "\\boxed{}" in items[0].prompt


def test_raw_virl39k_read_directly_equals_the_reference_preprocessing(processor, tmp_path,
                                                                      monkeypatch):
    """Reading 39Krelease.parquet directly gives the trainer exactly what it gets from the file
    virl39k.py writes: the same rows, prompts, token ids and pixels (row 5's 56x20 image scaled
    up to a 28-pixel shorter side, LANCZOS, as the script does)."""
    monkeypatch.chdir(tmp_path)
    raw = _raw_virl39k(tmp_path / "release")
    made = _preprocess_like_the_reference(str(raw), str(tmp_path / "release"),
                                          str(tmp_path / "verl"))
    direct = open_dataset([raw], processor=processor, shuffle=False, perturb=False).epoch_items()
    prepared = open_dataset([made], processor=processor, shuffle=False,
                            perturb=False).epoch_items()
    assert len(direct) == len(prepared) == 9
    for a, b in zip(direct, prepared):
        assert a.prompt == b.prompt and a.ground_truth == b.ground_truth
        assert torch.equal(a.prompt_ids, b.prompt_ids)
        assert torch.equal(a.image_grid_thw, b.image_grid_thw)
        assert torch.equal(a.pixel_values, b.pixel_values)


def test_all_images_missing_is_refused_with_exact_counts(processor, tmp_path):
    rows = [{"question": "Q", "images": [{"bytes": None, "path": f"gone/{i}.png"}],
             "answer": "1"} for i in range(48)]
    path = tmp_path / "missing.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=10)
    with pytest.raises(ValueError, match=r"no usable row in .*: 48 rows, 0 kept, 48 skipped "
                                         r"\(image_missing 48; e\.g\. .* row 0: image file "):
        open_dataset([path], processor=processor)


def _grouped(tmp_path, rows=20, group=5) -> Path:
    path = tmp_path / "grouped.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": f"q{i}", "answer": str(i)}
                                         for i in range(rows)]), path, row_group_size=group)
    return path


def test_an_epoch_is_a_uniform_permutation_across_row_groups(tmp_path):
    """20 rows in 4 row groups of 5. Under a uniform permutation the first two rows of an epoch
    come from the same group with probability 4/19 (0.21); the earlier two-level order (row
    groups shuffled, then rows inside each) always drew them from one group. Over 300 epochs:
    mean 63, sd 7; the test accepts 30-110 (the two-level order gives 300)."""
    path = _grouped(tmp_path)
    reader = RowReader([str(path)], seed=3, shuffle=True, jsonl_chunk_rows=4)
    same, positions = 0, np.zeros((20, 20))
    for epoch in range(300):
        rows = [i for i, _, _ in reader.take(20)]
        assert sorted(rows) == list(range(20))
        same += rows[0] // 5 == rows[1] // 5
        positions[rows, np.arange(20)] += 1
        reader.next_epoch()
    assert 30 <= same <= 110, same
    # every row visits every position about equally often (15 expected; chi-square, 19 dof
    # per row: a p < 1e-4 tail is above 50)
    chi2 = ((positions - 15) ** 2 / 15).sum(axis=1)
    assert chi2.max() < 50, chi2.max()


def test_batches_stay_in_one_epoch_and_the_counts_are_reported(processor, tmp_path):
    Image.new("RGB", (40, 40), (1, 2, 3)).save(tmp_path / "ok.png")
    rows = [{"question": f"q{i}", "images": [{"bytes": None, "path": "ok.png" if i % 10 else
                                              "missing.png"}], "answer": str(i)}
            for i in range(30)]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=8)
    ds = open_dataset([path], processor=processor, seed=1, perturb=False, max_skip_fraction=0.2)
    (opening,) = ds.reports()
    assert "30 rows, 27 kept, 3 skipped (image_missing 3; e.g." in opening
    epochs = []
    for _ in range(6):  # 27 kept rows, batches of 8: 3 per epoch, 3 rows dropped each epoch
        batch = ds.next_batch(8)
        assert len({x.epoch for x in batch}) == 1 and len({x.index for x in batch}) == 8
        epochs.append(batch[0].epoch)
    assert epochs == [0, 0, 0, 1, 1, 1]
    (closed,) = ds.reports()
    assert closed.startswith("data epoch 0 of ") and "24 rows processed, 0 skipped" in closed
    assert ds.stats() == {"data/epoch": 1.0, "data/kept": 27.0, "data/skipped": 3.0,
                          "data/filtered": 0.0, "data/skipped_image_missing": 3.0}
    with pytest.raises(ValueError, match="a batch of 28 prompts exceeds the 27 usable rows"):
        ds.next_batch(28)

"""The start point (training/start.py): the run's length from --train-epochs over the usable rows
of the training data (the scan handed on to the dataset), --train-iters winning when both are
given, 100 steps without either. In-process; the data is made here (the scan reads image
headers and measures prompts with the model directory's processor)."""

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from PIL import Image

from helpers import tiny_qwen, tiny_vl
from megatron_cppo.training.config import parse_config
from megatron_cppo.training.start import DEFAULT_TRAIN_ITERS, resolve_start


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("start")
    tiny_qwen.hf_config(tied=True).save_pretrained(root / "hf")
    tiny_vl.write_tokenizer_and_processor(str(root / "hf"))
    png = io.BytesIO()
    Image.new("RGB", (40, 40), (9, 8, 7)).save(png, format="PNG")
    long = " word" * 600  # rows 1 and 2: over --max-prompt-length 512, filtered like verl's
    rows = [{"question": f"q{i}" + (long if i in (1, 2) else ""),
             "images": [{"bytes": png.getvalue(), "path": None}],
             "answer": str(i) if i % 9 else None} for i in range(50)]  # 6 rows without answer
    pq.write_table(pa.Table.from_pylist(rows), root / "train.parquet", row_group_size=16)
    return str(root / "hf"), str(root / "train.parquet")


def _resolve(paths, *flags):
    hf, data = paths
    return resolve_start(parse_config(["--hf-dir", hf, "--data-path", data,
                                       "--rollout-batch-size", "4", "--n-samples-per-prompt", "2",
                                       "--global-batch-size", "8", "--max-skip-fraction", "0.2",
                                       *flags]), rank=0)


def test_train_epochs_count_the_usable_rows(paths):
    cfg, start = _resolve(paths, "--train-epochs", "2")
    scan = start.train_scan  # 50 rows, 6 without an answer, 2 prompts too long
    assert len(scan.kept) == 42 and scan.skips == {"answer_not_string": 6,
                                     "prompt_too_long": 2}
    assert cfg.training.train_iters == 2 * (42 // 4) == 20
    assert start.notes == ["--train-epochs 2: 2 x floor(42 usable rows / 4 prompts) = 20 steps"]


def test_train_iters_wins_and_the_default_is_100(paths):
    cfg, start = _resolve(paths, "--train-epochs", "2", "--train-iters", "5")
    assert cfg.training.train_iters == 5 and "--train-iters 5 given: 5 steps" in start.notes[0]
    cfg, start = _resolve(paths)
    assert cfg.training.train_iters == DEFAULT_TRAIN_ITERS == 100 and start.train_scan is None
    cfg, _ = _resolve(paths, "--train-iters", "7")
    assert cfg.training.train_iters == 7


def test_an_epoch_must_hold_a_batch(paths):
    with pytest.raises(ValueError, match="--train-epochs: .* 42 usable rows, fewer than one "
                                         "batch of --rollout-batch-size 64"):
        _resolve(paths, "--train-epochs", "1", "--rollout-batch-size", "64",
                 "--global-batch-size", "128")
    with pytest.raises(ValueError, match="--train-epochs: must be an integer >= 1"):
        _resolve(paths, "--train-epochs", "0")

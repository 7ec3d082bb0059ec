"""Checksummed pickled files of a training checkpoint (megatron_cppo/checkpoint/torch_file.py).

``trainer_state.pt`` and ``rng/rankNNNNN.pt`` sit outside the distributed checkpoints that
``checksums.json`` covers, so they carry a CRC-32 record of their own. Proven here, in process:
  * a round trip returns the object (tensors, numpy and Python RNG states) and leaves no temporary
    file, with the permissions a plain ``torch.save`` would give;
  * one flipped byte, a truncated file, a missing file and an unreadable record are refused with a
    ValueError naming the file;
  * a file without a record (a checkpoint written before records existed) loads with one warning,
    but is refused when other files of the same checkpoint have their records;
  * a save that fails leaves the previous file and record as they were.
"""

from __future__ import annotations

import os
import random
import re

import numpy as np
import pytest
import torch

from megatron_cppo.checkpoint import CheckpointError
from megatron_cppo.checkpoint import torch_file as tf


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"counters": {"step": 4 + seed, "optimizer_steps": 3}, "torch": torch.get_rng_state(),
            "python": random.Random(seed).getstate(),
            "numpy": np.random.RandomState(seed).get_state(),
            "weights": torch.randn(64, 32, generator=g)}


def _assert_same(a: dict, b: dict) -> None:
    assert a["counters"] == b["counters"] and a["python"] == b["python"]
    assert torch.equal(a["torch"], b["torch"]) and torch.equal(a["weights"], b["weights"])
    assert all(np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y
               for x, y in zip(a["numpy"], b["numpy"]))


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "trainer_state.pt"
    tf.save_torch_file(_state(), path)
    return path


def test_round_trip(saved, tmp_path):
    _assert_same(tf.load_torch_file(saved, "trainer state"), _state())
    assert tf.has_checksum(saved)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trainer_state.pt",
                                                          "trainer_state.pt.checksum.json"]
    plain = tmp_path / "plain.pt"
    torch.save({}, plain)
    assert saved.stat().st_mode == plain.stat().st_mode  # not mkstemp's 0600
    # saving again replaces both the file and its record
    tf.save_torch_file(_state(seed=1), saved)
    _assert_same(tf.load_torch_file(saved, "trainer state"), _state(seed=1))


def _flip_byte(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_byte_is_refused_naming_the_file(saved):
    _flip_byte(saved, saved.stat().st_size // 2)  # inside the tensor's bytes: unpickles fine
    with pytest.raises(ValueError, match=re.escape(f"{saved} (trainer state): checksum mismatch")):
        tf.load_torch_file(saved, "trainer state")


def test_truncation_is_refused(saved):
    size = saved.stat().st_size
    with open(saved, "rb+") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match=re.escape(f"{saved} (trainer state): truncated "
                                                        f"({size - 100} bytes")):
        tf.load_torch_file(saved, "trainer state")


def test_missing_file_and_unreadable_record_are_refused(saved, tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'rank00001.pt'} (RNG state): "
                                                   "missing")):
        tf.load_torch_file(tmp_path / "rank00001.pt", "RNG state")
    record = tf.record_path(saved)
    for text in ("{not json", '{"algorithm": "md5", "crc32": 1, "size": 2}',
                 '{"algorithm": "crc32", "crc32": "x", "size": 2}'):
        record.write_text(text)
        with pytest.raises(ValueError, match=re.escape(f"{record}: unreadable checksum record")):
            tf.load_torch_file(saved, "trainer state")


def test_missing_record_warns_once(saved, capsys):
    tf.record_path(saved).unlink()  # as written before records existed
    for _ in range(2):
        _assert_same(tf.load_torch_file(saved, "trainer state", checkpoint_dir=saved.parent),
                     _state())
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and str(saved) in err and "unverified" in err


def test_missing_record_is_refused_when_others_have_theirs(tmp_path):
    trainer = tmp_path / "trainer_state.pt"
    (tmp_path / "rng").mkdir()
    rng = tmp_path / "rng" / "rank00000.pt"
    tf.save_torch_file(_state(), trainer)
    tf.save_torch_file({"torch": torch.get_rng_state()}, rng)
    tf.record_path(rng).unlink()
    with pytest.raises(ValueError, match=re.escape(f"{rng} (RNG state): its checksum record "
                                                   "rank00000.pt.checksum.json is missing")):
        tf.load_torch_file(rng, "RNG state", checkpoint_dir=tmp_path)


def test_unverifiable_garbage_is_refused_naming_the_file(tmp_path):
    old = tmp_path / "trainer_state.pt"
    old.write_bytes(b"\x80\x02not a pickle at all")
    with pytest.raises(ValueError, match=re.escape(f"{old} (trainer state): unreadable")):
        tf.load_torch_file(old, "trainer state")


def test_failed_save_keeps_the_previous_file(saved, tmp_path, monkeypatch):
    before = (saved.read_bytes(), tf.record_path(saved).read_bytes())

    def failing(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"partial")
        raise OSError("disk full (injected)")

    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(OSError, match="disk full"):
        tf.save_torch_file(_state(seed=1), saved)
    monkeypatch.undo()
    assert (saved.read_bytes(), tf.record_path(saved).read_bytes()) == before
    assert sorted(os.listdir(tmp_path)) == ["trainer_state.pt", "trainer_state.pt.checksum.json"]
    _assert_same(tf.load_torch_file(saved, "trainer state"), _state())

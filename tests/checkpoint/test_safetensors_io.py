"""Converter I/O building blocks: the streaming safetensors writer produces files that the
safetensors library reads back bit for bit (sharded, with an index), truncated files are named, and
output directories appear only when complete."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_cppo.checkpoint.atomic import OutputExistsError, atomic_output_dir
from megatron_cppo.checkpoint.safetensors_io import (INDEX_NAME, CheckpointFileError,
                                                  SafetensorsDir, ShardedSafetensorsWriter)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "b.bias": torch.randn(3, generator=g),
        "c.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d.half": torch.randn(4, 4, generator=g).half(),
    }


def test_streaming_writer_round_trip_sharded(tmp_path):
    ts = _tensors()
    w = ShardedSafetensorsWriter(tmp_path, [(k, v.shape, v.dtype) for k, v in ts.items()],
                                 max_shard_bytes=80)
    for k, v in ts.items():
        w.write(k, v)
    w.close()
    assert len(w.files) > 1
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(ts)
    for k, v in ts.items():
        with safe_open(str(tmp_path / index["weight_map"][k]), framework="pt") as f:
            assert torch.equal(f.get_tensor(k), v) and f.get_tensor(k).dtype == v.dtype
    r = SafetensorsDir(tmp_path)
    assert sorted(r.names()) == sorted(ts)
    assert all(torch.equal(r.get(k), v) for k, v in ts.items())


def test_writer_refuses_undeclared_or_misshaped(tmp_path):
    w = ShardedSafetensorsWriter(tmp_path, [("x", (2,), torch.float32)])
    with pytest.raises(ValueError, match="expected x \\[2\\]"):
        w.write("x", torch.zeros(3))


def test_truncated_file_is_named(tmp_path):
    save_file(_tensors(), str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointFileError, match="model.safetensors: truncated"):
        SafetensorsDir(tmp_path)


def test_atomic_dir(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("interrupted")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with atomic_output_dir(out) as tmp:
        (tmp / "f").write_text("1")
    assert (out / "f").read_text() == "1"
    with pytest.raises(OutputExistsError, match="already exists"):
        with atomic_output_dir(out):
            pass
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "g").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["g"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

"""Hostile data, one table: every case ends as a kept row, a counted skip with its reason, or a
ValueError naming the file (the trainer prints it as one ``error:`` line), never another
exception from inside a library.

Row cases: the hostile row is written next to one good row (JSONL, or parquet where the value's
type needs it), the dataset opened with every skip allowed and read for one whole epoch with the
perturbed views on, so a row that passes the scan also goes through decoding, the resize, the
processor and both perturbations. File cases: the file alone, opened. Reward cases: the grader on
ground truths it cannot parse returns a score in [0, 1] without raising.
"""

import io
import json
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers.datasets import open_dataset
from megatron_cppo.data.images import decode_image
from megatron_cppo.rewards import cppo_reward


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _rgb(w=40, h=40):
    return Image.fromarray(np.random.default_rng(w * 1000 + h).integers(
        0, 255, (h, w, 3), dtype=np.uint8))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (8-bit RGB) and whose pixel data is one empty
    compressed block: what a decompression bomb looks like to a reader before it decodes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


def _truncated(data: bytes) -> bytes:
    return data[:len(data) // 2]


GOOD = {"question": "How many?", "images": [{"bytes": _encode(_rgb()), "path": None}],
        "answer": "3"}

# (case, the hostile row; images given as bytes, or a file name made by _files) -> expected:
# "kept", or the skip reason
ROWS = [
    ("no question column", {"images": GOOD["images"], "answer": "3"}, "question_missing"),
    ("null question", {**GOOD, "question": None}, "question_missing"),
    ("empty question", {**GOOD, "question": ""}, "question_missing"),
    ("blank question", {**GOOD, "question": " \n\t"}, "question_missing"),
    ("question is a number", {**GOOD, "question": 42}, "question_missing"),
    ("prompt of non-dict turns", {"prompt": ["hi", 3], "images": ["ok.png"], "answer": "3"},
     "question_missing"),
    ("no answer column", {"question": "Q", "images": GOOD["images"]}, "answer_not_string"),
    ("null answer", {**GOOD, "answer": None}, "answer_not_string"),
    ("answer is a number", {**GOOD, "answer": 3}, "answer_not_string"),
    ("empty answer", {**GOOD, "answer": ""}, "answer_empty"),
    ("blank answer", {**GOOD, "answer": "  "}, "answer_empty"),
    ("empty boxed answer", {**GOOD, "answer": "The answer is \\boxed{}"}, "answer_empty"),
    ("no images column", {"question": "Q", "answer": "3"}, "image_missing"),
    ("null images", {**GOOD, "images": None}, "image_missing"),
    ("empty image list", {**GOOD, "images": []}, "image_missing"),
    ("image entry is a number", {**GOOD, "images": [7]}, "image_missing"),
    ("image entry of null bytes and path", {**GOOD, "images": [{"bytes": None, "path": None}]},
     "image_missing"),
    ("image path does not exist", {**GOOD, "images": ["nowhere.png"]}, "image_missing"),
    ("image path is a directory", {**GOOD, "images": ["adir"]}, "image_missing"),
    ("zero-byte image file", {**GOOD, "images": ["empty.png"]}, "image_undecodable"),
    ("zero-byte image bytes", {**GOOD, "images": [{"bytes": b"", "path": None}]},
     "image_missing"),
    ("garbage bytes", {**GOOD, "images": [{"bytes": b"\x00\x01garbage", "path": None}]},
     "image_undecodable"),
    ("truncated PNG", {**GOOD, "images": [{"bytes": _truncated(_encode(_rgb(64, 64))),
                                           "path": None}]}, "image_undecodable"),
    ("truncated JPEG", {**GOOD, "images": [{"bytes": _truncated(_encode(_rgb(64, 64), "JPEG")),
                                            "path": None}]}, "image_undecodable"),
    ("PNG header only", {**GOOD, "images": [{"bytes": _png_header_only(64, 64), "path": None}]},
     "image_undecodable"),
    ("decompression-bomb header", {**GOOD, "images": [
        {"bytes": _png_header_only(100_000, 100_000), "path": None}]}, "image_over_pixel_limit"),
    ("over the pixel limit", {**GOOD, "images": ["big.png"]}, "image_over_pixel_limit"),
    ("aspect ratio over 200", {**GOOD, "images": [{"bytes": _encode(_rgb(1, 300)),
                                                   "path": None}]}, "image_aspect_ratio"),
    ("1x1 image", {**GOOD, "images": [{"bytes": _encode(_rgb(1, 1)), "path": None}]}, "kept"),
    ("grayscale", {**GOOD, "images": [{"bytes": _encode(_rgb().convert("L")), "path": None}]},
     "kept"),
    ("1-bit", {**GOOD, "images": [{"bytes": _encode(_rgb().convert("1")), "path": None}]},
     "kept"),
    ("palette", {**GOOD, "images": [{"bytes": _encode(_rgb().convert("P")), "path": None}]},
     "kept"),
    ("RGBA", {**GOOD, "images": [{"bytes": _encode(_rgb().convert("RGBA")), "path": None}]},
     "kept"),
    ("grayscale + alpha", {**GOOD, "images": [{"bytes": _encode(_rgb().convert("LA")),
                                               "path": None}]}, "kept"),
    ("16-bit grayscale", {**GOOD, "images": [{"bytes": _encode(Image.fromarray(
        np.arange(1600, dtype=np.uint16).reshape(40, 40) * 40)), "path": None}]}, "kept"),
    ("CMYK JPEG", {**GOOD, "images": [{"bytes": _encode(_rgb().convert("CMYK"), "JPEG"),
                                       "path": None}]}, "kept"),
    ("two images", {**GOOD, "images": GOOD["images"] * 2}, "too_many_images"),
    ("more image markers than images", {**GOOD, "question": "<image><image>Q"},
     "image_token_mismatch"),
    ("prompt over --max-prompt-length", {**GOOD, "question": "word " * 400},
     "prompt_too_long"),
    ("non-string extra fields", {**GOOD, "data_source": 5, "extra_info": [1], "response": 2},
     "kept"),
    ("a single image path, not a list", {**GOOD, "images": "ok.png"}, "kept"),
    ("unparsable ground truth", {**GOOD, "answer": "\\frac{1}{"}, "kept"),
]

# raw JSONL lines (bytes) -> the skip reason
LINES = [
    ("not JSON", b"{this is not json", "bad_record"),
    ("a JSON array", b"[1, 2, 3]", "bad_record"),
    ("a JSON string", b'"question"', "bad_record"),
    ("invalid UTF-8", b'{"question": "caf\xe9", "images": ["ok.png"], "answer": "1"}',
     "bad_record"),
]


def _files(tmp_path):
    _rgb().save(tmp_path / "ok.png")
    _rgb(100, 100).save(tmp_path / "big.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "adir").mkdir(exist_ok=True)


def _good_jsonl(tmp_path):
    path = tmp_path / "good.jsonl"
    path.write_text(json.dumps({"question": "How many?", "images": ["ok.png"], "answer": "3"})
                    + "\n")
    return path


def _outcome(ds) -> str:
    items = ds.epoch_items()
    skipped = {r: n for r, n in ds.skip_counts().items() if n}
    assert len(items) + sum(skipped.values()) == 2, (items, skipped)
    if len(items) == 2:
        return "kept"
    (reason,) = skipped
    return reason


@pytest.mark.parametrize("case,row,expected", ROWS, ids=[c for c, _, _ in ROWS])
def test_hostile_row(processor, tmp_path, monkeypatch, case, row, expected):
    monkeypatch.chdir(tmp_path)
    _files(tmp_path)
    if any(isinstance(v, bytes) for e in (row.get("images") or [])
           if isinstance(e, dict) for v in e.values()):
        path = tmp_path / "hostile.parquet"
        pq.write_table(pa.Table.from_pylist([row]), path)
    else:
        path = tmp_path / "hostile.jsonl"
        path.write_text(json.dumps(row) + "\n")
    ds = open_dataset([path, _good_jsonl(tmp_path)], processor=processor, seed=1,
                      max_prompt_length=300, max_image_pixels=80 * 80, max_skip_fraction=1.0)
    assert _outcome(ds) == expected
    if expected != "kept":
        example = ds.skip_examples()[expected]
        assert example.startswith(f"{path} row 0"), example  # the file and the row


@pytest.mark.parametrize("case,line,expected", LINES, ids=[c for c, _, _ in LINES])
def test_hostile_jsonl_line(processor, tmp_path, monkeypatch, case, line, expected):
    monkeypatch.chdir(tmp_path)
    _files(tmp_path)
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(line + b"\n")
    ds = open_dataset([path, _good_jsonl(tmp_path)], processor=processor,
                      max_skip_fraction=1.0)
    assert _outcome(ds) == expected
    assert str(path) in ds.skip_examples()[expected]


def _parquet_bytes(rows) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


GOOD_ROWS = [{"question": f"q{i}", "images": [{"bytes": _encode(_rgb()), "path": None}],
              "answer": str(i)} for i in range(4)]

# (case, file name, its content) -> the error's pattern (the file is always named)
FILES = [
    ("empty JSONL", "e.jsonl", b"", "no rows"),
    ("blank-line JSONL", "b.jsonl", b"\n\n  \n", "no rows"),
    ("parquet of no rows", "z.parquet", None, "no rows"),
    ("truncated parquet", "t.parquet", _truncated(_parquet_bytes(GOOD_ROWS)),
     "not a readable parquet file"),
    ("not a parquet at all", "n.parquet", b"PAR1 nonsense", "not a readable parquet file"),
    ("every row bad", "bad.jsonl", b'{"question": "Q"}\n{"answer": "1"}\n', "no usable row"),
    ("most rows bad", "most.jsonl", b'{"question": "Q"}\n' * 3 + json.dumps(
        {"question": "Q", "images": ["ok.png"], "answer": "1"}).encode() + b"\n",
     "--max-skip-fraction"),
    ("an unknown file type", "d.csv", b"question,answer\nQ,1\n", "neither .parquet nor .jsonl"),
]


@pytest.mark.parametrize("case,name,content,pattern", FILES, ids=[c for c, *_ in FILES])
def test_hostile_file(processor, tmp_path, monkeypatch, case, name, content, pattern):
    monkeypatch.chdir(tmp_path)
    _files(tmp_path)
    path = tmp_path / name
    if content is None:  # a parquet file with a schema and no rows
        pq.write_table(pa.table({"question": pa.array([], pa.string())}), path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=pattern) as err:
        open_dataset([path], processor=processor)
    assert str(path) in str(err.value)


def test_high_bit_depth_images_keep_their_levels():
    """PIL's own conversion clips 16-bit grayscale to 255 (all but the darkest 0.4% of this ramp
    would turn white); decoding scales it to 8 bits instead."""
    ramp = np.arange(1600, dtype=np.uint16).reshape(40, 40) * 40   # 0 .. 63960
    for img in (Image.fromarray(ramp), Image.fromarray(ramp.astype(np.int32), mode="I")):
        rgb = np.asarray(decode_image(img, base_dir=None, max_image_pixels=1 << 20))
        assert rgb.shape == (40, 40, 3) and (rgb[..., 0] == rgb[..., 2]).all()
        assert np.abs(rgb[..., 0].astype(float) - ramp / 257).max() <= 0.5
    small = np.arange(256, dtype=np.int32).reshape(16, 16)  # 32-bit, 8-bit content: as it is
    rgb = np.asarray(decode_image(Image.fromarray(small, mode="I"), base_dir=None,
                                  max_image_pixels=1 << 20))
    assert (rgb[..., 1] == small).all()


def test_a_directory_or_missing_file_is_refused_by_name(processor, tmp_path):
    for path in (tmp_path, tmp_path / "absent.parquet"):
        with pytest.raises(ValueError, match=str(path)):
            open_dataset([path], processor=processor)


@pytest.mark.parametrize("truth", ["\\frac{1}{", "}{", "\\boxed{", "", "None", "x" * 5000,
                                   "\\sqrt[", "1/0", "\\begin{matrix}"])
def test_grader_on_ground_truths_it_cannot_parse(truth):
    for response in ("<think>t</think> \\boxed{1}", f"<think>t</think> \\boxed{{{truth}}}",
                     "no box at all"):
        score = cppo_reward(response, truth).score
        assert 0.0 <= score <= 1.0

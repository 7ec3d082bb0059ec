"""HF -> megatron -> HF through the CLI is bit-for-bit the identity, and the export is a working
transformers model.

Proven here, on tiny random checkpoints (tiny_qwen: GQA 4/2 heads, 4 LM layers = 2 per stage at
PP=2, 3 ViT blocks incl. a full-attention one):
  * HF -> megatron (TP2 PP2) -> HF gives every tensor back bitwise, under the same names as the
    input (its key layout is recorded and reused by the export) and dtypes, for tied
    (vocab 1531: padded to 1532 for TP2, stripped on export; no lm_head written)
    and untied embeddings, from either HF key layout on input, fp32 and bf16;
  * HF -> megatron (TP2 PP1, via the installed console script) -> reshard (TP1 PP2) -> HF is
    bitwise as well, with the vocabulary padding removed by the reshard;
  * the export is sharded with an index when asked, has config / generation config and the
    source's tokenizer / processor / chat-template files, loads with ``from_pretrained``, gives
    the original model's logits exactly and runs ``generate``.
Not proven here: that training's loader reads the checkpoint at every layout
(test_checkpoint_load.py does), logits of the megatron model (test_convert_verify.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import convert_fixtures as cf
from helpers import tiny_qwen
from megatron_cppo.checkpoint import read_meta
from megatron_cppo.convert import cli

# (tied, input key layout, dtype): every tie setting with both layouts, both dtypes covered
VARIANTS = [(True, "old", torch.float32), (True, "new", torch.float32),
            (False, "old", torch.bfloat16), (False, "new", torch.bfloat16)]
IDS = [f"{'tied' if t else 'untied'}-{layout}-{str(d)[6:]}" for t, layout, d in VARIANTS]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("roundtrip")


# stand-ins for the tokenizer / processor files an export must carry over from the source
AUX = {"tokenizer.json": '{"version": "1.0"}', "tokenizer_config.json": "{}",
       "preprocessor_config.json": '{"patch_size": 14}', "chat_template.jinja": "{{ messages }}"}


@pytest.fixture(scope="module")
def hf_dirs(root) -> dict:
    dirs = {name: cf.write_hf_dir(root / f"hf_{name}", tied=t, layout=layout, dtype=d)
            for name, (t, layout, d) in zip(IDS, VARIANTS)}
    for file, text in AUX.items():
        (dirs[IDS[0]] / file).write_text(text)
    return dirs


@pytest.mark.parametrize("name", IDS)
def test_hf_megatron_tp2pp2_hf_is_bitwise_identical(root, hf_dirs, name, capsys):
    tied, _, dtype = VARIANTS[IDS.index(name)]
    hf, ckpt, out = hf_dirs[name], root / f"mc22_{name}", root / f"back_{name}"
    assert cli.main(["hf-to-megatron", "--hf-dir", str(hf), "--out", str(ckpt), "--tp", "2",
                     "--pp", "2", "--no-progress"]) == 0
    meta = read_meta(ckpt)
    assert (meta.tp, meta.pp, meta.dtype) == (2, 2, {torch.float32: "fp32",
                                                      torch.bfloat16: "bf16"}[dtype])
    assert meta.padded_vocab_size == (1532 if tied else 1536)  # 1531 does not split over TP2
    assert meta.source_hf_dir == str(hf.resolve())
    # small shards: the index path of the writer runs too
    assert cli.main(["megatron-to-hf", "--megatron-dir", str(ckpt), "--out", str(out),
                     "--max-shard-size", "400KB", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "hf-to-megatron:" in printed and "megatron-to-hf:" in printed and "MB/s" in printed

    got, want = cf.raw_hf_tensors(out), cf.raw_hf_tensors(hf)
    cf.assert_bitwise_equal(got, want, name)  # including the names: the source's key layout
    assert meta.source_hf_layout == {"old": "transformers", "new": "language_model"}[
        VARIANTS[IDS.index(name)][1]]
    assert ("lm_head.weight" in got) != tied
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(got) and len(set(index["weight_map"].values())) > 1
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl" and (out / "generation_config.json").is_file()
    if name == IDS[0]:  # copied from the source directory recorded in the checkpoint
        assert all((out / f).read_text() == text for f, text in AUX.items())


@pytest.mark.slow
def test_reshard_tp2pp1_to_tp1pp2_then_hf_is_bitwise_identical(root, hf_dirs):
    """The first step runs the installed console script as a user would (one real process)."""
    name = "tied-new-float32"  # tied: the vocabulary padding changes from 1532 to 1531 rows
    hf, a, b, out = hf_dirs[name], root / "rs_tp2pp1", root / "rs_tp1pp2", root / "rs_back"
    exe = Path(sys.executable).parent / "megatron-cppo-convert"
    proc = subprocess.run([str(exe), "hf-to-megatron", "--hf-dir", str(hf), "--out", str(a),
                           "--tp", "2", "--pp", "1", "--no-progress"],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hf-to-megatron:" in proc.stdout and "tensors" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert read_meta(a).padded_vocab_size == 1532

    assert cli.main(["reshard", "--megatron-dir", str(a), "--out", str(b), "--tp", "1",
                     "--pp", "2", "--no-progress"]) == 0
    meta = read_meta(b)
    assert (meta.tp, meta.pp, meta.padded_vocab_size) == (1, 2, 1531)
    assert cli.main(["megatron-to-hf", "--megatron-dir", str(b), "--out", str(out),
                     "--no-progress"]) == 0
    cf.assert_bitwise_equal(cf.raw_hf_tensors(out), cf.raw_hf_tensors(hf), "reshard")
    # the other key layout on request: what transformers' save_pretrained writes
    other = root / "rs_back_transformers"
    assert cli.main(["megatron-to-hf", "--megatron-dir", str(b), "--out", str(other),
                     "--hf-layout", "transformers", "--no-progress"]) == 0
    got = cf.raw_hf_tensors(other)
    assert "model.embed_tokens.weight" in got and "visual.patch_embed.proj.weight" in got
    assert not [k for k in got if k.startswith(("model.language_model.", "model.visual."))]
    cf.assert_bitwise_equal(cf.hf_tensors(other), cf.hf_tensors(hf), "reshard, other layout")


@pytest.mark.parametrize("name", ["tied-old-float32", "untied-new-bfloat16"])
def test_export_loads_with_transformers_and_generates(root, hf_dirs, name):
    """Depends on the TP2PP2 round trip above having written ``back_{name}``."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = root / f"back_{name}"
    if not out.is_dir():
        pytest.skip("the round-trip test did not run")
    exported = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        out, local_files_only=True).float().eval()
    original = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        hf_dirs[name], local_files_only=True).float().eval()
    assert exported.config.tie_word_embeddings == original.config.tie_word_embeddings
    mb = tiny_qwen.make_batch()[0]  # one sample with an 8x12-patch image, one text only
    kwargs = dict(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                  mm_token_type_ids=mb["mm_token_type_ids"], pixel_values=mb["pixel_values"],
                  image_grid_thw=mb["image_grid_thw"])
    with torch.no_grad():
        assert torch.equal(exported(**kwargs).logits, original(**kwargs).logits)
        first = {k: v[:1] for k, v in kwargs.items() if k not in ("pixel_values",
                                                                  "image_grid_thw")}
        first.update(pixel_values=mb["pixel_values"], image_grid_thw=mb["image_grid_thw"])
        gen = exported.generate(**first, max_new_tokens=4, do_sample=False)
        ref = original.generate(**first, max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, mb["input_ids"].shape[1] + 4)
    assert torch.equal(gen, ref)

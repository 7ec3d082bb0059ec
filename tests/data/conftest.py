"""Shared fixtures of the data tests: one real processor and one small built-in dataset per session
(building the processor loads the 11 MB tokenizer file, ~1-3 s)."""

import pytest

# Small bounds keep the processor cheap; the built-in images (56-112 px) fit inside them.
MIN_PIXELS = 28 * 28
MAX_PIXELS = 112 * 112


@pytest.fixture(scope="session")
def processor(tmp_path_factory):
    from megatron_cppo.data.tokenizer import build_qwen2_5_vl_processor
    return build_qwen2_5_vl_processor(tmp_path_factory.mktemp("proc") / "qwen2_5_vl",
                                      min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


@pytest.fixture(scope="session")
def builtin_dir(tmp_path_factory):
    from megatron_cppo.data.builtin import write_builtin_dataset
    out = tmp_path_factory.mktemp("builtin")
    write_builtin_dataset(out, seed=3, train_rows=24, validation_rows=8, sft_rows=8,
                          row_group_size=5)
    return out

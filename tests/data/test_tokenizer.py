"""The offline Qwen2.5-VL processor: real tokenizer ids, Qwen2.5 token set, Qwen2.5-VL template."""

from transformers import AutoProcessor, Qwen2_5_VLConfig

from megatron_cppo.data.tokenizer import QWEN2_5_VL_SPECIAL_IDS, build_qwen2_5_vl_processor


def test_processor_ids_template_and_reload(processor, tmp_path):
    tok = processor.tokenizer
    for text, want in QWEN2_5_VL_SPECIAL_IDS.items():
        assert tok.convert_tokens_to_ids(text) == want
    cfg = Qwen2_5_VLConfig()  # transformers' defaults = the released models' config.json ids
    for text, key in (("<|image_pad|>", "image_token_id"), ("<|video_pad|>", "video_token_id"),
                      ("<|vision_start|>", "vision_start_token_id"),
                      ("<|vision_end|>", "vision_end_token_id")):
        assert tok.convert_tokens_to_ids(text) == getattr(cfg, key)
    assert tok.convert_tokens_to_ids("<|im_end|>") == cfg.text_config.eos_token_id
    assert len(tok) == 151665  # Qwen3's four additions dropped
    # <think> is plain text for Qwen2.5 (several BPE pieces), not one added id
    assert len(tok.encode("<think>", add_special_tokens=False)) > 1
    assert tok.decode(tok.encode("héllo wörld 123", add_special_tokens=False)) == "héllo wörld 123"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == 151643

    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>Q?<|im_end|>\n"
                    "<|im_start|>assistant\n")

    # The saved directory is an HF processor directory (what the trainer and vLLM load) ...
    path = tmp_path / "p"
    built = build_qwen2_5_vl_processor(path, min_pixels=28 * 28, max_pixels=56 * 56)
    again = AutoProcessor.from_pretrained(path, local_files_only=True)
    assert type(again).__name__ == "Qwen2_5_VLProcessor"
    assert again.tokenizer.encode(text) == built.tokenizer.encode(text)
    assert again.image_processor.size["longest_edge"] == 56 * 56
    # ... and a second build with the same settings loads it.
    assert build_qwen2_5_vl_processor(path, min_pixels=28 * 28, max_pixels=56 * 56) is not None

"""A tiny random Qwen2.5-VL HF directory that vLLM can serve: weights + tokenizer + processor.

tests/helpers/tiny_qwen.py has no tokenizer and a head dim of 16; vLLM's CPU attention needs a head
dim in {32, 64, 80, ...} (docs/rollout.md), so this one has 2 LM heads of 64 (2 KV heads: TP 2
splits them), 2 LM layers (1 per stage at PP 2), a 2-block ViT (block 1 full attention, block 0
windowed) of 2 heads.

Tokenizer: byte-level BPE of 400 tokens trained on a fixed text, then the 14 Qwen special tokens at
400-413 (same order as the real 151643-151656) and a Qwen-style chat template. The output layer has
512 rows: ids 414-511 exist in the model but not in the tokenizer (the sampler must never pick
them; ``valid_vocab`` = 414). Images are resized to at most 224 x 112 px (16 x 8 patches: wider
than one 112 px window).
"""

from __future__ import annotations

import os

import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
            "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
            "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
            "<|image_pad|>", "<|video_pad|>"]
BPE_SIZE = 400
MODEL_VOCAB = 512

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

_CORPUS = ["What is shown in the image? Count the red squares and give the answer as a number.",
           "The answer is 42. Solve for x: 3x + 5 = 20, so x = 5.",
           "A triangle has angles of 30, 60 and 90 degrees. Which side is the longest?"] * 20
_CORPUS += [f"item {i} costs {i * 7 % 113} coins and weighs {i * 13 % 97} grams" for i in range(300)]
_CORPUS += ["".join(chr(97 + (i * j) % 26) for j in range(3, 12)) for i in range(200)]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_SIZE, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    assert tok.get_vocab_size() == BPE_SIZE, tok.get_vocab_size()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def hf_config():
    """The built-in tiny architecture (training/builtin.py) around this module's tokenizer."""
    from megatron_cppo.training.builtin import tiny_hf_config

    return tiny_hf_config(vocab_size=MODEL_VOCAB,
                          special_ids={name: BPE_SIZE + i for i, name in enumerate(SPECIALS)},
                          intermediate_size=256, vision_intermediate_size=64,
                          max_position_embeddings=1024)


def random_state(model, seed: int) -> None:
    """Every parameter redrawn (norms near 1, everything else N(0, 0.08^2)): a wrong tensor shows
    in the outputs. Logits spread enough that greedy decoding has no near-ties."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if ("norm" in name or "ln_q" in name) else 0.08 * noise)


def write_checkpoint(path: str, *, seed: int = 0) -> str:
    """Save the model (fp32, legacy key layout as transformers writes it), tokenizer, processor."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    os.makedirs(path, exist_ok=True)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(hf_config()).float().eval()
    random_state(model, seed)
    eos = BPE_SIZE + SPECIALS.index("<|im_end|>")
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = BPE_SIZE  # <|endoftext|>
    model.save_pretrained(path)
    write_tokenizer_and_processor(path)
    return path


def write_tokenizer_and_processor(path: str) -> None:
    """The tokenizer, image processor and chat template files vLLM and transformers read."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor

    tokenizer = _tokenizer()
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=224 * 112)
    try:
        from transformers import Qwen2VLVideoProcessor

        video = Qwen2VLVideoProcessor()
    except ImportError:  # pragma: no cover - older transformers
        video = None
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    video_processor=video, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(path)
    tokenizer.save_pretrained(path)


def image(seed: int, size=(224, 112)):
    """A random RGB PIL image."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def chat_prompt(processor, question: str, has_image: bool) -> str:
    """The chat template applied to one user turn (image first, then the question)."""
    content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True, tokenize=False)


def length_parity_reward(response: str, answer: str):
    """A grader for a random model (it never writes a \\boxed answer): accuracy = the response's
    character count is odd, format = it is non-empty. Deterministic, mixes 0s and 1s."""
    from megatron_cppo.rewards import RewardOutput

    acc = float(len(response) % 2)
    return RewardOutput(score=acc, accuracy=acc, format=float(bool(response)))

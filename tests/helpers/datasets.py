"""A ``PromptDataset`` with its ``DataConfig`` fields as keyword arguments (the data tests)."""

from megatron_cppo.data.dataset import DataConfig, PromptDataset


def open_dataset(files, *, processor, seed=0, shuffle=True, perturb=True, **config):
    """A ``PromptDataset`` of ``files`` with the processor's pixel bounds; ``config``: the
    DataConfig fields (max_prompt_length, max_image_pixels, jsonl_chunk_rows, ...)."""
    return PromptDataset([str(f) for f in files], processor, DataConfig(**config), seed=seed,
                         shuffle=shuffle, perturb=perturb)

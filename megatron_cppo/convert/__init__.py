"""HF <-> Megatron checkpoint conversion (the CLI lives in megatron_cppo/convert/cli.py).

    conversions.py   hf_to_megatron, reshard, megatron_to_hf, check_checkpoint (what users call)
    streaming.py     streaming writes and reads of the torch_dist ``model/``; open_checkpoint
    meta_model.py    the single-process TP=1 / PP=1 model on the meta device; layout validation
    hf_source.py     the HF side: config, expected tensors, validated safetensors input
    verify.py        the logits check against transformers
"""

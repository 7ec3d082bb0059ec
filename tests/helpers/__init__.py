"""Helpers shared by the tests (importable as ``helpers``: pytest.ini puts tests/ on the path).

  distributed.py       run_on_ranks: a function on N spawned gloo ranks (megatron groups built)
  tiny_qwen.py         tiny Qwen2.5-VL configs, HF models and test cases (models, convert, training)
  tiny_vl.py           a tiny Qwen2.5-VL checkpoint with a small tokenizer for vLLM (rollout)
  toy_gpt.py           a toy GPT on megatron-core (layout parity of the platform layer)
  convert_fixtures.py  HF directories in either key layout, chunk corruption (converter tests)
  recorded.py          recorded plug-ins: replayed rollouts, prompts, a parity reward (trainer)
  datasets.py          open_dataset: a PromptDataset with config fields as keywords (data)
  plugin_contracts.py  the plug-in protocols' contracts as assertions
"""
